"""Shared validation, masking and reduction helpers of the loss library.

These helpers are private: every public loss documents its own arguments. They are
jit/grad/vmap-safe; validation that needs a concrete value (``temperature > 0``)
runs only when the value is concrete (a Python number or a non-traced array) and
is skipped for traced values (e.g. a temperature that follows a schedule inside
``jax.jit``), where it cannot raise.
"""

from __future__ import annotations

from typing import Optional, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np

Scalar = Union[float, chex.Array]

REDUCTIONS = ("mean", "sum", "none")


def _concrete_value(x) -> Optional[np.ndarray]:
  """Returns ``x`` as a NumPy array when it is concrete, else ``None``."""
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    return np.asarray(x)
  except Exception:  # pragma: no cover - exotic array types
    return None


def check_temperature(temperature: Scalar, name: str = "temperature") -> None:
  value = _concrete_value(temperature)
  if value is not None and np.any(~(value > 0)):
    raise ValueError(f"{name} must be > 0, got {temperature!r}.")


def check_unit_interval(value: Scalar, name: str) -> None:
  concrete = _concrete_value(value)
  if concrete is not None and np.any(~((concrete >= 0) & (concrete <= 1))):
    raise ValueError(f"{name} must lie in [0, 1], got {value!r}.")


def check_non_negative(value: Scalar, name: str) -> None:
  concrete = _concrete_value(value)
  if concrete is not None and np.any(~(concrete >= 0)):
    raise ValueError(f"{name} must be >= 0, got {value!r} (a negative weight "
                     "would maximise the divergence).")


def check_reduction(reduction: str) -> None:
  if reduction not in REDUCTIONS:
    raise ValueError(
        f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")


def check_logits_pair(student_logits: chex.Array,
                      teacher_logits: chex.Array) -> None:
  """Student and teacher logits must agree in shape, class count included."""
  s, t = jnp.shape(student_logits), jnp.shape(teacher_logits)
  if len(s) == 0 or len(t) == 0:
    raise ValueError(
        "logits must have at least one axis (the class axis); got student "
        f"shape {s} and teacher shape {t}.")
  if s[-1] != t[-1]:
    raise ValueError(
        f"class-count mismatch: student logits have {s[-1]} classes (shape {s})"
        f" but teacher logits have {t[-1]} classes (shape {t}).")
  if s != t:
    raise ValueError(
        f"shape mismatch between student logits {s} and teacher logits {t}: "
        "they must have the same leading (batch/sequence) shape.")


def check_mask(mask: Optional[chex.Array], batch_shape: tuple) -> None:
  if mask is None:
    return
  if tuple(jnp.shape(mask)) != tuple(batch_shape):
    raise ValueError(
        f"mask shape {tuple(jnp.shape(mask))} does not match the loss's batch "
        f"shape {tuple(batch_shape)} (the logits' shape without the class axis).")


def to_float32(x: chex.Array) -> chex.Array:
  """Upcasts low-precision inputs; losses compute in at least float32."""
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32:
    return x.astype(jnp.float32)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    return x.astype(jnp.float32)
  return x


def reduce_loss(per_position: chex.Array,
                mask: Optional[chex.Array],
                reduction: str) -> chex.Array:
  """Applies the mask and reduction to a per-position loss of shape ``[...]``.

  ``"mean"`` is the mean over unmasked positions (0 when every position is
  masked), ``"sum"`` the sum over unmasked positions, ``"none"`` the
  per-position values with masked positions set to 0.
  """
  check_reduction(reduction)
  check_mask(mask, per_position.shape)
  if mask is not None:
    m = jnp.asarray(mask).astype(per_position.dtype)
    # where(), not multiplication: a masked NaN/inf must not leak into the sum.
    per_position = jnp.where(m > 0, per_position * m, 0.0)
  if reduction == "none":
    return per_position
  total = jnp.sum(per_position)
  if reduction == "sum":
    return total
  if mask is None:
    return total / max(per_position.size, 1)
  count = jnp.sum(jnp.asarray(mask).astype(per_position.dtype))
  return total / jnp.maximum(count, 1.0)
