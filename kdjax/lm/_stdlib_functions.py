"""Documented functions of the Python standard library as prompt–completion
pairs: a built-in instruction dataset that nobody here wrote.

The data
--------
The ``.py`` files under the running interpreter's standard library
(``sysconfig.get_paths()["stdlib"]``, or ``stdlib_dir``). A directory is
entered only if its name is a Python identifier (which leaves out
``site-packages``, ``dist-packages``, ``lib-dynload`` and
``config-3.x-...``) and is not ``test``, ``tests``, ``idle_test`` or
``__pycache__`` (which leaves out the test suites: ``test``,
``unittest/test``, ``lib2to3/tests``, ``idlelib/idle_test``, ...); a file
is read only if its stem is an identifier. Each file is one module, named by
its path (``json/decoder.py`` is ``json.decoder``, ``json/__init__.py`` is
``json``). A file is read as strict UTF-8 (a BOM allowed) and parsed with
:mod:`ast` by the running interpreter; a file that is not UTF-8
(``file_not_utf8``) or does not parse (``file_syntax_error``) is skipped and
counted, never dropped silently.

The examples
------------
One example per *documented* function or method: a ``def`` or ``async def``
whose first statement is a string literal, found at module level, in a class
body (classes nested in classes too), or in an ``if``/``try``/``with`` block
of either (``if sys.platform == "win32": def ...``). Functions defined
inside functions (and classes inside functions) are no examples of their
own: they are part of their enclosing function's completion. Left out, each
counted under its reason in :attr:`kdjax.lm.RecordSet.skipped`:

* ``undocumented``: no docstring;
* ``private``: the function's name, or the name of a class it is in, starts
  with ``_`` and is not a dunder (``__init__`` and ``__eq__`` are in,
  ``_helper`` and ``_Impl.method`` out); ``include_private=True`` keeps them.
  Private *modules* (``_pydecimal``, ``_pyio``) are in;
* ``stub``: nothing after the docstring but ``pass``, ``...`` and ``raise
  NotImplementedError`` (``@overload`` signatures, abstract methods);
* ``same_line``: the body's first statement shares a line with the end of
  the docstring (``'''doc'''; return x``), so no line splits them;
* ``short_completion``: fewer than ``min_completion_lines`` non-blank lines;
* ``prompt_too_long`` / ``completion_too_long``: more characters than
  ``max_prompt_chars`` / ``max_completion_chars``.

``prompt`` is the source text from the first decorator (or the ``def``) to
the last line of the docstring; ``completion`` the source text of the rest
of the function, from the line after the docstring to the function's last
statement (comments between the docstring and the body are in; comments
after the last statement are not). Both end with a newline and are taken
from the file verbatim but for the indentation: the ``def`` line's leading
whitespace is removed from every line that starts with it (a whitespace-only
line shorter than it becomes empty; any other line, e.g. a continuation line
or a line of a multi-line string indented less than the ``def``, is kept as
it is), so a method reads as a top-level function and its body is indented
by its own indentation (four spaces in the standard library). A method's
prompt starts with a comment naming its class, ``# class Outer.Inner``;
a function's has no such line. ``prompt + completion`` is therefore the
function's source (after that comment) and parses with :func:`ast.parse`.
Each :class:`kdjax.lm.Record` has ``messages=None``, ``path`` the file,
``line`` the 1-based line of the ``def`` keyword, ``unit="line"``.

The split
---------
By module: ``sha256("kdjax.stdlib_functions:" + module)`` read as a number in
``[0, 1)`` picks ``train``, ``validation`` or ``test`` by the cumulative
``fractions`` (:func:`stdlib_module_split`). The examples of one module are
never in two splits, so a held-out module's code is never seen by a
tokenizer, a teacher or a student trained on ``train``. The split of a module
depends on its name and the fractions only: it is the same on every machine
and every Python version (the modules there are and their code are those of
the Python version).

Order and bounds
----------------
Modules in sorted order of their paths relative to the standard library
directory (``max_modules``: the first that many *of the split*), the
examples of a file in source order (``max_examples``: the first that many of
the split). The same options give the same records, in the same order, on
every run of one Python installation.
"""

from __future__ import annotations

import ast
import collections
import dataclasses
import hashlib
import os
import sysconfig
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

from kdjax.lm._records import Record, RecordSet

SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)

# The reasons a file or a function is left out (RecordSet.skipped keys).
SKIP_REASONS = {
    "file_not_utf8": "file not UTF-8",
    "file_syntax_error": "file does not parse",
    "undocumented": "no docstring",
    "private": "private name",
    "stub": "stub body",
    "same_line": "body on the docstring's line",
    "short_completion": "completion too short",
    "prompt_too_long": "prompt too long",
    "completion_too_long": "completion too long",
}

