"""Jitted distillation train and eval steps.

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

Options of :func:`make_train_step`:

* ``policy``: a :class:`kdjax.train.Policy` (mixed precision: bfloat16 teacher
  and/or student compute, float32 master weights and loss).
* ``accumulation_steps``: gradient accumulation over micro-batches
  (``lax.scan``; see ``kdjax/train/_accumulation.py`` for the normalisation of
  masked token losses).
* ``checks``: run-time checks of what the losses can only check eagerly on
  concrete values (``jax.experimental.checkify``; a debug option: each step
  then waits for the device). A traced temperature ``<= 0`` or label outside
  ``[0, C)`` raises ``ValueError``, NaN/inf in the teacher's output
  ``FloatingPointError`` naming the teacher, instead of a NaN loss. Off: the
  compiled step is unchanged. ``check_teacher_finite`` is the teacher check
  alone.
* ``log_grad_norm``: add the student's global gradient norm to the metrics
  (off by default: it costs an extra pass over the gradients).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Mapping, Optional, Union

import jax
import jax.numpy as jnp
import optax
from jax.experimental import checkify

from kdjax.losses import ComposedLoss
from kdjax.losses import evaluate_schedule
from kdjax.losses import kl_divergence
from kdjax.losses import runtime_checks
from kdjax.models import ModelOutput
from kdjax.train import _accumulation
from kdjax.train._precision import Policy
from kdjax.train._precision import cast_floating
from kdjax.train._precision import resolve_policy
from kdjax.train._state import DistillState

ApplyFn = Callable[..., ModelOutput]

# An apply function with this attribute set to True reads the teacher's output
# from the batch (an offline teacher cache, ``kdjax.cache``): the step then
# does not cast its "variables" or inputs to the teacher compute dtype.
READS_TEACHER_FROM_BATCH = "kdjax_reads_teacher_from_batch"


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


def _floating_leaves(tree) -> list:
  return [x for x in jax.tree.leaves(tree)
          if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.floating)]


# The teacher check's message starts so; the step raises FloatingPointError for
# it and ValueError for the losses' value checks.
_TEACHER_CHECK_PREFIX = "the teacher "


def _check_finite_in_step(output, teacher_name: str, step) -> None:
  """A checkify check that the teacher's logits and features are finite."""
  leaves = _floating_leaves((output.logits, output.features))
  if not leaves:
    return
  bad = sum(jnp.sum(~jnp.isfinite(x)) for x in leaves)
  name = teacher_name.replace("{", "{{").replace("}", "}}")
  checkify.check(
      bad == 0,
      f"{_TEACHER_CHECK_PREFIX}{name!r} produced {{bad}} non-finite (NaN/inf) value(s) in "
      "its logits/features at step {step}; check its parameters, inputs and "
      "compute dtype.", bad=bad, step=step)


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


