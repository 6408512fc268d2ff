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
combines with it. :func:`vocab_sharded_divergence_from_hidden` wraps the
``shard_map`` for a mesh.

Padded vocabularies: ``vocab_size`` keeps only the first ``vocab_size``
columns (rows beyond a tokenizer's vocabulary, see ``kdjax.lm.align_vocab``):
sliced off unsharded, masked to a probability of exactly 0 when sharded.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional, Sequence, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np

from kdjax.losses import _divergences
from kdjax.losses import _utils

IMPLEMENTATIONS = ("fused", "checkpointed", "plain")

# Default memory budget of one chunk's float32 [C, V] temporaries.
DEFAULT_MEMORY_BUDGET_BYTES = 1 << 30
# How many float32 [C, V] arrays one chunk keeps alive at its peak (student
# and teacher logits, both log-probabilities, the gradient and a few
# elementwise temporaries of the divergence and its VJP); measured with
# memory_analysis() on the CPU for the KL and the JSD (BUILD_NOTES.md).
_LIVE_CHUNK_ARRAYS = 8
# A logit that stands for "no such token" (padded vocabulary columns when
# sharded): finite, so no inf - inf, and exp() of it is exactly 0.
_MASKED_LOGIT = -1e30


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
# Static configuration and the per-chunk loss.
# -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Config:
  """Hashable, static description of one loss (``nondiff`` in the custom VJP)."""
  teacher_kind: str  # "dense", "top_k" or "labels"
  divergence: str
  beta: Optional[float]  # a Python number, or None when traced (in scalars)
  alpha: Optional[float]
  tail_bucket: bool
  scale: bool  # multiply by T**2
  axis_name: Any  # vocabulary mesh axis (or tuple of axes), or None
  vocab_size: Optional[int]  # mask columns >= vocab_size (sharded only)
  # Mesh axes (inside shard_map) the differentiable inputs vary over.
  hidden_axes: frozenset = frozenset()
  kernel_axes: frozenset = frozenset()
  bias_axes: frozenset = frozenset()
  weight_axes: frozenset = frozenset()
  scalar_axes: frozenset = frozenset()


def _matmul_logits(hidden: chex.Array, kernel: chex.Array,
                   bias: Optional[chex.Array]) -> chex.Array:
  """``hidden @ kernel + bias`` accumulated and returned in float32."""
  z = jax.lax.dot_general(hidden, kernel, (((hidden.ndim - 1,), (0,)), ((), ())),
                          preferred_element_type=jnp.float32)
  if bias is not None:
    z = z + bias.astype(jnp.float32)
  return z


def _column_offset(cfg: _Config, local_columns: int) -> chex.Array:
  if cfg.axis_name is None:
    return jnp.zeros((), jnp.int32)
  return jax.lax.axis_index(cfg.axis_name) * local_columns


def _log_softmax(cfg: _Config, z: chex.Array, temperature: chex.Array,
                 offset: chex.Array) -> chex.Array:
  """``log softmax(z / T)`` over the whole (possibly sharded) vocabulary."""
  z = z / temperature
  if cfg.vocab_size is not None:
    columns = offset + jnp.arange(z.shape[-1])
    z = jnp.where(columns < cfg.vocab_size, z, _MASKED_LOGIT)
  if cfg.axis_name is None:
    return jax.nn.log_softmax(z, axis=-1)
  # The max only stabilises the exponentials; its gradient cancels exactly.
  m = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
  m = jax.lax.stop_gradient(jax.lax.pmax(m, cfg.axis_name))
  s = jax.lax.psum(jnp.sum(jnp.exp(z - m), axis=-1, keepdims=True),
                   cfg.axis_name)
  return z - m - jnp.log(s)


def _gather_columns(cfg: _Config, log_q: chex.Array, indices: chex.Array,
                    offset: chex.Array) -> chex.Array:
  """``log_q[..., indices]`` with global ``indices`` over a sharded vocabulary."""
  if cfg.axis_name is None:
    return jnp.take_along_axis(log_q, indices, axis=-1)
  local = indices - offset
  inside = (local >= 0) & (local < log_q.shape[-1])
  picked = jnp.take_along_axis(log_q, jnp.clip(local, 0, log_q.shape[-1] - 1),
                               axis=-1)
  picked = jax.lax.psum(jnp.where(inside, picked, 0.0), cfg.axis_name)
  # An index no shard holds, or a padded column, is an error: NaN, as the
  # unsharded gather gives (never a silent 0 or -1e30 log-probability).
  found = jax.lax.psum(inside.astype(jnp.float32), cfg.axis_name) > 0
  if cfg.vocab_size is not None:
    found = found & (indices < cfg.vocab_size)
  return jnp.where(found, picked, jnp.nan)


def _teacher_logits(cfg: _Config, teacher_chunk, teacher_consts):
  """The teacher's chunk logits (dense teacher) or its cached chunk as is."""
  if cfg.teacher_kind != "dense":
    return teacher_chunk
  kernel, bias = teacher_consts
  return _matmul_logits(teacher_chunk, kernel, bias)


def _teacher_log_probs(cfg: _Config, teacher, scalars, offset):
  """What :func:`_per_position` needs from the teacher at this temperature."""
  if cfg.teacher_kind != "dense":
    return teacher
  return _log_softmax(cfg, teacher, scalars["temperature"], offset)


def _teacher_side(cfg: _Config, teacher_chunk, teacher_consts, scalars,
                  offset):
  """What the per-chunk loss needs from the teacher (no gradient)."""
  return _teacher_log_probs(
      cfg, _teacher_logits(cfg, teacher_chunk, teacher_consts), scalars,
      offset)


def _per_position(cfg: _Config, z_s: chex.Array, teacher, scalars,
                  offset) -> chex.Array:
  """The ``[C]`` per-position loss of one chunk of student logits ``[C, V]``."""
  t = scalars["temperature"]
  beta = scalars["beta"] if cfg.beta is None else cfg.beta
  alpha = scalars["alpha"] if cfg.alpha is None else cfg.alpha
  log_q = _log_softmax(cfg, z_s, t, offset)
  if cfg.teacher_kind == "labels":
    picked = _gather_columns(cfg, log_q, teacher[:, None], offset)
    return -picked[:, 0]
  if cfg.teacher_kind == "top_k":
    values, indices, logsumexp = teacher
    picked = _gather_columns(cfg, log_q, indices, offset)
    per = _divergences.top_k_divergence_from_student_log_probs(
        picked, _divergences.TopKTeacher(values, indices, logsumexp, None), t,
        divergence=cfg.divergence, beta=beta, alpha=alpha,
        tail_bucket=cfg.tail_bucket)
  else:
    per = _divergences.divergence_from_log_probs(
        cfg.divergence, log_q, teacher, beta=beta, alpha=alpha)
    if cfg.axis_name is not None:
      per = jax.lax.psum(per, cfg.axis_name)
  if cfg.scale:
    per = per * jnp.square(t)
  return per


def _weighted(per: chex.Array, weights: chex.Array) -> chex.Array:
  # where(), not a product: a padded or masked position's value never leaks.
  return jnp.where(weights > 0, per * weights, 0.0)


# -----------------------------------------------------------------------------
# The three engines. Inputs are chunked: hidden [n, C, D], teacher chunks
# [n, C, ...], weights [n, C]; the kernel and bias are whole (or local shards).
# -----------------------------------------------------------------------------


def _plain(cfg, hidden, kernel, bias, teacher_chunks, teacher_consts, weights,
           scalars):
  """Full logits at once: per-position values ``[n, C]``."""
  n, c = weights.shape
  flat = lambda x: x.reshape((n * c,) + x.shape[2:])
  offset = _column_offset(cfg, kernel.shape[-1])
  z_s = _matmul_logits(flat(hidden), kernel, bias)
  teacher = _teacher_side(cfg, jax.tree.map(flat, teacher_chunks),
                          teacher_consts, scalars, offset)
  per = _per_position(cfg, z_s, teacher, scalars, offset)
  return _weighted(per, flat(weights)).reshape(n, c)


def _checkpointed(cfg, hidden, kernel, bias, teacher_chunks, teacher_consts,
                  weights, scalars):
  """Scan over chunks of a rematerialised chunk loss: values ``[n, C]``."""
  offset = _column_offset(cfg, kernel.shape[-1])

  @jax.checkpoint
  def chunk_loss(h, teacher_chunk, w):
    z_s = _matmul_logits(h, kernel, bias)
    teacher = _teacher_side(cfg, teacher_chunk, teacher_consts, scalars,
                            offset)
    return _weighted(_per_position(cfg, z_s, teacher, scalars, offset), w)

  def body(carry, xs):
    return carry, chunk_loss(*xs)

  _, per = jax.lax.scan(body, None, (hidden, teacher_chunks, weights))
  return per


def _axis_tuple(axis_name) -> tuple:
  if axis_name is None:
    return ()
  return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (
      axis_name,)


def _varying_axes(tree) -> frozenset:
  """Mesh axes (inside ``shard_map``) that any leaf of ``tree`` varies over."""
  axes = set()
  for leaf in jax.tree.leaves(tree):
    manual = getattr(jax.typeof(leaf), "manual_axis_type", None)
    axes |= set(getattr(manual, "varying", ()) or ())
  return frozenset(axes)


def _vary(x: chex.Array, axes: frozenset) -> chex.Array:
  """Marks ``x`` as varying over ``axes`` (no-op outside ``shard_map``)."""
  missing = tuple(sorted(axes - _varying_axes(x)))
  return jax.lax.pcast(x, missing, to="varying") if missing else x


def _fused_forward(cfg, hidden, kernel, bias, teacher_chunks, teacher_consts,
                   weights, scalars, *, scalar_grads: bool = False,
                   weight_grads: bool = False):
  """Loss sum and its gradients w.r.t. hidden, kernel and bias, in one pass.

  With ``scalar_grads`` also the gradient w.r.t. the traced temperature /
  beta / alpha (the teacher's softmax is then differentiated too), with
  ``weight_grads`` the per-position values (the gradient w.r.t. the weights).
  """
  offset = _column_offset(cfg, kernel.shape[-1])
  compute_dtype = jnp.result_type(hidden.dtype, kernel.dtype)
  # Inside shard_map, scan carries must start with the mesh axes their
  # updates vary over: the loss with those of every input except the
  # (psum-ed) vocabulary axis, the gradient accumulators with all of them.
  everything = _varying_axes((hidden, kernel, bias, teacher_chunks,
                              teacher_consts, weights, scalars))
  vocab_axes = frozenset(_axis_tuple(cfg.axis_name))
  total0 = _vary(jnp.zeros((), jnp.float32), everything - vocab_axes)
  d_kernel0 = _vary(jnp.zeros(kernel.shape, jnp.float32), everything)
  d_bias0 = None if bias is None else _vary(
      jnp.zeros(bias.shape, jnp.float32), everything)
  d_scalars0 = None
  if scalar_grads:
    d_scalars0 = {k: _vary(jnp.zeros((), jnp.float32), everything - vocab_axes)
                  for k in scalars}

  def body(carry, xs):
    total, d_kernel, d_bias, d_scalars = carry
    h, teacher_chunk, w = xs
    z_s = _matmul_logits(h, kernel, bias)
    z_t = _teacher_logits(cfg, teacher_chunk, teacher_consts)

    def chunk_sum(z, sc):
      per = _per_position(cfg, z, _teacher_log_probs(cfg, z_t, sc, offset), sc,
                          offset)
      return jnp.sum(_weighted(per, w)), per

    if scalar_grads:
      value, pullback, per = jax.vjp(chunk_sum, z_s, scalars, has_aux=True)
      g, d_sc = pullback(jnp.ones_like(value))
      d_scalars = jax.tree.map(jnp.add, d_scalars, d_sc)
    else:
      teacher = _teacher_log_probs(cfg, z_t, scalars, offset)

      def chunk_sum_z(z):
        per = _per_position(cfg, z, teacher, scalars, offset)
        return jnp.sum(_weighted(per, w)), per

      value, pullback, per = jax.vjp(chunk_sum_z, z_s, has_aux=True)
      (g,) = pullback(jnp.ones_like(value))
    g_c = g.astype(compute_dtype)
    d_h = jax.lax.dot_general(g_c, kernel, (((1,), (1,)), ((), ())),
                              preferred_element_type=jnp.float32)
    if cfg.axis_name is not None:
      d_h = jax.lax.psum(d_h, cfg.axis_name)
    d_kernel = d_kernel + jax.lax.dot_general(
        h.astype(compute_dtype), g_c, (((0,), (0,)), ((), ())),
        preferred_element_type=jnp.float32)
    if d_bias is not None:
      d_bias = d_bias + jnp.sum(g, axis=0)
    # d(sum_n w_n per_n)/dw_n = per_n where w_n > 0 (the _weighted rule).
    d_w = jnp.where(w > 0, per, 0.0) if weight_grads else None
    return ((total + value, d_kernel, d_bias, d_scalars),
            (d_h.astype(hidden.dtype), d_w))

  init = (total0, d_kernel0, d_bias0, d_scalars0)
  (total, d_kernel, d_bias, d_scalars), (d_hidden, d_weights) = jax.lax.scan(
      body, init, (hidden, teacher_chunks, weights))
  d_kernel = d_kernel.astype(kernel.dtype)
  d_bias = None if bias is None else d_bias.astype(bias.dtype)
  return total, (d_hidden, d_kernel, d_bias, d_weights, d_scalars)


def _sum_over_replicas(cotangent: chex.Array, primal_axes: frozenset
                       ) -> chex.Array:
  """Sums a cotangent over the mesh axes its primal is replicated over.

  Inside ``shard_map`` a cotangent varies over the same axes as its primal;
  a kernel replicated over the data axis gets the sum of every data shard's
  contribution, as autodiff of the implicit broadcast would give.
  """
  extra = tuple(sorted(_varying_axes(cotangent) - primal_axes))
  return jax.lax.psum(cotangent, extra) if extra else cotangent


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(cfg, hidden, kernel, bias, teacher_chunks, teacher_consts, weights,
           scalars):
  """Weighted loss sum (scalar) with a gradient computed in the forward pass.

  Undifferentiated calls (evaluation) compute the loss alone, chunk by chunk.
  """
  return jnp.sum(_checkpointed(cfg, hidden, kernel, bias, teacher_chunks,
                               teacher_consts, weights, scalars))


def _unwrap(tree):
  """``(values, perturbed)`` of a pytree of ``CustomVJPPrimal`` leaves."""
  is_primal = lambda x: isinstance(x, jax.custom_derivatives.CustomVJPPrimal)
  leaves = jax.tree.leaves(tree, is_leaf=is_primal)
  values = jax.tree.map(lambda p: p.value, tree, is_leaf=is_primal)
  return values, any(p.perturbed for p in leaves)


def _fused_fwd(cfg, hidden, kernel, bias, teacher_chunks, teacher_consts,
               weights, scalars):
  # symbolic_zeros=True: each input says whether it is differentiated, so the
  # temperature / weight gradients cost nothing unless asked for.
  hidden, _ = _unwrap(hidden)
  kernel, _ = _unwrap(kernel)
  bias, _ = _unwrap(bias)
  teacher_chunks, _ = _unwrap(teacher_chunks)
  teacher_consts, _ = _unwrap(teacher_consts)
  weights, weight_grads = _unwrap(weights)
  scalars, scalar_grads = _unwrap(scalars)
  return _fused_forward(cfg, hidden, kernel, bias, teacher_chunks,
                        teacher_consts, weights, scalars,
                        scalar_grads=scalar_grads, weight_grads=weight_grads)


def _fused_bwd(cfg, residuals, cotangent):
  if isinstance(cotangent, jax.custom_derivatives.SymbolicZero):
    return (None,) * 7
  d_hidden, d_kernel, d_bias, d_weights, d_scalars = residuals

  def scale(x, axes):
    if x is None:
      return None
    return _sum_over_replicas(x * cotangent, axes).astype(x.dtype)

  scalars_ct = None if d_scalars is None else {
      k: scale(v, cfg.scalar_axes) for k, v in d_scalars.items()}
  return (scale(d_hidden, cfg.hidden_axes), scale(d_kernel, cfg.kernel_axes),
          scale(d_bias, cfg.bias_axes), None, None,
          scale(d_weights, cfg.weight_axes), scalars_ct)


_fused.defvjp(_fused_fwd, _fused_bwd, symbolic_zeros=True)
_fused_jit = jax.jit(_fused, static_argnums=0)


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
  for axis in _axis_tuple(axis_name):
    if axis not in _varying_axes(jax.lax.axis_index(axis)):
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
  cfg = _Config(
      teacher_kind=teacher_kind, divergence=divergence,
      beta=float(beta) if _is_static_number(beta) else None,
      alpha=float(alpha) if _is_static_number(alpha) else None,
      tail_bucket=bool(tail_bucket),
      scale=bool(scale_by_temperature) and teacher_kind != "labels"
      and divergence in _divergences._TEMPERATURE_SCALED,  # pylint: disable=protected-access
      axis_name=(tuple(axis_name) if isinstance(axis_name, list)
                 else axis_name), vocab_size=sharded_vocab_size,
      hidden_axes=_varying_axes(hidden), kernel_axes=_varying_axes(kernel),
      bias_axes=_varying_axes(bias))
  if axis_name is not None:
    _check_vma(axis_name)
  scalars = {"temperature": jnp.asarray(temperature, jnp.float32)}
  if cfg.beta is None:
    scalars["beta"] = jnp.asarray(beta, jnp.float32)
  if cfg.alpha is None:
    scalars["alpha"] = jnp.asarray(alpha, jnp.float32)
  cfg = dataclasses.replace(cfg, weight_axes=_varying_axes(weights),
                            scalar_axes=_varying_axes(scalars))
  args = (cfg, chunked(hidden), kernel, bias, teacher_chunks, teacher_consts,
          chunked(weights), scalars)
  if reduction == "none" or implementation != "fused":
    engine = _plain if implementation == "plain" else _checkpointed
    per = engine(*args).reshape(-1)[:num_tokens]
    if reduction == "none":
      return per.reshape(lead)
    total = jnp.sum(per)
  else:
    # Through jit: an eager shard_map cannot trace a custom_vjp with symbolic
    # zeros (jax 0.10); inside jit (the usual case) this is a no-op.
    total = _fused_jit(*args)
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
                           temperature=1.0,
                           *,
                           divergence: str = "kl",
                           beta=0.5,
                           alpha=0.1,
                           mask: Optional[chex.Array] = None,
                           reduction: str = "mean",
                           scale_by_temperature: bool = True,
                           vocab_size: Optional[int] = None,
                           chunk_size: Optional[int] = None,
                           memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
                           implementation: str = "fused",
                           axis_name=None) -> chex.Array:
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
                                 temperature=1.0,
                                 *,
                                 divergence: str = "kl",
                                 beta=0.5,
                                 alpha=0.1,
                                 tail_bucket: bool = True,
                                 mask: Optional[chex.Array] = None,
                                 reduction: str = "mean",
                                 scale_by_temperature: bool = True,
                                 vocab_size: Optional[int] = None,
                                 chunk_size: Optional[int] = None,
                                 memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES,
                                 implementation: str = "fused",
                                 axis_name=None) -> chex.Array:
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
                              axis_name=None) -> chex.Array:
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


