"""A registry of language-model distillation objectives, picked by name.

The LM counterpart of :mod:`kdjax.methods`. ``get_lm_objective(name,
**overrides)`` returns an :class:`LMObjectiveSpec` (the paper, the default
hyper-parameters with any overrides, whether it needs a teacher, reads hidden
states or rolls a model out), ``build_lm_loss(spec, vocab_size)`` its
:class:`kdjax.losses.ComposedLoss` and ``build_lm_objective_step(...)`` its
un-jitted train step::

  spec = kdjax.lm.get_lm_objective("gkd", lmbda=1.0)
  loss_fn = kdjax.lm.build_lm_loss(spec, vocab_size=tok.vocab_size)
  step = kdjax.lm.build_lm_objective_step(
      spec, student_apply, teacher_apply, optimizer, loss_fn=loss_fn,
      vocab_size=tok.vocab_size,
      sampling_fields=dict(eos_id=tok.eos_id, pad_id=tok.pad_id))
  step = kdjax.train.compile_step(step)   # jit, donate the state
  state, metrics = step(state, teacher_variables, batch)

The objectives (``lm_objectives_table()`` lists them with their defaults):

* ``ce``: the student alone, next-token cross-entropy on the corpus.
* ``token_kd``: token-level KD on the corpus, ``kd_weight * T^2 D(p_t, q_s)
  + ce_weight * CE`` per unmasked token (Hinton et al. 2015; Kim & Rush 2016,
  word-level KD).
* ``lean_kd``: the same loss from the final hidden states and the
  unembedding, formed chunk by chunk, never ``[B, T, V]`` logits (kdjax).
* ``gkd``: on-policy distillation (Agarwal et al. 2024): with probability
  ``lmbda`` the student continues the prompts and the divergence is taken on
  its own samples.
* ``seq_kd``: sequence-level KD (Kim & Rush 2016): the student's
  cross-entropy on the teacher's greedy continuations.

Packed batches (``kdjax.lm.make_packed_batch``, several examples a row) suit
the objectives without a rollout (``ce``, ``token_kd``, ``lean_kd``); the
rollout objectives (``gkd``, ``seq_kd``) generate from each row's prompt and
their steps refuse packed batches with a ValueError.

The hyper-parameter names are those of ``kdjax lm distill``'s ``distill``
section (``divergence``, ``temperature``, ``beta``, ``alpha``,
``kd_weight``, ``ce_weight``, ``lmbda``, ``sample_temperature``); each
objective has only those it reads.
"""

from __future__ import annotations

import dataclasses
import numbers
from typing import Any, Callable, Mapping, Optional

import optax

from kdjax import losses
from kdjax import train
from kdjax.lm._distill import build_lm_step_fn
from kdjax.lm._distill import token_ce_term
from kdjax.lm._distill import token_kd_term
from kdjax.lm._generate import SamplingConfig
from kdjax.lm._lean import lean_token_ce_term
from kdjax.lm._lean import lean_token_kd_term
from kdjax.lm._onpolicy import make_gkd_train_step
from kdjax.lm._onpolicy import make_sequence_kd_step
from kdjax.models import ApplyFn

# rollout(sampling) -> rollout_fn(variables, batch, rng) -> batch.
RolloutFactory = Callable[[SamplingConfig], Callable[..., Any]]


@dataclasses.dataclass(frozen=True)
class LMObjectiveSpec:
  """An LM distillation objective: its paper, hyper-parameters and builder.

  Attributes:
    name: the registry key.
    title: a one-line description.
    paper: the reference (authors, title, venue, year).
    url: the paper's address (``""`` when none).
    api: the kdjax functions that implement it (for the table).
    hparams: the hyper-parameters (defaults updated by overrides); the names
      are those of ``kdjax lm distill``'s ``distill`` section.
    defaults_source: where the defaults come from.
    needs_teacher: a teacher apply function must be supplied.
    lean: the loss reads hidden states and the unembedding
      (``make_lm_apply(config, compute_logits=False)``), not logits.
    rollout: which model generates the training continuations in the step:
      ``None`` (the corpus's), ``"student"`` (on-policy, with probability
      ``lmbda``) or ``"teacher"`` (greedy).
    build: ``build(hparams, vocab_size) -> ComposedLoss``.
  """
  name: str
  title: str
  paper: str
  url: str
  api: str
  hparams: Mapping[str, Any]
  defaults_source: str
  needs_teacher: bool
  lean: bool
  rollout: Optional[str]
  build: Callable[[Mapping[str, Any], Optional[int]],
                  losses.ComposedLoss] = dataclasses.field(repr=False,
                                                           compare=False)

  @property
  def sampling_temperature(self) -> Optional[float]:
    """The rollout's sampling temperature (``None`` without a rollout): the
    student's ``sample_temperature`` for GKD, ``0`` (greedy) for seq_kd."""
    if self.rollout == "student":
      return self.hparams["sample_temperature"]
    if self.rollout == "teacher":
      return 0.0
    return None

  def override(self, **overrides: Any) -> "LMObjectiveSpec":
    """A copy with some hyper-parameters changed (unknown names, bad types
    and values outside their range raise ``ValueError``)."""
    checked = _check_overrides(self.name, self.hparams, overrides)
    return dataclasses.replace(self, hparams={**self.hparams, **checked})


