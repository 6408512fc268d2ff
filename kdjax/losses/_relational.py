"""Relational distillation: losses on relations between the examples of a batch.

Each loss takes a student and a teacher embedding batch ``[B, D_s]`` and
``[B, D_t]`` (any ``[B, ...]`` is flattened per example, so conv maps
``[B, H, W, C]`` work too) and compares *relations* between examples
(distances, angles, similarities), so ``D_s`` and ``D_t`` may differ unless
stated. They compute in float32 whatever the input dtype, return a scalar and
are jit/grad-safe. Batch Gram matrices use ``Precision.HIGHEST`` so that
distances do not lose accuracy to TF32/bfloat16 matmuls on accelerators.

The relations couple the whole batch: there is no per-example mask, so drop
padding examples before calling (a padded final batch changes the relations).
No gradient is stopped on the teacher (the train step passes a
``stop_gradient``-ed teacher output). The papers' loss weights (RKD: 25 for
distance, 50 for angle; SP: 3000; PKT: 30000; CC: 0.02 in RepDistiller) belong
to the term's weight, not to these functions.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import optax

from kdjax.losses import _utils
from kdjax.losses._compose import ScalarOrSchedule
from kdjax.losses._compose import Term
from kdjax.losses._compose import TermInputs
from kdjax.losses._features import get_feature
from kdjax.losses._features import l2_normalize
from kdjax.losses._features import safe_norm

CC_KERNELS = ("gaussian", "bilinear", "repdistiller")

_HIGHEST = jax.lax.Precision.HIGHEST


def _flat_pair(student: chex.Array, teacher: chex.Array, what: str,
               min_batch: int = 1) -> tuple[chex.Array, chex.Array]:
  """Float32 ``[B, -1]`` views of both embeddings, with batch checks."""
  s = _utils.to_float32(student)
  t = _utils.to_float32(teacher)
  if s.ndim < 1 or t.ndim < 1 or s.shape[0] != t.shape[0]:
    raise ValueError(
        f"{what}: student and teacher embeddings must share the batch axis; "
        f"got shapes {s.shape} and {t.shape}.")
  if s.shape[0] < min_batch:
    raise ValueError(
        f"{what} relates the examples of a batch and needs at least "
        f"{min_batch} of them; got batch size {s.shape[0]}.")
  return s.reshape(s.shape[0], -1), t.reshape(t.shape[0], -1)


def _gram(x: chex.Array) -> chex.Array:
  return jnp.matmul(x, x.T, precision=_HIGHEST)


def pairwise_distances(embeddings: chex.Array,
                       squared: bool = False,
                       eps: float = 1e-12) -> chex.Array:
  """``[B, B]`` distances ``sqrt(max(|e_i|^2 + |e_j|^2 - 2 e_i.e_j, eps))``.

  As RepDistiller's ``RKDLoss.pdist``: from the Gram matrix ``G = e e^T``
  (``O(B^2)`` memory, not ``O(B^2 D)``), clamped at ``eps``, with an exact 0
  diagonal; gradients are finite everywhere (the clamp keeps ``sqrt`` away
  from 0). For float32 accuracy the embeddings are first centred (distances
  are translation invariant) and ``|e_i|^2`` is read from ``G``'s diagonal, so
  that duplicated examples get distance ``sqrt(eps)`` rather than rounding
  noise.
  """
  e = _utils.to_float32(embeddings)
  e = e - jnp.mean(e, axis=0, keepdims=True)
  gram = _gram(e)
  sq = jnp.diagonal(gram)
  d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * gram, eps)
  d = d2 if squared else jnp.sqrt(d2)
  return jnp.where(jnp.eye(e.shape[0], dtype=bool), 0.0, d)


def _normalized_distances(e: chex.Array) -> chex.Array:
  """Distances divided by their mean over the off-diagonal pairs."""
  b = e.shape[0]
  d = pairwise_distances(e)
  mean = jnp.sum(d) / (b * (b - 1))  # the diagonal is 0
  return d / mean


def rkd_distance_loss(student_embeddings: chex.Array,
                      teacher_embeddings: chex.Array,
                      *,
                      delta: float = 1.0) -> chex.Array:
  """RKD distance-wise loss (Park et al., CVPR 2019, "Relational KD").

  ``psi_D(i, j) = ||e_i - e_j|| / mu`` with ``mu`` the mean distance over the
  ``B (B - 1)`` off-diagonal pairs; ``loss = mean_{i, j} huber_delta(psi_D^s -
  psi_D^t)`` over all ``B^2`` pairs (diagonal included, where both are 0),
  with the Huber / smooth-L1 loss ``0.5 x^2`` for ``|x| <= delta``, ``delta
  (|x| - 0.5 delta)`` beyond, ``delta = 1`` as in the paper. Matches
  RepDistiller's ``distiller_zoo/RKD.py`` (``F.smooth_l1_loss(d, t_d)``).
  Invariant to a common scaling of either embedding set. The paper's weight
  (25) is the term's weight.

  Args:
    student_embeddings: ``[B, D_s]`` (``B >= 2``).
    teacher_embeddings: ``[B, D_t]``.
    delta: the Huber threshold.

  Returns:
    Scalar float32.
  """
  s, t = _flat_pair(student_embeddings, teacher_embeddings,
                    "rkd_distance_loss", min_batch=2)
  diff = _normalized_distances(s) - _normalized_distances(t)
  return jnp.mean(optax.losses.huber_loss(diff, delta=delta))


def _angles(e: chex.Array) -> chex.Array:
  """``[B, B, B]`` cosines ``<n(e_j - e_i), n(e_k - e_i)>`` (``n``: L2 unit)."""
  diff = e[None, :, :] - e[:, None, :]  # [i, j] = e_j - e_i
  unit = l2_normalize(diff, axis=-1)
  return jnp.einsum("ijd,ikd->ijk", unit, unit, precision=_HIGHEST)


def rkd_angle_loss(student_embeddings: chex.Array,
                   teacher_embeddings: chex.Array,
                   *,
                   delta: float = 1.0) -> chex.Array:
  """RKD angle-wise loss (Park et al., CVPR 2019).

  ``psi_A(i, j, k) = cos angle(e_j, e_i, e_k) = <(e_j - e_i) / |e_j - e_i|,
  (e_k - e_i) / |e_k - e_i|>`` for all ``B^3`` triplets (a zero difference,
  ``j = i`` or ``k = i``, normalises to 0, as ``F.normalize``);
  ``loss = mean huber_delta(psi_A^s - psi_A^t)``, as RepDistiller's
  ``distiller_zoo/RKD.py``. Invariant to scaling and translation of either
  embedding set. Memory ``O(B^2 D + B^3)``. The paper's weight (50) is the
  term's weight.

  Args:
    student_embeddings: ``[B, D_s]`` (``B >= 2``).
    teacher_embeddings: ``[B, D_t]``.
    delta: the Huber threshold.

  Returns:
    Scalar float32.
  """
  s, t = _flat_pair(student_embeddings, teacher_embeddings, "rkd_angle_loss",
                    min_batch=2)
  return jnp.mean(optax.losses.huber_loss(_angles(s) - _angles(t),
                                          delta=delta))


def similarity_preserving_loss(student_features: chex.Array,
                               teacher_features: chex.Array) -> chex.Array:
  """Similarity-preserving KD (Tung & Mori, ICCV 2019).

  With ``F`` the ``[B, N]`` per-example flattened features (conv maps
  ``[B, H, W, C]`` included), ``G = F F^T`` and ``G~`` its rows
  L2-normalised (``G_ij / max(||G_i||, 1e-12)``),
  ``loss = ||G~_s - G~_t||_F^2 / B^2``, as RepDistiller's
  ``distiller_zoo/SP.py``. The widths ``N_s``, ``N_t`` may differ. The paper's
  weight (3000) is the term's weight.

  Args:
    student_features: ``[B, ...]``.
    teacher_features: ``[B, ...]``.

  Returns:
    Scalar float32.
  """
  s, t = _flat_pair(student_features, teacher_features,
                    "similarity_preserving_loss")
  g_s = l2_normalize(_gram(s), axis=1)
  g_t = l2_normalize(_gram(t), axis=1)
  b = s.shape[0]
  return jnp.sum(jnp.square(g_t - g_s)) / (b * b)


def _pkt_conditional(x: chex.Array, eps: float) -> chex.Array:
  x = x / (safe_norm(x, axis=1, keepdims=True) + eps)
  sim = (_gram(x) + 1.0) / 2.0
  return sim / jnp.sum(sim, axis=1, keepdims=True)


def pkt_loss(student_features: chex.Array,
             teacher_features: chex.Array,
             *,
             eps: float = 1e-7) -> chex.Array:
  """Probabilistic knowledge transfer (Passalis & Tefas, ECCV 2018).

  Cosine-similarity kernel ``K_ij = (cos(x_i, x_j) + 1) / 2`` (with
  ``x / (|x| + eps)``), turned into conditional probabilities
  ``p_{j|i} = K_ij / sum_k K_ik``; ``loss = mean_{i, j} p^t_{j|i}
  log((p^t_{j|i} + eps) / (p^s_{j|i} + eps))`` over the ``B^2`` entries
  (``B`` times the batch-mean KL), with ``eps = 1e-7`` as the authors' code
  (github.com/passalis/probabilistic_kt, RepDistiller ``distiller_zoo/PKT.py``).
  Widths may differ. Non-negative up to ``eps`` effects, 0 for equal inputs.

  Args:
    student_features: ``[B, ...]``.
    teacher_features: ``[B, ...]``.
    eps: the reference's stabiliser.

  Returns:
    Scalar float32.
  """
  s, t = _flat_pair(student_features, teacher_features, "pkt_loss")
  p_s = _pkt_conditional(s, eps)
  p_t = _pkt_conditional(t, eps)
  return jnp.mean(p_t * jnp.log((p_t + eps) / (p_s + eps)))


def _cc_correlation(x: chex.Array, kernel: str, gamma: float, order: int,
                    normalize: bool) -> chex.Array:
  if normalize:
    x = l2_normalize(x, axis=1)
  sim = _gram(x)
  if kernel == "bilinear":
    return sim
  # exp(-gamma |x_i - x_j|^2) = exp(-2 gamma) exp(2 gamma x_i.x_j) for unit
  # vectors, expanded to order P in x_i.x_j.
  corr = jnp.zeros_like(sim)
  for p in range(order + 1):
    coef = math.exp(-2.0 * gamma) * (2.0 * gamma) ** p / math.factorial(p)
    corr = corr + coef * sim ** p
  return corr


def correlation_congruence_loss(student_features: chex.Array,
                                teacher_features: chex.Array,
                                *,
                                kernel: str = "gaussian",
                                gamma: float = 0.4,
                                order: int = 2,
                                normalize: bool = True) -> chex.Array:
  """Correlation congruence (Peng et al., ICCV 2019, CCKD).

  ``kernel="gaussian"`` (default, the paper's choice): with L2-normalised
  features ``f`` (``normalize=True``), the Gaussian RBF
  ``exp(-gamma |f_i - f_j|^2) = exp(-2 gamma) exp(2 gamma f_i.f_j)`` is
  replaced by its order-``P`` Taylor expansion
  ``C_ij = sum_{p=0}^{P} exp(-2 gamma) (2 gamma)^p / p! (f_i.f_j)^p``
  (paper: ``P = 2``, ``gamma = 0.4``), and
  ``loss = ||C_s - C_t||_F^2 / B^2`` (``F.mse_loss`` on the ``B x B``
  matrices, as the public implementations, e.g. Knowledge-Distillation-Zoo's
  ``cc.py`` in JDAI-CV/FaceX-Zoo). ``kernel="bilinear"``: ``C = f f^T``.
  Widths may differ for both.

  ``kernel="repdistiller"`` is the variant RepDistiller (the CRD benchmark,
  ``distiller_zoo/CC.py``, from the authors' code) uses instead:
  ``loss = mean_i sum_d |s_i - t_i|_d |s_{i+1} - t_{i+1}|_d`` over consecutive
  examples of already-embedded (same width) features; it does not build
  correlation matrices. Its weight there is 0.02.

  Args:
    student_features: ``[B, ...]``.
    teacher_features: ``[B, ...]`` (same flattened width for
      ``"repdistiller"``).
    kernel: ``"gaussian"``, ``"bilinear"`` or ``"repdistiller"``.
    gamma: the RBF's ``gamma``.
    order: the Taylor order ``P >= 0``.
    normalize: L2-normalise features before the kernel (the Taylor expansion
      assumes unit vectors).

  Returns:
    Scalar float32.
  """
  if kernel not in CC_KERNELS:
    raise ValueError(f"kernel must be one of {CC_KERNELS}, got {kernel!r}.")
  if int(order) != order or order < 0:
    raise ValueError(f"order must be an integer >= 0, got {order!r}.")
  s, t = _flat_pair(student_features, teacher_features,
                    "correlation_congruence_loss",
                    min_batch=2 if kernel == "repdistiller" else 1)
  if kernel == "repdistiller":
    if s.shape != t.shape:
      raise ValueError(
          "correlation_congruence_loss(kernel='repdistiller') needs features "
          f"of the same width; got student {s.shape} and teacher {t.shape} "
          "(project them first, e.g. with a Connector).")
    delta = jnp.abs(s - t)
    return jnp.mean(jnp.sum(delta[:-1] * delta[1:], axis=1))
  c_s = _cc_correlation(s, kernel, gamma, int(order), normalize)
  c_t = _cc_correlation(t, kernel, gamma, int(order), normalize)
  return jnp.mean(jnp.square(c_s - c_t))


RELATIONAL_LOSSES = {
    "rkd_distance": rkd_distance_loss,
    "rkd_angle": rkd_angle_loss,
    "sp": similarity_preserving_loss,
    "pkt": pkt_loss,
    "cc": correlation_congruence_loss,
}


def relational_term(name: str,
                    loss_fn: Callable[..., chex.Array] | str,
                    *,
                    student_feature: str = "penultimate",
                    teacher_feature: str = "penultimate",
                    weight: ScalarOrSchedule = 1.0,
                    **kwargs: Any) -> Term:
  """A relational loss on one named student/teacher feature as a :class:`Term`.

  Example: ``relational_term("rkd_d", rkd_distance_loss, weight=25.0)``.

  Args:
    name: the term's name.
    loss_fn: ``loss_fn(student_feature, teacher_feature, **kwargs) -> scalar``
      or a key of :data:`RELATIONAL_LOSSES` (``"rkd_distance"``,
      ``"rkd_angle"``, ``"sp"``, ``"pkt"``, ``"cc"``).
    student_feature: key into ``student.features``.
    teacher_feature: key into ``teacher.features``.
    weight: float or optax schedule.
    **kwargs: passed to ``loss_fn`` (e.g. ``gamma=0.4``).

  Returns:
    A :class:`kdjax.losses.Term`.
  """
  if isinstance(loss_fn, str):
    if loss_fn not in RELATIONAL_LOSSES:
      raise ValueError(
          f"unknown relational loss {loss_fn!r}; expected one of "
          f"{sorted(RELATIONAL_LOSSES)} or a callable.")
    loss_fn = RELATIONAL_LOSSES[loss_fn]
  if not callable(loss_fn):
    raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}.")

  def fn(inputs: TermInputs) -> chex.Array:
    s = get_feature(inputs.student, student_feature, "student")
    t = get_feature(inputs.teacher, teacher_feature, "teacher")
    return loss_fn(s, t, **kwargs)

  return Term(name, fn, weight)
