"""Tests of the dense logit divergences of kdjax.losses.

Every number is checked against a NumPy (float64) reference written here from
the papers' formulas, never by re-calling the function under test:
  * KL / soft targets: Hinton, Vinyals & Dean (2015), times T**2;
  * generalised JSD: Agarwal et al. (GKD, 2024), beta=0 forward / 1 reverse KL;
  * skew (reverse) KL: Ko et al. (DistiLLM, 2024);
  * total variation distance, logit MSE (Ba & Caruana 2014), hard-label CE.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses

C = 5
SHAPES = [(4, C), (2, 3, C)]  # [B, C] and [B, L, C]
ATOL = RTOL = 1e-5
LOG_TINY = np.log(np.finfo(np.float32).tiny)  # documented floor for log 0


# -----------------------------------------------------------------------------
# NumPy references (float64).
# -----------------------------------------------------------------------------


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = np.max(x, axis=-1, keepdims=True)
  z = x - m
  return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def np_softmax(x):
  return np.exp(np_log_softmax(x))


def np_kl(p, q):
  """sum_c p_c log(p_c / q_c), with 0 log 0 = 0."""
  with np.errstate(divide="ignore", invalid="ignore"):
    terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
  return terms.sum(-1)


def np_divergence(kind, p, q, beta=0.5, alpha=0.1):
  """Per-position divergence between teacher p and student q."""
  if kind == "kl":
    return np_kl(p, q)
  if kind == "reverse_kl":
    return np_kl(q, p)
  if kind == "jsd":
    if beta == 0:
      return np_kl(p, q)
    if beta == 1:
      return np_kl(q, p)
    m = beta * p + (1 - beta) * q
    return beta * np_kl(p, m) + (1 - beta) * np_kl(q, m)
  if kind == "skew_kl":
    return np_kl(p, alpha * p + (1 - alpha) * q)
  if kind == "skew_reverse_kl":
    return np_kl(q, alpha * q + (1 - alpha) * p)
  if kind == "tvd":
    return 0.5 * np.abs(p - q).sum(-1)
  if kind == "soft_ce":
    with np.errstate(divide="ignore", invalid="ignore"):
      return -np.where(p > 0, p * np.log(q), 0.0).sum(-1)
  raise ValueError(kind)


def np_dense(kind, s, t, temperature, beta=0.5, alpha=0.1):
  p = np_softmax(np.asarray(t, np.float64) / temperature)
  q = np_softmax(np.asarray(s, np.float64) / temperature)
  out = np_divergence(kind, p, q, beta=beta, alpha=alpha)
  return out if kind == "tvd" else out * temperature**2


def np_reduce(per_pos, mask, reduction):
  if mask is not None:
    per_pos = np.where(mask > 0, per_pos * mask, 0.0)
  if reduction == "none":
    return per_pos
  if reduction == "sum":
    return per_pos.sum()
  count = per_pos.size if mask is None else np.sum(mask)
  return per_pos.sum() / max(count, 1)


# Public dense losses: name -> (function, kind, extra kwargs).
DENSE = {
    "kl": (losses.kl_divergence, "kl", {}),
    "reverse_kl": (losses.reverse_kl_divergence, "reverse_kl", {}),
    "jsd_0.5": (losses.jensen_shannon_divergence, "jsd", {"beta": 0.5}),
    "jsd_0.2": (losses.jensen_shannon_divergence, "jsd", {"beta": 0.2}),
    "jsd_0.9": (losses.jensen_shannon_divergence, "jsd", {"beta": 0.9}),
    "skew_kl_0.1": (losses.skew_kl_divergence, "skew_kl", {"alpha": 0.1}),
    "skew_kl_0.4": (losses.skew_kl_divergence, "skew_kl", {"alpha": 0.4}),
    "skew_reverse_kl_0.1": (losses.skew_reverse_kl_divergence,
                            "skew_reverse_kl", {"alpha": 0.1}),
    "skew_reverse_kl_0.3": (losses.skew_reverse_kl_divergence,
                            "skew_reverse_kl", {"alpha": 0.3}),
    "tvd": (losses.total_variation_distance, "tvd", {}),
    "soft_ce": (losses.soft_cross_entropy, "soft_ce", {}),
}
for _kind in losses.DIVERGENCES:
  DENSE[f"logit_divergence/{_kind}"] = (
      functools.partial(losses.logit_divergence, divergence=_kind), _kind,
      {"beta": 0.3, "alpha": 0.2})


def _ref_kwargs(extra):
  return {k: v for k, v in extra.items() if k in ("beta", "alpha")}


def _data(shape, seed=0, scale=2.0):
  rng = np.random.default_rng(seed)
  s = (scale * rng.standard_normal(shape)).astype(np.float32)
  t = (scale * rng.standard_normal(shape)).astype(np.float32)
  return s, t


# -----------------------------------------------------------------------------
# Values against the references.
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("shape", SHAPES, ids=["BC", "BLC"])
@pytest.mark.parametrize("name", list(DENSE))
def test_dense_matches_numpy_reference(name, shape, temperature):
  fn, kind, extra = DENSE[name]
  s, t = _data(shape, seed=len(name))
  ref = np_dense(kind, s, t, temperature, **_ref_kwargs(extra))
  assert ref.shape == shape[:-1]
  for reduction in ("none", "mean", "sum"):
    got = fn(s, t, temperature, reduction=reduction, **extra)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, np_reduce(ref, None, reduction),
                               rtol=RTOL, atol=ATOL, err_msg=reduction)


def test_hand_computed_kl_and_tvd():
  # p = [1/2, 1/2] (teacher), q = [1/4, 3/4] (student).
  s = np.log(np.array([[0.25, 0.75]], np.float32))
  t = np.zeros((1, 2), np.float32)
  expected_kl = 0.5 * np.log(2.0) + 0.5 * np.log(2.0 / 3.0)
  np.testing.assert_allclose(losses.kl_divergence(s, t), expected_kl, rtol=1e-6)
  expected_rkl = 0.25 * np.log(0.5) + 0.75 * np.log(1.5)
  np.testing.assert_allclose(losses.reverse_kl_divergence(s, t), expected_rkl,
                             rtol=1e-6)
  np.testing.assert_allclose(losses.total_variation_distance(s, t), 0.25,
                             rtol=1e-6)
  np.testing.assert_allclose(losses.soft_cross_entropy(s, t),
                             -0.5 * np.log(0.25) - 0.5 * np.log(0.75),
                             rtol=1e-6)


@pytest.mark.parametrize("shape", SHAPES, ids=["BC", "BLC"])
def test_logit_mse_matches_reference(shape):
  s, t = _data(shape, seed=3)
  ref = np.mean((s.astype(np.float64) - t) ** 2, axis=-1)
  for reduction in ("none", "mean", "sum"):
    np.testing.assert_allclose(
        losses.logit_mse(s, t, reduction=reduction),
        np_reduce(ref, None, reduction), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("shape", SHAPES, ids=["BC", "BLC"])
def test_hard_label_cross_entropy_matches_reference(shape, smoothing):
  s, _ = _data(shape, seed=4)
  labels = np.random.default_rng(5).integers(0, C, size=shape[:-1])
  log_q = np_log_softmax(s)
  target = (1 - smoothing) * np.eye(C)[labels] + smoothing / C
  ref = -(target * log_q).sum(-1)
  for reduction in ("none", "mean", "sum"):
    got = losses.hard_label_cross_entropy(
        s, labels, label_smoothing=smoothing, reduction=reduction)
    np.testing.assert_allclose(got, np_reduce(ref, None, reduction),
                               rtol=RTOL, atol=ATOL)


# -----------------------------------------------------------------------------
# Known limits and properties.
# -----------------------------------------------------------------------------


def test_kl_nonnegative_and_zero_iff_equal():
  s, t = _data((4, C), seed=6)
  per = np.asarray(losses.kl_divergence(s, t, reduction="none"))
  assert np.all(per > 1e-4)  # distinct random distributions
  assert float(losses.kl_divergence(s, s)) == pytest.approx(0.0, abs=1e-6)
  # Equal distributions, different logits (softmax is shift-invariant).
  shifted = s + np.float32(3.0)
  np.testing.assert_allclose(losses.kl_divergence(shifted, s, 2.0), 0.0,
                             atol=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_jsd_symmetric_and_bounded_at_half(temperature):
  s, t = _data((4, C), seed=7)
  a = losses.jensen_shannon_divergence(s, t, temperature, beta=0.5,
                                       reduction="none")
  b = losses.jensen_shannon_divergence(t, s, temperature, beta=0.5,
                                       reduction="none")
  np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  bound = np.log(2.0) * temperature**2
  assert np.all(np.asarray(a) <= bound)
  # Disjoint one-hot-like distributions reach the bound.
  s1 = np.array([[60.0, -60.0]], np.float32) * temperature
  t1 = np.array([[-60.0, 60.0]], np.float32) * temperature
  got = float(losses.jensen_shannon_divergence(s1, t1, temperature))
  assert got <= bound * (1 + 1e-6)
  assert got == pytest.approx(bound, rel=1e-4)


def test_jsd_ends_equal_forward_and_reverse_kl_static_and_traced():
  s, t = _data((2, 3, C), seed=8)
  temperature = 2.0
  fwd = np_dense("kl", s, t, temperature)
  rev = np_dense("reverse_kl", s, t, temperature)

  def jsd(beta):
    return losses.jensen_shannon_divergence(s, t, temperature, beta=beta,
                                            reduction="none")

  np.testing.assert_allclose(jsd(0.0), fwd, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(jsd(1.0), rev, rtol=RTOL, atol=ATOL)
  jitted = jax.jit(jsd)  # beta traced: one compilation for every beta
  np.testing.assert_allclose(jitted(0.0), fwd, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(jitted(1.0), rev, rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(jitted(0.3),
                             np_dense("jsd", s, t, temperature, beta=0.3),
                             rtol=RTOL, atol=ATOL)
  assert jitted._cache_size() == 1  # pylint: disable=protected-access


def test_skew_kl_limits():
  s, t = _data((4, C), seed=9)
  np.testing.assert_allclose(losses.skew_kl_divergence(s, t, 2.0, alpha=0.0),
                             np_dense("kl", s, t, 2.0).mean(), rtol=RTOL)
  np.testing.assert_allclose(
      losses.skew_reverse_kl_divergence(s, t, 2.0, alpha=0.0),
      np_dense("reverse_kl", s, t, 2.0).mean(), rtol=RTOL)
  np.testing.assert_allclose(losses.skew_kl_divergence(s, t, alpha=1.0), 0.0,
                             atol=1e-6)
  # Bounded by -log(alpha) (times T^2).
  s1 = np.array([[50.0, -50.0]], np.float32)
  got = float(losses.skew_kl_divergence(s1, -s1, alpha=0.1))
  assert got <= -np.log(0.1) + 1e-5


@pytest.mark.parametrize("name", ["kl", "reverse_kl", "jsd_0.2",
                                  "skew_kl_0.1", "skew_reverse_kl_0.1",
                                  "soft_ce"])
def test_temperature_squared_scaling(name):
  fn, _, extra = DENSE[name]
  s, t = _data((4, C), seed=10)
  temperature = 3.0
  scaled = fn(s, t, temperature, **extra)
  raw = fn(s, t, temperature, scale_by_temperature=False, **extra)
  np.testing.assert_allclose(scaled, temperature**2 * raw, rtol=1e-6)
  # TVD is never scaled.
  np.testing.assert_allclose(
      losses.total_variation_distance(s, t, temperature),
      np_dense("tvd", s, t, temperature).mean(), rtol=RTOL)


def test_soft_ce_minus_kl_is_teacher_entropy():
  s, t = _data((2, 3, C), seed=11)
  temperature = 2.0
  p = np_softmax(t / temperature)
  entropy = -(p * np.log(p)).sum(-1) * temperature**2
  diff = (losses.soft_cross_entropy(s, t, temperature, reduction="none")
          - losses.kl_divergence(s, t, temperature, reduction="none"))
  np.testing.assert_allclose(diff, entropy, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("shape", SHAPES, ids=["BC", "BLC"])
@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kl_gradient_is_t_times_prob_difference_over_batch(shape, temperature):
  s, t = _data(shape, seed=12)
  grad = jax.grad(losses.kl_divergence)(jnp.asarray(s), t, temperature)
  positions = int(np.prod(shape[:-1]))
  expected = temperature * (np_softmax(s / temperature)
                            - np_softmax(t / temperature)) / positions
  np.testing.assert_allclose(grad, expected, rtol=1e-4, atol=1e-6)


# -----------------------------------------------------------------------------
# Transformations, dtypes, masks, reductions.
# -----------------------------------------------------------------------------


def _all_losses():
  """name -> f(s, t, **kw) for every dense loss (mse and hard CE included)."""
  # One entry per divergence (the reference test covers every variant).
  names = ("kl", "reverse_kl", "jsd_0.2", "skew_kl_0.1", "skew_reverse_kl_0.1",
           "tvd", "soft_ce", "logit_divergence/jsd")
  out = {name: functools.partial(DENSE[name][0], temperature=2.0,
                                 **DENSE[name][2]) for name in names}
  out["logit_mse"] = losses.logit_mse

  def hard_ce(s, t, **kw):
    # Labels: the teacher's argmax (works unchanged under jit and vmap).
    return losses.hard_label_cross_entropy(s, jnp.argmax(t, axis=-1), **kw)

  out["hard_label_cross_entropy"] = hard_ce
  return out


ALL = _all_losses()


@pytest.mark.parametrize("name", list(ALL))
def test_jit_equals_eager_and_grad_finite(name):
  fn = ALL[name]
  s, t = _data((2, 3, C), seed=13)
  eager = fn(s, t)
  np.testing.assert_allclose(jax.jit(fn)(s, t), eager, rtol=1e-6, atol=1e-6)
  grad = jax.jit(jax.grad(fn))(jnp.asarray(s), t)
  assert np.all(np.isfinite(grad))


class VariantsTest(chex.TestCase):
  """Reference check under chex's with_jit / without_jit variants."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_kl_and_jsd_with_traced_temperature(self):
    s, t = _data((4, C), seed=14)

    @self.variant
    def f(s, t, temperature, beta):
      return (losses.kl_divergence(s, t, temperature),
              losses.jensen_shannon_divergence(s, t, temperature, beta=beta))

    kl, jsd = f(s, t, jnp.float32(1.5), jnp.float32(0.4))
    np.testing.assert_allclose(kl, np_dense("kl", s, t, 1.5).mean(), rtol=RTOL)
    np.testing.assert_allclose(
        jsd, np_dense("jsd", s, t, 1.5, beta=0.4).mean(), rtol=RTOL)