_SKIPPED_DIRS = frozenset(("test", "tests", "idle_test", "__pycache__"))
_SALT = "kdjax.stdlib_functions:"
_CONTAINERS = (ast.If, ast.Try, ast.With, ast.AsyncWith) + (
    (ast.TryStar,) if hasattr(ast, "TryStar") else ())

PathLike = Union[str, "os.PathLike[str]"]


# -----------------------------------------------------------------------------
# Modules and splits.
# -----------------------------------------------------------------------------


def _check_fractions(fractions: Sequence[float]) -> tuple[float, ...]:
  fractions = tuple(float(f) for f in fractions)
  if (len(fractions) != len(SPLITS) or any(f < 0 for f in fractions)
      or abs(sum(fractions) - 1.0) > 1e-6):
    raise ValueError(
        f"fractions={fractions}: give {len(SPLITS)} non-negative numbers "
        f"(for {', '.join(SPLITS)}) that sum to 1.")
  return fractions


def _check_split(split: str) -> None:
  if split not in SPLITS:
    raise ValueError(f"split={split!r}: use one of {SPLITS}.")


def stdlib_module_split(module: str,
                        fractions: Sequence[float] = DEFAULT_FRACTIONS
                        ) -> str:
  """The split of a module: ``"train"``, ``"validation"`` or ``"test"``.

  ``sha256("kdjax.stdlib_functions:" + module)``, its first 8 bytes read as a
  number in ``[0, 1)``, against the cumulative ``fractions`` (a split of
  fraction 0 gets no module). It depends on the name and the fractions only:
  the same on every machine and Python version.

  Args:
    module: the dotted module name (``"json.decoder"``).
    fractions: the fractions of train, validation and test (sum 1).

  Returns:
    The split's name.

  Raises:
    ValueError: fractions that are not three non-negative numbers summing
      to 1.
  """
  fractions = _check_fractions(fractions)
  digest = hashlib.sha256((_SALT + module).encode("utf-8")).digest()
  u = int.from_bytes(digest[:8], "big") / 2.0**64
  total, last = 0.0, None
  for split, fraction in zip(SPLITS, fractions):
    if fraction <= 0:
      continue
    total += fraction
    last = split
    if u < total:
      return split
  return last  # rounding: the sum fell short of u; the last split used


def _default_dir(stdlib_dir: Optional[PathLike]) -> str:
  path = (sysconfig.get_paths()["stdlib"] if stdlib_dir is None
          else os.fspath(stdlib_dir))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"no standard library directory at {path}.")
  return path


def _module_files(root: str) -> list[tuple[str, str]]:
  """``[(module, file)]`` of the directory, sorted by relative path."""
  found = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames
                         if d.isidentifier() and d not in _SKIPPED_DIRS)
    for name in filenames:
      stem, ext = os.path.splitext(name)
      if ext == ".py" and stem.isidentifier():
        full = os.path.join(dirpath, name)
        found.append((os.path.relpath(full, root), full))
  out = []
  for rel, full in sorted(found):
    parts = os.path.splitext(rel)[0].split(os.sep)
    if parts[-1] == "__init__" and len(parts) > 1:
      parts = parts[:-1]
    out.append((".".join(parts), full))
  return out


def stdlib_modules(*, fractions: Sequence[float] = DEFAULT_FRACTIONS,
                   stdlib_dir: Optional[PathLike] = None
                   ) -> dict[str, tuple[str, ...]]:
  """The modules of each split, without reading a file.

  Args:
    fractions: the fractions of train, validation and test (sum 1).
    stdlib_dir: the standard library's directory (default: the running
      interpreter's, ``sysconfig.get_paths()["stdlib"]``).

  Returns:
    ``{"train": (...), "validation": (...), "test": (...)}``: the dotted
    module names of each split, in sorted order of their paths.

  Raises:
    ValueError: bad fractions.
    FileNotFoundError: ``stdlib_dir`` is not a directory.
  """
  fractions = _check_fractions(fractions)
  out: dict[str, list[str]] = {split: [] for split in SPLITS}
  for module, _ in _module_files(_default_dir(stdlib_dir)):
    out[stdlib_module_split(module, fractions)].append(module)
  return {split: tuple(names) for split, names in out.items()}


# -----------------------------------------------------------------------------
# Functions of a module.
# -----------------------------------------------------------------------------


def _is_private(name: str) -> bool:
  return name.startswith("_") and not (name.startswith("__")
                                       and name.endswith("__"))


