"""Self-distillation recipes: the mean teacher and born-again networks.

* **Mean teacher** (Tarvainen & Valpola, NeurIPS 2017): the teacher is an
  exponential moving average (EMA) of the student's own weights,
  ``theta'_t = a_t theta'_{t-1} + (1 - a_t) theta_t``, and the student is
  trained with its cross-entropy plus a consistency cost between its
  predictions and the EMA teacher's. :func:`mean_teacher_step` builds that step
  on :func:`kdjax.train.make_train_step` (``teacher_is_ema=True``) with the
  reference code's defaults (:func:`mean_teacher_loss`,
  :func:`mean_teacher_decay`).
* **Born-again networks** (Furlanello et al., ICML 2018): a sequence of
  generations of the same architecture; generation ``k``, once trained, is the
  frozen teacher of generation ``k+1``. :func:`born_again` runs the generations
  and returns each one's parameters, teacher and evaluation.
"""

from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, NamedTuple, Optional, Union

import chex
import jax
import jax.numpy as jnp
import optax

from kdjax import losses
from kdjax.losses import ComposedLoss
from kdjax.losses import Term
from kdjax.losses import compose
from kdjax.losses import kl_divergence
from kdjax.losses import label_term
from kdjax.losses import logit_term
from kdjax.train._loop import fit
from kdjax.train._options import StepOptions
from kdjax.train._state import create_state
from kdjax.train._step import evaluate
from kdjax.train._step import make_eval_step
from kdjax.train._step import make_train_step
from kdjax.train._step import StepFn
from kdjax.train._step import teacher_forward

# -----------------------------------------------------------------------------
# Mean teacher.
# -----------------------------------------------------------------------------


def mean_teacher_decay(decay: float = 0.999) -> Callable[[chex.Numeric], chex.Array]:
  """The mean teacher's EMA decay schedule, ``a(step) = min(1 - 1/(step + 2), decay)``.

  The reference code (CuriousAI/mean-teacher, ``update_ema_variables``) uses
  ``min(1 - 1/(global_step + 1), decay)`` with ``global_step`` counting the
  updates done *including* this one; :func:`kdjax.train.make_train_step`
  evaluates the schedule at the number of updates done *before* this one,
  hence ``step + 2``. The EMA is then the true average of the weights seen so
  far until that average weights old values less than ``decay`` would
  (``a = 0.5, 0.667, 0.75, ...``).
  """
  losses.check_unit_interval(decay, "decay")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    return jnp.minimum(1.0 - 1.0 / (step + 2.0), decay)

  return schedule


def sigmoid_rampup(max_value: float, rampup_steps: int) -> Callable[[chex.Numeric], chex.Array]:
  """``max_value * exp(-5 (1 - min(step / rampup_steps, 1))**2)`` (Laine & Aila 2017).

  The consistency-weight ramp-up of the mean teacher; ``rampup_steps = 0``
  gives the constant ``max_value``.
  """
  if rampup_steps < 0:
    raise ValueError(f"rampup_steps must be >= 0, got {rampup_steps}.")

  def schedule(step):
    if rampup_steps == 0:
      return jnp.asarray(max_value, jnp.float32)
    t = jnp.clip(jnp.asarray(step, jnp.float32) / rampup_steps, 0.0, 1.0)
    return max_value * jnp.exp(-5.0 * jnp.square(1.0 - t))

  return schedule


def softmax_mse(student_logits: chex.Array,
                teacher_logits: chex.Array,
                temperature: float = 1.0,
                *,
                mask: Optional[chex.Array] = None,
                reduction: str = "mean") -> chex.Array:
  r"""The mean teacher's consistency cost: :math:`\tfrac1C \sum_c (q_c - p_c)^2`.

  ``q = softmax(z_s / T)``, ``p = softmax(z_t / T)``; per position the mean
  over the ``C`` classes of the squared difference of probabilities
  (``softmax_mse_loss`` of the reference code, divided by the batch size).

  Args:
    student_logits: ``[..., C]``.
    teacher_logits: ``[..., C]``.
    temperature: ``T > 0``.
    mask: optional ``[...]``.
    reduction: ``"mean"``, ``"sum"`` or ``"none"``.
  """
  losses.check_logits_pair(student_logits, teacher_logits)
  losses.check_temperature(temperature)
  t = jnp.asarray(temperature, jnp.float32)
  q = jax.nn.softmax(losses.to_float32(student_logits) / t, axis=-1)
  p = jax.nn.softmax(losses.to_float32(teacher_logits) / t, axis=-1)
  per_position = jnp.mean(jnp.square(q - p), axis=-1)
  return losses.reduce_loss(per_position, mask, reduction)


