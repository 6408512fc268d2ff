"""Contrastive Representation Distillation (CRD), functional.

CRD (Tian, Krishnan & Isola, ICLR 2020) maximises a lower bound on the mutual
information between the teacher's and the student's representations with a
noise-contrastive (NCE) objective. Both penultimate features go through a small
learned embedding head (linear + L2 normalisation, :class:`CRDEmbed`) into a
``feat_dim``-dimensional space; two memory banks hold one embedding per
training example (the student's and the teacher's), giving ``K`` negatives per
example without recomputing them.

This module is a JAX re-implementation of the reference code
(HobbitLong/RepDistiller, ``crd/criterion.py`` and ``crd/memory.py``) as pure
functions over a state pytree:

* :class:`CRDState`: the two memory banks ``[N, feat_dim]`` and the NCE
  normalisation constants ``Z`` (``-1`` until estimated).
* :func:`init_crd_state`: memory initialised as in ``ContrastMemory``
  (uniform in ``[-s, s]``, ``s = 1 / sqrt(feat_dim / 3)``, so every row has
  expected squared norm 1; rows become exactly unit-norm at their first update).
* :func:`crd_nce_loss`: the NCE loss of already-embedded features against given
  contrast indices, and the momentum update of the memory banks.
* :func:`crd_loss`: embeds the raw features with the heads, draws the negatives
  and calls :func:`crd_nce_loss`.
* :func:`crd_term`: the whole as a stateful :class:`kdjax.losses.Term`.

Semantics kept from the reference (``v1`` = student embedding, ``v2`` =
teacher embedding, ``M_s``/``M_t`` the student/teacher memory banks,
``idx[b] = [y_b, neg_1 .. neg_K]``, ``T = nce_t``):

* teacher anchor: ``e_t[b, j] = exp(<M_s[idx[b, j]], v2[b]> / T)``;
  student anchor: ``e_s[b, j] = exp(<M_t[idx[b, j]], v1[b]> / T)``.
* ``Z_s = mean(e_s) * N``, ``Z_t = mean(e_t) * N`` estimated once, on the first
  call (over the ``B x (K+1)`` sampled scores), then frozen;
  ``P = e / Z``.
* per anchor (Eq. 18 of the paper, ``ContrastLoss``), with ``m = K``,
  ``P_n = 1 / N``, ``eps = 1e-7``::

    L = -1/B sum_b [ log(P[b,0] / (P[b,0] + m P_n + eps))
                     + sum_{j>=1} log(m P_n / (P[b,j] + m P_n + eps)) ]

  and ``L_CRD = L(student anchor) + L(teacher anchor)``.
* after the scores are computed, ``M_s[y] <- normalize(m * M_s[y] + (1 - m) v1)``
  (momentum ``m = nce_m``, no gradient), likewise ``M_t`` with ``v2``.

Deliberate differences from the reference:

* ``Z`` lives in the state (``z_student``/``z_teacher``, ``-1`` meaning "not
  yet estimated"); the estimate is taken with ``stop_gradient`` (the reference
  reads it back with ``.item()``, also a constant).
* the logarithms are computed in log space (``logaddexp``) from
  ``s / T - log Z``: same formula, no overflow of ``exp`` for large ``1/T``.
* negatives: the reference's ``ContrastMemory`` draws ``K`` indices uniformly
  with replacement over all ``N`` examples (the positive may reappear as a
  negative); its CIFAR-100 data loader (``mode="exact"``) instead draws them
  from the *other classes*, without replacement. :func:`crd_loss` draws
  uniformly over ``[0, N)`` minus the positive by default, from the other
  classes (with replacement) when given ``dataset_labels``, or uses explicit
  ``contrast_indices`` (``[B, K+1]``, column 0 the positive) when given.
* the scores against the sampled rows are gathered from the dense product
  ``v @ M^T`` (``[B, N]``) when that is smaller than gathering ``[B, K+1, D]``
  memory rows (the usual case); both give the same numbers.
* examples whose ``mask`` is 0 (padding) neither count in the loss (the mean is
  over unmasked examples) nor update the memory.
* ``nce_k`` is clipped to ``N - 1``.
* the L2 normalisation of the embedding head divides by ``max(||x||, 1e-12)``.

Duplicate dataset indices within one batch update the same memory row; which
write wins is unspecified (as with ``index_copy_`` in the reference).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, NamedTuple, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdjax.losses._features import l2_normalize
from kdjax.losses import _utils
from kdjax.losses._compose import ScalarOrSchedule
from kdjax.losses._compose import Term
from kdjax.losses._compose import TermInputs

# The reference's ``eps`` in ``ContrastLoss``.
_NCE_EPS = 1e-7
_NORM_EPS = 1e-12


class CRDState(NamedTuple):
  """CRD's non-learned state (a pytree).

  Attributes:
    memory_student: ``[N, feat_dim]`` float32, one student embedding per
      training example (``memory_v1`` of the reference).
    memory_teacher: ``[N, feat_dim]`` float32, teacher embeddings
      (``memory_v2``).
    z_student: float32 scalar, the NCE normaliser of the student-anchored
      scores (``Z_v1``); ``-1`` until estimated on the first call.
    z_teacher: float32 scalar, the normaliser of the teacher-anchored scores
      (``Z_v2``); ``-1`` until estimated.
    class_order: optional ``[N]`` int32, the dataset indices sorted by class
      (for negatives drawn from the other classes), or ``None``.
    class_start: optional ``[num_classes]`` int32, where each class starts in
      ``class_order``.
    class_count: optional ``[num_classes]`` int32, the size of each class.
    labels: optional ``[N]`` int32, the class of every dataset example.
  """
  memory_student: chex.Array
  memory_teacher: chex.Array
  z_student: chex.Array
  z_teacher: chex.Array
  class_order: Optional[chex.Array] = None
  class_start: Optional[chex.Array] = None
  class_count: Optional[chex.Array] = None
  labels: Optional[chex.Array] = None

  @property
  def num_data(self) -> int:
    return self.memory_student.shape[0]

  @property
  def feat_dim(self) -> int:
    return self.memory_student.shape[1]


def init_crd_state(rng: chex.PRNGKey,
                   num_data: int,
                   feat_dim: int = 128,
                   *,
                   dataset_labels: Optional[Any] = None) -> CRDState:
  """Initial CRD memory banks, as the reference ``ContrastMemory``.

  Each entry is uniform in ``[-s, s]`` with ``s = 1 / sqrt(feat_dim / 3)``, so
  that a row's expected squared norm is ``feat_dim * s**2 / 3 = 1``. The
  normalisers ``Z`` start at ``-1`` (estimated on the first loss call).

  Args:
    rng: PRNG key.
    num_data: ``N``, the number of training examples (``batch["index"]`` lies
      in ``[0, N)``).
    feat_dim: the embedding dimension (paper: 128).
    dataset_labels: optional ``[N]`` integer class of every training example;
      when given, :func:`crd_loss` draws the negatives of an example from the
      other classes (the reference CIFAR-100 loader's ``mode="exact"``).

  Returns:
    A :class:`CRDState`.
  """
  if num_data < 2:
    raise ValueError(f"CRD needs num_data >= 2 training examples, got {num_data}.")
  if feat_dim < 1:
    raise ValueError(f"feat_dim must be >= 1, got {feat_dim}.")
  stdv = 1.0 / math.sqrt(feat_dim / 3.0)
  k_s, k_t = jax.random.split(rng)
  shape = (num_data, feat_dim)
  mem_s = jax.random.uniform(k_s, shape, jnp.float32, -stdv, stdv)
  mem_t = jax.random.uniform(k_t, shape, jnp.float32, -stdv, stdv)
  # Two distinct buffers (a shared one could not be donated to a jitted step).
  z_s, z_t = jnp.full((), -1.0, jnp.float32), jnp.full((), -1.0, jnp.float32)
  extra = {}
  if dataset_labels is not None:
    labels = np.asarray(dataset_labels)
    if labels.shape != (num_data,):
      raise ValueError(
          f"dataset_labels must have shape ({num_data},) (one class per "
          f"training example), got {labels.shape}.")
    if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
      raise ValueError("dataset_labels must be non-negative integers.")
    num_classes = int(labels.max()) + 1
    counts = np.bincount(labels, minlength=num_classes)
    if np.any(counts == num_data):
      raise ValueError("dataset_labels hold a single class: there are no "
                       "other-class negatives.")
    order = np.argsort(labels, kind="stable")
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    extra = dict(class_order=jnp.asarray(order, jnp.int32),
                 class_start=jnp.asarray(start, jnp.int32),
                 class_count=jnp.asarray(counts, jnp.int32),
                 labels=jnp.asarray(labels, jnp.int32))
  return CRDState(mem_s, mem_t, z_s, z_t, **extra)


def _torch_linear_bias_init(fan_in: int):
  bound = 1.0 / math.sqrt(max(fan_in, 1))

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class CRDEmbed(nn.Module):
  """CRD's embedding head: flatten, linear to ``features``, L2-normalise.

  The reference's ``Embed``; its ``nn.Linear`` initialisation is kept (kernel
  and bias uniform in ``+-1/sqrt(fan_in)``). Input ``[B, ...]``, output
  ``[B, features]`` float32 with unit rows.
  """
  features: int = 128

  @nn.compact
  def __call__(self, x: chex.Array) -> chex.Array:
    x = _utils.to_float32(x).reshape(x.shape[0], -1)
    fan_in = x.shape[-1]
    x = nn.Dense(
        self.features,
        kernel_init=nn.initializers.variance_scaling(1.0 / 3.0, "fan_in",
                                                     "uniform"),
        bias_init=_torch_linear_bias_init(fan_in),
        name="linear")(x)
    return l2_normalize(x)


def init_crd_heads(rng: chex.PRNGKey, student_feature: chex.Array,
                   teacher_feature: chex.Array, feat_dim: int = 128) -> dict:
  """Parameters of the two embedding heads, ``{"student": ..., "teacher": ...}``.

  ``student_feature`` ``[B, ...]`` and ``teacher_feature`` ``[B, ...]`` only
  give the input sizes (any batch size).
  """
  k_s, k_t = jax.random.split(rng)
  head = CRDEmbed(feat_dim)
  return {
      "student": head.init(k_s, jnp.zeros((1,) + tuple(jnp.shape(
          student_feature)[1:]), jnp.float32))["params"],
      "teacher": head.init(k_t, jnp.zeros((1,) + tuple(jnp.shape(
          teacher_feature)[1:]), jnp.float32))["params"],
  }


def _nce_log_terms(scores: chex.Array, log_z: chex.Array, num_data: int,
                   num_negatives: int) -> chex.Array:
  """Per-example ``log D1 + sum_j log D0_j`` from raw scores ``s / T``.

  ``scores``: ``[B, K+1]`` (``<memory, anchor> / T``), column 0 the positive.
  Returns ``[B]``.
  """
  log_p = scores - log_z  # log P = log(exp(s/T) / Z)
  noise = num_negatives / float(num_data)  # m * P_n
  log_noise = math.log(noise)
  log_denominator = jnp.logaddexp(log_p, math.log(noise + _NCE_EPS))
  log_d1 = log_p[:, 0] - log_denominator[:, 0]
  log_d0 = log_noise - log_denominator[:, 1:]
  return log_d1 + jnp.sum(log_d0, axis=-1)


def _estimate_log_z(scores: chex.Array, num_data: int,
                    weights: chex.Array) -> chex.Array:
  """``log(mean(exp(scores)) * N)`` over unmasked rows, without gradient."""
  scores = jax.lax.stop_gradient(scores)
  k1 = scores.shape[-1]
  row_lse = jax.nn.logsumexp(scores, axis=-1)  # [B]
  row_lse = jnp.where(weights > 0, row_lse, -jnp.inf)
  count = jnp.maximum(jnp.sum(weights > 0), 1).astype(jnp.float32)
  return (jax.nn.logsumexp(row_lse) - jnp.log(count * k1)
          + math.log(num_data))


def _gathered_scores(anchor: chex.Array, memory: chex.Array,
                     contrast_indices: chex.Array,
                     dense: Optional[bool]) -> chex.Array:
  """``<memory[idx[b, j]], anchor[b]>`` for ``idx`` ``[B, K+1]`` -> ``[B, K+1]``."""
  num_data, dim = memory.shape
  k1 = contrast_indices.shape[-1]
  if dense is None:
    dense = num_data <= dim * k1
  if dense:
    full = jnp.einsum("bd,nd->bn", anchor, memory,
                      precision=jax.lax.Precision.HIGHEST)
    return jnp.take_along_axis(full, contrast_indices, axis=-1)
  rows = jnp.take(memory, contrast_indices, axis=0)  # [B, K+1, D]
  return jnp.einsum("bkd,bd->bk", rows, anchor,
                    precision=jax.lax.Precision.HIGHEST)


def _momentum_update(memory: chex.Array, embedding: chex.Array,
                     indices: chex.Array, momentum: float,
                     weights: chex.Array) -> chex.Array:
  rows = jnp.take(memory, jnp.clip(indices, 0, memory.shape[0] - 1), axis=0)
  new = l2_normalize(momentum * rows
                     + (1.0 - momentum) * jax.lax.stop_gradient(embedding))
  # Masked (padding) examples, and any out-of-range index, write out of
  # bounds, where the scatter drops them.
  in_range = (indices >= 0) & (indices < memory.shape[0])
  target = jnp.where((weights > 0) & in_range, indices, memory.shape[0])
  return memory.at[target].set(new, mode="drop")


def crd_nce_loss(state: CRDState,
                 student_embedding: chex.Array,
                 teacher_embedding: chex.Array,
                 contrast_indices: chex.Array,
                 *,
                 nce_t: float = 0.07,
                 nce_m: float = 0.5,
                 mask: Optional[chex.Array] = None,
                 update_memory: bool = True,
                 dense_scores: Optional[bool] = None) -> tuple[chex.Array, CRDState]:
  r"""CRD's NCE loss of embedded features, and the memory-bank update.

  With ``v1 = student_embedding``, ``v2 = teacher_embedding`` (``[B, D]``,
  unit rows), ``idx = contrast_indices`` (``[B, K+1]``, column 0 the example's
  own dataset index ``y``, the others its negatives) and memory banks
  ``M_s``, ``M_t`` (``[N, D]``):

  .. math::
    P^{s}_{bj} = \frac{\exp(\langle M_t[idx_{bj}], v1_b\rangle / T)}{Z_s},\quad
    P^{t}_{bj} = \frac{\exp(\langle M_s[idx_{bj}], v2_b\rangle / T)}{Z_t}

  .. math::
    \mathcal{L}(P) = -\frac1B \sum_b \Bigl[\log\frac{P_{b0}}{P_{b0} + K/N + \epsilon}
      + \sum_{j=1}^{K} \log\frac{K/N}{P_{bj} + K/N + \epsilon}\Bigr]

  and the loss is ``L(P^s) + L(P^t)`` (Tian et al. 2020, Eq. 18;
  ``ContrastLoss`` of RepDistiller). ``Z`` is estimated on the first call as
  ``mean(exp(s / T)) * N`` and kept in the returned state. Then
  ``M_s[y] <- normalize(nce_m M_s[y] + (1 - nce_m) v1)`` and
  ``M_t[y] <- normalize(nce_m M_t[y] + (1 - nce_m) v2)``.

  Args:
    state: the :class:`CRDState`.
    student_embedding: ``[B, D]`` student embeddings (the head's output).
    teacher_embedding: ``[B, D]`` teacher embeddings.
    contrast_indices: ``[B, K+1]`` integer dataset indices, column 0 the
      positive (the example itself).
    nce_t: the temperature ``T`` (paper: 0.07).
    nce_m: the memory momentum (paper: 0.5).
    mask: optional ``[B]``; masked examples count in neither the loss nor the
      memory update nor the ``Z`` estimate.
    update_memory: ``False`` leaves the memory banks unchanged (evaluation);
      ``Z`` is still estimated if unset.
    dense_scores: compute the scores from the dense ``[B, N]`` product
      (``True``) or by gathering ``[B, K+1, D]`` memory rows (``False``);
      ``None`` picks the one with fewer intermediate elements.

  Returns:
    ``(loss, new_state)``; ``loss`` is a float32 scalar.
  """
  _utils.check_temperature(nce_t, "nce_t")
  _utils.check_unit_interval(nce_m, "nce_m")
  num_data, dim = state.memory_student.shape
  v1 = _utils.to_float32(student_embedding)
  v2 = _utils.to_float32(teacher_embedding)
  if v1.ndim != 2 or v2.ndim != 2 or v1.shape != v2.shape:
    raise ValueError(
        f"student and teacher embeddings must both be [B, {dim}], got "
        f"{tuple(v1.shape)} and {tuple(v2.shape)}.")
  if v1.shape[1] != dim:
    raise ValueError(
        f"embedding dimension {v1.shape[1]} does not match the memory bank's "
        f"feat_dim {dim}.")
  batch = v1.shape[0]
  idx = jnp.asarray(contrast_indices)
  if idx.ndim != 2 or idx.shape[0] != batch or idx.shape[1] < 2:
    raise ValueError(
        f"contrast_indices must be [B={batch}, K+1] with K >= 1 (column 0 the "
        f"positive), got shape {tuple(idx.shape)}.")
  if not jnp.issubdtype(idx.dtype, jnp.integer):
    raise ValueError(f"contrast_indices must be integers, got {idx.dtype}.")
  num_negatives = idx.shape[1] - 1
  # Out-of-range indices (e.g. those of masked padding examples) are clipped
  # for the reads; jnp.take would otherwise fill them with NaN.
  idx = jnp.clip(idx.astype(jnp.int32), 0, num_data - 1)
  if mask is None:
    weights = jnp.ones((batch,), jnp.float32)
  else:
    _utils.check_mask(mask, (batch,))
    weights = (jnp.asarray(mask) > 0).astype(jnp.float32)
  inv_t = 1.0 / jnp.asarray(nce_t, jnp.float32)

  # Student anchor: teacher memory; teacher anchor: student memory. The memory
  # is a constant of the loss (``.detach()`` in the reference).
  mem_s = jax.lax.stop_gradient(state.memory_student)
  mem_t = jax.lax.stop_gradient(state.memory_teacher)
  scores_s = _gathered_scores(v1, mem_t, idx, dense_scores) * inv_t
  scores_t = _gathered_scores(v2, mem_s, idx, dense_scores) * inv_t

  log_z_s = jnp.where(state.z_student > 0,
                      jnp.log(jnp.maximum(state.z_student, 1e-30)),
                      _estimate_log_z(scores_s, num_data, weights))
  log_z_t = jnp.where(state.z_teacher > 0,
                      jnp.log(jnp.maximum(state.z_teacher, 1e-30)),
                      _estimate_log_z(scores_t, num_data, weights))

  per_example = (_nce_log_terms(scores_s, log_z_s, num_data, num_negatives)
                 + _nce_log_terms(scores_t, log_z_t, num_data, num_negatives))
  count = jnp.maximum(jnp.sum(weights), 1.0)
  loss = -jnp.sum(jnp.where(weights > 0, per_example, 0.0)) / count

  positives = jnp.asarray(contrast_indices)[:, 0].astype(jnp.int32)
  if update_memory:
    mem_s = _momentum_update(mem_s, v1, positives, nce_m, weights)
    mem_t = _momentum_update(mem_t, v2, positives, nce_m, weights)
  # A Z already set is carried bit-exactly (not through exp(log(Z))).
  z_s = jnp.where(state.z_student > 0, state.z_student, jnp.exp(log_z_s))
  z_t = jnp.where(state.z_teacher > 0, state.z_teacher, jnp.exp(log_z_t))
  new_state = state._replace(
      memory_student=mem_s, memory_teacher=mem_t,
      z_student=jax.lax.stop_gradient(z_s.astype(jnp.float32)),
      z_teacher=jax.lax.stop_gradient(z_t.astype(jnp.float32)))
  return loss, new_state


def sample_contrast_indices(rng: chex.PRNGKey,
                            state: CRDState,
                            indices: chex.Array,
                            num_negatives: int) -> chex.Array:
  """Draws ``[B, K+1]`` contrast indices: column 0 ``indices``, then ``K`` negatives.

  Negatives are drawn with replacement, uniformly over the dataset minus the
  example itself, or, when the state holds class information
  (:func:`init_crd_state` with ``dataset_labels``), uniformly over the
  examples of the *other* classes. Both cost ``O(B K)``: a uniform draw over
  the allowed range is shifted past the excluded block.
  """
  indices = jnp.asarray(indices).astype(jnp.int32)
  num_data = state.num_data
  shape = indices.shape + (num_negatives,)
  if state.class_order is None:
    r = jax.random.randint(rng, shape, 0, num_data - 1)
    neg = r + (r >= indices[:, None]).astype(jnp.int32)
  else:
    label = state.labels[indices]
    start = state.class_start[label][:, None]
    count = state.class_count[label][:, None]
    u = jax.random.uniform(rng, shape)
    r = jnp.floor(u * (num_data - count)).astype(jnp.int32)
    r = jnp.minimum(r, num_data - count - 1)
    pos = r + jnp.where(r >= start, count, 0)
    neg = state.class_order[pos]
  return jnp.concatenate([indices[:, None], neg], axis=-1)


def crd_loss(state: CRDState,
             head_params: Optional[Mapping[str, Any]],
             student_embedding: chex.Array,
             teacher_embedding: chex.Array,
             indices: chex.Array,
             rng: Optional[chex.PRNGKey],
             *,
             nce_k: int = 16384,
             nce_t: float = 0.07,
             nce_m: float = 0.5,
             contrast_indices: Optional[chex.Array] = None,
             mask: Optional[chex.Array] = None,
             update_memory: bool = True,
             dense_scores: Optional[bool] = None) -> tuple[chex.Array, CRDState]:
  """Contrastive Representation Distillation loss (Tian et al., ICLR 2020).

  Embeds the student's and the teacher's features with the two
  :class:`CRDEmbed` heads (``head_params = {"student": ..., "teacher": ...}``;
  ``None`` when the inputs are already embedded, unit-norm ``[B, feat_dim]``),
  draws ``nce_k`` negatives per example (see :func:`sample_contrast_indices`;
  ``nce_k`` is clipped to ``N - 1``) unless ``contrast_indices`` are given,
  and returns :func:`crd_nce_loss` (the symmetric NCE loss and the updated
  memory banks). Paper defaults: ``feat_dim=128, nce_k=16384, nce_t=0.07,
  nce_m=0.5``, loss weight 0.8 next to a cross-entropy of weight 1.

  Args:
    state: :class:`CRDState` (:func:`init_crd_state`).
    head_params: the heads' params (:func:`init_crd_heads`) or ``None``.
    student_embedding: ``[B, ...]`` student features (e.g. penultimate).
    teacher_embedding: ``[B, ...]`` teacher features.
    indices: ``[B]`` integer dataset index of every example (``batch["index"]``).
    rng: PRNG key for the negatives (unused when ``contrast_indices`` given).
    nce_k: number of negatives ``K``.
    nce_t: NCE temperature.
    nce_m: memory momentum.
    contrast_indices: optional ``[B, K+1]`` explicit indices, column 0 equal
      to ``indices`` (the reference data loader's ``contrast_idx``).
    mask: optional ``[B]`` padding mask.
    update_memory: update the memory banks (training).
    dense_scores: see :func:`crd_nce_loss`.

  Returns:
    ``(loss, new_state)``.
  """
  indices = jnp.asarray(indices)
  if indices.ndim != 1:
    raise ValueError(f"indices must be [B] dataset indices, got shape "
                     f"{tuple(indices.shape)}.")
  if not jnp.issubdtype(indices.dtype, jnp.integer):
    raise ValueError(f"indices must be integers, got dtype {indices.dtype}.")
  batch = indices.shape[0]
  if jnp.shape(student_embedding)[0] != batch or jnp.shape(
      teacher_embedding)[0] != batch:
    raise ValueError(
        f"{batch} indices but student features {jnp.shape(student_embedding)} "
        f"and teacher features {jnp.shape(teacher_embedding)}.")
  concrete = _utils._concrete_value(indices)  # pylint: disable=protected-access
  if concrete is not None and concrete.size and (
      concrete.min() < 0 or concrete.max() >= state.num_data):
    raise ValueError(
        f"dataset indices must lie in [0, {state.num_data}) (num_data of the "
        f"memory bank); got values in [{concrete.min()}, {concrete.max()}].")
  if head_params is not None:
    head = CRDEmbed(state.feat_dim)
    v1 = head.apply({"params": head_params["student"]}, student_embedding)
    v2 = head.apply({"params": head_params["teacher"]}, teacher_embedding)
  else:
    v1 = _utils.to_float32(student_embedding).reshape(batch, -1)
    v2 = _utils.to_float32(teacher_embedding).reshape(batch, -1)
  if contrast_indices is None:
    if rng is None:
      raise ValueError("crd_loss needs an rng to draw negatives (or explicit "
                       "contrast_indices).")
    k = int(min(nce_k, state.num_data - 1))
    if k < 1:
      raise ValueError(f"nce_k must be >= 1, got {nce_k}.")
    contrast_indices = sample_contrast_indices(rng, state, indices, k)
  return crd_nce_loss(state, v1, v2, contrast_indices, nce_t=nce_t, nce_m=nce_m,
                      mask=mask, update_memory=update_memory,
                      dense_scores=dense_scores)


def _flat_feature(output, name: str, who: str) -> chex.Array:
  features = getattr(output, "features", None) or {}
  if name not in features:
    raise KeyError(
        f"CRD needs the {who}'s feature {name!r}, but the {who} produced "
        f"{sorted(features)}; capture it with the adapter's feature_names=.")
  x = features[name]
  return jnp.reshape(x, (jnp.shape(x)[0], -1))


def crd_term(name: str = "crd",
             *,
             num_data: int,
             student_feature: str = "penultimate",
             teacher_feature: str = "penultimate",
             weight: ScalarOrSchedule = 0.8,
             feat_dim: int = 128,
             nce_k: int = 16384,
             nce_t: float = 0.07,
             nce_m: float = 0.5,
             dataset_labels: Optional[Any] = None,
             index_key: str = "index",
             contrast_index_key: Optional[str] = "contrast_index",
             mask_key: Optional[str] = "mask",
             dense_scores: Optional[bool] = None) -> Term:
  """CRD as a stateful :class:`kdjax.losses.Term` (weight 0.8, as the paper).

  The term reads ``student.features[student_feature]`` and
  ``teacher.features[teacher_feature]`` (flattened to ``[B, -1]``),
  ``batch[index_key]`` (``[B]`` dataset indices in ``[0, num_data)``),
  optionally ``batch[contrast_index_key]`` (``[B, K+1]``) and
  ``batch[mask_key]``. Its learnable params are the two embedding heads
  (``init_params``), its state the :class:`CRDState` (``init_state``). In
  evaluation (``inputs.train == False``) the memory is not updated.

  Args:
    name: the term's name.
    num_data: ``N``, the training-set size.
    student_feature: the student's feature name.
    teacher_feature: the teacher's feature name.
    weight: the term's weight (float or schedule).
    feat_dim, nce_k, nce_t, nce_m: see :func:`crd_loss`.
    dataset_labels: optional ``[N]`` classes, for other-class negatives.
    index_key: the batch key of the dataset indices.
    contrast_index_key: the batch key of explicit contrast indices, if any.
    mask_key: the batch key of the padding mask.
    dense_scores: see :func:`crd_nce_loss`.

  Returns:
    A :class:`Term` with ``stateful=True``.
  """
  if num_data < 2:
    raise ValueError(f"num_data must be >= 2, got {num_data}.")
  _utils.check_temperature(nce_t, "nce_t")
  _utils.check_unit_interval(nce_m, "nce_m")
  if nce_k < 1:
    raise ValueError(f"nce_k must be >= 1, got {nce_k}.")

  def init_params(rng, student_out, teacher_out, batch):
    del batch
    return init_crd_heads(
        rng, _flat_feature(student_out, student_feature, "student"),
        _flat_feature(teacher_out, teacher_feature, "teacher"), feat_dim)

  def init_state(rng, student_out, teacher_out, batch):
    del student_out, teacher_out, batch
    return init_crd_state(rng, num_data, feat_dim,
                          dataset_labels=dataset_labels)

  def fn(inputs: TermInputs):
    batch = inputs.batch
    if index_key not in batch:
      raise KeyError(
          f"CRD needs the dataset index of every example in batch[{index_key!r}]"
          f" ([B] ints in [0, {num_data})); batch keys: {sorted(batch)}.")
    if inputs.state is None or inputs.params is None:
      raise ValueError(
          f"CRD term {name!r} got no state/params: initialise them with "
          "ComposedLoss.init_params / init_state and pass them in.")
    contrast = None
    if contrast_index_key is not None and contrast_index_key in batch:
      contrast = batch[contrast_index_key]
    mask = batch.get(mask_key) if mask_key is not None else None
    return crd_loss(
        inputs.state, inputs.params,
        _flat_feature(inputs.student, student_feature, "student"),
        _flat_feature(inputs.teacher, teacher_feature, "teacher"),
        batch[index_key], inputs.rng, nce_k=nce_k, nce_t=nce_t, nce_m=nce_m,
        contrast_indices=contrast, mask=mask, update_memory=inputs.train,
        dense_scores=dense_scores)

  return Term(name, fn, weight, stateful=True, init_params=init_params,
              init_state=init_state)
