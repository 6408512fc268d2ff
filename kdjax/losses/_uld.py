r"""Universal Logit Distillation (ULD): distillation across tokenizers.

Boizard, El Haddad, Hudelot & Colombo 2024, "Towards Cross-Tokenizer
Distillation: the Universal Logit Distillation Loss for LLMs" (arXiv
2402.12030); reference PyTorch code ``Nicolas-BZRD/llm-recipes``,
``models/distillation_model.py`` (``DistillationLoss``).

A teacher and a student with different tokenizers have different vocabularies
(sizes ``V_t != V_s``, and no token-to-token map), so a per-token KL is
undefined. ULD compares the two next-token distributions up to a permutation
of the vocabulary: both are sorted in decreasing order, the shorter is padded
with zeros, and their L1 distance is taken,

.. math::
  d(p_s, p_t) = \sum_{i=1}^{\max(V_s, V_t)} |p_s^{\downarrow}[i] -
  p_t^{\downarrow}[i]|,

(the paper derives it as a closed-form approximation of an optimal-transport
(Wasserstein) distance between distributions over different supports). The
two token sequences are aligned by position within the response: the
``j``-th response position of the student is matched with the ``j``-th of the
teacher, for ``j < min(n_s, n_t)`` (the shorter response of that sequence).

Choices, and their source (reference code = ``DistillationLoss.forward``):

* Response positions: the reference takes, per sequence, the logits whose
  labels are not ``ignore_index`` (the answer span, labels shifted by the
  model). Here the caller passes a ``[B, T]`` response mask over the logits'
  positions (kdjax's ``loss_mask``: position ``t`` predicts a response token).
  For a contiguous span this is the reference's span; a non-contiguous mask
  is gathered in order.
* Truncation: per sequence, to ``min(n_s, n_t)`` response positions
  (reference: ``size = min(student_answer_size[i], teacher_answer_size[i])``).
* Temperature: each softmax divides its own logits by its temperature (the
  reference has ``student_temperature`` and ``teacher_temperature``, both 1
  by default); here ``temperature`` applies to both unless
  ``teacher_temperature`` is given. No ``T^2`` factor (the reference has none).
* Sorting then zero-padding the smaller vocabulary: as the reference.
  Padding rows of a model (more embedding rows than the tokenizer has tokens)
  are not removed here: slice them off first (``kdjax.lm.uld_term`` does so
  from ``student_vocab_size``/``teacher_vocab_size``).
* Reduction ``average="sequence"`` (default) is the reference's: the L1
  distances are summed over the vocabulary, averaged over each sequence's
  aligned positions, then averaged over the sequences. A sequence with no
  aligned position is left out of that batch mean (the reference would
  produce NaN for it). ``average="token"`` averages over all aligned
  positions of the batch instead (every aligned token weighs the same).
* Total objective: the reference returns ``CE + lambda * ULD`` with ``CE``
  the Hugging Face model loss, i.e. the student's next-token cross-entropy
  averaged over all its unmasked (response) tokens of the batch; here the
  same, on ``student_targets`` under ``student_response_mask``.
* The reference's ``skip_*_eos`` options (drop the last response token) are
  obtained here by zeroing that position in the response mask.
* Not in the paper: the optional ``top_k`` approximation of
  :func:`sorted_probability_distance` (for large vocabularies), off by
  default.

All functions compute in float32 (bf16/f16 inputs are upcast), are jit-,
grad- and vmap-safe and have static output shapes.
"""

from __future__ import annotations

from typing import Optional

import chex
import jax
import jax.numpy as jnp

from kdjax.losses import _divergences
from kdjax.losses import _utils

AVERAGES = ("sequence", "token")


def _check_top_k(top_k: Optional[int]) -> None:
  if top_k is not None and (isinstance(top_k, bool)
                            or not isinstance(top_k, int) or top_k < 1):
    raise ValueError(f"top_k must be a positive int or None, got {top_k!r}.")


