"""The standard library's documented functions as prompt–completion pairs
(kdjax/lm/_stdlib_functions.py)."""

from __future__ import annotations

import ast

import pytest

from kdjax import lm
from kdjax.lm import _stdlib_functions

ALL_TRAIN = (1.0, 0.0, 0.0)

MOD = '''\
"""A module."""
import functools


def plain(a, b=1) -> int:
    """Add."""
    return a + b


def undocumented(x):
    return x


def _private(x):
    """Private."""
    return x


def stub(x):
    """A stub."""
    raise NotImplementedError("later")


def dots(x):
    """Dots."""
    ...


@functools.lru_cache(maxsize=None)
def decorated(n):
    """Decorated
    over two lines."""
    # a comment before the body
    def helper(m):
        """Nested: no example of its own."""
        return m * 2

    return helper(n)


async def fetch(url):
    """Async."""
    await something(url)
    return url


class Outer:
    """A class."""

    def __init__(self, value):
        """Dunder: kept."""
        self.value = value

    def _hidden(self):
        """Private method."""
        return 1

    class Inner:
        @property
        def method(self):
            """Nested class method."""
            text = """
a string at column 0
"""
            return text


class _Private:
    def public(self):
        """In a private class."""
        return 0


try:
    import missing
except ImportError:
    def fallback():
        """In an except block."""
        return None


def oneline():
    """Same line."""; return 1
'''

INIT = '''\
def init_fn(x):
    """Init."""
    y = x + 1
    return y
'''


def _stdlib(tmp_path):
  """A stdlib-like directory: 2 good modules, 2 bad, and excluded dirs."""
  root = tmp_path / "lib"
  (root / "pkg").mkdir(parents=True)
  (root / "pkg" / "__init__.py").write_text(INIT)
  (root / "pkg" / "mod.py").write_text(MOD)
  (root / "bad_syntax.py").write_text('def f(:\n    """Doc."""\n')
  (root / "latin.py").write_bytes(
      b"# -*- coding: latin-1 -*-\ndef f():\n    '''\xe9'''\n    return 1\n")
  for excluded in ("test", "tests", "pkg/tests", "site-packages",
                   "__pycache__", "lib-dynload", "idlelib/idle_test"):
    (root / excluded).mkdir(parents=True, exist_ok=True)
    (root / excluded / "excluded.py").write_text(INIT)
  (root / "not-a-module.py").write_text(INIT)
  (root / "notes.txt").write_text(INIT)
  return root


def _records(root, **kwargs):
  return lm.stdlib_function_records("train", fractions=ALL_TRAIN,
                                    stdlib_dir=root, **kwargs)


def test_examples_in_order_with_paths_and_lines(tmp_path):
  root = _stdlib(tmp_path)
  got = _records(root)
  mod = str(root / "pkg" / "mod.py")
  init = str(root / "pkg" / "__init__.py")
  assert [(r.path, r.line) for r in got] == [
      (init, 1), (mod, 5), (mod, 30), (mod, 41), (mod, 50), (mod, 60),
      (mod, 77)]
  assert all(r.unit == "line" and r.messages is None and not r.is_chat
             for r in got)
  assert got.files == tuple(str(root / name) for name in (
      "bad_syntax.py", "latin.py", "pkg/__init__.py", "pkg/mod.py"))


def test_exact_prompts_and_completions(tmp_path):
  got = {r.line: r for r in _records(_stdlib(tmp_path))}
  assert got[5].prompt == 'def plain(a, b=1) -> int:\n    """Add."""\n'
  assert got[5].completion == "    return a + b\n"
  # Decorators in the prompt; comments and nested functions in the body.
  assert got[30].prompt == ('@functools.lru_cache(maxsize=None)\n'
                            'def decorated(n):\n'
                            '    """Decorated\n    over two lines."""\n')
  assert got[41].prompt == 'async def fetch(url):\n    """Async."""\n'
  # A method: its class named, its indentation removed.
  assert got[50].prompt == ('# class Outer\ndef __init__(self, value):\n'
                            '    """Dunder: kept."""\n')
  assert got[50].completion == "    self.value = value\n"
  # A nested class's method; a string line indented less is kept as it is.
  assert got[60].prompt == ('# class Outer.Inner\n@property\n'
                            'def method(self):\n'
                            '    """Nested class method."""\n')
  assert got[60].completion == ('    text = """\na string at column 0\n'
                                '"""\n    return text\n')
  assert got[77].prompt == 'def fallback():\n    """In an except block."""\n'
  assert got[77].completion == "    return None\n"


