"""Fake quantisation with a straight-through estimator, for quantisation-aware distillation.

Symmetric uniform quantisation with ``b`` bits (Jacob et al., "Quantization
and Training of Neural Networks for Efficient Integer-Arithmetic-Only
Inference", CVPR 2018)::

  qmax  = 2^(b-1) - 1                       (127 for int8, 7 for int4)
  c     = clip value (default: max |x| over the reduced axes, per channel)
  s     = c / qmax
  q(x)  = s * clip(round(x / s), -qmax, qmax)     (round half to even)

Training sees ``q(x)`` in the forward pass; the backward pass is the clipped
straight-through estimator (Bengio et al. 2013; Hubara et al. 2016):
``dq/dx = 1`` for ``|x| <= c`` and ``0`` outside (written as
``clip(x) + stop_gradient(q(x) - clip(x))``; the scale is a
``stop_gradient`` constant). With the default absmax clip value nothing lies
outside the range.

:func:`quantize_apply` wraps any apply function: its ``params`` kernels (every
floating leaf with ``ndim >= 2``) are fake-quantised per output channel (the
last axis), and with ``act_bits`` the inputs of every linen ``nn.Dense`` /
``nn.Conv`` are fake-quantised per example (dynamic range: one scale per
index of the batch axis, via ``flax.linen.intercept_methods``). The ordinary ``kdjax.train`` step then
distils the quantised student from a float teacher (QAT); evaluating a float
student through the same wrapper is post-training quantisation (PTQ).
:func:`qwix_quantize_module` does the same with Google's Qwix (optional extra).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Optional, Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_BITS = (4, 8)


def check_bits(bits: int, what: str = "bits") -> int:
  """Returns ``bits`` if supported (4 or 8), else raises ``ValueError``."""
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or (
      int(bits) not in SUPPORTED_BITS):
    raise ValueError(f"{what}={bits!r} is not a supported bit width; "
                     f"supported: {list(SUPPORTED_BITS)} (symmetric int8 / "
                     "int4).")
  return int(bits)


def qmax(bits: int) -> int:
  """``2^(bits-1) - 1``: the largest quantised magnitude (127, 7)."""
  return 2 ** (check_bits(bits) - 1) - 1


def _reduce_axes(ndim: int, channel_axis: Optional[int]) -> tuple:
  if channel_axis is None:
    return tuple(range(ndim))
  axis = channel_axis % ndim
  return tuple(a for a in range(ndim) if a != axis)


def quant_scale(x: chex.Array, bits: int, *,
                channel_axis: Optional[int] = None,
                clip: Optional[chex.Array] = None) -> chex.Array:
  """The step ``s = c / qmax`` (``c`` = max |x| per channel unless ``clip``).

  Shapes: ``x`` any; the result broadcasts against ``x`` (size 1 on the
  reduced axes; per tensor when ``channel_axis`` is None). A zero channel
  gets ``s = 1`` (its values quantise to 0 exactly).
  """
  x = jnp.asarray(x, jnp.float32)
  if clip is None:
    c = jnp.max(jnp.abs(x), axis=_reduce_axes(x.ndim, channel_axis),
                keepdims=True)
  else:
    c = jnp.broadcast_to(jnp.asarray(clip, jnp.float32),
                         jnp.max(x, axis=_reduce_axes(x.ndim, channel_axis),
                                 keepdims=True).shape)
  s = c / qmax(bits)
  return jax.lax.stop_gradient(jnp.where(s > 0, s, 1.0))


def quantize_to_int(x: chex.Array, bits: int, *,
                    channel_axis: Optional[int] = None,
                    clip: Optional[chex.Array] = None
                    ) -> tuple[chex.Array, chex.Array]:
  """``(round(clip(x)/s) as int8, s float32)``: the stored integer form.

  ``x ≈ values * scale``; int4 values lie in ``[-7, 7]`` and are stored in an
  int8 container (no nibble packing).
  """
  x = jnp.asarray(x, jnp.float32)
  s = quant_scale(x, bits, channel_axis=channel_axis, clip=clip)
  m = qmax(bits)
  q = jnp.clip(jnp.round(x / s), -m, m)
  return q.astype(jnp.int8), s


def fake_quant(x: chex.Array, bits: int, *,
               channel_axis: Optional[int] = None,
               clip: Optional[chex.Array] = None) -> chex.Array:
  """``s * clip(round(x / s), -qmax, qmax)`` with a clipped straight-through gradient.

  Args:
    x: any shape; computed in float32, returned in ``x`` 's dtype.
    bits: 8 or 4 (symmetric: int8 levels ``[-127, 127]``, int4 ``[-7, 7]``).
    channel_axis: one scale per index of this axis (per-channel weights: the
      output axis, ``-1`` for linen kernels); ``None``: one scale per tensor.
    clip: the clip value ``c`` (scalar or broadcastable per channel); default
      ``max |x|`` (absmax calibration).

  Returns:
    The fake-quantised ``x`` (same shape and dtype). Gradient: 1 where
    ``|x| <= c``, 0 elsewhere.
  """
  dtype = jnp.asarray(x).dtype
  xf = jnp.asarray(x, jnp.float32)
  s = quant_scale(xf, bits, channel_axis=channel_axis, clip=clip)
  m = qmax(bits)
  q = jax.lax.stop_gradient(jnp.clip(jnp.round(xf / s), -m, m) * s)
  # Clipped straight-through estimator: identity inside [-c, c], c = s qmax
  # (with 1e-6 relative slack, so that the absmax element itself is inside
  # whatever the float rounding of c / qmax * qmax).
  inside = jax.lax.stop_gradient(jnp.abs(xf) <= s * m * (1 + 1e-6))
  out = jnp.where(inside, xf + jax.lax.stop_gradient(q - xf), q)
  return out.astype(dtype)


def _is_kernel(leaf) -> bool:
  return (hasattr(leaf, "ndim") and leaf.ndim >= 2
          and jnp.issubdtype(leaf.dtype, jnp.floating))


def fake_quant_params(params: Any, bits: int) -> Any:
  """Fake-quantises every floating leaf with ``ndim >= 2`` (kernels) per output channel.

  Linen ``Dense`` kernels ``[in, out]`` and ``Conv`` kernels
  ``[kh, kw, in, out]`` get one scale per output channel (last axis); biases
  and other 0/1-D leaves stay float (they are added in int32/float at
  inference, as in Jacob et al. 2018).
  """
  check_bits(bits)
  return jax.tree.map(
      lambda p: fake_quant(p, bits, channel_axis=-1) if _is_kernel(p) else p,
      params)


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """Which tensors to fake-quantise.

  Attributes:
    weight_bits: 8 or 4: kernels, symmetric per output channel.
    act_bits: 8, 4 or ``None``: inputs of linen Dense/Conv layers, symmetric,
      dynamic range (absmax of each example: one scale per batch index).
  """
  weight_bits: int = 8
  act_bits: Optional[int] = 8

  def __post_init__(self):
    check_bits(self.weight_bits, "weight_bits")
    if self.act_bits is not None:
      check_bits(self.act_bits, "act_bits")

  @classmethod
  def parse(cls, name: str) -> "QuantConfig":
    """``"w8a8"``, ``"w8"``, ``"w4"``, ``"w4a8"``, ``"int8"`` (= w8a8), ``"int4"`` (= w4)."""
    aliases = {"int8": "w8a8", "int4": "w4"}
    text = aliases.get(name, name)
    try:
      if not text.startswith("w"):
        raise ValueError
      w, _, a = text[1:].partition("a")
      return cls(int(w), int(a) if a else None)
    except ValueError as e:
      if "bit width" in str(e):
        raise
      raise ValueError(f"quantisation {name!r} not understood; use w8a8, w8, "
                       "w4, w4a8, int8 or int4.") from None

  @property
  def name(self) -> str:
    return f"w{self.weight_bits}" + (f"a{self.act_bits}" if self.act_bits else "")


def _activation_interceptor(bits: int, module_types: tuple):
  def interceptor(next_fun, args, kwargs, context):
    if (context.method_name == "__call__" and isinstance(context.module,
                                                         module_types)):
      # One scale per example (axis 0): an example's output does not depend
      # on the rest of its batch. Dense / Conv take ``inputs`` positionally
      # or by keyword.
      if args:
        args = (fake_quant(args[0], bits, channel_axis=0),) + tuple(args[1:])
      elif "inputs" in kwargs:
        kwargs = {**kwargs,
                  "inputs": fake_quant(kwargs["inputs"], bits, channel_axis=0)}
    return next_fun(*args, **kwargs)
  return interceptor


def quantize_apply(apply: Callable[..., Any],
                   config: QuantConfig = QuantConfig(),
                   *,
                   module_types: Optional[Sequence[type]] = None,
                   quantize_weights: bool = True) -> Callable[..., Any]:
  """Wraps an apply function so that it runs fake-quantised (QAT / PTQ).

  ``apply_q(variables, batch, ...) = apply({**variables, "params":
  fake_quant_params(params, w)}, batch, ...)`` with, when
  ``config.act_bits`` is set, the input ``x`` of every linen ``Dense`` /
  ``Conv`` replaced by ``fake_quant(x, act_bits, channel_axis=0)`` (one
  scale per example). The float
  params stay the trainable master weights; gradients flow through the
  straight-through estimator. Activation quantisation reaches linen modules
  only (``kdjax.models.from_linen``); other apply functions get weights only.

  Args:
    apply: ``apply(variables, batch, *, train=False, rng=None) -> ModelOutput``.
    config: the bit widths.
    module_types: linen module classes whose inputs are quantised (default
      ``(nn.Dense, nn.Conv)``).
    quantize_weights: ``False``: activations only (the params are already
      quantised, e.g. dequantised int8 in an export).

  Returns:
    An apply function with the same signature.
  """
  if not isinstance(config, QuantConfig):
    raise TypeError(f"config must be a QuantConfig, got {type(config).__name__}.")
  from flax import linen as nn  # pylint: disable=g-import-not-at-top
  types = tuple(module_types or (nn.Dense, nn.Conv))

  def apply_q(variables, batch, *, train: bool = False, rng=None):
    if not isinstance(variables, Mapping) or "params" not in variables:
      raise TypeError("variables must be {'params': ..., ...}.")
    if quantize_weights:
      variables = {**variables,
                   "params": fake_quant_params(variables["params"],
                                               config.weight_bits)}
    if config.act_bits is None:
      return apply(variables, batch, train=train, rng=rng)
    with nn.intercept_methods(_activation_interceptor(config.act_bits, types)):
      return apply(variables, batch, train=train, rng=rng)

  apply_q.kdjax_quant_config = config
  return apply_q


def qwix_quantize_module(module: Any, config: QuantConfig = QuantConfig(),
                         *, module_path: str = ".*") -> Any:
  """The linen ``module`` quantised for training by Qwix (``qwix.QtProvider``).

  Same params as ``module`` (pass the result to ``kdjax.models.from_linen``);
  Qwix quantises Dense/Conv/einsum weights per channel and, with
  ``act_bits``, their inputs (dynamic range), with its own straight-through
  gradients. Needs ``pip install qwix`` (the ``quant`` extra).
  """
  try:
    import qwix  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("qwix_quantize_module needs Qwix: pip install qwix "
                      "(or the kdjax 'quant' extra).") from e
  rule = qwix.QtRule(module_path=module_path,
                     weight_qtype=f"int{config.weight_bits}",
                     act_qtype=(f"int{config.act_bits}" if config.act_bits
                                else None))
  return qwix.quantize_model(module, qwix.QtProvider([rule]))
