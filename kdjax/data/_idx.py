"""Reading the IDX files of (Fashion-)MNIST with NumPy alone.

Debian's ``dataset-fashion-mnist`` package installs the real Fashion-MNIST
(Xiao, Rasul & Vollgraf 2017) as gzipped IDX files under
``/usr/share/datasets/fashion-mnist``. This module reads them with no other
dependency; :mod:`kdjax.data.tfds_fashion_mnist` wraps the same reader in a
tensorflow-datasets builder.
"""

from __future__ import annotations

import gzip
import os
from typing import Optional

import numpy as np

DEFAULT_FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_DIR_ENV = "KDJAX_FASHION_MNIST_DIR"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_INSTALL_HINT = ("install the real Fashion-MNIST with `apt-get update && "
                 "apt-get install -y dataset-fashion-mnist` (as root), or set "
                 f"{FASHION_MNIST_DIR_ENV} / pass data_dir= to a directory holding "
                 "the IDX files")
# IDX type codes (LeCun's format): 0x08 = unsigned byte.
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4",
               0x0D: ">f4", 0x0E: ">f8"}


class DataError(ValueError):
  """A dataset file is missing, corrupt, or holds invalid values."""
  # A ``kdjax`` command that stops on this error exits with status 1 (a
  # failure, not a usage error), even before its first step.
  exit_code: int = 1


def read_idx(path: str) -> np.ndarray:
  """Reads one IDX file (optionally gzipped) into a NumPy array.

  Raises:
    DataError: the header is malformed or the payload is truncated.
  """
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:
    raise DataError(f"cannot read IDX file {path}: {e}") from e
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
    raise DataError(f"{path} is not an IDX file (bad magic number).")
  dtype_code, ndim = raw[2], raw[3]
  if dtype_code not in _IDX_DTYPES or ndim == 0:
    raise DataError(f"{path}: unsupported IDX type 0x{dtype_code:02x} or rank "
                    f"{ndim}.")
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise DataError(f"{path}: truncated IDX header.")
  shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big")
                for i in range(ndim))
  dtype = np.dtype(_IDX_DTYPES[dtype_code])
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(raw) - header != expected:
    raise DataError(
        f"{path}: IDX payload has {len(raw) - header} bytes but its header "
        f"declares shape {shape} ({expected} bytes): the file is truncated or "
        "corrupt.")
  return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(
      dtype.newbyteorder("="))


def resolve_fashion_mnist_dir(data_dir: Optional[str] = None) -> str:
  data_dir = (data_dir or os.environ.get(FASHION_MNIST_DIR_ENV)
              or DEFAULT_FASHION_MNIST_DIR)
  if not os.path.isdir(data_dir):
    raise FileNotFoundError(
        f"Fashion-MNIST directory {data_dir} does not exist: {_INSTALL_HINT}.")
  return data_dir


def _find(data_dir: str, stem: str) -> str:
  for name in (stem + ".gz", stem):
    path = os.path.join(data_dir, name)
    if os.path.exists(path):
      return path
  raise FileNotFoundError(
      f"{stem}(.gz) not found in {data_dir}: {_INSTALL_HINT}.")


def load_fashion_mnist_split(split: str,
                             data_dir: Optional[str] = None,
                             num_classes: int = 10) -> tuple[np.ndarray, np.ndarray]:
  """Returns ``(images uint8 [N, 28, 28], labels int32 [N])`` of ``split``.

  Args:
    split: ``"train"`` (60,000 examples) or ``"test"`` (10,000).
    data_dir: directory of the IDX files (default: ``$KDJAX_FASHION_MNIST_DIR``
      or ``/usr/share/datasets/fashion-mnist``).
    num_classes: labels must lie in ``[0, num_classes)``.

  Raises:
    FileNotFoundError: the directory or a file is missing (says how to install).
    DataError: a file is corrupt, images and labels disagree in count, or a
      label is outside the class range.
  """
  if split not in _FILES:
    raise ValueError(f"split must be one of {sorted(_FILES)}, got {split!r}.")
  data_dir = resolve_fashion_mnist_dir(data_dir)
  image_stem, label_stem = _FILES[split]
  images = read_idx(_find(data_dir, image_stem))
  labels = read_idx(_find(data_dir, label_stem)).astype(np.int32)
  if images.ndim != 3 or labels.ndim != 1:
    raise DataError(f"{split}: expected images [N, H, W] and labels [N], got "
                    f"{images.shape} and {labels.shape}.")
  if images.shape[0] != labels.shape[0]:
    raise DataError(f"{split}: {images.shape[0]} images but {labels.shape[0]} "
                    "labels.")
  bad = (labels < 0) | (labels >= num_classes)
  if bad.any():
    first = int(np.argmax(bad))
    raise DataError(
        f"{split}: {int(bad.sum())} label(s) outside [0, {num_classes}), e.g. "
        f"label {labels[first]} at index {first}.")
  return images, labels
