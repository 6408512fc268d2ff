"""The LM objective registry (kdjax/lm/_objectives.py).

Each objective's loss is compared with the same kdjax.lm terms composed by
hand (hyper-parameters written out here, not read from the registry), and one
step of each on a tiny DecoderLM pair with the step built by hand the way
``kdjax lm distill`` builds it (kdjax/cli/lm/task.py, ``build_objective``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import lm
from kdjax import train
from kdjax.cli.config import lm as _lm_config
from kdjax.losses import Term
from kdjax.losses import TermInputs
from kdjax.losses import compose
from kdjax.models import ModelOutput

V = 259            # the byte tokenizer's vocabulary
TOK = lm.ByteTokenizer()
NAMES = ("ce", "token_kd", "lean_kd", "gkd", "seq_kd")
KD_DEFAULTS = {"divergence": "kl", "temperature": 1.0, "beta": 0.5,
               "alpha": 0.1, "kd_weight": 1.0, "ce_weight": 0.0}
DEFAULTS = {"ce": {}, "seq_kd": {}, "token_kd": KD_DEFAULTS,
            "lean_kd": KD_DEFAULTS,
            "gkd": {**KD_DEFAULTS, "divergence": "jsd", "lmbda": 0.5,
                    "sample_temperature": 1.0}}


@pytest.fixture(scope="module", autouse=True)
def _fast_compiles():
  """Most XLA optimisations off: this file compiles ~10 small steps."""
  previous = jax.config.read("jax_disable_most_optimizations")
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", previous)


def tiny_batch(seq_len=8):
  """4 sequences with 3, 1, 4 and 2 trained tokens."""
  texts = [("ab", "cd"), ("hello", ""), ("x", "yzz"), ("abc", "d")]
  prompts = [TOK.encode(p) for p, _ in texts]
  completions = [list(c.encode()) + [TOK.eos_id] for _, c in texts]
  return {k: jnp.asarray(v) for k, v in
          lm.make_lm_batch(prompts, completions, seq_len).items()}


def hand_loss(name, h, vocab_size=V):
  """``h``'s terms composed by hand, as kdjax/cli/lm/task.py loss_terms."""
  lean = name == "lean_kd"
  ce_term = lm.lean_token_ce_term if lean else lm.token_ce_term
  if name in ("ce", "seq_kd"):
    return compose([Term("ce", ce_term(vocab_size=vocab_size),
                         needs_teacher=False)])
  kd_term = lm.lean_token_kd_term if lean else lm.token_kd_term
  terms = [Term("kd", kd_term(h["divergence"], beta=h["beta"],
                              alpha=h["alpha"], vocab_size=vocab_size),
                weight=h["kd_weight"])]
  if h["ce_weight"]:
    terms.append(Term("ce", ce_term(vocab_size=vocab_size),
                      weight=h["ce_weight"], needs_teacher=False))
  return compose(terms, temperature=h["temperature"])


# -----------------------------------------------------------------------------
# The registry and the CLI's names.
# -----------------------------------------------------------------------------


def test_table_lists_every_objective_and_the_names_are_the_cli_s():
  assert tuple(lm.LM_OBJECTIVES) == NAMES == _lm_config.OBJECTIVES
  table = lm.lm_objectives_table()
  rows = table.splitlines()[2:]
  assert len(rows) == len(NAMES)
  for name, row in zip(NAMES, rows):
    assert row.startswith(f"| `{name}` |")
  assert "arxiv.org/abs/2306.13649" in table  # GKD
  assert "arxiv.org/abs/1606.07947" in table  # Kim & Rush
  # Every hyper-parameter is a key of the CLI's distill section.
  distill = _lm_config.LM_SCHEMA["distill"]
  for spec in lm.LM_OBJECTIVES.values():
    assert set(spec.hparams) <= set(distill), spec.name
    # Divergences the CLI accepts are accepted here.
  for divergence in _lm_config.DIVERGENCES:
    lm.get_lm_objective("token_kd", divergence=divergence)


