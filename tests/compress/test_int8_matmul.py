"""Integer export: s8 x s8 -> s32 dots in the artifact, error within the quantisation step."""

from __future__ import annotations

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax import lax

from kdjax import compress
from kdjax import models
from kdjax.compress import _int8

pytest.importorskip("flatbuffers", reason="jax.export serialization needs "
                    "flatbuffers")

IMAGE_SHAPE = (28, 28, 1)
W8A8 = compress.QuantConfig(8, 8)


def _export(apply, variables, directory, **kw):
  compress.export_for_inference(apply, variables, str(directory),
                                input_shape=kw.pop("input_shape", IMAGE_SHAPE),
                                platforms=("cpu",), **kw)
  with open(os.path.join(directory, "export.json")) as f:
    manifest = json.load(f)
  with open(os.path.join(directory, "model.jaxexport"), "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  with np.load(os.path.join(directory, "params.npz")) as z:
    arrays = [z[k] for k in manifest["array_keys"]]
  return manifest, exported, lambda x: np.asarray(exported.call(*arrays, x))


def _kernels(params):
  return [np.asarray(p) for p in jax.tree.leaves(params) if np.ndim(p) >= 2]


def _matmuls(text):
  """``(all dot/conv ops, those with i8 operands and an i32 result)``."""
  ops = [l for l in text.splitlines()
         if "stablehlo.dot_general" in l or "stablehlo.convolution" in l]
  integer = [l for l in ops if re.search(r"xi8>, tensor<[0-9x]+xi8>\) -> "
                                         r"tensor<[?0-9x]+xi32>", l)]
  return ops, integer


def _shape_str(shape, dtype):
  return "tensor<" + "x".join(str(d) for d in shape) + f"x{dtype}>"


@pytest.fixture(scope="module")
def cnn():
  m = models.CNN(channels=(4, 8), dense=16, num_classes=10)
  v = jax.device_get(m.init(jax.random.PRNGKey(0), jnp.zeros((1, *IMAGE_SHAPE))))
  return models.from_linen(m, train_kwarg="train"), v


# ---------------------------------------------------------------------------
# The artifact's program.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("compute", ["int8", "int8_im2col", "int8_direct_conv"])
def test_stablehlo_has_integer_dots_and_no_float_kernel(cnn, tmp_path, compute):
  apply, variables = cnn
  manifest, exported, _ = _export(apply, variables, tmp_path / "e",
                                  quantize=W8A8, compute=compute,
                                  int8_min_depth=1)
  assert manifest["compute"] == compute
  assert manifest["int8_layers"] == ["conv_0", "conv_1", "dense", "head"]
  text = exported.mlir_module()
  ops, integer = _matmuls(text)
  assert len(integer) == 4 and len(ops) == 4, ops   # no float matmul left
  if compute != "int8_direct_conv":  # "int8": im2col below 32 channels
    assert all("dot_general" in l for l in integer)
  else:
    assert sum("convolution" in l for l in integer) == 2
  for k in _kernels(variables["params"]):
    # the int8 kernel is an input; no float copy of it (in any layout) exists
    assert _shape_str(k.shape, "i8") in text
    flat = (int(np.prod(k.shape[:-1])), k.shape[-1])
    for shape in {k.shape, flat}:
      assert _shape_str(shape, "f32") not in text, shape


def test_dequantize_option_keeps_the_old_float_program(cnn, tmp_path):
  apply, variables = cnn
  manifest, exported, _ = _export(apply, variables, tmp_path / "e",
                                  quantize=W8A8, compute="dequantize")
  text = exported.mlir_module()
  assert manifest["compute"] == "dequantize" and manifest["int8_layers"] == []
  ops, integer = _matmuls(text)
  assert len(ops) == 4 and not integer
  dense = _kernels(variables["params"])[2]
  assert _shape_str(dense.shape, "f32") in text


def test_default_min_depth_keeps_shallow_layers_float(cnn, tmp_path):
  apply, variables = cnn
  # contraction depths: conv_0 9, conv_1 36, dense 392, head 16
  manifest, _, _ = _export(apply, variables, tmp_path / "e", quantize=W8A8)
  assert manifest["compute"] == "int8"
  assert manifest["int8_layers"] == ["dense"]
  assert set(manifest["float_layers"]) == {"conv_0", "conv_1", "head"}
  assert "contraction depth 9 < 64" in manifest["float_layers"]["conv_0"]
  with pytest.raises(ValueError, match="compute"):
    compress.export_for_inference(apply, variables, str(tmp_path / "f"),
                                  input_shape=IMAGE_SHAPE, quantize=W8A8,
                                  compute="int16")


# ---------------------------------------------------------------------------
# Values.
# ---------------------------------------------------------------------------


def _np_quant(x, axis_keep):
  """Per-``axis_keep`` absmax int8 quantisation in float64: (q, s)."""
  axes = tuple(a for a in range(x.ndim) if a != axis_keep % x.ndim)
  c = np.max(np.abs(x), axis=axes, keepdims=True)
  s = np.where(c > 0, c / 127, 1.0)
  return np.clip(np.rint(x / s), -127, 127), s


@pytest.mark.parametrize("kw", [
    dict(strides=(1, 1), padding="SAME", kernel_dilation=(1, 1)),
    dict(strides=(2, 2), padding="SAME", kernel_dilation=(1, 1)),
    dict(strides=(1, 2), padding="VALID", kernel_dilation=(2, 1)),
    dict(strides=(2, 1), padding=((2, 0), (1, 3)), kernel_dilation=(1, 2)),
])
def test_int8_conv_im2col_and_direct_equal_the_integer_reference(kw):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((3, 9, 8, 5)).astype(np.float32)
  w = rng.standard_normal((3, 2, 5, 6)).astype(np.float32)
  q_w, s_w = _int8._quant.quantize_to_int(w, 8, channel_axis=-1)
  q_x, s_x = _np_quant(x.astype(np.float64), 0)
  padding = kw["padding"]
  ref_acc = lax.conv_general_dilated(   # float64-free exact reference: int32
      jnp.asarray(q_x, jnp.int32), jnp.asarray(q_w, jnp.int32), kw["strides"],
      padding, rhs_dilation=kw["kernel_dilation"],
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  ref = np.asarray(ref_acc, np.float64) * s_x * np.asarray(s_w, np.float64).reshape(-1)
  for impl in _int8.CONV_IMPLS:
    got = np.asarray(_int8.int8_conv(jnp.asarray(x), q_w, s_w, impl=impl, **kw))
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)


def test_auto_conv_is_direct_from_32_channels():
  def prims(c, n):
    q_w = jnp.zeros((3, 3, c, n), jnp.int8)
    jaxpr = jax.make_jaxpr(lambda x: _int8.int8_conv(
        x, q_w, jnp.ones((n,)), strides=(1, 1), padding="SAME",
        kernel_dilation=(1, 1)))(jnp.ones((2, 6, 6, c)))
    return {e.primitive.name for e in jaxpr.jaxpr.eqns}
  assert "conv_general_dilated" in prims(32, 8)
  assert "conv_general_dilated" in prims(4, 32)
  assert "conv_general_dilated" not in prims(16, 16)
  assert "dot_general" in prims(16, 16)


def test_int8_dense_is_the_integer_product():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((4, 3, 37)).astype(np.float32) * np.array(
      [1, 10, 0.1, 0], np.float32)[:, None, None]      # an all-zero example
  w = rng.standard_normal((37, 11)).astype(np.float32)
  b = rng.standard_normal(11).astype(np.float32)
  q_w, s_w = _int8._quant.quantize_to_int(w, 8, channel_axis=-1)
  q_x, s_x = _np_quant(x.astype(np.float64), 0)
  acc = np.einsum("btk,kn->btn", q_x.astype(np.int64), np.asarray(q_w, np.int64))
  ref = acc * s_x * np.asarray(s_w, np.float64).reshape(-1) + b
  got = np.asarray(_int8.int8_dense(jnp.asarray(x), q_w, s_w, b))
  np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(got[3], np.broadcast_to(b, (3, 11)))


class _OneConv(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    y = nn.Conv(6, (3, 3), padding="SAME", name="conv")(x)
    return y.reshape(y.shape[0], -1)


@pytest.mark.parametrize("model", ["dense", "conv"])
def test_one_layer_error_is_within_the_quantisation_step(tmp_path, model):
  """ŷ - y = e_x W + x E + e_x E, |e_x| <= s_x/2, |E| <= s_w/2 elementwise.

  Worst case: ``|ŷ - y| <= (s_x/2) Σ|W| + (s_w/2) Σ|x| + K s_x s_w / 4``.
  Typical: with independent uniform rounding errors (variance step²/12),
  ``E(ŷ - y)² ≈ (s_x²/12) Σ W² + (s_w²/12) Σ x²`` (the sums over one
  output's receptive field).
  """
  rng = np.random.default_rng(2)
  x = rng.standard_normal((6, *IMAGE_SHAPE)).astype(np.float32)
  m = models.MLP(hidden=(), num_classes=10) if model == "dense" else _OneConv()
  v = jax.device_get(m.init(jax.random.PRNGKey(3), jnp.zeros((1, *IMAGE_SHAPE))))
  v = jax.tree.map(lambda p: p + 0.05 * np.sign(p), v)   # bias != 0
  apply = models.from_linen(m, train_kwarg="train")
  manifest, _, predict = _export(apply, v, tmp_path / "e", quantize=W8A8,
                                 int8_min_depth=1)
  assert manifest["int8_layers"] == (["head"] if model == "dense" else ["conv"])
  y = np.asarray(apply(v, {"image": x}).logits, np.float64)
  err = np.abs(predict(x).astype(np.float64) - y)
  x64 = x.astype(np.float64)
  name = "head" if model == "dense" else "conv"
  w = np.asarray(v["params"][name]["kernel"], np.float64)
  _, s_x = _np_quant(x64, 0)
  _, s_w = _np_quant(w, -1)
  s_x, s_w = s_x.reshape(-1, 1), s_w.reshape(-1)
  if model == "dense":
    xf = x64.reshape(len(x), -1)
    # field(a, b)[i, n] = Σ_k a[i, k] b[k, n] over output n's inputs
    field = lambda a, b: a @ b  # noqa: E731
    xs, ws = xf, w
  else:
    field = lambda a, b: np.asarray(lax.conv_general_dilated(  # noqa: E731
        jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), (1, 1),
        "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")),
        np.float64).reshape(len(x), -1)
    xs, ws = x64, w
    s_w = np.tile(s_w, 28 * 28)          # [B, H*W*N] outputs, n fastest
  one_x, one_w = np.ones_like(xs), np.ones_like(ws)
  bound = (s_x / 2 * field(one_x, np.abs(ws)) + s_w / 2 * field(np.abs(xs),
                                                                one_w)
           + s_x * s_w / 4 * field(one_x, one_w))
  assert np.all(err <= bound * (1 + 1e-4) + 1e-5), (err / bound).max()
  sigma = np.sqrt(s_x ** 2 / 12 * field(one_x, ws ** 2)
                  + s_w ** 2 / 12 * field(xs ** 2, one_w))
  rms, predicted = np.sqrt(np.mean(err ** 2)), np.sqrt(np.mean(sigma ** 2))
  assert 0.5 * predicted < rms < 1.5 * predicted, (rms, predicted)