def test_decorated_completion_literally(tmp_path):
  got = {r.line: r for r in _records(_stdlib(tmp_path))}
  assert got[30].completion == (
      '    # a comment before the body\n'
      '    def helper(m):\n'
      '        """Nested: no example of its own."""\n'
      '        return m * 2\n'
      '\n'
      '    return helper(n)\n')


def test_skips_are_counted_by_reason(tmp_path):
  root = _stdlib(tmp_path)
  got = _records(root)
  assert got.skipped == {"file_syntax_error": 1, "file_not_utf8": 1,
                         "undocumented": 1, "private": 3, "stub": 2,
                         "same_line": 1}
  assert got.first_skipped["file_syntax_error"].startswith(
      f"{root / 'bad_syntax.py'}: file_syntax_error: SyntaxError")
  assert got.first_skipped["file_not_utf8"].startswith(
      f"{root / 'latin.py'}: file_not_utf8")
  assert got.first_skipped["stub"] == (
      f"{root / 'pkg' / 'mod.py'}, line 19: stub body")
  assert got.first_skipped["private"] == (
      f"{root / 'pkg' / 'mod.py'}, line 14: private name")
  assert got.num_skipped == 9


def test_include_private(tmp_path):
  got = _records(_stdlib(tmp_path), include_private=True)
  assert [r.line for r in got] == [1, 5, 14, 30, 41, 50, 54, 60, 69, 77]
  assert got[6].prompt.startswith("# class Outer\ndef _hidden(self):")
  assert got[8].prompt.startswith("# class _Private\ndef public(self):")
  assert "private" not in got.skipped


def test_bounds_skip_and_count(tmp_path):
  root = _stdlib(tmp_path)
  got = _records(root, min_completion_lines=2)
  # init_fn, decorated, fetch and Inner.method have 2+ non-blank lines.
  assert [r.line for r in got] == [1, 30, 41, 60]
  assert got.skipped["short_completion"] == 3
  got = _records(root, max_prompt_chars=41)  # plain's prompt is 41 chars
  assert [r.line for r in got] == [1, 5, 41]
  assert got.skipped["prompt_too_long"] == 4
  got = _records(root, max_completion_chars=20)
  assert [r.line for r in got] == [5, 77]
  assert got.skipped["completion_too_long"] == 5
  got = _records(root, max_examples=2)
  assert [r.line for r in got] == [1, 5]
  assert len(got.files) == 4
  got = _records(root, max_examples=1)
  assert len(got) == 1 and len(got.files) == 3  # pkg.mod never read
  got = _records(root, max_modules=2)
  assert len(got) == 0 and got.files == (str(root / "bad_syntax.py"),
                                          str(root / "latin.py"))
  assert _records(root, max_examples=0).records == ()


def test_crlf_and_bom_read_as_lf(tmp_path):
  root = tmp_path / "lib"
  root.mkdir()
  (root / "crlf.py").write_bytes(
      b"\xef\xbb\xbfdef f(x):\r\n    '''Doc.'''\r\n    return x\r\n")
  (got,) = _records(root)
  assert (got.prompt, got.completion) == (
      "def f(x):\n    '''Doc.'''\n", "    return x\n")


def test_deterministic(tmp_path):
  root = _stdlib(tmp_path)
  assert _records(root) == _records(root)


