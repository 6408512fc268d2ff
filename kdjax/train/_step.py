"""The distillation train step: one pure builder, one compile wrapper; eval steps.

The flow of one batch (see ``shared/DESIGN.md``)::

  batch -> teacher apply (frozen: stop_gradient, eval mode)  -> logits + features
        -> student apply (train mode)                         -> logits + features
        -> composed loss terms (kdjax.losses)                 -> total + per-term dict
        -> grad w.r.t. {student params, loss-term params}     -> optax update

The teacher's variables are an *argument* of the jitted step, never a
closed-over constant: a closed-over teacher would be copied into the compiled
program (and recompiled for every new teacher). The teacher gets no gradient
(``stop_gradient``), no optimizer state and no update. The state buffers are
donated so the update happens in place.

How a step is built::

  options = StepOptions(accumulation_steps=2, policy=Policy.bf16_teacher())
  pure = build_step(student_apply, teacher_apply, loss_fn, optimizer, options)
  step = compile_step(pure)              # checks, jit + donation (+ shardings)
  # the same in one call:
  step = make_train_step(student_apply, teacher_apply, loss_fn, optimizer,
                         options)        # or ..., accumulation_steps=2, ...)

:class:`kdjax.train.StepOptions` holds what the step does besides the loss:
gradient accumulation (``lax.scan``; see ``kdjax/train/_accumulation.py`` for
the normalisation of masked token losses), a mixed-precision ``policy``, an
EMA of the student, gradient-norm logging and run-time checks. Every other
step is a thin wrapper of these two functions: the LM step
(:func:`kdjax.lm.make_lm_train_step`: token-mask options), the offline-cache
step (:func:`kdjax.cache.make_cached_train_step`: a teacher read from the
batch), the sharded and pmap steps (``kdjax.parallel``: shardings, a device
axis), GKD and sequence-level KD (``kdjax.lm``: a rollout before the step)
and the mean teacher (:func:`kdjax.train.mean_teacher_step`: the EMA as the
teacher).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Optional

import jax
import jax.numpy as jnp
import optax

from kdjax.losses import ComposedLoss
from kdjax.losses import evaluate_schedule
from kdjax.losses import kl_divergence
from kdjax.losses import runtime_checks
from kdjax.models import ModelOutput
from kdjax.train import _accumulation
from kdjax.train._compile import HOLDS_CHECKS
from kdjax.train._compile import check_teacher_finite
from kdjax.train._compile import compile_step
from kdjax.train._options import StepOptions
from kdjax.train._precision import Policy
from kdjax.train._precision import cast_floating
from kdjax.train._precision import resolve_policy
from kdjax.train._state import DistillState

ApplyFn = Callable[..., ModelOutput]
# step(state, teacher_variables, batch) -> (state, metrics)
StepFn = Callable[[DistillState, Any, Mapping[str, Any]],
                  tuple[DistillState, dict]]
# eval_step(student_variables, teacher_variables, batch) -> summed metrics
EvalStepFn = Callable[[Any, Any, Mapping[str, Any]], dict]

# An apply function with this attribute set to True reads the teacher's output
# from the batch (an offline teacher cache, ``kdjax.cache``): the step then
# does not cast its "variables" or inputs to the teacher compute dtype.
READS_TEACHER_FROM_BATCH = "kdjax_reads_teacher_from_batch"


def reads_teacher_from_batch(apply_fn: ApplyFn) -> ApplyFn:
  """Marks a teacher apply function that reads the teacher's outputs from the batch.

  For an offline teacher (``kdjax.cache``): its "variables" are ignored and
  its outputs were computed before, so the step's precision policy casts
  neither them nor the batch to the teacher's compute dtype (only its outputs
  to ``policy.output_dtype``). Returns ``apply_fn`` itself.
  """
  setattr(apply_fn, READS_TEACHER_FROM_BATCH, True)
  return apply_fn


def teacher_forward(teacher_apply: ApplyFn,
                    teacher_variables: Any,
                    batch: Mapping[str, Any],
                    *,
                    policy: Optional[Policy] = None) -> ModelOutput:
  """Runs the frozen teacher: eval mode, no gradient, no state update.

  With a ``policy`` the teacher's params and floating inputs are cast to
  ``policy.teacher_compute_dtype`` and its logits/features to
  ``policy.output_dtype``.
  """
  policy = resolve_policy(policy)
  if policy is not None and not getattr(teacher_apply, READS_TEACHER_FROM_BATCH,
                                        False):
    teacher_variables = policy.teacher_variables(teacher_variables)
    batch = policy.teacher_inputs(batch)
  out = teacher_apply(teacher_variables, batch, train=False)
  out = out.replace(state=None)
  if policy is not None:
    out = policy.cast_output(out)
  return jax.lax.stop_gradient(out)


def _match_dtypes(new, old):
  """Casts ``new`` leaves to the dtypes of ``old`` when the trees match."""
  try:
    return jax.tree.map(
        lambda n, o: jnp.asarray(n).astype(o.dtype)
        if hasattr(o, "dtype") and hasattr(n, "dtype") else n, new, old)
  except (ValueError, TypeError):
    return new


def _merge_state(old: Any, new: Optional[Any]) -> Any:
  if not new:
    return old
  merged = {**old, **new}
  return {k: (_match_dtypes(v, old[k]) if k in old else v)
          for k, v in merged.items()}


def _mean_over_devices(grads, metrics, model_state, batch,
                       options: StepOptions, axis_name):
  """Data parallelism inside ``pmap``/``shard_map``: the global batch's mean.

  Gradients and metrics are averaged over ``axis_name`` (with a loss mask,
  weighted by each device's share of the unmasked tokens:
  :func:`_accumulation.device_weight`), floating model state (BatchNorm
  statistics) is averaged.
  """
  share = _accumulation.device_weight(batch, options.accumulation_weighting,
                                      options.mask_key, axis_name)
  if share is None:
    grads = jax.lax.pmean(grads, axis_name)
    metrics = jax.lax.pmean(metrics, axis_name)
  else:  # masked token means: weight each device by its real tokens
    grads = jax.lax.psum(jax.tree.map(lambda g: share * g, grads), axis_name)
    metrics = jax.lax.psum(jax.tree.map(lambda m: share * m, metrics),
                           axis_name)
  model_state = jax.tree.map(
      lambda x: jax.lax.pmean(x, axis_name)
      if jnp.issubdtype(x.dtype, jnp.floating) else x, model_state)
  return grads, metrics, model_state


def _updated_state(state: DistillState, trainable, grads, model_state,
                   loss_state, rng, optimizer: optax.GradientTransformation,
                   ema_decay) -> DistillState:
  """One optax update of the trainable params (and of the EMA), step + 1."""
  updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
  trainable = optax.apply_updates(trainable, updates)
  ema_params = state.ema_params
  if ema_decay is not None:
    decay = evaluate_schedule(ema_decay, state.step)
    ema_params = optax.incremental_update(trainable["student"], ema_params,
                                          1.0 - decay)
  return state.replace(
      step=state.step + 1, params=trainable["student"],
      model_state=model_state, loss_params=trainable["loss"],
      opt_state=opt_state, loss_state=loss_state, rng=rng,
      ema_params=ema_params)


def build_step(student_apply: ApplyFn,
               teacher_apply: Optional[ApplyFn],
               loss_fn: ComposedLoss,
               optimizer: optax.GradientTransformation,
               options: Optional[StepOptions] = None,
               *,
               axis_name: Optional[str] = None,
               gather_fn: Optional[Callable[[Any], Any]] = None) -> StepFn:
  """The pure train step ``step(state, teacher_variables, batch) -> (state, metrics)``.

  One step computes the frozen teacher's outputs, the student's, the composed
  loss ``L = sum_i w_i(step) * term_i``, its gradient with respect to
  ``{student params, loss-term params}`` and one optax update. Not jitted:
  :func:`compile_step` (or :func:`make_train_step`, both in one call) makes
  it the step to call.

  Args:
    student_apply: the student's apply function (``kdjax.models``).
    teacher_apply: the teacher's apply function, or ``None`` for a student
      trained alone (then every loss term must have ``needs_teacher=False``
      and ``teacher_variables`` is ignored). An offline cache's apply function
      (``kdjax.cache``) reads the teacher's outputs from the batch.
    loss_fn: a :class:`kdjax.losses.ComposedLoss`.
    optimizer: optax transformation over ``{"student", "loss"}`` params.
    options: a :class:`StepOptions` (default: ``StepOptions()``).
    axis_name: for ``kdjax.parallel``'s pmap/shard_map steps: average
      gradients, model state and metrics over this axis (``lax.pmean``; with
      a loss mask, gradients and metrics are weighted by each device's share
      of the unmasked tokens, so the result is the global token mean) and
      fold the device index into the dropout RNG.
    gather_fn: for ``kdjax.parallel``'s FSDP step: ``gather_fn(trainable) ->
      trainable`` is applied to the trainable params inside the
      differentiated function (an all-gather as a sharding constraint, whose
      transpose reduce-scatters the gradients).

  Returns:
    The step. ``metrics`` holds the total ``"loss"`` and every term of
    ``loss_fn`` (unweighted), weights and temperature, as device scalars. With
    ``options.checks`` (or ``check_teacher_finite``) the step holds
    ``checkify`` checks and its ``kdjax_checks`` attribute is true:
    :func:`compile_step` checkifies it.
  """
  options = StepOptions.of(options)
  if options.checks and axis_name is not None:
    raise ValueError("checks=True is not supported by the pmap step; use "
                     "make_sharded_train_step or make_train_step.")
  if teacher_apply is None and not options.teacher_is_ema:
    needing = [t.name for t in loss_fn.terms if t.needs_teacher]
    if needing:
      raise ValueError(
          f"loss terms {needing} need a teacher but teacher_apply is None.")
  policy = resolve_policy(options.policy)
  teacher_checks = options.teacher_checks
  k = options.accumulation_steps

  def run_teacher(state: DistillState, teacher_variables, batch):
    """The teacher's output: a model, the student's EMA, or none."""
    if options.teacher_is_ema:
      return teacher_forward(teacher_apply or student_apply,
                             state.ema_variables(), batch, policy=policy)
    if teacher_apply is not None:
      return teacher_forward(teacher_apply, teacher_variables, batch,
                             policy=policy)
    return None

  def student_grads(state: DistillState, trainable, teacher_out, batch, carry,
                    rngs):
    """The loss's gradient w.r.t. the trainable params, given the teacher."""
    model_state, loss_state = carry
    dropout_rng, loss_rng = rngs
    student_batch = batch if policy is None else policy.student_inputs(batch)

    def objective(trainable):
      if gather_fn is not None:
        trainable = gather_fn(trainable)
      params = trainable["student"]
      if policy is not None:
        params = cast_floating(params, policy.compute_dtype)
      variables = {"params": params, **model_state}
      student_out = student_apply(variables, student_batch, train=True,
                                  rng=dropout_rng)
      if policy is not None:
        student_out = policy.cast_output(student_out)
      total, aux = loss_fn(student_out, teacher_out, batch, step=state.step,
                           params=trainable["loss"], state=loss_state,
                           rng=loss_rng, train=True)
      return total, (aux, student_out.state)

    (loss, (aux, new_model_state)), grads = jax.value_and_grad(
        objective, has_aux=True)(trainable)
    model_state = _merge_state(model_state, new_model_state)
    loss_state = _merge_state(loss_state, aux.state)
    return grads, {"loss": loss, **aux.terms}, (model_state, loss_state)

  def step(state: DistillState, teacher_variables: Any,
           batch: Mapping[str, Any]) -> tuple[DistillState, dict]:
    rng, dropout_rng, loss_rng = jax.random.split(state.rng, 3)
    if axis_name is not None:
      index = jax.lax.axis_index(axis_name)
      dropout_rng = jax.random.fold_in(dropout_rng, index)
      loss_rng = jax.random.fold_in(loss_rng, index)
    trainable = state.trainable

    def grad_fn(batch, carry, rngs, check=True):
      """Gradient, metrics and new (model, loss) state of one (micro-)batch."""
      teacher_out = run_teacher(state, teacher_variables, batch)
      if check and teacher_checks and teacher_out is not None:
        check_teacher_finite(teacher_out, options.teacher_name, state.step)
      with runtime_checks(check and options.checks):
        return student_grads(state, trainable, teacher_out, batch, carry,
                             rngs)

    carry = (state.model_state, state.loss_state)
    rngs = (dropout_rng, loss_rng)
    if k == 1:
      grads, metrics, carry = grad_fn(batch, carry, rngs)
    else:
      grads, metrics, carry = _accumulation.accumulate(
          grad_fn, trainable, batch, carry, rngs, k=k,
          weighting=options.accumulation_weighting, mask_key=options.mask_key)
    model_state, loss_state = carry
    if axis_name is not None:
      grads, metrics, model_state = _mean_over_devices(
          grads, metrics, model_state, batch, options, axis_name)
    new_state = _updated_state(state, trainable, grads, model_state,
                               loss_state, rng, optimizer, options.ema_decay)
    if options.log_grad_norm:
      metrics["grad_norm"] = optax.tree.norm(grads["student"])
    return new_state, metrics

  setattr(step, HOLDS_CHECKS, teacher_checks)
  return step


