"""Memory-lean divergences from hidden states, and vocabulary-sharded logits.

At large vocabularies the ``[tokens, V]`` float32 logits of a language-model
distillation step (student and teacher, plus the student's logit gradient)
dominate its memory. The functions here take what produces the logits
instead, the final hidden states and the unembedding,

  z_s = h_s @ W_s + b_s        h_s [N, D_s], W_s [D_s, V], b_s [V]
  z_t = h_t @ W_t + b_t        h_t [N, D_t], W_t [D_t, V], b_t [V]

and compute any divergence of ``kdjax.losses`` (forward/reverse KL,
generalised JSD, skew KL both ways, TVD, soft CE; temperature, mask, mean or
sum) between ``softmax(z_t / T)`` and ``softmax(z_s / T)``, or against a top-k
teacher with a tail bucket, or the student's cross-entropy on labels,
without ever holding more than one chunk of ``[C, V]`` logits. Values and
gradients (w.r.t. ``h_s``, ``W_s``, ``b_s``) equal the plain computation on
full logits (``implementation="plain"``) up to float rounding; the teacher is
a constant (its inputs go through ``stop_gradient``). Matmuls take bf16 (or
any) inputs and accumulate in float32 (``preferred_element_type``); the
softmax statistics and the divergence are float32.

Implementations (``implementation=``; BUILD_NOTES.md compares them)
------------------------------------------------------------------
``"fused"`` (default)
  A ``jax.custom_vjp`` whose forward pass walks the tokens in chunks
  (``lax.scan``) and, for each chunk, computes both logits, the chunk's loss
  and, with ``jax.vjp`` of the per-chunk loss, its gradient ``g = dL/dz_s``;
  it immediately turns ``g`` into ``dh_s = g W_s^T`` (stored, ``[N, D_s]``),
  and accumulates ``dW_s += h_s^T g`` and ``db_s += sum g`` (float32). The
  backward pass only scales these by the incoming cotangent. Nothing is
  recomputed: each matmul (student logits, teacher logits, the two gradient
  matmuls) runs exactly once, as in the plain step, so the time stays that of
  the plain step while the peak memory drops from ``O(N V)`` to
  ``O(C V + D_s V)``. (Liger-Kernel's fused linear JSD uses the same idea in
  Triton.) Scalar results only (``reduction="mean"`` or ``"sum"``). Reverse
  mode only: ``jax.jvp``/``jacfwd`` of a ``custom_vjp`` are undefined (use
  ``"checkpointed"`` for forward mode); ``grad`` of ``grad`` works. Gradients
  w.r.t. a traced temperature, beta, alpha or float mask weights are computed
  only when asked for (``symbolic_zeros``), so they cost nothing otherwise.
``"checkpointed"``
  ``lax.scan`` over chunks of a ``jax.checkpoint``-ed per-chunk loss: the
  straightforward fix. Same memory bound, but the backward pass recomputes
  both chunk matmuls (student and teacher). Used for ``reduction="none"``.
``"plain"``
  Full logits; the reference (and the fastest where memory is no concern).

Vocabulary sharding
-------------------
With ``axis_name`` (inside ``jax.shard_map``, whose default ``check_vma=True``
these functions need), the unembedding kernel and bias are the local shards
``[D, V / M]`` / ``[V / M]`` of a vocabulary split over a mesh axis of size
``M``. The log-softmax comes from per-shard statistics: the max goes through
``pmax`` (no gradient needed: it cancels), the sum of exponentials through
``psum``, and each position's divergence is a per-shard partial sum finished
with one ``psum`` of a ``[C]`` vector; top-k and label gathers take the local
entries and ``psum`` them. ``[tokens, V]`` is never all-gathered, and chunking
combines with it. :func:`vocab_sharded_divergence_from_hidden`
(:mod:`kdjax.losses._vocab_sharded`) wraps the ``shard_map`` for a mesh.

Padded vocabularies: ``vocab_size`` keeps only the first ``vocab_size``
columns (rows beyond a tokenizer's vocabulary, see ``kdjax.lm.align_vocab``):
sliced off unsharded, masked to a probability of exactly 0 when sharded.

Modules: this one validates and chunks the inputs and holds the public
functions; the loss of one chunk (and the sharded log-softmax) is in
:mod:`kdjax.losses._chunk_loss`, the three engines in
:mod:`kdjax.losses._chunk_engines`, the ``shard_map`` wrapper in
:mod:`kdjax.losses._vocab_sharded`.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Optional, Sequence, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np

from kdjax.losses import _chunk_engines
from kdjax.losses import _divergences
from kdjax.losses import _utils
from kdjax.losses._chunk_engines import IMPLEMENTATIONS
from kdjax.losses._chunk_loss import ChunkConfig
from kdjax.losses._chunk_loss import axis_tuple
from kdjax.losses._chunk_loss import varying_axes

# Default memory budget of one chunk's float32 [C, V] temporaries.
DEFAULT_MEMORY_BUDGET_BYTES = 1 << 30
# How many float32 [C, V] arrays one chunk keeps alive at its peak (student
# and teacher logits, both log-probabilities, the gradient and a few
# elementwise temporaries of the divergence and its VJP); measured with
# memory_analysis() on the CPU for the KL and the JSD (BUILD_NOTES.md).
_LIVE_CHUNK_ARRAYS = 8


class Unembedding(NamedTuple):
  """The output layer ``logits = hidden @ kernel + bias`` (a pytree).

  Attributes:
    kernel: ``[D, V]`` (hidden size by vocabulary), e.g. ``kdjax.lm.unembedding``.
    bias: ``[V]`` or ``None``.
  """
  kernel: chex.Array
  bias: Optional[chex.Array] = None


def choose_chunk_size(num_tokens: int, vocab_columns: int,
                      memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES
                      ) -> int:
  """The number of tokens per chunk that fits ``memory_budget_bytes``.

  One chunk keeps about ``8`` float32 ``[C, V]`` arrays alive, so ``C =
  budget / (32 V)``, rounded down to a multiple of 8 (matmul-friendly; at
  least 1) and capped at ``num_tokens``.

  Args:
    num_tokens: tokens in the batch (``N``).
    vocab_columns: the (local, when sharded) vocabulary width ``V``.
    memory_budget_bytes: budget of one chunk's temporaries.
  """
  if memory_budget_bytes <= 0:
    raise ValueError(
        f"memory_budget_bytes must be > 0, got {memory_budget_bytes}.")
  per_token = _LIVE_CHUNK_ARRAYS * 4 * max(int(vocab_columns), 1)
  chunk = int(memory_budget_bytes // per_token)
  if chunk >= 8:
    chunk -= chunk % 8
  return int(max(1, min(chunk, max(int(num_tokens), 1))))


# -----------------------------------------------------------------------------
# Validation, chunking and the public functions.
# -----------------------------------------------------------------------------


def _check_unembedding(hidden: chex.Array, unembedding: Unembedding,
                       who: str) -> None:
  if not isinstance(unembedding, (Unembedding, tuple)) or len(unembedding) != 2:
    raise TypeError(f"the {who}'s unembedding must be an Unembedding(kernel, "
                    f"bias) (or a (kernel, bias) pair), got {type(unembedding)}.")
  kernel, bias = unembedding
  h_shape, k_shape = jnp.shape(hidden), jnp.shape(kernel)
  if len(k_shape) != 2:
    raise ValueError(f"the {who}'s unembedding kernel must be [hidden, vocab], "
                     f"got shape {k_shape}.")
  if len(h_shape) < 1 or h_shape[-1] != k_shape[0]:
    raise ValueError(
        f"hidden-size mismatch: the {who}'s hidden states {h_shape} end in "
        f"{h_shape[-1] if h_shape else None} features but its unembedding "
        f"kernel {k_shape} expects {k_shape[0]} (kernel is [hidden, vocab]).")
  if bias is not None and tuple(jnp.shape(bias)) != (k_shape[1],):
    raise ValueError(f"the {who}'s unembedding bias {jnp.shape(bias)} does not "
                     f"match its kernel's vocabulary ({k_shape[1]},).")


def _slice_vocab(unembedding: Unembedding, vocab_size: Optional[int],
                 who: str) -> Unembedding:
  kernel, bias = unembedding
  columns = jnp.shape(kernel)[1]
  if vocab_size is None or columns == vocab_size:
    return Unembedding(kernel, bias)
  if columns < vocab_size:
    raise ValueError(
        f"vocabulary mismatch: the {who}'s unembedding has {columns} columns, "
        f"fewer than the tokenizer's vocab_size={vocab_size}.")
  return Unembedding(kernel[:, :vocab_size],
                     None if bias is None else bias[:vocab_size])


def _check_vma(axis_name) -> None:
  """The sharded engines need ``shard_map(..., check_vma=True)`` (the default)."""
  for axis in axis_tuple(axis_name):
    if axis not in varying_axes(jax.lax.axis_index(axis)):
      raise ValueError(
          f"the vocabulary-sharded loss (axis_name={axis_name!r}) needs "
          "jax.shard_map with check_vma=True (the default): without it, the "
          "gradient of the replicated hidden states would be summed over the "
          "vocabulary shards twice.")


def _check_chunk_size(chunk_size) -> None:
  if chunk_size is not None and (not isinstance(chunk_size, (int, np.integer))
                                 or isinstance(chunk_size, bool)
                                 or chunk_size < 1):
    raise ValueError(f"chunk_size must be a positive int (tokens per chunk), "
                     f"got {chunk_size!r}.")


def _chunk(x: chex.Array, num_chunks: int, chunk: int, fill=0) -> chex.Array:
  """``[N, ...] -> [num_chunks, chunk, ...]``, padding the tail with ``fill``."""
  pad = num_chunks * chunk - x.shape[0]
  if pad:
    widths = [(0, pad)] + [(0, 0)] * (x.ndim - 1)
    x = jnp.pad(x, widths, constant_values=fill)
  return x.reshape((num_chunks, chunk) + x.shape[1:])


def _is_static_number(x) -> bool:
  return isinstance(x, (int, float, np.floating, np.integer)) and not isinstance(
      x, bool)


def _run(teacher_kind: str, student_hidden, student_unembedding, teacher_tokens,
         teacher_consts, temperature, *, divergence, beta, alpha, tail_bucket,
         mask, reduction, scale_by_temperature, sharded_vocab_size,
         chunk_size, memory_budget_bytes, implementation, axis_name):
  """Shared body of the public functions (inputs already validated/sliced)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got "
                     f"{implementation!r}.")
  _utils.check_reduction(reduction)
  _check_chunk_size(chunk_size)
  lead = tuple(jnp.shape(student_hidden)[:-1])
  _utils.check_mask(mask, lead)
  kernel, bias = student_unembedding
  num_tokens = int(np.prod(lead, dtype=np.int64))
  hidden = jnp.reshape(student_hidden, (num_tokens, jnp.shape(kernel)[0]))
  if mask is None:
    weights = jnp.ones((num_tokens,), jnp.float32)
  else:
    weights = jnp.reshape(jnp.asarray(mask), (num_tokens,)).astype(jnp.float32)
  if chunk_size is None:
    chunk_size = choose_chunk_size(num_tokens, jnp.shape(kernel)[1],
                                   memory_budget_bytes)
  chunk_size = int(min(chunk_size, max(num_tokens, 1)))
  num_chunks = max(-(-num_tokens // chunk_size), 1)
  chunked = lambda x: _chunk(x, num_chunks, chunk_size)
  flat_teacher = jax.tree.map(
      lambda x: jnp.reshape(x, (num_tokens,) + jnp.shape(x)[len(lead):]),
      teacher_tokens)
  teacher_chunks = jax.tree.map(chunked, flat_teacher)
  cfg = ChunkConfig(
      teacher_kind=teacher_kind, divergence=divergence,
      beta=float(beta) if _is_static_number(beta) else None,
      alpha=float(alpha) if _is_static_number(alpha) else None,
      tail_bucket=bool(tail_bucket),
      scale=bool(scale_by_temperature) and teacher_kind != "labels"
      and divergence in _divergences._TEMPERATURE_SCALED,  # pylint: disable=protected-access
      axis_name=(tuple(axis_name) if isinstance(axis_name, list)
                 else axis_name), vocab_size=sharded_vocab_size,
      hidden_axes=varying_axes(hidden), kernel_axes=varying_axes(kernel),
      bias_axes=varying_axes(bias))
  if axis_name is not None:
    _check_vma(axis_name)
  scalars = {"temperature": jnp.asarray(temperature, jnp.float32)}
  if cfg.beta is None:
    scalars["beta"] = jnp.asarray(beta, jnp.float32)
  if cfg.alpha is None:
    scalars["alpha"] = jnp.asarray(alpha, jnp.float32)
  cfg = dataclasses.replace(cfg, weight_axes=varying_axes(weights),
                            scalar_axes=varying_axes(scalars))
  args = (cfg, chunked(hidden), kernel, bias, teacher_chunks, teacher_consts,
          chunked(weights), scalars)
  if reduction == "none" or implementation != "fused":
    engine = (_chunk_engines.plain if implementation == "plain"
              else _chunk_engines.checkpointed)
    per = engine(*args).reshape(-1)[:num_tokens]
    if reduction == "none":
      return per.reshape(lead)
    total = jnp.sum(per)
  else:
    total = _chunk_engines.fused(*args)
  if reduction == "sum":
    return total
  return total / jnp.maximum(jnp.sum(weights), 1.0)


def _check_divergence(divergence, temperature, beta, alpha):
  if divergence not in _divergences.DIVERGENCES:
    raise ValueError(f"unknown divergence {divergence!r}; expected one of "
                     f"{_divergences.DIVERGENCES}.")
  _divergences._validate(divergence, temperature, beta, alpha)  # pylint: disable=protected-access


def _check_sharded_vocab(axis_name, vocab_size) -> Optional[int]:
  """With a sharded vocabulary, columns are masked instead of sliced."""
  if vocab_size is not None and (not isinstance(vocab_size, int)
                                 or vocab_size < 1):
    raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}.")
  return vocab_size if axis_name is not None else None


def divergence_from_hidden(student_hidden: chex.Array,
                           student_unembedding: Unembedding,
                           teacher_hidden: chex.Array,
                           teacher_unembedding: Unembedding,
                           temperature: chex.Numeric = 1.0,
                           *,
                           divergence: str = "kl",
                           beta: chex.Numeric = 0.5,
                           alpha: chex.Numeric = 0.1,
                           mask: Optional[chex.Array] = None,
                           reduction: str = "mean",
                           scale_by_temperature: bool = True,
                           vocab_size: Optional[int] = None,
                           chunk_size: Optional[int] = None,
                           memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
                           implementation: str = "fused",
                           axis_name: Union[str, Sequence[str], None] = None
                           ) -> chex.Array:
  r"""A logit divergence computed chunk by chunk from hidden states.

  .. math::
    L = \frac{T^2}{N} \sum_{n} m_n\, D\big(\mathrm{softmax}((h^t_n W_t + b_t)/T),
        \ \mathrm{softmax}((h^s_n W_s + b_s)/T)\big),\quad N = \sum_n m_n

  equal to ``kdjax.losses.logit_divergence(h_s @ W_s + b_s, h_t @ W_t + b_t,
  T, divergence=...)`` in value and in gradient w.r.t. ``h_s``, ``W_s`` and
  ``b_s``, but holding at most one ``[chunk_size, V]`` block of logits (see
  the module docstring for the implementations and the sharded vocabulary).
  The teacher is treated as a constant (``stop_gradient``).

  Args:
    student_hidden: ``[..., D_s]`` final hidden states (bf16 or float32).
    student_unembedding: :class:`Unembedding` ``(kernel [D_s, V], bias [V])``.
    teacher_hidden: ``[..., D_t]`` with the student's leading shape.
    teacher_unembedding: ``(kernel [D_t, V], bias [V])``.
    temperature: ``T > 0`` (float or traced scalar).
    divergence: one of ``kdjax.losses.DIVERGENCES``.
    beta: generalised JSD teacher weight; alpha: skew KL weight.
    mask: ``[...]`` mask or weights (e.g. completion tokens).
    reduction: ``"mean"`` over unmasked positions, ``"sum"``, or ``"none"``
      (per-position ``[...]``; uses the checkpointed engine).
    scale_by_temperature: multiply by ``T**2`` (not for TVD).
    vocab_size: keep only the first ``vocab_size`` columns of both
      unembeddings (padded vocabularies of one tokenizer).
    chunk_size: tokens per chunk; by default from ``memory_budget_bytes``
      (:func:`choose_chunk_size`). Need not divide the token count: the last
      chunk is padded with masked rows.
    memory_budget_bytes: budget of one chunk's temporaries.
    implementation: ``"fused"``, ``"checkpointed"`` or ``"plain"``.
    axis_name: the mesh axis the vocabulary is sharded over (call inside
      ``jax.shard_map``; kernels and biases are then the local shards).

  Returns:
    Scalar, or ``[...]`` for ``reduction="none"``.
  """
  _check_divergence(divergence, temperature, beta, alpha)
  _check_unembedding(student_hidden, student_unembedding, "student")
  _check_unembedding(teacher_hidden, teacher_unembedding, "teacher")
  if jnp.shape(student_hidden)[:-1] != jnp.shape(teacher_hidden)[:-1]:
    raise ValueError(
        f"shape mismatch: student hidden states {jnp.shape(student_hidden)} "
        f"and teacher hidden states {jnp.shape(teacher_hidden)} must share "
        "their leading (batch/sequence) shape.")
  sharded_vocab = _check_sharded_vocab(axis_name, vocab_size)
  if axis_name is None:
    student_unembedding = _slice_vocab(student_unembedding, vocab_size,
                                       "student")
    teacher_unembedding = _slice_vocab(teacher_unembedding, vocab_size,
                                       "teacher")
  v_s = jnp.shape(student_unembedding[0])[1]
  v_t = jnp.shape(teacher_unembedding[0])[1]
  if v_s != v_t:
    hint = ("Padded vocabularies of one tokenizer: pass vocab_size=<the "
            "tokenizer's size>" if axis_name is None else
            "With a sharded vocabulary both unembeddings must be padded to the "
            "same width (vocab_size then masks the padding)")
    raise ValueError(
        f"vocabulary mismatch: the student's unembedding has {v_s} columns "
        f"and the teacher's {v_t}{' per shard' if axis_name else ''}. {hint}. "
        "Different tokenizers: use the cross-tokenizer loss (Universal Logit "
        "Distillation).")
  teacher_consts = jax.tree.map(jax.lax.stop_gradient,
                                tuple(teacher_unembedding))
  return _run("dense", student_hidden, tuple(student_unembedding),
              jax.lax.stop_gradient(teacher_hidden), teacher_consts,
              temperature, divergence=divergence, beta=beta, alpha=alpha,
              tail_bucket=False, mask=mask, reduction=reduction,
              scale_by_temperature=scale_by_temperature,
              sharded_vocab_size=sharded_vocab, chunk_size=chunk_size,
              memory_budget_bytes=memory_budget_bytes,
              implementation=implementation, axis_name=axis_name)


def top_k_divergence_from_hidden(student_hidden: chex.Array,
                                 student_unembedding: Unembedding,
                                 teacher: _divergences.TopKTeacher,
                                 temperature: chex.Numeric = 1.0,
                                 *,
                                 divergence: str = "kl",
                                 beta: chex.Numeric = 0.5,
                                 alpha: chex.Numeric = 0.1,
                                 tail_bucket: bool = True,
                                 mask: Optional[chex.Array] = None,
                                 reduction: str = "mean",
                                 scale_by_temperature: bool = True,
                                 vocab_size: Optional[int] = None,
                                 chunk_size: Optional[int] = None,
                                 memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
                                 implementation: str = "fused",
                                 axis_name: Union[str, Sequence[str], None] = None
                                 ) -> chex.Array:
  """:func:`kdjax.losses.top_k_divergence` from the student's hidden states.

  The teacher is a cached :class:`kdjax.losses.TopKTeacher` (``[..., k]``
  values and global vocabulary indices, ``logsumexp [...]`` for the tail
  bucket); the student's full-vocabulary log-softmax is formed chunk by chunk
  (and shard by shard with ``axis_name``) and gathered at the teacher's
  indices. Equal in value and gradient to ``top_k_divergence(h_s @ W_s + b_s,
  teacher, ...)``. Arguments as :func:`divergence_from_hidden`.
  """
  _check_divergence(divergence, temperature, beta, alpha)
  _check_unembedding(student_hidden, student_unembedding, "student")
  sharded_vocab = _check_sharded_vocab(axis_name, vocab_size)
  if axis_name is None:
    student_unembedding = _slice_vocab(student_unembedding, vocab_size,
                                       "student")
  columns = jnp.shape(student_unembedding[0])[1]
  if axis_name is not None:
    columns = vocab_size or columns * jax.lax.axis_size(axis_name)
  _divergences.check_top_k_shapes(teacher, tuple(jnp.shape(student_hidden)[:-1]),
                                  int(columns))
  _divergences.check_top_k_temperature(teacher, temperature, tail_bucket)
  logsumexp = teacher.logsumexp
  if logsumexp is None:  # unused without the tail bucket
    logsumexp = jnp.zeros(jnp.shape(teacher.values)[:-1], jnp.float32)
  tokens = jax.tree.map(jax.lax.stop_gradient,
                        (_utils.to_float32(teacher.values), teacher.indices,
                         _utils.to_float32(logsumexp)))
  return _run("top_k", student_hidden, tuple(student_unembedding), tokens, (),
              temperature, divergence=divergence, beta=beta, alpha=alpha,
              tail_bucket=tail_bucket, mask=mask, reduction=reduction,
              scale_by_temperature=scale_by_temperature,
              sharded_vocab_size=sharded_vocab, chunk_size=chunk_size,
              memory_budget_bytes=memory_budget_bytes,
              implementation=implementation, axis_name=axis_name)


def cross_entropy_from_hidden(student_hidden: chex.Array,
                              student_unembedding: Unembedding,
                              labels: chex.Array,
                              *,
                              mask: Optional[chex.Array] = None,
                              reduction: str = "mean",
                              vocab_size: Optional[int] = None,
                              chunk_size: Optional[int] = None,
                              memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
                              implementation: str = "fused",
                              axis_name: Union[str, Sequence[str], None] = None
                              ) -> chex.Array:
  r"""Next-token cross-entropy :math:`-\frac1N\sum_n m_n \log q_n[y_n]` from hidden states.

  The memory-lean twin of ``kdjax.losses.hard_label_cross_entropy(h @ W + b,
  labels)`` (same chunking, sharding and engines as
  :func:`divergence_from_hidden`), so that a CE + KD step never forms full
  logits. ``labels`` is ``[...]`` int with the hidden states' leading shape.

  Checks: the labels' shape and dtype always; labels outside ``[0, V)`` (``V``
  = ``vocab_size`` or the kernel's columns; masked positions included) raise
  ``ValueError`` eagerly when concrete, and under jit only under
  :func:`kdjax.losses.runtime_checks`. With ``axis_name`` (inside
  ``shard_map``) the range is not checked here:
  :func:`vocab_sharded_divergence_from_hidden` checks it before sharding.
  """
  _check_unembedding(student_hidden, student_unembedding, "student")
  lead = tuple(jnp.shape(student_hidden)[:-1])
  num_classes = None
  if axis_name is None:
    num_classes = vocab_size or jnp.shape(student_unembedding[0])[-1]
  _utils.check_labels(labels, num_classes, lead, "cross_entropy_from_hidden")
  sharded_vocab = _check_sharded_vocab(axis_name, vocab_size)
  if axis_name is None:
    student_unembedding = _slice_vocab(student_unembedding, vocab_size,
                                       "student")
  return _run("labels", student_hidden, tuple(student_unembedding),
              jnp.asarray(labels, jnp.int32), (), 1.0, divergence="kl",
              beta=0.5, alpha=0.1, tail_bucket=False, mask=mask,
              reduction=reduction, scale_by_temperature=False,
              sharded_vocab_size=sharded_vocab, chunk_size=chunk_size,
              memory_budget_bytes=memory_budget_bytes,
              implementation=implementation, axis_name=axis_name)