def _check_pair(student_logits: chex.Array, teacher_logits: chex.Array) -> None:
  """Leading (batch/sequence) shapes must agree; vocabulary sizes may differ."""
  s, t = jnp.shape(student_logits), jnp.shape(teacher_logits)
  if len(s) == 0 or len(t) == 0:
    raise ValueError(
        "logits must have at least one axis (the vocabulary axis); got "
        f"student shape {s} and teacher shape {t}.")
  if s[:-1] != t[:-1]:
    raise ValueError(
        f"leading-shape mismatch: student logits {s} and teacher logits {t} "
        f"must agree on every axis but the last (vocabulary) one; got "
        f"{s[:-1]} vs {t[:-1]}.")


def _sorted_log_probs(logits: chex.Array, temperature,
                      k: Optional[int]) -> chex.Array:
  """Decreasing log-probabilities ``[..., min(k, V)]`` of ``softmax(z / T)``.

  Sorting the logits sorts the probabilities (softmax is monotone), so only
  the ``k`` kept values are exponentiated.
  """
  z = _utils.to_float32(logits) / temperature
  log_z = jax.nn.logsumexp(z, axis=-1, keepdims=True)
  if k is None or k >= z.shape[-1]:
    top = jnp.sort(z, axis=-1, descending=True)
  else:
    top, _ = jax.lax.top_k(z, k)
  return top - log_z


def sorted_probabilities(logits: chex.Array, temperature: chex.Numeric = 1.0, *,
                         top_k: Optional[int] = None) -> chex.Array:
  """``softmax(logits / T)`` sorted in decreasing order, float32.

  Args:
    logits: ``[..., V]``.
    temperature: ``T > 0``.
    top_k: keep only the ``k`` largest (``[..., min(k, V)]``); ``None``: all.

  Returns:
    ``[..., V]`` (or ``[..., min(k, V)]``) decreasing probabilities.
  """
  _utils.check_temperature(temperature)
  _check_top_k(top_k)
  return jnp.exp(_sorted_log_probs(logits, temperature, top_k))


