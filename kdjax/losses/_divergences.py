"""Logit-level divergences between a student and a teacher distribution.

Every function here takes logits of shape ``[..., C]`` (``C`` classes or
vocabulary entries, any number of leading batch/sequence axes), computes in
float32 whatever the input dtype (bfloat16 included), and returns a scalar
(``reduction="mean"`` or ``"sum"``) or the per-position values of shape
``[...]`` (``reduction="none"``).

Conventions
-----------
* ``p`` is the teacher distribution ``softmax(teacher_logits / T)`` and ``q``
  the student's ``softmax(student_logits / T)``.
* Temperature scaling: the KL family (forward/reverse KL, generalised JSD,
  skew KL) and the soft cross-entropy are multiplied by ``T**2``, as in Hinton
  et al. (2015), so that the gradient's magnitude does not shrink as ``1/T**2``
  when the temperature rises and the term can be mixed with a hard-label loss
  without retuning its weight. Pass ``scale_by_temperature=False`` for the raw
  divergence. ``total_variation_distance`` is never scaled.
* ``mask`` (shape ``[...]``, bool or float weights) removes positions such as
  sequence padding; ``"mean"`` divides by the number (total weight) of
  unmasked positions, and a fully masked input gives 0, not NaN.
* Stable for logits up to ``|1e4|`` and for teacher classes of zero
  probability (``-inf`` logits): ``0 * log 0`` is taken as 0, and where the
  other distribution has mass on such a class (reverse KL, JSD at
  ``beta = 1``, skew reverse KL at ``alpha = 0``) the zero probability counts
  as float32's smallest normal number (``log`` about -87.3), so the value and
  gradient stay finite instead of ``inf``/NaN.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import chex
import jax
import jax.numpy as jnp
import numpy as np

from kdjax.losses import _utils

# -----------------------------------------------------------------------------
# Core: divergences between two log-probability vectors over the last axis.
# -----------------------------------------------------------------------------


def _safe_log_probs(log_p: chex.Array) -> tuple[chex.Array, chex.Array]:
  """Returns ``(p, log_p)`` with ``log_p`` set to 0 where ``p == 0``.

  Makes ``p * log_p`` (and its gradient) exactly 0 for zero-probability
  entries instead of ``0 * -inf = NaN``.
  """
  p = jnp.exp(log_p)
  return p, jnp.where(p > 0, log_p, 0.0)


# A class that ``p`` covers but ``q`` gives probability exactly 0 (a ``-inf``
# log-probability, e.g. a masked teacher class in the reverse KL) makes
# ``KL(p || q)`` infinite and its gradient NaN. Such ``log q_c`` are replaced by
# the log of float32's smallest normal number (about -87.3 nats), so value and
# gradient stay finite and the student is still pushed off that class. Finite
# log-probabilities are never changed.
_LOG_ZERO_FLOOR = float(np.log(np.finfo(np.float32).tiny))


def kl_from_log_probs(log_p: chex.Array, log_q: chex.Array) -> chex.Array:
  """``KL(p || q) = sum_c p_c (log p_c - log q_c)`` over the last axis.

  ``0 log 0`` counts as 0; a ``-inf`` ``log q_c`` where ``p_c > 0`` counts as
  ``log(float32 tiny)`` (see ``_LOG_ZERO_FLOOR``).
  """
  p, log_p = _safe_log_probs(log_p)
  log_q = jnp.where(jnp.isneginf(log_q), _LOG_ZERO_FLOOR, log_q)
  log_q = jnp.where(p > 0, log_q, 0.0)
  return jnp.sum(p * (log_p - log_q), axis=-1)


def _log_mixture(log_p: chex.Array, log_q: chex.Array,
                 weight_p: chex.Array) -> chex.Array:
  """``log(w p + (1 - w) q)`` computed in log space.

  Entries where both weighted terms are ``-inf`` (a zero-probability class at
  ``w`` in ``{0, 1}``) give ``-inf`` with a zero (not NaN) gradient.
  """
  weight_p = jnp.asarray(weight_p, jnp.float32)
  a = log_p + jnp.log(weight_p)
  b = log_q + jnp.log1p(-weight_p)
  both_zero = jnp.isneginf(a) & jnp.isneginf(b)
  mixed = jnp.logaddexp(jnp.where(both_zero, 0.0, a),
                        jnp.where(both_zero, 0.0, b))
  return jnp.where(both_zero, -jnp.inf, mixed)


def _is_python_number(x) -> bool:
  return isinstance(x, (int, float)) and not isinstance(x, bool)


def generalized_jsd_from_log_probs(log_p_student: chex.Array,
                                   log_p_teacher: chex.Array,
                                   beta) -> chex.Array:
  """Generalised JSD of GKD (Agarwal et al. 2024), as in TRL's GKD trainer.

  ``M = beta * p + (1 - beta) * q`` and
  ``JSD_beta = beta * KL(p || M) + (1 - beta) * KL(q || M)``.
  The mixture degenerates at the ends, so ``beta = 0`` is defined as the
  forward ``KL(p || q)`` and ``beta = 1`` as the reverse ``KL(q || p)``.
  """
  static_beta = _is_python_number(beta)
  if static_beta:
    if beta == 0:
      return kl_from_log_probs(log_p_teacher, log_p_student)
    if beta == 1:
      return kl_from_log_probs(log_p_student, log_p_teacher)
  beta = jnp.asarray(beta, jnp.float32)
  at_end = (beta == 0) | (beta == 1)
  safe_beta = jnp.where(at_end, 0.5, beta)  # keeps the unused branch finite
  log_m = _log_mixture(log_p_teacher, log_p_student, safe_beta)
  mixed = (safe_beta * kl_from_log_probs(log_p_teacher, log_m)
           + (1.0 - safe_beta) * kl_from_log_probs(log_p_student, log_m))
  if static_beta:
    return mixed
  forward = kl_from_log_probs(log_p_teacher, log_p_student)
  reverse = kl_from_log_probs(log_p_student, log_p_teacher)
  return jnp.where(beta == 0, forward, jnp.where(beta == 1, reverse, mixed))


def divergence_from_log_probs(kind: str,
                              log_p_student: chex.Array,
                              log_p_teacher: chex.Array,
                              *,
                              beta: chex.Numeric = 0.5,
                              alpha: chex.Numeric = 0.1) -> chex.Array:
  """Per-position divergence ``kind`` between two log-probability vectors.

  Shared by the dense losses below, the top-k (sparse teacher) losses and the
  memory-lean variants, so that all compute the same formula.
  """
  if kind == "kl":
    return kl_from_log_probs(log_p_teacher, log_p_student)
  if kind == "reverse_kl":
    return kl_from_log_probs(log_p_student, log_p_teacher)
  if kind == "jsd":
    return generalized_jsd_from_log_probs(log_p_student, log_p_teacher, beta)
  if kind == "skew_kl":
    log_m = _log_mixture(log_p_teacher, log_p_student, alpha)
    return kl_from_log_probs(log_p_teacher, log_m)
  if kind == "skew_reverse_kl":
    log_m = _log_mixture(log_p_student, log_p_teacher, alpha)
    return kl_from_log_probs(log_p_student, log_m)
  if kind == "tvd":
    return 0.5 * jnp.sum(
        jnp.abs(jnp.exp(log_p_teacher) - jnp.exp(log_p_student)), axis=-1)
  if kind == "soft_ce":
    p = jnp.exp(log_p_teacher)
    return -jnp.sum(jnp.where(p > 0, p * log_p_student, 0.0), axis=-1)
  raise ValueError(
      f"unknown divergence {kind!r}; expected one of {DIVERGENCES}.")


DIVERGENCES = ("kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd",
               "soft_ce")
# Divergences multiplied by T**2 (Hinton et al. 2015) when scaling is on.
_TEMPERATURE_SCALED = frozenset(DIVERGENCES) - {"tvd"}


def _validate(kind, temperature, beta, alpha):
  _utils.check_temperature(temperature)
  if kind == "jsd":
    _utils.check_unit_interval(beta, "beta (generalised JSD)")
  if kind in ("skew_kl", "skew_reverse_kl"):
    _utils.check_unit_interval(alpha, "alpha (skew KL)")


def _temperature_factor(kind, temperature, scale_by_temperature):
  if scale_by_temperature and kind in _TEMPERATURE_SCALED:
    return jnp.square(jnp.asarray(temperature, jnp.float32))
  return 1.0


def logit_divergence(student_logits: chex.Array,
                     teacher_logits: chex.Array,
                     temperature: chex.Numeric = 1.0,
                     *,
                     divergence: str = "kl",
                     beta: chex.Numeric = 0.5,
                     alpha: chex.Numeric = 0.1,
                     mask: Optional[chex.Array] = None,
                     reduction: str = "mean",
                     scale_by_temperature: bool = True) -> chex.Array:
  """Any divergence of the family, named by ``divergence``.

  ``divergence`` is one of ``"kl"``, ``"reverse_kl"``, ``"jsd"``,
  ``"skew_kl"``, ``"skew_reverse_kl"``, ``"tvd"``, ``"soft_ce"``; see the
  function of that name for its formula. Useful when the divergence is a
  configuration value.

  Args:
    student_logits: ``[..., C]`` student logits.
    teacher_logits: ``[..., C]`` teacher logits (no gradient is stopped here:
      wrap them in ``jax.lax.stop_gradient`` or use the train step, which does).
    temperature: softmax temperature ``T > 0`` (float or traced scalar).
    divergence: the divergence's name.
    beta: generalised JSD mixture weight in ``[0, 1]``.
    alpha: skew KL mixture weight in ``[0, 1]``.
    mask: optional ``[...]`` mask or weights.
    reduction: ``"mean"`` (over unmasked positions), ``"sum"`` or ``"none"``.
    scale_by_temperature: multiply by ``T**2`` (not for TVD).

  Returns:
    Scalar, or ``[...]`` for ``reduction="none"``.
  """
  if divergence not in DIVERGENCES:
    raise ValueError(
        f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}.")
  _utils.check_logits_pair(student_logits, teacher_logits)
  _validate(divergence, temperature, beta, alpha)
  _utils.check_reduction(reduction)
  _utils.check_mask(mask, jnp.shape(student_logits)[:-1])
  t = jnp.asarray(temperature, jnp.float32)
  log_q = jax.nn.log_softmax(_utils.to_float32(student_logits) / t, axis=-1)
  log_p = jax.nn.log_softmax(_utils.to_float32(teacher_logits) / t, axis=-1)
  per_position = divergence_from_log_probs(
      divergence, log_q, log_p, beta=beta, alpha=alpha)
  per_position = per_position * _temperature_factor(
      divergence, temperature, scale_by_temperature)
  return _utils.reduce_loss(per_position, mask, reduction)


def kl_divergence(student_logits: chex.Array,
                  teacher_logits: chex.Array,
                  temperature: chex.Numeric = 1.0,
                  *,
                  mask: Optional[chex.Array] = None,
                  reduction: str = "mean",
                  scale_by_temperature: bool = True) -> chex.Array:
  r"""Soft-target (forward) KL divergence of Hinton et al. (2015).

  .. math::
    T^2 \, \mathrm{KL}(p \,\|\, q) = T^2 \sum_c p_c (\log p_c - \log q_c),
    \quad p = \mathrm{softmax}(z_t / T),\ q = \mathrm{softmax}(z_s / T).

  The ``T**2`` factor keeps the gradient ``T (q - p)`` (per position) at the
  scale of a hard-label loss. Mean-seeking: the student spreads over all of the
  teacher's modes.

  References:
    Hinton, Vinyals & Dean, "Distilling the Knowledge in a Neural Network", 2015.

  Args:
    student_logits: ``[..., C]``.
    teacher_logits: ``[..., C]``.
    temperature: ``T > 0``.
    mask: optional ``[...]``.
    reduction: ``"mean"``, ``"sum"`` or ``"none"``.
    scale_by_temperature: multiply by ``T**2``.

  Returns:
    Scalar, or ``[...]`` for ``reduction="none"``.
  """
  return logit_divergence(student_logits, teacher_logits, temperature,
                          divergence="kl", mask=mask, reduction=reduction,
                          scale_by_temperature=scale_by_temperature)


def reverse_kl_divergence(student_logits: chex.Array,
                          teacher_logits: chex.Array,
                          temperature: chex.Numeric = 1.0,
                          *,
                          mask: Optional[chex.Array] = None,
                          reduction: str = "mean",
                          scale_by_temperature: bool = True) -> chex.Array:
  r"""Reverse KL, :math:`T^2\,\mathrm{KL}(q \,\|\, p)` (mode-seeking).

  Used by MiniLLM (Gu et al. 2024) and GKD (Agarwal et al. 2024) for generative
  students, where covering every teacher mode wastes capacity.

  Shapes and arguments as :func:`kl_divergence`.
  """
  return logit_divergence(student_logits, teacher_logits, temperature,
                          divergence="reverse_kl", mask=mask,
                          reduction=reduction,
                          scale_by_temperature=scale_by_temperature)


def jensen_shannon_divergence(student_logits: chex.Array,
                              teacher_logits: chex.Array,
                              temperature: chex.Numeric = 1.0,
                              *,
                              beta: chex.Numeric = 0.5,
                              mask: Optional[chex.Array] = None,
                              reduction: str = "mean",
                              scale_by_temperature: bool = True) -> chex.Array:
  r"""Generalised Jensen–Shannon divergence of GKD (Agarwal et al. 2024).

  .. math::
    M = \beta p + (1-\beta) q,\qquad
    \mathrm{JSD}_\beta = \beta\,\mathrm{KL}(p\,\|\,M) + (1-\beta)\,\mathrm{KL}(q\,\|\,M)

  (times ``T**2``). As in TRL's ``GKDTrainer``, ``beta = 0`` is the forward KL
  ``KL(p || q)`` and ``beta = 1`` the reverse KL ``KL(q || p)`` (the mixture
  formula would give 0 at both ends). ``beta = 0.5`` is the symmetric JSD,
  bounded by ``log 2``.

  References:
    Agarwal et al., "On-Policy Distillation of Language Models: Learning from
    Self-Generated Mistakes", ICLR 2024.

  Args:
    beta: mixture weight of the teacher in ``[0, 1]``; a float or a traced
      scalar (e.g. from a schedule).
    Others as :func:`kl_divergence`.
  """
  return logit_divergence(student_logits, teacher_logits, temperature,
                          divergence="jsd", beta=beta, mask=mask,
                          reduction=reduction,
                          scale_by_temperature=scale_by_temperature)


def skew_kl_divergence(student_logits: chex.Array,
                       teacher_logits: chex.Array,
                       temperature: chex.Numeric = 1.0,
                       *,
                       alpha: chex.Numeric = 0.1,
                       mask: Optional[chex.Array] = None,
                       reduction: str = "mean",
                       scale_by_temperature: bool = True) -> chex.Array:
  r"""Skew KL of DistiLLM (Ko et al. 2024): :math:`\mathrm{KL}(p\,\|\,\alpha p + (1-\alpha) q)`.

  Mixing a little of the teacher into the student distribution bounds the
  divergence (by ``-log alpha``) and stabilises its gradient. ``alpha = 0`` is
  the forward KL, ``alpha = 1`` gives 0. Paper default ``alpha = 0.1``.

  References:
    Ko et al., "DistiLLM: Towards Streamlined Distillation for Large Language
    Models", ICML 2024.
  """
  return logit_divergence(student_logits, teacher_logits, temperature,
                          divergence="skew_kl", alpha=alpha, mask=mask,
                          reduction=reduction,
                          scale_by_temperature=scale_by_temperature)


def skew_reverse_kl_divergence(student_logits: chex.Array,
                               teacher_logits: chex.Array,
                               temperature: chex.Numeric = 1.0,
                               *,
                               alpha: chex.Numeric = 0.1,
                               mask: Optional[chex.Array] = None,
                               reduction: str = "mean",
                               scale_by_temperature: bool = True) -> chex.Array:
  r"""Skew reverse KL of DistiLLM: :math:`\mathrm{KL}(q\,\|\,\alpha q + (1-\alpha) p)`.

  ``alpha = 0`` is the reverse KL, ``alpha = 1`` gives 0. Paper default 0.1.
  """
  return logit_divergence(student_logits, teacher_logits, temperature,
                          divergence="skew_reverse_kl", alpha=alpha, mask=mask,
                          reduction=reduction,
                          scale_by_temperature=scale_by_temperature)


def total_variation_distance(student_logits: chex.Array,
                             teacher_logits: chex.Array,
                             temperature: chex.Numeric = 1.0,
                             *,
                             mask: Optional[chex.Array] = None,
                             reduction: str = "mean") -> chex.Array:
  r"""Total variation distance :math:`\tfrac12 \sum_c |p_c - q_c|` in ``[0, 1]``.

  Not scaled by the temperature. Used as a distillation objective by Wen et al.
  (2023), "f-Divergence Minimization for Sequence-Level Knowledge Distillation".
  """
  return logit_divergence(student_logits, teacher_logits, temperature,
                          divergence="tvd", mask=mask, reduction=reduction,
                          scale_by_temperature=False)


def soft_cross_entropy(student_logits: chex.Array,
                       teacher_logits: chex.Array,
                       temperature: chex.Numeric = 1.0,
                       *,
                       mask: Optional[chex.Array] = None,
                       reduction: str = "mean",
                       scale_by_temperature: bool = True) -> chex.Array:
  r"""Cross-entropy against the teacher's soft targets, :math:`-T^2 \sum_c p_c \log q_c`.

  Equals :func:`kl_divergence` plus the teacher's entropy (a constant for the
  student), so both give the same student gradient.
  """
  return logit_divergence(student_logits, teacher_logits, temperature,
                          divergence="soft_ce", mask=mask, reduction=reduction,
                          scale_by_temperature=scale_by_temperature)


def logit_mse(student_logits: chex.Array,
              teacher_logits: chex.Array,
              *,
              mask: Optional[chex.Array] = None,
              reduction: str = "mean") -> chex.Array:
  r"""Mean squared error between logits (Ba & Caruana 2014), :math:`\tfrac1C \sum_c (z_{s,c} - z_{t,c})^2`.

  The high-temperature limit of the KL: for zero-mean logits
  ``T**2 KL -> (1 / 2C) ||z_s - z_t||^2`` as ``T -> inf`` (Hinton et al. 2015).

  References:
    Ba & Caruana, "Do Deep Nets Really Need to be Deep?", NeurIPS 2014.

  Returns:
    Scalar, or ``[...]`` per position for ``reduction="none"``.
  """
  _utils.check_logits_pair(student_logits, teacher_logits)
  diff = _utils.to_float32(student_logits) - _utils.to_float32(teacher_logits)
  return _utils.reduce_loss(jnp.mean(jnp.square(diff), axis=-1), mask,
                            reduction)


def hard_label_cross_entropy(student_logits: chex.Array,
                             labels: chex.Array,
                             *,
                             label_smoothing: float = 0.0,
                             mask: Optional[chex.Array] = None,
                             reduction: str = "mean") -> chex.Array:
  r"""Cross-entropy with integer labels, :math:`-\log q_y` (optionally smoothed).

  Args:
    student_logits: ``[..., C]``.
    labels: integer ``[...]`` in ``[0, C)``.
    label_smoothing: mass spread uniformly over all classes, in ``[0, 1]``.
    mask: optional ``[...]``.
    reduction: ``"mean"``, ``"sum"`` or ``"none"``.

  Checks: the labels' shape and dtype always; labels outside ``[0, C)``
  (masked positions included) and ``label_smoothing`` outside ``[0, 1]``
  raise ``ValueError`` eagerly when concrete. Traced under ``jax.jit`` they
  are checked only under :func:`kdjax.losses.runtime_checks`
  (``kdjax.train.make_train_step(..., checks=True)``); otherwise an
  out-of-range label gives NaN.
  """
  return labelled_cross_entropy(student_logits, labels,
                                "hard_label_cross_entropy",
                                label_smoothing=label_smoothing, mask=mask,
                                reduction=reduction)


def labelled_cross_entropy(student_logits: chex.Array,
                           labels: chex.Array,
                           loss_name: str,
                           *,
                           arg_name: str = "labels",
                           label_smoothing: float = 0.0,
                           mask: Optional[chex.Array] = None,
                           reduction: str = "mean") -> chex.Array:
  """:func:`hard_label_cross_entropy` whose errors name ``loss_name`` and ``arg_name``."""
  shape = jnp.shape(student_logits)
  _utils.check_labels(labels, shape[-1], shape[:-1], loss_name, arg_name)
  _utils.check_unit_interval(label_smoothing, "label_smoothing")
  # -log q_y = logsumexp(z) - z_y, never forming the [..., C] log-softmax
  # (as optax.softmax_cross_entropy_with_integer_labels): at large C its
  # extra read/write of the logits made a whole LM step 1.9x slower than
  # this form on the CPU (BUILD_NOTES.md, "Tunix model families (#16)").
  z = _utils.to_float32(student_logits)
  lse = jax.nn.logsumexp(z, axis=-1)
  z_y = jnp.take_along_axis(z, jnp.asarray(labels)[..., None], axis=-1)[..., 0]
  nll = lse - z_y
  if _is_python_number(label_smoothing) and label_smoothing == 0:
    per_position = nll
  else:
    # mean_c log q_c = mean_c z_c - logsumexp(z).
    per_position = ((1.0 - label_smoothing) * nll
                    - label_smoothing * (jnp.mean(z, axis=-1) - lse))
  return _utils.reduce_loss(per_position, mask, reduction)


# -----------------------------------------------------------------------------
# Sparse (top-k) teacher.
# -----------------------------------------------------------------------------


class TopKTeacher(NamedTuple):
  """A teacher distribution kept as its top-k entries (a pytree).

  Attributes:
    values: ``[..., k]`` the teacher's raw logits at its ``k`` largest entries.
    indices: ``[..., k]`` integer class/vocabulary indices of those entries.
    logsumexp: ``[...]`` ``logsumexp(full_logits / temperature)`` over the whole
      vocabulary, needed for the tail bucket; ``None`` when unknown.
    temperature: the temperature ``logsumexp`` was computed at (scalar array).
  """
  values: chex.Array
  indices: chex.Array
  logsumexp: Optional[chex.Array] = None
  temperature: Optional[chex.Array] = None


def top_k_teacher(teacher_logits: chex.Array, k: int,
                  temperature: chex.Numeric = 1.0) -> TopKTeacher:
  """Keeps the teacher's ``k`` largest logits, plus the normaliser for a tail.

  Args:
    teacher_logits: ``[..., V]``.
    k: number of entries kept, ``1 <= k <= V``.
    temperature: the temperature the tail bucket will be used at.

  Returns:
    A :class:`TopKTeacher` with ``values``/``indices`` of shape ``[..., k]``.
  """
  vocab = jnp.shape(teacher_logits)[-1]
  if not 1 <= k <= vocab:
    raise ValueError(f"k must lie in [1, {vocab}] for {vocab} classes, got {k}.")
  _utils.check_temperature(temperature)
  logits = _utils.to_float32(teacher_logits)
  values, indices = jax.lax.top_k(logits, k)
  lse = jax.nn.logsumexp(logits / temperature, axis=-1)
  return TopKTeacher(values, indices, lse,
                     jnp.asarray(temperature, jnp.float32))


# Tail masses below float32 resolution are rounding noise (e.g. the empty
# tail when k equals the vocabulary): both tails are floored at this value so
# that noise does not turn into a spurious p * log(p / q) term.
_TAIL_FLOOR = float(jnp.finfo(jnp.float32).eps)


def _log1mexp(x: chex.Array) -> chex.Array:
  """``log(max(1 - exp(x), eps))`` for ``x <= 0``, computed stably."""
  x = jnp.minimum(x, 0.0)
  return jnp.log(jnp.maximum(-jnp.expm1(x), _TAIL_FLOOR))


def top_k_divergence(student_logits: chex.Array,
                     teacher: TopKTeacher,
                     temperature: chex.Numeric = 1.0,
                     *,
                     divergence: str = "kl",
                     beta: chex.Numeric = 0.5,
                     alpha: chex.Numeric = 0.1,
                     tail_bucket: bool = True,
                     mask: Optional[chex.Array] = None,
                     reduction: str = "mean",
                     scale_by_temperature: bool = True) -> chex.Array:
  r"""A divergence of the family against a top-k (sparse) teacher.

  The comparison runs over the teacher's ``k`` entries. With
  ``tail_bucket=True`` (needs ``teacher.logsumexp`` at the same temperature)
  both distributions get a ``(k+1)``-th bucket holding the probability mass
  outside the top-k: for the teacher ``1 - sum_i p_i`` with
  ``p_i = exp(v_i / T - logsumexp)``, for the student ``1 - sum_i q_{idx_i}``
  with ``q = softmax(z_s / T)`` over the full vocabulary. Without it both are
  renormalised over the ``k`` entries. With ``k = V`` and the tail bucket this
  equals the dense divergence (up to float rounding of the empty tail).

  Args:
    student_logits: ``[..., V]`` full student logits.
    teacher: :class:`TopKTeacher` with ``[..., k]`` values and indices.
    temperature: ``T > 0``; must equal ``teacher.temperature`` when the tail
      bucket is used.
    divergence: one of ``"kl"``, ``"reverse_kl"``, ``"jsd"``, ``"skew_kl"``,
      ``"skew_reverse_kl"``, ``"tvd"``, ``"soft_ce"``.
    Others as :func:`logit_divergence`.
  """
  if divergence not in DIVERGENCES:
    raise ValueError(
        f"unknown divergence {divergence!r}; expected one of {DIVERGENCES}.")
  s_shape = jnp.shape(student_logits)
  check_top_k_shapes(teacher, tuple(s_shape[:-1]), s_shape[-1])
  _validate(divergence, temperature, beta, alpha)
  _utils.check_reduction(reduction)
  _utils.check_mask(mask, s_shape[:-1])
  t = jnp.asarray(temperature, jnp.float32)
  log_q_full = jax.nn.log_softmax(_utils.to_float32(student_logits) / t, -1)
  log_q = jnp.take_along_axis(log_q_full, teacher.indices, axis=-1)
  per_position = top_k_divergence_from_student_log_probs(
      log_q, teacher, temperature, divergence=divergence, beta=beta, alpha=alpha,
      tail_bucket=tail_bucket)
  per_position = per_position * _temperature_factor(
      divergence, temperature, scale_by_temperature)
  return _utils.reduce_loss(per_position, mask, reduction)


def check_top_k_shapes(teacher: TopKTeacher, leading_shape: tuple,
                       num_classes: int) -> None:
  """Validates a top-k teacher against the student's ``[*leading, C]`` logits."""
  values, indices = teacher.values, teacher.indices
  if jnp.shape(values) != jnp.shape(indices):
    raise ValueError(f"teacher top-k values {jnp.shape(values)} and indices "
                     f"{jnp.shape(indices)} must have the same shape.")
  if tuple(jnp.shape(values)[:-1]) != tuple(leading_shape):
    raise ValueError(
        f"shape mismatch: the student's leading shape {tuple(leading_shape)} "
        f"and the teacher top-k {jnp.shape(values)} must agree (top-k is "
        "[..., k]).")
  if jnp.shape(values)[-1] > num_classes:
    raise ValueError(
        f"teacher top-k has k={jnp.shape(values)[-1]} entries but the student "
        f"has only {num_classes} classes.")
  concrete_indices = _utils._concrete_value(indices)  # pylint: disable=protected-access
  if concrete_indices is not None and concrete_indices.size and (
      concrete_indices.min() < 0 or concrete_indices.max() >= num_classes):
    raise ValueError(
        f"class-count mismatch: teacher top-k indices lie in "
        f"[{concrete_indices.min()}, {concrete_indices.max()}] but the student "
        f"has {num_classes} classes.")


