"""Sequence-level KD and on-policy distillation (GKD) train steps.

Sequence-level KD (Kim & Rush 2016): the teacher generates a continuation of
each prompt and the student is trained on those sequences, usually with the
token cross-entropy (:func:`kdjax.lm.token_ce_term`) and optionally the token
KD term as well. :func:`make_sequence_kd_step` builds the jitted teacher
rollout + train step.

On-policy distillation, GKD (Agarwal et al. 2024, "On-Policy Distillation of
Language Models: Learning from Self-Generated Mistakes"): at each step, with
probability ``lmbda`` the *student* generates the continuations of the
batch's prompts (KV-cached sampling), the teacher scores them (its forward
pass in the step), and the token divergence (usually the generalised JSD) is
taken over the generated tokens; otherwise the step is supervised token KD on
the dataset's continuations. ``lmbda = 0`` is exactly supervised token KD.

The coin is drawn inside the jitted step from the state's key
(``fold_in(state.rng, salt)``; the state's own key sequence is not changed,
so with ``lmbda = 0`` the state after the step is bitwise that of the
supervised step), and ``lax.cond`` runs the generation only when the coin
says so. The rollout uses the student's float32 master parameters.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

from kdjax import losses
from kdjax import train
from kdjax.lm._distill import MASK_KEY
from kdjax.lm._distill import build_lm_step_fn
from kdjax.lm._generate import SamplingConfig
from kdjax.models import ApplyFn
from kdjax.lm._generate import make_rollout_fn
from kdjax.lm._packing import check_unpacked

_GKD_SALT = 0x6B64  # "kd": the stream of the on-policy coin and sampling


def _module_of(apply, who: str):
  module = getattr(apply, "module", None)
  if module is None:
    raise ValueError(
        f"the {who}'s apply function has no .module (DecoderLM); build it with "
        "kdjax.lm.make_lm_apply(config) or pass rollout_fn=.")
  return module


def _after_rollout(inner: Callable, rollout: Callable, *, jit: bool,
                   donate: bool, what: str) -> Callable:
  """``inner`` (an LM train step) on the batch ``rollout`` returns.

  ``rollout(state, teacher_variables, batch) -> (batch, extra)``; the
  metrics get ``extra`` (as float32) and ``"tokens"``, the batch's number of
  loss tokens. With ``jit=False`` the step is returned un-jitted (and
  unchecked: ``kdjax.train.compile_step`` then checkifies it if ``inner``
  holds checks). A packed batch (``kdjax.lm.make_packed_batch``) is refused
  while tracing: the rollout needs one prompt a row (``what`` names the step).
  """

  def step(state, teacher_variables, batch):
    check_unpacked(batch, what)
    batch, extra = rollout(state, teacher_variables, dict(batch))
    new_state, metrics = inner(state, teacher_variables, batch)
    metrics = dict(metrics)
    for name, value in extra.items():
      metrics[name] = value.astype(jnp.float32)
    metrics["tokens"] = jnp.sum(jnp.asarray(batch[MASK_KEY], jnp.float32))
    return new_state, metrics

  step.kdjax_checks = inner.kdjax_checks
  return train.compile_step(step, donate=donate) if jit else step


def make_gkd_train_step(student_apply: ApplyFn,
                        teacher_apply: ApplyFn,
                        loss_fn: losses.ComposedLoss,
                        optimizer: optax.GradientTransformation,
                        options: Optional[train.StepOptions] = None,
                        *,
                        lmbda: float,
                        sampling: SamplingConfig,
                        rollout_fn: Optional[Callable[..., Any]] = None,
                        donate: bool = True,
                        jit: bool = True,
                        **option_fields: Any) -> train.StepFn:
  """The GKD step ``step(state, teacher_variables, batch) -> (state, metrics)``.

  Args:
    student_apply: from :func:`kdjax.lm.make_lm_apply` (its ``.module`` is
      used to generate).
    teacher_apply: the teacher's apply function.
    loss_fn: a ``kdjax.losses.ComposedLoss``, e.g. ``compose([Term("gkd",
      token_kd_term("jsd", beta=0.5))])``.
    optimizer: optax transformation.
    options: :class:`kdjax.train.StepOptions` (default:
      :func:`kdjax.lm.lm_step_options`).
    lmbda: probability in ``[0, 1]`` that a step is on-policy (student
      generations); GKD's ``lambda``.
    sampling: the student's :class:`SamplingConfig` (GKD samples at
      temperature ~1 with the prompt's EOS/PAD ids).
    rollout_fn: optional ``rollout(student_variables, batch, rng) -> batch``
      replacing the default KV-cached generation.
    donate, jit: as for ``kdjax.train.make_train_step``.
    **option_fields: ``StepOptions`` fields (accumulation, policy, ...).

  ``metrics["on_policy"]`` is 1.0 on an on-policy step. The batch needs
  ``tokens``, ``targets``, ``loss_mask`` and ``prompt_len``: one example a
  row (``kdjax.lm.make_lm_batch``); packed batches
  (``kdjax.lm.make_packed_batch``) are refused with a ValueError.
  """
  if not 0.0 <= float(lmbda) <= 1.0:
    raise ValueError(f"lmbda must lie in [0, 1], got {lmbda}.")
  if rollout_fn is None:
    rollout_fn = make_rollout_fn(_module_of(student_apply, "student"),
                                 sampling)
  inner = build_lm_step_fn(student_apply, teacher_apply, loss_fn, optimizer,
                           options, **option_fields)

  def rollout(state, teacher_variables, batch):
    del teacher_variables
    coin_key, sample_key = jax.random.split(
        jax.random.fold_in(state.rng, _GKD_SALT))
    on_policy = jax.random.uniform(coin_key) < lmbda
    student_variables = state.student_variables()
    batch = jax.lax.cond(
        on_policy,
        lambda b: rollout_fn(student_variables, b, sample_key),
        lambda b: b, batch)
    return batch, {"on_policy": on_policy}

  return _after_rollout(inner, rollout, jit=jit, donate=donate,
                        what="the GKD step (kdjax.lm.make_gkd_train_step)")


def make_sequence_kd_step(student_apply: ApplyFn,
                          teacher_apply: ApplyFn,
                          loss_fn: losses.ComposedLoss,
                          optimizer: optax.GradientTransformation,
                          options: Optional[train.StepOptions] = None,
                          *,
                          sampling: SamplingConfig,
                          rollout_fn: Optional[Callable[..., Any]] = None,
                          donate: bool = True,
                          jit: bool = True,
                          **option_fields: Any) -> train.StepFn:
  """Sequence-level KD (Kim & Rush 2016): train on the teacher's generations.

  ``step(state, teacher_variables, batch)``: the teacher continues each prompt
  (``sampling``: greedy with ``temperature=0``, the usual choice; Kim & Rush
  use beam search, not implemented here), then one train step of ``loss_fn``
  (typically ``token_ce_term`` on the generated targets, optionally plus
  ``token_kd_term``) on the generated batch. To generate once and reuse the
  sequences over epochs, jit :func:`kdjax.lm.make_rollout_fn` yourself.
  ``options`` and ``**option_fields`` as for :func:`make_gkd_train_step`;
  packed batches are refused likewise.
  """
  if rollout_fn is None:
    rollout_fn = make_rollout_fn(_module_of(teacher_apply, "teacher"),
                                 sampling)
  inner = build_lm_step_fn(student_apply, teacher_apply, loss_fn, optimizer,
                           options, **option_fields)

  def rollout(state, teacher_variables, batch):
    sample_key = jax.random.fold_in(state.rng, _GKD_SALT + 1)
    return rollout_fn(teacher_variables, batch, sample_key), {}

  return _after_rollout(
      inner, rollout, jit=jit, donate=donate,
      what="the sequence-KD step (kdjax.lm.make_sequence_kd_step)")
