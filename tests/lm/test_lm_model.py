"""kdjax.lm: the decoder, the byte tokenizer, batches, sampling and KV-cached generation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import lm

TOK = lm.ByteTokenizer()
CFG = lm.TransformerConfig(vocab_size=264, num_layers=2, num_heads=2,
                           d_model=32, max_len=24)


@pytest.fixture(scope="module")
def variables():
  return lm.init_lm(CFG, jax.random.key(0))


# ----------------------------------------------------------------------------
# Tokenizer and batches.
# ----------------------------------------------------------------------------


def test_byte_tokenizer_round_trip_and_special_ids():
  text = "héllo\nwörld"
  ids = TOK.encode(text, add_bos=True, add_eos=True)
  assert ids[0] == 257 and ids[-1] == 258
  assert ids[1:-1] == list(text.encode("utf-8"))
  assert TOK.decode(ids) == text
  assert TOK.decode([257, 104, 105, 258, 106]) == "hi"  # stops at EOS
  assert TOK.vocab_size == 259 and TOK.pad_id == 256


def test_make_lm_batch_masks_prompt_and_padding_by_hand():
  batch = lm.make_lm_batch([[257, 1], [257, 1, 2, 3]], [[5, 6, 258], [7]], 6,
                           pad_id=256)
  np.testing.assert_array_equal(
      batch["tokens"], [[257, 1, 5, 6, 258, 256], [257, 1, 2, 3, 7, 256]])
  np.testing.assert_array_equal(
      batch["targets"], [[1, 5, 6, 258, 256, 256], [1, 2, 3, 7, 256, 256]])
  # Targets 5, 6, EOS (example 0) and 7 (example 1) are trained on.
  np.testing.assert_array_equal(
      batch["loss_mask"], [[0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 0, 0]])
  np.testing.assert_array_equal(batch["prompt_len"], [2, 4])
  with pytest.raises(ValueError, match="more than seq_len"):
    lm.make_lm_batch([[257] * 7], [[1]], 6)


def test_text_examples_cut_windows():
  prompts, completions = lm.text_examples("abcdefghij", TOK, seq_len=4,
                                          prompt_bytes=1)
  assert len(prompts) == 2
  assert prompts[0] == [257, ord("a")]
  assert completions[0] == [ord(c) for c in "bcd"]
  batch = lm.make_lm_batch(prompts, completions, 4)
  np.testing.assert_array_equal(batch["loss_mask"].sum(1), [3, 3])


# ----------------------------------------------------------------------------
# The model.
# ----------------------------------------------------------------------------


def test_config_validation():
  with pytest.raises(ValueError, match="divisible"):
    lm.TransformerConfig(d_model=30, num_heads=4)
  with pytest.raises(ValueError, match="num_layers"):
    lm.TransformerConfig(num_layers=0)


def test_hidden_states_and_unembedding_give_the_logits(variables):
  apply = lm.make_lm_apply(CFG, return_hidden=True)
  tokens = np.random.default_rng(0).integers(0, 259, (2, 7)).astype(np.int32)
  out = apply(variables, {"tokens": tokens})
  assert out.logits.shape == (2, 7, 264)
  assert out.features["hidden"].shape == (2, 7, 32)
  kernel, bias = lm.unembedding(variables)
  assert kernel.shape == (32, 264) and bias.shape == (264,)
  np.testing.assert_allclose(
      np.asarray(out.features["hidden"]) @ np.asarray(kernel)
      + np.asarray(bias), out.logits, atol=1e-5)
  assert CFG.num_params() == sum(x.size for x in jax.tree.leaves(variables))


def test_model_is_causal(variables):
  module = lm.DecoderLM(CFG)
  tokens = np.random.default_rng(1).integers(0, 259, (1, 8)).astype(np.int32)
  changed = tokens.copy()
  changed[0, 5:] = (changed[0, 5:] + 7) % 259
  a = module.apply(variables, tokens)
  b = module.apply(variables, changed)
  np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-6)
  assert np.abs(np.asarray(a[:, 5:] - b[:, 5:])).max() > 1e-3


def test_cached_forward_equals_full_forward(variables):
  module = lm.DecoderLM(CFG)
  tokens = np.random.default_rng(2).integers(0, 259, (2, 9)).astype(np.int32)
  full = module.apply(variables, tokens)
  cache = lm.init_cache(CFG, 2, 9)
  prefill, extras = module.apply(variables, tokens[:, :4], cache=cache,
                                 cache_index=0)
  cache = extras["cache"]
  steps = [prefill]
  decode = jax.jit(lambda v, x, c, i: module.apply(v, x, cache=c,
                                                   cache_index=i))
  for t in range(4, 9):
    logits, extras = decode(variables, tokens[:, t:t + 1], cache, t)
    cache = extras["cache"]
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, 1), full, atol=1e-5)


# ----------------------------------------------------------------------------
# Sampling and generation.
# ----------------------------------------------------------------------------


def test_sample_logits_filters():
  logits = jnp.asarray(np.log([[0.5, 0.3, 0.15, 0.05, 0.0 + 1e-9]]),
                       jnp.float32)
  keys = jax.random.split(jax.random.key(0), 400)

  def draw(cfg):
    return np.asarray(jax.vmap(lambda k: lm.sample_logits(logits, k, cfg))(keys))

  assert set(np.unique(draw(lm.SamplingConfig(top_k=2))).tolist()) == {0, 1}
  # Nucleus: 0.5 + 0.3 >= 0.7 keeps two tokens; p = 0.5 keeps the top-1 alone.
  assert set(np.unique(draw(lm.SamplingConfig(top_p=0.7))).tolist()) == {0, 1}
  assert set(np.unique(draw(lm.SamplingConfig(top_p=0.5))).tolist()) == {0}
  cfg = lm.SamplingConfig(suppress_ids=(0,), vocab_size=3)
  assert set(np.unique(draw(cfg)).tolist()) == {1, 2}
  cfg = lm.SamplingConfig(temperature=0.0, suppress_ids=(0,))
  assert int(lm.sample_logits(logits, keys[0], cfg)[0]) == 1
  # Frequencies follow the renormalised distribution over the top-2.
  freq = np.mean(draw(lm.SamplingConfig(top_k=2)) == 0)
  assert abs(freq - 0.5 / 0.8) < 0.08
  with pytest.raises(ValueError, match="top_p"):
    lm.SamplingConfig(top_p=0.0)


def _prompts():
  batch = lm.make_lm_batch([TOK.encode("ab"), TOK.encode("hello")],
                           [list(b"cd"), list(b"!")], 12)
  buf = jnp.concatenate([batch["tokens"], batch["targets"][:, -1:]], 1)
  return batch, buf


@pytest.mark.parametrize("prefill", [1, 3])
def test_generation_with_kv_cache_equals_without(variables, prefill):
  batch, buf = _prompts()
  module = lm.DecoderLM(CFG)
  # EOS is a token this random model emits greedily, so that stopping is
  # exercised too: take the token the model produces first for example 1.
  probe = lm.SamplingConfig(temperature=0.0, vocab_size=259)
  first = lm.generate(module, variables, buf, batch["prompt_len"],
                      jax.random.key(0), probe, use_cache=False)
  eos = int(first.tokens[1, 8])
  cfg = lm.SamplingConfig(temperature=0.0, vocab_size=259, eos_id=eos,
                          pad_id=256, prefill_length=prefill)
  gen = jax.jit(lambda v, b, p: lm.generate(module, v, b, p, jax.random.key(0),
                                            cfg))
  cached = gen(variables, buf, batch["prompt_len"])
  plain = lm.generate(module, variables, buf, batch["prompt_len"],
                      jax.random.key(0), cfg, use_cache=False)
  np.testing.assert_array_equal(cached.tokens, plain.tokens)
  np.testing.assert_array_equal(cached.lengths, plain.lengths)
  # Prompts are kept; generation is greedy w.r.t. the full forward pass.
  np.testing.assert_array_equal(cached.tokens[0, :3], buf[0, :3])
  np.testing.assert_array_equal(cached.tokens[1, :6], buf[1, :6])
  assert int(cached.lengths[1]) == 9  # stopped at the EOS of position 8
  assert np.all(np.asarray(cached.tokens[1, 9:]) == 256)
  logits = lm.DecoderLM(CFG).apply(variables, cached.tokens[:, :-1])
  for b, start in ((0, 3), (1, 6)):
    stop = int(cached.lengths[b])
    np.testing.assert_array_equal(
        np.argmax(np.asarray(logits[b, start - 1:stop - 1, :259]), -1),
        cached.tokens[b, start:stop])


def test_rollout_batch_masks_generated_tokens(variables):
  batch, _ = _prompts()
  cfg = lm.SamplingConfig(temperature=1.0, top_k=20, vocab_size=259,
                          eos_id=258, pad_id=256, suppress_ids=(256, 257))
  out = lm.make_rollout_fn(lm.DecoderLM(CFG), cfg)(variables, batch,
                                                   jax.random.key(3))
  assert set(out) == set(batch)
  for key in batch:
    assert out[key].shape == batch[key].shape
    assert out[key].dtype == batch[key].dtype
  np.testing.assert_array_equal(out["tokens"][:, 1:], out["targets"][:, :-1])
  np.testing.assert_array_equal(out["tokens"][0, :3], batch["tokens"][0, :3])
  lengths = np.where(np.asarray(out["targets"]) == 258,
                     np.arange(12)[None] + 2, 13).min(1)
  for b, p in enumerate(batch["prompt_len"]):
    expected = (np.arange(12) + 1 >= p) & (np.arange(12) + 1 < lengths[b])
    np.testing.assert_array_equal(out["loss_mask"][b], expected)
