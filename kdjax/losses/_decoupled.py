"""Logit losses that decouple or relate the teacher's predictions: DKD and DIST."""

from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp

from kdjax.losses import _utils
from kdjax.losses._divergences import kl_from_log_probs


def dkd_terms(student_logits: chex.Array,
              teacher_logits: chex.Array,
              labels: chex.Array,
              *,
              temperature: chex.Numeric = 4.0) -> tuple[chex.Array, chex.Array]:
  r"""Per-position TCKD and NCKD of Decoupled KD (Zhao et al. 2022), both times ``T**2``.

  With ``b = [p_y, 1 - p_y]`` the binary target/non-target probabilities and
  ``p^\setminus y`` the distribution over the non-target classes renormalised:

  .. math::
    \mathrm{TCKD} = \mathrm{KL}(b^t \,\|\, b^s),\qquad
    \mathrm{NCKD} = \mathrm{KL}(\hat p^{t,\setminus y} \,\|\, \hat p^{s,\setminus y})

  and the classic KD decomposes as ``KD = TCKD + (1 - p^t_y) NCKD``.

  Checks: as :func:`dkd`.

  Returns:
    ``(tckd, nckd)``, each ``[...]``.
  """
  return _dkd_terms(student_logits, teacher_logits, labels, temperature,
                    "dkd_terms")


def _dkd_terms(student_logits, teacher_logits, labels, temperature,
               loss_name: str):
  """:func:`dkd_terms` whose label errors name ``loss_name``."""
  _utils.check_logits_pair(student_logits, teacher_logits)
  shape = jnp.shape(student_logits)
  _utils.check_labels(labels, shape[-1], shape[:-1], loss_name)
  _utils.check_temperature(temperature)
  t = jnp.asarray(temperature, jnp.float32)
  num_classes = shape[-1]
  if num_classes < 2:
    raise ValueError("DKD needs at least 2 classes.")
  target = jax.nn.one_hot(labels, num_classes, dtype=bool)
  zs = _utils.to_float32(student_logits) / t
  zt = _utils.to_float32(teacher_logits) / t

  def binary_log_probs(z):
    log_p = jax.nn.log_softmax(z, axis=-1)
    log_target = jnp.sum(jnp.where(target, log_p, 0.0), axis=-1)
    log_other = jax.nn.logsumexp(jnp.where(target, -jnp.inf, log_p), axis=-1)
    return jnp.stack([log_target, log_other], axis=-1)

  tckd = kl_from_log_probs(binary_log_probs(zt), binary_log_probs(zs))
  # Non-target distributions: the target class removed (-inf), renormalised.
  log_nt_t = jax.nn.log_softmax(jnp.where(target, -jnp.inf, zt), axis=-1)
  log_nt_s = jax.nn.log_softmax(jnp.where(target, -jnp.inf, zs), axis=-1)
  nckd = kl_from_log_probs(log_nt_t, log_nt_s)
  return tckd * t**2, nckd * t**2


def dkd(student_logits: chex.Array,
        teacher_logits: chex.Array,
        labels: chex.Array,
        *,
        alpha: chex.Numeric = 1.0,
        beta: chex.Numeric = 8.0,
        temperature: chex.Numeric = 4.0,
        mask: Optional[chex.Array] = None,
        reduction: str = "mean") -> chex.Array:
  r"""Decoupled Knowledge Distillation (Zhao et al., CVPR 2022).

  .. math::
    \mathcal{L}_{DKD} = \alpha\,\mathrm{TCKD} + \beta\,\mathrm{NCKD}

  (see :func:`dkd_terms`). Defaults are the paper's CIFAR-100 setting
  (``alpha=1, beta=8, T=4``); the paper also warms the DKD weight up linearly
  over the first epochs, which :func:`kdjax.losses.compose` expresses with an
  ``optax.linear_schedule`` weight.

  Args:
    student_logits: ``[..., C]``.
    teacher_logits: ``[..., C]``.
    labels: integer ``[...]`` ground-truth classes.
    alpha: weight of the target-class term.
    beta: weight of the non-target-class term.
    temperature: ``T > 0``.
    mask: optional ``[...]``.
    reduction: ``"mean"``, ``"sum"`` or ``"none"``.

  Checks: shapes and the labels' dtype always; labels outside ``[0, C)``
  (masked positions included), ``temperature <= 0`` and negative
  ``alpha``/``beta`` raise ``ValueError`` eagerly when concrete. Traced under
  ``jax.jit`` they are checked only under :func:`kdjax.losses.runtime_checks`
  (``kdjax.train.make_train_step(..., checks=True)``); otherwise an
  out-of-range label silently gives a wrong finite loss (its one-hot is all
  zeros) and ``T = 0`` gives NaN.

  References:
    Zhao, Cui, Song, Qiu & Liang, "Decoupled Knowledge Distillation", CVPR 2022.
  """
  _utils.check_non_negative(alpha, "DKD alpha")
  _utils.check_non_negative(beta, "DKD beta")
  tckd, nckd = _dkd_terms(student_logits, teacher_logits, labels, temperature,
                          "dkd")
  return _utils.reduce_loss(alpha * tckd + beta * nckd, mask, reduction)


