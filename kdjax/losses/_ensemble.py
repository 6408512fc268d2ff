"""Multi-teacher distillation: combining several teachers' predictions.

``M`` teachers give logits ``z_1 .. z_M`` (each ``[..., C]``, the same classes),
passed as a sequence of arrays or stacked as one ``[M, ..., C]`` array. With
``p_i = softmax(z_i / T)`` and the student's ``q = softmax(z_s / T)``:

* ``"mean_probs"``: distil the averaged distribution
  ``p = (1/M) sum_i p_i`` (the ensemble's prediction; Hinton et al. 2015,
  Sec. 2 on ensembles; You et al. 2017), ``T^2 KL(p || q)``.
* ``"weighted"``: fixed teacher weights ``w_i`` (normalised to sum 1),
  ``p = sum_i w_i p_i``.
* ``"confidence"``: per-example weights from each teacher's confidence,
  ``w_i(x) = softmax_i(-H(p_i(x)) / tau)`` with ``H`` the entropy: a teacher
  more certain about this example counts more (entropy-based weighting as in
  e.g. Kwon et al. 2020, "Adaptive Knowledge Distillation Based on Entropy").
* ``"per_teacher_sum"``: a separate KL to each teacher,
  ``sum_i w_i T^2 KL(p_i || q)`` (``w_i = 1/M`` by default, i.e. the mean of
  the per-teacher losses; pass ``weights`` for any other weighting).

All compute in float32, reduce like the single-teacher losses (``mask``,
``reduction``), and are jit/grad/vmap-safe. The models side
(``kdjax.models.ensemble_apply``) runs every teacher in one jitted step and
returns their logits stacked under ``features["teacher_logits"]``;
:func:`multi_teacher_term` reads them there.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Union

import chex
import jax
import jax.numpy as jnp

from kdjax.losses import _utils
from kdjax.losses._compose import Term
from kdjax.losses._compose import TermInputs
from kdjax.losses._compose import batch_mask
from kdjax.losses._divergences import kl_from_log_probs

TEACHER_LOGITS_KEY = "teacher_logits"
MODES = ("mean_probs", "weighted", "confidence", "per_teacher_sum")

TeacherLogits = Union[chex.Array, Sequence[chex.Array]]


def stack_teacher_logits(teacher_logits_list: TeacherLogits) -> chex.Array:
  """Stacks ``M`` teachers' logits into ``[M, ..., C]`` float32.

  Raises a ``ValueError`` naming every teacher's class count when they
  disagree, or the shapes when the leading (batch) shapes disagree.
  """
  if isinstance(teacher_logits_list, (list, tuple)):
    if not teacher_logits_list:
      raise ValueError("multi-teacher losses need at least one teacher.")
    shapes = [tuple(jnp.shape(z)) for z in teacher_logits_list]
    if any(len(s) == 0 for s in shapes):
      raise ValueError(f"teacher logits need a class axis; got shapes {shapes}.")
    counts = [s[-1] for s in shapes]
    if len(set(counts)) > 1:
      detail = ", ".join(f"teacher {i} has {c}" for i, c in enumerate(counts))
      raise ValueError(
          f"the teachers' class counts disagree ({detail} classes); every "
          "teacher must predict the same classes.")
    if len(set(shapes)) > 1:
      raise ValueError(
          f"the teachers' logits shapes disagree: {shapes}; they must share "
          "the batch/sequence shape.")
    return jnp.stack([_utils.to_float32(z) for z in teacher_logits_list])
  stacked = _utils.to_float32(teacher_logits_list)
  if stacked.ndim < 2:
    raise ValueError(
        "stacked teacher logits must be [M, ..., C] (M teachers); got shape "
        f"{tuple(stacked.shape)}.")
  return stacked


def _teacher_log_probs(stacked: chex.Array, temperature) -> chex.Array:
  t = jnp.asarray(temperature, jnp.float32)
  return jax.nn.log_softmax(stacked / t, axis=-1)


def _normalised_weights(weights, num_teachers: int,
                        batch_shape: tuple) -> chex.Array:
  """Weights ``[M]`` or ``[M, ...]`` normalised over teachers, broadcast to ``[M, ...]``."""
  w = _utils.to_float32(weights)
  if w.ndim == 0 or w.shape[0] != num_teachers:
    raise ValueError(
        f"weights must have one entry per teacher (leading axis {num_teachers})"
        f", got shape {tuple(w.shape)}.")
  concrete = _utils._concrete_value(w)  # pylint: disable=protected-access
  if concrete is not None and (concrete < 0).any():
    raise ValueError(f"teacher weights must be >= 0, got {concrete}.")
  if w.ndim == 1:
    w = w.reshape((num_teachers,) + (1,) * len(batch_shape))
  elif tuple(w.shape[1:]) != tuple(batch_shape):
    raise ValueError(
        f"per-example weights must be [M, ...] = {(num_teachers,) + tuple(batch_shape)}"
        f", got {tuple(w.shape)}.")
  total = jnp.sum(w, axis=0, keepdims=True)
  return w / jnp.maximum(total, 1e-12)


def _entropy(log_p: chex.Array) -> chex.Array:
  p = jnp.exp(log_p)
  return -jnp.sum(jnp.where(p > 0, p * log_p, 0.0), axis=-1)


def confidence_weights(teacher_logits_list: TeacherLogits,
                       temperature: chex.Numeric = 1.0,
                       *,
                       weight_temperature: chex.Numeric = 1.0) -> chex.Array:
  r"""Per-example teacher weights from their confidence (negative entropy).

  .. math::
    H_i(x) = -\sum_c p_{i,c}(x) \log p_{i,c}(x),\quad
    p_i = \mathrm{softmax}(z_i / T),\qquad
    w_i(x) = \frac{\exp(-H_i(x) / \tau)}{\sum_j \exp(-H_j(x) / \tau)}

  A lower entropy (a more certain teacher) gives a larger weight;
  ``tau = weight_temperature`` sets how sharply (``tau -> inf``: uniform,
  ``tau -> 0``: the most certain teacher alone). The weights carry no gradient
  (teachers are frozen).

  Args:
    teacher_logits_list: ``M`` arrays ``[..., C]`` or one ``[M, ..., C]``.
    temperature: ``T > 0`` of the teachers' softmax.
    weight_temperature: ``tau > 0``.

  Returns:
    ``[M, ...]`` float32 weights, summing to 1 over the teacher axis.
  """
  _utils.check_temperature(temperature)
  _utils.check_temperature(weight_temperature, "weight_temperature")
  stacked = stack_teacher_logits(teacher_logits_list)
  log_p = _teacher_log_probs(stacked, temperature)
  neg_entropy = -_entropy(log_p)  # [M, ...]
  tau = jnp.asarray(weight_temperature, jnp.float32)
  return jax.lax.stop_gradient(jax.nn.softmax(neg_entropy / tau, axis=0))


def _ensemble_log_probs(stacked, temperature, weights) -> chex.Array:
  """``log sum_i w_i p_i`` computed in log space; ``w`` ``[M, ...]`` normalised."""
  log_p = _teacher_log_probs(stacked, temperature)
  log_w = jnp.log(jnp.maximum(weights, 0.0))[..., None]  # log 0 = -inf is fine
  return jax.nn.logsumexp(log_w + log_p, axis=0)


def ensemble_probabilities(teacher_logits_list: TeacherLogits,
                           weights: Optional[chex.Array] = None,
                           temperature: chex.Numeric = 1.0) -> chex.Array:
  r"""The teachers' averaged distribution :math:`\sum_i w_i\,\mathrm{softmax}(z_i / T)`.

  Args:
    teacher_logits_list: ``M`` arrays ``[..., C]`` or one ``[M, ..., C]``.
    weights: ``None`` (uniform ``1/M``), fixed ``[M]`` weights, or
      per-example ``[M, ...]`` weights (e.g. :func:`confidence_weights`);
      normalised to sum 1 over the teachers.
    temperature: ``T > 0``.

  Returns:
    ``[..., C]`` float32 probabilities.
  """
  _utils.check_temperature(temperature)
  stacked = stack_teacher_logits(teacher_logits_list)
  num_teachers, batch_shape = stacked.shape[0], stacked.shape[1:-1]
  if weights is None:
    weights = jnp.ones((num_teachers,), jnp.float32)
  w = _normalised_weights(weights, num_teachers, batch_shape)
  return jnp.exp(_ensemble_log_probs(stacked, temperature, w))


def multi_teacher_kl(student_logits: chex.Array,
                     teacher_logits_list: TeacherLogits,
                     *,
                     mode: str = "mean_probs",
                     weights: Optional[chex.Array] = None,
                     temperature: chex.Numeric = 1.0,
                     weight_temperature: chex.Numeric = 1.0,
                     mask: Optional[chex.Array] = None,
                     reduction: str = "mean",
                     scale_by_temperature: bool = True) -> chex.Array:
  r"""KL distillation from several teachers.

  With ``p_i = softmax(z_i / T)``, ``q = softmax(z_s / T)``:

  * ``"mean_probs"``: :math:`T^2\,\mathrm{KL}(\tfrac1M\sum_i p_i \,\|\, q)`.
  * ``"weighted"``: :math:`T^2\,\mathrm{KL}(\sum_i w_i p_i \,\|\, q)` with
    fixed ``weights`` ``[M]`` (required), normalised to sum 1.
  * ``"confidence"``: as ``"weighted"`` with per-example
    :func:`confidence_weights` (``tau = weight_temperature``).
  * ``"per_teacher_sum"``: :math:`T^2 \sum_i w_i\,\mathrm{KL}(p_i \,\|\, q)`,
    ``w_i = 1/M`` unless ``weights`` are given (then used as given, not
    normalised).

  Args:
    student_logits: ``[..., C]``.
    teacher_logits_list: ``M`` arrays ``[..., C]`` or one ``[M, ..., C]``.
    mode: one of ``"mean_probs"``, ``"weighted"``, ``"confidence"``,
      ``"per_teacher_sum"``.
    weights: teacher weights (see ``mode``).
    temperature: ``T > 0``.
    weight_temperature: ``tau`` of ``"confidence"``.
    mask: optional ``[...]``.
    reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    scale_by_temperature: multiply by ``T**2``.

  Returns:
    Scalar, or ``[...]`` for ``reduction="none"``.
  """
  if mode not in MODES:
    raise ValueError(f"unknown multi-teacher mode {mode!r}; expected one of "
                     f"{MODES}.")
  _utils.check_temperature(temperature)
  _utils.check_reduction(reduction)
  stacked = stack_teacher_logits(teacher_logits_list)
  num_teachers = stacked.shape[0]
  s_shape = tuple(jnp.shape(student_logits))
  if s_shape[-1:] != stacked.shape[-1:]:
    raise ValueError(
        f"class-count mismatch: the student has {s_shape[-1] if s_shape else None}"
        f" classes (shape {s_shape}) but the teachers have {stacked.shape[-1]} "
        f"(stacked shape {tuple(stacked.shape)}).")
  if s_shape != tuple(stacked.shape[1:]):
    raise ValueError(
        f"student logits {s_shape} and teacher logits {tuple(stacked.shape[1:])}"
        " must have the same shape.")
  batch_shape = s_shape[:-1]
  _utils.check_mask(mask, batch_shape)
  log_q = jax.nn.log_softmax(
      _utils.to_float32(student_logits) / jnp.asarray(temperature, jnp.float32),
      axis=-1)
  if mode == "per_teacher_sum":
    log_p = _teacher_log_probs(stacked, temperature)
    per_teacher = kl_from_log_probs(log_p, log_q[None])  # [M, ...]
    if weights is None:
      w = jnp.full((num_teachers,) + (1,) * len(batch_shape),
                   1.0 / num_teachers, jnp.float32)
    else:
      w = _utils.to_float32(weights)
      if w.shape[:1] != (num_teachers,):
        raise ValueError(f"weights must have one entry per teacher ({num_teachers}"
                         f"), got shape {tuple(w.shape)}.")
      if w.ndim == 1:
        w = w.reshape((num_teachers,) + (1,) * len(batch_shape))
    per_position = jnp.sum(w * per_teacher, axis=0)
  else:
    if mode == "mean_probs":
      if weights is not None:
        raise ValueError("mode='mean_probs' takes no weights; use "
                         "mode='weighted'.")
      w = jnp.ones((num_teachers,), jnp.float32)
    elif mode == "weighted":
      if weights is None:
        raise ValueError("mode='weighted' needs weights (one per teacher).")
      w = weights
    else:  # confidence
      w = confidence_weights(stacked, temperature,
                             weight_temperature=weight_temperature)
    w = _normalised_weights(w, num_teachers, batch_shape)
    log_p = _ensemble_log_probs(stacked, temperature, w)
    per_position = kl_from_log_probs(log_p, log_q)
  if scale_by_temperature:
    per_position = per_position * jnp.square(
        jnp.asarray(temperature, jnp.float32))
  return _utils.reduce_loss(per_position, mask, reduction)


def teacher_logits_of(teacher: Any, student_logits_ndim: Optional[int] = None,
                      key: str = TEACHER_LOGITS_KEY) -> chex.Array:
  """The stacked ``[M, ..., C]`` teacher logits of a (multi-)teacher output.

  Reads ``teacher.features[key]`` (what ``kdjax.models.ensemble_apply``
  produces), else ``teacher.logits`` when it has one more axis than the
  student's logits (a user-stacked ensemble).
  """
  features = getattr(teacher, "features", None) or {}
  if key in features:
    return features[key]
  logits = teacher.logits
  if student_logits_ndim is not None and jnp.ndim(logits) == student_logits_ndim + 1:
    return logits
  raise KeyError(
      f"multi-teacher terms need the stacked teacher logits in "
      f"teacher.features[{key!r}] (run the teachers with "
      "kdjax.models.ensemble_apply) or teacher.logits of shape [M, ..., C]; "
      f"got features {sorted(features)} and logits of shape "
      f"{tuple(jnp.shape(logits))}.")


def multi_teacher_term(name: str = "multi_teacher",
                       *,
                       mode: str = "mean_probs",
                       weights: Optional[Sequence[float]] = None,
                       weight: Any = 1.0,
                       weight_temperature: chex.Numeric = 1.0,
                       teacher_logits_key: str = TEACHER_LOGITS_KEY,
                       mask_key: Optional[str] = "mask") -> Term:
  """:func:`multi_teacher_kl` as a :class:`kdjax.losses.Term`.

  The temperature comes from the composition; the teachers' logits from
  :func:`teacher_logits_of` (``features["teacher_logits"]`` of
  ``kdjax.models.ensemble_apply``).
  """
  if mode not in MODES:
    raise ValueError(f"unknown multi-teacher mode {mode!r}; expected one of "
                     f"{MODES}.")
  if mode == "weighted" and weights is None:
    raise ValueError("mode='weighted' needs weights (one per teacher).")
  fixed = None if weights is None else jnp.asarray(weights, jnp.float32)

  def fn(inputs: TermInputs) -> chex.Array:
    s_logits = inputs.student.logits
    stacked = teacher_logits_of(inputs.teacher, jnp.ndim(s_logits),
                                teacher_logits_key)
    return multi_teacher_kl(
        s_logits, stacked, mode=mode, weights=fixed,
        temperature=inputs.temperature, weight_temperature=weight_temperature,
        mask=batch_mask(inputs.batch, mask_key))

  return Term(name, fn, weight)
