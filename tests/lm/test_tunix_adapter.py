"""Tunix's Qwen3 / Llama 3 / Gemma 3 as kdjax teachers and students (kdjax/lm/_tunix.py)."""

from __future__ import annotations

import re

import numpy as np
import pytest

pytest.importorskip("tunix")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from kdjax import lm  # noqa: E402
from kdjax import losses  # noqa: E402
from kdjax import train  # noqa: E402
from kdjax.losses import TermInputs  # noqa: E402

V = 300          # the tokenizer's vocabulary; the tiny models have 320 rows
B, L = 3, 16


def _sharpen(variables, factor=25.0):
  """Scales the (un)embedding so that the logits have std ~1 (Tunix's N(0, 0.01)
  embeddings give near-uniform distributions, a weak test of a divergence)."""

  def scale(path, x):
    names = "/".join(str(getattr(p, "key", p)) for p in path)
    return x * factor if ("input_embedding" in names or "lm_head" in names) else x

  return jax.tree_util.tree_map_with_path(scale, variables)


def _model(family, seed=0, **overrides):
  config = lm.tunix_model_config(family, "tiny", **overrides)
  return lm.init_tunix_model(family, config, seed)


def _batch(seed=0, lengths=(16, 11, 7), prompt=(3, 4, 2)):
  """Right-padded like kdjax.lm.make_lm_batch: loss on completion tokens only."""
  rng = np.random.default_rng(seed)
  prompts = [list(rng.integers(0, V, p)) for p in prompt]
  completions = [list(rng.integers(0, V, n + 1 - p))
                 for n, p in zip(lengths, prompt)]
  return {k: jnp.asarray(v) for k, v in
          lm.make_lm_batch(prompts, completions, L, pad_id=0).items()}


def _tunix_forward(model, tokens, input_mask=None):
  """The Tunix model's own forward pass with Tunix's own mask helpers."""
  from tunix.generate import utils as tunix_utils
  if input_mask is None:
    input_mask = jnp.ones(tokens.shape, jnp.bool_)
  positions = tunix_utils.build_positions_from_mask(input_mask)
  mask = tunix_utils.make_causal_attn_mask(input_mask, tokens.shape[1])
  logits, _ = model(tokens, positions, None, mask)
  return logits


@pytest.mark.parametrize("family,layers", [("qwen3", 2), ("llama3", 2),
                                           ("gemma3", 6)])