@pytest.mark.parametrize("name", NAMES)
def test_defaults_and_flags(name):
  spec = lm.get_lm_objective(name)
  assert dict(spec.hparams) == DEFAULTS[name]
  assert spec.needs_teacher == (name != "ce")
  assert spec.lean == (name == "lean_kd")
  assert spec.rollout == {"gkd": "student", "seq_kd": "teacher"}.get(name)
  assert spec.sampling_temperature == {"gkd": 1.0, "seq_kd": 0.0}.get(name)


def test_token_kd_defaults_are_the_cli_s():
  distill = _lm_config.LM_SCHEMA["distill"]
  for key, value in lm.get_lm_objective("token_kd").hparams.items():
    assert distill[key].default == value, key


# -----------------------------------------------------------------------------
# Errors.
# -----------------------------------------------------------------------------


def test_unknown_objective_lists_the_known_ones():
  with pytest.raises(ValueError, match=r"unknown LM objective 'kd'.*"
                     r"\['ce', 'gkd', 'lean_kd', 'seq_kd', 'token_kd'\]"):
    lm.get_lm_objective("kd")
  with pytest.raises(ValueError, match="unknown LM objective"):
    lm.build_lm_loss("nope")


def test_unknown_hyper_parameter_lists_the_objective_s():
  with pytest.raises(ValueError, match=r"'gkd' has no hyper-parameter\(s\) "
                     r"\['lambda'\].*'lmbda'"):
    lm.get_lm_objective("gkd", **{"lambda": 0.5})
  with pytest.raises(ValueError, match=r"'token_kd'.*\['lmbda'\]"):
    lm.get_lm_objective("token_kd", lmbda=0.5)  # GKD's, not token KD's
  with pytest.raises(ValueError, match="'seq_kd'.*it has none"):
    lm.get_lm_objective("seq_kd", temperature=2.0)


@pytest.mark.parametrize("key,value,expected", [
    ("divergence", "kld", "one of"),
    ("divergence", 1, "one of"),
    ("beta", 1.5, r"\[0, 1\]"),
    ("alpha", -0.1, r"\[0, 1\]"),
    ("lmbda", True, r"\[0, 1\]"),          # a bool is no number here
    ("temperature", 0.0, r"\(0, inf\)"),
    ("kd_weight", "1", "schedule"),
    ("ce_weight", -1.0, r"\[0, inf\)"),
    ("sample_temperature", None, r"\[0, inf\)"),
])
def test_badly_typed_or_out_of_range_values_raise(key, value, expected):
  with pytest.raises(ValueError, match=f"'gkd': hyper-parameter '{key}' "
                     f"must be .*{expected}"):
    lm.get_lm_objective("gkd", **{key: value})


def test_good_values_are_stored_as_floats_and_schedules_pass():
  schedule = optax.linear_schedule(0.0, 1.0, 10)
  spec = lm.get_lm_objective("gkd", lmbda=1, kd_weight=np.float32(0.5),
                             ce_weight=schedule, sample_temperature=0)
  assert spec.hparams["lmbda"] == 1.0 and type(spec.hparams["lmbda"]) is float
  assert type(spec.hparams["kd_weight"]) is float
  assert spec.hparams["ce_weight"] is schedule
  assert spec.sampling_temperature == 0.0
  # The registry's own entry is unchanged.
  assert lm.LM_OBJECTIVES["gkd"].hparams["lmbda"] == 0.5


# -----------------------------------------------------------------------------
# Losses.
# -----------------------------------------------------------------------------

LOSS_CASES = [
    ("ce", {}),
    ("seq_kd", {}),
    ("token_kd", {}),
    ("token_kd", {"divergence": "jsd", "beta": 0.3, "ce_weight": 0.5,
                  "kd_weight": 0.7, "temperature": 2.0}),
    ("token_kd", {"divergence": "skew_kl", "alpha": 0.25}),
    ("lean_kd", {}),
    ("lean_kd", {"divergence": "reverse_kl", "ce_weight": 0.5,
                 "temperature": 2.0}),
    ("gkd", {}),
    ("gkd", {"divergence": "skew_reverse_kl", "alpha": 0.3, "ce_weight": 0.25,
             "temperature": 1.5}),
]


