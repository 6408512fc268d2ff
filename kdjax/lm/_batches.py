"""Token windows of texts and the batches of LM training, evaluation and
generation.

Each text is tokenized as ``[BOS] + ids + [EOS]``, the texts are concatenated
and cut into windows of ``seq_len + 1`` ids (stride ``seq_len``); window ``w``
is the example ``(prompt = w[:prompt_len], completion = w[prompt_len:])`` of
:func:`kdjax.lm.make_lm_batch`, so the loss covers the completion tokens
(:func:`token_windows`).

* :class:`LMBatches`: endless training batches, shuffled per epoch from
  ``(seed, epoch)`` and resumable (``get_state``/``set_state``, or
  ``batch_at(step)``); with ``pack=True``, of packed rows
  (:func:`kdjax.lm.pack_examples`, several short examples a row); of
  in-memory lists or of an example source read an example at a time (a
  :class:`kdjax.lm.TokenCache` on disk: ``LMBatches.from_examples``); with
  ``process_count > 1``, each process's rows of the global batches;
* :func:`padded_eval_batches`: the held-out windows in order, in fixed-size
  batches (the last one padded with masked copies);
* :func:`prompt_batch`: prompts in a right-padded generation buffer.
"""

from __future__ import annotations

import collections.abc
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from kdjax.lm._data import make_lm_batch
from kdjax.lm._packing import make_packed_batch
from kdjax.lm._packing import pack_examples
from kdjax.lm._packing import pack_lengths
from kdjax.lm._tokenizer import Tokenizer

Ids = Sequence[int]
# A sized, indexable source whose item i is (prompt_i, completion_i): a
# kdjax.lm.TokenCache, a list of pairs...
ExampleSource = Sequence[tuple[Ids, Ids]]


class BatchSizeError(ValueError):
  """A batch size larger than the number of training sequences."""


def token_windows(texts: Sequence[str], tokenizer: Tokenizer, seq_len: int,
                  prompt_len: int, limit: Optional[int] = None
                  ) -> tuple[list[list[int]], list[list[int]]]:
  """``(prompts, completions)``: the windows of ``seq_len + 1`` ids of the
  concatenated ``[BOS] + text + [EOS]`` streams (stride ``seq_len``).

  A last window shorter than ``seq_len + 1`` ids is dropped.

  Args:
    texts: the texts, in order.
    tokenizer: a :class:`kdjax.lm.Tokenizer` (``encode`` adds no specials).
    seq_len: the model's sequence length ``L``.
    prompt_len: ids per prompt (BOS of the first text included),
      ``1 <= prompt_len < seq_len``.
    limit: the most windows to return (the first ones); None: all.

  Returns:
    Two lists of id lists: prompts of ``prompt_len`` ids and completions of
    ``seq_len + 1 - prompt_len`` ids.

  Raises:
    ValueError: ``prompt_len`` out of range.
  """
  if not 1 <= prompt_len < seq_len:
    raise ValueError(f"prompt_len ({prompt_len}) must be at least 1 and "
                     f"smaller than seq_len ({seq_len}).")
  stream: list[int] = []
  for text in texts:
    stream.append(tokenizer.bos_id)
    stream.extend(tokenizer.encode(text))
    stream.append(tokenizer.eos_id)
  prompts, completions = [], []
  for start in range(0, max(len(stream) - seq_len - 1, -1) + 1, seq_len):
    window = stream[start:start + seq_len + 1]
    if len(window) < seq_len + 1:
      break
    prompts.append(window[:prompt_len])
    completions.append(window[prompt_len:])
    if limit is not None and len(prompts) >= limit:
      break
  return prompts, completions