def test_logits_equal_the_models_own_forward_and_hidden_at_unembedding(
    family, layers):
  # Gemma 3 with 6 layers: five local sliding-window layers and a global one.
  model = _model(family, num_layers=layers)
  apply, variables = lm.make_tunix_lm_apply(model, return_hidden=True)
  lean, _ = lm.make_tunix_lm_apply(model, compute_logits=False, vocab_size=V)
  tokens = _batch()["tokens"]
  left = jnp.arange(L)[None] >= jnp.asarray([0, 5, 9])[:, None]  # left pads

  @jax.jit
  def run(variables, tokens):
    with_mask = {"tokens": tokens, "input_mask": left}
    return (apply(variables, {"tokens": tokens}), lean(variables, with_mask),
            apply(variables, with_mask).logits,
            apply(variables, {"tokens": tokens[1:2, 5:]}).logits)

  @jax.jit
  def tunix_forward(variables, tokens):
    # rebuild_model: the variables back in a Tunix module (for export).
    module = lm.rebuild_model(apply, variables)
    return _tunix_forward(module, tokens), _tunix_forward(module, tokens, left)

  variables = _sharpen(variables)   # not the model's own values any more
  out, lean_out, masked, row = run(variables, tokens)
  ref, ref_masked = tunix_forward(variables, tokens)
  assert out.logits.shape == (B, L, 320) and out.logits.dtype == jnp.float32
  np.testing.assert_allclose(out.logits, ref, rtol=1e-5, atol=1e-6)
  kernel, bias = lm.tunix_unembedding(variables, family)
  assert bias is None and kernel.shape == (32, 320)
  np.testing.assert_allclose(out.features["hidden"] @ kernel, ref, rtol=1e-5,
                             atol=1e-6)
  np.testing.assert_array_equal(lm.tunix_unembedding(model)[0] * 25.0, kernel)
  # The lean mode: no logits, the kernel sliced to the tokenizer's vocabulary.
  assert lean_out.logits is None
  assert lean_out.features["unembedding_kernel"].shape == (32, V)
  np.testing.assert_allclose(
      lean_out.features["hidden"] @ lean_out.features["unembedding_kernel"],
      ref_masked[..., :V], rtol=1e-5, atol=1e-6)
  sliced, _ = lm.make_tunix_lm_apply(model, vocab_size=V)
  assert sliced(variables, {"tokens": tokens[:1, :4]}).logits.shape == (1, 4, V)
  # Left padding (input_mask) follows Tunix's positions and attention mask,
  # and a left-padded row equals the same sequence unpadded.
  np.testing.assert_allclose(masked, ref_masked, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(masked[1, 5:], row[0], rtol=1e-4, atol=1e-5)


def _term_inputs(student, teacher, batch, temperature=2.0):
  return TermInputs(student=student, teacher=teacher, batch=batch,
                    temperature=jnp.asarray(temperature, jnp.float32),
                    step=jnp.asarray(0))


def test_every_divergence_lean_equals_full_and_ignores_masked_positions():
  # The terms see only the apply functions' outputs: one family suffices here
  # (every family runs the lean and plain steps below).
  student = _model("qwen3", seed=1)
  teacher = _model("llama3", seed=2, embed_dim=48, num_layers=1)
  s_full, s_vars = lm.make_tunix_lm_apply(student, vocab_size=V)
  t_full, t_vars = lm.make_tunix_lm_apply(teacher, vocab_size=V)
  s_lean, _ = lm.make_tunix_lm_apply(student, compute_logits=False,
                                     vocab_size=V)
  t_lean, _ = lm.make_tunix_lm_apply(teacher, compute_logits=False,
                                     vocab_size=V)
  s_vars, t_vars = _sharpen(s_vars), _sharpen(t_vars)
  batch = _batch(3)
  # The tokens after each sequence's end (padding, loss_mask 0) changed.
  pads = jnp.arange(L)[None] >= jnp.asarray([16, 11, 7])[:, None]
  other = dict(batch, tokens=jnp.where(pads, 123, batch["tokens"]))

  @jax.jit
  def values(s_vars, t_vars, batch):
    full = _term_inputs(s_full(s_vars, batch), t_full(t_vars, batch), batch)
    lean = _term_inputs(s_lean(s_vars, batch), t_lean(t_vars, batch), batch)
    out = {}
    for kind in losses.DIVERGENCES:
      out[kind] = (lm.token_kd_term(kind, vocab_size=V)(full),
                   lm.lean_token_kd_term(kind, vocab_size=V,
                                         chunk_size=8)(lean))
    out["ce"] = (lm.token_ce_term(vocab_size=V)(full),
                 lm.lean_token_ce_term(vocab_size=V, chunk_size=8)(lean))
    return out

  got, moved = values(s_vars, t_vars, batch), values(s_vars, t_vars, other)
  for kind, (full, lean) in got.items():
    assert np.isfinite(full) and float(full) > 0, (kind, full)
    np.testing.assert_allclose(lean, full, rtol=2e-5, err_msg=kind)
    np.testing.assert_allclose(moved[kind][0], full, rtol=1e-6, err_msg=kind)
  # And the mask does matter: unmasking the padding changes the value.
  ones = dict(batch, loss_mask=jnp.ones_like(batch["loss_mask"]))
  assert abs(float(values(s_vars, t_vars, ones)["kl"][0])
             - float(got["kl"][0])) > 1e-4


def _kd_loss(lean: bool, divergence="kl"):
  kd = (lm.lean_token_kd_term(divergence, vocab_size=V, chunk_size=16) if lean
        else lm.token_kd_term(divergence, vocab_size=V))
  ce = (lm.lean_token_ce_term(vocab_size=V, chunk_size=16) if lean
        else lm.token_ce_term(vocab_size=V))
  return losses.compose([losses.Term("kd", kd, weight=0.5),
                         losses.Term("ce", ce, weight=0.5,
                                     needs_teacher=False)], temperature=2.0)


@pytest.mark.parametrize("family,teacher_family", [("qwen3", "llama3"),
                                                   ("llama3", "gemma3"),
                                                   ("gemma3", "qwen3")])
def test_lean_train_step_equals_plain_step_and_trains_every_weight(
    family, teacher_family):
  student = _model(family, seed=1, num_layers=1)
  teacher = _model(teacher_family, seed=2, embed_dim=48, num_layers=1)
  opt = optax.sgd(0.5)
  steps, variables = {}, None
  for lean in (False, True):
    s_apply, variables = lm.make_tunix_lm_apply(
        student, compute_logits=not lean, vocab_size=V)
    t_apply, t_vars = lm.make_tunix_lm_apply(
        teacher, compute_logits=not lean, vocab_size=V)
    steps[lean] = lm.make_lm_train_step(s_apply, t_apply, _kd_loss(lean), opt,
                                        donate=False)
  t_vars = _sharpen(t_vars)
  init = train.create_state(_sharpen(variables), opt, rng=jax.random.key(0))
  states = {False: init, True: init}
  metrics = {}
  for lean in (False, True):
    states[lean], metrics[lean] = steps[lean](states[lean], t_vars, _batch(1))
  for key in ("kd", "ce", "loss"):
    np.testing.assert_allclose(metrics[True][key], metrics[False][key],
                               rtol=2e-5)
  for a, b in zip(jax.tree.leaves(states[False].params),
                  jax.tree.leaves(states[True].params)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
  # Every parameter moved (the redrawn MLP kernels included).
  for path, before, after in zip(
      [p for p, _ in jax.tree_util.tree_flatten_with_path(init.params)[0]],
      jax.tree.leaves(init.params), jax.tree.leaves(states[True].params)):
    assert float(jnp.max(jnp.abs(after - before))) > 0, path


def _largest_f32_buffer(hlo: str) -> int:
  sizes = [int(np.prod([int(d) for d in dims.split(",") if d]))
           for dims in re.findall(r"f32\[([0-9,]*)\]", hlo)]
  return max(sizes)


def test_lean_step_never_forms_batch_time_vocab_logits():
  big_v, b, t = 2048, 4, 16
  student = _model("qwen3", seed=1, vocab_size=big_v, num_layers=1)
  teacher = _model("llama3", seed=2, vocab_size=big_v, embed_dim=48,
                   num_layers=1)
  opt = optax.sgd(0.1)
  rng = np.random.default_rng(0)
  batch = {"tokens": jnp.asarray(rng.integers(0, big_v, (b, t)), jnp.int32),
           "targets": jnp.asarray(rng.integers(0, big_v, (b, t)), jnp.int32),
           "loss_mask": jnp.ones((b, t), jnp.float32)}
  compiled = {}
  for lean in (False, True):
    kd = (lm.lean_token_kd_term(chunk_size=16) if lean else lm.token_kd_term())
    ce = lm.lean_token_ce_term(chunk_size=16) if lean else lm.token_ce_term()
    loss = losses.compose([losses.Term("kd", kd),
                           losses.Term("ce", ce, needs_teacher=False)])
    s_apply, s_vars = lm.make_tunix_lm_apply(student, compute_logits=not lean)
    t_apply, t_vars = lm.make_tunix_lm_apply(teacher, compute_logits=not lean)
    step = lm.make_lm_train_step(s_apply, t_apply, loss, opt, donate=False)
    state = train.create_state(s_vars, opt, rng=jax.random.key(0))
    compiled[lean] = step.lower(state, t_vars, batch).compile()
  # [B, T, V] has 64 V elements; the largest parameter, the teacher's
  # embedding, 48 V; the lean step's logit chunks 16 V.
  full = b * t * big_v
  assert _largest_f32_buffer(compiled[False].as_text()) >= full
  assert _largest_f32_buffer(compiled[True].as_text()) < full
  temp = {k: c.memory_analysis().temp_size_in_bytes for k, c in compiled.items()}
  assert full * 4 <= temp[False] and temp[True] < temp[False] / 2, temp


@pytest.mark.parametrize("family", lm.FAMILIES)
def test_kv_cached_generation_equals_full_recompute(family):
  model = _model(family)   # Gemma 3: two local layers, window 4 < 16 tokens
  apply, variables = lm.make_tunix_lm_apply(model, vocab_size=V)
  variables = _sharpen(variables)
  tokens = _batch()["tokens"]
  prompt_len = jnp.asarray([3, 5, 4], jnp.int32)
  config = lm.SamplingConfig(temperature=0.0, vocab_size=V, prefill_length=3)
  out = jax.jit(lambda v, x, p: lm.tunix_generate(
      apply, v, x, p, jax.random.key(0), config))(variables, tokens, prompt_len)
  ref = np.where(np.arange(L)[None] < np.asarray(prompt_len)[:, None],
                 np.asarray(tokens), 0)
  forward = jax.jit(lambda v, x: apply(v, {"tokens": x}).logits)
  for t in range(L - 1):
    nxt = np.argmax(np.asarray(forward(variables, jnp.asarray(ref)))[:, t], -1)
    ref[:, t + 1] = np.where(t + 1 >= np.asarray(prompt_len), nxt, ref[:, t + 1])
  np.testing.assert_array_equal(out.tokens, ref)
  assert out.tokens.shape == (B, L) and (np.asarray(out.lengths) == L).all()


def test_gkd_step_with_a_tunix_student_samples_with_tunix_rollouts():
  """Lean GKD (lambda = 1): the step's loss is the full-logit JSD on the
  student's own KV-cached samples (same key as the step draws)."""
  from kdjax.lm._onpolicy import _GKD_SALT
  student = _model("qwen3", seed=1)
  teacher = _model("gemma3", seed=2, embed_dim=48)
  sampling = lm.SamplingConfig(temperature=1.0, top_k=20, vocab_size=V,
                               eos_id=2, pad_id=0, suppress_ids=(0, 1))
  opt = optax.sgd(0.1)
  batch = _batch()
  s_lean, s_vars = lm.make_tunix_lm_apply(student, compute_logits=False,
                                          vocab_size=V)
  t_lean, t_vars = lm.make_tunix_lm_apply(teacher, compute_logits=False,
                                          vocab_size=V)
  s_vars, t_vars = _sharpen(s_vars), _sharpen(t_vars)
  rollout = lm.make_tunix_rollout_fn(s_lean, sampling)
  step = lm.make_gkd_train_step(
      s_lean, t_lean,
      losses.compose([losses.Term("gkd", lm.lean_token_kd_term(
          "jsd", vocab_size=V, chunk_size=8))]),
      opt, lmbda=1.0, sampling=sampling, rollout_fn=rollout, donate=False)
  state = train.create_state(s_vars, opt, rng=jax.random.key(3))
  new_state, metrics = step(state, t_vars, batch)
  assert float(metrics["on_policy"]) == 1.0
  # The same rollout outside the step, scored with full logits.
  _, sample_key = jax.random.split(jax.random.fold_in(state.rng, _GKD_SALT))
  s_full, _ = lm.make_tunix_lm_apply(student, vocab_size=V)
  t_full, _ = lm.make_tunix_lm_apply(teacher, vocab_size=V)

  @jax.jit
  def reference(s_vars, t_vars, batch, key):
    gen = rollout(s_vars, batch, key)
    inputs = _term_inputs(s_full(s_vars, gen), t_full(t_vars, gen), gen,
                          temperature=1.0)
    return gen, lm.token_kd_term("jsd", vocab_size=V)(inputs)

  gen, expected = reference(s_vars, t_vars, batch, sample_key)
  np.testing.assert_allclose(metrics["gkd"], expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["tokens"], jnp.sum(gen["loss_mask"]))
  # The rollout sampled after each prompt (kept), and the step trained.
  assert gen["tokens"].shape == batch["tokens"].shape
  np.testing.assert_array_equal(gen["tokens"][:, :2], batch["tokens"][:, :2])
  assert not np.array_equal(gen["tokens"], batch["tokens"])
  assert any(float(jnp.max(jnp.abs(a - b))) > 0 for a, b in zip(
      jax.tree.leaves(state.params), jax.tree.leaves(new_state.params)))


def test_configs_presets_and_errors():
  assert lm.tunix_model_config("qwen3", "qwen3_0p6b").vocab_size == 151936
  assert lm.tunix_model_config("gemma3", "gemma3_270m",
                               num_layers=2).num_layers == 2
  assert lm.tunix_vocab_rows(
      "gemma3", lm.tunix_model_config("gemma3", vocab_size=512)) == 512
  cfg = lm.tunix_model_config("llama3", {"embed_dim": 64, "num_layers": 1})
  assert (cfg.embed_dim, cfg.num_layers, cfg.vocab_size) == (64, 1, 320)
  assert "qwen3_0p6b" in lm.tunix_presets("qwen3")
  with pytest.raises(ValueError, match="unknown Tunix model family 'gpt2'"):
    lm.tunix_model_config("gpt2")
  with pytest.raises(ValueError, match="presets: .*llama3p2_1b"):
    lm.tunix_model_config("llama3", "llama_huge")
  with pytest.raises(ValueError, match="unknown qwen3 ModelConfig field"):
    lm.tunix_model_config("qwen3", hidden_size=3)
  with pytest.raises(ValueError, match="not a multiple of num_kv_heads"):
    lm.tunix_model_config("qwen3", num_kv_heads=3)
  model = _model("llama3")
  with pytest.raises(ValueError, match="larger than the model's vocabulary"):
    lm.make_tunix_lm_apply(model, vocab_size=321)
  with pytest.raises(TypeError, match="not one of Tunix's"):
    lm.make_tunix_lm_apply(object())
  apply, variables = lm.make_tunix_lm_apply(model)
  with pytest.raises(KeyError, match="no key 'tokens'"):
    apply(variables, {"ids": jnp.zeros((1, 4), jnp.int32)})
