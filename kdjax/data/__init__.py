"""kdjax.data: datasets and input pipelines (stands alone: imports no other kdjax module).

tensorflow-datasets and grain are imported only inside the modules that use
them, never by ``import kdjax.data``.
"""

from kdjax.data._idx import DEFAULT_FASHION_MNIST_DIR
from kdjax.data._idx import FASHION_MNIST_CLASSES
from kdjax.data._idx import DataError
from kdjax.data._idx import load_fashion_mnist_split
from kdjax.data._idx import read_idx
from kdjax.data.augment import augment_batch
from kdjax.data.augment import mixup
from kdjax.data.augment import random_crop
from kdjax.data.augment import random_flip
from kdjax.data.pipeline import FASHION_MNIST_MEAN
from kdjax.data.pipeline import FASHION_MNIST_STD
from kdjax.data.pipeline import ArraySource
from kdjax.data.pipeline import InputPipeline
from kdjax.data.pipeline import fashion_mnist_source
from kdjax.data.pipeline import shard_range


def __getattr__(name):
  # The TFDS builder imports tensorflow_datasets: load it only when asked for.
  if name in ("KdjaxFashionMnist", "FashionMnistConfig", "prepare_fashion_mnist",
              "load_source", "BUILDER_NAME"):
    from kdjax.data import tfds_fashion_mnist  # pylint: disable=g-import-not-at-top
    return getattr(tfds_fashion_mnist, name)
  raise AttributeError(f"module 'kdjax.data' has no attribute {name!r}")
