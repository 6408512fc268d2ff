"""Composing loss terms: weighted sums whose weights and temperature follow schedules.

A distillation objective is usually a weighted sum, e.g.
``0.1 * CE(student, labels) + 0.9 * T^2 KL(teacher || student)``, with weights
and temperature that may change over training (the teacher's influence fading
to zero, a DKD warm-up). :func:`compose` builds such an objective from
:class:`Term` s. Weights and the temperature are floats or optax schedules
(``step -> value``), evaluated at the step passed to the composed loss, so they
work inside ``jax.jit`` with a traced step.

A term's function receives one :class:`TermInputs` and returns a scalar (or
``(scalar, new_state)`` for a stateful term such as CRD's memory bank). The
inputs are duck-typed: ``student`` and ``teacher`` are anything with
``.logits`` and ``.features`` (``kdjax.models.ModelOutput``), ``batch`` is a
mapping (``batch["label"]``, optional ``batch["mask"]``). Nothing here imports
the training code: the loss library stays usable alone.

Example::

  loss_fn = losses.compose(
      [losses.Term("ce", losses.label_term(), weight=0.1),
       losses.Term("kd", losses.logit_term(losses.kl_divergence),
                   weight=optax.linear_schedule(0.9, 0.0, 10_000))],
      temperature=4.0)
  total, aux = loss_fn(student_out, teacher_out, batch, step=step)
  aux.terms  # {"ce": ..., "kd": ..., "weight/kd": ..., "temperature": ...}
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence, Union

import chex
import jax
import jax.numpy as jnp

from kdjax.losses import _utils
from kdjax.losses._decoupled import dist as _dist
from kdjax.losses._decoupled import dkd as _dkd
from kdjax.losses._divergences import hard_label_cross_entropy

# A term's weight or a temperature: a constant, or a schedule of the step
# (e.g. an ``optax`` schedule).
ScalarOrSchedule = Union[float, Callable[[chex.Numeric], chex.Numeric]]


@dataclasses.dataclass(frozen=True)
class TermInputs:
  """Everything a loss term may read in one step.

  Attributes:
    student: the student's output (``.logits``, ``.features``).
    teacher: the teacher's output (already ``stop_gradient``-ed by the step),
      or ``None`` for a student-only term.
    batch: the batch mapping (``"label"``, optional ``"mask"``, ...).
    temperature: the temperature at this step (float32 scalar).
    step: the current step (int32 scalar).
    params: this term's learnable parameters (e.g. a FitNets connector), or
      ``None``.
    state: this term's non-learned state (e.g. a CRD memory bank), or ``None``.
    rng: a PRNG key for this term, or ``None``.
    train: whether this is a training step.
  """
  student: Any
  teacher: Any
  batch: Mapping[str, Any]
  temperature: chex.Array
  step: chex.Array
  params: Any = None
  state: Any = None
  rng: Optional[chex.PRNGKey] = None
  train: bool = True


def evaluate_schedule(value: ScalarOrSchedule, step: chex.Numeric) -> chex.Array:
  """Returns ``value(step)`` for a schedule, ``value`` for a constant (float32)."""
  if callable(value):
    return jnp.asarray(value(step), jnp.float32)
  return jnp.asarray(value, jnp.float32)


@dataclasses.dataclass(frozen=True)
class Term:
  """One named, weighted term of a composed loss.

  Attributes:
    name: the key under which the term is reported.
    fn: ``fn(inputs: TermInputs) -> scalar`` or, if ``stateful``,
      ``-> (scalar, new_state)``.
    weight: a float or an optax schedule of the step.
    stateful: whether ``fn`` returns a new state.
    init_params: optional ``init_params(rng, student_out, teacher_out, batch)``
      returning this term's learnable parameters (trained with the student,
      dropped at export).
    init_state: optional ``init_state(rng, student_out, teacher_out, batch)``
      returning this term's initial state.
    needs_teacher: ``False`` for terms that only read the student and batch
      (hard-label CE), so that a schedule can drop the teacher entirely.
  """
  name: str
  fn: Callable[..., Any]
  weight: ScalarOrSchedule = 1.0
  stateful: bool = False
  init_params: Optional[Callable[..., Any]] = None
  init_state: Optional[Callable[..., Any]] = None
  needs_teacher: bool = True


class LossAux(NamedTuple):
  """Auxiliary output of a composed loss.

  Attributes:
    terms: ``{name: unweighted value, "weight/name": weight, "temperature": T}``.
    state: ``{name: new_state}`` for stateful terms.
  """
  terms: dict
  state: dict


@dataclasses.dataclass(frozen=True)
class ComposedLoss:
  """A weighted sum of :class:`Term` s; see :func:`compose`."""
  terms: tuple
  temperature: ScalarOrSchedule = 1.0

  @property
  def names(self) -> tuple:
    return tuple(t.name for t in self.terms)

  def init_params(self, rng, student_out, teacher_out, batch) -> dict:
    """Initial learnable params of every term that has some, by term name."""
    params = {}
    for term in self.terms:
      if term.init_params is not None:
        rng, sub = jax.random.split(rng)
        params[term.name] = term.init_params(sub, student_out, teacher_out,
                                             batch)
    return params

  def init_state(self, rng, student_out, teacher_out, batch) -> dict:
    """Initial state of every stateful term, by term name."""
    state = {}
    for term in self.terms:
      if term.init_state is not None:
        rng, sub = jax.random.split(rng)
        state[term.name] = term.init_state(sub, student_out, teacher_out, batch)
    return state

  def __call__(self,
               student,
               teacher,
               batch: Mapping[str, Any],
               *,
               step: chex.Numeric = 0,
               params: Optional[Mapping[str, Any]] = None,
               state: Optional[Mapping[str, Any]] = None,
               rng: Optional[chex.PRNGKey] = None,
               train: bool = True) -> tuple[chex.Array, LossAux]:
    """Returns ``(total, LossAux)`` at ``step``.

    ``total = sum_i weight_i(step) * term_i``; ``aux.terms`` reports each
    unweighted term, its weight and the temperature, for logging.

    A temperature schedule's value must be ``> 0``: checked eagerly when
    ``step`` is concrete, and inside a jitted step only under
    :func:`kdjax.losses.runtime_checks` (``make_train_step(...,
    checks=True)``); the terms check their own arguments likewise.
    """
    params = dict(params or {})
    state = dict(state or {})
    step = jnp.asarray(step, jnp.int32)
    temperature = evaluate_schedule(self.temperature, step)
    if callable(self.temperature):
      _utils.check_temperature(temperature,
                               "the composed loss's temperature schedule")
    total = jnp.zeros((), jnp.float32)
    reported, new_state = {}, {}
    for i, term in enumerate(self.terms):
      term_rng = None if rng is None else jax.random.fold_in(rng, i)
      inputs = TermInputs(student=student, teacher=teacher, batch=batch,
                          temperature=temperature, step=step,
                          params=params.get(term.name),
                          state=state.get(term.name), rng=term_rng, train=train)
      if teacher is None and term.needs_teacher:
        raise ValueError(
            f"loss term {term.name!r} needs the teacher's output but teacher "
            "is None (set needs_teacher=False for student-only terms).")
      out = term.fn(inputs)
      if term.stateful:
        if not (isinstance(out, tuple) and len(out) == 2):
          raise ValueError(
              f"stateful loss term {term.name!r} must return (value, "
              f"new_state), got {type(out).__name__}.")
        value, new_state[term.name] = out
      else:
        value = out
      value = jnp.asarray(value, jnp.float32)
      if value.shape != ():
        raise ValueError(
            f"loss term {term.name!r} returned shape {value.shape}; terms must "
            "return a scalar (use reduction='mean' or 'sum').")
      weight = evaluate_schedule(term.weight, step)
      total = total + weight * value
      reported[term.name] = value
      reported[f"weight/{term.name}"] = weight
    reported["temperature"] = temperature
    return total, LossAux(reported, new_state)


def compose(terms: Union[Sequence[Term], Mapping[str, tuple]],
            temperature: ScalarOrSchedule = 1.0) -> ComposedLoss:
  """Builds a weighted sum of loss terms.

  Args:
    terms: a sequence of :class:`Term`, or a mapping ``name -> (fn, weight)``.
    temperature: a float or an optax schedule of the step, passed to every
      term as ``inputs.temperature``.

  Returns:
    A :class:`ComposedLoss`; call it as
    ``loss(student_out, teacher_out, batch, step=step)``.
  """
  if isinstance(terms, Mapping):
    terms = [Term(name, fn, weight) for name, (fn, weight) in terms.items()]
  terms = tuple(terms)
  if not terms:
    raise ValueError("compose() needs at least one term.")
  for term in terms:
    if not isinstance(term, Term):
      raise TypeError(f"expected kdjax.losses.Term, got {type(term).__name__}.")
  names = [t.name for t in terms]
  if len(set(names)) != len(names):
    duplicates = sorted({n for n in names if names.count(n) > 1})
    raise ValueError(
        f"loss term names must be unique; {duplicates} repeated in {names}.")
  for term in terms:
    if not isinstance(term.name, str) or not term.name:
      raise ValueError(
          f"loss term names must be non-empty strings, got {term.name!r}.")
    if term.name == "temperature" or term.name.startswith("weight/"):
      raise ValueError(
          f"loss term name {term.name!r} is reserved for LossAux.terms "
          "(\"temperature\", \"weight/<name>\").")
    if not callable(term.fn):
      raise TypeError(
          f"fn of term {term.name!r} must be callable, got "
          f"{type(term.fn).__name__}.")
    if not callable(term.weight):
      weight = _utils._concrete_value(term.weight)  # pylint: disable=protected-access
      if weight is not None and weight < 0:
        raise ValueError(f"weight of term {term.name!r} must be >= 0, got "
                         f"{term.weight}.")
  if not callable(temperature):
    _utils.check_temperature(temperature)
  return ComposedLoss(terms, temperature)


# -----------------------------------------------------------------------------
# Term factories for the logit losses.
# -----------------------------------------------------------------------------


def _accepts(fn, name: str) -> bool:
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False
  return name in params or any(
      p.kind == inspect.Parameter.VAR_KEYWORD for p in params.values())


def batch_mask(batch: Mapping[str, Any], mask_key: Optional[str]):
  if mask_key is None or not isinstance(batch, Mapping):
    return None
  return batch.get(mask_key)


def logit_term(loss_fn: Callable[..., chex.Array],
               *,
               use_temperature: bool = True,
               mask_key: Optional[str] = "mask",
               **kwargs: Any) -> Callable[[TermInputs], chex.Array]:
  """Wraps a ``(student_logits, teacher_logits, ...)`` loss as a term function.

  The term passes ``inputs.temperature`` (when the loss takes one and
  ``use_temperature``), ``batch[mask_key]`` as the mask when present, and the
  extra ``kwargs`` (e.g. ``beta=0.5``).
  """
  takes_temperature = use_temperature and _accepts(loss_fn, "temperature")
  takes_mask = _accepts(loss_fn, "mask")

  def term(inputs: TermInputs) -> chex.Array:
    extra = dict(kwargs)
    if takes_temperature:
      extra["temperature"] = inputs.temperature
    mask = batch_mask(inputs.batch, mask_key)
    if takes_mask and mask is not None:
      extra["mask"] = mask
    return loss_fn(inputs.student.logits, inputs.teacher.logits, **extra)

  return term


def label_term(*,
               label_key: str = "label",
               mask_key: Optional[str] = "mask",
               label_smoothing: float = 0.0) -> Callable[[TermInputs], chex.Array]:
  """The hard-label cross-entropy of the student as a term function."""

  def term(inputs: TermInputs) -> chex.Array:
    return hard_label_cross_entropy(
        inputs.student.logits, inputs.batch[label_key],
        label_smoothing=label_smoothing,
        mask=batch_mask(inputs.batch, mask_key))

  return term


def dkd_term(*, alpha: chex.Numeric = 1.0, beta: chex.Numeric = 8.0,
             label_key: str = "label",
             mask_key: Optional[str] = "mask") -> Callable[[TermInputs], chex.Array]:
  """:func:`kdjax.losses.dkd` as a term function (temperature from the composition)."""

  def term(inputs: TermInputs) -> chex.Array:
    return _dkd(inputs.student.logits, inputs.teacher.logits,
                inputs.batch[label_key], alpha=alpha, beta=beta,
                temperature=inputs.temperature,
                mask=batch_mask(inputs.batch, mask_key))

  return term


def dist_term(*, beta: chex.Numeric = 1.0, gamma: chex.Numeric = 1.0,
              mask_key: Optional[str] = "mask") -> Callable[[TermInputs], chex.Array]:
  """:func:`kdjax.losses.dist` as a term function (temperature from the composition)."""

  def term(inputs: TermInputs) -> chex.Array:
    return _dist(inputs.student.logits, inputs.teacher.logits, beta=beta,
                 gamma=gamma, temperature=inputs.temperature,
                 mask=batch_mask(inputs.batch, mask_key))

  return term
