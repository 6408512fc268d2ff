"""The public API: the lazy names of each package, as type checkers see them.

Each package ``__init__`` lists its public names in a ``kdjax._lazy.attach``
map (imported on first access) and imports the same names in an
``if TYPE_CHECKING:`` block, so that a type checker or an IDE resolves
``kdjax.losses.kl_divergence``. These tests read each ``__init__`` (ast) and
check that the two lists agree, that every lazy name resolves, and that the
public functions are fully annotated (every parameter and the return).
"""

import ast
import importlib
import inspect
import os
import types
import typing

import pytest

import kdjax

_ROOT = os.path.dirname(kdjax.__file__)
PACKAGES = sorted(
    f"kdjax.{name}" for name in os.listdir(_ROOT)
    if os.path.exists(os.path.join(_ROOT, name, "__init__.py")))
# A package's names that need an optional dependency to resolve.
OPTIONAL = {"kdjax.data": ("tensorflow_datasets",),
            "kdjax.lm": ("tunix", "safetensors", "tokenizers")}


def _init_tree(package: str) -> ast.Module:
  path = os.path.join(_ROOT, *package.split(".")[1:], "__init__.py")
  with open(path, encoding="utf-8") as f:
    return ast.parse(f.read(), path)


def _lazy_map(package: str) -> dict:
  """``{(module, name)}`` pairs of the package's ``_lazy.attach`` map."""
  for node in ast.walk(_init_tree(package)):
    if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
        and node.func.attr == "attach" and len(node.args) > 1):
      names = ast.literal_eval(node.args[1])
      return {(package + m if m.startswith(".") else m, n)
              for m, attrs in names.items() for n in attrs}
  return {}


def _type_checking_imports(package: str) -> set:
  """``{(module, name)}`` imported under the ``if TYPE_CHECKING:`` block."""
  found = set()
  for node in _init_tree(package).body:
    if (isinstance(node, ast.If) and isinstance(node.test, ast.Name)
        and node.test.id == "TYPE_CHECKING"):
      for imp in node.body:
        assert isinstance(imp, ast.ImportFrom), ast.dump(imp)
        for alias in imp.names:
          found.add((imp.module, alias.asname or alias.name))
  return found


LAZY_PACKAGES = [p for p in PACKAGES if _lazy_map(p)]

# Modules left out of the annotation check while they are rewritten (a module
# listed here must still lack annotations: see the test below). None now.
PENDING = ()


def test_every_package_with_names_is_checked():
  # cli is the command line, with no lazy names of its own.
  assert set(PACKAGES) - set(LAZY_PACKAGES) == {"kdjax.cli"}


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_type_checking_block_imports_exactly_the_lazy_names(package):
  lazy, declared = _lazy_map(package), _type_checking_imports(package)
  assert not lazy - declared, f"missing under TYPE_CHECKING: {lazy - declared}"
  assert not declared - lazy, f"not in the lazy map: {declared - lazy}"


def test_top_level_declares_its_names():
  declared = {name for _, name in _type_checking_imports("kdjax")}
  assert declared == set(kdjax.__all__)


def _public_values(package: str):
  module = importlib.import_module(package)
  for _, name in sorted(_lazy_map(package), key=lambda p: p[1]):
    try:
      value = getattr(module, name)
    except ImportError as e:
      if getattr(e, "name", None) in OPTIONAL.get(package, ()):
        continue  # an optional dependency is missing: nothing to check
      raise
    yield name, value


@pytest.mark.parametrize("package", LAZY_PACKAGES)
def test_every_lazy_name_resolves(package):
  module = importlib.import_module(package)
  for name, value in _public_values(package):
    assert value is getattr(module, name)
  assert set(module.__all__) <= {n for _, n in _lazy_map(package)}


def _unannotated(fn) -> list:
  """The parameters (and ``return``) of ``fn`` without an annotation, or the
  error that evaluating its annotations raises (a name not imported)."""
  signature = inspect.signature(fn)
  missing = [p.name for p in signature.parameters.values()
             if p.annotation is inspect.Parameter.empty]
  if signature.return_annotation is inspect.Signature.empty:
    missing.append("return")
  try:
    typing.get_type_hints(fn, localns=_type_checking_names(fn.__module__))
  except Exception as e:  # pylint: disable=broad-except
    missing.append(f"{type(e).__name__}: {e}")
  return missing


def _type_checking_names(module_name: str) -> dict:
  """The names a module imports under ``if TYPE_CHECKING:`` (for its
  annotations), imported here."""
  tree = ast.parse(inspect.getsource(importlib.import_module(module_name)))
  names = {}
  for node in tree.body:
    if (isinstance(node, ast.If) and isinstance(node.test, ast.Name)
        and node.test.id == "TYPE_CHECKING"):
      code = compile(ast.Module(body=node.body, type_ignores=[]),
                     module_name, "exec")
      exec(code, names)  # pylint: disable=exec-used
  return names


def _public_functions(package: str):
  """``(name, function, pending)`` of the package's public functions."""
  if package in LAZY_PACKAGES:
    values = _public_values(package)
  else:  # a module: the functions it defines and does not mark private
    module = importlib.import_module(package)
    values = ((n, v) for n, v in vars(module).items()
              if not n.startswith("_")
              and getattr(v, "__module__", None) == package)
  for name, value in values:
    if isinstance(value, types.FunctionType):
      path = os.path.relpath(inspect.getfile(inspect.unwrap(value)), _ROOT)
      yield name, value, path.replace(os.sep, "/") in PENDING


@pytest.mark.parametrize("package", LAZY_PACKAGES + ["kdjax.methods"])
def test_public_functions_are_fully_annotated(package):
  offenders = {}
  for name, fn, pending in _public_functions(package):
    missing = _unannotated(fn)
    if missing and not pending:
      offenders[name] = missing
  assert not offenders, (
      f"public functions of {package} lacking annotations "
      f"(name: parameters): {offenders}")


def test_pending_modules_still_lack_annotations():
  annotated = {}
  for package in LAZY_PACKAGES:
    for _, fn, pending in _public_functions(package):
      if pending:
        path = os.path.relpath(inspect.getfile(inspect.unwrap(fn)), _ROOT)
        annotated.setdefault(path.replace(os.sep, "/"), []).append(
            not _unannotated(fn))
  done = sorted(path for path, ok in annotated.items() if all(ok))
  assert not done, f"annotated now: remove {done} from PENDING"
