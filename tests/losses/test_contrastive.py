"""Tests of CRD (kdjax/losses/_contrastive.py) against a NumPy port of RepDistiller."""

from __future__ import annotations

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.losses import _contrastive as crd
from kdjax.losses import compose

N, D, B, K = 50, 8, 6, 10
T, MOM = 0.07, 0.5

# Most checks run the jitted loss (one compile per shape, shared by the tests);
# test_crd_loss_jit_equals_eager checks that eager execution agrees.
_nce = jax.jit(crd.crd_nce_loss,
               static_argnames=("nce_t", "nce_m", "update_memory",
                                "dense_scores"))


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _reference_crd(mem_s, mem_t, z_s, z_t, v1, v2, idx, nce_t, momentum):
  """RepDistiller ContrastMemory.forward + two ContrastLoss, in float64 NumPy."""
  mem_s, mem_t = mem_s.astype(np.float64).copy(), mem_t.astype(np.float64).copy()
  v1, v2 = v1.astype(np.float64), v2.astype(np.float64)
  n = mem_s.shape[0]
  bsz, k1 = idx.shape
  out_v2 = np.exp(np.einsum("bkd,bd->bk", mem_s[idx], v2) / nce_t)
  out_v1 = np.exp(np.einsum("bkd,bd->bk", mem_t[idx], v1) / nce_t)
  if z_s < 0:
    z_s = out_v1.mean() * n
  if z_t < 0:
    z_t = out_v2.mean() * n
  out_v1, out_v2 = out_v1 / z_s, out_v2 / z_t

  def contrast_loss(x):
    m, pn = k1 - 1, 1.0 / n
    log_d1 = np.log(x[:, 0] / (x[:, 0] + m * pn + 1e-7))
    log_d0 = np.log((m * pn) / (x[:, 1:] + m * pn + 1e-7))
    return -(log_d1.sum() + log_d0.sum()) / bsz

  loss = contrast_loss(out_v1) + contrast_loss(out_v2)
  y = idx[:, 0]
  for mem, v in ((mem_s, v1), (mem_t, v2)):
    pos = mem[y] * momentum + v * (1 - momentum)
    mem[y] = pos / np.linalg.norm(pos, axis=1, keepdims=True)
  return loss, mem_s, mem_t, z_s, z_t


@pytest.fixture(scope="module")
def setup():
  rng = np.random.default_rng(0)
  state = crd.init_crd_state(jax.random.PRNGKey(0), N, D)
  v1 = _unit(rng.normal(size=(B, D))).astype(np.float32)
  v2 = _unit(rng.normal(size=(B, D))).astype(np.float32)
  pos = rng.permutation(N)[:B]
  neg = rng.integers(0, N, size=(B, K))
  idx = np.concatenate([pos[:, None], neg], axis=1).astype(np.int32)
  return state, v1, v2, idx


def test_init_matches_reference_distribution():
  state = crd.init_crd_state(jax.random.PRNGKey(1), 4000, 128)
  stdv = 1.0 / math.sqrt(128 / 3)
  mem = np.asarray(state.memory_student)
  assert mem.shape == (4000, 128) and mem.dtype == np.float32
  assert np.abs(mem).max() <= stdv
  # Uniform(-s, s) with s = 1/sqrt(d/3): E||row||^2 = 1.
  np.testing.assert_allclose(np.mean(np.sum(mem**2, 1)), 1.0, atol=0.01)
  assert float(state.z_student) == -1.0 and float(state.z_teacher) == -1.0
  assert not np.allclose(mem, np.asarray(state.memory_teacher))
  # Every leaf is its own buffer, so the state can be donated to a jitted step.
  donated = jax.jit(lambda s: s, donate_argnums=0)(state)
  assert float(donated.z_teacher) == -1.0