def _is_stub(statement: ast.stmt) -> bool:
  if isinstance(statement, ast.Pass):
    return True
  if (isinstance(statement, ast.Expr)
      and isinstance(statement.value, ast.Constant)
      and statement.value.value is Ellipsis):
    return True
  if isinstance(statement, ast.Raise) and statement.exc is not None:
    exc = statement.exc
    if isinstance(exc, ast.Call):
      exc = exc.func
    return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
  return False


def _functions(body: Sequence[ast.stmt], classes: tuple[str, ...]
               ) -> Iterator[tuple[ast.AST, tuple[str, ...]]]:
  """``(def, enclosing classes)`` in source order: module and class level,
  and inside their ``if``/``try``/``with`` blocks; not inside functions."""
  for node in body:
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      yield node, classes
    elif isinstance(node, ast.ClassDef):
      yield from _functions(node.body, classes + (node.name,))
    elif isinstance(node, _CONTAINERS):
      blocks = ([node.body]
                + [handler.body for handler in getattr(node, "handlers", ())]
                + [getattr(node, "orelse", []), getattr(node, "finalbody", [])])
      for block in blocks:
        yield from _functions(block, classes)


def _dedent(lines: Sequence[str], prefix: str) -> str:
  out = []
  for line in lines:
    if line.startswith(prefix):
      line = line[len(prefix):]
    elif not line.strip():
      line = ""
    out.append(line + "\n")
  return "".join(out)


@dataclasses.dataclass(frozen=True)
class _Options:
  max_prompt_chars: Optional[int]
  max_completion_chars: Optional[int]
  min_completion_lines: int
  include_private: bool


def _examples(path: str, source: str, tree: ast.Module, options: _Options
              ) -> Iterator[tuple[Optional[Record], Optional[str], int]]:
  """``(record, None, line)`` or ``(None, reason, line)`` per function."""
  lines = source.split("\n")
  for node, classes in _functions(tree.body, ()):
    line = node.lineno
    if ast.get_docstring(node, clean=False) is None:
      yield None, "undocumented", line
      continue
    if not options.include_private and any(
        _is_private(name) for name in classes + (node.name,)):
      yield None, "private", line
      continue
    docstring, rest = node.body[0], node.body[1:]
    if all(_is_stub(statement) for statement in rest):
      yield None, "stub", line
      continue
    if rest[0].lineno <= docstring.end_lineno:
      yield None, "same_line", line
      continue
    prefix = lines[line - 1][:node.col_offset]
    first = min([line] + [d.lineno for d in node.decorator_list])
    header = f"# class {'.'.join(classes)}\n" if classes else ""
    prompt = header + _dedent(lines[first - 1:docstring.end_lineno], prefix)
    completion = _dedent(lines[docstring.end_lineno:node.end_lineno], prefix)
    if sum(1 for text in completion.split("\n") if text.strip()
           ) < options.min_completion_lines:
      yield None, "short_completion", line
    elif (options.max_prompt_chars is not None
          and len(prompt) > options.max_prompt_chars):
      yield None, "prompt_too_long", line
    elif (options.max_completion_chars is not None
          and len(completion) > options.max_completion_chars):
      yield None, "completion_too_long", line
    else:
      yield Record(prompt, completion, None, path, line, "line"), None, line


def _read(path: str) -> tuple[Optional[str], Optional[ast.Module], str]:
  """``(source, tree, "")`` or ``(None, None, reason: detail)``."""
  with open(path, "rb") as f:
    raw = f.read()
  try:
    source = raw.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    return None, None, f"file_not_utf8: {e.reason} at byte {e.start}"
  source = source.replace("\r\n", "\n").replace("\r", "\n")
  try:
    return source, ast.parse(source, path), ""
  except (SyntaxError, ValueError) as e:
    where = f" (line {e.lineno})" if getattr(e, "lineno", None) else ""
    return None, None, f"file_syntax_error: {e.__class__.__name__}{where}"


# -----------------------------------------------------------------------------
# Records and summary.
# -----------------------------------------------------------------------------