def sorted_probability_distance(
    student_logits: chex.Array,
    teacher_logits: chex.Array,
    temperature: chex.Numeric = 1.0,
    *,
    teacher_temperature: Optional[chex.Numeric] = None,
    mask: Optional[chex.Array] = None,
    reduction: str = "mean",
    top_k: Optional[int] = None) -> chex.Array:
  r"""Per-position ULD distance between two vocabularies of any sizes.

  .. math::
    d = \sum_{i<\min(V_s,V_t)} |a_i - b_i| + \sum_{i \ge \min(V_s,V_t)} c_i

  with ``a = sort_desc(softmax(z_s / T))``, ``b = sort_desc(softmax(z_t /
  T_t))`` and ``c`` the longer of the two (``|c_i - 0| = c_i``: zero-padding
  the smaller vocabulary, as ULD does, without building the padded array).
  ``d`` lies in ``[0, 2]``; it is 0 iff the sorted distributions agree.

  With ``top_k = k`` (approximation for large vocabularies): only the
  ``k_s = min(k, V_s)`` and ``k_t = min(k, V_t)`` largest probabilities are
  computed (``jax.lax.top_k``, no full sort). The kept entries are compared
  exactly as above (entries of one list beyond the other's exhausted
  vocabulary against 0), and the rest by its mass only:

  .. math::
    \tilde d = \sum_{i<\max(k_s,k_t)} |a_i - b_i| + |R_s - R_t|,\quad
    R = 1 - \sum_{i<k} a_i

  (``R = -expm1(logsumexp(top-k) - logsumexp(all))``; ``R = 0`` for a side
  whose whole vocabulary is kept). By the triangle inequality
  ``0 <= d - d~ <= 2 min(R_s, R_t)``: the approximation is a lower bound,
  exact when either side keeps its whole vocabulary, and ``k >= max(V_s,
  V_t)`` computes the exact value (same code path).

  Args:
    student_logits: ``[..., V_s]``.
    teacher_logits: ``[..., V_t]`` (same leading shape; ``V_t`` may differ).
    temperature: ``T > 0`` of the student (and of the teacher by default).
    teacher_temperature: the teacher's temperature, if different.
    mask: optional ``[...]`` positions to keep.
    reduction: ``"mean"`` (over unmasked positions), ``"sum"`` or ``"none"``.
    top_k: optional positive int, see above.

  Returns:
    A float32 scalar, or ``[...]`` with ``reduction="none"``.

  Raises:
    ValueError: leading shapes differ, ``T <= 0``, bad ``top_k``, ``mask`` or
      ``reduction``.
  """
  _check_pair(student_logits, teacher_logits)
  _utils.check_temperature(temperature)
  if teacher_temperature is None:
    teacher_temperature = temperature
  else:
    _utils.check_temperature(teacher_temperature, "teacher_temperature")
  _check_top_k(top_k)
  _utils.check_reduction(reduction)
  _utils.check_mask(mask, jnp.shape(student_logits)[:-1])
  v_s, v_t = jnp.shape(student_logits)[-1], jnp.shape(teacher_logits)[-1]
  if top_k is not None and top_k >= max(v_s, v_t):
    top_k = None
  log_a = _sorted_log_probs(student_logits, temperature, top_k)
  log_b = _sorted_log_probs(teacher_logits, teacher_temperature, top_k)
  a, b = jnp.exp(log_a), jnp.exp(log_b)
  n = min(a.shape[-1], b.shape[-1])
  per_position = (jnp.sum(jnp.abs(a[..., :n] - b[..., :n]), axis=-1)
                  + jnp.sum(a[..., n:], axis=-1) + jnp.sum(b[..., n:], axis=-1))
  if top_k is not None:
    def remainder(log_p, size):
      if top_k >= size:  # the whole vocabulary is kept: no remainder.
        return jnp.zeros(log_p.shape[:-1], jnp.float32)
      kept = jax.nn.logsumexp(log_p, axis=-1)  # log of the kept mass, <= 0
      return -jnp.expm1(jnp.minimum(kept, 0.0))
    per_position = per_position + jnp.abs(remainder(log_a, v_s)
                                          - remainder(log_b, v_t))
  return _utils.reduce_loss(per_position, mask, reduction)


