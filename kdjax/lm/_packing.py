"""Packing short (prompt, completion) examples into long rows.

:func:`kdjax.lm.make_lm_batch` holds one example a row, right-padded: short
examples waste most of each row. Packing puts several examples in one row of
``L`` tokens, each in its own *segment*, and the models attend within a
segment only.

An example is the id sequence ``s = prompt + completion`` truncated to
``L + 1`` ids (as :func:`kdjax.lm.make_lm_batch` truncates it); it occupies
``n = len(s) - 1`` slots of a row, its inputs ``s[:-1]`` with targets
``s[1:]``. Packed batch layout (every key ``[B, L]``), for the example in
segment ``k`` of row ``b`` starting at slot ``o``::

  tokens[b, o + t]      = s[t]        t = 0 .. n - 1
  targets[b, o + t]     = s[t + 1]    (its own next token, never the next
                                       segment's first one)
  loss_mask[b, o + t]   = 1.0  iff  len(prompt) <= t + 1
  segment_ids[b, o + t] = k           (1, 2, 3 ... in the row; 0 = padding)
  positions[b, o + t]   = t           (restarting at 0 in each segment)

with PAD tokens and targets, ``loss_mask = 0``, ``segment_ids = 0`` and
``positions = 0`` after the last segment. An example's loss tokens are
exactly those :func:`kdjax.lm.make_lm_batch` gives it, so a masked-mean loss
over a packed batch is the token-weighted mean over its examples; a model
that attends within segments (:func:`packed_attention_mask`) gives each
example the logits it has alone, unpacked (``kdjax.lm.DecoderLM`` and the
Tunix families of ``kdjax.lm.make_tunix_lm_apply`` read ``segment_ids`` and
``positions`` from the batch).

Packed batches have no ``prompt_len``: the rows have no single prompt. The
objectives that generate from the prompts (``gkd``, ``seq_kd``:
``kdjax.lm.make_gkd_train_step``, ``make_sequence_kd_step``) need unpacked
batches and refuse packed ones (:func:`check_unpacked`).

Packing algorithm: first-fit decreasing (Johnson 1973: at most ``11/9 OPT +
6/9`` rows): the examples by decreasing length (ties: by index), each into
the first row, in the order rows were opened, with room for it (a segment
tree of the rows' free slots, ``O(n log n)``); then each row lists its
examples by increasing index. Deterministic: the rows depend on the lengths
and their order only.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np

SEGMENT_IDS_KEY = "segment_ids"
POSITIONS_KEY = "positions"

Ids = Sequence[int]


def _slots(prompt: Ids, completion: Ids, seq_len: int, i: int) -> int:
  if len(prompt) < 1:
    raise ValueError(f"prompt {i} is empty; it needs at least BOS.")
  if len(prompt) > seq_len:
    raise ValueError(f"prompt {i} has {len(prompt)} ids, more than seq_len="
                     f"{seq_len}: no completion token would fit.")
  return min(len(prompt) + len(completion), seq_len + 1) - 1


def pack_examples(prompts: Sequence[Ids], completions: Sequence[Ids],
                  seq_len: int) -> list[tuple[int, ...]]:
  """The rows of a packing: which examples share each row of ``seq_len`` slots.

  First-fit decreasing (module docstring). Example ``i`` takes
  ``min(len(prompts[i]) + len(completions[i]), seq_len + 1) - 1`` slots
  (longer examples are truncated as :func:`kdjax.lm.make_lm_batch` truncates
  them); an example of one id (a prompt with an empty completion: nothing to
  predict) takes none and is left out of every row.

  Args:
    prompts: ``n`` id lists (BOS included when wanted); each non-empty and at
      most ``seq_len`` ids.
    completions: ``n`` id lists (EOS included when wanted).
    seq_len: ``L``, the slots of a row.

  Returns:
    The rows, each a tuple of example indices in increasing order; rows in
    the order first-fit decreasing opened them. Deterministic.

  Raises:
    ValueError: as many prompts as completions not, ``seq_len < 1``, an
      empty prompt or one longer than ``seq_len``.
  """
  if len(prompts) != len(completions):
    raise ValueError(f"{len(prompts)} prompts but {len(completions)} "
                     "completions.")
  if seq_len < 1:
    raise ValueError(f"seq_len must be at least 1, got {seq_len}.")
  sizes = np.asarray([_slots(p, c, seq_len, i) for i, (p, c)
                      in enumerate(zip(prompts, completions))], np.int64)
  return _first_fit_decreasing(sizes, seq_len)


def pack_lengths(prompt_lens: Union[Sequence[int], np.ndarray],
                 completion_lens: Union[Sequence[int], np.ndarray],
                 seq_len: int) -> list[tuple[int, ...]]:
  """:func:`pack_examples` from the examples' lengths alone.

  The rows depend on the lengths only, so an example source that knows its
  lengths without reading its tokens (:meth:`kdjax.lm.TokenCache.lengths`)
  is packed without reading them: ``pack_lengths([len(p) for p in
  prompts], [len(c) for c in completions], L) == pack_examples(prompts,
  completions, L)``, errors included.

  Args:
    prompt_lens: ``n`` prompt lengths, each in ``[1, seq_len]``.
    completion_lens: ``n`` completion lengths (``>= 0``).
    seq_len: ``L``, the slots of a row.

  Returns:
    The rows of :func:`pack_examples`.

  Raises:
    ValueError: as for :func:`pack_examples`, or a negative completion
      length.
  """
  p = np.asarray(prompt_lens, np.int64).reshape(-1)
  c = np.asarray(completion_lens, np.int64).reshape(-1)
  if p.shape != c.shape:
    raise ValueError(f"{p.size} prompts but {c.size} completions.")
  if seq_len < 1:
    raise ValueError(f"seq_len must be at least 1, got {seq_len}.")
  bad = np.flatnonzero((p < 1) | (p > seq_len) | (c < 0))
  if bad.size:
    i = int(bad[0])
    _slots(range(p[i]), (), seq_len, i)  # a bad prompt: _slots' own error
    raise ValueError(f"completion {i} has a negative length ({c[i]}).")
  return _first_fit_decreasing(np.minimum(p + c, seq_len + 1) - 1, seq_len)


def _first_fit_decreasing(sizes: np.ndarray, seq_len: int
                          ) -> list[tuple[int, ...]]:
  """The rows of first-fit decreasing of examples of ``sizes`` slots."""
  order = [int(i) for i in np.argsort(-sizes, kind="stable") if sizes[i] > 0]
  if not order:
    return []
  # A max segment tree over the free slots of at most len(order) rows.
  cap = 1
  while cap < len(order):
    cap *= 2
  tree = np.full(2 * cap, seq_len, np.int64)
  rows: list[list[int]] = []
  for i in order:
    need = int(sizes[i])
    node = 1
    while node < cap:  # descend to the leftmost row with room
      node = 2 * node if tree[2 * node] >= need else 2 * node + 1
    row = node - cap
    if row == len(rows):
      rows.append([])
    rows[row].append(i)
    tree[node] -= need
    node //= 2
    while node:
      tree[node] = max(tree[2 * node], tree[2 * node + 1])
      node //= 2
  return [tuple(sorted(r)) for r in rows]


def make_packed_batch(prompts: Sequence[Ids], completions: Sequence[Ids],
                      rows: Sequence[Sequence[int]], seq_len: int, *,
                      pad_id: int = 256) -> dict:
  """The packed batch of ``rows`` (e.g. of :func:`pack_examples`).

  Args:
    prompts, completions: the examples (as for :func:`pack_examples`).
    rows: ``B`` rows, each the indices of its examples, packed in that order.
    seq_len: ``L``.
    pad_id: the padding id.

  Returns:
    ``{"tokens", "targets": int32 [B, L], "loss_mask": float32 [B, L],
    "segment_ids", "positions": int32 [B, L]}`` (the module docstring's
    layout; no ``prompt_len``). NumPy arrays.

  Raises:
    ValueError: a row's examples exceed ``seq_len`` slots, a row with an
      example of no slot, or an invalid example (see :func:`pack_examples`).
  """
  b = len(rows)
  tokens = np.full((b, seq_len), pad_id, np.int32)
  targets = np.full((b, seq_len), pad_id, np.int32)
  mask = np.zeros((b, seq_len), np.float32)
  segments = np.zeros((b, seq_len), np.int32)
  positions = np.zeros((b, seq_len), np.int32)
  for r, row in enumerate(rows):
    offset = 0
    for k, i in enumerate(row, start=1):
      p, c = prompts[i], completions[i]
      n = _slots(p, c, seq_len, i)
      if n < 1:
        raise ValueError(f"example {i} (row {r}) has nothing to predict "
                         "(one id); leave it out of the rows.")
      if offset + n > seq_len:
        raise ValueError(f"row {r} holds more than seq_len={seq_len} slots "
                         f"(examples {tuple(row)}).")
      s = np.asarray((list(p) + list(c))[:n + 1], np.int32)
      span = slice(offset, offset + n)
      tokens[r, span] = s[:-1]
      targets[r, span] = s[1:]
      mask[r, offset + len(p) - 1:offset + n] = 1.0
      segments[r, span] = k
      positions[r, span] = np.arange(n)
      offset += n
  return {"tokens": tokens, "targets": targets, "loss_mask": mask,
          SEGMENT_IDS_KEY: segments, POSITIONS_KEY: positions}


def packing_efficiency(batch_or_segment_ids: Union[Mapping[str, Any],
                                                   chex.Array]) -> float:
  """The fraction of a packed batch's slots that hold tokens (not padding).

  Args:
    batch_or_segment_ids: a packed batch (its ``segment_ids``) or the
      ``segment_ids`` ``[B, L]`` themselves.

  Returns:
    ``mean(segment_ids != 0)`` as a Python float (1.0 for a full batch).
  """
  segments = batch_or_segment_ids
  if isinstance(segments, Mapping):
    segments = segments[SEGMENT_IDS_KEY]
  return float(np.mean(np.asarray(segments) != 0))


def is_packed(batch: Mapping[str, Any]) -> bool:
  """Whether ``batch`` is packed (holds ``segment_ids``)."""
  return SEGMENT_IDS_KEY in batch


def check_unpacked(batch: Mapping[str, Any], what: str) -> None:
  """A ValueError if ``batch`` is packed: ``what`` needs one example a row.

  Structural (the batch's keys), so it is checked while tracing.
  """
  if is_packed(batch):
    raise ValueError(
        f"{what} generates from each row's prompt and needs unpacked batches "
        "(kdjax.lm.make_lm_batch, with 'prompt_len'); this batch is packed "
        f"(it has {SEGMENT_IDS_KEY!r}). Use packing with the objectives "
        "without a rollout only (ce, token_kd, lean_kd).")


def segment_positions(segment_ids: chex.Array) -> chex.Array:
  """Positions restarting at 0 in each run of equal ``segment_ids`` (jit-safe).

  ``positions[b, t] = t - start`` with ``start`` the first slot of the run
  holding ``t`` (segments are contiguous), 0 on padding (``segment_ids =
  0``): the ``positions`` of :func:`make_packed_batch`; int32 ``[B, L]``.
  """
  segment_ids = jnp.asarray(segment_ids)
  t = segment_ids.shape[-1]
  index = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
  starts = jnp.concatenate(
      [jnp.ones(segment_ids.shape[:-1] + (1,), jnp.bool_),
       segment_ids[..., 1:] != segment_ids[..., :-1]], axis=-1)
  first = jax.lax.cummax(jnp.where(starts, index, 0),
                         axis=segment_ids.ndim - 1)
  return jnp.where(segment_ids != 0, index - first, 0)


def packed_attention_mask(segment_ids: chex.Array,
                          positions: Optional[chex.Array] = None
                          ) -> chex.Array:
  r"""The block-diagonal causal attention mask of packed rows (jit-safe).

  .. math::
    M_{b,q,k} = [s_q = s_k] \wedge [p_k \le p_q] \wedge [s_q \ne 0]
      \;\vee\; [q = k]

  with ``s = segment_ids`` and ``p = positions`` (default:
  :func:`segment_positions`): a token attends to the tokens of its own
  segment at or before its position; a padding slot (``s = 0``) attends to
  itself only (no fully masked row: no NaN in any attention implementation;
  its output is masked from every loss).

  Args:
    segment_ids: int ``[B, L]`` (0 = padding).
    positions: int ``[B, L]``, or None.

  Returns:
    bool ``[B, L, L]`` (query, key).
  """
  segment_ids = jnp.asarray(segment_ids)
  if positions is None:
    positions = segment_positions(segment_ids)
  positions = jnp.asarray(positions)
  t = segment_ids.shape[-1]
  same = segment_ids[..., :, None] == segment_ids[..., None, :]
  causal = positions[..., None, :] <= positions[..., :, None]
  real = (segment_ids != 0)[..., :, None]
  diagonal = jnp.eye(t, dtype=jnp.bool_)
  return (same & causal & real) | diagonal


def segment_key_prefix(input_key: str) -> str:
  """The prefix of the packing keys that go with tokens ``input_key``.

  ``"tokens" -> ""``, ``"teacher_tokens" -> "teacher_"`` (a teacher reading
  its own tokens reads its own ``teacher_segment_ids``); ``""`` for a key not
  ending in ``"tokens"``.
  """
  return input_key[:-len("tokens")] if input_key.endswith("tokens") else ""


def packing_inputs(batch: Mapping[str, Any], tokens_shape: tuple[int, ...],
                   prefix: str = ""
                   ) -> Optional[tuple[chex.Array, chex.Array]]:
  """``(segment_ids, positions)`` of a packed batch, or None if unpacked.

  Reads ``batch[prefix + "segment_ids"]`` and ``batch[prefix +
  "positions"]`` (:func:`segment_key_prefix`); ``positions`` default to
  :func:`segment_positions`. Both are checked to have the tokens' shape.

  Raises:
    ValueError: ``positions`` without ``segment_ids``, or a shape mismatch.
  """
  seg_key, pos_key = prefix + SEGMENT_IDS_KEY, prefix + POSITIONS_KEY
  if seg_key not in batch:
    if pos_key in batch:
      raise ValueError(
          f"the batch has {pos_key!r} but no {seg_key!r}; "
          "packed batches need both (kdjax.lm.make_packed_batch).")
    return None
  segment_ids = jnp.asarray(batch[seg_key], jnp.int32)
  if pos_key in batch:
    positions = jnp.asarray(batch[pos_key], jnp.int32)
  else:
    positions = segment_positions(segment_ids)
  for name, value in ((seg_key, segment_ids), (pos_key, positions)):
    if tuple(value.shape) != tuple(tokens_shape):
      raise ValueError(f"batch[{name!r}] has shape {tuple(value.shape)}, the "
                       f"tokens {tuple(tokens_shape)}.")
  return segment_ids, positions