def make_train_step(student_apply: ApplyFn,
                    teacher_apply: Optional[ApplyFn],
                    loss_fn: ComposedLoss,
                    optimizer: optax.GradientTransformation,
                    options: Optional[StepOptions] = None,
                    *,
                    donate: bool = True,
                    jit: bool = True,
                    **option_fields: Any) -> StepFn:
  """Builds ``step(state, teacher_variables, batch) -> (state, metrics)``, jitted.

  ``compile_step(build_step(student_apply, teacher_apply, loss_fn,
  optimizer, options), jit=jit, donate=donate)``: see :func:`build_step` for
  the step and :class:`StepOptions` for the options. The options may also be
  given as keywords (``make_train_step(..., accumulation_steps=2,
  policy=policy, checks=True)``), alone or as changes to ``options``.

  Args:
    student_apply, teacher_apply, loss_fn, optimizer: see :func:`build_step`.
    options: a :class:`StepOptions`.
    donate: donate the state's buffers to the step.
    jit: return the jitted step (``False`` for debugging).
    **option_fields: :class:`StepOptions` fields (``ema_decay``,
      ``teacher_is_ema``, ``accumulation_steps``, ``accumulation_weighting``,
      ``mask_key``, ``policy``, ``check_teacher_finite``, ``checks``,
      ``teacher_name``, ``log_grad_norm``).

  Returns:
    The step. ``metrics`` holds the total ``"loss"`` and every term of
    ``loss_fn`` (unweighted), weights and temperature, as device scalars:
    fetch them every N steps, not every step. A step with checks raises
    ``ValueError`` / ``FloatingPointError`` on a failed check.
  """
  options = StepOptions.of(options, **option_fields)
  step = build_step(student_apply, teacher_apply, loss_fn, optimizer, options)
  return compile_step(step, jit=jit, donate=donate)


