"""kdjax: knowledge distillation for JAX/Flax.

``from kdjax import losses`` gives the pure loss library alone; ``kdjax.models``
the output type and adapters; ``kdjax.train`` the jitted steps. Sub-packages
are imported on first access (``kdjax.losses``, ``from kdjax import train``):
``import kdjax`` itself imports no JAX, and heavy optional dependencies
(tensorflow-datasets, grain, matplotlib, orbax) are imported only inside the
modules that need them.
"""

from typing import TYPE_CHECKING

from kdjax import _lazy
from kdjax import _xla_flags

# Keeps XLA:CPU's reductions off YNNPACK, whose threaded reductions race in
# jaxlib 0.10 (see kdjax/_xla_flags.py); before JAX creates its CPU backend.
_xla_flags.apply()

__version__ = "0.1.0"

# kdjax.<submodule> (losses, models, train, ...) imports it on first access.
__getattr__, __dir__, _ = _lazy.attach(__name__, {".models": ("ModelOutput",)})
# ``from kdjax import *`` binds what it bound when these were eager imports.
__all__ = ["ModelOutput", "losses", "methods", "models"]

if TYPE_CHECKING:  # the names above, for type checkers and IDEs
  from kdjax import losses
  from kdjax import methods
  from kdjax import models
  from kdjax.models import ModelOutput
