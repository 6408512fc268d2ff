"""A deterministic, resumable, per-process-sharded input pipeline (grain).

:class:`InputPipeline` turns a random-access source (``len(source)`` and
``source[i] -> {"image": uint8 [H, W(, C)], "label": int}``: a TFDS
``as_data_source()`` split, :class:`ArraySource`, ...) into an iterator of
batches

  ``{"image": float32 [B, H, W, C], "label": int32 [B], "index": int32 [B]}``

with ``image = (pixels / 255 - mean) / std`` and ``index`` the example's
position in ``source`` (a stable dataset index in ``[0, len(source))``, as
contrastive distillation (CRD) needs for its memory bank).

It is built from grain's ``MapDataset`` over example indices (``range ->
shuffle -> batch -> map(read the batch) -> repeat``): epoch ``e`` visits this process's shard in grain's
``index_shuffle`` order seeded by ``(seed', e)`` (``seed'`` is derived from
``seed`` so that nearby seeds give unrelated orders) and is cut into whole
batches per epoch. The order is a pure function of ``(seed, epoch)``, so the
position ``step`` (batches returned so far) is the whole state:
``get_state()`` returns a JSON-serialisable dict and ``set_state`` on a fresh
pipeline over the same data resumes bit-exactly (the dict also records the
options, and ``set_state`` refuses a state from a differently configured
pipeline).

Sharding follows ``tfds.split_for_jax_process`` / grain's
``ShardByJaxProcess``: process ``p`` of ``P`` reads the contiguous slice
:func:`shard_range` ``(n, p, P)``; with ``shard_drop_remainder=True`` (default)
every process gets ``n // P`` examples, so all processes run the same number
of steps.

grain is imported when a pipeline is built, not by ``import kdjax.data``.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import numpy as np

from kdjax.data._idx import DataError
from kdjax.data._idx import load_fashion_mnist_split

# Per-pixel statistics of the Fashion-MNIST training split, pixels in [0, 1].
FASHION_MNIST_MEAN = 0.2860
FASHION_MNIST_STD = 0.3530

_STATE_KEYS = ("step", "seed", "batch_size", "shuffle", "drop_remainder",
               "num_epochs", "process_index", "process_count", "num_examples")


class ArraySource:
  """A random-access source over in-memory arrays (grain/TFDS-style).

  ``source[i] -> {"image": images[i] ([H, W, C]; a channel axis is added to
  [N, H, W] images), "label": int(labels[i])}``.
  """

  def __init__(self, images: Any, labels: Any):
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim == 3:
      images = images[..., None]
    if images.ndim != 4 or labels.ndim != 1:
      raise ValueError(f"ArraySource needs images [N, H, W(, C)] and labels "
                       f"[N], got {images.shape} and {labels.shape}.")
    if images.shape[0] != labels.shape[0]:
      raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} "
                       "labels.")
    self._images = images
    self._labels = labels

  def __len__(self) -> int:
    return self._labels.shape[0]

  def __getitem__(self, index: int) -> dict[str, Any]:
    return {"image": self._images[index], "label": int(self._labels[index])}

  def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
    return [self[i] for i in indices]

  def __repr__(self) -> str:
    return (f"ArraySource(n={len(self)}, image_shape="
            f"{self._images.shape[1:]})")


def fashion_mnist_source(split: str = "train",
                         data_dir: Optional[str] = None) -> ArraySource:
  """Fashion-MNIST ``split`` read from the IDX files into an :class:`ArraySource`.

  The same examples, in the same order, as
  ``kdjax.data.tfds_fashion_mnist.load_source("kdjax_fashion_mnist", split)``,
  without tensorflow-datasets.
  """
  images, labels = load_fashion_mnist_split(split, data_dir)
  return ArraySource(images, labels)


def shard_range(num_examples: int,
                process_index: int,
                process_count: int,
                drop_remainder: bool = True) -> tuple[int, int]:
  """``(start, stop)`` of process ``process_index``'s contiguous shard.

  With ``drop_remainder`` every shard has ``n // P`` examples (the last
  ``n % P`` are unused); otherwise shard ``p`` has ``n // P + (p < n % P)``,
  like ``tfds.even_splits``. Shards are disjoint and, without
  ``drop_remainder``, cover ``[0, n)``.
  """
  if int(process_count) != process_count or process_count < 1:
    raise ValueError(f"process_count must be a positive int, got "
                     f"{process_count}.")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index must lie in [0, {process_count}), got "
                     f"{process_index}.")
  base, rem = divmod(int(num_examples), int(process_count))
  if drop_remainder:
    return process_index * base, (process_index + 1) * base
  start = process_index * base + min(process_index, rem)
  return start, start + base + (1 if process_index < rem else 0)


def _grain_seed(seed: int) -> int:
  # grain shuffles epoch e with seed + e; hashing the user's seed keeps
  # (seed, epoch + 1) and (seed + 1, epoch) from sharing an order.
  return int(np.random.SeedSequence([int(seed), 0x6B646A78]).generate_state(
      1)[0])


class InputPipeline:
  """Shuffled, batched, resumable, per-process batches of a random-access source.

  Args:
    source: ``len(source)`` and ``source[i] -> {image_key: uint8/float
      [H, W(, C)], label_key: int}`` (e.g. ``load_source(...)`` or
      :class:`ArraySource`).
    batch_size: examples per batch on this process.
    seed: non-negative int; the order is a pure function of it.
    shuffle: reshuffle every epoch (else the source order).
    num_epochs: stop after this many epochs (``None``: never).
    drop_remainder: drop each epoch's last incomplete batch (fixed shapes).
    process_index, process_count: this process's shard (default
      ``jax.process_index()`` / ``jax.process_count()``).
    shard_drop_remainder: give every process ``n // P`` examples.
    num_classes: labels must lie in ``[0, num_classes)``.
    mean, std: ``image = (pixels / 255 - mean) / std`` for uint8 pixels
      (float pixels: ``(pixels - mean) / std``); defaults are Fashion-MNIST's.
    image_key, label_key: names of the fields in the source's examples.
    read_threads: grain reader threads (0: read in the calling thread).

  Yields:
    ``{"image": float32 [B, H, W, C], "label": int32 [B], "index": int32 [B]}``.

  Raises:
    kdjax.data.DataError: (when a batch is read) a label is out of range.
  """

  def __init__(self,
               source: Any,
               batch_size: int,
               *,
               seed: int = 0,
               shuffle: bool = True,
               num_epochs: Optional[int] = None,
               drop_remainder: bool = True,
               process_index: Optional[int] = None,
               process_count: Optional[int] = None,
               shard_drop_remainder: bool = True,
               num_classes: int = 10,
               mean: float = FASHION_MNIST_MEAN,
               std: float = FASHION_MNIST_STD,
               image_key: str = "image",
               label_key: str = "label",
               read_threads: int = 0):
    import grain  # pylint: disable=g-import-not-at-top

    if process_index is None or process_count is None:
      import jax  # pylint: disable=g-import-not-at-top
      process_index = (jax.process_index() if process_index is None
                       else process_index)
      process_count = (jax.process_count() if process_count is None
                       else process_count)
    if int(batch_size) != batch_size or batch_size < 1:
      raise ValueError(f"batch_size must be a positive int, got {batch_size}.")
    if int(seed) != seed or seed < 0:
      raise ValueError(f"seed must be a non-negative int, got {seed}.")
    if num_epochs is not None and (int(num_epochs) != num_epochs
                                   or num_epochs < 1):
      raise ValueError(f"num_epochs must be a positive int or None, got "
                       f"{num_epochs}.")
    if not std > 0:
      raise ValueError(f"std must be positive, got {std}.")
    n = len(source)
    if n >= 2**31:
      raise ValueError(f"{n} examples do not fit the int32 'index' field.")
    start, stop = shard_range(n, process_index, process_count,
                              shard_drop_remainder)
    if stop - start == 0:
      raise ValueError(f"process {process_index} of {process_count} gets no "
                       f"examples of the {n} in the source.")
    if drop_remainder and batch_size > stop - start:
      raise ValueError(
          f"batch_size={batch_size} exceeds the {stop - start} examples of "
          f"process {process_index}'s shard with drop_remainder=True: no "
          "batch would ever be produced.")

    self._config = {
        "seed": int(seed), "batch_size": int(batch_size),
        "shuffle": bool(shuffle), "drop_remainder": bool(drop_remainder),
        "num_epochs": None if num_epochs is None else int(num_epochs),
        "process_index": int(process_index),
        "process_count": int(process_count), "num_examples": int(n)}
    self._shard = (start, stop)
    self._num_classes = int(num_classes)
    self._mean = np.float32(mean)
    self._std = np.float32(std)
    self._read_options = grain.ReadOptions(
        num_threads=int(read_threads),
        prefetch_buffer_size=2 * int(read_threads) if read_threads else 1)

    self._source = source
    self._image_key = image_key
    self._label_key = label_key
    # The dataset holds example indices; each batch of indices is read at
    # once (``source.__getitems__`` when there is one: TFDS decodes a list of
    # records ~2.5x faster than one record at a time).
    ds = grain.MapDataset.range(start, stop)
    if shuffle:
      ds = ds.shuffle(seed=_grain_seed(seed))
    ds = ds.batch(int(batch_size), drop_remainder=drop_remainder)
    self._steps_per_epoch = len(ds)
    ds = ds.map(self._read)
    self._dataset = ds.repeat(num_epochs)
    self._step = 0
    self._iterator = None

  # -- batches -----------------------------------------------------------------

  def _read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    indices = np.asarray(indices, np.int64)
    getitems = getattr(self._source, "__getitems__", None)
    if getitems is not None:
      examples = getitems([int(i) for i in indices])
    else:
      examples = [self._source[int(i)] for i in indices]
    try:
      images = [np.asarray(e[self._image_key]) for e in examples]
      labels = np.asarray([e[self._label_key] for e in examples], np.int64)
    except (KeyError, TypeError, IndexError) as e:
      first = examples[0]
      keys = list(first) if isinstance(first, Mapping) else type(first)
      raise KeyError(f"source examples need {self._image_key!r} and "
                     f"{self._label_key!r} fields; example "
                     f"{int(indices[0])} has {keys}.") from e
    image = np.stack(images)
    if image.ndim == 3:
      image = image[..., None]
    bad = (labels < 0) | (labels >= self._num_classes)
    if bad.any():
      k = int(np.argmax(bad))
      raise DataError(
          f"{int(bad.sum())} label(s) outside [0, {self._num_classes}) in a "
          f"batch, e.g. label {int(labels[k])} of example {int(indices[k])}.")
    if image.dtype == np.uint8:
      image = image.astype(np.float32) * np.float32(1.0 / 255.0)
    image = (image.astype(np.float32) - self._mean) / self._std
    return {"image": image.astype(np.float32),
            "label": labels.astype(np.int32),
            "index": indices.astype(np.int32)}

  def __iter__(self) -> "InputPipeline":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._iterator is None:
      if self._step >= len(self._dataset):
        raise StopIteration
      self._iterator = iter(
          self._dataset[self._step:].to_iter_dataset(self._read_options))
    batch = next(self._iterator)
    self._step += 1
    return batch

  def batch_at(self, step: int) -> dict[str, np.ndarray]:
    """The batch the iterator returns at position ``step`` (random access)."""
    if not 0 <= step < len(self._dataset):
      raise IndexError(f"step {step} outside [0, {len(self._dataset)}).")
    return self._dataset[step]

  # -- state -------------------------------------------------------------------

  def get_state(self) -> dict[str, Any]:
    """JSON-serialisable position: ``{"step": batches returned, options...}``."""
    return {"step": self._step, **self._config}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Moves to ``state["step"]``; the next batch is the one the saved
    pipeline would have returned next.

    Raises:
      KeyError: ``state`` lacks a field.
      ValueError: ``state`` comes from a pipeline with other options or data.
    """
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
      raise KeyError(f"pipeline state lacks {missing}; expected the dict of "
                     f"get_state() with keys {list(_STATE_KEYS)}.")
    diff = {k: (state[k], v) for k, v in self._config.items() if state[k] != v}
    if diff:
      raise ValueError(
          "pipeline state was saved by a pipeline with other options or data "
          "(saved, current): " + ", ".join(f"{k}={a!r} vs {b!r}"
                                            for k, (a, b) in diff.items()))
    step = int(state["step"])
    if step < 0:
      raise ValueError(f"pipeline state has a negative step {step}.")
    self._step = step
    self._iterator = None

  # -- sizes -------------------------------------------------------------------

  @property
  def step(self) -> int:
    """Batches returned so far (the resumable position)."""
    return self._step

  @property
  def epoch(self) -> int:
    """Whole epochs done."""
    return self._step // self._steps_per_epoch

  @property
  def steps_per_epoch(self) -> int:
    """Batches per epoch on this process."""
    return self._steps_per_epoch

  @property
  def num_examples(self) -> int:
    """Examples in this process's shard."""
    return self._shard[1] - self._shard[0]

  @property
  def shard(self) -> tuple[int, int]:
    """``(start, stop)`` of this process's slice of the source."""
    return self._shard


__all__ = ["ArraySource", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD",
           "InputPipeline", "fashion_mnist_source", "shard_range"]
