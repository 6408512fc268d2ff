"""Jitted distillation train and eval steps.

The flow of one batch (see ``shared/DESIGN.md``)::

  batch -> teacher apply (frozen: stop_gradient, eval mode)  -> logits + features
        -> student apply (train mode)                         -> logits + features
        -> composed loss terms (kdjax.losses)                 -> total + per-term dict
        -> grad w.r.t. {student params, loss-term params}     -> optax update

The teacher's variables are an *argument* of the jitted step, never a
closed-over constant: a closed-over teacher would be copied into the compiled
program (and recompiled for every new teacher). The state buffers are donated
so the update happens in place.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Union

import chex
import jax
import jax.numpy as jnp
import optax

from kdjax.losses import ComposedLoss
from kdjax.losses import evaluate_schedule
from kdjax.losses import kl_divergence
from kdjax.models import ModelOutput
from kdjax.train._state import DistillState

ApplyFn = Callable[..., ModelOutput]


def teacher_forward(teacher_apply: ApplyFn, teacher_variables: Any,
                    batch: Mapping[str, Any]) -> ModelOutput:
  """Runs the frozen teacher: eval mode, no gradient, no state update."""
  out = teacher_apply(teacher_variables, batch, train=False)
  return jax.lax.stop_gradient(out.replace(state=None))


def make_train_step(student_apply: ApplyFn,
                    teacher_apply: Optional[ApplyFn],
                    loss_fn: ComposedLoss,
                    optimizer: optax.GradientTransformation,
                    *,
                    ema_decay: Optional[Union[float, Callable]] = None,
                    teacher_is_ema: bool = False,
                    donate: bool = True,
                    jit: bool = True):
  """Builds ``step(state, teacher_variables, batch) -> (state, metrics)``.

  Args:
    student_apply: the student's apply function (``kdjax.models``).
    teacher_apply: the teacher's apply function, or ``None`` for a student
      trained alone (then every loss term must have ``needs_teacher=False``
      and ``teacher_variables`` is ignored).
    loss_fn: a :class:`kdjax.losses.ComposedLoss`.
    optimizer: optax transformation over ``{"student", "loss"}`` params.
    ema_decay: if set (float or schedule of the step), ``state.ema_params``
      tracks ``decay * ema + (1 - decay) * params`` after each update.
    teacher_is_ema: the teacher is the student's own EMA (mean teacher):
      ``teacher_variables`` is ignored and ``state.ema_variables()`` is run
      through ``student_apply`` (or ``teacher_apply`` when given).
    donate: donate the state's buffers to the step.
    jit: return the jitted step (``False`` for debugging).

  Returns:
    The step. ``metrics`` holds the total ``"loss"`` and every term of
    ``loss_fn`` (unweighted), weights and temperature, as device scalars:
    fetch them every N steps, not every step.
  """
  if teacher_is_ema and ema_decay is None:
    raise ValueError("teacher_is_ema=True needs ema_decay.")
  if teacher_apply is None and not teacher_is_ema:
    needing = [t.name for t in loss_fn.terms if t.needs_teacher]
    if needing:
      raise ValueError(
          f"loss terms {needing} need a teacher but teacher_apply is None.")

  def step(state: DistillState, teacher_variables: Any,
           batch: Mapping[str, Any]) -> tuple[DistillState, dict]:
    rng, dropout_rng, loss_rng = jax.random.split(state.rng, 3)
    if teacher_is_ema:
      teacher_out = teacher_forward(teacher_apply or student_apply,
                                    state.ema_variables(), batch)
    elif teacher_apply is not None:
      teacher_out = teacher_forward(teacher_apply, teacher_variables, batch)
    else:
      teacher_out = None

    def objective(trainable):
      variables = {"params": trainable["student"], **state.model_state}
      student_out = student_apply(variables, batch, train=True, rng=dropout_rng)
      total, aux = loss_fn(student_out, teacher_out, batch, step=state.step,
                           params=trainable["loss"], state=state.loss_state,
                           rng=loss_rng, train=True)
      return total, (aux, student_out.state)

    (loss, (aux, new_model_state)), grads = jax.value_and_grad(
        objective, has_aux=True)(state.trainable)
    updates, opt_state = optimizer.update(grads, state.opt_state,
                                          state.trainable)
    trainable = optax.apply_updates(state.trainable, updates)
    model_state = state.model_state
    if new_model_state:
      model_state = {**model_state, **new_model_state}
    ema_params = state.ema_params
    if ema_decay is not None:
      decay = evaluate_schedule(ema_decay, state.step)
      ema_params = optax.incremental_update(trainable["student"], ema_params,
                                            1.0 - decay)
    loss_state = {**state.loss_state, **aux.state}
    new_state = state.replace(
        step=state.step + 1, params=trainable["student"],
        model_state=model_state, loss_params=trainable["loss"],
        opt_state=opt_state, loss_state=loss_state, rng=rng,
        ema_params=ema_params)
    metrics = {"loss": loss, **aux.terms,
               "grad_norm": optax.global_norm(grads["student"])}
    return new_state, metrics

  if not jit:
    return step
  return jax.jit(step, donate_argnums=(0,) if donate else ())


def make_eval_step(student_apply: ApplyFn,
                   teacher_apply: Optional[ApplyFn] = None,
                   *,
                   label_key: str = "label",
                   temperature: float = 1.0,
                   jit: bool = True):
  """Builds ``eval_step(student_variables, teacher_variables, batch) -> sums``.

  Returns per-batch *sums* (so that batches of any size combine exactly):
  ``count``, ``student_correct``, and with a teacher ``teacher_correct``,
  ``agreement`` (student and teacher top-1 equal) and ``kl`` (forward KL
  at ``temperature``, summed). An optional ``batch["mask"]`` (``[B]``)
  excludes padding examples. Combine with :func:`evaluate`.
  """

  def eval_step(student_variables, teacher_variables, batch):
    labels = batch[label_key]
    weights = batch.get("mask", jnp.ones(labels.shape, jnp.float32))
    weights = jnp.asarray(weights, jnp.float32)
    s_logits = student_apply(student_variables, batch, train=False).logits
    s_pred = jnp.argmax(s_logits, -1)
    sums = {"count": jnp.sum(weights),
            "student_correct": jnp.sum(weights * (s_pred == labels))}
    if teacher_apply is not None:
      t_logits = teacher_apply(teacher_variables, batch, train=False).logits
      t_pred = jnp.argmax(t_logits, -1)
      sums["teacher_correct"] = jnp.sum(weights * (t_pred == labels))
      sums["agreement"] = jnp.sum(weights * (t_pred == s_pred))
      sums["kl"] = kl_divergence(s_logits, t_logits, temperature,
                                 mask=weights, reduction="sum",
                                 scale_by_temperature=False)
    return sums

  return jax.jit(eval_step) if jit else eval_step


def evaluate(eval_step, student_variables, teacher_variables,
             batches) -> dict:
  """Runs ``eval_step`` over ``batches``; returns accuracies and mean KL (floats).

  Sums stay on the device until the end: one host transfer for the dataset.
  """
  totals = None
  for batch in batches:
    sums = eval_step(student_variables, teacher_variables, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  if totals is None:
    raise ValueError("evaluate() got no batches.")
  totals = jax.device_get(totals)
  count = max(float(totals["count"]), 1.0)
  report = {"count": int(totals["count"]),
            "student_accuracy": float(totals["student_correct"]) / count}
  if "teacher_correct" in totals:
    report["teacher_accuracy"] = float(totals["teacher_correct"]) / count
    report["agreement"] = float(totals["agreement"]) / count
    report["mean_kl"] = float(totals["kl"]) / count
  return report
