"""Token-level distillation of language models: loss terms, vocabularies, train step.

Token-level KD (Hinton et al. 2015 applied per token; Kim & Rush 2016 "word
level KD") matches the student's next-token distribution to the teacher's at
every completion position::

  L = T^2 / N * sum_{b,t} m[b,t] * D(p_teacher[b,t] / T, q_student[b,t] / T)
  N = sum_{b,t} m[b,t]                      (number of unmasked tokens)

with ``m = batch["loss_mask"]`` (prompt and padding excluded) and ``D`` any
divergence of ``kdjax.losses`` (``"kl"`` forward, ``"reverse_kl"``, ``"jsd"``
generalised JSD with ``beta``, ``"skew_kl"``/``"skew_reverse_kl"`` with
``alpha``, ``"tvd"``), or against a top-k teacher with a tail bucket.
Padding never dilutes the mean. With gradient accumulation the step weights
micro-batch ``i`` by ``N_i / N`` (``kdjax.train``'s ``accumulation_weighting``
on the mask), so micro-batches of uneven token counts give the full batch's
gradient: :func:`lm_step_options` sets that up, for :func:`make_lm_train_step`
and every other LM step.

Vocabularies
------------
Teacher and student that share a tokenizer may still have different numbers
of embedding rows (vocabularies padded to a multiple of 64 or 128, e.g.
151936 vs 152064 rows for one 151665-token tokenizer). The rows beyond the
tokenizer's ``vocab_size`` never hold a real token: :func:`align_vocab` slices
both logits to ``[..., :vocab_size]`` and both softmaxes are renormalised over
the real tokens. Vocabularies that really differ (a model with fewer rows than
the tokenizer, or different sizes and no shared ``vocab_size``) raise a
``ValueError`` naming both sizes: such pairs need a cross-tokenizer loss
(Universal Logit Distillation, the memory-lean LM issue), not a per-token
divergence.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import chex
import jax.numpy as jnp
import optax

from kdjax import losses
from kdjax import train
from kdjax.losses import TermInputs
from kdjax.models import ApplyFn

MASK_KEY = "loss_mask"
TARGET_KEY = "targets"

_CROSS_TOKENIZER_HINT = (
    "Models with different tokenizers cannot be compared token by token; use "
    "the cross-tokenizer loss instead: Universal Logit Distillation, ULD "
    "(kdjax.lm.make_uld_loss / kdjax.lm.uld_term, kdjax.losses.uld_loss).")


def check_vocabularies(student_rows: int, teacher_rows: int,
                       vocab_size: Optional[int] = None) -> int:
  """Returns the common vocabulary size the divergence is computed over.

  Args:
    student_rows: the student's logit width ``V_s``.
    teacher_rows: the teacher's logit width ``V_t``.
    vocab_size: the shared tokenizer's vocabulary size ``V``, or ``None``.

  Returns:
    ``V`` when given (both models must have ``>= V`` rows: padding rows are
    sliced off), else ``V_s`` (which must equal ``V_t``).

  Raises:
    ValueError: naming both sizes, when the vocabularies differ in a way
      padding cannot explain.
  """
  if vocab_size is None:
    if student_rows != teacher_rows:
      raise ValueError(
          f"vocabulary mismatch: the student has {student_rows} vocabulary "
          f"entries and the teacher {teacher_rows}. If both use the same "
          "tokenizer with padded embedding rows, pass vocab_size=<the "
          "tokenizer's vocabulary size> to slice the padding off. "
          + _CROSS_TOKENIZER_HINT)
    return student_rows
  if student_rows < vocab_size or teacher_rows < vocab_size:
    raise ValueError(
        f"vocabulary mismatch: the student has {student_rows} vocabulary "
        f"entries and the teacher {teacher_rows}, but the shared tokenizer "
        f"has {vocab_size}; a model with fewer rows than the tokenizer uses a "
        "different vocabulary. " + _CROSS_TOKENIZER_HINT)
  return vocab_size


def align_vocab(student_logits: chex.Array, teacher_logits: chex.Array,
                vocab_size: Optional[int] = None
                ) -> tuple[chex.Array, chex.Array]:
  """Slices ``[..., V_s]`` and ``[..., V_t]`` logits to ``[..., V]`` (padding rows off).

  See :func:`check_vocabularies` for ``V`` and the errors.
  """
  v = check_vocabularies(student_logits.shape[-1], teacher_logits.shape[-1],
                         vocab_size)
  if student_logits.shape[-1] != v:
    student_logits = student_logits[..., :v]
  if teacher_logits.shape[-1] != v:
    teacher_logits = teacher_logits[..., :v]
  return student_logits, teacher_logits


def token_kd_term(divergence: str = "kl",
                  *,
                  beta: float = 0.5,
                  alpha: float = 0.1,
                  vocab_size: Optional[int] = None,
                  top_k: Optional[int] = None,
                  tail_bucket: bool = True,
                  mask_key: Optional[str] = MASK_KEY,
                  scale_by_temperature: bool = True
                  ) -> Callable[[TermInputs], chex.Array]:
  r"""Token-level distillation as a ``kdjax.losses.Term`` function.

  .. math::
    L = \frac{T^2}{N} \sum_{b,t} m_{bt}\, D\big(p_{bt}, q_{bt}\big),\quad
    N = \sum_{b,t} m_{bt}

  with ``p = softmax(z_t[..., :V] / T)``, ``q = softmax(z_s[..., :V] / T)``
  at each position (logits ``[B, L, V_*]``, mask ``[B, L]``), the
  temperature ``T`` of the composed loss, and ``D`` ``divergence`` (see
  ``kdjax.losses.DIVERGENCES``; ``"tvd"`` is not scaled by ``T^2``). With
  ``top_k`` the teacher is reduced to its ``k`` largest logits per token plus
  a tail bucket (``kdjax.losses.top_k_divergence``); a teacher output that
  already carries ``.top_k`` (an offline cache) is used as is.

  References: Hinton et al. 2015; Kim & Rush 2016 (word-level KD); Agarwal et
  al. 2024 (generalised JSD); Ko et al. 2024 (skew KL); Wen et al. 2023 (TVD).

  Args:
    divergence: ``"kl"``, ``"reverse_kl"``, ``"jsd"``, ``"skew_kl"``,
      ``"skew_reverse_kl"``, ``"tvd"`` or ``"soft_ce"``.
    beta: teacher weight of the generalised JSD.
    alpha: skew of the skew KL.
    vocab_size: the shared tokenizer's vocabulary (padding rows sliced off;
      see :func:`align_vocab`), or ``None`` for equal widths.
    top_k: keep only the teacher's top-``k`` entries per token.
    tail_bucket: with ``top_k``, keep the leftover mass as a bucket.
    mask_key: the batch key of the ``[B, L]`` token mask (``None``: all).
    scale_by_temperature: multiply by ``T^2``.
  """
  if divergence not in losses.DIVERGENCES:
    raise ValueError(f"unknown divergence {divergence!r}; expected one of "
                     f"{losses.DIVERGENCES}.")
  if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
    raise ValueError(f"top_k must be a positive int, got {top_k!r}.")

  def term(inputs: TermInputs) -> chex.Array:
    mask = None if mask_key is None else inputs.batch.get(mask_key)
    student_logits = inputs.student.logits
    cached = getattr(inputs.teacher, "top_k", None)
    if cached is not None:
      if vocab_size is not None and student_logits.shape[-1] > vocab_size:
        student_logits = student_logits[..., :vocab_size]
      return losses.top_k_divergence(
          student_logits, cached, inputs.temperature, divergence=divergence,
          beta=beta, alpha=alpha, tail_bucket=tail_bucket, mask=mask,
          scale_by_temperature=scale_by_temperature)
    student_logits, teacher_logits = align_vocab(
        student_logits, inputs.teacher.logits, vocab_size)
    if top_k is not None:
      teacher = losses.top_k_teacher(teacher_logits, top_k, inputs.temperature)
      return losses.top_k_divergence(
          student_logits, teacher, inputs.temperature, divergence=divergence,
          beta=beta, alpha=alpha, tail_bucket=tail_bucket, mask=mask,
          scale_by_temperature=scale_by_temperature)
    return losses.logit_divergence(
        student_logits, teacher_logits, inputs.temperature,
        divergence=divergence, beta=beta, alpha=alpha, mask=mask,
        scale_by_temperature=scale_by_temperature)

  return term


def token_ce_term(*, vocab_size: Optional[int] = None,
                  label_key: str = TARGET_KEY,
                  mask_key: Optional[str] = MASK_KEY
                  ) -> Callable[[TermInputs], chex.Array]:
  r"""The student's next-token cross-entropy as a term function (no teacher).

  :math:`L = -\frac1N \sum_{b,t} m_{bt} \log q_{bt}[y_{bt}]` with ``y =
  batch["targets"]``; use in a ``Term(..., needs_teacher=False)``. Sequence-
  level KD (Kim & Rush 2016) is this term on teacher-generated targets.
  """

  def term(inputs: TermInputs) -> chex.Array:
    logits = inputs.student.logits
    if vocab_size is not None:
      logits = logits[..., :vocab_size]
    mask = None if mask_key is None else inputs.batch.get(mask_key)
    return losses.hard_label_cross_entropy(logits, inputs.batch[label_key],
                                           mask=mask)

  return term


def lm_step_options(options: Optional[train.StepOptions] = None,
                    **option_fields: Any) -> train.StepOptions:
  """:class:`kdjax.train.StepOptions` for token losses.

  Without ``options``: ``StepOptions(mask_key="loss_mask",
  accumulation_weighting="mask")``, so that gradient accumulation (and a
  pmap step's devices) weight micro-batch ``i`` by its share of unmasked
  tokens ``N_i / N`` and every token counts once whatever micro-batch it
  lands in. ``options`` given are used as they are; ``option_fields`` change
  either.
  """
  if options is None:
    options = train.StepOptions(mask_key=MASK_KEY,
                                accumulation_weighting="mask")
  return train.StepOptions.of(options, **option_fields)


def make_lm_train_step(student_apply: ApplyFn,
                       teacher_apply: Optional[ApplyFn],
                       loss_fn: losses.ComposedLoss,
                       optimizer: optax.GradientTransformation,
                       options: Optional[train.StepOptions] = None,
                       *,
                       donate: bool = True,
                       jit: bool = True,
                       **option_fields: Any) -> train.StepFn:
  """``kdjax.train.make_train_step`` with :func:`lm_step_options`.

  Gradient accumulation weights micro-batch ``i`` by its share of unmasked
  tokens ``N_i / N`` (``accumulation_weighting="mask"`` on
  ``batch["loss_mask"]``). Call as ``step(state, teacher_variables, batch)``.
  """
  return train.make_train_step(
      student_apply, teacher_apply, loss_fn, optimizer,
      lm_step_options(options, **option_fields), donate=donate, jit=jit)


def build_lm_step_fn(student_apply: ApplyFn,
                     teacher_apply: Optional[ApplyFn],
                     loss_fn: losses.ComposedLoss,
                     optimizer: optax.GradientTransformation,
                     options: Optional[train.StepOptions] = None,
                     *,
                     gather_fn: Optional[Callable[[Any], Any]] = None,
                     **option_fields: Any) -> train.StepFn:
  """The un-jitted step of :func:`make_lm_train_step` (``kdjax.train.build_step``;
  ``gather_fn``: its FSDP all-gather, e.g. ``kdjax.parallel.fsdp_gather_fn``)."""
  return train.build_step(student_apply, teacher_apply, loss_fn, optimizer,
                          lm_step_options(options, **option_fields),
                          gather_fn=gather_fn)


def token_divergence_sums(student_logits: chex.Array,
                          teacher_logits: chex.Array,
                          mask: chex.Array,
                          *,
                          vocab_size: Optional[int] = None,
                          divergence: str = "kl") -> tuple:
  """``(sum_t m_t D_t, sum_t m_t)`` at temperature 1, unscaled (for evaluation)."""
  s, t = align_vocab(student_logits, teacher_logits, vocab_size)
  total = losses.logit_divergence(s, t, 1.0, divergence=divergence, mask=mask,
                                  reduction="sum", scale_by_temperature=False)
  return total, jnp.sum(jnp.asarray(mask, jnp.float32))
