"""Fake quantisation: NumPy rounding references, straight-through gradients, QAT wrapper."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import compress
from kdjax import models


def np_fake_quant(x, bits, channel_axis=None, clip=None):
  """Independent reference: symmetric round-half-to-even quantisation."""
  x = np.asarray(x, np.float64)
  m = 2 ** (bits - 1) - 1
  if clip is None:
    axes = tuple(range(x.ndim)) if channel_axis is None else tuple(
        a for a in range(x.ndim) if a != channel_axis % x.ndim)
    c = np.max(np.abs(x), axis=axes, keepdims=True)
  else:
    c = np.float64(clip)
  s = np.where(c > 0, c / m, 1.0)
  return np.clip(np.rint(x / s), -m, m) * s


def test_hand_made_int8_per_tensor():
  # absmax 1.27 -> step 0.01; 0.005 and 0.015 are exact halves -> even.
  x = np.array([1.27, -1.27, 0.004, 0.006, -0.5049, 0.0], np.float32)
  got = np.asarray(compress.fake_quant(x, 8))
  np.testing.assert_allclose(got, [1.27, -1.27, 0.0, 0.01, -0.50, 0.0],
                             atol=1e-6)
  np.testing.assert_allclose(got, np_fake_quant(x, 8), atol=1e-6)


def test_hand_made_int4_clip_and_levels():
  # clip 0.7 -> step 0.1, levels -0.7..0.7; values beyond saturate.
  x = np.array([0.26, -0.34, 0.7, 5.0, -9.0, 0.04], np.float32)
  got = np.asarray(compress.fake_quant(x, 4, clip=0.7))
  np.testing.assert_allclose(got, [0.3, -0.3, 0.7, 0.7, -0.7, 0.0], atol=1e-6)
  np.testing.assert_allclose(got, np_fake_quant(x, 4, clip=0.7), atol=1e-6)
  assert len(np.unique(np.round(np.asarray(compress.fake_quant(
      np.linspace(-1, 1, 101), 4)) * 7))) == 15


@pytest.mark.parametrize("bits", [4, 8])
def test_per_channel_matches_numpy_and_jit(bits):
  rng = np.random.default_rng(0)
  w = rng.standard_normal((3, 3, 2, 5)).astype(np.float32) * np.array(
      [0.01, 0.1, 1.0, 10.0, 0.0], np.float32)   # one zero channel
  ref = np_fake_quant(w, bits, channel_axis=-1)
  eager = np.asarray(compress.fake_quant(w, bits, channel_axis=-1))
  jitted = np.asarray(jax.jit(lambda v: compress.fake_quant(
      v, bits, channel_axis=-1))(w))
  np.testing.assert_allclose(eager, ref, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-7)
  assert np.all(eager[..., 4] == 0)
  # at most 2^bits - 1 levels per channel
  for c in range(4):
    assert len(np.unique(eager[..., c])) <= 2 ** bits - 1


def test_int_storage_roundtrip():
  w = np.array([[0.5, -2.0], [-0.25, 1.0]], np.float32)
  q, s = compress.quantize_to_int(w, 8, channel_axis=-1)
  assert q.dtype == jnp.int8
  np.testing.assert_array_equal(np.asarray(q), [[127, -127], [-64, 64]])
  np.testing.assert_allclose(np.asarray(s), [[0.5 / 127, 2.0 / 127]], rtol=1e-6)


def test_ste_identity_inside_zero_outside():
  x = jnp.array([-2.0, -0.99, -0.3, 0.0, 0.41, 0.99, 1.5, 3.0])
  g = jax.grad(lambda v: jnp.sum(compress.fake_quant(v, 8, clip=1.0)
                                 * jnp.arange(1.0, 9.0)))(x)
  inside = np.abs(np.asarray(x)) <= 1.0
  np.testing.assert_array_equal(np.asarray(g),
                                np.where(inside, np.arange(1.0, 9.0), 0.0))
  # absmax calibration: nothing is outside, the gradient is the identity.
  g = jax.grad(lambda v: jnp.sum(compress.fake_quant(v, 4, channel_axis=-1)))(
      jnp.asarray(np.random.default_rng(1).standard_normal((4, 3)),
                  jnp.float32))
  np.testing.assert_array_equal(np.asarray(g), np.ones((4, 3)))


@pytest.mark.parametrize("bad", [2, 3, 16, 32, 0, 8.0, "8", True])
def test_unsupported_bit_width(bad):
  with pytest.raises(ValueError, match="not a supported bit width"):
    compress.fake_quant(jnp.ones(3), bad)
  with pytest.raises(ValueError, match="bit width"):
    compress.QuantConfig(weight_bits=bad)


def test_config_parse():
  assert compress.QuantConfig.parse("int8") == compress.QuantConfig(8, 8)
  assert compress.QuantConfig.parse("int4") == compress.QuantConfig(4, None)
  assert compress.QuantConfig.parse("w4a8").name == "w4a8"
  with pytest.raises(ValueError, match="bit width"):
    compress.QuantConfig.parse("w3")
  with pytest.raises(ValueError, match="not understood"):
    compress.QuantConfig.parse("fp8")


def _tiny_mlp():
  m = models.MLP(hidden=(8,), num_classes=3)
  x = jnp.asarray(np.random.default_rng(2).standard_normal((5, 2, 3)),
                  jnp.float32)
  return m, m.init(jax.random.PRNGKey(0), x), x


def test_quantize_apply_matches_manual_numpy_forward():
  m, v, x = _tiny_mlp()
  apply_q = compress.quantize_apply(models.from_linen(m, train_kwarg="train"),
                                    compress.QuantConfig(8, 8))
  p = jax.tree.map(np.asarray, v["params"])
  h = np_fake_quant(np.asarray(x).reshape(5, -1), 8, 0)   # per example
  h = np.maximum(h @ np_fake_quant(p["dense_0"]["kernel"], 8, -1)
                 + p["dense_0"]["bias"], 0)
  ref = (np_fake_quant(h, 8, 0) @ np_fake_quant(p["head"]["kernel"], 8, -1)
         + p["head"]["bias"])
  got = apply_q(v, {"image": x}).logits
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-5)
  jitted = jax.jit(lambda v_, x_: apply_q(v_, {"image": x_}).logits)(v, x)
  np.testing.assert_allclose(np.asarray(jitted), np.asarray(got), atol=1e-6)
  # weights only (int4): activations untouched
  apply_w4 = compress.quantize_apply(models.from_linen(m), compress.QuantConfig(4, None))
  h = np.maximum(np.asarray(x).reshape(5, -1) @ np_fake_quant(
      p["dense_0"]["kernel"], 4, -1) + p["dense_0"]["bias"], 0)
  ref4 = h @ np_fake_quant(p["head"]["kernel"], 4, -1) + p["head"]["bias"]
  np.testing.assert_allclose(np.asarray(apply_w4(v, {"image": x}).logits),
                             ref4, rtol=1e-4, atol=1e-5)


def test_qat_distillation_step_trains_float_master_weights():
  import optax
  from kdjax import losses, train
  m, v, x = _tiny_mlp()
  teacher = models.MLP(hidden=(16,), num_classes=3)
  tv = teacher.init(jax.random.PRNGKey(1), x)
  apply_q = compress.quantize_apply(models.from_linen(m, train_kwarg="train"),
                                    compress.QuantConfig(8, 8))
  loss = losses.compose([
      losses.Term("ce", losses.label_term(), 0.5, needs_teacher=False),
      losses.Term("kd", losses.logit_term(losses.kl_divergence), 0.5)],
      temperature=2.0)
  opt = optax.adam(1e-2)
  state = train.create_state(jax.tree.map(jnp.copy, v), opt,
                             rng=jax.random.PRNGKey(0))
  step = train.make_train_step(apply_q, models.from_linen(teacher), loss, opt)
  batch = {"image": x, "label": jnp.array([0, 1, 2, 0, 1])}
  first = None
  for _ in range(30):
    state, metrics = step(state, tv, batch)
    first = float(metrics["loss"]) if first is None else first
  assert np.isfinite(float(metrics["loss"])) and float(metrics["loss"]) < first
  # master weights stay float (not on the int8 grid)
  k = np.asarray(state.params["dense_0"]["kernel"])
  chex.assert_trees_all_equal_dtypes(state.params, v["params"])
  assert not np.allclose(k, np_fake_quant(k, 8, -1))


def test_qwix_backend_if_installed():
  pytest.importorskip("qwix")
  m, v, x = _tiny_mlp()
  qm = compress.qwix_quantize_module(m, compress.QuantConfig(8, None))
  y = qm.apply(v, x)
  y_float = m.apply(v, x)
  assert y.shape == y_float.shape
  assert 0 < float(jnp.max(jnp.abs(y - y_float))) < 0.1
  g = jax.grad(lambda p: jnp.sum(qm.apply({"params": p}, x)))(v["params"])
  assert all(bool(jnp.all(jnp.isfinite(l))) for l in jax.tree.leaves(g))


def test_activation_quantisation_reaches_keyword_inputs():
  """``nn.Dense(...)(inputs=x)`` is quantised like ``nn.Dense(...)(x)``."""
  from flax import linen as nn

  class Kw(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dense(3, name="d")(inputs=x.reshape(x.shape[0], -1))

  class Pos(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return nn.Dense(3, name="d")(x.reshape(x.shape[0], -1))

  x = np.random.default_rng(0).standard_normal((2, 4, 4, 1)).astype(np.float32)
  v = Kw().init(jax.random.PRNGKey(0), x)
  q = compress.QuantConfig(8, 8)
  kw = compress.quantize_apply(models.from_linen(Kw(), train_kwarg="train"), q,
                               quantize_weights=False)(v, {"image": x}).logits
  pos = compress.quantize_apply(models.from_linen(Pos(), train_kwarg="train"),
                                q, quantize_weights=False)(v, {"image": x}).logits
  plain = models.from_linen(Kw(), train_kwarg="train")(v, {"image": x}).logits
  np.testing.assert_array_equal(np.asarray(kw), np.asarray(pos))
  assert not np.allclose(np.asarray(kw), np.asarray(plain), atol=1e-7)
