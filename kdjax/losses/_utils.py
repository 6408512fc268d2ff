"""Shared validation, masking and reduction helpers of the loss library.

Every public loss documents its own arguments. The helpers a loss written
outside this package needs to behave like kdjax's own are public
(``kdjax.losses.check_temperature``, ``check_unit_interval``,
``check_logits_pair``, ``to_float32``, ``reduce_loss``, ``runtime_checks``);
the rest stay private. They are jit/grad/vmap-safe. Validation that needs a
value (``temperature > 0``, labels in ``[0, C)``) runs *eagerly* when the
value is concrete (a Python number, a NumPy or a non-traced JAX array) and
raises ``ValueError``. A traced value (a temperature that follows a schedule
inside ``jax.jit``, the labels of a jitted batch) cannot raise there; inside
:func:`runtime_checks` the same conditions are emitted as
``jax.experimental.checkify`` checks instead (the train step's
``checks=True``), and outside it they are skipped: no check, no cost.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Iterator, Optional, Union

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import checkify

Scalar = Union[float, chex.Array]

REDUCTIONS = ("mean", "sum", "none")

_RUNTIME_CHECKS = contextvars.ContextVar("kdjax_losses_runtime_checks",
                                         default=False)


@contextlib.contextmanager
def runtime_checks(enabled: bool = True) -> Iterator[None]:
  """Emits the losses' value checks on *traced* values as ``checkify`` checks.

  Inside this context (entered *while tracing*, i.e. inside the function that
  is jitted), a loss given a traced temperature, mixing weight or label array
  adds a ``jax.experimental.checkify`` check of the condition it checks
  eagerly on concrete values (``temperature > 0``, labels in ``[0, C)``, ...).
  The traced function must then be checkified::

    def loss(s, t, y, T):
      with losses.runtime_checks():
        return losses.dkd(s, t, y, temperature=T)

    err, value = jax.jit(checkify.checkify(loss))(s, t, y, 0.0)
    err.throw()  # JaxRuntimeError: temperature must be > 0, got 0.0 ...

  ``kdjax.train.make_train_step(..., checks=True)`` does this for a whole
  step. Outside the context (the default) traced values are not checked and
  the compiled program is unchanged. ``enabled=False`` turns the checks off
  inside an enclosing context.
  """
  token = _RUNTIME_CHECKS.set(bool(enabled))
  try:
    yield
  finally:
    _RUNTIME_CHECKS.reset(token)


def runtime_checks_enabled() -> bool:
  """Whether traced values are being checked (see :func:`runtime_checks`)."""
  return _RUNTIME_CHECKS.get()


def _escape(text: str) -> str:
  """``text`` as a literal inside a ``checkify`` format string."""
  return str(text).replace("{", "{{").replace("}", "}}")


def _concrete_value(x) -> Optional[np.ndarray]:
  """Returns ``x`` as a NumPy array when it is concrete, else ``None``."""
  if isinstance(x, jax.core.Tracer):
    return None
  try:
    return np.asarray(x)
  except Exception:  # pragma: no cover - exotic array types
    return None


def _check_value(value, ok, message: str) -> None:
  """Raises ``ValueError(message)`` where the elementwise ``ok(value)`` fails.

  ``message`` holds ``{value}``, replaced by the value (``repr``) when it is
  concrete, which is checked eagerly. A traced value is checked only inside
  :func:`runtime_checks`, as a ``checkify`` check whose message shows the
  value (a scalar) or its range (an array).
  """
  concrete = _concrete_value(value)
  if concrete is not None:
    if np.any(~ok(concrete)):
      raise ValueError(message.replace("{value}", repr(value)))
    return
  if not runtime_checks_enabled():
    return
  x = jnp.asarray(value)
  if x.size == 0:
    return
  if x.ndim == 0:
    shown, fmt = {"v": x}, "{v}"
  else:
    shown, fmt = {"lo": jnp.min(x), "hi": jnp.max(x)}, "values in [{lo}, {hi}]"
  checkify.check(jnp.all(ok(x)), _escape(message).replace("{{value}}", fmt),
                 **shown)


def check_temperature(temperature: Scalar, name: str = "temperature") -> None:
  """Checks ``temperature > 0``.

  Eagerly (``ValueError``) when the value is concrete; a traced value only
  inside :func:`runtime_checks` (a ``checkify`` check), else not at all.

  Args:
    temperature: a Python number or a (possibly traced) scalar array.
    name: the argument's name in the error message.
  """
  _check_value(temperature, lambda t: t > 0,
               f"{name} must be > 0, got {{value}}.")


def check_unit_interval(value: Scalar, name: str) -> None:
  """Checks ``0 <= value <= 1`` (a mixing weight, a decay).

  Eagerly (``ValueError``) when the value is concrete; a traced value only
  inside :func:`runtime_checks`, as :func:`check_temperature`.

  Args:
    value: a Python number or a (possibly traced) array.
    name: the argument's name in the error message.
  """
  _check_value(value, lambda v: (v >= 0) & (v <= 1),
               f"{name} must lie in [0, 1], got {{value}}.")


def check_non_negative(value: Scalar, name: str) -> None:
  _check_value(value, lambda v: v >= 0,
               f"{name} must be >= 0, got {{value}} (a negative weight would "
               "maximise the divergence).")


def check_labels(labels: chex.Array, num_classes: Optional[int],
                 batch_shape: tuple, loss_name: str,
                 arg_name: str = "labels") -> None:
  """Integer class labels of shape ``batch_shape`` with values in ``[0, C)``.

  Shape and dtype are always checked (they are static); the range eagerly
  when ``labels`` are concrete, and under :func:`runtime_checks` when traced
  (``num_classes=None``: not at all, e.g. a vocabulary shard's labels).
  Out-of-range labels do not fail by themselves in JAX: a gather clamps or
  wraps them, a one-hot of them is all zeros, and the loss is silently wrong
  (or NaN). Errors name ``loss_name``.
  """
  shape = tuple(jnp.shape(labels))
  if shape != tuple(batch_shape):
    raise ValueError(
        f"{loss_name}: {arg_name} shape {shape} does not match the logits' "
        f"batch shape {tuple(batch_shape)} (the logits' shape without the "
        "class axis).")
  dtype = getattr(labels, "dtype", None)
  if dtype is None:
    dtype = jnp.asarray(labels).dtype
  if not jnp.issubdtype(dtype, jnp.integer):
    raise ValueError(f"{loss_name}: {arg_name} must be integers, got dtype "
                     f"{dtype}.")
  if num_classes is None:
    return
  concrete = _concrete_value(labels)
  if concrete is not None:
    if concrete.size and (concrete.min() < 0 or concrete.max() >= num_classes):
      raise ValueError(
          f"{loss_name}: {arg_name} must lie in [0, {num_classes}) for "
          f"{num_classes} classes; got values in [{concrete.min()}, "
          f"{concrete.max()}].")
    return
  if not runtime_checks_enabled() or not np.prod(shape, dtype=np.int64):
    return
  labels = jnp.asarray(labels)
  lo, hi = jnp.min(labels), jnp.max(labels)
  checkify.check(
      (lo >= 0) & (hi < num_classes),
      _escape(f"{loss_name}: {arg_name} must lie in [0, {num_classes}) for "
              f"{num_classes} classes; got values in [")
      + "{lo}, {hi}] (checked at run time).", lo=lo, hi=hi)


def check_reduction(reduction: str) -> None:
  if reduction not in REDUCTIONS:
    raise ValueError(
        f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")


def check_logits_pair(student_logits: chex.Array,
                      teacher_logits: chex.Array) -> None:
  """Checks that student and teacher logits agree in shape, classes included.

  Shapes are static: the check runs at trace time and raises ``ValueError``
  (no class axis, a class-count mismatch, or other leading axes).
  """
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
  """``x`` as an array of at least float32 precision.

  Low-precision floats (bfloat16, float16) and non-floating inputs become
  float32; float32 and float64 stay as they are. Losses compute in it.
  """
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

  Args:
    per_position: the loss at each position, shape ``[...]``.
    mask: ``None`` or weights of the same shape (positions with ``mask <= 0``
      are left out; a masked NaN or inf does not leak into the result).
    reduction: ``"mean"``, ``"sum"`` or ``"none"``.

  Returns:
    A scalar, or an array of ``per_position``'s shape for ``"none"``.
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
