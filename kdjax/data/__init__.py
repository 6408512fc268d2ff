"""kdjax.data: datasets and input pipelines (stands alone: imports no other kdjax module).

tensorflow-datasets and grain are imported only inside the modules that use
them, never by ``import kdjax.data``.
"""

from kdjax.data._idx import DEFAULT_FASHION_MNIST_DIR
from kdjax.data._idx import FASHION_MNIST_CLASSES
from kdjax.data._idx import DataError
from kdjax.data._idx import load_fashion_mnist_split
from kdjax.data._idx import read_idx