@pytest.mark.parametrize("name", list(ALL))
def test_vmap_equals_batched_call(name):
  fn = ALL[name]
  s, t = _data((2, 3, C), seed=15)  # vmapped over the leading axis
  batched = fn(s, t, reduction="none")
  mapped = jax.vmap(lambda a, b: fn(a, b, reduction="none"))(s, t)
  np.testing.assert_allclose(mapped, batched, rtol=1e-6, atol=1e-6)
  means = jax.vmap(fn)(s, t)
  np.testing.assert_allclose(means, np.asarray(batched).mean(-1), rtol=1e-5,
                             atol=1e-6)


BF16_TOL = 1e-2  # stated tolerance vs the float32 loss (measured <= 1.2e-3)


@pytest.mark.parametrize("name", list(ALL))
def test_bfloat16_inputs(name):
  fn = ALL[name]
  s, t = _data((2, 3, C), seed=16, scale=1.0)
  s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  value_and_grad = jax.value_and_grad(fn)
  got, grad = value_and_grad(s16, t16)
  assert got.dtype == jnp.float32
  assert np.isfinite(got)
  assert grad.dtype == jnp.bfloat16 and np.all(np.isfinite(
      np.asarray(grad, np.float32)))
  # Computed in float32: equals the float32 loss of the rounded inputs.
  rounded, _ = value_and_grad(s16.astype(jnp.float32), t16.astype(jnp.float32))
  np.testing.assert_allclose(got, rounded, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got, fn(s, t), rtol=BF16_TOL, atol=BF16_TOL)