def build_step_fn(student_apply: ApplyFn,
                  teacher_apply: Optional[ApplyFn],
                  loss_fn: ComposedLoss,
                  optimizer: optax.GradientTransformation,
                  *,
                  ema_decay: Optional[Union[float, Callable]] = None,
                  teacher_is_ema: bool = False,
                  accumulation_steps: int = 1,
                  accumulation_weighting: str = "auto",
                  mask_key: Optional[str] = "mask",
                  policy: Optional[Policy] = None,
                  check_teacher_finite: bool = False,
                  checks: bool = False,
                  teacher_name: str = "teacher",
                  log_grad_norm: bool = False,
                  axis_name: Optional[str] = None,
                  gather_fn: Optional[Callable[[Any], Any]] = None):
  """The un-jitted step function behind :func:`make_train_step`.

  Also used by ``kdjax.parallel``: ``axis_name`` (a pmap/shard_map axis) makes
  the step average gradients, model state and metrics over that axis
  (``lax.pmean``; with a loss mask, gradients and metrics are weighted by each
  device's share of the unmasked tokens, so the result is the global token
  mean) and fold the device index into the dropout RNG;
  ``gather_fn(trainable) -> trainable`` is applied to the trainable params
  inside the differentiated function (FSDP: an all-gather as a sharding
  constraint, whose transpose reduce-scatters the gradients).

  With ``checks`` (or ``check_teacher_finite``) the step holds ``checkify``
  checks and must be checkified: :func:`finalize_step` does it (the returned
  function's ``kdjax_checks`` attribute says so).
  """
  if checks and axis_name is not None:
    raise ValueError("checks=True is not supported by the pmap step; use "
                     "make_sharded_train_step or make_train_step.")
  check_teacher_finite = check_teacher_finite or checks
  if teacher_is_ema and ema_decay is None:
    raise ValueError("teacher_is_ema=True needs ema_decay.")
  if teacher_apply is None and not teacher_is_ema:
    needing = [t.name for t in loss_fn.terms if t.needs_teacher]
    if needing:
      raise ValueError(
          f"loss terms {needing} need a teacher but teacher_apply is None.")
  _accumulation.check_accumulation(accumulation_steps, accumulation_weighting)
  policy = resolve_policy(policy)
  k = accumulation_steps

  def micro_step(state: DistillState, trainable, teacher_variables, batch,
                 model_state, loss_state, dropout_rng, loss_rng, check=True):
    """Gradient and metrics of one (micro-)batch."""
    if teacher_is_ema:
      teacher_out = teacher_forward(teacher_apply or student_apply,
                                    state.ema_variables(), batch, policy=policy)
    elif teacher_apply is not None:
      teacher_out = teacher_forward(teacher_apply, teacher_variables, batch,
                                    policy=policy)
    else:
      teacher_out = None
    if check and check_teacher_finite and teacher_out is not None:
      _check_finite_in_step(teacher_out, teacher_name, state.step)
    with runtime_checks(check and checks):
      return _student_grads(state, trainable, teacher_out, batch, model_state,
                            loss_state, dropout_rng, loss_rng)

  def _student_grads(state, trainable, teacher_out, batch, model_state,
                     loss_state, dropout_rng, loss_rng):
    """The loss's gradient w.r.t. the trainable params, given the teacher."""
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
    return grads, {"loss": loss, **aux.terms}, model_state, loss_state

  def step(state: DistillState, teacher_variables: Any,
           batch: Mapping[str, Any]) -> tuple[DistillState, dict]:
    rng, dropout_rng, loss_rng = jax.random.split(state.rng, 3)
    if axis_name is not None:
      index = jax.lax.axis_index(axis_name)
      dropout_rng = jax.random.fold_in(dropout_rng, index)
      loss_rng = jax.random.fold_in(loss_rng, index)
    trainable = state.trainable
    if k == 1:
      grads, metrics, model_state, loss_state = micro_step(
          state, trainable, teacher_variables, batch, state.model_state,
          state.loss_state, dropout_rng, loss_rng)
    else:
      micro_batches = _accumulation.split_micro_batches(batch, k)
      weights = _accumulation.micro_batch_weights(
          micro_batches, k, accumulation_weighting, mask_key)

      def body(carry, xs):
        grad_sum, metric_sum, model_state, loss_state = carry
        micro_batch, weight, i = xs
        grads, metrics, model_state, loss_state = micro_step(
            state, trainable, teacher_variables, micro_batch, model_state,
            loss_state, jax.random.fold_in(dropout_rng, i),
            jax.random.fold_in(loss_rng, i))
        grad_sum = jax.tree.map(lambda a, g: a + weight * g, grad_sum, grads)
        metric_sum = jax.tree.map(lambda a, m: a + weight * m, metric_sum,
                                  metrics)
        return (grad_sum, metric_sum, model_state, loss_state), None

      first = jax.tree.map(lambda x: x[0], micro_batches)
      metric_shapes = jax.eval_shape(
          lambda: micro_step(state, trainable, teacher_variables, first,
                             state.model_state, state.loss_state, dropout_rng,
                             loss_rng, check=False)[1])
      init = (jax.tree.map(jnp.zeros_like, trainable),
              jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                           metric_shapes),
              state.model_state, state.loss_state)
      (grads, metrics, model_state, loss_state), _ = jax.lax.scan(
          body, init, (micro_batches, weights, jnp.arange(k)))
    if axis_name is not None:
      share = _accumulation.device_weight(batch, accumulation_weighting,
                                          mask_key, axis_name)
      if share is None:
        grads = jax.lax.pmean(grads, axis_name)
        metrics = jax.lax.pmean(metrics, axis_name)
      else:  # masked token means: weight each device by its real tokens
        grads = jax.lax.psum(jax.tree.map(lambda g: share * g, grads),
                             axis_name)
        metrics = jax.lax.psum(jax.tree.map(lambda m: share * m, metrics),
                               axis_name)
      model_state = jax.tree.map(
          lambda x: jax.lax.pmean(x, axis_name)
          if jnp.issubdtype(x.dtype, jnp.floating) else x, model_state)
    updates, opt_state = optimizer.update(grads, state.opt_state, trainable)
    trainable = optax.apply_updates(trainable, updates)
    ema_params = state.ema_params
    if ema_decay is not None:
      decay = evaluate_schedule(ema_decay, state.step)
      ema_params = optax.incremental_update(trainable["student"], ema_params,
                                            1.0 - decay)
    new_state = state.replace(
        step=state.step + 1, params=trainable["student"],
        model_state=model_state, loss_params=trainable["loss"],
        opt_state=opt_state, loss_state=loss_state, rng=rng,
        ema_params=ema_params)
    if log_grad_norm:
      metrics["grad_norm"] = optax.tree.norm(grads["student"])
    return new_state, metrics

  step.kdjax_checks = bool(check_teacher_finite)
  return step


