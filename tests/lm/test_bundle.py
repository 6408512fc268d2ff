"""LMModel bundles of kdjax's and Tunix's models (kdjax/lm/_bundle.py)."""

from __future__ import annotations

import importlib.util

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import lm

CONFIG = lm.TransformerConfig(vocab_size=264, num_layers=1, num_heads=2,
                              d_model=16, max_len=16)
L = 8


def _batch(vocab=259, seed=0):
  rng = np.random.default_rng(seed)
  prompts = [[257] + list(rng.integers(0, 256, 2)) for _ in range(2)]
  completions = [list(rng.integers(0, 256, L - 2)) for _ in range(2)]
  return {k: jnp.asarray(v) for k, v in
          lm.make_lm_batch(prompts, completions, L, pad_id=256).items()}


# -----------------------------------------------------------------------------
# kdjax's DecoderLM.
# -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def decoder():
  return lm.decoder_lm_model(CONFIG, seed=7, name="tiny")


def test_decoder_init_is_one_jitted_init_lm(decoder):
  expected = jax.jit(lambda k: lm.init_lm(CONFIG, k))(jax.random.PRNGKey(7))
  chex.assert_trees_all_equal(decoder.variables, expected)
  other = lm.decoder_lm_model(CONFIG, seed=8)
  with pytest.raises(AssertionError):
    chex.assert_trees_all_equal(other.variables, expected)


def test_decoder_fields(decoder):
  assert decoder.family == "kdjax"
  assert (decoder.rows, decoder.max_len) == (264, 16)
  assert decoder.description == ("kdjax DecoderLM tiny (1 layers, d_model "
                                 "16, 2 heads, vocabulary 264)")
  assert decoder.tunix_model is None and decoder.to_nnx is None


def test_decoder_apply_and_lean_apply(decoder):
  batch = _batch()
  out = decoder.apply(decoder.variables, batch)
  expected = lm.make_lm_apply(CONFIG)(decoder.variables, batch)
  chex.assert_shape(out.logits, (2, L, 264))
  chex.assert_trees_all_close(out.logits, expected.logits)
  lean = decoder.lean_apply(decoder.variables, batch)
  kernel = lean.features["unembedding_kernel"]
  logits = lean.features["hidden"] @ kernel
  if "unembedding_bias" in lean.features:
    logits = logits + lean.features["unembedding_bias"]
  chex.assert_trees_all_close(logits, out.logits, atol=1e-5, rtol=1e-5)


def test_decoder_generate_and_rollout(decoder):
  sampling = lm.SamplingConfig(temperature=0.0, eos_id=258, pad_id=256)
  tokens, prompt_len = lm.prompt_batch([[257, 1, 2], [257]], 3, 256)
  rng = jax.random.PRNGKey(0)
  out = decoder.generate(decoder.variables, tokens, prompt_len, rng, sampling)
  expected = lm.generate(lm.make_lm_apply(CONFIG).module, decoder.variables,
                         tokens, prompt_len, rng, sampling)
  chex.assert_trees_all_equal(out, expected)
  rolled = decoder.rollout(sampling)(decoder.variables, _batch(), rng)
  chex.assert_shape(rolled["tokens"], (2, L))


# -----------------------------------------------------------------------------
# NNXParams.
# -----------------------------------------------------------------------------


def test_nnx_params_round_trip_of_an_nnx_module():
  from flax import nnx
  model = nnx.Sequential(nnx.Linear(3, 4, rngs=nnx.Rngs(0)),
                         nnx.Linear(4, 2, rngs=nnx.Rngs(1)))
  state = nnx.state(model, nnx.Param)
  params = lm.NNXParams(state)
  assert set(params.plain) == {"layers"}
  assert set(params.plain["layers"]) == {"0", "1"}
  assert set(params.plain["layers"]["0"]) == {"kernel", "bias"}
  assert params.paths[0] == ("layers", "0", "bias", "value")
  assert len(params.paths) == 4
  assert all(isinstance(n, str) for path in params.paths for n in path)
  back = params.to_state(params.plain)
  assert (jax.tree_util.tree_structure(back)
          == jax.tree_util.tree_structure(state))
  chex.assert_trees_all_equal(back, state)
  # New leaves (e.g. trained ones) go where their path says.
  doubled = params.to_state(jax.tree.map(lambda x: 2 * x, params.plain))
  nnx.update(model, doubled)
  np.testing.assert_array_equal(model.layers[1].kernel.value,
                                2 * params.plain["layers"]["1"]["kernel"][
                                    "value"])
  with pytest.raises(KeyError):
    params.to_state({"layers": {"0": params.plain["layers"]["0"]}})


_TUNIX = importlib.util.find_spec("tunix") is not None
needs_tunix = pytest.mark.skipif(
    not _TUNIX, reason="google-tunix is not installed (the .[tunix] extra)")


@pytest.fixture(scope="module")
def qwen3():
  config = lm.tunix_model_config("qwen3", "tiny")
  return lm.init_tunix_model("qwen3", config, 0)


@needs_tunix
def test_nnx_params_round_trip_of_a_tunix_model(qwen3):
  _, variables = lm.make_tunix_lm_apply(qwen3)
  state = variables["params"]
  params = lm.NNXParams(state)
  back = params.to_state(params.plain)
  assert (jax.tree_util.tree_structure(back)
          == jax.tree_util.tree_structure(state))
  chex.assert_trees_all_equal(back, state)
  assert "layers" in params.plain  # plain string keys, checkpointable
  assert all(isinstance(n, str) for path in params.paths for n in path)


@needs_tunix
def test_tunix_lm_model_matches_the_adapter(qwen3):
  model = lm.tunix_lm_model(qwen3, "qwen3", 300, "qwen3 tiny")
  assert (model.family, model.rows, model.max_len) == ("qwen3", 320, None)
  assert model.description.startswith("tunix qwen3 tiny (2 layers")
  assert model.tunix_model is qwen3
  apply, variables = lm.make_tunix_lm_apply(qwen3, vocab_size=300)
  batch = _batch()
  out = model.apply(model.variables, batch)
  chex.assert_shape(out.logits, (2, L, 300))
  chex.assert_trees_all_close(out.logits, apply(variables, batch).logits)
  chex.assert_trees_all_equal(model.to_nnx(model.variables), variables)
  lean = model.lean_apply(model.variables, batch)
  assert "hidden" in lean.features


@needs_tunix
def test_tunix_lm_model_vocabulary_too_small(qwen3):
  with pytest.raises(lm.VocabularySizeError,
                     match=r"qwen3 tiny has 320 vocabulary rows but the "
                     r"tokenizer has 400 ids"):
    lm.tunix_lm_model(qwen3, "qwen3", 400, "qwen3 tiny")
  assert issubclass(lm.VocabularySizeError, ValueError)