def align_responses(student_logits: chex.Array,
                    student_response_mask: chex.Array,
                    teacher_logits: chex.Array,
                    teacher_response_mask: chex.Array
                    ) -> tuple[chex.Array, chex.Array, chex.Array]:
  """Gathers each row's response positions of both models, left-aligned.

  Row ``b``'s response positions (mask true/nonzero), in order, are moved to
  the front: ``student_aligned[b, j] = student_logits[b, s_j]`` with ``s_j``
  the ``j``-th response position of the student (likewise the teacher).
  ``mask[b, j] = j < min(n_s[b], n_t[b])`` with ``n_*[b]`` the number of
  response positions: the ULD truncation of each pair to the shorter
  response (Boizard et al. 2024). ``L = min(T_s, T_t)`` is static; aligned
  rows beyond the mask hold other positions' logits (finite, ignored).

  Args:
    student_logits: ``[B, T_s, V_s]``.
    student_response_mask: ``[B, T_s]`` (bool or 0/1).
    teacher_logits: ``[B, T_t, V_t]``.
    teacher_response_mask: ``[B, T_t]``.

  Returns:
    ``(student_aligned [B, L, V_s], teacher_aligned [B, L, V_t],
    mask [B, L] float32)``.

  Raises:
    ValueError: naming the shapes when they are not ``[B, T, V]`` with masks
      ``[B, T]`` and a common ``B``.
  """
  s_shape, t_shape = jnp.shape(student_logits), jnp.shape(teacher_logits)
  if len(s_shape) != 3 or len(t_shape) != 3:
    raise ValueError(
        "align_responses expects logits [batch, time, vocab]; got student "
        f"{s_shape} and teacher {t_shape}.")
  if s_shape[0] != t_shape[0]:
    raise ValueError(
        f"batch-size mismatch: student logits {s_shape} and teacher logits "
        f"{t_shape}.")
  for name, m, shape in (("student", student_response_mask, s_shape),
                         ("teacher", teacher_response_mask, t_shape)):
    if tuple(jnp.shape(m)) != tuple(shape[:2]):
      raise ValueError(
          f"{name}_response_mask has shape {tuple(jnp.shape(m))}, expected "
          f"{tuple(shape[:2])} (the {name} logits' [batch, time]).")
  length = min(s_shape[1], t_shape[1])

  def gather(logits, m):
    keep = jnp.asarray(m) > 0
    # Stable sort on "not a response position": response positions first,
    # in order.
    order = jnp.argsort(jnp.logical_not(keep).astype(jnp.int32), axis=-1,
                        stable=True)[:, :length]
    return (jnp.take_along_axis(logits, order[..., None], axis=1),
            jnp.sum(keep, axis=-1))

  s_aligned, n_s = gather(student_logits, student_response_mask)
  t_aligned, n_t = gather(teacher_logits, teacher_response_mask)
  n = jnp.minimum(n_s, n_t)
  mask = (jnp.arange(length)[None, :] < n[:, None]).astype(jnp.float32)
  return s_aligned, t_aligned, mask


def _average(per_position: chex.Array, mask: chex.Array,
             average: str) -> chex.Array:
  per_position = jnp.where(mask > 0, per_position, 0.0)
  if average == "token":
    return jnp.sum(per_position) / jnp.maximum(jnp.sum(mask), 1.0)
  count = jnp.sum(mask, axis=-1)
  per_sequence = jnp.sum(per_position, axis=-1) / jnp.maximum(count, 1.0)
  present = (count > 0).astype(jnp.float32)
  return jnp.sum(per_sequence * present) / jnp.maximum(jnp.sum(present), 1.0)


def _check_average(average: str) -> None:
  if average not in AVERAGES:
    raise ValueError(f"average must be one of {AVERAGES}, got {average!r}.")


def check_uld_options(top_k: Optional[int] = None,
                      average: str = "sequence") -> None:
  """Checks the static options of :func:`uld_loss` (``ValueError``).

  :func:`uld_loss` checks them itself when it runs; a term built around it
  (e.g. :func:`kdjax.lm.uld_term`) calls this to fail when it is built, not
  at the first train step.

  Args:
    top_k: ``None`` or a positive int.
    average: ``"sequence"`` or ``"token"``.
  """
  _check_top_k(top_k)
  _check_average(average)


def uld_loss(student_logits: chex.Array,
             student_response_mask: chex.Array,
             teacher_logits: chex.Array,
             teacher_response_mask: chex.Array,
             temperature: chex.Numeric = 1.0,
             *,
             teacher_temperature: Optional[chex.Numeric] = None,
             top_k: Optional[int] = None,
             average: str = "sequence") -> chex.Array:
  r"""The ULD term: aligned sorted-probability L1 (Boizard et al. 2024).

  .. math::
    \mathrm{ULD} = \frac{1}{|\mathcal B'|}\sum_{b \in \mathcal B'}
      \frac{1}{n_b} \sum_{j<n_b} d\big(p_s[b, s_j], p_t[b, t_j]\big),\quad
    n_b = \min(n_s[b], n_t[b])

  (``average="sequence"``, the reference code's; ``B'`` the sequences with
  ``n_b > 0``), or :math:`\sum_{b,j<n_b} d / \sum_b n_b` with
  ``average="token"``. ``d`` is :func:`sorted_probability_distance`, the
  alignment :func:`align_responses`; see the module docstring for the
  provenance of each choice.

  Args:
    student_logits: ``[B, T_s, V_s]``.
    student_response_mask: ``[B, T_s]``, the positions predicting a response
      token (kdjax's ``loss_mask``).
    teacher_logits: ``[B, T_t, V_t]``.
    teacher_response_mask: ``[B, T_t]``.
    temperature: ``T > 0`` (student, and teacher by default).
    teacher_temperature: the teacher's temperature, if different.
    top_k: optional approximation, see :func:`sorted_probability_distance`.
    average: ``"sequence"`` or ``"token"``.

  Returns:
    A float32 scalar (0 when no sequence has an aligned position).
  """
  _check_average(average)
  s, t, mask = align_responses(student_logits, student_response_mask,
                               teacher_logits, teacher_response_mask)
  per_position = sorted_probability_distance(
      s, t, temperature, teacher_temperature=teacher_temperature,
      top_k=top_k, reduction="none")
  return _average(per_position, mask, average)