def stdlib_function_records(
    split: str = "train", *,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    stdlib_dir: Optional[PathLike] = None,
    max_modules: Optional[int] = None,
    max_examples: Optional[int] = None,
    max_prompt_chars: Optional[int] = None,
    max_completion_chars: Optional[int] = None,
    min_completion_lines: int = 1,
    include_private: bool = False) -> RecordSet:
  """The documented functions of one split's standard library modules.

  See the module's docstring for exactly which functions, how the prompt
  (signature and docstring) and the completion (the body) are cut, and how
  modules are split.

  Args:
    split: ``"train"``, ``"validation"`` or ``"test"``.
    fractions: the fractions of train, validation and test (sum 1), of
      modules (by :func:`stdlib_module_split`), not of examples.
    stdlib_dir: the standard library's directory (default: the running
      interpreter's, ``sysconfig.get_paths()["stdlib"]``).
    max_modules: read only the split's first that many modules (sorted by
      path); None: all.
    max_examples: stop after that many records; None: all.
    max_prompt_chars: skip (``prompt_too_long``) longer prompts; None: no
      limit.
    max_completion_chars: skip (``completion_too_long``) longer
      completions; None: no limit.
    min_completion_lines: skip (``short_completion``) completions with fewer
      non-blank lines.
    include_private: keep ``_private`` functions and methods of ``_Private``
      classes (counted as ``private`` and skipped otherwise).

  Returns:
    A :class:`kdjax.lm.RecordSet`: the records in order; ``skipped``: reason
    (:data:`SKIP_REASONS`) -> count, files and functions together;
    ``first_skipped``: reason -> ``"<file>, line <n>: <reason>"`` of the first;
    ``files``: the files read, skipped ones included.

  Raises:
    ValueError: an unknown split, bad fractions, or a negative bound.
    FileNotFoundError: ``stdlib_dir`` is not a directory.
  """
  _check_split(split)
  fractions = _check_fractions(fractions)
  for name, value in (("max_modules", max_modules),
                      ("max_examples", max_examples),
                      ("max_prompt_chars", max_prompt_chars),
                      ("max_completion_chars", max_completion_chars),
                      ("min_completion_lines", min_completion_lines)):
    if value is not None and value < 0:
      raise ValueError(f"{name}={value}: give a non-negative number.")
  options = _Options(max_prompt_chars, max_completion_chars,
                     min_completion_lines, include_private)
  files = [path for module, path in _module_files(_default_dir(stdlib_dir))
           if stdlib_module_split(module, fractions) == split]
  if max_modules is not None:
    files = files[:max_modules]
  records: list[Record] = []
  skipped: collections.Counter = collections.Counter()
  first: dict[str, str] = {}
  read: list[str] = []

  def skip(reason: str, message: str) -> None:
    skipped[reason] += 1
    first.setdefault(reason, message)

  for path in files:
    if max_examples is not None and len(records) >= max_examples:
      break
    read.append(path)
    source, tree, error = _read(path)
    if tree is None:
      skip(error.split(":")[0], f"{path}: {error}")
      continue
    for record, reason, line in _examples(path, source, tree, options):
      if record is None:
        skip(reason, f"{path}, line {line}: {SKIP_REASONS[reason]}")
        continue
      if max_examples is not None and len(records) >= max_examples:
        break
      records.append(record)
  return RecordSet(tuple(records), dict(skipped), first, tuple(read))


@dataclasses.dataclass(frozen=True)
class StdlibFunctionSummary:
  """The size of each split of :func:`stdlib_function_records`.

  Attributes:
    fractions: the fractions of train, validation and test.
    modules: split -> the number of modules (files) read.
    examples: split -> the number of records.
    skipped: split -> reason -> the number of files or functions skipped.
  """
  fractions: tuple[float, ...]
  modules: Mapping[str, int]
  examples: Mapping[str, int]
  skipped: Mapping[str, Mapping[str, int]]

  def format(self) -> str:
    """One line a split: ``"train: 1234 examples from 567 modules (skipped:
    900 undocumented, ...)"``."""
    out = []
    for split in SPLITS:
      parts = ", ".join(
          f"{n} {reason}" for reason, n in
          sorted(self.skipped[split].items(), key=lambda kv: (-kv[1], kv[0])))
      out.append(f"{split}: {self.examples[split]} examples from "
                 f"{self.modules[split]} modules (skipped: {parts or 'none'})")
    return "\n".join(out)


def stdlib_function_summary(
    *, fractions: Sequence[float] = DEFAULT_FRACTIONS,
    stdlib_dir: Optional[PathLike] = None,
    **options: Any) -> StdlibFunctionSummary:
  """The counts of :func:`stdlib_function_records` for every split, from one
  pass over the modules (each file read once: the splits are disjoint).

  Args:
    fractions: the fractions of train, validation and test (sum 1).
    stdlib_dir: the standard library's directory (default: the running
      interpreter's).
    **options: the other keyword arguments of
      :func:`stdlib_function_records` (``max_modules``, ``max_examples``,
      ``max_prompt_chars``, ...), applied to each split.

  Returns:
    A :class:`StdlibFunctionSummary`.
  """
  fractions = _check_fractions(fractions)
  modules, examples, skipped = {}, {}, {}
  for split in SPLITS:
    records = stdlib_function_records(split, fractions=fractions,
                                      stdlib_dir=stdlib_dir, **options)
    modules[split] = len(records.files)
    examples[split] = len(records)
    skipped[split] = dict(records.skipped)
  return StdlibFunctionSummary(fractions, modules, examples, skipped)