def test_module_split_is_pinned():
  # The split depends on the name and the fractions only (sha256): these are
  # the same on every machine; a change here reshuffles every split.
  assert [lm.stdlib_module_split(name) for name in (
      "json", "asyncio.locks", "_strptime", "m05")] == [
          "train", "test", "validation", "test"]
  assert lm.stdlib_module_split("json.decoder", (0.5, 0.25, 0.25)) == (
      "validation")
  assert lm.stdlib_module_split("json", (0.0, 0.0, 1.0)) == "test"
  assert lm.stdlib_module_split("asyncio.locks", ALL_TRAIN) == "train"


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.8, 0.3, 0.1),
                                       (1.2, -0.1, -0.1)])
def test_bad_fractions_raise(fractions):
  with pytest.raises(ValueError, match="fractions"):
    lm.stdlib_module_split("json", fractions)


def test_bad_arguments_raise(tmp_path):
  root = _stdlib(tmp_path)
  with pytest.raises(ValueError, match="split='eval'"):
    lm.stdlib_function_records("eval", stdlib_dir=root)
  with pytest.raises(ValueError, match="max_examples=-1"):
    _records(root, max_examples=-1)
  with pytest.raises(FileNotFoundError):
    lm.stdlib_function_records(stdlib_dir=tmp_path / "nowhere")


def _many_modules(tmp_path, n=40):
  root = tmp_path / "lib"
  root.mkdir()
  for i in range(n):
    (root / f"m{i:02d}.py").write_text(
        f'def f{i}():\n    """Doc {i}."""\n    return {i}\n')
  return root


def test_splits_partition_the_modules(tmp_path):
  root = _many_modules(tmp_path)
  modules = lm.stdlib_modules(stdlib_dir=root)
  assert set(modules) == set(_stdlib_functions.SPLITS)
  names = [name for split in modules.values() for name in split]
  assert sorted(names) == [f"m{i:02d}" for i in range(40)]
  assert all(modules.values())  # 40 modules: every split has some
  seen = set()
  for split, expected in modules.items():
    got = lm.stdlib_function_records(split, stdlib_dir=root)
    files = {r.path for r in got}
    assert files == {str(root / f"{name}.py") for name in expected}
    assert not files & seen
    seen |= files
    assert all(lm.stdlib_module_split(name) == split for name in expected)
  assert len(seen) == 40


def test_summary_counts_every_split(tmp_path):
  root = _many_modules(tmp_path)
  summary = lm.stdlib_function_summary(stdlib_dir=root)
  modules = lm.stdlib_modules(stdlib_dir=root)
  assert summary.modules == {s: len(m) for s, m in modules.items()}
  assert summary.examples == summary.modules  # one function each
  assert summary.skipped == {s: {} for s in modules}
  assert summary.format().splitlines()[0] == (
      f"train: {summary.examples['train']} examples from "
      f"{summary.modules['train']} modules (skipped: none)")
  summary = lm.stdlib_function_summary(fractions=ALL_TRAIN,
                                       stdlib_dir=_stdlib(tmp_path / "b"))
  assert summary.examples == {"train": 7, "validation": 0, "test": 0}
  assert summary.skipped["train"]["private"] == 3


def test_real_stdlib_examples_are_real_code():
  modules = lm.stdlib_modules()
  total = sum(len(m) for m in modules.values())
  assert total > 300
  for split, fraction in zip(_stdlib_functions.SPLITS,
                             _stdlib_functions.DEFAULT_FRACTIONS):
    assert abs(len(modules[split]) / total - fraction) < 0.06, split
  assert not any(set(name.split(".")) & {"test", "tests", "idle_test"}
                 for m in modules.values() for name in m)
  seen = {}
  for split in _stdlib_functions.SPLITS:
    got = lm.stdlib_function_records(split, max_modules=60)
    assert len(got) > 20, split
    assert not got.skipped.get("file_syntax_error")
    for record in got:
      assert seen.setdefault(record.path, split) == split
      tree = ast.parse(record.prompt + record.completion)
      (node,) = tree.body
      assert isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
      assert ast.get_docstring(node) is not None and len(node.body) > 1
      assert record.completion.strip() and record.completion.endswith("\n")
      assert "site-packages" not in record.path
