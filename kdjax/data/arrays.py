"""A user's own images and labels from ``.npz`` / ``.npy`` files, and pixel statistics.

:func:`load_arrays` reads one split: images ``[N, H, W]`` (one channel) or
``[N, H, W, C]`` and integer labels ``[N]`` from

* a ``.npz`` holding both (under ``image_key`` / ``label_key``), or
* a ``.npy`` of images (memory-mapped) plus a ``.npy`` (or ``.npz``) of
  labels.

Integer images whose values lie in ``[0, 255]`` are read as ``uint8`` pixels
(the pipeline scales them by ``1 / 255``); float images are used as they are.

:func:`pixel_stats` gives the scalar ``(mean, std)`` of a source's images on
the scale :class:`kdjax.data.InputPipeline` normalises (``uint8 / 255``,
floats unchanged), so ``(image - mean) / std`` has zero mean and unit
variance on that data.

Imports neither tensorflow-datasets nor grain.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import numpy as np

from kdjax.data._idx import DataError

# Examples read by pixel_stats from a source that is not in memory.
STATS_EXAMPLES = 10_000
_CHUNK = 1024


def _open(path: str, what: str):
  if not os.path.exists(path):
    raise FileNotFoundError(f"{what} file {path!r} not found.")
  if not path.endswith((".npz", ".npy")):
    raise DataError(f"{what} file {path!r} must be a .npz or .npy file.")
  try:
    return np.load(path, mmap_mode="r" if path.endswith(".npy") else None,
                   allow_pickle=False)
  except (ValueError, OSError) as e:
    raise DataError(f"cannot read {what} file {path!r}: {e}") from e


def _array(path: str, key: str, what: str, key_name: str) -> np.ndarray:
  """The array of a ``.npy`` file, or the ``key`` array of a ``.npz``."""
  data = _open(path, what)
  if path.endswith(".npy"):
    return data
  with data:
    if key not in data.files:
      raise KeyError(f"{path} holds no array {key!r} (the {key_name}); its "
                     f"arrays: {', '.join(data.files) or 'none'}.")
    return data[key]


def _as_images(images: np.ndarray, path: str) -> np.ndarray:
  if images.ndim not in (3, 4):
    raise DataError(f"images of {path} must be [N, H, W] or [N, H, W, C], "
                    f"got shape {images.shape}.")
  if images.dtype == np.uint8 or np.issubdtype(images.dtype, np.floating):
    return images
  if np.issubdtype(images.dtype, np.integer) or images.dtype == np.bool_:
    if images.size and (images.min() < 0 or images.max() > 255):
      raise DataError(f"integer images of {path} must lie in [0, 255] "
                      f"(got [{images.min()}, {images.max()}]); store floats "
                      "to use another range.")
    return np.asarray(images, np.uint8)
  raise DataError(f"images of {path} have dtype {images.dtype}; use uint8 or "
                  "float.")


def _as_labels(labels: np.ndarray, path: str) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim == 2 and labels.shape[1] == 1:
    labels = labels[:, 0]
  if labels.ndim != 1:
    raise DataError(f"labels of {path} must be class indices [N], got shape "
                    f"{labels.shape}.")
  if np.issubdtype(labels.dtype, np.floating):
    if not np.all(np.equal(np.mod(labels, 1), 0)):
      raise DataError(f"labels of {path} must be integer class indices.")
  elif not np.issubdtype(labels.dtype, np.integer):
    raise DataError(f"labels of {path} have dtype {labels.dtype}; use ints.")
  labels = labels.astype(np.int64)
  if labels.size and labels.min() < 0:
    raise DataError(f"labels of {path} must be >= 0, got {labels.min()}.")
  return labels


def load_arrays(path: str, labels_path: Optional[str] = None, *,
                image_key: str = "image",
                label_key: str = "label") -> tuple[np.ndarray, np.ndarray]:
  """``(images [N, H, W(, C)], labels int64 [N])`` of one split.

  Args:
    path: a ``.npz`` with the images (and the labels unless ``labels_path``),
      or a ``.npy`` of images.
    labels_path: a ``.npy`` of labels, or a ``.npz`` holding ``label_key``
      (needed when ``path`` is a ``.npy``).
    image_key, label_key: the arrays' names in a ``.npz``.

  Raises:
    FileNotFoundError: a file is missing.
    KeyError: a ``.npz`` lacks ``image_key`` / ``label_key`` (lists its
      arrays).
    kdjax.data.DataError: a shape, dtype or count is wrong.
  """
  path = os.fspath(path)
  if labels_path is None and path.endswith(".npy"):
    raise DataError(f"{path} is a .npy of images: give the labels' .npy "
                    "file too.")
  images = _as_images(_array(path, image_key, "images", "image_key"), path)
  lpath = path if labels_path is None else os.fspath(labels_path)
  labels = _as_labels(_array(lpath, label_key, "labels", "label_key"), lpath)
  if images.shape[0] != labels.shape[0]:
    raise DataError(f"{images.shape[0]} images ({path}) but "
                    f"{labels.shape[0]} labels ({lpath}).")
  if images.shape[0] == 0:
    raise DataError(f"{path} holds no examples.")
  return images, labels


def _scaled(images: np.ndarray) -> np.ndarray:
  # The scale InputPipeline normalises: uint8 pixels / 255, others as they are.
  if images.dtype == np.uint8:
    return images.astype(np.float64) / 255.0
  return images.astype(np.float64)


def array_pixel_stats(images: np.ndarray) -> tuple[float, float]:
  """Scalar ``(mean, std)`` over every pixel (and channel) of ``images``."""
  total = total_sq = 0.0
  count = 0
  for start in range(0, images.shape[0], _CHUNK):
    x = _scaled(np.asarray(images[start:start + _CHUNK]))
    total += float(x.sum())
    total_sq += float(np.square(x).sum())
    count += x.size
  return _finish(total, total_sq, count)


def pixel_stats(source: Any, image_key: str = "image",
                max_examples: int = STATS_EXAMPLES) -> tuple[float, float]:
  """Scalar ``(mean, std)`` of a random-access source's images.

  Reads at most ``max_examples`` examples, evenly spaced over the source
  (deterministic), through ``__getitems__`` when the source has it.
  """
  n = len(source)
  if n == 0:
    raise DataError("cannot compute pixel statistics of an empty source.")
  index = np.unique(np.linspace(0, n - 1, min(n, max_examples)).astype(int))
  total = total_sq = 0.0
  count = 0
  for start in range(0, len(index), 256):
    rows = [int(i) for i in index[start:start + 256]]
    examples = _read(source, rows)
    x = _scaled(np.stack([np.asarray(e[image_key]) for e in examples]))
    total += float(x.sum())
    total_sq += float(np.square(x).sum())
    count += x.size
  return _finish(total, total_sq, count)


def _read(source: Any, rows: Sequence[int]) -> list:
  getitems = getattr(source, "__getitems__", None)
  return getitems(rows) if getitems is not None else [source[i] for i in rows]


def _finish(total: float, total_sq: float, count: int) -> tuple[float, float]:
  mean = total / count
  std = max(total_sq / count - mean * mean, 0.0) ** 0.5
  if not std > 1e-12:
    raise DataError("the training images are constant (std 0): give "
                    "data.mean and data.std.")
  # Six significant digits: stable in YAML and in dataset fingerprints.
  return float(f"{mean:.6g}"), float(f"{std:.6g}")


__all__ = ["STATS_EXAMPLES", "array_pixel_stats", "load_arrays",
           "pixel_stats"]
