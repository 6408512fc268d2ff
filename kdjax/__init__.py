"""kdjax: knowledge distillation for JAX/Flax.

``from kdjax import losses`` gives the pure loss library alone; ``kdjax.models``
the output type and adapters; ``kdjax.train`` the jitted steps. Heavy optional
dependencies (tensorflow-datasets, grain, matplotlib) are imported only inside
the modules that need them.
"""

from kdjax import losses
from kdjax import methods
from kdjax import models
from kdjax.models import ModelOutput

__version__ = "0.1.0"