def test_multi_layer_int8_equals_the_fake_quantised_forward(cnn, tmp_path):
  apply, variables = cnn
  x = np.random.default_rng(4).standard_normal((5, *IMAGE_SHAPE)).astype(
      np.float32)
  ref = np.asarray(compress.quantize_apply(apply, W8A8)(
      variables, {"image": x}).logits)
  for compute in ("int8", "int8_im2col", "int8_direct_conv", "dequantize"):
    _, _, predict = _export(apply, variables, tmp_path / compute,
                            quantize=W8A8, compute=compute, int8_min_depth=1)
    # the same integers; only float summation order differs
    np.testing.assert_allclose(predict(x), ref, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(predict(x[:1]), ref[:1], atol=1e-4, rtol=1e-4)


class _Unusual(nn.Module):
  """Layers the integer path leaves to the float one."""

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(4, (3, 3), feature_group_count=1, name="plain")(x)
    x = nn.Conv(4, (3, 3), feature_group_count=2, name="grouped")(x)
    x = nn.Conv(4, (3, 3), padding="CIRCULAR", name="circular")(x)
    x = x.reshape(x.shape[0], -1)
    return nn.Dense(10, name="head")(inputs=x)


def test_uncovered_layers_fall_back_and_still_match(tmp_path):
  m = _Unusual()
  v = jax.device_get(m.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 2))))
  apply = models.from_linen(m, train_kwarg="train")
  manifest, exported, predict = _export(apply, v, tmp_path / "e",
                                        quantize=W8A8, input_shape=(8, 8, 2),
                                        int8_min_depth=1)
  assert manifest["int8_layers"] == ["plain", "head"]
  assert set(manifest["float_layers"]) == {"grouped", "circular"}
  x = np.random.default_rng(5).standard_normal((3, 8, 8, 2)).astype(np.float32)
  ref = np.asarray(compress.quantize_apply(apply, W8A8)(v, {"image": x}).logits)
  np.testing.assert_allclose(predict(x), ref, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------
# Accuracy kept on a tiny model trained on the real Fashion-MNIST.
# ---------------------------------------------------------------------------


def _fashion_mnist(n_train, n_test):
  from kdjax import data
  try:
    xtr, ytr = data.load_fashion_mnist_split("train")
    xte, yte = data.load_fashion_mnist_split("test")
  except FileNotFoundError as e:
    pytest.skip(f"real Fashion-MNIST not installed: {e}")
  norm = lambda a: ((a.astype(np.float32) / 255 - data.FASHION_MNIST_MEAN)  # noqa: E731
                    / data.FASHION_MNIST_STD)[..., None]
  return norm(xtr[:n_train]), ytr[:n_train], norm(xte[:n_test]), yte[:n_test]


def test_int8_export_keeps_the_accuracy_of_a_trained_mlp(tmp_path):
  xtr, ytr, xte, yte = _fashion_mnist(6000, 2000)
  m = models.MLP(hidden=(96,), num_classes=10)
  params = m.init(jax.random.PRNGKey(0), xtr[:1])["params"]
  opt = optax.adam(2e-3)
  state = opt.init(params)

  @jax.jit
  def step(p, s, xb, yb):
    g = jax.grad(lambda p: optax.softmax_cross_entropy_with_integer_labels(
        m.apply({"params": p}, xb), yb).mean())(p)
    u, s = opt.update(g, s, p)
    return optax.apply_updates(p, u), s

  for epoch in range(3):
    order = np.random.default_rng(epoch).permutation(len(xtr))
    for i in range(0, len(xtr), 128):
      params, state = step(params, state, xtr[order[i:i + 128]],
                           ytr[order[i:i + 128]])
  v = jax.device_get({"params": params})
  apply = models.from_linen(m, train_kwarg="train")
  float_pred = np.asarray(apply(v, {"image": xte}).logits).argmax(-1)
  manifest, _, predict = _export(apply, v, tmp_path / "e", quantize=W8A8)
  assert manifest["int8_layers"] == ["dense_0", "head"]
  int8_pred = predict(xte).argmax(-1)
  acc_float = 100 * np.mean(float_pred == yte)
  acc_int8 = 100 * np.mean(int8_pred == yte)
  assert acc_float > 78, acc_float            # it did learn
  assert abs(acc_int8 - acc_float) <= 1.0, (acc_float, acc_int8)
  assert np.mean(int8_pred == float_pred) >= 0.97
