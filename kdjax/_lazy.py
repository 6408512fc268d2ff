"""Lazy attributes of kdjax's packages (PEP 562 module ``__getattr__``).

A package ``__init__`` lists its public names and the module defining each;
:func:`attach` returns the ``__getattr__``, ``__dir__`` and ``__all__`` that
import a module the first time one of its names is read, so ``import kdjax``
(and ``kdjax --help``) imports no JAX, and ``from kdjax.checkpoint import
CheckpointError`` no orbax. Every name stays available as before:
``from kdjax import losses``, ``kdjax.losses.kl_divergence``,
``from kdjax.train import *``. This module imports only the standard library.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys
from typing import Callable, Iterable, Mapping, Optional


def attach(package: str, names: Optional[Mapping[str, Iterable[str]]] = None,
           submodules: Optional[Iterable[str]] = None
           ) -> tuple[Callable, Callable, list]:
  """``(__getattr__, __dir__, __all__)`` for ``package``.

  Args:
    package: the package's ``__name__``.
    names: module (absolute, or relative to ``package`` with a leading dot)
      -> the public names it defines, re-exported by ``package``.
    submodules: sub-modules (or sub-packages) that ``package.<name>`` imports
      on first access (as ``import package.name`` would); default: every
      module and package in the package's directory.

  Returns:
    The module-level ``__getattr__`` and ``__dir__`` of ``package`` and its
    ``__all__`` (the re-exported names, for ``from package import *``).
  """
  origin = {}
  for module, attrs in (names or {}).items():
    module = package + module if module.startswith(".") else module
    for attr in attrs:
      if attr in origin:
        raise ValueError(f"{package}: {attr!r} listed twice")
      origin[attr] = module
  if submodules is None:
    submodules = [m.name for m in
                  pkgutil.iter_modules(sys.modules[package].__path__)]
  submodules = tuple(submodules)
  public = sorted(origin)

  def __getattr__(name: str):  # pylint: disable=invalid-name
    if name in origin:
      value = getattr(importlib.import_module(origin[name]), name)
    elif name in submodules:
      value = importlib.import_module(f"{package}.{name}")
    else:
      raise AttributeError(f"module {package!r} has no attribute {name!r}")
    setattr(sys.modules[package], name, value)  # later reads skip this hook
    return value

  def __dir__():  # pylint: disable=invalid-name
    return sorted(set(vars(sys.modules[package])) | set(origin)
                  | set(submodules))

  return __getattr__, __dir__, public