# -----------------------------------------------------------------------------
# Hyper-parameters: their types and ranges.
# -----------------------------------------------------------------------------


def _is_real(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _real(low: float, high: Optional[float] = None, *, open_low: bool = False,
          schedule: bool = False) -> Callable[[Any], tuple]:
  """A check of a real value in ``[low, high]`` (``(low, ...`` when
  ``open_low``); ``schedule``: an optax schedule (a callable) passes too."""
  lo = "(" if open_low else "["
  hi = "]" if high is not None else ")"
  what = (f"a float in {lo}{low:g}, {'inf' if high is None else f'{high:g}'}"
          f"{hi}" + (" or a schedule (step -> value)" if schedule else ""))

  def check(value):
    if schedule and callable(value):
      return True, value
    if not _is_real(value):
      return False, what
    v = float(value)
    ok = (v > low if open_low else v >= low) and (high is None or v <= high)
    return (True, v) if ok else (False, what)

  return check


def _divergence(value):
  if isinstance(value, str) and value in losses.DIVERGENCES:
    return True, value
  return False, f"one of {list(losses.DIVERGENCES)}"


_HPARAM_CHECKS = {
    "divergence": _divergence,
    "temperature": _real(0.0, open_low=True, schedule=True),
    "beta": _real(0.0, 1.0),
    "alpha": _real(0.0, 1.0),
    "kd_weight": _real(0.0, schedule=True),
    "ce_weight": _real(0.0, schedule=True),
    "lmbda": _real(0.0, 1.0),
    "sample_temperature": _real(0.0),
}


def _check_overrides(name: str, hparams: Mapping[str, Any],
                     overrides: Mapping[str, Any]) -> dict:
  """The overrides with numbers as floats; a ``ValueError`` listing the
  objective's hyper-parameters for an unknown name, and naming the expected
  type or range for a bad value."""
  unknown = sorted(set(overrides) - set(hparams))
  if unknown:
    known = (f"its hyper-parameters are {sorted(hparams)}" if hparams
             else "it has none")
    raise ValueError(
        f"LM objective {name!r} has no hyper-parameter(s) {unknown}; "
        f"{known}.")
  checked = {}
  for key, value in overrides.items():
    ok, result = _HPARAM_CHECKS[key](value)
    if not ok:
      raise ValueError(
          f"LM objective {name!r}: hyper-parameter {key!r} must be {result}, "
          f"got {value!r}.")
    checked[key] = result
  return checked


# -----------------------------------------------------------------------------
# Loss builders.
# -----------------------------------------------------------------------------


def _ce_only(lean: bool):
  def build(h, vocab_size):
    del h
    ce_fn = (lean_token_ce_term if lean else token_ce_term)(
        vocab_size=vocab_size)
    return losses.compose([losses.Term("ce", ce_fn, needs_teacher=False)])
  return build


def _token_kd(lean: bool):
  def build(h, vocab_size):
    kd_fn = (lean_token_kd_term if lean else token_kd_term)(
        h["divergence"], beta=h["beta"], alpha=h["alpha"],
        vocab_size=vocab_size)
    terms = [losses.Term("kd", kd_fn, weight=h["kd_weight"])]
    if h["ce_weight"]:
      ce_fn = (lean_token_ce_term if lean else token_ce_term)(
          vocab_size=vocab_size)
      terms.append(losses.Term("ce", ce_fn, weight=h["ce_weight"],
                               needs_teacher=False))
    return losses.compose(terms, temperature=h["temperature"])
  return build


# -----------------------------------------------------------------------------
# The table.
# -----------------------------------------------------------------------------

_HINTON = ("Hinton, Vinyals & Dean, Distilling the Knowledge in a Neural "
           "Network, 2015")
_KIM_RUSH = ("Kim & Rush, Sequence-Level Knowledge Distillation, EMNLP 2016")
_TOKEN_KD_DEFAULTS = {"divergence": "kl", "temperature": 1.0, "beta": 0.5,
                      "alpha": 0.1, "kd_weight": 1.0, "ce_weight": 0.0}
_CLI_DEFAULTS = ("kdjax lm distill's defaults: forward KL alone at T = 1 "
                 "(beta, alpha: the generalised JSD's and skew KL's, unused "
                 "by KL)")

LM_OBJECTIVES: dict = {s.name: s for s in [
    LMObjectiveSpec(
        name="ce", title="the student alone: next-token cross-entropy on the "
        "corpus (baseline, and the teacher's own training)",
        paper="-", url="", api="kdjax.lm.token_ce_term", hparams={},
        defaults_source="-", needs_teacher=False, lean=False, rollout=None,
        build=_ce_only(lean=False)),
    LMObjectiveSpec(
        name="token_kd", title="token-level KD on the corpus: kd_weight T^2 "
        "D(p_t || q_s) + ce_weight CE, mean over the loss-mask tokens",
        paper=f"{_HINTON}; {_KIM_RUSH} (word-level KD)",
        url="https://arxiv.org/abs/1503.02531",
        api="kdjax.lm.token_kd_term, kdjax.lm.token_ce_term",
        hparams=dict(_TOKEN_KD_DEFAULTS), defaults_source=_CLI_DEFAULTS,
        needs_teacher=True, lean=False, rollout=None,
        build=_token_kd(lean=False)),
    LMObjectiveSpec(
        name="lean_kd", title="token KD from hidden states, the logits formed "
        "chunk by chunk (never [B, T, V]); token_kd's value and gradients",
        paper=f"kdjax (memory-lean token KD); the loss of {_HINTON}",
        url="",
        api="kdjax.lm.lean_token_kd_term, kdjax.lm.lean_token_ce_term",
        hparams=dict(_TOKEN_KD_DEFAULTS), defaults_source=_CLI_DEFAULTS,
        needs_teacher=True, lean=True, rollout=None,
        build=_token_kd(lean=True)),
    LMObjectiveSpec(
        name="gkd", title="on-policy distillation: with probability lmbda the "
        "student continues the prompts, the divergence is taken on its samples",
        paper="Agarwal et al., On-Policy Distillation of Language Models: "
        "Learning from Self-Generated Mistakes (GKD), ICLR 2024",
        url="https://arxiv.org/abs/2306.13649",
        api="kdjax.lm.make_gkd_train_step, kdjax.lm.token_kd_term",
        hparams={**_TOKEN_KD_DEFAULTS, "divergence": "jsd", "lmbda": 0.5,
                 "sample_temperature": 1.0},
        defaults_source="paper: generalised JSD (beta = 0.5) at T = 1; lmbda "
        "0.5 (half the steps on the student's samples), which sample at "
        "temperature 1",
        needs_teacher=True, lean=False, rollout="student",
        build=_token_kd(lean=False)),
    LMObjectiveSpec(
        name="seq_kd", title="sequence-level KD: the student's cross-entropy "
        "on the teacher's greedy continuations of the prompts",
        paper=f"{_KIM_RUSH} (sequence-level KD)",
        url="https://arxiv.org/abs/1606.07947",
        api="kdjax.lm.make_sequence_kd_step, kdjax.lm.token_ce_term",
        hparams={}, defaults_source="greedy decoding (the paper: beam search)",
        needs_teacher=True, lean=False, rollout="teacher",
        build=_ce_only(lean=False)),
]}


def get_lm_objective(name: str, **overrides: Any) -> LMObjectiveSpec:
  """The registered LM objective ``name`` with hyper-parameter ``overrides``.

  Args:
    name: one of ``LM_OBJECTIVES`` (``"ce"``, ``"token_kd"``, ``"lean_kd"``,
      ``"gkd"``, ``"seq_kd"``).
    **overrides: hyper-parameters of the objective (``spec.hparams`` lists
      them): ``divergence`` (one of ``kdjax.losses.DIVERGENCES``),
      ``temperature > 0``, ``beta``, ``alpha``, ``lmbda`` in ``[0, 1]``,
      ``kd_weight``, ``ce_weight >= 0`` (the weights and the temperature may
      be optax schedules), ``sample_temperature >= 0``.

  Returns:
    The :class:`LMObjectiveSpec`, numbers as floats.

  Raises:
    ValueError: for an unknown objective (listing the known ones), an
      unknown hyper-parameter (listing the objective's), or a value of the
      wrong type or outside its range.
  """
  if name not in LM_OBJECTIVES:
    raise ValueError(f"unknown LM objective {name!r}; known LM objectives: "
                     f"{sorted(LM_OBJECTIVES)}.")
  return LM_OBJECTIVES[name].override(**overrides)


def build_lm_loss(spec: LMObjectiveSpec | str,
                  vocab_size: Optional[int] = None) -> losses.ComposedLoss:
  r"""The objective's :class:`kdjax.losses.ComposedLoss`.

  For ``token_kd``, ``lean_kd`` and ``gkd``:

  .. math::
    L = w_{kd} \frac{T^2}{N}\sum_{b,t} m_{bt} D(p_{bt}, q_{bt})
      + w_{ce} \Big(-\frac1N \sum_{b,t} m_{bt} \log q^{(1)}_{bt}[y_{bt}]\Big)

  with ``p = softmax(z_t / T)``, ``q = softmax(z_s / T)``, ``q^(1)`` the
  student at temperature 1, ``m = batch["loss_mask"]``, ``N = sum m``, ``D``
  the ``divergence`` (``"tvd"`` not scaled by ``T^2``): terms ``"kd"``
  (:func:`kdjax.lm.token_kd_term`, or :func:`kdjax.lm.lean_token_kd_term`
  for ``lean_kd``) and, only when ``ce_weight`` is not 0, ``"ce"``
  (:func:`kdjax.lm.token_ce_term` / ``lean_token_ce_term``,
  ``needs_teacher=False``), composed at ``temperature``. For ``ce`` and
  ``seq_kd``: the single term ``"ce"`` at weight 1 (``seq_kd``'s targets are
  the teacher's continuations, put in the batch by its step).

  Args:
    spec: an :class:`LMObjectiveSpec` (or an objective name, with its
      defaults).
    vocab_size: the tokenizer's vocabulary; logits (or unembedding rows)
      beyond it, a padded vocabulary's, are dropped. ``None``: the models'
      widths, which must then be equal.

  Returns:
    The composed loss: ``loss(student_out, teacher_out, batch)``.
  """
  if isinstance(spec, str):
    spec = get_lm_objective(spec)
  return spec.build(spec.hparams, vocab_size)


def build_lm_objective_step(
    spec: LMObjectiveSpec | str,
    student_apply: ApplyFn,
    teacher_apply: Optional[ApplyFn],
    optimizer: optax.GradientTransformation,
    options: Optional[train.StepOptions] = None,
    *,
    loss_fn: Optional[losses.ComposedLoss] = None,
    vocab_size: Optional[int] = None,
    student_lean_apply: Optional[ApplyFn] = None,
    teacher_lean_apply: Optional[ApplyFn] = None,
    student_rollout: Optional[RolloutFactory] = None,
    teacher_rollout: Optional[RolloutFactory] = None,
    sampling_fields: Optional[Mapping[str, Any]] = None,
    gather_fn: Optional[Callable[[Any], Any]] = None,
    **option_fields: Any) -> train.StepFn:
  """The objective's un-jitted train step ``step(state, teacher_variables,
  batch) -> (state, metrics)``.

  * no rollout (``ce``, ``token_kd``, ``lean_kd``):
    :func:`kdjax.lm.build_lm_step_fn` (the token-mask step options);
  * ``gkd``: :func:`kdjax.lm.make_gkd_train_step` with ``lmbda``, the
    student sampling at ``sample_temperature`` (``jit=False,
    donate=False``);
  * ``seq_kd``: :func:`kdjax.lm.make_sequence_kd_step`, the teacher greedy
    (``jit=False, donate=False``).

  Jit it with :func:`kdjax.train.compile_step` (which also checkifies a step
  built with ``checks=True``).

  Args:
    spec: an :class:`LMObjectiveSpec` or an objective name.
    student_apply: the student's apply function (logits).
    teacher_apply: the teacher's; ignored (the step gets ``None``) by an
      objective without a teacher (``ce``), required by the others.
    optimizer: optax transformation.
    options: :class:`kdjax.train.StepOptions` (default:
      :func:`kdjax.lm.lm_step_options`).
    loss_fn: the composed loss (default: ``build_lm_loss(spec,
      vocab_size)``).
    vocab_size: the tokenizer's vocabulary, for the default loss and the
      default ``sampling_fields["vocab_size"]``.
    student_lean_apply, teacher_lean_apply: a lean objective's applies
      (``make_lm_apply(config, compute_logits=False)``: hidden states and
      unembedding); default: ``student_apply`` / ``teacher_apply``, which
      must then be lean. Unused by the other objectives.
    student_rollout, teacher_rollout: ``rollout(sampling) -> rollout_fn``
      factories of the model that generates (the student for ``gkd``, the
      teacher for ``seq_kd``); default: :func:`kdjax.lm.make_rollout_fn` on
      the apply function's ``.module`` (a :class:`kdjax.lm.DecoderLM`).
    sampling_fields: :class:`kdjax.lm.SamplingConfig` fields of the rollout
      but its temperature (the objective's :attr:`LMObjectiveSpec.
      sampling_temperature`): ``vocab_size`` (default: ``vocab_size``),
      ``suppress_ids``, ``eos_id``, ``pad_id``, ``top_k``, ``top_p``, ...
    gather_fn: FSDP: the all-gather of the sharded student parameters at
      the start of the step (``kdjax.parallel.fsdp_gather_fn(mesh)``);
      objectives without a rollout only (``ValueError`` otherwise).
    **option_fields: ``StepOptions`` fields, e.g. ``accumulation_steps``,
      ``policy``, ``checks``.

  Returns:
    The un-jitted step.

  Raises:
    ValueError: for an objective that needs a teacher and none given, or a
      ``temperature`` in ``sampling_fields``.
  """
  if isinstance(spec, str):
    spec = get_lm_objective(spec)
  if loss_fn is None:
    loss_fn = build_lm_loss(spec, vocab_size)
  if not spec.needs_teacher:
    teacher_apply = None
  elif teacher_apply is None:
    raise ValueError(f"LM objective {spec.name!r} needs a teacher: pass "
                     "teacher_apply.")
  if spec.lean:
    if student_lean_apply is not None:
      student_apply = student_lean_apply
    if teacher_lean_apply is not None:
      teacher_apply = teacher_lean_apply
  if spec.rollout is None:
    return build_lm_step_fn(student_apply, teacher_apply, loss_fn, optimizer,
                            options, gather_fn=gather_fn, **option_fields)
  if gather_fn is not None:
    raise ValueError(f"gather_fn is not supported by the LM objective "
                     f"{spec.name!r} (a rollout step).")
  fields = dict(sampling_fields or {})
  if "temperature" in fields:
    raise ValueError(
        f"sampling_fields sets 'temperature': the LM objective {spec.name!r} "
        "sets its rollout's temperature itself ("
        + ("hyper-parameter 'sample_temperature')" if spec.rollout == "student"
           else "greedy, 0)"))
  fields.setdefault("vocab_size", vocab_size)
  sampling = SamplingConfig(temperature=spec.sampling_temperature, **fields)
  if spec.rollout == "student":
    return make_gkd_train_step(
        student_apply, teacher_apply, loss_fn, optimizer, options,
        lmbda=spec.hparams["lmbda"], sampling=sampling,
        rollout_fn=None if student_rollout is None else student_rollout(
            sampling), jit=False, donate=False, **option_fields)
  return make_sequence_kd_step(
      student_apply, teacher_apply, loss_fn, optimizer, options,
      sampling=sampling,
      rollout_fn=None if teacher_rollout is None else teacher_rollout(sampling),
      jit=False, donate=False, **option_fields)


def lm_objectives_table() -> str:
  """A markdown table of the registry: objective, paper, defaults, teacher,
  rollout, import."""

  def fmt(v):
    return f"{v:g}" if isinstance(v, float) else str(v)

  rows = ["| Objective | Paper | Defaults | Teacher | Rollout | Import |",
          "|---|---|---|---|---|---|"]
  for spec in LM_OBJECTIVES.values():
    paper = f"[{spec.paper}]({spec.url})" if spec.url else spec.paper
    defaults = ", ".join(f"{k}={fmt(v)}" for k, v in spec.hparams.items())
    rollout = {None: "-", "student": "student (sampled)",
               "teacher": "teacher (greedy)"}[spec.rollout]
    teacher = ("yes (hidden states)" if spec.lean
               else "yes" if spec.needs_teacher else "no")
    api = ", ".join(f"`{a.strip()}`" for a in spec.api.split(","))
    rows.append(f"| `{spec.name}` | {paper} | {defaults or '-'} | {teacher} "
                f"| {rollout} | {api} |")
  return "\n".join(rows)