def _pearson_rows(a: chex.Array, b: chex.Array, weights: chex.Array,
                  eps: float) -> chex.Array:
  """Weighted Pearson correlation between ``a`` and ``b`` along the last axis."""
  total = jnp.maximum(jnp.sum(weights, axis=-1, keepdims=True), 1e-12)
  a = a - jnp.sum(a * weights, axis=-1, keepdims=True) / total
  b = b - jnp.sum(b * weights, axis=-1, keepdims=True) / total
  cov = jnp.sum(weights * a * b, axis=-1)
  norm_a = _safe_sqrt(jnp.sum(weights * a * a, axis=-1))
  norm_b = _safe_sqrt(jnp.sum(weights * b * b, axis=-1))
  return cov / (norm_a * norm_b + eps)


def _safe_sqrt(x: chex.Array) -> chex.Array:
  """``sqrt(x)`` with a zero (not infinite) gradient at ``x = 0``.

  A row or column that is constant (one example in the batch, a fully masked
  batch, a uniform prediction) has zero variance; ``jnp.sqrt`` would turn the
  loss's gradient into NaN there.
  """
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def dist(student_logits: chex.Array,
         teacher_logits: chex.Array,
         *,
         beta: chex.Numeric = 1.0,
         gamma: chex.Numeric = 1.0,
         temperature: chex.Numeric = 1.0,
         mask: Optional[chex.Array] = None,
         reduction: str = "mean",
         eps: float = 1e-8) -> chex.Array:
  r"""DIST: distillation from a stronger teacher (Huang et al., NeurIPS 2022).

  Matches *relations* instead of exact probabilities. With
  ``Y^s = softmax(Z^s / T)`` and ``Y^t`` of shape ``[N, C]`` (all leading axes
  flattened into ``N``) and the Pearson correlation :math:`\rho`:

  .. math::
    \mathcal{L}_{inter} = T^2\,\tfrac1N \sum_i \bigl(1 - \rho(Y^s_{i,:}, Y^t_{i,:})\bigr),\quad
    \mathcal{L}_{intra} = T^2\,\tfrac1C \sum_c \bigl(1 - \rho(Y^s_{:,c}, Y^t_{:,c})\bigr)

  and ``L = beta * L_inter + gamma * L_intra``. The intra-class term correlates
  each class's probabilities over the batch (masked positions excluded), so the
  loss is not separable per position: ``reduction="none"`` returns, for each
  position, ``beta * T^2 (1 - rho_inter_i) + gamma * L_intra`` so that its
  masked mean equals ``"mean"``; ``"sum"`` is that mean times the number of
  unmasked positions.

  References:
    Huang, You, Wang, Qian & Xu, "Knowledge Distillation from A Stronger
    Teacher", NeurIPS 2022.
  """
  _utils.check_logits_pair(student_logits, teacher_logits)
  _utils.check_temperature(temperature)
  _utils.check_reduction(reduction)
  batch_shape = jnp.shape(student_logits)[:-1]
  _utils.check_mask(mask, batch_shape)
  num_classes = jnp.shape(student_logits)[-1]
  t = jnp.asarray(temperature, jnp.float32)
  ys = jax.nn.softmax(_utils.to_float32(student_logits) / t, axis=-1)
  yt = jax.nn.softmax(_utils.to_float32(teacher_logits) / t, axis=-1)
  ys = ys.reshape(-1, num_classes)
  yt = yt.reshape(-1, num_classes)
  if mask is None:
    w = jnp.ones((ys.shape[0],), jnp.float32)
  else:
    w = (jnp.asarray(mask).reshape(-1) > 0).astype(jnp.float32)
  inter = 1.0 - _pearson_rows(ys, yt, jnp.ones_like(ys), eps)  # [N]
  intra = 1.0 - _pearson_rows(ys.T, yt.T, jnp.broadcast_to(w, ys.T.shape), eps)
  intra = jnp.mean(intra)
  per_position = (beta * inter + gamma * intra) * t**2
  return _utils.reduce_loss(per_position.reshape(batch_shape), mask, reduction)
