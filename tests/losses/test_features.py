"""Tests of kdjax.losses._features: FitNets, AT, feature MSE/cosine."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.losses import _features as F
from kdjax.losses._compose import compose
from kdjax.models import ModelOutput

RTOL = 1e-5
ATOL = 1e-7


def _rand(seed, *shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


# -----------------------------------------------------------------------------
# Independent NumPy references (float64, explicit loops where it helps).
# -----------------------------------------------------------------------------


def np_adaptive_pool_axis(x, axis, m):
  """PyTorch adaptive average pooling of one axis, with explicit bin loops."""
  n = x.shape[axis]
  x = np.moveaxis(np.asarray(x, np.float64), axis, 0)
  out = []
  for i in range(m):
    start = int(math.floor(i * n / m))
    end = int(math.ceil((i + 1) * n / m))
    out.append(x[start:end].mean(axis=0))
  return np.moveaxis(np.stack(out), 0, axis)


def np_pool_to(x, sizes):
  for axis, m in enumerate(sizes, start=1):
    if x.shape[axis] != m:
      x = np_adaptive_pool_axis(x, axis, m)
  return np.asarray(x, np.float64)


def np_at(x, p):
  x = np.asarray(x, np.float64)
  q = (np.abs(x) ** p).sum(axis=-1).reshape(x.shape[0], -1)  # paper: sum_c
  return q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)


def np_at_loss(s, t, p=2):
  sizes = [min(a, b) for a, b in zip(s.shape[1:-1], t.shape[1:-1])]
  s, t = np_pool_to(s, sizes), np_pool_to(t, sizes)
  return ((np_at(s, p) - np_at(t, p)) ** 2).mean()


def np_cosine(u, v, eps=1e-8):
  u = np.asarray(u, np.float64)
  v = np.asarray(v, np.float64)
  nu = np.maximum(np.sqrt((u * u).sum(-1, keepdims=True)), eps)
  nv = np.maximum(np.sqrt((v * v).sum(-1, keepdims=True)), eps)
  return ((u / nu) * (v / nv)).sum(-1)


def close(actual, expected, rtol=RTOL, atol=ATOL):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected,
                             rtol=rtol, atol=atol)


# -----------------------------------------------------------------------------
# Pooling.
# -----------------------------------------------------------------------------


def test_adaptive_avg_pool_hand_computed():
  x = jnp.arange(1.0, 6.0).reshape(1, 5, 1)  # [B, L, C]
  # bins of 5 -> 3: [0, 2), [1, 4), [3, 5)
  close(F.adaptive_avg_pool(x, [3])[0, :, 0], [1.5, 3.0, 4.5])
  close(F.adaptive_avg_pool(x, [1])[0, :, 0], [3.0])


def test_adaptive_avg_pool_matches_loop_reference():
  x = _rand(0, 2, 7, 6, 3)
  close(F.adaptive_avg_pool(x, [3, 4]), np_pool_to(x, [3, 4]))


def test_adaptive_avg_pool_refuses_to_grow():
  with pytest.raises(ValueError, match="only shrinks"):
    F.adaptive_avg_pool(jnp.ones((1, 2, 2, 1)), [4, 2])


# -----------------------------------------------------------------------------
# Attention transfer.
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("p", [2, 3])
def test_attention_map_matches_numpy(p):
  x = _rand(1, 3, 4, 5, 6)
  q = F.attention_map(x, p)
  assert q.shape == (3, 20) and q.dtype == jnp.float32
  close(q, np_at(x, p))
  close(np.linalg.norm(q, axis=1), np.ones(3))


def test_attention_map_hand_computed():
  # one example, 1x2 map, one channel: |A|^2 = [3, 4] -> [3, 4] / 5
  x = jnp.array([math.sqrt(3.0), -2.0]).reshape(1, 1, 2, 1)
  close(F.attention_map(x), [[0.6, 0.8]], rtol=1e-6)


@pytest.mark.parametrize("s_shape,t_shape", [
    ((3, 4, 4, 5), (3, 4, 4, 7)),   # same spatial size, channels differ
    ((3, 8, 8, 5), (3, 4, 4, 7)),   # student larger
    ((3, 4, 3, 5), (3, 6, 5, 2)),   # teacher larger, non-divisible bins
])
def test_attention_transfer_matches_numpy(s_shape, t_shape):
  s, t = _rand(2, *s_shape), _rand(3, *t_shape)
  close(F.attention_transfer_loss(s, t), np_at_loss(s, t))
  close(F.attention_transfer_loss(s, t, p=3), np_at_loss(s, t, p=3))


def test_attention_transfer_reduction_and_mask():
  s, t = _rand(4, 4, 3, 3, 2), _rand(5, 4, 3, 3, 5)
  per_example = ((np_at(s, 2) - np_at(t, 2)) ** 2).mean(axis=1)
  close(F.attention_transfer_loss(s, t, reduction="none"), per_example)
  close(F.attention_transfer_loss(s, t, reduction="sum"), per_example.sum())
  mask = np.array([1, 0, 1, 1], bool)
  close(F.attention_transfer_loss(s, t, mask=mask), per_example[mask].mean())
  with pytest.raises(ValueError, match="mask"):
    F.attention_transfer_loss(s, t, mask=np.ones((4, 3)))


def test_attention_transfer_properties():
  s = _rand(6, 2, 4, 4, 3)
  # zero when the maps agree: equal features, a positive scaling, and a
  # teacher with the student's channels repeated (same channel mean).
  assert float(F.attention_transfer_loss(s, s)) == 0.0
  assert float(F.attention_transfer_loss(s, 5.0 * s)) < 1e-12
  repeated = np.concatenate([s, s], -1)
  assert float(F.attention_transfer_loss(0.1 * s, repeated)) < 1e-12
  # not zero for different features
  assert float(F.attention_transfer_loss(s, _rand(7, 2, 4, 4, 3))) > 1e-4


def test_attention_transfer_rejects_flat_features():
  with pytest.raises(ValueError, match=r"\[B, \*spatial, C\]"):
    F.attention_transfer_loss(jnp.ones((2, 4)), jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="attention_map needs"):
    F.attention_map(jnp.ones((2, 4)))


# -----------------------------------------------------------------------------
# Feature MSE / cosine / FitNets.
# -----------------------------------------------------------------------------


def test_feature_mse_matches_numpy_and_reductions():
  s, t = _rand(8, 4, 3, 3, 5), _rand(9, 4, 3, 3, 5)
  d2 = (s.astype(np.float64) - t) ** 2
  close(F.feature_mse(s, t), d2.mean())
  close(F.feature_mse(s, t, reduction="none"), d2.mean(axis=(1, 2, 3)))
  close(F.feature_mse(s, t, reduction="sum"), d2.mean(axis=(1, 2, 3)).sum())
  w = np.array([1.0, 0.0, 2.0, 1.0], np.float32)
  per = d2.mean(axis=(1, 2, 3))
  close(F.feature_mse(s, t, mask=w), (per * w).sum() / w.sum())
  # a [B, H] prefix mask averages the remaining positions
  m2 = np.zeros((4, 3), bool)
  m2[:, 0] = True
  close(F.feature_mse(s, t, mask=m2), d2[:, 0].mean())


def test_feature_mse_pooling_matches_numpy():
  s, t = _rand(10, 2, 6, 6, 4), _rand(11, 2, 3, 3, 4)
  gs, gt = s.astype(np.float64).mean(axis=(1, 2)), t.mean(axis=(1, 2))
  close(F.feature_mse(s, t, pooling="global"), ((gs - gt) ** 2).mean())
  close(F.feature_mse(s, t, pooling="spatial"),
        ((np_pool_to(s, [3, 3]) - t) ** 2).mean())
  # pooling of [B, D] features is a no-op
  a, b = _rand(12, 3, 4), _rand(13, 3, 4)
  close(F.feature_mse(a, b, pooling="global"),
        ((a.astype(np.float64) - b) ** 2).mean())


def test_feature_cosine_distance_matches_numpy_and_hand_cases():
  s, t = _rand(14, 3, 2, 2, 5), _rand(15, 3, 2, 2, 5)
  close(F.feature_cosine_distance(s, t), (1 - np_cosine(s, t)).mean())
  close(F.feature_cosine_distance(s, t, reduction="none"),
        (1 - np_cosine(s, t)).mean(axis=(1, 2)))
  close(F.feature_cosine_distance(s, t, pooling="global"),
        (1 - np_cosine(s.mean(axis=(1, 2)), t.mean(axis=(1, 2)))).mean())
  u = jnp.array([[1.0, 0.0], [1.0, 1.0], [2.0, 0.0]])
  v = jnp.array([[0.0, 3.0], [-2.0, -2.0], [0.5, 0.0]])
  close(F.feature_cosine_distance(u, v, reduction="none"), [1.0, 2.0, 0.0],
        atol=1e-6)
  # a zero vector gives cos = 0 (distance 1), not NaN
  close(F.feature_cosine_distance(jnp.zeros((1, 2)), jnp.ones((1, 2))), 1.0)


@pytest.mark.parametrize("s_shape,t_shape,kernel_shape", [
    ((3, 4), (3, 6), (4, 6)),                  # dense
    ((2, 3, 3, 4), (2, 3, 3, 5), (1, 1, 4, 5)),  # 1x1 conv
])
def test_fitnets_with_connector_matches_numpy(s_shape, t_shape, kernel_shape):
  s, t = _rand(16, *s_shape), _rand(17, *t_shape)
  connector = F.Connector(t_shape[-1])
  params = connector.init(jax.random.PRNGKey(0), s)["params"]
  kernel = np.asarray(params["proj"]["kernel"], np.float64)
  assert kernel.shape == kernel_shape
  bias = np.random.default_rng(18).normal(size=t_shape[-1])
  params = {"proj": {"kernel": params["proj"]["kernel"],
                     "bias": jnp.asarray(bias, jnp.float32)}}
  kernel = kernel.reshape(s_shape[-1], t_shape[-1])
  regressed = s.astype(np.float64) @ kernel + bias
  expected = ((regressed - t) ** 2).mean()
  close(F.fitnets_hint_loss(s, t, connector=connector, connector_params=params),
        expected, rtol=1e-5)
  # full variables mapping accepted too
  close(F.fitnets_hint_loss(s, t, connector=connector,
                            connector_params={"params": params}), expected,
        rtol=1e-5)
  # a plain callable connector fn(params, x)
  close(F.fitnets_hint_loss(
      s, t, connector=lambda p, x: connector.apply({"params": p}, x),
      connector_params=params), expected, rtol=1e-5)


def test_fitnets_without_connector_is_plain_mse():
  s, t = _rand(19, 3, 4), _rand(20, 3, 4)
  close(F.fitnets_hint_loss(s, t), ((s.astype(np.float64) - t) ** 2).mean())


def test_incompatible_features_without_connector_raise():
  with pytest.raises(ValueError, match=r"widths differ \(4 vs 6\).*connector"):
    F.fitnets_hint_loss(jnp.ones((3, 4)), jnp.ones((3, 6)))
  with pytest.raises(ValueError, match=r"ranks differ \(4 vs 2\).*connector"):
    F.fitnets_hint_loss(jnp.ones((3, 2, 2, 4)), jnp.ones((3, 4)))
  with pytest.raises(ValueError, match="spatial sizes differ.*pooling"):
    F.feature_mse(jnp.ones((3, 4, 4, 2)), jnp.ones((3, 2, 2, 2)))
  with pytest.raises(ValueError, match="batch sizes differ"):
    F.feature_cosine_distance(jnp.ones((3, 2)), jnp.ones((4, 2)))
  connector = F.Connector(5)
  params = connector.init(jax.random.PRNGKey(0), jnp.ones((3, 4)))["params"]
  with pytest.raises(ValueError, match="after the connector"):
    F.fitnets_hint_loss(jnp.ones((3, 4)), jnp.ones((3, 6)), connector=connector,
                        connector_params=params)
  with pytest.raises(ValueError, match="connector_params"):
    F.fitnets_hint_loss(jnp.ones((3, 4)), jnp.ones((3, 5)), connector=connector)
  with pytest.raises(ValueError, match="mask shape"):
    F.feature_mse(jnp.ones((3, 4)), jnp.ones((3, 4)), mask=jnp.ones((4,)))
  with pytest.raises(ValueError, match="pooling must be"):
    F.feature_mse(jnp.ones((3, 4)), jnp.ones((3, 4)), pooling="max")
  with pytest.raises(ValueError, match="Connector kind"):
    F.Connector(3, kind="mlp").init(jax.random.PRNGKey(0), jnp.ones((2, 4)))


# -----------------------------------------------------------------------------
# jit, grad, vmap, bfloat16.
# -----------------------------------------------------------------------------


def _all_losses():
  s, t = _rand(21, 2, 4, 4, 3), _rand(22, 2, 2, 2, 5)
  connector = F.Connector(5)
  cp = connector.init(jax.random.PRNGKey(1), s)["params"]  # 1x1 conv
  dp = connector.init(jax.random.PRNGKey(2), s[:, 0, 0])["params"]  # dense
  return [
      (lambda a, b: F.attention_transfer_loss(a, b), s, t),
      (lambda a, b: F.feature_mse(a, b, pooling="spatial", connector=connector,
                                  connector_params=cp), s, t),
      (lambda a, b: F.feature_cosine_distance(a, b, pooling="global",
                                              connector=connector,
                                              connector_params=dp), s, t),
      (lambda a, b: F.fitnets_hint_loss(a, b), s, s[::-1] * 0.5),
  ]


def test_jit_equals_eager_and_grads_finite():
  for fn, s, t in _all_losses():
    eager = fn(s, t)
    close(jax.jit(fn)(s, t), np.asarray(eager, np.float64), rtol=1e-6)
    g = jax.grad(fn)(jnp.asarray(s), jnp.asarray(t))
    assert np.all(np.isfinite(np.asarray(g))) and float(jnp.abs(g).sum()) > 0


def test_grads_finite_at_zero_features():
  zeros = jnp.zeros((2, 3, 3, 2))
  for fn in (F.attention_transfer_loss, F.feature_cosine_distance):
    g = jax.grad(fn)(zeros, jnp.ones((2, 3, 3, 2)))
    assert np.all(np.isfinite(np.asarray(g)))


def test_bfloat16_inputs_give_finite_float32():
  for fn, s, t in _all_losses():
    out = fn(jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16))
    assert out.dtype == jnp.float32 and np.isfinite(float(out))
    close(out, np.asarray(fn(s, t), np.float64), rtol=5e-2, atol=1e-3)


def test_vmap_over_a_group_axis():
  s, t = _rand(23, 2, 3, 2, 2, 4), _rand(24, 2, 3, 2, 2, 4)
  out = jax.vmap(F.attention_transfer_loss)(s, t)
  close(out, [np_at_loss(s[0], t[0]), np_at_loss(s[1], t[1])])


# -----------------------------------------------------------------------------
# Terms.
# -----------------------------------------------------------------------------


def _outputs(s_feats, t_feats):
  logits = jnp.zeros((next(iter(s_feats.values())).shape[0], 3))
  return (ModelOutput(logits, {k: jnp.asarray(v) for k, v in s_feats.items()}),
          ModelOutput(logits, {k: jnp.asarray(v) for k, v in t_feats.items()}))


def test_fitnets_term_init_params_and_connector_gradient():
  student, teacher = _outputs({"block_0": _rand(25, 2, 4, 4, 3)},
                              {"block_1": _rand(26, 2, 4, 4, 6)})
  batch = {"label": jnp.zeros((2,), jnp.int32)}
  loss_fn = compose([F.fitnets_term("hint", "block_0", "block_1", 100.0)])
  params = loss_fn.init_params(jax.random.PRNGKey(0), student, teacher, batch)
  assert params["hint"]["proj"]["kernel"].shape == (1, 1, 3, 6)

  def total(p):
    return loss_fn(student, teacher, batch, params=p)[0]

  value, grads = jax.jit(jax.value_and_grad(total))(params)
  connector = F.Connector(6)
  expected = 100.0 * F.fitnets_hint_loss(
      student.features["block_0"], teacher.features["block_1"],
      connector=connector, connector_params=params["hint"])
  close(value, float(expected), rtol=1e-6)
  kernel_grad = np.asarray(grads["hint"]["proj"]["kernel"])
  assert np.all(np.isfinite(kernel_grad)) and np.abs(kernel_grad).sum() > 0
  # forgetting the params gives a clear error
  with pytest.raises(ValueError, match="init_params"):
    loss_fn(student, teacher, batch)


def test_feature_term_global_pooling_dense_connector_and_mask():
  student, teacher = _outputs({"b": _rand(27, 3, 4, 4, 2)},
                              {"b": _rand(28, 3, 2, 2, 5)})
  batch = {"mask": jnp.array([1.0, 1.0, 0.0])}
  term = F.feature_term("feat", "b", "b", kind="cosine", pooling="global",
                        connector_kind="auto", weight=2.0)
  loss_fn = compose([term])
  params = loss_fn.init_params(jax.random.PRNGKey(3), student, teacher, batch)
  assert params["feat"]["proj"]["kernel"].shape == (2, 5)  # dense after pooling
  total, aux = loss_fn(student, teacher, batch, params=params)
  k = np.asarray(params["feat"]["proj"]["kernel"], np.float64)
  b = np.asarray(params["feat"]["proj"]["bias"], np.float64)
  s = np.asarray(student.features["b"], np.float64).mean(axis=(1, 2)) @ k + b
  t = np.asarray(teacher.features["b"], np.float64).mean(axis=(1, 2))
  expected = (1 - np_cosine(s, t))[:2].mean()
  close(aux.terms["feat"], expected)
  close(total, 2 * expected)


def test_feature_term_incompatible_shapes_name_the_features():
  student, teacher = _outputs({"a": _rand(29, 2, 4)}, {"z": _rand(30, 2, 6)})
  loss_fn = compose([F.feature_term("feat", "a", "z")])
  with pytest.raises(ValueError, match=r"'feat'.*'a'.*'z'.*widths differ"):
    loss_fn(student, teacher, {})


def test_attention_transfer_term_sums_pairs():
  s0, s1 = _rand(31, 2, 4, 4, 3), _rand(32, 2, 2, 2, 3)
  t0, t1 = _rand(33, 2, 4, 4, 5), _rand(34, 2, 4, 4, 5)
  student, teacher = _outputs({"s0": s0, "s1": s1}, {"t0": t0, "t1": t1})
  loss_fn = compose([F.attention_transfer_term(
      "at", [("s0", "t0"), ("s1", "t1")], weight=1000.0)])
  total, aux = loss_fn(student, teacher, {})
  expected = np_at_loss(s0, t0) + np_at_loss(s1, t1)
  close(aux.terms["at"], expected)
  close(total, 1000.0 * expected)
  with pytest.raises(ValueError, match="pairs"):
    F.attention_transfer_term("at", [])


@pytest.mark.parametrize("make_term", [
    lambda s, t: F.fitnets_term("x", s, t),
    lambda s, t: F.feature_term("x", s, t),
    lambda s, t: F.attention_transfer_term("x", [(s, t)]),
])
def test_missing_feature_lists_available_names(make_term):
  student, teacher = _outputs({"block_0": _rand(35, 2, 2, 2, 2),
                               "penultimate": _rand(36, 2, 4)},
                              {"block_0": _rand(37, 2, 2, 2, 2)})
  loss_fn = compose([make_term("nope", "block_0")])
  with pytest.raises(KeyError,
                     match=r"student.*'nope'.*\['block_0', 'penultimate'\]"):
    loss_fn.init_params(jax.random.PRNGKey(0), student, teacher, {})
    loss_fn(student, teacher, {})
  loss_fn = compose([make_term("block_0", "missing")])
  with pytest.raises(KeyError, match=r"teacher.*'missing'.*\['block_0'\]"):
    loss_fn.init_params(jax.random.PRNGKey(0), student, teacher, {})
    loss_fn(student, teacher, {})