def _throwing(checked_step):
  """Calls a checkified step and raises on a failed check.

  ``FloatingPointError`` for the teacher's non-finite output, ``ValueError``
  for the losses' value checks (temperature, labels, ...).
  """

  @functools.wraps(checked_step)
  def run(*args, **kwargs):
    err, out = checked_step(*args, **kwargs)
    try:
      err.throw()
    except checkify.JaxRuntimeError as e:
      message = str(e).split("\n")[0]
      if message.startswith(_TEACHER_CHECK_PREFIX):
        raise FloatingPointError(message) from e
      raise ValueError(message) from e
    return out

  run.checked = checked_step
  return run


def finalize_step(step, *, jit: bool, donate: bool, check: bool,
                  **jit_kwargs):
  """Wraps a step function: checkify (if ``check``), then ``jax.jit``.

  A step built with checks (:func:`build_step_fn` with ``checks`` or
  ``check_teacher_finite``) is checkified even when ``check`` is ``False``;
  its ``out_shardings``, given for the unchecked outputs, then get ``None``
  for checkify's error value.
  """
  if not check and getattr(step, "kdjax_checks", False):
    check = True
    if "out_shardings" in jit_kwargs:
      jit_kwargs["out_shardings"] = (None, jit_kwargs["out_shardings"])
  if check:
    step = checkify.checkify(step, errors=checkify.user_checks)
  if jit:
    step = jax.jit(step, donate_argnums=(0,) if donate else (), **jit_kwargs)
  return _throwing(step) if check else step