def check_top_k_temperature(teacher: TopKTeacher, temperature,
                            tail_bucket: bool) -> None:
  """A tail bucket needs the teacher's logsumexp at the loss's temperature."""
  if not tail_bucket:
    return
  if teacher.logsumexp is None:
    raise ValueError(
        "tail_bucket=True needs teacher.logsumexp (build the teacher with "
        "top_k_teacher(...) or store the full-vocabulary logsumexp).")
  if teacher.temperature is not None:
    stored = _utils._concrete_value(teacher.temperature)  # pylint: disable=protected-access
    given = _utils._concrete_value(temperature)  # pylint: disable=protected-access
    if stored is not None and given is not None and not np.allclose(
        stored, given):
      raise ValueError(
          f"the top-k teacher's logsumexp was computed at temperature "
          f"{float(stored)} but the loss uses temperature {float(given)}; "
          "the tail bucket needs the same temperature.")


def top_k_divergence_from_student_log_probs(log_q: chex.Array,
                                            teacher: TopKTeacher,
                                            temperature: chex.Numeric,
                                            *,
                                            divergence: str = "kl",
                                            beta: chex.Numeric = 0.5,
                                            alpha: chex.Numeric = 0.1,
                                            tail_bucket: bool = True
                                            ) -> chex.Array:
  """Per-position divergence from the student's log-probs at the top-k indices.

  ``log_q [..., k]`` holds ``log softmax(z_s / T)`` (normalised over the full
  vocabulary) gathered at ``teacher.indices``; that is all the top-k
  divergence needs from the student, which lets the memory-lean losses
  (``kdjax.losses.top_k_divergence_from_hidden``) gather it chunk by chunk or
  shard by shard. Unscaled (no ``T**2``), unreduced: ``[...]``.
  """
  check_top_k_temperature(teacher, temperature, tail_bucket)
  t = jnp.asarray(temperature, jnp.float32)
  scaled = _utils.to_float32(teacher.values) / t
  if tail_bucket:
    log_p = scaled - _utils.to_float32(teacher.logsumexp)[..., None]
    log_p = jnp.minimum(log_p, 0.0)
    log_p_tail = _log1mexp(jax.nn.logsumexp(log_p, axis=-1))
    log_q_tail = _log1mexp(jax.nn.logsumexp(log_q, axis=-1))
    log_p = jnp.concatenate([log_p, log_p_tail[..., None]], axis=-1)
    log_q = jnp.concatenate([log_q, log_q_tail[..., None]], axis=-1)
  else:
    log_p = jax.nn.log_softmax(scaled, axis=-1)
    log_q = log_q - jax.nn.logsumexp(log_q, axis=-1, keepdims=True)
  return divergence_from_log_probs(divergence, log_q, log_p, beta=beta,
                                   alpha=alpha)