def outputs(lean, seed=0, d=8):
  """Student (264 rows, padded) and teacher (259 rows) outputs: logits, or
  hidden states and unembeddings, and the logits they give."""
  rng = np.random.default_rng(seed)
  shape = tiny_batch()["tokens"].shape
  h_s, h_t = (jnp.asarray(rng.normal(size=shape + (d,)), jnp.float32)
              for _ in range(2))
  w_s = jnp.asarray(rng.normal(size=(d, 264)), jnp.float32)
  w_t = jnp.asarray(rng.normal(size=(d, V)), jnp.float32)
  if lean:
    return (ModelOutput(logits=None, features={
        "hidden": h_s, "unembedding_kernel": w_s}),
            ModelOutput(logits=None, features={
                "hidden": h_t, "unembedding_kernel": w_t}))
  return ModelOutput(logits=h_s @ w_s), ModelOutput(logits=h_t @ w_t)


@pytest.mark.parametrize("name,overrides", LOSS_CASES)
def test_loss_equals_the_hand_composed_loss(name, overrides):
  spec = lm.get_lm_objective(name, **overrides)
  loss = lm.build_lm_loss(spec, vocab_size=V)
  ref = hand_loss(name, {**DEFAULTS[name], **overrides})
  assert loss.names == ref.names
  assert [t.weight for t in loss.terms] == [t.weight for t in ref.terms]
  assert ([t.needs_teacher for t in loss.terms]
          == [t.needs_teacher for t in ref.terms])
  assert loss.temperature == ref.temperature
  expected_names = (("ce",) if name in ("ce", "seq_kd") else
                    ("kd", "ce") if overrides.get("ce_weight") else ("kd",))
  assert loss.names == expected_names
  s_out, t_out = outputs(lean=spec.lean)
  batch = tiny_batch()
  teacher = None if name in ("ce", "seq_kd") else t_out
  total, aux = loss(s_out, teacher, batch)
  ref_total, ref_aux = ref(s_out, teacher, batch)
  np.testing.assert_allclose(total, ref_total, rtol=1e-6)
  assert set(aux.terms) == set(ref_aux.terms)
  for key in aux.terms:
    np.testing.assert_allclose(aux.terms[key], ref_aux.terms[key], rtol=1e-6)
  assert float(total) > 0
  if spec.lean:  # the same loss as token_kd on the logits h W
    s_logits, t_logits = outputs(lean=False)
    full = hand_loss("token_kd", {**DEFAULTS[name], **overrides})
    np.testing.assert_allclose(total, full(s_logits, t_logits, batch)[0],
                               rtol=1e-4)


def test_a_name_builds_the_defaults():
  s_out, t_out = outputs(lean=False)
  batch = tiny_batch()
  by_name = lm.build_lm_loss("gkd", V)(s_out, t_out, batch)[0]
  ref = hand_loss("gkd", DEFAULTS["gkd"])(s_out, t_out, batch)[0]
  np.testing.assert_allclose(by_name, ref, rtol=1e-6)
  # The check can fail: the token_kd defaults (KL) give another value.
  other = lm.build_lm_loss("token_kd", V)(s_out, t_out, batch)[0]
  assert abs(float(other) - float(ref)) > 1e-3


# -----------------------------------------------------------------------------
# One step of each objective on a tiny DecoderLM pair.
# -----------------------------------------------------------------------------

S_CFG = lm.TransformerConfig(vocab_size=264, num_layers=1, num_heads=2,
                             d_model=16, max_len=16)
T_CFG = lm.TransformerConfig(vocab_size=V, num_layers=1, num_heads=2,
                             d_model=16, max_len=16)
S_APPLY, T_APPLY = lm.make_lm_apply(S_CFG), lm.make_lm_apply(T_CFG)
S_LEAN = lm.make_lm_apply(S_CFG, compute_logits=False)
T_LEAN = lm.make_lm_apply(T_CFG, compute_logits=False)
SAMPLING_FIELDS = dict(suppress_ids=(TOK.pad_id, TOK.bos_id),
                       eos_id=TOK.eos_id, pad_id=TOK.pad_id)
