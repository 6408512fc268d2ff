"""The user's own model classes: ``arch: "package.module:ClassName"``.

Read while a config is validated (:mod:`kdjax.cli.config.image`) and when the model
is built (:mod:`kdjax.cli.image.models`); Flax is imported on the first call, JAX
not before.
"""

from __future__ import annotations

import importlib
import os
import sys

from kdjax.cli.config.base import ConfigError


def import_arch(arch: str, key: str = "arch") -> tuple[type, str]:
  """``(class, "linen" | "nnx")`` of ``"package.module:ClassName"``.

  The current directory is searched after ``sys.path`` (the ``kdjax``
  console script does not put it there).

  Raises:
    ConfigError: the module does not import, lacks the class, or the class is
      not a Flax linen or NNX module.
  """
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  module_name, _, class_name = arch.partition(":")
  if not module_name or not class_name or ":" in class_name:
    raise ConfigError(f"config key {key!r} must read 'package.module:"
                      f"ClassName', got {arch!r}.")
  if os.getcwd() not in sys.path and "" not in sys.path:
    sys.path.append(os.getcwd())
  try:
    module = importlib.import_module(module_name)
  except ModuleNotFoundError as e:
    if e.name and (module_name == e.name
                   or module_name.startswith(e.name + ".")):
      raise ConfigError(
          f"config key {key!r}: cannot import module {module_name!r} of "
          f"{arch!r} (no module named {e.name!r}); put its directory on "
          "PYTHONPATH or run kdjax from it.") from None
    raise ConfigError(f"config key {key!r}: importing {module_name!r} failed: "
                      f"{e}.") from e
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"config key {key!r}: importing {module_name!r} raised "
                      f"{type(e).__name__}: {e}") from e
  # A class can only derive from nnx.Module once flax.nnx is imported (by the
  # user's module): a linen run never pays for importing it.
  nnx = sys.modules.get("flax.nnx")
  module_types = (nn.Module,) + ((nnx.Module,) if nnx is not None else ())
  cls = module
  for part in class_name.split("."):
    if not hasattr(cls, part):
      names = sorted(n for n, v in vars(module).items()
                     if isinstance(v, type) and issubclass(v, module_types))
      raise ConfigError(
          f"config key {key!r}: module {module_name!r} "
          f"({getattr(module, '__file__', '?')}) has no class {class_name!r}"
          f"; its Flax modules: {', '.join(names) or 'none'}.")
    cls = getattr(cls, part)
  if isinstance(cls, type) and issubclass(cls, nn.Module):
    return cls, "linen"
  if nnx is not None and isinstance(cls, type) and issubclass(cls, nnx.Module):
    return cls, "nnx"
  what = cls.__name__ if isinstance(cls, type) else type(cls).__name__
  raise ConfigError(f"config key {key!r}: {arch!r} is a {what}, not a Flax "
                    "linen or NNX module class.")
