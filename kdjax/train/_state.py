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


def create_state(student_variables: Mapping[str, Any],
                 optimizer: optax.GradientTransformation,
                 *,
                 rng: chex.PRNGKey,
                 loss_params: Optional[Mapping[str, Any]] = None,
                 loss_state: Optional[Mapping[str, Any]] = None,
                 ema: bool = False,
                 policy: Optional[Any] = None) -> DistillState:
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

  The state holds ``student_variables``' arrays themselves (no copy, so no
  second copy of a large model in memory), and the train step donates the
  state's buffers: after the first step those arrays are deleted. To reuse the
  same initial variables for another run (e.g. a student trained alone and the
  same student distilled), pass ``jax.tree.map(jnp.copy, variables)``.
  """
  params, rest = split_variables(student_variables)
  loss_params = dict(loss_params or {})
  if policy is not None:
    params = policy.cast_to_param(params)
    loss_params = policy.cast_to_param(loss_params)
  opt_state = optimizer.init({"student": params, "loss": loss_params})
  ema_params = jax.tree.map(jnp.copy, params) if ema else None
  return DistillState(step=jnp.zeros((), jnp.int32), params=params,
                      model_state=rest, loss_params=loss_params,
                      opt_state=opt_state, loss_state=dict(loss_state or {}),
                      rng=rng, ema_params=ema_params)