def _np_per_position(name, s, t):
  if name == "logit_mse":
    return np.mean((s.astype(np.float64) - t) ** 2, axis=-1)
  if name == "hard_label_cross_entropy":
    y = np.argmax(t, axis=-1)
    return -np.take_along_axis(np_log_softmax(s), y[..., None], -1)[..., 0]
  _, kind, extra = DENSE[name]
  return np_dense(kind, s, t, 2.0, **_ref_kwargs(extra))


@pytest.mark.parametrize("name", list(ALL))
def test_mask_mean_over_unmasked_positions_only(name):
  fn = ALL[name]
  s, t = _data((2, 3, C), seed=17)
  mask = np.array([[1, 1, 0], [1, 0, 0]], bool)
  ref = _np_per_position(name, s, t)
  for reduction in ("mean", "sum", "none"):
    np.testing.assert_allclose(fn(s, t, mask=mask, reduction=reduction),
                               np_reduce(ref, mask, reduction), rtol=RTOL,
                               atol=ATOL, err_msg=reduction)
  np.testing.assert_allclose(fn(s, t, mask=mask), ref[mask].mean(), rtol=RTOL)
  # Padding never dilutes: extra padded (garbage) positions change nothing.
  rng = np.random.default_rng(18)
  pad_s = np.concatenate([s, 1e3 * rng.standard_normal((2, 4, C))], 1)
  pad_t = np.concatenate([t, 1e3 * rng.standard_normal((2, 4, C))], 1)
  pad_s, pad_t = pad_s.astype(np.float32), pad_t.astype(np.float32)
  pad_mask = np.concatenate([mask, np.zeros((2, 4), bool)], 1)
  np.testing.assert_allclose(fn(pad_s, pad_t, mask=pad_mask),
                             ref[mask].mean(), rtol=RTOL)
  np.testing.assert_allclose(fn(pad_s, pad_t, mask=pad_mask, reduction="sum"),
                             ref[mask].sum(), rtol=RTOL)