def vocab_sharded_divergence_from_hidden(
    mesh: jax.sharding.Mesh,
    student_hidden: chex.Array,
    student_unembedding: Unembedding,
    teacher_hidden: Optional[chex.Array] = None,
    teacher_unembedding: Optional[Unembedding] = None,
    temperature=1.0,
    *,
    teacher_top_k: Optional[_divergences.TopKTeacher] = None,
    labels: Optional[chex.Array] = None,
    vocab_axis: str = "model",
    token_axis: Union[str, Sequence[str], None] = None,
    mask: Optional[chex.Array] = None,
    reduction: str = "mean",
    **kwargs) -> chex.Array:
  """:func:`divergence_from_hidden` with the vocabulary split over a mesh axis.

  Runs ``jax.shard_map`` over ``mesh``: the unembedding kernels
  ``[D, V]`` are split along ``V`` over ``vocab_axis`` (``P(None,
  vocab_axis)``; biases ``P(vocab_axis)``), the hidden states ``[B, ..., D]``
  (and mask, teacher top-k) along their first axis over ``token_axis`` (data
  parallelism; ``None``: replicated). Each device computes its chunks' logits
  for its slice of the vocabulary only; softmax statistics and per-position
  divergences are combined with ``pmax``/``psum`` over ``vocab_axis``, sums
  and token counts with ``psum`` over ``token_axis``. No ``[tokens, V]``
  array is ever all-gathered.

  Args:
    mesh: the device mesh.
    teacher_hidden, teacher_unembedding: a dense teacher; or
    teacher_top_k: a :class:`TopKTeacher` with global vocabulary indices; or
    labels: ``[B, ...]`` int targets: the student's cross-entropy
      (:func:`cross_entropy_from_hidden`; ``temperature`` and the divergence
      options are then unused). Checked as there (on the global array,
      before sharding): outside ``[0, V)`` raises ``ValueError`` eagerly when
      concrete, and under jit only under :func:`kdjax.losses.runtime_checks`.
    vocab_axis: mesh axis of the vocabulary; ``V`` must divide evenly (pad the
      vocabulary and pass ``vocab_size`` for the real size).
    token_axis: mesh axis (or axes) of the batch, or ``None``.
    mask: ``[B, ...]`` mask or weights.
    reduction: ``"mean"`` (over all unmasked tokens of all shards) or
      ``"sum"``.
    **kwargs: ``divergence``, ``beta``, ``alpha``, ``tail_bucket`` (top-k),
      ``scale_by_temperature``, ``vocab_size``, ``chunk_size``,
      ``memory_budget_bytes``, ``implementation`` (only the last four with
      ``labels``).

  Returns:
    The scalar loss (replicated).
  """
  P = jax.sharding.PartitionSpec
  if reduction not in ("mean", "sum"):
    raise ValueError(f"reduction must be 'mean' or 'sum' here, got "
                     f"{reduction!r}.")
  given = [name for name, x in (("teacher_hidden", teacher_hidden),
                                 ("teacher_top_k", teacher_top_k),
                                 ("labels", labels)) if x is not None]
  if len(given) != 1:
    raise ValueError("pass exactly one of teacher_hidden (with "
                     "teacher_unembedding), teacher_top_k or labels; got "
                     f"{given or 'none'}.")
  kind = {"teacher_hidden": "dense", "teacher_top_k": "top_k",
          "labels": "labels"}[given[0]]
  if kind == "dense" and teacher_unembedding is None:
    raise ValueError("teacher_hidden needs teacher_unembedding.")
  # Value checks run here, on the global arrays: inside shard_map the
  # temperature and labels are traced (and the vocabulary is a shard's).
  if kind == "labels":
    _utils.check_labels(
        labels, kwargs.get("vocab_size") or jnp.shape(student_unembedding[0])[-1],
        tuple(jnp.shape(student_hidden)[:-1]),
        "vocab_sharded_divergence_from_hidden")
  else:
    _utils.check_temperature(temperature)
  shards = mesh.shape[vocab_axis]
  kernels = [student_unembedding[0]]
  if kind == "dense":
    kernels.append(teacher_unembedding[0])
  for kernel in kernels:
    if jnp.shape(kernel)[-1] % shards:
      raise ValueError(
          f"the vocabulary ({jnp.shape(kernel)[-1]} columns) does not divide "
          f"over the {shards} devices of mesh axis {vocab_axis!r}; pad the "
          "unembedding to a multiple and pass vocab_size=<real size>.")
  if mask is None:
    mask = jnp.ones(jnp.shape(student_hidden)[:-1], jnp.float32)
  tok = P(token_axis)
  emb_spec = lambda e: Unembedding(P(None, vocab_axis),
                                   None if e[1] is None else P(vocab_axis))
  student_unembedding = Unembedding(*student_unembedding)
  in_specs = [tok, emb_spec(student_unembedding), tok]
  args = [student_hidden, student_unembedding, mask]
  if kind == "dense":
    teacher_unembedding = Unembedding(*teacher_unembedding)
    in_specs += [tok, emb_spec(teacher_unembedding)]
    args += [teacher_hidden, teacher_unembedding]
  elif kind == "labels":
    in_specs.append(tok)
    args.append(jnp.asarray(labels, jnp.int32))
  else:
    # The temperature check needs the stored (scalar) temperature: run it
    # here; the per-token arrays are split along the batch.
    _divergences.check_top_k_temperature(
        teacher_top_k, temperature, kwargs.get("tail_bucket", True))
    # Concrete indices outside the (real) vocabulary raise here, as unsharded.
    _divergences.check_top_k_shapes(
        teacher_top_k, tuple(jnp.shape(student_hidden)[:-1]),
        kwargs.get("vocab_size") or jnp.shape(student_unembedding[0])[-1])
    teacher_top_k = teacher_top_k._replace(temperature=None)
    in_specs.append(jax.tree.map(lambda _: tok, teacher_top_k))
    args.append(teacher_top_k)
  in_specs.append(P())
  args.append(jnp.asarray(temperature, jnp.float32))

  def local(*local_args):
    with _utils.runtime_checks(False):  # checked above, before shard_map
      return local_sums(*local_args)

  def local_sums(*local_args):
    h_s, emb_s, m = local_args[:3]
    t = local_args[-1]
    if kind == "dense":
      h_t, emb_t = local_args[3:5]
      total = divergence_from_hidden(h_s, emb_s, h_t, emb_t, t, mask=m,
                                     reduction="sum", axis_name=vocab_axis,
                                     **kwargs)
    elif kind == "labels":
      total = cross_entropy_from_hidden(h_s, emb_s, local_args[3], mask=m,
                                        reduction="sum", axis_name=vocab_axis,
                                        **kwargs)
    else:
      total = top_k_divergence_from_hidden(h_s, emb_s, local_args[3], t,
                                           mask=m, reduction="sum",
                                           axis_name=vocab_axis, **kwargs)
    count = jnp.sum(m.astype(jnp.float32))
    if token_axis is not None:
      total = jax.lax.psum(total, token_axis)
      count = jax.lax.psum(count, token_axis)
    return total, count

  if any(t == jax.sharding.AxisType.Explicit
         for t in getattr(mesh, "axis_types", ())):
    # Explicit-sharding meshes need the inputs laid out as the specs say.
    args = jax.tree.map(
        lambda x, spec: jax.reshard(x, jax.sharding.NamedSharding(mesh, spec)),
        args, in_specs, is_leaf=lambda x: isinstance(x, P))
  total, count = jax.shard_map(local, mesh=mesh, in_specs=tuple(in_specs),
                               out_specs=(P(), P()))(*args)
  if reduction == "sum":
    return total
  return total / jnp.maximum(count, 1.0)
