"""The engines of the chunked losses from hidden states.

Each takes the chunked inputs of :mod:`kdjax.losses._large_vocab` (hidden
states ``[n, C, D]``, teacher chunks ``[n, C, ...]``, weights ``[n, C]``; the
kernel and bias whole, or the local shards of a sharded vocabulary) and the
per-chunk loss of :mod:`kdjax.losses._chunk_loss`:

* :func:`plain`: full ``[n C, V]`` logits at once (the reference);
* :func:`checkpointed`: ``lax.scan`` over a ``jax.checkpoint``-ed chunk loss
  (the backward pass recomputes both chunk matmuls);
* :func:`fused`: a ``jax.custom_vjp`` whose forward pass computes each
  chunk's loss and its gradient w.r.t. the hidden states, kernel and bias
  (and, only when asked for, the traced scalars and the weights), so that no
  matmul runs twice. See the module docstring of
  :mod:`kdjax.losses._large_vocab` for the memory and time of each.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp

from kdjax.losses._chunk_loss import axis_tuple
from kdjax.losses._chunk_loss import column_offset
from kdjax.losses._chunk_loss import matmul_logits
from kdjax.losses._chunk_loss import per_position
from kdjax.losses._chunk_loss import teacher_log_probs
from kdjax.losses._chunk_loss import teacher_logits
from kdjax.losses._chunk_loss import teacher_side
from kdjax.losses._chunk_loss import vary
from kdjax.losses._chunk_loss import varying_axes
from kdjax.losses._chunk_loss import weighted

IMPLEMENTATIONS = ("fused", "checkpointed", "plain")


def plain(cfg, hidden, kernel, bias, teacher_chunks, teacher_consts, weights,
          scalars):
  """Full logits at once: per-position values ``[n, C]``."""
  n, c = weights.shape
  flat = lambda x: x.reshape((n * c,) + x.shape[2:])
  offset = column_offset(cfg, kernel.shape[-1])
  z_s = matmul_logits(flat(hidden), kernel, bias)
  teacher = teacher_side(cfg, jax.tree.map(flat, teacher_chunks),
                         teacher_consts, scalars, offset)
  per = per_position(cfg, z_s, teacher, scalars, offset)
  return weighted(per, flat(weights)).reshape(n, c)


def checkpointed(cfg, hidden, kernel, bias, teacher_chunks, teacher_consts,
                 weights, scalars):
  """Scan over chunks of a rematerialised chunk loss: values ``[n, C]``."""
  offset = column_offset(cfg, kernel.shape[-1])

  @jax.checkpoint
  def chunk_loss(h, teacher_chunk, w):
    z_s = matmul_logits(h, kernel, bias)
    teacher = teacher_side(cfg, teacher_chunk, teacher_consts, scalars,
                           offset)
    return weighted(per_position(cfg, z_s, teacher, scalars, offset), w)

  def body(carry, xs):
    return carry, chunk_loss(*xs)

  _, per = jax.lax.scan(body, None, (hidden, teacher_chunks, weights))
  return per


def _fused_forward(cfg, hidden, kernel, bias, teacher_chunks, teacher_consts,
                   weights, scalars, *, scalar_grads: bool = False,
                   weight_grads: bool = False):
  """Loss sum and its gradients w.r.t. hidden, kernel and bias, in one pass.

  With ``scalar_grads`` also the gradient w.r.t. the traced temperature /
  beta / alpha (the teacher's softmax is then differentiated too), with
  ``weight_grads`` the per-position values (the gradient w.r.t. the weights).
  """
  offset = column_offset(cfg, kernel.shape[-1])
  compute_dtype = jnp.result_type(hidden.dtype, kernel.dtype)
  # Inside shard_map, scan carries must start with the mesh axes their
  # updates vary over: the loss with those of every input except the
  # (psum-ed) vocabulary axis, the gradient accumulators with all of them.
  everything = varying_axes((hidden, kernel, bias, teacher_chunks,
                              teacher_consts, weights, scalars))
  vocab_axes = frozenset(axis_tuple(cfg.axis_name))
  total0 = vary(jnp.zeros((), jnp.float32), everything - vocab_axes)
  d_kernel0 = vary(jnp.zeros(kernel.shape, jnp.float32), everything)
  d_bias0 = None if bias is None else vary(
      jnp.zeros(bias.shape, jnp.float32), everything)
  d_scalars0 = None
  if scalar_grads:
    d_scalars0 = {k: vary(jnp.zeros((), jnp.float32), everything - vocab_axes)
                  for k in scalars}

  def body(carry, xs):
    total, d_kernel, d_bias, d_scalars = carry
    h, teacher_chunk, w = xs
    z_s = matmul_logits(h, kernel, bias)
    z_t = teacher_logits(cfg, teacher_chunk, teacher_consts)

    def chunk_sum(z, sc):
      per = per_position(cfg, z, teacher_log_probs(cfg, z_t, sc, offset), sc,
                         offset)
      return jnp.sum(weighted(per, w)), per

    if scalar_grads:
      value, pullback, per = jax.vjp(chunk_sum, z_s, scalars, has_aux=True)
      g, d_sc = pullback(jnp.ones_like(value))
      d_scalars = jax.tree.map(jnp.add, d_scalars, d_sc)
    else:
      teacher = teacher_log_probs(cfg, z_t, scalars, offset)

      def chunk_sum_z(z):
        per = per_position(cfg, z, teacher, scalars, offset)
        return jnp.sum(weighted(per, w)), per

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
    # d(sum_n w_n per_n)/dw_n = per_n where w_n > 0 (the weighted rule).
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
  extra = tuple(sorted(varying_axes(cotangent) - primal_axes))
  return jax.lax.psum(cotangent, extra) if extra else cotangent


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused(cfg, hidden, kernel, bias, teacher_chunks, teacher_consts, weights,
           scalars):
  """Weighted loss sum (scalar) with a gradient computed in the forward pass.

  Undifferentiated calls (evaluation) compute the loss alone, chunk by chunk.
  """
  return jnp.sum(checkpointed(cfg, hidden, kernel, bias, teacher_chunks,
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
# The fused engine's entry point, through jit: an eager shard_map cannot trace
# a custom_vjp with symbolic zeros (jax 0.10); inside jit (the usual case) this
# is a no-op.
fused = jax.jit(_fused, static_argnums=0)
