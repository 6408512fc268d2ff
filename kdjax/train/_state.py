"""The distillation train state: everything a step reads and writes, as one pytree."""

from __future__ import annotations

from typing import Any, Mapping, Optional

import chex
import flax.struct
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class DistillState:
  """The student's side of a distillation run (the teacher is never in it).

  Attributes:
    step: int32 scalar, number of optimizer updates done.
    params: the student's trainable parameters (``variables["params"]``).
    model_state: the student's other variables (linen ``batch_stats``, NNX
      non-parameter state), ``{}`` if none.
    loss_params: learnable parameters of loss terms by term name (FitNets
      connectors, CRD embedding heads); trained with the student and dropped
      at export.
    opt_state: optax state over ``{"student": params, "loss": loss_params}``.
    loss_state: non-learned state of loss terms by term name (CRD memory bank).
    rng: PRNG key, split every step (dropout, sampling in loss terms).
    ema_params: exponential moving average of ``params`` (mean-teacher style
      self-distillation), or ``None`` when the run keeps no EMA.
  """
  step: chex.Array
  params: Any
  model_state: Any
  loss_params: Any
  opt_state: optax.OptState
  loss_state: Any
  rng: chex.PRNGKey
  ema_params: Optional[Any] = None

  @property
  def trainable(self) -> dict:
    """The pytree the optimizer updates."""
    return {"student": self.params, "loss": self.loss_params}

  def student_variables(self) -> dict:
    """The student's variables as its apply function takes them."""
    return {"params": self.params, **(self.model_state or {})}

  def ema_variables(self) -> dict:
    if self.ema_params is None:
      raise ValueError("this state keeps no EMA of the student params; create "
                       "it with create_state(..., ema=True).")
    return {"params": self.ema_params, **(self.model_state or {})}


def split_variables(variables: Mapping[str, Any]) -> tuple[Any, dict]:
  """``{"params": p, **rest}`` -> ``(p, rest)``."""
  if not isinstance(variables, Mapping) or "params" not in variables:
    raise TypeError(
        "student variables must be a mapping with a 'params' entry "
        f"(got {type(variables).__name__}); plain params: {{'params': params}}.")
  rest = {k: v for k, v in variables.items() if k != "params"}
  return variables["params"], rest


def _copy_callers_arrays(tree: Any, callers: Any) -> Any:
  """Copies the leaves of ``tree`` that are the very arrays found in ``callers``.

  The state must own its buffers (the step donates them); a leaf that is one
  of the caller's JAX arrays is replaced by a copy, any other leaf (a new
  array, e.g. one cast by the precision policy; a NumPy array, which the jit
  call transfers anyway) is kept.
  """
  ids = {id(x) for x in jax.tree.leaves(callers) if isinstance(x, jax.Array)}
  return jax.tree.map(lambda x: jnp.copy(x) if id(x) in ids else x, tree)


def create_state(student_variables: Mapping[str, Any],
                 optimizer: optax.GradientTransformation,
                 *,
                 rng: chex.PRNGKey,
                 loss_params: Optional[Mapping[str, Any]] = None,
                 loss_state: Optional[Mapping[str, Any]] = None,
                 ema: bool = False,
                 policy: Optional[Any] = None,
                 copy: bool = True) -> DistillState:
  """Builds the initial :class:`DistillState`.

  Args:
    student_variables: ``{"params": ..., other collections...}``.
    optimizer: the optax transformation for student and loss params.
    rng: the run's PRNG key.
    loss_params: from ``ComposedLoss.init_params`` (``{}`` if none).
    loss_state: from ``ComposedLoss.init_state`` (``{}`` if none).
    ema: keep an EMA copy of the student params (self-distillation).
    policy: a :class:`kdjax.train.Policy`; the student and loss params are
      stored in ``policy.param_dtype`` (the float32 master weights).
    copy: copy the arrays the caller passed (see below); ``False`` hands them
      over to the state.

  The train step donates the state's buffers (the update happens in place),
  so every array the state holds is deleted by the first step. With
  ``copy=True`` (the default) the state holds copies of the caller's
  ``student_variables``, ``loss_params``, ``loss_state`` and ``rng``: those
  stay usable after any number of steps (reuse the key, start a second run
  from the same initial variables). A leaf that ``policy`` casts to a new
  dtype is already a new array and is not copied again. ``copy=False`` saves
  the copy of a model too large for two copies in memory: the caller's
  arrays then belong to the state and are deleted by the first step.
  """
  owned = (student_variables, loss_params, loss_state, rng)
  params, rest = split_variables(student_variables)
  loss_params = dict(loss_params or {})
  loss_state = dict(loss_state or {})
  if policy is not None:
    params = policy.cast_to_param(params)
    loss_params = policy.cast_to_param(loss_params)
  if copy:
    params, rest, loss_params, loss_state, rng = _copy_callers_arrays(
        (params, rest, loss_params, loss_state, rng), owned)
  opt_state = optimizer.init({"student": params, "loss": loss_params})
  ema_params = jax.tree.map(jnp.copy, params) if ema else None
  return DistillState(step=jnp.zeros((), jnp.int32), params=params,
                      model_state=rest, loss_params=loss_params,
                      opt_state=opt_state, loss_state=loss_state,
                      rng=rng, ema_params=ema_params)
