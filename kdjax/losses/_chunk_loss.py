"""The loss of one chunk of tokens over a (possibly sharded) vocabulary.

The building blocks of :mod:`kdjax.losses._large_vocab` (the engines of
:mod:`kdjax.losses._chunk_engines` call them once per chunk): a static
:class:`ChunkConfig` describing the loss, the float32 logits of a chunk
``z = h @ W + b`` (``[C, D] @ [D, V]``), the temperature log-softmax over
the whole vocabulary (with ``axis_name``, inside ``jax.shard_map``, from
per-shard statistics: ``pmax`` of the max, ``psum`` of the sum of
exponentials), gathers at global vocabulary indices, and the ``[C]``
per-position divergence / top-k divergence / label cross-entropy. Also the
helpers for the mesh axes (inside ``shard_map``) that values vary over.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

import chex
import jax
import jax.numpy as jnp

from kdjax.losses import _divergences

# A logit that stands for "no such token" (padded vocabulary columns when
# sharded): finite, so no inf - inf, and exp() of it is exactly 0.
MASKED_LOGIT = -1e30


@dataclasses.dataclass(frozen=True)
class ChunkConfig:
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


def matmul_logits(hidden: chex.Array, kernel: chex.Array,
                  bias: Optional[chex.Array]) -> chex.Array:
  """``hidden @ kernel + bias`` accumulated and returned in float32."""
  z = jax.lax.dot_general(hidden, kernel, (((hidden.ndim - 1,), (0,)), ((), ())),
                          preferred_element_type=jnp.float32)
  if bias is not None:
    z = z + bias.astype(jnp.float32)
  return z


def column_offset(cfg: ChunkConfig, local_columns: int) -> chex.Array:
  if cfg.axis_name is None:
    return jnp.zeros((), jnp.int32)
  return jax.lax.axis_index(cfg.axis_name) * local_columns


def log_softmax(cfg: ChunkConfig, z: chex.Array, temperature: chex.Array,
                offset: chex.Array) -> chex.Array:
  """``log softmax(z / T)`` over the whole (possibly sharded) vocabulary."""
  z = z / temperature
  if cfg.vocab_size is not None:
    columns = offset + jnp.arange(z.shape[-1])
    z = jnp.where(columns < cfg.vocab_size, z, MASKED_LOGIT)
  if cfg.axis_name is None:
    return jax.nn.log_softmax(z, axis=-1)
  # The max only stabilises the exponentials; its gradient cancels exactly.
  m = jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
  m = jax.lax.stop_gradient(jax.lax.pmax(m, cfg.axis_name))
  s = jax.lax.psum(jnp.sum(jnp.exp(z - m), axis=-1, keepdims=True),
                   cfg.axis_name)
  return z - m - jnp.log(s)


def gather_columns(cfg: ChunkConfig, log_q: chex.Array, indices: chex.Array,
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


def teacher_logits(cfg: ChunkConfig, teacher_chunk, teacher_consts):
  """The teacher's chunk logits (dense teacher) or its cached chunk as is."""
  if cfg.teacher_kind != "dense":
    return teacher_chunk
  kernel, bias = teacher_consts
  return matmul_logits(teacher_chunk, kernel, bias)


def teacher_log_probs(cfg: ChunkConfig, teacher, scalars, offset):
  """What :func:`per_position` needs from the teacher at this temperature."""
  if cfg.teacher_kind != "dense":
    return teacher
  return log_softmax(cfg, teacher, scalars["temperature"], offset)


def teacher_side(cfg: ChunkConfig, teacher_chunk, teacher_consts, scalars,
                 offset):
  """What the per-chunk loss needs from the teacher (no gradient)."""
  return teacher_log_probs(
      cfg, teacher_logits(cfg, teacher_chunk, teacher_consts), scalars,
      offset)


def per_position(cfg: ChunkConfig, z_s: chex.Array, teacher, scalars,
                 offset) -> chex.Array:
  """The ``[C]`` per-position loss of one chunk of student logits ``[C, V]``."""
  t = scalars["temperature"]
  beta = scalars["beta"] if cfg.beta is None else cfg.beta
  alpha = scalars["alpha"] if cfg.alpha is None else cfg.alpha
  log_q = log_softmax(cfg, z_s, t, offset)
  if cfg.teacher_kind == "labels":
    picked = gather_columns(cfg, log_q, teacher[:, None], offset)
    return -picked[:, 0]
  if cfg.teacher_kind == "top_k":
    values, indices, logsumexp = teacher
    picked = gather_columns(cfg, log_q, indices, offset)
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


def weighted(per: chex.Array, weights: chex.Array) -> chex.Array:
  # where(), not a product: a padded or masked position's value never leaks.
  return jnp.where(weights > 0, per * weights, 0.0)


# -----------------------------------------------------------------------------
# Mesh axes (inside shard_map) that values vary over.
# -----------------------------------------------------------------------------


def axis_tuple(axis_name) -> tuple:
  if axis_name is None:
    return ()
  return tuple(axis_name) if isinstance(axis_name, (tuple, list)) else (
      axis_name,)


def varying_axes(tree) -> frozenset:
  """Mesh axes (inside ``shard_map``) that any leaf of ``tree`` varies over."""
  axes = set()
  for leaf in jax.tree.leaves(tree):
    manual = getattr(jax.typeof(leaf), "manual_axis_type", None)
    axes |= set(getattr(manual, "varying", ()) or ())
  return frozenset(axes)


def vary(x: chex.Array, axes: frozenset) -> chex.Array:
  """Marks ``x`` as varying over ``axes`` (no-op outside ``shard_map``)."""
  missing = tuple(sorted(axes - varying_axes(x)))
  return jax.lax.pcast(x, missing, to="varying") if missing else x