@pytest.mark.parametrize("name", list(ALL))
def test_fully_masked_batch_is_zero_with_finite_gradient(name):
  fn = ALL[name]
  s, t = _data((2, 3, C), seed=19)
  mask = np.zeros((2, 3), bool)
  value, grad = jax.value_and_grad(fn)(jnp.asarray(s), t, mask=mask)
  assert float(value) == 0.0
  assert np.all(np.isfinite(grad)) and np.all(np.asarray(grad) == 0.0)
  assert float(fn(s, t, mask=mask, reduction="sum")) == 0.0


def test_float_mask_weights():
  s, t = _data((2, 3, C), seed=20)
  w = np.array([[1.0, 0.5, 0.0], [2.0, 0.0, 0.25]], np.float32)
  ref = np_dense("kl", s, t, 1.0)
  np.testing.assert_allclose(losses.kl_divergence(s, t, mask=w),
                             (ref * w).sum() / w.sum(), rtol=RTOL)


def test_masked_positions_get_zero_gradient():
  s, t = _data((2, 3, C), seed=21)
  mask = np.array([[1, 0, 1], [0, 1, 1]], bool)
  grad = jax.grad(losses.kl_divergence)(jnp.asarray(s), t, 2.0, mask=mask)
  assert np.all(np.asarray(grad)[~mask] == 0.0)
  assert np.all(np.abs(np.asarray(grad)[mask]).sum(-1) > 0)


