"""kdjax.data: datasets and input pipelines (stands alone: imports no other kdjax module).

Names are imported on first access (:mod:`kdjax._lazy`): ``import
kdjax.data`` imports no JAX, and tensorflow-datasets and grain are imported
only inside the modules that use them.
"""

from typing import TYPE_CHECKING

from kdjax import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, {
    "._idx": ("DEFAULT_FASHION_MNIST_DIR", "FASHION_MNIST_CLASSES",
        "DataError", "load_fashion_mnist_split", "read_idx"),
    ".augment": ("augment_batch", "mixup", "random_crop", "random_flip"),
    ".pipeline": ("FASHION_MNIST_MEAN", "FASHION_MNIST_STD", "ArraySource",
        "InputPipeline", "fashion_mnist_source", "shard_range"),
    # The TFDS builder imports tensorflow_datasets: loaded only when asked for
    # (and left out of ``from kdjax.data import *``).
    ".tfds_fashion_mnist": ("KdjaxFashionMnist", "FashionMnistConfig",
        "prepare_fashion_mnist", "load_source", "BUILDER_NAME"),
})
__all__ = [n for n in __all__ if n not in (
    "KdjaxFashionMnist", "FashionMnistConfig", "prepare_fashion_mnist",
    "load_source", "BUILDER_NAME")]

if TYPE_CHECKING:  # the lazy names above, for type checkers and IDEs
  from kdjax.data._idx import (
      DEFAULT_FASHION_MNIST_DIR, FASHION_MNIST_CLASSES, DataError,
      load_fashion_mnist_split, read_idx)
  from kdjax.data.augment import augment_batch, mixup, random_crop, random_flip
  from kdjax.data.pipeline import (
      FASHION_MNIST_MEAN, FASHION_MNIST_STD, ArraySource, InputPipeline,
      fashion_mnist_source, shard_range)
  from kdjax.data.tfds_fashion_mnist import (
      KdjaxFashionMnist, FashionMnistConfig, prepare_fashion_mnist, load_source,
      BUILDER_NAME)