STEP_CASES = [("ce", {}), ("token_kd", {"ce_weight": 0.5}),
              ("lean_kd", {"divergence": "jsd"}),
              ("gkd", {"lmbda": 1.0, "sample_temperature": 0.7}),
              ("seq_kd", {})]


def hand_step(name, h, optimizer, s_rollout, t_rollout, **step_kwargs):
  """The step as kdjax/cli/lm/task.py build_objective builds it."""
  loss_fn = hand_loss(name, h)
  lean = name == "lean_kd"
  s_apply = S_LEAN if lean else S_APPLY
  t_apply = None if name == "ce" else (T_LEAN if lean else T_APPLY)
  if name == "gkd":
    sampling = lm.SamplingConfig(temperature=h["sample_temperature"],
                                 vocab_size=V, **SAMPLING_FIELDS)
    return lm.make_gkd_train_step(
        s_apply, t_apply, loss_fn, optimizer, lmbda=h["lmbda"],
        sampling=sampling, rollout_fn=s_rollout(sampling), jit=False,
        donate=False, **step_kwargs)
  if name == "seq_kd":
    sampling = lm.SamplingConfig(temperature=0.0, vocab_size=V,
                                 **SAMPLING_FIELDS)
    return lm.make_sequence_kd_step(
        s_apply, t_apply, loss_fn, optimizer, sampling=sampling,
        rollout_fn=t_rollout(sampling), jit=False, donate=False,
        **step_kwargs)
  return lm.build_lm_step_fn(s_apply, t_apply, loss_fn, optimizer,
                             **step_kwargs)


@pytest.fixture(scope="module")
def models():
  return (lm.init_lm(S_CFG, jax.random.key(0)),
          lm.init_lm(T_CFG, jax.random.key(1)))


@pytest.mark.parametrize("name,overrides", STEP_CASES)
def test_one_step_changes_the_params_as_the_hand_built_step(name, overrides,
                                                            models):
  s_vars, t_vars = models
  optimizer = optax.adam(1e-2)
  state = train.create_state(s_vars, optimizer, rng=jax.random.key(42))
  seen = []

  def factory(apply):
    def make(sampling):
      seen.append(sampling)
      return lm.make_rollout_fn(apply.module, sampling)
    return make

  step_kwargs = dict(accumulation_steps=2, policy=None, checks=False)
  spec = lm.get_lm_objective(name, **overrides)
  step = lm.build_lm_objective_step(
      spec, S_APPLY, T_APPLY, optimizer, vocab_size=V,
      student_lean_apply=S_LEAN, teacher_lean_apply=T_LEAN,
      student_rollout=factory(S_APPLY), teacher_rollout=factory(T_APPLY),
      sampling_fields=SAMPLING_FIELDS, **step_kwargs)
  if spec.rollout is None:
    assert not seen
  else:
    (sampling,) = seen
    assert sampling == lm.SamplingConfig(
        temperature=spec.sampling_temperature, vocab_size=V,
        **SAMPLING_FIELDS)
    assert sampling.temperature == (0.7 if name == "gkd" else 0.0)
  ref = hand_step(name, {**DEFAULTS[name], **overrides}, optimizer,
                  factory(S_APPLY), factory(T_APPLY), **step_kwargs)
  teacher = None if name == "ce" else t_vars
  batch = tiny_batch()
  new, metrics = train.compile_step(step, donate=False)(state, teacher, batch)
  ref_new, ref_metrics = train.compile_step(ref, donate=False)(state, teacher,
                                                               batch)
  assert np.isfinite(float(metrics["loss"]))
  changed = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a != b))),
                         new.params, state.params)
  assert all(jax.tree.leaves(changed)), changed
  for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(ref_new.params)):
    np.testing.assert_array_equal(a, b)
  assert set(metrics) == set(ref_metrics)
  for key in metrics:
    np.testing.assert_array_equal(metrics[key], ref_metrics[key])
  if name == "gkd":
    assert float(metrics["on_policy"]) == 1.0
  if name == "token_kd":
    assert {"kd", "ce"} <= set(metrics)