# -----------------------------------------------------------------------------
# Never NaN.
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 4.0])
@pytest.mark.parametrize("name", list(ALL))
def test_huge_logits_value_and_gradient_finite(name, temperature):
  fn = ALL[name]
  rng = np.random.default_rng(22)
  s = np.clip(1e4 * rng.standard_normal((4, C)), -1e4, 1e4).astype(np.float32)
  t = np.clip(1e4 * rng.standard_normal((4, C)), -1e4, 1e4).astype(np.float32)
  s[0], t[0] = 1e4, -1e4  # constant rows at the limit
  if name in DENSE:
    fn = functools.partial(DENSE[name][0], temperature=temperature,
                           **DENSE[name][2])
  value, grad = jax.value_and_grad(fn)(jnp.asarray(s), t)
  assert np.isfinite(value), value
  assert np.all(np.isfinite(grad))
  if name == "kl":  # log-space reference: q underflows even in float64
    log_p, log_q = np_log_softmax(t / temperature), np_log_softmax(
        s / temperature)
    ref = (np.exp(log_p) * (log_p - log_q)).sum(-1).mean() * temperature**2
    np.testing.assert_allclose(value, ref, rtol=1e-5)


def _neg_inf_teacher():
  s, t = _data((2, 3, C), seed=23)
  t[0, 0, 1] = -np.inf
  t[1, :, 4] = -np.inf
  return s, t


@pytest.mark.parametrize("name", [n for n in ALL if n != "logit_mse"])
def test_zero_probability_teacher_class_finite(name):
  s, t = _neg_inf_teacher()
  fn = ALL[name]
  value, grad = jax.value_and_grad(fn)(jnp.asarray(s), t)
  assert np.isfinite(value)
  assert np.all(np.isfinite(grad))


@pytest.mark.parametrize("kind", ["kl", "jsd", "skew_kl", "skew_reverse_kl",
                                  "tvd", "soft_ce"])
def test_zero_probability_teacher_class_matches_reference(kind):
  # These divergences are finite when p_c = 0 (0 log 0 = 0 or mixture > 0).
  s, t = _neg_inf_teacher()
  got = losses.logit_divergence(s, t, 2.0, divergence=kind, beta=0.3,
                                alpha=0.2, reduction="none")
  np.testing.assert_allclose(
      got, np_dense(kind, s, t, 2.0, beta=0.3, alpha=0.2), rtol=RTOL,
      atol=ATOL)