def universal_logit_distillation_parts(
    student_logits: chex.Array,
    student_targets: chex.Array,
    student_response_mask: chex.Array,
    teacher_logits: chex.Array,
    teacher_response_mask: chex.Array,
    *,
    uld_weight: chex.Numeric = 1.0,
    temperature: chex.Numeric = 1.0,
    teacher_temperature: Optional[chex.Numeric] = None,
    top_k: Optional[int] = None,
    average: str = "sequence") -> dict:
  r"""``{"loss": CE + uld_weight * ULD, "ce": CE, "uld": ULD}`` (f32 scalars).

  ``CE`` is the student's masked mean next-token cross-entropy on its own
  ``student_targets [B, T_s]`` over ``student_response_mask`` (temperature
  1), ``ULD`` is :func:`uld_loss`. This is the objective of Boizard et al.
  2024 (Eq. "L = L_CE + lambda L_ULD"; reference ``DistillationLoss`` with
  ``crossentropy_weight = 1``). Arguments as in :func:`uld_loss`.

  ``student_targets`` are checked as the labels of
  :func:`kdjax.losses.hard_label_cross_entropy`: outside ``[0, V_s)``
  (response mask or not) they raise ``ValueError`` eagerly when concrete,
  and under jit only under :func:`kdjax.losses.runtime_checks`.
  """
  ce = _divergences.labelled_cross_entropy(
      student_logits, student_targets, "universal_logit_distillation",
      arg_name="student_targets", mask=student_response_mask)
  uld = uld_loss(student_logits, student_response_mask, teacher_logits,
                 teacher_response_mask, temperature,
                 teacher_temperature=teacher_temperature, top_k=top_k,
                 average=average)
  return {"loss": ce + uld_weight * uld, "ce": ce, "uld": uld}


def universal_logit_distillation_loss(
    student_logits: chex.Array,
    student_targets: chex.Array,
    student_response_mask: chex.Array,
    teacher_logits: chex.Array,
    teacher_response_mask: chex.Array,
    *,
    uld_weight: chex.Numeric = 1.0,
    temperature: chex.Numeric = 1.0,
    teacher_temperature: Optional[chex.Numeric] = None,
    top_k: Optional[int] = None,
    average: str = "sequence") -> chex.Array:
  r"""The ULD objective :math:`L_{CE} + \lambda L_{ULD}` (Boizard et al. 2024).

  The total of :func:`universal_logit_distillation_parts` (which also returns
  the two parts). Shapes: student ``[B, T_s, V_s]``, targets and mask
  ``[B, T_s]``; teacher ``[B, T_t, V_t]`` and mask ``[B, T_t]``.
  """
  return universal_logit_distillation_parts(
      student_logits, student_targets, student_response_mask, teacher_logits,
      teacher_response_mask, uld_weight=uld_weight, temperature=temperature,
      teacher_temperature=teacher_temperature, top_k=top_k,
      average=average)["loss"]