def build_step_fn(student_apply: ApplyFn,
                  teacher_apply: Optional[ApplyFn],
                  loss_fn: ComposedLoss,
                  optimizer: optax.GradientTransformation,
                  *,
                  axis_name: Optional[str] = None,
                  gather_fn: Optional[Callable[[Any], Any]] = None,
                  **option_fields: Any) -> StepFn:
  """The un-jitted step with its options as keywords (kept for existing code).

  ``build_step(student_apply, teacher_apply, loss_fn, optimizer,
  StepOptions(**option_fields), axis_name=axis_name, gather_fn=gather_fn)``;
  new code should call :func:`build_step` with a :class:`StepOptions`.
  """
  return build_step(student_apply, teacher_apply, loss_fn, optimizer,
                    StepOptions(**option_fields), axis_name=axis_name,
                    gather_fn=gather_fn)


def make_eval_step(student_apply: ApplyFn,
                   teacher_apply: Optional[ApplyFn] = None,
                   *,
                   label_key: str = "label",
                   temperature: float = 1.0,
                   jit: bool = True,
                   policy: Optional[Policy] = None) -> EvalStepFn:
  """Builds ``eval_step(student_variables, teacher_variables, batch) -> sums``.

  Returns per-batch *sums* (so that batches of any size combine exactly):
  ``count``, ``student_correct``, and with a teacher ``teacher_correct``,
  ``agreement`` (student and teacher top-1 equal) and ``kl`` (forward
  ``KL(p_teacher || q_student)`` at ``temperature``, summed, not scaled by
  ``T**2``). An optional ``batch["mask"]`` (same shape as the labels, ``[B]``
  or ``[B, T]``) excludes padding. Combine with :func:`evaluate`. With a
  ``policy`` both models run in their compute dtypes.
  """
  policy = resolve_policy(policy)

  def eval_step(student_variables, teacher_variables, batch):
    labels = batch[label_key]
    weights = batch.get("mask", jnp.ones(labels.shape, jnp.float32))
    weights = jnp.asarray(weights, jnp.float32)
    s_vars, s_batch = student_variables, batch
    if policy is not None:
      s_vars = policy.student_variables(s_vars)
      s_batch = policy.student_inputs(batch)
    s_logits = student_apply(s_vars, s_batch, train=False).logits
    s_logits = jnp.asarray(s_logits, jnp.float32)
    s_pred = jnp.argmax(s_logits, -1)
    sums = {"count": jnp.sum(weights),
            "student_correct": jnp.sum(weights * (s_pred == labels))}
    if teacher_apply is not None:
      t_logits = teacher_forward(teacher_apply, teacher_variables, batch,
                                 policy=policy).logits
      t_logits = jnp.asarray(t_logits, jnp.float32)
      t_pred = jnp.argmax(t_logits, -1)
      sums["teacher_correct"] = jnp.sum(weights * (t_pred == labels))
      sums["agreement"] = jnp.sum(weights * (t_pred == s_pred))
      sums["kl"] = kl_divergence(s_logits, t_logits, temperature,
                                 mask=weights, reduction="sum",
                                 scale_by_temperature=False)
    return sums

  return jax.jit(eval_step) if jit else eval_step


def evaluate(eval_step: EvalStepFn, student_variables: Any,
             teacher_variables: Any,
             batches: Iterable[Mapping[str, Any]]) -> dict:
  """Runs ``eval_step`` over ``batches``; returns accuracies and mean KL (floats).

  ``student_accuracy = sum(student_correct) / count`` (likewise the
  teacher's), ``agreement`` the fraction of examples where the two top-1
  predictions agree, ``mean_kl = sum(kl) / count``. Sums stay on the device
  until the end: one host transfer for the dataset.
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