def test_reverse_kl_zero_probability_teacher_uses_documented_floor():
  # KL(q || p) is infinite when p_c = 0 < q_c; the library floors log p_c at
  # log(float32 tiny) so that value and gradient stay finite.
  s, t = _neg_inf_teacher()
  q = np_softmax(s / 2.0)
  with np.errstate(divide="ignore"):
    log_p = np.maximum(np_log_softmax(t / 2.0), LOG_TINY)
  ref = (q * (np.log(q) - log_p)).sum(-1) * 4.0
  got = losses.reverse_kl_divergence(s, t, 2.0, reduction="none")
  np.testing.assert_allclose(got, ref, rtol=RTOL, atol=ATOL)


def test_zero_probability_teacher_at_mixture_ends_finite():
  # beta = 1 / alpha in {0, 1} put a zero weight on one side of the mixture;
  # value and gradient stay finite, static or traced (one compilation).
  s, t = _neg_inf_teacher()
  fns = (lambda a, w: losses.jensen_shannon_divergence(a, t, 2.0, beta=w),
         lambda a, w: losses.skew_kl_divergence(a, t, 2.0, alpha=w),
         lambda a, w: losses.skew_reverse_kl_divergence(a, t, 2.0, alpha=w))
  traced = jax.jit(lambda a, w: [jax.value_and_grad(f)(a, w) for f in fns])
  for w in (0.0, 0.5, 1.0):
    for value, grad in traced(s, w):
      assert np.isfinite(value) and np.all(np.isfinite(grad)), w
    for f in fns:  # static (Python float) weight, eager
      value, grad = jax.value_and_grad(f)(jnp.asarray(s), w)
      assert np.isfinite(value) and np.all(np.isfinite(grad)), w


# -----------------------------------------------------------------------------
# Errors.
# -----------------------------------------------------------------------------

PAIR_LOSSES = {name: fn for name, (fn, _, _) in DENSE.items()}
PAIR_LOSSES["logit_mse"] = losses.logit_mse


@pytest.mark.parametrize("name", list(PAIR_LOSSES))
def test_errors_common(name):
  fn = PAIR_LOSSES[name]
  s, t = _data((2, 3, C), seed=24)
  with pytest.raises(ValueError, match="class-count mismatch"):
    fn(s, t[..., :-1])
  with pytest.raises(ValueError, match="shape mismatch"):
    fn(s, t[:1])
  with pytest.raises(ValueError, match="mask shape"):
    fn(s, t, mask=np.ones((2, 4), bool))
  with pytest.raises(ValueError, match="reduction must be one of"):
    fn(s, t, reduction="avg")
  if name != "logit_mse":
    for bad in (0.0, -1.0):
      with pytest.raises(ValueError, match="temperature must be > 0"):
        fn(s, t, bad)


def test_errors_beta_alpha_divergence_labels():
  s, t = _data((4, C), seed=25)
  for bad in (-0.1, 1.5):
    with pytest.raises(ValueError, match=r"beta .*\[0, 1\]"):
      losses.jensen_shannon_divergence(s, t, beta=bad)
    with pytest.raises(ValueError, match=r"alpha .*\[0, 1\]"):
      losses.skew_kl_divergence(s, t, alpha=bad)
    with pytest.raises(ValueError, match=r"alpha .*\[0, 1\]"):
      losses.skew_reverse_kl_divergence(s, t, alpha=bad)
    with pytest.raises(ValueError, match=r"beta .*\[0, 1\]"):
      losses.logit_divergence(s, t, divergence="jsd", beta=bad)
  with pytest.raises(ValueError, match="unknown divergence"):
    losses.logit_divergence(s, t, divergence="hellinger")
  with pytest.raises(ValueError, match="labels shape"):
    losses.hard_label_cross_entropy(s, np.zeros((3,), np.int32))
  with pytest.raises(ValueError, match="labels must be integers"):
    losses.hard_label_cross_entropy(s, np.zeros((4,), np.float32))
  with pytest.raises(ValueError, match=r"labels must lie in \[0, 5\)"):
    losses.hard_label_cross_entropy(s, np.array([0, 5, 1, 2]))
  with pytest.raises(ValueError, match="label_smoothing"):
    losses.hard_label_cross_entropy(s, np.array([0, 1, 2, 3]),
                                    label_smoothing=1.5)
  with pytest.raises(ValueError, match="mask shape"):
    losses.hard_label_cross_entropy(s, np.array([0, 1, 2, 3]), mask=np.ones(3))
  with pytest.raises(ValueError, match="reduction"):
    losses.hard_label_cross_entropy(s, np.array([0, 1, 2, 3]), reduction="max")