def mean_teacher_loss(*,
                      consistency: str = "mse",
                      consistency_weight: float = 100.0,
                      rampup_steps: int = 2000,
                      ce_weight: float = 1.0,
                      temperature: float = 1.0) -> ComposedLoss:
  """The mean teacher's objective: ``CE + w(step) * consistency(student, EMA teacher)``.

  Defaults follow the reference code's CIFAR-10 setting
  (``consistency_type="mse"``, ``consistency=100``, sigmoid ramp-up over 5
  epochs; ``rampup_steps=2000`` is about 5 epochs of CIFAR-10 at batch 128:
  set it from your epoch length).

  Args:
    consistency: ``"mse"`` (:func:`softmax_mse`) or ``"kl"``
      (``KL(p_teacher || q_student)``, the reference's ``softmax_kl_loss``).
    consistency_weight: the maximum consistency weight.
    rampup_steps: steps of the sigmoid ramp-up (:func:`sigmoid_rampup`).
    ce_weight: weight of the hard-label cross-entropy (0 to drop it).
    temperature: softmax temperature of the consistency cost.

  Returns:
    A :class:`kdjax.losses.ComposedLoss` with terms ``"ce"`` and
    ``"consistency"``.
  """
  if consistency == "mse":
    cons = logit_term(softmax_mse)
  elif consistency == "kl":
    cons = logit_term(kl_divergence, scale_by_temperature=False)
  else:
    raise ValueError(f"consistency must be 'mse' or 'kl', got {consistency!r}.")
  terms = []
  if ce_weight:
    terms.append(Term("ce", label_term(), ce_weight, needs_teacher=False))
  terms.append(Term("consistency", cons,
                    sigmoid_rampup(consistency_weight, rampup_steps)))
  return compose(terms, temperature=temperature)


def mean_teacher_step(student_apply: Callable[..., Any],
                      optimizer: optax.GradientTransformation,
                      *,
                      loss_fn: Optional[ComposedLoss] = None,
                      ema_decay: Union[float, Callable[[chex.Numeric], Any]] = 0.999,
                      warmup_average: bool = True,
                      teacher_apply: Optional[Callable[..., Any]] = None,
                      donate: bool = True,
                      jit: bool = True) -> StepFn:
  """A mean-teacher train step: the teacher is the EMA of the student's weights.

  ``step(state, None, batch) -> (state, metrics)``, built by
  :func:`kdjax.train.make_train_step` with ``StepOptions(ema_decay=...,
  teacher_is_ema=True)``. The state
  must keep an EMA: ``create_state(..., ema=True)``. After each update
  ``ema <- a * ema + (1 - a) * params`` with ``a = ema_decay`` (or, with
  ``warmup_average``, :func:`mean_teacher_decay` of it, as the reference code).
  The EMA teacher runs in evaluation mode (the reference runs it in training
  mode, with its own dropout noise; add input noise in the batch if wanted).

  Args:
    student_apply: the student's apply function.
    optimizer: the optax optimizer.
    loss_fn: the objective; :func:`mean_teacher_loss` by default.
    ema_decay: the EMA decay (float or schedule of the step).
    warmup_average: wrap a float ``ema_decay`` in :func:`mean_teacher_decay`.
    teacher_apply: apply function of the EMA teacher (default the student's).
    donate: donate the state's buffers.
    jit: jit the step.

  Returns:
    The train step.
  """
  if loss_fn is None:
    loss_fn = mean_teacher_loss()
  if warmup_average and not callable(ema_decay):
    ema_decay = mean_teacher_decay(ema_decay)
  elif not callable(ema_decay):
    losses.check_unit_interval(ema_decay, "ema_decay")
  options = StepOptions(ema_decay=ema_decay, teacher_is_ema=True)
  return make_train_step(student_apply, teacher_apply, loss_fn, optimizer,
                         options, donate=donate, jit=jit)


# -----------------------------------------------------------------------------
# Born-again networks.
# -----------------------------------------------------------------------------


class GenerationResult(NamedTuple):
  """One born-again generation.

  Attributes:
    generation: ``0`` for a generation trained from labels alone (the first
      teacher), ``1..K`` for the distilled generations.
    variables: the trained student variables (``{"params": ..., ...}``).
    teacher_variables: the frozen teacher it learnt from (the previous
      generation's ``variables`` object itself), ``None`` for generation 0.
    history: the ``(step, mean metrics)`` log of :func:`kdjax.train.fit`.
    eval: :func:`kdjax.train.evaluate`'s report, or ``None`` without
      ``eval_batches``.
  """
  generation: int
  variables: Any
  teacher_variables: Any
  history: list
  eval: Optional[dict]


def born_again_loss(temperature: float = 1.0, ce_weight: float = 0.0,
                    kd_weight: float = 1.0) -> ComposedLoss:
  """BAN's objective: match the previous generation's outputs (KL at ``T``).

  Furlanello et al. train each generation on the teacher's output
  distribution alone (``ce_weight = 0``, ``T = 1``); a hard-label term can be
  added with ``ce_weight``.
  """
  terms = [Term("kd", logit_term(kl_divergence), kd_weight)]
  if ce_weight:
    terms.insert(0, Term("ce", label_term(), ce_weight, needs_teacher=False))
  return compose(terms, temperature=temperature)