def test_step_errors():
  optimizer = optax.sgd(0.1)
  with pytest.raises(ValueError, match="'token_kd' needs a teacher"):
    lm.build_lm_objective_step("token_kd", S_APPLY, None, optimizer)
  with pytest.raises(ValueError, match="'gkd' sets its rollout's temperature"
                     ".*sample_temperature"):
    lm.build_lm_objective_step("gkd", S_APPLY, T_APPLY, optimizer,
                               sampling_fields={"temperature": 1.0})
  # ce takes no teacher: one passed is not given to the step.
  step = lm.build_lm_objective_step("ce", S_APPLY, T_APPLY, optimizer,
                                    vocab_size=V)
  state = train.create_state(lm.init_lm(S_CFG, jax.random.key(0)), optimizer,
                             rng=jax.random.key(0))
  _, metrics = step(state, None, tiny_batch())
  assert set(metrics) >= {"loss", "ce"}


def ragged_batch(seq_len=12):
  """8 sequences whose completions hold 1 to 8 trained tokens: the strided
  micro-batches of 4-way accumulation hold different token counts."""
  texts = [("ab", "c"), ("hello", "wxyzabc"), ("x", "yz"), ("abc", "defg"),
           ("q", ""), ("lm", "nopqrs"), ("kd", "jax"), ("t", "uv")]
  prompts = [TOK.encode(p) for p, _ in texts]
  completions = [list(c.encode()) + [TOK.eos_id] for _, c in texts]
  return {k: jnp.asarray(v) for k, v in
          lm.make_lm_batch(prompts, completions, seq_len).items()}


@pytest.mark.parametrize("name,overrides", [
    ("token_kd", {"ce_weight": 0.5}), ("lean_kd", {"divergence": "jsd"}),
    ("seq_kd", {}), ("gkd", {"lmbda": 0.0})])
def test_accumulation_is_the_mean_over_the_global_batch_tokens(
    name, overrides, models):
  """One step on 8 ragged examples equals four accumulated micro-batches of
  2: every objective's loss is the mean over the completion tokens of the
  whole batch (sequence KD over the teacher's greedy continuations; GKD with
  lmbda 0, on the data, since on-policy samples differ per micro-batch)."""
  s_vars, t_vars = models
  batch = ragged_batch()
  tokens = batch["loss_mask"].reshape(4, 2, -1).sum(axis=(1, 2))
  strided = batch["loss_mask"].reshape(2, 4, -1).sum(axis=(0, 2))
  assert len(set(np.asarray(strided).tolist())) > 1, (tokens, strided)
  optimizer = optax.sgd(0.5)
  state = train.create_state(s_vars, optimizer, rng=jax.random.key(42))
  spec = lm.get_lm_objective(name, **overrides)

  def step(k):
    built = lm.build_lm_objective_step(
        spec, S_APPLY, T_APPLY, optimizer, vocab_size=V,
        student_lean_apply=S_LEAN, teacher_lean_apply=T_LEAN,
        student_rollout=lambda s: lm.make_rollout_fn(S_APPLY.module, s),
        teacher_rollout=lambda s: lm.make_rollout_fn(T_APPLY.module, s),
        sampling_fields=SAMPLING_FIELDS, accumulation_steps=k, policy=None,
        checks=False)
    return train.compile_step(built, donate=False)(state, t_vars, batch)

  (full, m_full), (acc, m_acc) = step(1), step(4)
  np.testing.assert_allclose(m_acc["loss"], m_full["loss"], rtol=2e-5)
  moved = max(float(np.abs(np.asarray(a - b)).max()) for a, b in zip(
      jax.tree.leaves(full.params), jax.tree.leaves(state.params)))
  assert moved > 1e-3
  for a, b in zip(jax.tree.leaves(acc.params), jax.tree.leaves(full.params)):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)
