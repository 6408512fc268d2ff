"""Memory-lean token losses for large vocabularies (loss terms for ``compose``).

With ``make_lm_apply(config, compute_logits=False)`` the student's and the
teacher's apply functions return the final hidden states and the unembedding
instead of ``[B, T, V]`` logits; these terms hand them to
``kdjax.losses.divergence_from_hidden`` / ``cross_entropy_from_hidden``,
which form the logits one chunk of tokens at a time (and, with a
``vocab_axis``, one vocabulary shard at a time). The values and gradients are
those of :func:`kdjax.lm.token_kd_term` / :func:`kdjax.lm.token_ce_term` on
full logits; the step's peak memory no longer grows with ``tokens x V``.

A teacher whose output carries ``.top_k`` (an offline top-k cache,
``kdjax.cache``) is used as is: only the student's logits are formed.

Evaluation and generation need logits: use ``make_lm_apply(config)`` (the
same variables) there, e.g. for ``kdjax.train.make_eval_step``.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import chex
import jax

from kdjax import losses
from kdjax.losses import TermInputs
from kdjax.lm._distill import MASK_KEY
from kdjax.lm._distill import TARGET_KEY

HIDDEN = "hidden"
KERNEL = "unembedding_kernel"
BIAS = "unembedding_bias"


def _hidden_and_unembedding(output, who: str):
  features = getattr(output, "features", None) or {}
  missing = [k for k in (HIDDEN, KERNEL) if k not in features]
  if missing:
    raise KeyError(
        f"the {who}'s output lacks feature(s) {missing} (present: "
        f"{sorted(features)}); build its apply function with "
        "kdjax.lm.make_lm_apply(config, compute_logits=False), or return the "
        "final hidden states and the unembedding kernel (and bias) under "
        f"{HIDDEN!r}, {KERNEL!r} (and {BIAS!r}).")
  return features[HIDDEN], losses.Unembedding(features[KERNEL],
                                              features.get(BIAS))


def lean_token_kd_term(divergence: str = "kl",
                       *,
                       beta: chex.Numeric = 0.5,
                       alpha: chex.Numeric = 0.1,
                       vocab_size: Optional[int] = None,
                       tail_bucket: bool = True,
                       mask_key: Optional[str] = MASK_KEY,
                       scale_by_temperature: bool = True,
                       chunk_size: Optional[int] = None,
                       memory_budget_bytes: int = losses.DEFAULT_MEMORY_BUDGET_BYTES,
                       implementation: str = "fused",
                       axis_name: Union[str, Sequence[str], None] = None,
                       mesh: Optional[jax.sharding.Mesh] = None,
                       vocab_axis: str = "model",
                       token_axis: Union[str, Sequence[str], None] = None
                       ) -> Callable[[TermInputs], chex.Array]:
  r"""Token-level KD from hidden states (``kdjax.losses.divergence_from_hidden``).

  .. math::
    L = \frac{T^2}{N}\sum_{b,t} m_{bt}\, D\big(\mathrm{softmax}(z^t_{bt}/T),
        \mathrm{softmax}(z^s_{bt}/T)\big),\quad z = h W + b

  the same loss as :func:`kdjax.lm.token_kd_term` (the composed loss's
  temperature, the ``loss_mask`` mean) with the logits formed in chunks of
  ``chunk_size`` tokens (default: from ``memory_budget_bytes``). Student and
  teacher apply functions must come from ``make_lm_apply(...,
  compute_logits=False)``; a teacher carrying ``.top_k`` uses
  ``top_k_divergence_from_hidden``.

  Args:
    divergence: one of ``kdjax.losses.DIVERGENCES``.
    beta, alpha: generalised JSD / skew KL weights.
    vocab_size: the tokenizer's vocabulary (padded rows dropped).
    tail_bucket: for a top-k teacher.
    mask_key: batch key of the ``[B, L]`` mask (``None``: every token).
    scale_by_temperature: multiply by ``T^2``.
    chunk_size, memory_budget_bytes, implementation, axis_name: see
      ``kdjax.losses.divergence_from_hidden``.
    mesh, vocab_axis, token_axis: with a ``mesh``, the vocabulary is split
      over its ``vocab_axis`` and the batch over ``token_axis``
      (``kdjax.losses.vocab_sharded_divergence_from_hidden``, a
      ``shard_map`` inside the jitted step): no device ever holds all the
      vocabulary's logits of a token.
  """
  if divergence not in losses.DIVERGENCES:
    raise ValueError(f"unknown divergence {divergence!r}; expected one of "
                     f"{losses.DIVERGENCES}.")
  options = dict(divergence=divergence, beta=beta, alpha=alpha,
                 scale_by_temperature=scale_by_temperature,
                 vocab_size=vocab_size, chunk_size=chunk_size,
                 memory_budget_bytes=memory_budget_bytes,
                 implementation=implementation, axis_name=axis_name)

  sharded = dict(vocab_axis=vocab_axis, token_axis=token_axis)
  if mesh is not None:
    options.pop("axis_name")

  def term(inputs: TermInputs) -> chex.Array:
    mask = None if mask_key is None else inputs.batch.get(mask_key)
    h_s, emb_s = _hidden_and_unembedding(inputs.student, "student")
    cached = getattr(inputs.teacher, "top_k", None)
    if mesh is not None:
      if cached is not None:
        return losses.vocab_sharded_divergence_from_hidden(
            mesh, h_s, emb_s, temperature=inputs.temperature,
            teacher_top_k=cached, mask=mask, tail_bucket=tail_bucket,
            **sharded, **options)
      h_t, emb_t = _hidden_and_unembedding(inputs.teacher, "teacher")
      return losses.vocab_sharded_divergence_from_hidden(
          mesh, h_s, emb_s, h_t, emb_t, inputs.temperature, mask=mask,
          **sharded, **options)
    if cached is not None:
      return losses.top_k_divergence_from_hidden(
          h_s, emb_s, cached, inputs.temperature, tail_bucket=tail_bucket,
          mask=mask, **options)
    h_t, emb_t = _hidden_and_unembedding(inputs.teacher, "teacher")
    return losses.divergence_from_hidden(h_s, emb_s, h_t, emb_t,
                                         inputs.temperature, mask=mask,
                                         **options)

  return term


def lean_token_ce_term(*,
                       vocab_size: Optional[int] = None,
                       label_key: str = TARGET_KEY,
                       mask_key: Optional[str] = MASK_KEY,
                       chunk_size: Optional[int] = None,
                       memory_budget_bytes: int = losses.DEFAULT_MEMORY_BUDGET_BYTES,
                       implementation: str = "fused",
                       axis_name: Union[str, Sequence[str], None] = None,
                       mesh: Optional[jax.sharding.Mesh] = None,
                       vocab_axis: str = "model",
                       token_axis: Union[str, Sequence[str], None] = None
                       ) -> Callable[[TermInputs], chex.Array]:
  """The student's next-token cross-entropy from hidden states (no teacher).

  :func:`kdjax.lm.token_ce_term` without full logits
  (``kdjax.losses.cross_entropy_from_hidden``); use in a
  ``Term(..., needs_teacher=False)``. ``mesh``/``vocab_axis``/``token_axis``
  as in :func:`lean_token_kd_term`.
  """

  def term(inputs: TermInputs) -> chex.Array:
    mask = None if mask_key is None else inputs.batch.get(mask_key)
    h_s, emb_s = _hidden_and_unembedding(inputs.student, "student")
    if mesh is not None:
      return losses.vocab_sharded_divergence_from_hidden(
          mesh, h_s, emb_s, labels=inputs.batch[label_key], mask=mask,
          vocab_axis=vocab_axis, token_axis=token_axis, vocab_size=vocab_size,
          chunk_size=chunk_size, memory_budget_bytes=memory_budget_bytes,
          implementation=implementation)
    return losses.cross_entropy_from_hidden(
        h_s, emb_s, inputs.batch[label_key], mask=mask, vocab_size=vocab_size,
        chunk_size=chunk_size, memory_budget_bytes=memory_budget_bytes,
        implementation=implementation, axis_name=axis_name)

  return term