def _batches_for(train_batches, generation: int) -> Iterable:
  if callable(train_batches):
    return train_batches(generation)
  if iter(train_batches) is train_batches:
    raise TypeError(
        "born_again needs the training batches once per generation: pass a "
        "callable generation -> iterable, or a re-iterable such as a list "
        "(not a one-shot iterator).")
  return train_batches


def _peek(batches: Iterable) -> tuple[Any, Iterable]:
  """``(first batch, all batches)`` without losing the first of an iterator."""
  iterator = iter(batches)
  try:
    first = next(iterator)
  except StopIteration:
    raise ValueError("born_again got an empty set of training batches.") from None
  return first, itertools.chain([first], iterator)


def born_again(student_apply: Callable[..., Any],
               init_variables: Callable[[chex.PRNGKey], Any],
               optimizer: optax.GradientTransformation,
               train_batches: Union[Iterable, Callable[[int], Iterable]],
               *,
               generations: int,
               rng: chex.PRNGKey,
               loss_fn: Optional[ComposedLoss] = None,
               teacher_variables: Optional[Any] = None,
               teacher_apply: Optional[Callable[..., Any]] = None,
               first_loss_fn: Optional[ComposedLoss] = None,
               eval_batches: Optional[Union[Iterable, Callable[[], Iterable]]] = None,
               log_every: int = 100) -> list[GenerationResult]:
  """Born-again networks (Furlanello et al., ICML 2018).

  Trains ``generations`` students of the same architecture in sequence; the
  student of generation ``k`` (its final variables, frozen) is the teacher of
  generation ``k+1``. The first teacher is ``teacher_variables`` (run with
  ``teacher_apply``, default ``student_apply``) or, when ``None``, a
  generation 0 trained from the labels alone with ``first_loss_fn``
  (cross-entropy by default). Every generation starts from a fresh
  initialisation ``init_variables(key)``. Each step is compiled once and
  reused across generations (the teachers are arguments of the step).

  Args:
    student_apply: the student's apply function.
    init_variables: ``key -> student variables`` (a fresh student).
    optimizer: the optax optimizer (re-initialised each generation).
    train_batches: ``generation -> iterable of batches`` or a re-iterable.
    generations: ``K >= 1`` distilled generations.
    rng: PRNG key.
    loss_fn: the distillation objective (default :func:`born_again_loss`).
    teacher_variables: the first teacher, or ``None`` to train generation 0.
    teacher_apply: the first teacher's apply function.
    first_loss_fn: generation 0's objective (default hard-label CE); its
      terms must not need a teacher.
    eval_batches: optional evaluation batches (re-iterable or a callable),
      evaluated for every generation against its teacher.
    log_every: :func:`kdjax.train.fit`'s logging period.

  Returns:
    The list of :class:`GenerationResult` (generation 0 first when trained).
  """
  if generations < 1:
    raise ValueError(f"generations must be >= 1, got {generations}.")
  if loss_fn is None:
    loss_fn = born_again_loss()
  if first_loss_fn is None:
    first_loss_fn = compose([Term("ce", label_term(), 1.0,
                                  needs_teacher=False)])
  steps: dict = {}

  def get_step(t_apply, fn):
    key = (id(t_apply), id(fn))
    if key not in steps:
      steps[key] = (make_train_step(student_apply, t_apply, fn, optimizer),
                    make_eval_step(student_apply, t_apply))
    return steps[key]

  def run_generation(gen, key, t_apply, t_vars, fn):
    init_key, loss_key, run_key = jax.random.split(key, 3)
    variables = init_variables(init_key)
    first, batches = _peek(_batches_for(train_batches, gen))
    student_out = student_apply(variables, first, train=False)
    teacher_out = (None if t_apply is None
                   else teacher_forward(t_apply, t_vars, first))
    pk, sk = jax.random.split(loss_key)
    state = create_state(
        variables, optimizer, rng=run_key,
        loss_params=fn.init_params(pk, student_out, teacher_out, first),
        loss_state=fn.init_state(sk, student_out, teacher_out, first))
    train_step, eval_step = get_step(t_apply, fn)
    state, history = fit(train_step, state, t_vars, batches,
                         log_every=log_every)
    trained = state.student_variables()
    report = None
    if eval_batches is not None:
      ev = eval_batches() if callable(eval_batches) else eval_batches
      report = evaluate(eval_step, trained, t_vars, ev)
    return GenerationResult(gen, trained, t_vars, history, report)

  results = []
  keys = jax.random.split(rng, generations + 1)
  if teacher_variables is None:
    results.append(run_generation(0, keys[0], None, None, first_loss_fn))
    current_apply, current = student_apply, results[-1].variables
  else:
    current_apply, current = teacher_apply or student_apply, teacher_variables
  for gen in range(1, generations + 1):
    result = run_generation(gen, keys[gen], current_apply, current, loss_fn)
    results.append(result)
    current_apply, current = student_apply, result.variables
  return results