class LMBatches:
  """Endless shuffled batches of :func:`kdjax.lm.make_lm_batch`, resumable.

  Epoch ``e`` visits the examples in the order
  ``np.random.default_rng([seed, e]).permutation(n)``, ``n // batch_size``
  batches (the remainder is dropped). With ``pack=True`` the "examples" are
  the rows of :func:`kdjax.lm.pack_examples` (computed once, deterministic),
  each batch is :func:`kdjax.lm.make_packed_batch` of ``batch_size`` rows and
  ``n`` is the number of rows; the state is the same. Iterating yields the batches in order;
  ``get_state``/``set_state`` are the iterator's position (save it with a
  checkpoint), and ``batch_at(step)`` is the batch of any step without
  moving it.

  The examples are two in-memory lists, or an example source (``completions
  = None``, or :meth:`from_examples`): a sized, indexable object whose item
  ``i`` is ``(prompt_i, completion_i)``, e.g. a :class:`kdjax.lm.TokenCache`
  (memory-mapped: only the examples of each batch are read; its
  ``prompts``/``completions`` columns are used, and packing reads its
  ``lengths()`` only). The batches of a source equal those of the same
  examples in lists, bit for bit.

  Several processes (``process_count = P``): the global batch of step ``s``
  is the one-process batch of step ``s`` (``batch_size`` examples or rows,
  the same order); process ``p`` gets its rows ``[p * B / P, (p + 1) * B /
  P)`` (``B = batch_size``, divisible by ``P``), so the processes' batches,
  concatenated in process order, are the global batch. Every process keeps
  the same state (the global step).

  Attributes:
    batch_size: examples (packed: rows) per global batch.
    local_batch_size: this process's rows of a batch, ``batch_size /
      process_count`` (the batches it yields).
    process_index, process_count: this process and the processes.
    steps_per_epoch: batches per epoch, ``n // batch_size``.
    packed_rows: with ``pack=True``, the rows (tuples of example indices);
      else None.
  """

  def __init__(self, prompts: Union[Sequence[Ids], ExampleSource],
               completions: Optional[Sequence[Ids]],
               batch_size: int, seq_len: int, pad_id: int, seed: int, *,
               pack: bool = False, process_index: int = 0,
               process_count: int = 1):
    """The batches of the examples ``(prompts[i], completions[i])``.

    Args:
      prompts: the prompts (e.g. of :func:`token_windows`), or, with
        ``completions=None``, an example source (the class docstring).
      completions: their completions, or None.
      batch_size: examples per (global) batch.
      seq_len: the batches' length ``L``.
      pad_id: the padding id.
      seed: the shuffling seed.
      pack: pack the examples into rows (:func:`kdjax.lm.pack_examples`);
        the batches then have ``segment_ids`` and ``positions`` and no
        ``prompt_len`` (not for the objectives that generate: GKD,
        sequence KD).
      process_index: this process, ``0 <= process_index < process_count``.
      process_count: the processes sharing each global batch.

    Raises:
      BatchSizeError: ``batch_size`` exceeds the number of examples (packed:
        of rows).
      ValueError: ``batch_size < 1``, as many prompts as completions not, a
        process index out of range, or ``batch_size`` not divisible by
        ``process_count``.
    """
    lengths = None
    if completions is None:
      source = prompts
      lengths = getattr(source, "lengths", None)
      prompts = getattr(source, "prompts", None)
      completions = getattr(source, "completions", None)
      if prompts is None or completions is None:
        prompts, completions = _Part(source, 0), _Part(source, 1)
    if len(prompts) != len(completions):
      raise ValueError(f"{len(prompts)} prompts but {len(completions)} "
                       "completions.")
    if batch_size < 1:
      raise ValueError(f"batch_size ({batch_size}) must be at least 1.")
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"process_index ({process_index}) must be in [0, "
                       f"process_count) with process_count ({process_count}) "
                       "at least 1.")
    if batch_size % process_count:
      raise ValueError(f"batch_size ({batch_size}) must be divisible by "
                       f"process_count ({process_count}): each process gets "
                       "batch_size / process_count rows.")
    self.packed_rows: Optional[list[tuple[int, ...]]] = None
    n = len(prompts)
    if pack:
      if callable(lengths):
        self.packed_rows = pack_lengths(*lengths(), seq_len)
      else:
        self.packed_rows = pack_examples(prompts, completions, seq_len)
      n = len(self.packed_rows)
    if batch_size > n:
      raise BatchSizeError(
          f"batch_size ({batch_size}) exceeds the {n} training "
          + ("rows (packed)" if pack else "sequences")
          + "; lower it or add text.")
    self._prompts, self._completions = prompts, completions
    self.batch_size, self._seq_len, self._pad = batch_size, seq_len, pad_id
    self.process_index, self.process_count = process_index, process_count
    self.local_batch_size = batch_size // process_count
    self._seed, self._n = seed, n
    self.steps_per_epoch = n // batch_size
    self._epoch, self._index = 0, 0
    self._order: Optional[np.ndarray] = None

  @classmethod
  def from_examples(cls, examples: ExampleSource, batch_size: int,
                    seq_len: int, pad_id: int, seed: int, *,
                    pack: bool = False, process_index: int = 0,
                    process_count: int = 1) -> LMBatches:
    """The batches of an example source (a :class:`kdjax.lm.TokenCache`):
    ``LMBatches(examples, None, ...)``."""
    return cls(examples, None, batch_size, seq_len, pad_id, seed, pack=pack,
               process_index=process_index, process_count=process_count)

  def _local(self, order: np.ndarray, index: int) -> np.ndarray:
    """This process's rows of batch ``index`` of an epoch's ``order``."""
    i = index * self.batch_size + self.process_index * self.local_batch_size
    return order[i:i + self.local_batch_size]

  def _batch(self, rows: np.ndarray) -> dict:
    if self.packed_rows is not None:
      packed = [self.packed_rows[i] for i in rows]
      prompts, completions = self._prompts, self._completions
      if not isinstance(prompts, (list, tuple)):  # read each example once
        needed = sorted({i for row in packed for i in row})
        prompts = {i: self._prompts[i] for i in needed}
        completions = {i: self._completions[i] for i in needed}
      return make_packed_batch(prompts, completions, packed, self._seq_len,
                               pad_id=self._pad)
    return make_lm_batch([self._prompts[i] for i in rows],
                         [self._completions[i] for i in rows], self._seq_len,
                         pad_id=self._pad)

  def _order_of(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self._seed, epoch]).permutation(self._n)

  def __iter__(self) -> LMBatches:
    return self

  def __next__(self) -> dict:
    if self._order is None:
      self._order = self._order_of(self._epoch)
    batch = self._batch(self._local(self._order, self._index))
    self._index += 1
    if self._index == self.steps_per_epoch:
      self._epoch, self._index, self._order = self._epoch + 1, 0, None
    return batch

  def batch_at(self, step: int) -> dict:
    """The batch of step ``step`` (0-based, counted from the first batch of
    epoch 0); the iterator does not move."""
    epoch, index = divmod(step, self.steps_per_epoch)
    return self._batch(self._local(self._order_of(epoch), index))

  def get_state(self) -> dict:
    """The position: ``{"epoch": int, "index": int}`` (JSON-able)."""
    return {"epoch": self._epoch, "index": self._index}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Moves to a position of :meth:`get_state`."""
    self._epoch, self._index = int(state["epoch"]), int(state["index"])
    self._order = None


class _Part(collections.abc.Sequence):
  """The prompts (``part=0``) or completions (``part=1``) of a source of
  ``(prompt, completion)`` pairs."""

  def __init__(self, source: ExampleSource, part: int):
    self._source, self._part = source, part

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, i):  # type: ignore[override]
    return self._source[i][self._part]


def padded_eval_batches(prompts: Sequence[Ids], completions: Sequence[Ids],
                        batch_size: int, seq_len: int, pad_id: int
                        ) -> list[dict]:
  """The examples in order, as batches of one size.

  Args:
    prompts: the held-out prompts (e.g. of :func:`token_windows`).
    completions: their completions.
    batch_size: examples per batch (at most the number of examples).
    seq_len: the batches' length ``L``.
    pad_id: the padding id.

  Returns:
    :func:`kdjax.lm.make_lm_batch` batches of ``min(batch_size, n)``
    examples; the last is padded with copies of its last example whose
    ``loss_mask`` is 0, so a masked mean over all batches counts every
    example once.

  Raises:
    ValueError: no examples, or ``batch_size < 1``.
  """
  n = len(prompts)
  if n == 0 or batch_size < 1:
    raise ValueError(f"padded_eval_batches needs examples and a batch_size "
                     f"of at least 1 (got {n} examples, batch_size "
                     f"{batch_size}).")
  size = min(batch_size, n)
  out = []
  for i in range(0, n, size):
    rows = list(range(i, min(i + size, n)))
    real = len(rows)
    rows += [rows[-1]] * (size - real)
    batch = make_lm_batch([prompts[j] for j in rows],
                          [completions[j] for j in rows], seq_len,
                          pad_id=pad_id)
    batch["loss_mask"][real:] = 0.0
    out.append(batch)
  return out


def prompt_batch(prompt_ids: Sequence[Ids], max_new: int, pad_id: int
                 ) -> tuple[np.ndarray, np.ndarray]:
  """Prompts in a generation buffer (for :func:`kdjax.lm.generate`).

  Args:
    prompt_ids: ``B`` non-empty prompts (BOS included when wanted).
    max_new: the number of tokens to generate.
    pad_id: the padding id.

  Returns:
    ``(tokens, prompt_len)``: int32 ``[B, S]`` with ``S = longest prompt +
    max_new``, each prompt first, then ``pad_id``; int32 ``[B]`` the prompt
    lengths.

  Raises:
    ValueError: no prompts.
  """
  if not prompt_ids:
    raise ValueError("prompt_batch needs at least one prompt.")
  longest = max(len(p) for p in prompt_ids)
  buf = np.full((len(prompt_ids), longest + max_new), pad_id, np.int32)
  for i, p in enumerate(prompt_ids):
    buf[i, :len(p)] = p
  return buf, np.asarray([len(p) for p in prompt_ids], np.int32)
