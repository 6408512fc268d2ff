"""Tests of the sparse (top-k) teacher: ``top_k_teacher`` and ``top_k_divergence``.

NumPy (float64) references built from the definitions: the teacher keeps its k
largest logits; with a tail bucket both distributions get a (k+1)-th entry
holding the mass outside those k classes (teacher: ``1 - sum_i p_i`` with the
full-vocabulary normaliser; student: ``1 - sum_i q_{idx_i}``), without it both
are renormalised over the k classes.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses

V = 7
K = 3
SHAPES = [(4, V), (2, 3, V)]
ATOL = RTOL = 1e-5
KW = {"beta": 0.3, "alpha": 0.2}


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  z = x - np.max(x, axis=-1, keepdims=True)
  return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def np_kl(p, q):
  with np.errstate(divide="ignore", invalid="ignore"):
    return np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0).sum(-1)


def np_divergence(kind, p, q, beta, alpha):
  """Divergence between teacher probabilities p and student q (last axis)."""
  if kind == "kl":
    return np_kl(p, q)
  if kind == "reverse_kl":
    return np_kl(q, p)
  if kind == "jsd":
    m = beta * p + (1 - beta) * q
    return beta * np_kl(p, m) + (1 - beta) * np_kl(q, m)
  if kind == "skew_kl":
    return np_kl(p, alpha * p + (1 - alpha) * q)
  if kind == "skew_reverse_kl":
    return np_kl(q, alpha * q + (1 - alpha) * p)
  if kind == "tvd":
    return 0.5 * np.abs(p - q).sum(-1)
  if kind == "soft_ce":
    return -np.where(p > 0, p * np.log(q), 0.0).sum(-1)
  raise ValueError(kind)


def _scale(kind, temperature):
  return 1.0 if kind == "tvd" else temperature**2


def np_top_k(t, k):
  idx = np.argsort(-t, axis=-1)[..., :k]
  return np.take_along_axis(t, idx, -1), idx


def np_top_k_divergence(kind, s, t, k, temperature, tail):
  values, idx = np_top_k(np.asarray(t, np.float64), k)
  q_full = np.exp(np_log_softmax(s / temperature))
  q = np.take_along_axis(q_full, idx, -1)
  if tail:
    x = np.asarray(t, np.float64) / temperature
    m = x.max(-1, keepdims=True)
    lse = m + np.log(np.exp(x - m).sum(-1, keepdims=True))
    p = np.exp(values / temperature - lse)
    p = np.concatenate([p, 1 - p.sum(-1, keepdims=True)], -1)
    q = np.concatenate([q, 1 - q.sum(-1, keepdims=True)], -1)
  else:
    p = np.exp(np_log_softmax(values / temperature))
    q = q / q.sum(-1, keepdims=True)
  return np_divergence(kind, p, q, **KW) * _scale(kind, temperature)


def np_dense(kind, s, t, temperature):
  p = np.exp(np_log_softmax(t / temperature))
  q = np.exp(np_log_softmax(s / temperature))
  return np_divergence(kind, p, q, **KW) * _scale(kind, temperature)


def _data(shape, seed=0, scale=2.0):
  rng = np.random.default_rng(seed)
  s = (scale * rng.standard_normal(shape)).astype(np.float32)
  t = (scale * rng.standard_normal(shape)).astype(np.float32)
  return s, t


def test_top_k_teacher_matches_numpy():
  _, t = _data((2, 3, V), seed=1)
  teacher = losses.top_k_teacher(t, K, temperature=2.0)
  values, idx = np_top_k(t, K)
  np.testing.assert_array_equal(teacher.indices, idx)
  np.testing.assert_allclose(teacher.values, values, rtol=1e-6)
  lse = np.log(np.exp(t.astype(np.float64) / 2.0).sum(-1))
  np.testing.assert_allclose(teacher.logsumexp, lse, rtol=1e-6)
  assert float(teacher.temperature) == 2.0
  assert teacher.values.shape == teacher.indices.shape == (2, 3, K)


@pytest.mark.parametrize("shape", SHAPES, ids=["BC", "BLC"])
@pytest.mark.parametrize("kind", losses.DIVERGENCES)
def test_full_k_with_tail_equals_dense(kind, shape):
  s, t = _data(shape, seed=2)
  temperature = 2.0
  teacher = losses.top_k_teacher(t, V, temperature)
  got = losses.top_k_divergence(s, teacher, temperature, divergence=kind,
                                reduction="none", **KW)
  np.testing.assert_allclose(got, np_dense(kind, s, t, temperature),
                             rtol=RTOL, atol=ATOL)
  dense = losses.logit_divergence(s, t, temperature, divergence=kind,
                                  reduction="none", **KW)
  np.testing.assert_allclose(got, dense, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("tail", [True, False], ids=["tail", "renorm"])
@pytest.mark.parametrize("shape", SHAPES, ids=["BC", "BLC"])
@pytest.mark.parametrize("kind", losses.DIVERGENCES)
def test_top_k_matches_reference(kind, shape, tail):
  s, t = _data(shape, seed=3)
  temperature = 1.5
  teacher = losses.top_k_teacher(t, K, temperature)
  ref = np_top_k_divergence(kind, s, t, K, temperature, tail)
  for reduction, expected in (("none", ref), ("mean", ref.mean()),
                              ("sum", ref.sum())):
    got = losses.top_k_divergence(s, teacher, temperature, divergence=kind,
                                  tail_bucket=tail, reduction=reduction, **KW)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL,
                               err_msg=reduction)


def test_tail_mass_reference():
  # Hand check of the tail bucket: the teacher's tail is the mass of the
  # V - k classes it dropped; KL over (k + 1) buckets.
  s = np.array([[0.0, 1.0, 2.0, 3.0]], np.float32)
  t = np.array([[3.0, 2.0, 1.0, 0.0]], np.float32)
  teacher = losses.top_k_teacher(t, 2)
  p = np.exp(t[0].astype(np.float64)) / np.exp(t[0].astype(np.float64)).sum()
  q = np.exp(s[0].astype(np.float64)) / np.exp(s[0].astype(np.float64)).sum()
  p3 = np.array([p[0], p[1], p[2] + p[3]])
  q3 = np.array([q[0], q[1], q[2] + q[3]])
  np.testing.assert_allclose(losses.top_k_divergence(s, teacher),
                             (p3 * np.log(p3 / q3)).sum(), rtol=1e-6)


def test_temperature_mismatch_with_tail_raises():
  s, t = _data((4, V), seed=4)
  teacher = losses.top_k_teacher(t, K, temperature=2.0)
  with pytest.raises(ValueError, match=r"temperature 2\.0 .* temperature 1\.0"):
    losses.top_k_divergence(s, teacher, 1.0)
  # Fine without the tail bucket (renormalised over the top-k only).
  np.testing.assert_allclose(
      losses.top_k_divergence(s, teacher, 1.0, tail_bucket=False),
      np_top_k_divergence("kl", s, t, K, 1.0, tail=False).mean(), rtol=RTOL)
  no_lse = losses.TopKTeacher(teacher.values, teacher.indices)
  with pytest.raises(ValueError, match="needs teacher.logsumexp"):
    losses.top_k_divergence(s, no_lse, 2.0)


def test_errors():
  s, t = _data((4, V), seed=5)
  teacher = losses.top_k_teacher(t, K)
  for bad_k in (0, V + 1):
    with pytest.raises(ValueError, match=r"k must lie in \[1, 7\]"):
      losses.top_k_teacher(t, bad_k)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    losses.top_k_teacher(t, K, temperature=0.0)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    losses.top_k_divergence(s, teacher, -1.0, tail_bucket=False)
  # Teacher built on a larger vocabulary than the student's.
  big = losses.top_k_teacher(np.arange(2 * V, dtype=np.float32)[None]
                             .repeat(4, 0), K)
  with pytest.raises(ValueError, match="class-count mismatch"):
    losses.top_k_divergence(s, big)
  with pytest.raises(ValueError, match="k=7 entries but the student has only 5"):
    losses.top_k_divergence(s[:, :5], losses.top_k_teacher(t, V))
  with pytest.raises(ValueError, match="shape mismatch"):
    losses.top_k_divergence(s[:2], teacher)
  with pytest.raises(ValueError, match="must have the same shape"):
    losses.top_k_divergence(
        s, teacher._replace(indices=teacher.indices[..., :2]))
  with pytest.raises(ValueError, match="unknown divergence"):
    losses.top_k_divergence(s, teacher, divergence="chi2")
  with pytest.raises(ValueError, match=r"beta .*\[0, 1\]"):
    losses.top_k_divergence(s, teacher, divergence="jsd", beta=2.0)
  with pytest.raises(ValueError, match=r"alpha .*\[0, 1\]"):
    losses.top_k_divergence(s, teacher, divergence="skew_kl", alpha=-0.5)
  with pytest.raises(ValueError, match="mask shape"):
    losses.top_k_divergence(s, teacher, mask=np.ones((3,), bool))
  with pytest.raises(ValueError, match="reduction must be one of"):
    losses.top_k_divergence(s, teacher, reduction="mode")


def test_jit_eager_grad_vmap_and_pytree():
  s, t = _data((2, 3, V), seed=6)
  teacher = losses.top_k_teacher(t, K, 2.0)
  fn = lambda a, tk, temp: losses.top_k_divergence(  # pylint: disable=g-long-lambda
      a, tk, temp, divergence="jsd", beta=0.5)
  eager = fn(s, teacher, 2.0)
  # TopKTeacher is a pytree argument; the temperature is traced under jit.
  value, grad = jax.jit(jax.value_and_grad(fn))(s, teacher, 2.0)
  np.testing.assert_allclose(value, eager, rtol=1e-6)
  assert np.all(np.isfinite(grad))
  # Gradient only reaches the student's top-k classes and, through the tail
  # bucket, every class.
  assert np.all(np.asarray(grad) != 0)
  batched = losses.top_k_divergence(s, teacher, 2.0, reduction="none")
  mapped = jax.vmap(
      lambda a, tk: losses.top_k_divergence(a, tk, 2.0, reduction="none"),
      in_axes=(0, losses.TopKTeacher(0, 0, 0, None)))(s, teacher)
  np.testing.assert_allclose(mapped, batched, rtol=1e-6, atol=1e-6)


def test_masks():
  s, t = _data((2, 3, V), seed=7)
  teacher = losses.top_k_teacher(t, K)
  mask = np.array([[1, 0, 1], [0, 0, 1]], bool)
  ref = np_top_k_divergence("kl", s, t, K, 1.0, tail=True)
  np.testing.assert_allclose(losses.top_k_divergence(s, teacher, mask=mask),
                             ref[mask].mean(), rtol=RTOL)
  np.testing.assert_allclose(
      losses.top_k_divergence(s, teacher, mask=mask, reduction="sum"),
      ref[mask].sum(), rtol=RTOL)
  zeros = np.zeros((2, 3), bool)
  value, grad = jax.jit(jax.value_and_grad(
      lambda a, tk, m: losses.top_k_divergence(a, tk, mask=m)))(s, teacher,
                                                               zeros)
  assert float(value) == 0.0 and np.all(np.asarray(grad) == 0)


def test_bfloat16_inputs():
  s, t = _data((2, 3, V), seed=8, scale=1.0)
  s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  teacher16 = losses.top_k_teacher(t16, K)
  assert teacher16.values.dtype == jnp.float32
  value_and_grad = jax.jit(jax.value_and_grad(losses.top_k_divergence))
  value, grad = value_and_grad(s16, teacher16)
  assert value.dtype == jnp.float32 and np.isfinite(value)
  assert grad.dtype == jnp.bfloat16
  assert np.all(np.isfinite(np.asarray(grad, np.float32)))
  np.testing.assert_allclose(
      value, losses.top_k_divergence(s, losses.top_k_teacher(t, K)),
      rtol=1e-2, atol=1e-2)  # bfloat16 rounding


def test_huge_and_zero_probability_inputs_finite():
  # |logits| up to 1e4, and -inf teacher classes (inside the top-k when k = V):
  # every divergence, with and without the tail, in one compiled function
  # (a NaN or inf in any term's value or gradient shows in the checks).
  def values_and_grad(student, teacher):
    def all_terms(x):
      return jnp.stack([
          losses.top_k_divergence(x, teacher, divergence=kind,
                                  tail_bucket=tail, **KW)
          for kind in losses.DIVERGENCES for tail in (True, False)])
    return all_terms(student), jax.grad(lambda x: all_terms(x).sum())(student)

  check = jax.jit(values_and_grad)
  s, t = _data((2, 3, V), seed=9)
  rng = np.random.default_rng(10)
  big_s = np.clip(1e4 * rng.standard_normal(s.shape), -1e4, 1e4)
  big_t = np.clip(1e4 * rng.standard_normal(s.shape), -1e4, 1e4)
  inf_t = t.copy()
  inf_t[0, 0, :2] = -np.inf
  inf_t[1, 2, 3] = -np.inf
  big_s, big_t = big_s.astype(np.float32), big_t.astype(np.float32)
  cases = [(big_s, big_t, K), (s, inf_t, K), (big_s, big_t, V), (s, inf_t, V)]
  for a, b, k in cases:
    values, grad = check(a, losses.top_k_teacher(b, k))
    assert np.all(np.isfinite(values)), (values, k)
    assert np.all(np.isfinite(grad)), k
