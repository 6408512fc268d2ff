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
  tokens = _batch()["tokens"]
  out = apply(variables, {"tokens": tokens})
  ref = _tunix_forward(model, tokens)
  assert out.logits.shape == (B, L, 320) and out.logits.dtype == jnp.float32
  np.testing.assert_allclose(out.logits, ref, rtol=1e-5, atol=1e-6)
  kernel, bias = lm.tunix_unembedding(variables, family)
  assert bias is None and kernel.shape == (32, 320)
  np.testing.assert_allclose(out.features["hidden"] @ kernel, ref, rtol=1e-5,
                             atol=1e-6)
  # The module itself works as well as its variables.
  np.testing.assert_array_equal(lm.tunix_unembedding(model)[0], kernel)
  # Padded vocabulary rows sliced; the lean mode returns the sliced kernel.
  sliced, _ = lm.make_tunix_lm_apply(model, vocab_size=V)
  np.testing.assert_array_equal(sliced(variables, {"tokens": tokens}).logits,
                                out.logits[..., :V])
  lean, _ = lm.make_tunix_lm_apply(model, compute_logits=False, vocab_size=V)
  lean_out = lean(variables, {"tokens": tokens})
  assert lean_out.logits is None
  assert lean_out.features["unembedding_kernel"].shape == (32, V)
  np.testing.assert_allclose(
      lean_out.features["hidden"] @ lean_out.features["unembedding_kernel"],
      ref[..., :V], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", lm.FAMILIES)
def test_left_padding_with_input_mask_follows_tunix_and_ignores_the_pads(family):
  model = _model(family)
  apply, variables = lm.make_tunix_lm_apply(model)
  tokens = _batch()["tokens"]
  valid = jnp.arange(L)[None] >= jnp.asarray([0, 5, 9])[:, None]  # left pads
  out = apply(variables, {"tokens": tokens, "input_mask": valid})
  np.testing.assert_allclose(out.logits, _tunix_forward(model, tokens, valid),
                             rtol=1e-5, atol=1e-6)
  # Other pad ids change nothing at the real tokens.
  other = jnp.where(valid, tokens, 7)
  out2 = apply(variables, {"tokens": other, "input_mask": valid})
  np.testing.assert_allclose(jnp.where(valid[..., None], out2.logits, 0),
                             jnp.where(valid[..., None], out.logits, 0),
                             rtol=1e-5, atol=1e-6)
  # A left-padded row equals the same sequence unpadded (positions restart at 0).
  row = apply(variables, {"tokens": tokens[1:2, 5:]}).logits[0]
  np.testing.assert_allclose(out.logits[1, 5:], row, rtol=1e-4, atol=1e-5)


def _term_inputs(student, teacher, batch, temperature=2.0):
  return TermInputs(student=student, teacher=teacher, batch=batch,
                    temperature=jnp.asarray(temperature, jnp.float32),
                    step=jnp.asarray(0))


@pytest.mark.parametrize("family", lm.FAMILIES)
def test_every_divergence_lean_equals_full_and_ignores_masked_positions(family):
  student = _model(family, seed=1)
  teacher = _model(family, seed=2, embed_dim=48, num_layers=1)
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
  student = _model(family, seed=1)
  teacher = _model(teacher_family, seed=2, embed_dim=48)
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
  for seed in range(2):
    batch = _batch(seed)
    metrics = {}
    for lean in (False, True):
      states[lean], metrics[lean] = steps[lean](states[lean], t_vars, batch)
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
  # The trained variables make a Tunix module again, with the same logits.
  s_apply, _ = lm.make_tunix_lm_apply(student)
  rebuilt = lm.rebuild_model(s_apply, states[True].student_variables())
  tokens = _batch()["tokens"]
  np.testing.assert_allclose(
      _tunix_forward(rebuilt, tokens),
      s_apply(states[True].student_variables(), {"tokens": tokens}).logits,
      rtol=1e-6, atol=1e-6)


def _largest_f32_buffer(hlo: str) -> int:
  sizes = [int(np.prod([int(d) for d in dims.split(",") if d]))
           for dims in re.findall(r"f32\[([0-9,]*)\]", hlo)]
  return max(sizes)


def test_lean_step_never_forms_batch_time_vocab_logits():
  big_v, b, t = 4096, 4, 32
  student = _model("qwen3", seed=1, vocab_size=big_v)
  teacher = _model("llama3", seed=2, vocab_size=big_v, embed_dim=48)
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
  # [B, T, V] has 128 V elements; the largest parameter, the teacher's
  # embedding, 48 V; the lean step's logit chunks 16 V.
  full = b * t * big_v
  assert _largest_f32_buffer(compiled[False].as_text()) >= full
  assert _largest_f32_buffer(compiled[True].as_text()) < full
  temp = {k: c.memory_analysis().temp_size_in_bytes for k, c in compiled.items()}
  assert full * 4 <= temp[False] and temp[True] < temp[False] / 3, temp


@pytest.mark.parametrize("family", lm.FAMILIES)
def test_kv_cached_generation_equals_full_recompute(family):
  model = _model(family, num_layers=6 if family == "gemma3" else 2)
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


def test_gkd_step_with_a_tunix_student_samples_and_lean_equals_full():
  student = _model("qwen3", seed=1)
  teacher = _model("gemma3", seed=2, embed_dim=48)
  sampling = lm.SamplingConfig(temperature=1.0, top_k=20, vocab_size=V,
                               eos_id=2, pad_id=0, suppress_ids=(0, 1))
  opt = optax.sgd(0.1)
  batch = _batch()
  outs = []
  for lean in (False, True):
    s_apply, s_vars = lm.make_tunix_lm_apply(student, compute_logits=not lean,
                                             vocab_size=V)
    t_apply, t_vars = lm.make_tunix_lm_apply(teacher, compute_logits=not lean,
                                             vocab_size=V)
    term = (lm.lean_token_kd_term("jsd", vocab_size=V, chunk_size=8) if lean
            else lm.token_kd_term("jsd", vocab_size=V))
    step = lm.make_gkd_train_step(
        s_apply, t_apply, losses.compose([losses.Term("gkd", term)]), opt,
        lmbda=1.0, sampling=sampling,
        rollout_fn=lm.make_tunix_rollout_fn(s_apply, sampling), donate=False)
    state = train.create_state(_sharpen(s_vars), opt, rng=jax.random.key(3))
    outs.append(step(state, _sharpen(t_vars), batch))
  (a, ma), (b, mb) = outs
  assert float(mb["on_policy"]) == 1.0 and float(ma["gkd"]) > 0
  np.testing.assert_allclose(mb["gkd"], ma["gkd"], rtol=1e-5)
  np.testing.assert_allclose(mb["tokens"], ma["tokens"])
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6)
  # The rollout really sampled: the generated batch differs from the data.
  rollout = jax.jit(lm.make_tunix_rollout_fn(s_apply, sampling))
  gen = rollout(_sharpen(s_vars), batch, jax.random.key(0))
  assert gen["tokens"].shape == batch["tokens"].shape
  np.testing.assert_array_equal(gen["tokens"][:, :2], batch["tokens"][:, :2])
  assert not np.array_equal(gen["tokens"], batch["tokens"])


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