def make_train_step(student_apply: ApplyFn,
                    teacher_apply: Optional[ApplyFn],
                    loss_fn: ComposedLoss,
                    optimizer: optax.GradientTransformation,
                    *,
                    ema_decay: Optional[Union[float, Callable]] = None,
                    teacher_is_ema: bool = False,
                    donate: bool = True,
                    jit: bool = True,
                    accumulation_steps: int = 1,
                    accumulation_weighting: str = "auto",
                    mask_key: Optional[str] = "mask",
                    policy: Optional[Policy] = None,
                    check_teacher_finite: bool = False,
                    checks: bool = False,
                    teacher_name: str = "teacher",
                    log_grad_norm: bool = False):
  """Builds ``step(state, teacher_variables, batch) -> (state, metrics)``.

  One step computes the frozen teacher's outputs, the student's, the composed
  loss ``L = sum_i w_i(step) * term_i``, its gradient with respect to
  ``{student params, loss-term params}`` and one optax update.

  Args:
    student_apply: the student's apply function (``kdjax.models``).
    teacher_apply: the teacher's apply function, or ``None`` for a student
      trained alone (then every loss term must have ``needs_teacher=False``
      and ``teacher_variables`` is ignored). An offline cache's apply function
      (``kdjax.cache``) reads the teacher's outputs from the batch.
    loss_fn: a :class:`kdjax.losses.ComposedLoss`.
    optimizer: optax transformation over ``{"student", "loss"}`` params.
    ema_decay: if set (float or schedule of the step), ``state.ema_params``
      tracks ``decay * ema + (1 - decay) * params`` after each update.
    teacher_is_ema: the teacher is the student's own EMA (mean teacher):
      ``teacher_variables`` is ignored and ``state.ema_variables()`` is run
      through ``student_apply`` (or ``teacher_apply`` when given).
    donate: donate the state's buffers to the step.
    jit: return the jitted step (``False`` for debugging).
    accumulation_steps: ``k >= 1``; the batch (leading axis ``B``, divisible
      by ``k``) is split into ``k`` micro-batches whose gradients are summed
      with weights ``n_i / N`` in a ``lax.scan`` before one optimizer update.
      Equal to the full-batch step for mean-reduced losses (see
      ``kdjax/train/_accumulation.py``).
    accumulation_weighting: ``"auto"`` (by the mask's total weight per
      micro-batch when ``batch[mask_key]`` exists, else ``1/k``), ``"mask"``
      or ``"equal"``.
    mask_key: the batch key of the (token) mask used by the weighting.
    policy: a :class:`kdjax.train.Policy` (mixed precision); ``None`` is all
      float32.
    check_teacher_finite: check (with ``jax.experimental.checkify``) that the
      teacher's logits and features are finite; a failure raises
      ``FloatingPointError`` naming ``teacher_name``. The step then syncs with
      the device every call: a debugging option. Implied by ``checks``.
    checks: the step's run-time checks (a debugging option, off by default;
      off, the compiled step is unchanged). The losses check their arguments
      eagerly when concrete, but inside the jitted step the temperature (a
      schedule of the step), the labels and the teacher's output are traced:
      a bad value would give a NaN (or silently wrong) loss. With
      ``checks=True`` they are ``jax.experimental.checkify`` checks (the
      losses' :func:`kdjax.losses.runtime_checks`) and the step raises
      ``ValueError`` for a temperature ``<= 0`` (or NaN), a label outside
      ``[0, C)`` (or a negative loss weight, a mixing coefficient outside
      ``[0, 1]``), and ``FloatingPointError`` naming ``teacher_name`` for
      NaN/inf in the teacher's logits or features. Each call then waits for
      the device; the state passed to a step that raises is donated (gone):
      restart from a checkpoint or from ``donate=False``.
    teacher_name: the teacher's name in error messages.
    log_grad_norm: add ``"grad_norm"`` (global norm of the student's
      gradient) to the metrics.

  Returns:
    The step. ``metrics`` holds the total ``"loss"`` and every term of
    ``loss_fn`` (unweighted), weights and temperature, as device scalars:
    fetch them every N steps, not every step.
  """
  step = build_step_fn(
      student_apply, teacher_apply, loss_fn, optimizer, ema_decay=ema_decay,
      teacher_is_ema=teacher_is_ema, accumulation_steps=accumulation_steps,
      accumulation_weighting=accumulation_weighting, mask_key=mask_key,
      policy=policy, check_teacher_finite=check_teacher_finite,
      checks=checks, teacher_name=teacher_name, log_grad_norm=log_grad_norm)
  return finalize_step(step, jit=jit, donate=donate,
                       check=check_teacher_finite or checks)


def make_eval_step(student_apply: ApplyFn,
                   teacher_apply: Optional[ApplyFn] = None,
                   *,
                   label_key: str = "label",
                   temperature: float = 1.0,
                   jit: bool = True,
                   policy: Optional[Policy] = None):
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


def evaluate(eval_step, student_variables, teacher_variables,
             batches) -> dict:
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