def test_nce_loss_and_update_match_numpy_reference(setup):
  state, v1, v2, idx = setup
  loss, new = _nce(state, v1, v2, idx, nce_t=T, nce_m=MOM)
  ref_loss, ref_s, ref_t, ref_zs, ref_zt = _reference_crd(
      np.asarray(state.memory_student), np.asarray(state.memory_teacher), -1,
      -1, v1, v2, idx, T, MOM)
  np.testing.assert_allclose(float(loss), ref_loss, rtol=1e-4)
  np.testing.assert_allclose(float(new.z_student), ref_zs, rtol=1e-4)
  np.testing.assert_allclose(float(new.z_teacher), ref_zt, rtol=1e-4)
  np.testing.assert_allclose(np.asarray(new.memory_student), ref_s, atol=1e-6)
  np.testing.assert_allclose(np.asarray(new.memory_teacher), ref_t, atol=1e-6)
  # Updated rows are unit-norm; the others are untouched.
  y = idx[:, 0]
  np.testing.assert_allclose(
      np.linalg.norm(np.asarray(new.memory_student)[y], axis=1), 1.0, rtol=1e-6)
  untouched = np.setdiff1d(np.arange(N), y)
  np.testing.assert_array_equal(np.asarray(new.memory_student)[untouched],
                                np.asarray(state.memory_student)[untouched])

  # Second call: Z is kept (not re-estimated), the memory moves on.
  rng = np.random.default_rng(1)
  w1 = _unit(rng.normal(size=(B, D))).astype(np.float32)
  w2 = _unit(rng.normal(size=(B, D))).astype(np.float32)
  loss2, new2 = _nce(new, w1, w2, idx, nce_t=T, nce_m=MOM)
  ref2 = _reference_crd(ref_s, ref_t, ref_zs, ref_zt, w1, w2, idx, T, MOM)
  np.testing.assert_allclose(float(loss2), ref2[0], rtol=1e-4)
  assert float(new2.z_student) == float(new.z_student)
  assert float(new2.z_teacher) == float(new.z_teacher)
  np.testing.assert_allclose(np.asarray(new2.memory_teacher), ref2[2],
                             atol=1e-6)


def test_hand_computed_single_example():
  # One example, one negative, memory rows chosen so the scores are known.
  mem_s = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]], np.float32)
  mem_t = np.array([[0.0, 1.0], [1.0, 0.0], [0.8, 0.6]], np.float32)
  state = crd.CRDState(jnp.asarray(mem_s), jnp.asarray(mem_t),
                       jnp.float32(2.0), jnp.float32(4.0))
  v1 = np.array([[1.0, 0.0]], np.float32)
  v2 = np.array([[0.0, 1.0]], np.float32)
  idx = np.array([[0, 1]], np.int32)
  loss, new = _nce(state, v1, v2, idx, nce_t=1.0, nce_m=0.5)
  c = 1.0 / 3.0  # m * Pn with m = 1, N = 3
  # student anchor: <M_t[0], v1> = 0, <M_t[1], v1> = 1; Z_s = 2.
  ps = np.array([1.0, math.e]) / 2.0
  # teacher anchor: <M_s[0], v2> = 0, <M_s[1], v2> = 1; Z_t = 4.
  pt = np.array([1.0, math.e]) / 4.0
  expected = 0.0
  for p in (ps, pt):
    expected -= math.log(p[0] / (p[0] + c + 1e-7)) + math.log(
        c / (p[1] + c + 1e-7))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
  # Memory row 0: normalize(0.5 [1, 0] + 0.5 [1, 0]) = [1, 0];
  # teacher row 0: normalize(0.5 [0, 1] + 0.5 [0, 1]) = [0, 1].
  np.testing.assert_allclose(np.asarray(new.memory_student)[0], [1.0, 0.0])
  np.testing.assert_allclose(np.asarray(new.memory_teacher)[0], [0.0, 1.0])


def test_dense_and_gathered_scores_agree(setup):
  state, v1, v2, idx = setup
  a = _nce(state, v1, v2, idx, dense_scores=True)
  b = _nce(state, v1, v2, idx, dense_scores=False)
  chex.assert_trees_all_close(a, b, rtol=1e-5, atol=1e-6)


def test_mask_equals_subset_and_skips_memory(setup):
  state, v1, v2, idx = setup
  mask = np.array([1, 1, 0, 1, 0, 1], bool)
  loss, new = _nce(state, v1, v2, idx, mask=mask)
  sub_loss, sub_new = _nce(state, v1[mask], v2[mask], idx[mask])
  np.testing.assert_allclose(float(loss), float(sub_loss), rtol=1e-5)
  chex.assert_trees_all_close(new, sub_new, rtol=1e-5, atol=1e-6)
  masked_rows = idx[~mask, 0]
  np.testing.assert_array_equal(np.asarray(new.memory_student)[masked_rows],
                                np.asarray(state.memory_student)[masked_rows])


