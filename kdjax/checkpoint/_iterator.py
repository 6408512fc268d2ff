"""Resumable data iterators: a two-method protocol and a NumPy array batcher.

A run resumes exactly only if the data resumes exactly: the checkpoint stores
the iterator's position next to the train state. Any iterator with
``get_state() -> dict`` and ``set_state(dict)`` qualifies (grain's dataset
iterators do); :class:`ArrayBatchIterator` is a small deterministic one over
in-memory arrays.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class ResumableIterator(Protocol):
  """An iterator whose position can be saved and restored.

  ``get_state()`` returns a JSON-serialisable dict (or bytes) describing the
  position *after* the last element returned; ``set_state(state)`` moves a
  freshly built iterator (same data, same options) to that position, so that
  its next element is the one the saved iterator would have returned next.
  """

  def get_state(self) -> dict:
    ...

  def set_state(self, state: dict) -> None:
    ...


class ArrayBatchIterator:
  """Deterministic, resumable batches over a dict of same-length NumPy arrays.

  Epoch ``e`` visits the examples in the order
  ``np.random.default_rng([seed, e]).permutation(n)`` (``arange(n)`` when
  ``shuffle=False``), ``batch_size`` at a time. The position is
  ``(epoch, index)``: the number of whole epochs done and the number of
  examples of the current epoch already returned; it is all the state there
  is, so ``get_state``/``set_state`` resume bit-exactly.

  With ``drop_remainder=True`` the last ``n % batch_size`` examples of each
  (shuffled) epoch are skipped, so every batch has ``batch_size`` rows (no
  recompilation); otherwise the last batch of an epoch is smaller.

  Args:
    arrays: ``{name: array [n, ...]}``, e.g. ``{"image": x, "label": y}``.
    batch_size: rows per batch.
    seed: non-negative int seeding the per-epoch permutations.
    shuffle: permute each epoch (else the stored order).
    drop_remainder: skip the incomplete last batch of each epoch.
    num_epochs: stop after this many epochs (``None``: never stop).

  Yields:
    ``{name: array [batch_size, ...]}`` (NumPy; copies, safe to donate).
  """

  def __init__(self,
               arrays: Mapping[str, Any],
               batch_size: int,
               seed: int = 0,
               shuffle: bool = True,
               drop_remainder: bool = True,
               *,
               num_epochs: Optional[int] = None):
    if not isinstance(arrays, Mapping) or not arrays:
      raise ValueError("ArrayBatchIterator needs a non-empty dict of arrays, "
                       f"got {type(arrays).__name__}.")
    self._arrays = {k: np.asarray(v) for k, v in arrays.items()}
    lengths = {k: (v.shape[0] if v.ndim else None)
               for k, v in self._arrays.items()}
    if any(n is None for n in lengths.values()) or len(set(lengths.values())) != 1:
      raise ValueError("all arrays must have the same leading (example) "
                       f"dimension; got lengths {lengths}.")
    self._n = next(iter(lengths.values()))
    if self._n == 0:
      raise ValueError("ArrayBatchIterator got arrays with 0 examples.")
    if int(batch_size) != batch_size or batch_size < 1:
      raise ValueError(f"batch_size must be a positive int, got {batch_size}.")
    if drop_remainder and batch_size > self._n:
      raise ValueError(
          f"batch_size={batch_size} exceeds the {self._n} examples and "
          "drop_remainder=True: no batch would ever be produced.")
    if int(seed) != seed or seed < 0:
      raise ValueError(f"seed must be a non-negative int, got {seed}.")
    if num_epochs is not None and num_epochs < 0:
      raise ValueError(f"num_epochs must be >= 0 or None, got {num_epochs}.")
    self._batch_size = int(batch_size)
    self._seed = int(seed)
    self._shuffle = bool(shuffle)
    self._drop_remainder = bool(drop_remainder)
    self._num_epochs = num_epochs
    self._epoch = 0
    self._index = 0
    self._order_cache: tuple[int, np.ndarray] = (-1, np.empty(0, np.int64))

  @property
  def num_examples(self) -> int:
    return self._n

  @property
  def steps_per_epoch(self) -> int:
    """Batches per epoch."""
    if self._drop_remainder:
      return self._n // self._batch_size
    return -(-self._n // self._batch_size)

  def epoch_order(self, epoch: int) -> np.ndarray:
    """The example order of ``epoch`` (``[n]`` int64)."""
    if self._order_cache[0] != epoch:
      if self._shuffle:
        order = np.random.default_rng([self._seed, epoch]).permutation(self._n)
      else:
        order = np.arange(self._n)
      self._order_cache = (epoch, order)
    return self._order_cache[1]

  def __iter__(self) -> "ArrayBatchIterator":
    return self

  def __next__(self) -> dict:
    remaining = self._n - self._index
    if remaining == 0 or (self._drop_remainder and remaining < self._batch_size):
      self._epoch += 1
      self._index = 0
    if self._num_epochs is not None and self._epoch >= self._num_epochs:
      raise StopIteration
    size = min(self._batch_size, self._n - self._index)
    idx = self.epoch_order(self._epoch)[self._index:self._index + size]
    self._index += size
    return {k: v[idx] for k, v in self._arrays.items()}

  def get_state(self) -> dict:
    """The position ``(epoch, index)`` plus the options it is only valid for."""
    return {"epoch": self._epoch, "index": self._index, "seed": self._seed,
            "batch_size": self._batch_size, "num_examples": self._n,
            "shuffle": self._shuffle, "drop_remainder": self._drop_remainder}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Moves to a saved position; refuses one saved under other options.

    Raises:
      KeyError: ``state`` lacks ``epoch`` or ``index``.
      ValueError: the saved seed, batch size, example count, shuffle or
        drop_remainder differ from this iterator's (resuming would silently
        feed other batches), or the position is out of range.
    """
    missing = [k for k in ("epoch", "index") if k not in state]
    if missing:
      raise KeyError(f"iterator state lacks {missing}; got keys {sorted(state)}.")
    mine = self.get_state()
    differing = {k: (state[k], mine[k]) for k in
                 ("seed", "batch_size", "num_examples", "shuffle",
                  "drop_remainder") if k in state and state[k] != mine[k]}
    if differing:
      raise ValueError(
          "cannot resume this ArrayBatchIterator from a state saved with "
          "other options (saved, current): "
          + ", ".join(f"{k}={v[0]!r} vs {v[1]!r}" for k, v in differing.items())
          + ".")
    epoch, index = int(state["epoch"]), int(state["index"])
    if epoch < 0 or not 0 <= index <= self._n:
      raise ValueError(f"iterator position out of range: epoch={epoch}, "
                       f"index={index} (num_examples={self._n}).")
    self._epoch, self._index = epoch, index
