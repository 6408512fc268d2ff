"""Integer inference: int8 x int8 -> int32 matmuls and convolutions, rescaled to float.

A kernel stored per output channel ``n`` as ``W[..., n] ≈ q_w[..., n] s_w[n]``
(:func:`kdjax.compress.quantize_for_storage`) meets an input ``x`` that is
quantised dynamically, one scale per example ``b`` (``a`` activation bits,
``qmax_a = 2^(a-1) - 1``)::

  s_x[b]      = max |x[b, ...]| / qmax_a                 (1 where x[b] = 0)
  q_x         = clip(round(x / s_x[b]), -qmax_a, qmax_a)  int8
  acc[b,.,n]  = Σ_k q_x[b,.,k] q_w[k,n]                   int32 (exact)
  y[b,.,n]    = s_x[b] s_w[n] acc[b,.,n] + bias[n]        float32

Since ``Σ_k (s_x q_x)(s_w q_w) = s_x s_w Σ_k q_x q_w``, ``y`` is the
fake-quantised forward of training (:func:`kdjax.compress.quantize_apply`)
up to float rounding, computed without a float copy of the kernel. The int32
sum is exact while ``K qmax_a qmax_w < 2^31`` (``K < 133,144`` for w8a8).

Convolutions (``nn.Conv``: NHWC, kernel ``[k_1..k_d, C, N]``) run either
directly, ``lax.conv_general_dilated(q_x, q_w, ...,
preferred_element_type=int32)``, or as im2col + the same integer dot: with
the input zero-padded (``0`` quantises to ``0`` exactly), stride ``t`` and
kernel dilation ``r``::

  P[b, o, (j, c)] = q_x[b, o t + j r, c]       (j over the kernel window)
  acc[b, o, n]    = Σ_(j,c) P[b, o, (j, c)] q_w[j, c, n]

``conv="auto"`` (the default) picks ``direct`` when ``C >= 32`` or
``N >= 32`` and im2col otherwise: XLA:CPU (jax 0.10) hands an s8
convolution to its YNNPACK library only for such channel counts and runs
the others as a converted s32 loop (several times slower than float32),
while an s8 ``dot`` always goes to YNNPACK; but the im2col copy costs more
than it saves where the direct path is available (a 3x3, 32 -> 64 conv on
14x14 at batch 256, one thread: direct 13 ms, im2col 22 ms, float32 16 ms).

:func:`find_integer_layers` finds, by tracing shapes only, the linen
``Dense`` / ``Conv`` calls this covers; :func:`integer_interceptor` replaces
their ``__call__`` in the exported forward (every other layer runs as
before; other ``Dense`` / ``Conv`` calls dequantise their kernel and
fake-quantise their input).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax import lax

from kdjax.compress import _quant

CONV_IMPLS = ("auto", "im2col", "direct")
# XLA:CPU (jax 0.10) runs an s8 convolution in YNNPACK when C or N >= this.
DIRECT_CONV_MIN_CHANNELS = 32


def quantize_activation(x: chex.Array, bits: int
                        ) -> tuple[chex.Array, chex.Array]:
  """``(q_x int8, s_x float32 [B, 1, ...])``: per-example dynamic quantisation.

  ``s_x[b] = max|x[b]| / qmax``, ``q_x = clip(round(x / s_x), ±qmax)``: the
  same values as ``fake_quant(x, bits, channel_axis=0)`` (``= q_x s_x``).
  """
  return _quant.quantize_to_int(x, bits, channel_axis=0)


def _rescale(acc, s_x, s_w, bias, dtype):
  """``s_x s_w acc + bias`` in float32, cast to ``dtype``."""
  y = acc.astype(jnp.float32) * (s_x * jnp.reshape(s_w, (-1,)))
  if bias is not None:
    y = y + jnp.asarray(bias, jnp.float32)
  return y.astype(dtype)


def int8_dense(x: chex.Array, q_w: chex.Array, s_w: chex.Array,
               bias: Optional[chex.Array] = None, *, act_bits: int = 8,
               dtype: Any = jnp.float32) -> chex.Array:
  """``y = s_x s_w (q_x · q_w) + bias`` with an s8 x s8 -> s32 ``dot_general``.

  Args:
    x: float ``[B, ..., K]`` (quantised here, one scale per example).
    q_w: int8 ``[K, N]``; ``s_w``: float32 broadcastable to ``[N]``.
    bias: ``[N]`` or None.
    act_bits: activation bits (8 or 4).
    dtype: the output dtype.

  Returns:
    ``[B, ..., N]``.
  """
  q_x, s_x = quantize_activation(x, act_bits)
  acc = lax.dot_general(q_x, q_w, (((q_x.ndim - 1,), (0,)), ((), ())),
                        preferred_element_type=jnp.int32)
  return _rescale(acc, s_x, s_w, bias, dtype)


def _im2col(q_x, window, strides, dilation, padding):
  """``[B, *S, C]`` -> patches ``[B, *O, prod(window) C]``, (window, c) order."""
  spatial = q_x.shape[1:-1]
  dilated = [(k - 1) * r + 1 for k, r in zip(window, dilation)]
  if isinstance(padding, str):
    pads = lax.padtype_to_pads(spatial, dilated, strides, padding)
  else:
    pads = [tuple(p) for p in padding]
  q_x = jnp.pad(q_x, [(0, 0), *pads, (0, 0)])
  padded = q_x.shape[1:-1]
  out = [(p - d) // t + 1 for p, d, t in zip(padded, dilated, strides)]
  cols = []
  for offset in np.ndindex(*window):
    start = [0] + [j * r for j, r in zip(offset, dilation)] + [0]
    limit = ([q_x.shape[0]]
             + [s + (o - 1) * t + 1 for s, o, t in zip(start[1:-1], out,
                                                         strides)]
             + [q_x.shape[-1]])
    cols.append(lax.slice(q_x, start, limit, [1, *strides, 1]))
  return jnp.concatenate(cols, axis=-1) if len(cols) > 1 else cols[0]


def int8_conv(x: chex.Array, q_w: chex.Array, s_w: chex.Array,
              bias: Optional[chex.Array] = None, *,
              strides: Sequence[int], padding: Any,
              kernel_dilation: Sequence[int], act_bits: int = 8,
              impl: str = "auto", dtype: Any = jnp.float32) -> chex.Array:
  """Channels-last convolution ``y = s_x s_w (q_x * q_w) + bias`` in int32.

  Args:
    x: float ``[B, *spatial, C]``.
    q_w: int8 ``[*window, C, N]``; ``s_w`` float32 broadcastable to ``[N]``.
    bias: ``[N]`` or None.
    strides, padding, kernel_dilation: as ``lax.conv_general_dilated``
      (padding ``"SAME"``, ``"VALID"`` or ``(low, high)`` pairs).
    act_bits: activation bits.
    impl: ``"im2col"`` (patches, then an s8 ``dot_general``),
      ``"direct"`` (``conv_general_dilated`` with s32 accumulation) or
      ``"auto"``: direct when ``C`` or ``N >= DIRECT_CONV_MIN_CHANNELS``.
    dtype: the output dtype.
  """
  if impl not in CONV_IMPLS:
    raise ValueError(f"impl must be one of {CONV_IMPLS}, got {impl!r}.")
  q_x, s_x = quantize_activation(x, act_bits)
  window = q_w.shape[:-2]
  if impl == "auto":
    impl = "direct" if max(q_w.shape[-2:]) >= DIRECT_CONV_MIN_CHANNELS else (
        "im2col")
  if impl == "direct":
    d = len(window)
    spec = "N" + "HWDXYZ"[:d] + "C"
    acc = lax.conv_general_dilated(
        q_x, q_w, tuple(strides), padding, rhs_dilation=tuple(kernel_dilation),
        dimension_numbers=(spec, spec[1:-1] + "IO", spec),
        preferred_element_type=jnp.int32)
  else:
    patches = _im2col(q_x, window, tuple(strides), tuple(kernel_dilation),
                      padding)
    w2 = jnp.reshape(q_w, (-1, q_w.shape[-1]))
    acc = lax.dot_general(patches, w2, (((patches.ndim - 1,), (0,)), ((), ())),
                          preferred_element_type=jnp.int32)
  return _rescale(acc, s_x, s_w, bias, dtype)


def _tuple(v, n):
  if v is None:
    return (1,) * n
  if isinstance(v, int):
    return (v,) * n
  return tuple(v)


def _conv_geometry(m: nn.Conv):
  ks = (m.kernel_size,) if isinstance(m.kernel_size, int) else tuple(
      m.kernel_size)
  n = len(ks)
  padding = nn.linear.canonicalize_padding(m.padding, n)
  return ks, _tuple(m.strides, n), _tuple(m.kernel_dilation, n), padding


def _input_of(args, kwargs):
  if args:
    return args[0]
  return kwargs.get("inputs")


def _why_not(m: nn.Module, x: Any, stored: Mapping,
             min_depth: int = 1) -> Optional[str]:
  """Why the call ``m(x)`` should not run in integers (None if it should)."""
  if type(m) not in (nn.Dense, nn.Conv):  # subclasses may change __call__
    return f"type {type(m).__name__}"
  if x is None or not hasattr(x, "ndim") or x.ndim < 2:
    return "no batched input"
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return "non-float input"
  node = stored
  for name in m.path:
    if not isinstance(node, Mapping) or name not in node:
      return "kernel not found at the module path"
    node = node[name]
  q = node.get("kernel") if isinstance(node, Mapping) else None
  if not (isinstance(q, Mapping) and set(q) == {"q", "scale"}):
    return "kernel not quantised"
  if not m.has_variable("params", "kernel") or (
      tuple(m.get_variable("params", "kernel").shape) != tuple(q["q"].shape)):
    return "kernel shape differs (lifted transform?)"
  depth = int(np.prod(q["q"].shape[:-1]))
  if depth < min_depth:
    return f"contraction depth {depth} < {min_depth}"
  if isinstance(m, nn.Dense):
    if m.dot_general is not None or m.dot_general_cls is not None:
      return "custom dot_general"
    return None
  if (m.conv_general_dilated is not None or m.conv_general_dilated_cls
      is not None or m.mask is not None or m.feature_group_count != 1):
    return "custom conv, mask or feature groups"
  ks, _, _, padding = _conv_geometry(m)
  if _tuple(m.input_dilation, len(ks)) != (1,) * len(ks):
    return "input dilation"
  if isinstance(padding, str) and padding not in ("SAME", "VALID"):
    return f"padding {padding}"
  if x.ndim != len(ks) + 2:
    return "not exactly one batch dimension"
  return None


def find_integer_layers(apply: Callable[..., Any], variables: Any,
                        stored_params: Any, x_spec: jax.ShapeDtypeStruct,
                        input_key: str, *, min_depth: int = 1
                        ) -> tuple[list, dict]:
  """``(paths run in integers, {path: reason} for the Dense / Conv calls left float)``.

  Traces ``apply(variables, {input_key: x}, train=False)`` with
  ``jax.eval_shape`` (no compute) and checks every linen ``Dense`` /
  ``Conv`` call: exact type, a quantised kernel in ``stored_params`` at the
  module's path with the shape the module reads, a float batched input, and
  for convolutions one batch dimension, no input dilation, no feature groups,
  and SAME / VALID / explicit padding; and a contraction depth ``K`` (Dense:
  input features; Conv: window size x input channels) of at least
  ``min_depth``. A path called several times must pass every time.
  """
  ok, bad = [], {}

  def record(next_fun, args, kwargs, context):
    m = context.module
    if context.method_name == "__call__" and isinstance(m, (nn.Dense,
                                                            nn.Conv)):
      path = tuple(m.path)
      why = _why_not(m, _input_of(args, kwargs), stored_params, min_depth)
      if why is not None:
        bad[path] = why
      elif path not in ok:
        ok.append(path)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    jax.eval_shape(lambda v, x: apply(v, {input_key: x}, train=False),
                   variables, x_spec)
  return [p for p in ok if p not in bad], bad


def integer_interceptor(kernels: Mapping[tuple, tuple[chex.Array, chex.Array]],
                        act_bits: int, *, conv: str = "auto"):
  """A ``flax.linen.intercept_methods`` interceptor for the exported forward.

  Modules whose path is in ``kernels`` (``path -> (q_w int8, s_w)``) run
  :func:`int8_dense` / :func:`int8_conv` (their float kernel is never read);
  any other ``Dense`` / ``Conv`` gets its input fake-quantised per example
  (as :func:`kdjax.compress.quantize_apply`) and runs as written.
  """
  if conv not in CONV_IMPLS:
    raise ValueError(f"conv must be one of {CONV_IMPLS}, got {conv!r}.")
  fake_quant_inputs = _quant._activation_interceptor(  # pylint: disable=protected-access
      act_bits, (nn.Dense, nn.Conv))

  def interceptor(next_fun, args, kwargs, context):
    m = context.module
    if context.method_name != "__call__" or not isinstance(m, (nn.Dense,
                                                               nn.Conv)):
      return next_fun(*args, **kwargs)
    x = _input_of(args, kwargs)
    path = tuple(m.path)
    if path not in kernels:
      return fake_quant_inputs(next_fun, args, kwargs, context)
    q_w, s_w = kernels[path]
    bias = m.get_variable("params", "bias") if m.use_bias else None
    dtype = m.dtype or jnp.result_type(x.dtype, m.param_dtype)
    if isinstance(m, nn.Dense):
      return int8_dense(x, q_w, s_w, bias, act_bits=act_bits, dtype=dtype)
    _, strides, dilation, padding = _conv_geometry(m)
    return int8_conv(x, q_w, s_w, bias, strides=strides, padding=padding,
                     kernel_dilation=dilation, act_bits=act_bits, impl=conv,
                     dtype=dtype)

  return interceptor