def test_padding_with_out_of_range_index_under_jit(setup):
  state, v1, v2, idx = setup
  padded = idx.copy()
  padded[2] = -1  # a padding example with a dummy index
  mask = np.arange(B) != 2

  @jax.jit
  def f(v1, st):
    return _nce(st, v1, v2, padded, mask=mask)

  (loss, new), grad = f(v1, state), jax.jit(
      jax.grad(lambda v: f(v, state)[0]))(v1)
  sub_loss, sub_new = _nce(state, v1[mask], v2[mask], idx[mask])
  np.testing.assert_allclose(float(loss), float(sub_loss), rtol=1e-5)
  chex.assert_trees_all_close(new, sub_new, rtol=1e-5, atol=1e-6)
  assert np.all(np.isfinite(np.asarray(grad)))
  np.testing.assert_array_equal(np.asarray(grad)[2], 0.0)


def test_no_update_in_eval(setup):
  state, v1, v2, idx = setup
  _, new = _nce(state, v1, v2, idx, update_memory=False)
  np.testing.assert_array_equal(new.memory_student, state.memory_student)
  assert float(new.z_student) > 0  # Z is still estimated


def test_uniform_sampling_excludes_positive():
  state = crd.init_crd_state(jax.random.PRNGKey(0), 7, 4)
  indices = jnp.arange(7, dtype=jnp.int32)
  idx = np.asarray(crd.sample_contrast_indices(jax.random.PRNGKey(3), state,
                                               indices, 200))
  assert idx.shape == (7, 201)
  np.testing.assert_array_equal(idx[:, 0], np.arange(7))
  for b in range(7):
    negatives = idx[b, 1:]
    assert b not in negatives
    assert negatives.min() >= 0 and negatives.max() < 7
    assert len(np.unique(negatives)) == 6  # every other example is drawn


def test_other_class_sampling():
  labels = np.array([0, 1, 2, 0, 1, 2, 2, 2, 1, 0])
  state = crd.init_crd_state(jax.random.PRNGKey(0), 10, 4,
                             dataset_labels=labels)
  indices = jnp.arange(10, dtype=jnp.int32)
  idx = np.asarray(crd.sample_contrast_indices(jax.random.PRNGKey(5), state,
                                               indices, 300))
  for b in range(10):
    negatives = idx[b, 1:]
    assert np.all(labels[negatives] != labels[b])
    np.testing.assert_array_equal(np.unique(negatives),
                                  np.flatnonzero(labels != labels[b]))


def test_nce_k_clipped_to_dataset_size():
  state = crd.init_crd_state(jax.random.PRNGKey(0), 5, D)
  rng = np.random.default_rng(0)
  v = _unit(rng.normal(size=(3, D))).astype(np.float32)
  key, indices = jax.random.PRNGKey(1), jnp.array([0, 1, 2])
  # The default nce_k = 16384 is clipped to N - 1 = 4 negatives.
  clipped = crd.crd_loss(state, None, v, v, indices, key)
  explicit = crd.crd_loss(state, None, v, v, indices, key, nce_k=4)
  chex.assert_trees_all_equal(clipped, explicit)
  idx = crd.sample_contrast_indices(key, state, indices, 4)
  chex.assert_trees_all_close(
      clipped, _nce(state, v, v, idx), rtol=1e-6)
  with pytest.raises(ValueError, match=r"\[0, 5\)"):
    crd.crd_loss(state, None, v, v, jnp.array([0, 1, 5]), key)


def test_embed_head_unit_norm_and_torch_init():
  params = crd.init_crd_heads(jax.random.PRNGKey(0), jnp.zeros((2, 20)),
                              jnp.zeros((2, 4, 4, 3)), feat_dim=16)
  kernel = np.asarray(params["student"]["linear"]["kernel"])
  bias = np.asarray(params["student"]["linear"]["bias"])
  assert kernel.shape == (20, 16)
  assert params["teacher"]["linear"]["kernel"].shape == (48, 16)
  bound = 1 / math.sqrt(20)
  assert np.abs(kernel).max() <= bound and np.abs(bias).max() <= bound
  x = np.random.default_rng(0).normal(size=(5, 20)).astype(np.float32)
  out = crd.CRDEmbed(16).apply({"params": params["student"]}, x)
  ref = x @ kernel + bias
  np.testing.assert_allclose(np.asarray(out), _unit(ref), rtol=1e-5, atol=1e-6)


