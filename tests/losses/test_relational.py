"""Tests of kdjax.losses._relational: RKD, SP, PKT, CC."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.losses import _relational as R
from kdjax.losses._compose import compose
from kdjax.models import ModelOutput

RTOL = 1e-5
ATOL = 1e-7


def _rand(seed, *shape):
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def close(actual, expected, rtol=RTOL, atol=ATOL):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected,
                             rtol=rtol, atol=atol)


# -----------------------------------------------------------------------------
# Independent NumPy references (float64, loops over pairs / triplets).
# -----------------------------------------------------------------------------


def np_smooth_l1(x, delta=1.0):
  a = np.abs(x)
  return np.where(a <= delta, 0.5 * x * x, delta * (a - 0.5 * delta))


def np_rkd_distance(s, t):
  def psi(e):
    e = np.asarray(e, np.float64).reshape(len(e), -1)
    b = len(e)
    d = np.zeros((b, b))
    for i in range(b):
      for j in range(b):
        if i != j:
          d[i, j] = np.linalg.norm(e[i] - e[j])
    return d / (d.sum() / (b * (b - 1)))
  return np_smooth_l1(psi(s) - psi(t)).mean()


def np_rkd_angle(s, t):
  def psi(e):
    e = np.asarray(e, np.float64).reshape(len(e), -1)
    b = len(e)
    out = np.zeros((b, b, b))
    for i in range(b):
      for j in range(b):
        for k in range(b):
          u, v = e[j] - e[i], e[k] - e[i]
          if j != i and k != i:
            out[i, j, k] = u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
    return out
  return np_smooth_l1(psi(s) - psi(t)).mean()


def np_sp(s, t):
  def g(f):
    f = np.asarray(f, np.float64).reshape(len(f), -1)
    gram = f @ f.T
    return gram / np.linalg.norm(gram, axis=1, keepdims=True)
  b = len(s)
  return ((g(s) - g(t)) ** 2).sum() / b ** 2


def np_pkt(s, t, eps=1e-7):
  def cond(f):
    f = np.asarray(f, np.float64).reshape(len(f), -1)
    b = len(f)
    k = np.zeros((b, b))
    for i in range(b):
      for j in range(b):
        cos = f[i] @ f[j] / ((np.linalg.norm(f[i]) + eps) *
                             (np.linalg.norm(f[j]) + eps))
        k[i, j] = (cos + 1) / 2
    return k / k.sum(axis=1, keepdims=True)
  ps, pt = cond(s), cond(t)
  return (pt * np.log((pt + eps) / (ps + eps))).mean()


def np_cc_gaussian(s, t, gamma=0.4, order=2):
  def corr(f):
    f = np.asarray(f, np.float64).reshape(len(f), -1)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    b = len(f)
    c = np.zeros((b, b))
    for i in range(b):
      for j in range(b):
        x = f[i] @ f[j]
        c[i, j] = sum(math.exp(-2 * gamma) * (2 * gamma) ** p /
                      math.factorial(p) * x ** p for p in range(order + 1))
    return c
  return ((corr(s) - corr(t)) ** 2).mean()


def np_cc_exact_rbf(s, t, gamma=0.4):
  def corr(f):
    f = np.asarray(f, np.float64)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    d2 = ((f[:, None] - f[None]) ** 2).sum(-1)
    return np.exp(-gamma * d2)
  return ((corr(s) - corr(t)) ** 2).mean()


# -----------------------------------------------------------------------------
# Values against the references.
# -----------------------------------------------------------------------------

S = _rand(0, 5, 7)      # student embeddings [B, D_s]
T = _rand(1, 5, 4) * 3  # teacher embeddings [B, D_t], another width and scale


def test_pairwise_distances_match_numpy():
  d = R.pairwise_distances(S)
  expected = np.linalg.norm(S[:, None].astype(np.float64) - S[None], axis=-1)
  close(d, expected, rtol=1e-5, atol=1e-5)
  assert np.all(np.diag(np.asarray(d)) == 0)
  # float32 accuracy: a large common offset and duplicated examples
  close(R.pairwise_distances(S + 100.0), expected, rtol=1e-5, atol=1e-5)
  dup = R.pairwise_distances(np.concatenate([S, S[:1]], 0))
  assert float(dup[0, -1]) <= 1e-5 and float(dup[-1, 0]) <= 1e-5


def test_rkd_distance_matches_numpy():
  close(R.rkd_distance_loss(S, T), np_rkd_distance(S, T))
  # large differences exercise the linear branch of the Huber loss
  close(R.rkd_distance_loss(S, T, delta=0.01),
        _rkd_distance_delta(S, T, 0.01))


def _rkd_distance_delta(s, t, delta):
  def psi(e):
    e = np.asarray(e, np.float64)
    d = np.linalg.norm(e[:, None] - e[None], axis=-1)
    return d / (d.sum() / (len(e) * (len(e) - 1)))
  return np_smooth_l1(psi(s) - psi(t), delta).mean()


def test_rkd_distance_hand_computed():
  # student: points 0, 1, 3 on a line, distances {1, 3, 2} -> mean 2 ->
  # normalised {0.5, 1.5, 1}; teacher: an equilateral triangle -> all 1.
  s = jnp.array([[0.0], [1.0], [3.0]])
  t = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
  # off-diagonal diffs -0.5, 0.5, 0 (each twice) -> 4 * 0.125 / 9
  close(R.rkd_distance_loss(s, t), 4 * 0.125 / 9, rtol=1e-5)


def test_rkd_angle_matches_numpy():
  close(R.rkd_angle_loss(S, T), np_rkd_angle(S, T))


def test_similarity_preserving_matches_numpy_including_conv_features():
  close(R.similarity_preserving_loss(S, T), np_sp(S, T))
  conv_s, conv_t = _rand(2, 4, 3, 3, 2), _rand(3, 4, 2, 2, 5)
  close(R.similarity_preserving_loss(conv_s, conv_t), np_sp(conv_s, conv_t))


def test_pkt_matches_numpy():
  close(R.pkt_loss(S, T), np_pkt(S, T))


def test_cc_matches_numpy():
  close(R.correlation_congruence_loss(S, T), np_cc_gaussian(S, T))
  close(R.correlation_congruence_loss(S, T, gamma=0.7, order=3),
        np_cc_gaussian(S, T, gamma=0.7, order=3))

  def cos_gram(f):
    f = np.asarray(f, np.float64)
    f = f / np.linalg.norm(f, axis=1, keepdims=True)
    return f @ f.T
  close(R.correlation_congruence_loss(S, T, kernel="bilinear"),
        ((cos_gram(S) - cos_gram(T)) ** 2).mean())
  raw = lambda f: np.asarray(f, np.float64) @ np.asarray(f, np.float64).T
  close(R.correlation_congruence_loss(S, T, kernel="bilinear", normalize=False),
        ((raw(S) - raw(T)) ** 2).mean())


def test_cc_high_order_taylor_approaches_exact_rbf():
  close(R.correlation_congruence_loss(S, T, order=12), np_cc_exact_rbf(S, T),
        rtol=1e-4)


def test_cc_repdistiller_variant_matches_numpy():
  t = _rand(4, 5, 7)
  delta = np.abs(S.astype(np.float64) - t)
  expected = np.mean([(delta[i] * delta[i + 1]).sum() for i in range(4)])
  close(R.correlation_congruence_loss(S, t, kernel="repdistiller"), expected)
  with pytest.raises(ValueError, match="same width"):
    R.correlation_congruence_loss(S, T, kernel="repdistiller")


# -----------------------------------------------------------------------------
# Properties.
# -----------------------------------------------------------------------------


def test_rkd_distance_invariant_to_common_scaling():
  base = float(R.rkd_distance_loss(S, T))
  close(R.rkd_distance_loss(3.7 * S, T), base, rtol=1e-5)
  close(R.rkd_distance_loss(S, 0.05 * T), base, rtol=1e-5)
  assert float(R.rkd_distance_loss(S, 2.0 * S)) < 1e-10


def test_rkd_angle_invariant_to_scaling_and_translation():
  base = float(R.rkd_angle_loss(S, T))
  shift = _rand(5, 1, 7)
  close(R.rkd_angle_loss(2.5 * S + shift, T), base, rtol=1e-5)
  close(R.rkd_angle_loss(S, 0.3 * T - 4.0), base, rtol=1e-5)
  assert float(R.rkd_angle_loss(S, -3.0 * S + 1.0)) < 1e-10


def test_sp_zero_for_identical_batch_similarity():
  assert float(R.similarity_preserving_loss(S, S)) < 1e-12
  assert float(R.similarity_preserving_loss(S, 4.0 * S)) < 1e-12
  # an orthogonal change of basis (and width) keeps G = F F^T
  q, _ = np.linalg.qr(_rand(6, 9, 9).astype(np.float64))
  rotated = np.concatenate([S, np.zeros((5, 2), np.float32)], 1) @ q
  assert float(R.similarity_preserving_loss(S, rotated)) < 1e-10
  assert float(R.similarity_preserving_loss(S, T)) > 1e-3


def test_pkt_non_negative_and_zero_for_equal_inputs():
  for seed in range(5):
    s, t = _rand(10 + seed, 6, 3), _rand(20 + seed, 6, 8)
    assert float(R.pkt_loss(s, t)) >= 0.0
  assert abs(float(R.pkt_loss(S, S))) < 1e-9
  assert abs(float(R.pkt_loss(S, 7.0 * S))) < 1e-7


def test_cc_zero_for_equal_inputs():
  assert float(R.correlation_congruence_loss(S, S)) < 1e-12
  assert float(R.correlation_congruence_loss(S, T)) > 1e-4


# -----------------------------------------------------------------------------
# Errors, jit, grads, bfloat16.
# -----------------------------------------------------------------------------

ALL = [R.rkd_distance_loss, R.rkd_angle_loss, R.similarity_preserving_loss,
       R.pkt_loss, R.correlation_congruence_loss]


@pytest.mark.parametrize("fn", ALL)
def test_batch_mismatch_raises(fn):
  with pytest.raises(ValueError, match="batch"):
    fn(jnp.ones((4, 3)), jnp.ones((5, 3)))


def test_other_errors():
  with pytest.raises(ValueError, match="at least 2"):
    R.rkd_distance_loss(jnp.ones((1, 3)), jnp.ones((1, 3)))
  with pytest.raises(ValueError, match="kernel must be"):
    R.correlation_congruence_loss(S, T, kernel="poly")
  with pytest.raises(ValueError, match="order"):
    R.correlation_congruence_loss(S, T, order=-1)


def test_jit_equals_eager_grads_finite_bfloat16():
  # duplicated rows: zero off-diagonal distances and zero difference vectors
  s = np.concatenate([S, S[:1]], 0)
  t = np.concatenate([T, T[:1]], 0)
  for fn in ALL:
    eager = fn(s, t)
    close(jax.jit(fn)(s, t), float(eager), rtol=1e-5, atol=1e-8)
    gs, gt = jax.grad(fn, argnums=(0, 1))(jnp.asarray(s), jnp.asarray(t))
    assert np.all(np.isfinite(np.asarray(gs))), fn.__name__
    assert np.all(np.isfinite(np.asarray(gt))), fn.__name__
    assert float(jnp.abs(gs).sum()) > 0, fn.__name__
    low = fn(jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16))
    assert low.dtype == jnp.float32 and np.isfinite(float(low)), fn.__name__
    close(low, float(eager), rtol=0.1, atol=1e-4)


def test_grads_finite_for_zero_embeddings():
  z = jnp.zeros((3, 4))
  for fn in ALL:
    g = jax.grad(fn)(z, jnp.asarray(T[:3]))
    assert np.all(np.isfinite(np.asarray(g))), fn.__name__


def test_vmap_over_groups():
  s, t = _rand(30, 2, 4, 3), _rand(31, 2, 4, 5)
  out = jax.vmap(R.rkd_distance_loss)(s, t)
  close(out, [np_rkd_distance(s[0], t[0]), np_rkd_distance(s[1], t[1])])


# -----------------------------------------------------------------------------
# Terms.
# -----------------------------------------------------------------------------


def _outputs(s_feats, t_feats):
  b = next(iter(s_feats.values())).shape[0]
  as_jnp = lambda feats: {k: jnp.asarray(v) for k, v in feats.items()}
  return (ModelOutput(jnp.zeros((b, 3)), as_jnp(s_feats)),
          ModelOutput(jnp.zeros((b, 3)), as_jnp(t_feats)))


def test_relational_terms_by_callable_and_by_name():
  student, teacher = _outputs({"penultimate": S}, {"penultimate": T, "emb": S})
  loss_fn = compose([
      R.relational_term("rkd_d", R.rkd_distance_loss, weight=25.0),
      R.relational_term("rkd_a", "rkd_angle", weight=50.0),
      R.relational_term("cc", "cc", teacher_feature="emb", gamma=0.7),
  ])
  total, aux = jax.jit(lambda s, t: loss_fn(s, t, {}))(student, teacher)
  d, a = np_rkd_distance(S, T), np_rkd_angle(S, T)
  close(aux.terms["rkd_d"], d)
  close(aux.terms["rkd_a"], a)
  assert float(aux.terms["cc"]) < 1e-12  # teacher "emb" is the student itself
  close(total, 25 * d + 50 * a + float(aux.terms["cc"]), rtol=1e-5)
  with pytest.raises(ValueError, match="unknown relational loss"):
    R.relational_term("x", "crd")


def test_relational_term_missing_feature_lists_names():
  student, teacher = _outputs({"penultimate": S, "block_0": S},
                              {"logits_emb": T})
  with pytest.raises(KeyError,
                     match=r"teacher.*'penultimate'.*\['logits_emb'\]"):
    compose([R.relational_term("sp", "sp")])(student, teacher, {})
  with pytest.raises(KeyError,
                     match=r"student.*'emb'.*\['block_0', 'penultimate'\]"):
    loss_fn = compose([R.relational_term(
        "sp", "sp", student_feature="emb", teacher_feature="logits_emb")])
    loss_fn(student, teacher, {})
