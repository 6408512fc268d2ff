"""Helpers shared by the kdjax.data tests: real-data location, IDX writer."""

from __future__ import annotations

import gzip
import os

import numpy as np
import pytest

REAL_DIR = "/usr/share/datasets/fashion-mnist"
HAVE_REAL = os.path.isfile(os.path.join(REAL_DIR, "train-images-idx3-ubyte.gz"))
needs_real = pytest.mark.skipif(
    not HAVE_REAL,
    reason=f"real Fashion-MNIST not installed at {REAL_DIR} (apt-get update && "
           "apt-get install -y dataset-fashion-mnist)")

_STEMS = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def write_idx(path: str, array: np.ndarray) -> None:
  """Writes a uint8 array as an IDX file (gzipped if ``path`` ends in .gz),
  independently of kdjax's reader: magic 0x00 0x00 0x08 ndim, big-endian
  int32 dims, raw bytes."""
  array = np.ascontiguousarray(array, dtype=np.uint8)
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
      int(d).to_bytes(4, "big") for d in array.shape)
  opener = gzip.open if path.endswith(".gz") else open
  with opener(path, "wb") as f:
    f.write(header + array.tobytes())


def write_fashion_dir(directory: str, n_train: int = 8, n_test: int = 4,
                      seed: int = 0, bad_label: int | None = None
                      ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Writes a small synthetic Fashion-MNIST directory; returns its arrays."""
  rng = np.random.default_rng(seed)
  os.makedirs(directory, exist_ok=True)
  out = {}
  for split, n in (("train", n_train), ("test", n_test)):
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, (n,), dtype=np.uint8)
    if bad_label is not None and split == "train":
      labels[n // 2] = bad_label
    write_idx(os.path.join(directory, _STEMS[split][0] + ".gz"), images)
    write_idx(os.path.join(directory, _STEMS[split][1] + ".gz"), labels)
    out[split] = (images, labels.astype(np.int32))
  return out


def read_real_idx(stem: str) -> np.ndarray:
  """Independent reader of a real gzipped IDX file (test reference)."""
  with gzip.open(os.path.join(REAL_DIR, stem + ".gz"), "rb") as f:
    raw = f.read()
  ndim = raw[3]
  shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
  return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)