def test_crd_loss_jit_equals_eager_and_grads_finite():
  state = crd.init_crd_state(jax.random.PRNGKey(0), N, 16)
  rng = np.random.default_rng(2)
  fs = jnp.asarray(rng.normal(size=(B, 12)), jnp.float32)
  ft = jnp.asarray(rng.normal(size=(B, 20)), jnp.float32)
  params = crd.init_crd_heads(jax.random.PRNGKey(1), fs, ft, 16)
  indices = jnp.asarray(rng.permutation(N)[:B], jnp.int32)
  key = jax.random.PRNGKey(2)

  def f(p, fs, ft, st):
    return crd.crd_loss(st, p, fs, ft, indices, key, nce_k=20)

  eager = f(params, fs, ft, state)
  jitted = jax.jit(f)(params, fs, ft, state)
  chex.assert_trees_all_close(eager, jitted, rtol=1e-5, atol=1e-6)
  grads = jax.jit(jax.grad(lambda p, s: f(p, s, ft, state)[0],
                           argnums=(0, 1)))(params, fs)
  leaves = jax.tree.leaves(grads)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
  assert any(np.abs(np.asarray(g)).max() > 0 for g in leaves)
  # The memory carries no gradient.
  g_mem = jax.jit(jax.grad(lambda st: f(params, fs, ft, st)[0]))(state)
  assert np.all(np.asarray(g_mem.memory_student) == 0)
  assert np.all(np.asarray(g_mem.memory_teacher) == 0)


class _Out:

  def __init__(self, logits, features):
    self.logits = logits
    self.features = features


def test_crd_term_in_composition():
  rng = np.random.default_rng(3)
  student = _Out(jnp.zeros((B, 3)),
                 {"penultimate": jnp.asarray(rng.normal(size=(B, 12)),
                                             jnp.float32)})
  teacher = _Out(jnp.zeros((B, 3)),
                 {"penultimate": jnp.asarray(rng.normal(size=(B, 20)),
                                             jnp.float32)})
  batch = {"index": jnp.arange(B, dtype=jnp.int32),
           "label": jnp.zeros((B,), jnp.int32)}
  term = crd.crd_term("crd", num_data=N, feat_dim=16, nce_k=20)
  assert term.stateful and term.weight == 0.8
  loss_fn = compose([term])
  params = loss_fn.init_params(jax.random.PRNGKey(0), student, teacher, batch)
  state = loss_fn.init_state(jax.random.PRNGKey(1), student, teacher, batch)
  assert isinstance(state["crd"], crd.CRDState)
  assert state["crd"].memory_student.shape == (N, 16)
  total, aux = loss_fn(student, teacher, batch, params=params, state=state,
                       rng=jax.random.PRNGKey(2))
  np.testing.assert_allclose(float(total), 0.8 * float(aux.terms["crd"]),
                             rtol=1e-6)
  new = aux.state["crd"]
  assert not np.array_equal(new.memory_student, state["crd"].memory_student)
  _, aux_eval = loss_fn(student, teacher, batch, params=params, state=state,
                        rng=jax.random.PRNGKey(2), train=False)
  np.testing.assert_array_equal(aux_eval.state["crd"].memory_student,
                                state["crd"].memory_student)
  with pytest.raises(KeyError, match="index"):
    loss_fn(student, teacher, {"label": batch["label"]}, params=params,
            state=state, rng=jax.random.PRNGKey(2))
  with pytest.raises(KeyError, match="penultimate"):
    loss_fn(_Out(student.logits, {}), teacher, batch, params=params,
            state=state, rng=jax.random.PRNGKey(2))


def test_bad_inputs():
  state = crd.init_crd_state(jax.random.PRNGKey(0), N, D)
  v = jnp.ones((B, D)) / math.sqrt(D)
  with pytest.raises(ValueError, match="feat_dim"):
    crd.crd_nce_loss(state, jnp.ones((B, D + 1)), jnp.ones((B, D + 1)),
                     jnp.zeros((B, 3), jnp.int32))
  with pytest.raises(ValueError, match="contrast_indices"):
    crd.crd_nce_loss(state, v, v, jnp.zeros((B,), jnp.int32))
  with pytest.raises(ValueError, match="rng"):
    crd.crd_loss(state, None, v, v, jnp.arange(B), None)
  with pytest.raises(ValueError, match="dataset_labels"):
    crd.init_crd_state(jax.random.PRNGKey(0), N, D, dataset_labels=np.zeros(3,
                                                                            int))
