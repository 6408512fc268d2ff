"""Universal Logit Distillation (kdjax.losses._uld) against NumPy references."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.losses import _uld


def np_softmax(z, temperature=1.0):
  z = z.astype(np.float64) / temperature
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def np_uld_distance(zs, zt, ts=1.0, tt=None):
  """Sort each distribution decreasingly, zero-pad the shorter, L1 (float64)."""
  tt = ts if tt is None else tt
  a = -np.sort(-np_softmax(zs, ts), axis=-1)
  b = -np.sort(-np_softmax(zt, tt), axis=-1)
  v = max(a.shape[-1], b.shape[-1])
  pad = lambda x: np.concatenate(
      [x, np.zeros(x.shape[:-1] + (v - x.shape[-1],))], -1)
  return np.abs(pad(a) - pad(b)).sum(-1)


def np_reference_uld(zs, ys, zt, yt, ts=1.0, tt=1.0, ignore=-100):
  """Port of llm-recipes DistillationLoss (distillation part), loops and spans.

  ``ys``/``yt`` are label rows with ``ignore`` outside one contiguous answer
  span; the logits predicting the answer start at span start (labels already
  shifted, kdjax convention). Per sequence: mean over min(n_s, n_t) aligned
  positions of the L1 distance; then the mean over sequences.
  """
  per_seq = []
  for b in range(zs.shape[0]):
    s_pos = np.nonzero(ys[b] != ignore)[0]
    t_pos = np.nonzero(yt[b] != ignore)[0]
    size = min(len(s_pos), len(t_pos))
    if size == 0:
      continue
    d = np_uld_distance(zs[b, s_pos[:size]], zt[b, t_pos[:size]], ts, tt)
    per_seq.append(d.mean())
  return np.mean(per_seq)


def rand(seed, shape, scale=2.0):
  return (scale * np.random.default_rng(seed).normal(size=shape)).astype(
      np.float32)


# ----------------------------------------------------------------------------
# The per-position distance.
# ----------------------------------------------------------------------------


def test_zero_for_permuted_and_padded_copies_positive_otherwise():
  zt = rand(0, (3, 4, 7))
  perm = np.random.default_rng(1).permutation(7)
  permuted = zt[..., perm]
  d = _uld.sorted_probability_distance(permuted, zt, reduction="none")
  assert np.abs(np.asarray(d)).max() < 1e-6
  # A larger vocabulary whose extra entries have zero probability.
  padded = np.concatenate([permuted, np.full((3, 4, 5), -np.inf, np.float32)],
                          -1)
  for s, t in ((padded, zt), (zt, padded)):
    d = _uld.sorted_probability_distance(s, t, 0.7, reduction="none")
    assert np.isfinite(np.asarray(d)).all()
    assert np.abs(np.asarray(d)).max() < 1e-6
  # Any other distribution gives a positive distance.
  other = zt * 1.5
  d = _uld.sorted_probability_distance(other, zt, reduction="none")
  assert np.asarray(d).min() > 1e-3
  d = _uld.sorted_probability_distance(rand(2, (3, 4, 12)), zt,
                                       reduction="none")
  assert np.asarray(d).min() > 1e-3


@pytest.mark.parametrize("vs,vt", [(5, 9), (9, 5), (6, 6)])
@pytest.mark.parametrize("temperature,teacher_temperature",
                         [(1.0, None), (2.5, None), (0.5, 3.0)])
def test_distance_matches_numpy(vs, vt, temperature, teacher_temperature):
  zs, zt = rand(vs, (2, 3, vs)), rand(vt + 10, (2, 3, vt))
  mask = np.array([[1, 0, 1], [1, 1, 0]], np.float32)
  ref = np_uld_distance(zs, zt, temperature, teacher_temperature)
  got = _uld.sorted_probability_distance(
      zs, zt, temperature, teacher_temperature=teacher_temperature,
      reduction="none")
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  got = _uld.sorted_probability_distance(
      zs, zt, temperature, teacher_temperature=teacher_temperature, mask=mask)
  np.testing.assert_allclose(got, (ref * mask).sum() / mask.sum(), rtol=1e-5)
  got = _uld.sorted_probability_distance(
      zs, zt, temperature, teacher_temperature=teacher_temperature, mask=mask,
      reduction="sum")
  np.testing.assert_allclose(got, (ref * mask).sum(), rtol=1e-5)


def test_hand_computed_distance():
  # p_s = (0.5, 0.5) sorted; p_t = (0.25, 0.25, 0.5) sorted (0.5, 0.25, 0.25):
  # |0.5-0.5| + |0.5-0.25| + |0-0.25| = 0.5.
  zs = np.log(np.array([0.5, 0.5], np.float32))
  zt = np.log(np.array([0.25, 0.25, 0.5], np.float32))
  np.testing.assert_allclose(_uld.sorted_probability_distance(zs, zt), 0.5,
                             rtol=1e-6)
  np.testing.assert_allclose(
      _uld.sorted_probabilities(zt), [0.5, 0.25, 0.25], rtol=1e-6)


# ----------------------------------------------------------------------------
# top-k approximation.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("vs,vt", [(6, 10), (10, 6)])
def test_top_k_at_full_vocab_is_exact(vs, vt):
  zs, zt = rand(3, (2, 4, vs)), rand(4, (2, 4, vt))
  exact = _uld.sorted_probability_distance(zs, zt, 1.3, reduction="none")
  for k in (max(vs, vt), 50):
    np.testing.assert_array_equal(
        _uld.sorted_probability_distance(zs, zt, 1.3, reduction="none",
                                         top_k=k), exact)
  # k between the sizes: the smaller vocabulary is kept whole -> still exact.
  np.testing.assert_allclose(
      _uld.sorted_probability_distance(zs, zt, 1.3, reduction="none",
                                       top_k=8), exact, rtol=1e-5, atol=1e-6)


def test_top_k_bound_and_peaked_accuracy():
  zs, zt = rand(5, (3, 4, 40)), rand(6, (3, 4, 30))
  k = 4
  approx = np.asarray(_uld.sorted_probability_distance(
      zs, zt, reduction="none", top_k=k))
  exact = np_uld_distance(zs, zt)
  a = -np.sort(-np_softmax(zs), -1)
  b = -np.sort(-np_softmax(zt), -1)
  r_s, r_t = 1 - a[..., :k].sum(-1), 1 - b[..., :k].sum(-1)
  # Independent value of the approximation, then its error bound.
  ref = np.abs(a[..., :k] - b[..., :k]).sum(-1) + np.abs(r_s - r_t)
  np.testing.assert_allclose(approx, ref, rtol=1e-5, atol=1e-6)
  assert (approx <= exact + 1e-6).all()
  assert (exact - approx <= 2 * np.minimum(r_s, r_t) + 1e-6).all()
  assert (exact - approx).max() > 1e-4  # the approximation is not exact here
  # Peaked distributions: the top-k carry almost all the mass.
  peaked_s, peaked_t = 8 * zs, 8 * zt
  approx = _uld.sorted_probability_distance(peaked_s, peaked_t, top_k=k,
                                            reduction="none")
  np.testing.assert_allclose(approx, np_uld_distance(peaked_s, peaked_t),
                             atol=1e-3)


# ----------------------------------------------------------------------------
# Alignment and the full loss.
# ----------------------------------------------------------------------------


def test_align_responses_hand_computed():
  b, ts, tt = 3, 6, 5
  # Logit [b, t, 0] encodes its source position: 100 * b + t.
  zs = np.zeros((b, ts, 4), np.float32)
  zs[..., 0] = 100 * np.arange(b)[:, None] + np.arange(ts)[None, :]
  zt = np.zeros((b, tt, 3), np.float32)
  zt[..., 0] = 100 * np.arange(b)[:, None] + np.arange(tt)[None, :] + 0.5
  ms = np.array([[0, 0, 1, 1, 1, 0],     # 3 response positions 2, 3, 4
                 [1, 0, 1, 0, 1, 1],     # 4, non-contiguous: 0, 2, 4, 5
                 [0, 0, 0, 0, 0, 0]], bool)
  mt = np.array([[0, 1, 1, 1, 1],        # 4: 1, 2, 3, 4
                 [0, 0, 0, 1, 1],        # 2: 3, 4
                 [1, 1, 0, 0, 0]], bool)
  s_al, t_al, mask = _uld.align_responses(zs, ms, zt, mt)
  chex.assert_shape(s_al, (3, 5, 4))
  chex.assert_shape(t_al, (3, 5, 3))
  np.testing.assert_array_equal(mask, [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0],
                                       [0, 0, 0, 0, 0]])
  valid = mask > 0
  np.testing.assert_array_equal(np.asarray(s_al)[..., 0][valid],
                                [2, 3, 4, 100, 102])
  np.testing.assert_array_equal(np.asarray(t_al)[..., 0][valid],
                                [1.5, 2.5, 3.5, 103.5, 104.5])


def contiguous_batch(seed, b=4, ts=7, tt=9, vs=6, vt=11):
  """Logits and contiguous answer spans (one row with an empty student span)."""
  rng = np.random.default_rng(seed)
  zs, zt = rand(seed, (b, ts, vs)), rand(seed + 1, (b, tt, vt))
  ys = np.full((b, ts), -100)
  yt = np.full((b, tt), -100)
  spans_s = [(1, 5), (3, 2), (0, 7), (2, 0)]
  spans_t = [(2, 3), (1, 6), (4, 5), (0, 4)]
  for i, ((s0, sn), (t0, tn)) in enumerate(zip(spans_s, spans_t)):
    ys[i, s0:s0 + sn] = rng.integers(0, vs, sn)
    yt[i, t0:t0 + tn] = rng.integers(0, vt, tn)
  return zs, ys, zt, yt


@pytest.mark.parametrize("ts_,tt_", [(1.0, 1.0), (2.0, 0.5)])
def test_uld_loss_matches_reference_port(ts_, tt_):
  zs, ys, zt, yt = contiguous_batch(0)
  got = _uld.uld_loss(zs, ys != -100, zt, yt != -100, ts_,
                      teacher_temperature=tt_)
  np.testing.assert_allclose(
      got, np_reference_uld(zs, ys, zt, yt, ts_, tt_), rtol=1e-5)
  # Token average: every aligned position weighs the same.
  per = []
  for b in range(zs.shape[0]):
    s_pos, t_pos = np.nonzero(ys[b] != -100)[0], np.nonzero(yt[b] != -100)[0]
    n = min(len(s_pos), len(t_pos))
    per.extend(np_uld_distance(zs[b, s_pos[:n]], zt[b, t_pos[:n]], ts_, tt_))
  got = _uld.uld_loss(zs, ys != -100, zt, yt != -100, ts_,
                      teacher_temperature=tt_, average="token")
  np.testing.assert_allclose(got, np.mean(per), rtol=1e-5)
  # The two averages differ on this uneven batch (the check can fail).
  assert abs(float(got) - np_reference_uld(zs, ys, zt, yt, ts_, tt_)) > 1e-4


def test_total_is_ce_plus_weighted_uld():
  zs, ys, zt, yt = contiguous_batch(1)
  targets = np.where(ys == -100, 0, ys).astype(np.int32)
  ms = (ys != -100).astype(np.float32)
  parts = _uld.universal_logit_distillation_parts(
      zs, targets, ms, zt, yt != -100, uld_weight=0.3, temperature=1.5)
  log_q = np.log(np_softmax(zs))
  nll = -np.take_along_axis(log_q, targets[..., None], -1)[..., 0]
  ce = (nll * ms).sum() / ms.sum()
  uld = np_reference_uld(zs, ys, zt, yt, 1.5, 1.5)
  np.testing.assert_allclose(parts["ce"], ce, rtol=1e-5)
  np.testing.assert_allclose(parts["uld"], uld, rtol=1e-5)
  np.testing.assert_allclose(parts["loss"], ce + 0.3 * uld, rtol=1e-5)
  total = _uld.universal_logit_distillation_loss(
      zs, targets, ms, zt, yt != -100, uld_weight=0.3, temperature=1.5)
  np.testing.assert_allclose(total, parts["loss"], rtol=1e-6)


def test_no_aligned_position_gives_zero():
  zs, zt = rand(0, (2, 3, 4)), rand(1, (2, 5, 6))
  got = _uld.uld_loss(zs, np.zeros((2, 3)), zt, np.ones((2, 5)))
  assert float(got) == 0.0


# ----------------------------------------------------------------------------
# Transformations, precision, errors.
# ----------------------------------------------------------------------------


def np_distance_grad(zs, zt, temperature):
  """d/dz_s of sum_i |sort(p_s)_i - pad(sort(p_t))_i| (float64, no ties)."""
  p = np_softmax(zs, temperature)
  b = -np.sort(-np_softmax(zt, temperature))
  order = np.argsort(-p)
  g_sorted = np.ones(p.shape[-1])  # entries beyond V_t meet zero padding
  n = min(p.shape[-1], b.shape[-1])
  g_sorted[:n] = np.sign(p[order][:n] - b[:n])
  g = np.empty_like(p)
  g[order] = g_sorted
  return p * (g - (p * g).sum()) / temperature


@pytest.mark.parametrize("vs,vt", [(5, 3), (3, 5)])
def test_grad_matches_numpy_and_finite_differences(vs, vt):
  zs, zt = rand(7, (vs,)), rand(8, (vt,))
  fn = lambda z: _uld.sorted_probability_distance(z, zt, 1.7)
  g = jax.grad(fn)(jnp.asarray(zs))
  np.testing.assert_allclose(g, np_distance_grad(zs, zt, 1.7), atol=1e-5)
  eps = 1e-2
  fd = np.array([(fn(zs + eps * e) - fn(zs - eps * e)) / (2 * eps)
                 for e in np.eye(vs, dtype=np.float32)])
  np.testing.assert_allclose(g, fd, atol=2e-3)


def test_jit_vmap_grad_of_full_loss():
  zs, ys, zt, yt = contiguous_batch(2)
  targets = np.where(ys == -100, 0, ys).astype(np.int32)
  ms, mt = (ys != -100).astype(np.float32), (yt != -100).astype(np.float32)

  def loss(z):
    return _uld.universal_logit_distillation_loss(
        z, targets, ms, zt, mt, uld_weight=2.0, temperature=2.0)

  eager = loss(zs)
  np.testing.assert_allclose(jax.jit(loss)(zs), eager, rtol=1e-6)
  g = jax.jit(jax.grad(loss))(jnp.asarray(zs))
  assert np.isfinite(np.asarray(g)).all() and np.abs(np.asarray(g)).max() > 0
  # The ULD part only moves response positions of the student.
  g_uld = jax.grad(lambda z: _uld.uld_loss(z, ms, zt, mt))(jnp.asarray(zs))
  assert np.abs(np.asarray(g_uld))[ms == 0].max() == 0.0
  # Traced temperature.
  t_fn = jax.jit(lambda t: _uld.uld_loss(zs, ms, zt, mt, t))
  np.testing.assert_allclose(t_fn(2.0), _uld.uld_loss(zs, ms, zt, mt, 2.0),
                             rtol=1e-6)
  # vmap over an extra leading axis equals the per-slice calls.
  stacked_s, stacked_t = np.stack([zs, zs * 0.5]), np.stack([zt, zt * 2.0])
  per = jax.vmap(lambda s, t: _uld.uld_loss(s, ms, t, mt))(stacked_s,
                                                          stacked_t)
  np.testing.assert_allclose(
      per, [_uld.uld_loss(zs, ms, zt, mt),
            _uld.uld_loss(zs * 0.5, ms, zt * 2.0, mt)], rtol=1e-6)
  d = jax.vmap(lambda s, t: _uld.sorted_probability_distance(
      s, t, reduction="none"))(stacked_s, stacked_t[..., :7, :])
  np.testing.assert_allclose(
      d[1], np_uld_distance(zs * 0.5, zt[:, :7] * 2.0), rtol=1e-5, atol=1e-6)


def test_bf16_inputs_computed_in_float32():
  zs, zt = rand(9, (2, 3, 6)), rand(10, (2, 3, 9))
  zs16, zt16 = jnp.asarray(zs, jnp.bfloat16), jnp.asarray(zt, jnp.bfloat16)
  got = _uld.sorted_probability_distance(zs16, zt16, reduction="none")
  assert got.dtype == jnp.float32
  ref = np_uld_distance(np.asarray(zs16, np.float32),
                        np.asarray(zt16, np.float32))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  ms, mt = np.ones((2, 3)), np.ones((2, 3))
  total = _uld.universal_logit_distillation_loss(
      zs16, np.zeros((2, 3), np.int32), ms, zt16, mt)
  assert total.dtype == jnp.float32 and np.isfinite(float(total))


def test_errors():
  zs, zt = rand(0, (2, 3, 4)), rand(1, (2, 3, 6))
  with pytest.raises(ValueError, match="temperature"):
    _uld.sorted_probability_distance(zs, zt, 0.0)
  with pytest.raises(ValueError, match="teacher_temperature"):
    _uld.sorted_probability_distance(zs, zt, teacher_temperature=-1.0)
  with pytest.raises(ValueError, match="leading-shape mismatch"):
    _uld.sorted_probability_distance(zs, rand(1, (2, 4, 6)))
  with pytest.raises(ValueError, match="top_k"):
    _uld.sorted_probability_distance(zs, zt, top_k=0)
  with pytest.raises(ValueError, match="mask shape"):
    _uld.sorted_probability_distance(zs, zt, mask=np.ones((2, 4)))
  with pytest.raises(ValueError, match="batch-size mismatch"):
    _uld.align_responses(zs, np.ones((2, 3)), rand(1, (3, 3, 6)),
                         np.ones((3, 3)))
  with pytest.raises(ValueError, match="teacher_response_mask"):
    _uld.align_responses(zs, np.ones((2, 3)), zt, np.ones((2, 4)))
  with pytest.raises(ValueError, match=r"\[batch, time, vocab\]"):
    _uld.align_responses(zs[0], np.ones(3), zt[0], np.ones(3))
  with pytest.raises(ValueError, match="average"):
    _uld.uld_loss(zs, np.ones((2, 3)), zt, np.ones((2, 3)), average="batch")
  with pytest.raises(ValueError, match="student_targets shape"):
    _uld.universal_logit_distillation_loss(
        zs, np.zeros((2, 4), np.int32), np.ones((2, 3)), zt, np.ones((2, 3)))
  with pytest.raises(ValueError, match="temperature"):
    _uld.uld_loss(zs, np.ones((2, 3)), zt, np.ones((2, 3)), -2.0)
