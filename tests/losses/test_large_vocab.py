"""Tests of the memory-lean divergences from hidden states (kdjax/losses/_large_vocab.py)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import losses
from kdjax.losses import _large_vocab as lv

B, T, DS, DT, V = 2, 5, 6, 7, 11
LEAN = ("fused", "checkpointed")


def _problem(seed=0, v=V, dtype=jnp.float32, bias=True):
  rng = np.random.default_rng(seed)
  arr = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)
  h_s, h_t = arr(B, T, DS), arr(B, T, DT)
  emb_s = losses.Unembedding(arr(DS, v), arr(v) if bias else None)
  emb_t = losses.Unembedding(arr(DT, v), arr(v) if bias else None)
  mask = jnp.asarray(rng.random((B, T)) > 0.3)
  return h_s, emb_s, h_t, emb_t, mask


def _logits(h, emb):
  z = jnp.asarray(h, jnp.float32) @ jnp.asarray(emb.kernel, jnp.float32)
  return z if emb.bias is None else z + jnp.asarray(emb.bias, jnp.float32)


def _max_err(a, b):
  return max(float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32)
                                   - jnp.asarray(y, jnp.float32))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _np_log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("divergence", losses.DIVERGENCES)
@pytest.mark.parametrize("implementation", LEAN)
def test_value_and_gradient_equal_plain(divergence, implementation):
  h_s, emb_s, h_t, emb_t, mask = _problem()

  def plain(h, kernel, bias):
    return losses.logit_divergence(
        _logits(h, losses.Unembedding(kernel, bias)), _logits(h_t, emb_t), 2.0,
        divergence=divergence, beta=0.3, alpha=0.2, mask=mask)

  def lean(h, kernel, bias):
    # chunk_size=3 does not divide the 10 tokens: the last chunk is padded.
    return losses.divergence_from_hidden(
        h, losses.Unembedding(kernel, bias), h_t, emb_t, 2.0,
        divergence=divergence, beta=0.3, alpha=0.2, mask=mask, chunk_size=3,
        implementation=implementation)

  ref, ref_grad = jax.value_and_grad(plain, argnums=(0, 1, 2))(h_s, *emb_s)
  val, grad = jax.jit(jax.value_and_grad(lean, argnums=(0, 1, 2)))(h_s, *emb_s)
  np.testing.assert_allclose(val, ref, rtol=1e-5, atol=1e-6)
  assert _max_err(grad, ref_grad) < 1e-5
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in grad)


def test_forward_kl_against_numpy_formula():
  h_s, emb_s, h_t, emb_t, mask = _problem(seed=3)
  t = 1.5
  zs = np.asarray(_logits(h_s, emb_s), np.float64) / t
  zt = np.asarray(_logits(h_t, emb_t), np.float64) / t
  log_p, log_q = _np_log_softmax(zt), _np_log_softmax(zs)
  per = (np.exp(log_p) * (log_p - log_q)).sum(-1) * t ** 2
  m = np.asarray(mask, np.float64)
  expected = (per * m).sum() / m.sum()
  got = losses.divergence_from_hidden(h_s, emb_s, h_t, emb_t, t, mask=mask,
                                      chunk_size=4)
  np.testing.assert_allclose(got, expected, rtol=1e-5)


def test_no_bias_reductions_and_traced_scalars():
  h_s, emb_s, h_t, emb_t, mask = _problem(seed=1, bias=False)
  zs, zt = _logits(h_s, emb_s), _logits(h_t, emb_t)
  for reduction in ("sum", "none"):
    ref = losses.logit_divergence(zs, zt, 1.0, divergence="jsd", mask=mask,
                                  reduction=reduction)
    got = losses.divergence_from_hidden(h_s, emb_s, h_t, emb_t, 1.0,
                                        divergence="jsd", mask=mask,
                                        reduction=reduction, chunk_size=4)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)

  # Temperature and beta as traced values (e.g. following a schedule).
  @jax.jit
  def f(temperature, beta):
    return losses.divergence_from_hidden(h_s, emb_s, h_t, emb_t, temperature,
                                         divergence="jsd", beta=beta,
                                         chunk_size=4)

  for beta in (0.0, 0.4, 1.0):
    ref = losses.logit_divergence(zs, zt, 3.0, divergence="jsd", beta=beta)
    np.testing.assert_allclose(f(3.0, beta), ref, rtol=1e-5)


@pytest.mark.parametrize("implementation", LEAN)
def test_gradients_of_temperature_beta_and_mask_weights(implementation):
  """A learnt temperature / beta or soft mask weights get the plain gradients."""
  h_s, emb_s, h_t, emb_t, _ = _problem(seed=9)
  weights = jnp.asarray(np.random.default_rng(1).random((B, T)), jnp.float32)
  zs, zt = _logits(h_s, emb_s), _logits(h_t, emb_t)

  def plain(temperature, beta, w):
    return losses.logit_divergence(zs, zt, temperature, divergence="jsd",
                                   beta=beta, mask=w)

  def lean(temperature, beta, w):
    return losses.divergence_from_hidden(
        h_s, emb_s, h_t, emb_t, temperature, divergence="jsd", beta=beta,
        mask=w, chunk_size=3, implementation=implementation)

  ref = jax.grad(plain, argnums=(0, 1, 2))(2.0, 0.3, weights)
  got = jax.jit(jax.grad(lean, argnums=(0, 1, 2)))(2.0, 0.3, weights)
  assert _max_err(got, ref) < 1e-5, (got, ref)
  assert float(jnp.abs(got[0])) > 1e-3 and float(jnp.abs(got[1])) > 1e-3


def test_padded_vocabulary_slicing():
  h_s, emb_s, h_t, emb_t, mask = _problem(seed=2, v=V + 5)
  emb_t = losses.Unembedding(emb_t.kernel[:, :V + 2], emb_t.bias[:V + 2])
  ref = losses.logit_divergence(_logits(h_s, emb_s)[..., :V],
                                _logits(h_t, emb_t)[..., :V], mask=mask)
  got = losses.divergence_from_hidden(h_s, emb_s, h_t, emb_t, vocab_size=V,
                                      mask=mask, chunk_size=4)
  np.testing.assert_allclose(got, ref, rtol=1e-5)


@pytest.mark.parametrize("tail_bucket", [True, False])
@pytest.mark.parametrize("divergence", ["kl", "jsd", "tvd"])
def test_top_k_teacher(tail_bucket, divergence):
  h_s, emb_s, h_t, emb_t, mask = _problem(seed=4)
  teacher = losses.top_k_teacher(_logits(h_t, emb_t), 4, temperature=2.0)

  def plain(h, kernel, bias):
    return losses.top_k_divergence(
        _logits(h, losses.Unembedding(kernel, bias)), teacher, 2.0,
        divergence=divergence, tail_bucket=tail_bucket, mask=mask)

  def lean(h, kernel, bias):
    return losses.top_k_divergence_from_hidden(
        h, losses.Unembedding(kernel, bias), teacher, 2.0,
        divergence=divergence, tail_bucket=tail_bucket, mask=mask,
        chunk_size=3)

  ref, ref_grad = jax.value_and_grad(plain, argnums=(0, 1, 2))(h_s, *emb_s)
  val, grad = jax.jit(jax.value_and_grad(lean, argnums=(0, 1, 2)))(h_s, *emb_s)
  np.testing.assert_allclose(val, ref, rtol=1e-5, atol=1e-7)
  assert _max_err(grad, ref_grad) < 1e-5


def test_cross_entropy_from_hidden():
  h_s, emb_s, _, _, mask = _problem(seed=5)
  labels = jnp.asarray(np.random.default_rng(0).integers(0, V, (B, T)))

  def plain(h, kernel, bias):
    return losses.hard_label_cross_entropy(
        _logits(h, losses.Unembedding(kernel, bias)), labels, mask=mask)

  def lean(h, kernel, bias):
    return losses.cross_entropy_from_hidden(
        h, losses.Unembedding(kernel, bias), labels, mask=mask, chunk_size=4)

  ref, ref_grad = jax.value_and_grad(plain, argnums=(0, 1, 2))(h_s, *emb_s)
  val, grad = jax.value_and_grad(lean, argnums=(0, 1, 2))(h_s, *emb_s)
  np.testing.assert_allclose(val, ref, rtol=1e-6)
  assert _max_err(grad, ref_grad) < 1e-5


def test_bfloat16_inputs_accumulate_in_float32():
  h_s, emb_s, h_t, emb_t, mask = _problem(seed=6, dtype=jnp.bfloat16)

  def plain(h, kernel, bias):
    # The reference: same bf16 values, everything in float32.
    return losses.kl_divergence(
        _logits(h, losses.Unembedding(kernel, bias)), _logits(h_t, emb_t),
        mask=mask)

  def lean(h, kernel, bias):
    return losses.divergence_from_hidden(
        h, losses.Unembedding(kernel, bias), h_t, emb_t, mask=mask,
        chunk_size=4)

  ref, ref_grad = jax.value_and_grad(plain, argnums=(0, 1, 2))(h_s, *emb_s)
  val, grad = jax.jit(jax.value_and_grad(lean, argnums=(0, 1, 2)))(h_s, *emb_s)
  assert val.dtype == jnp.float32
  np.testing.assert_allclose(val, ref, rtol=1e-5)
  assert [g.dtype for g in grad] == [jnp.bfloat16] * 3
  for g, r in zip(grad, ref_grad):
    # bf16 gradients: within bf16 rounding of the float32 reference.
    np.testing.assert_allclose(np.asarray(g, np.float32),
                               np.asarray(r, np.float32), rtol=2e-2,
                               atol=2e-2 * float(jnp.max(jnp.abs(r))))


class VariantsTest(chex.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  def test_variants_and_vmap(self):
    h_s, emb_s, h_t, emb_t, mask = _problem(seed=7)
    f = self.variant(lambda h: losses.divergence_from_hidden(
        h, emb_s, h_t, emb_t, 2.0, mask=mask, chunk_size=4))
    ref = losses.kl_divergence(_logits(h_s, emb_s), _logits(h_t, emb_t), 2.0,
                               mask=mask)
    np.testing.assert_allclose(f(h_s), ref, rtol=1e-5)
    # vmap over a stack of problems, gradient included.
    stacked = jnp.stack([h_s, 2.0 * h_s])
    grads = jax.vmap(jax.grad(lambda h: losses.divergence_from_hidden(
        h, emb_s, h_t, emb_t, 2.0, mask=mask, chunk_size=4)))(stacked)
    ref_grad = jax.grad(lambda h: losses.kl_divergence(
        _logits(h, emb_s), _logits(h_t, emb_t), 2.0, mask=mask))(2.0 * h_s)
    assert _max_err(grads[1], ref_grad) < 1e-5


def test_teacher_gets_no_gradient():
  h_s, emb_s, h_t, emb_t, _ = _problem(seed=8)
  g = jax.grad(lambda ht, k: losses.divergence_from_hidden(
      h_s, emb_s, ht, losses.Unembedding(k, emb_t.bias), chunk_size=4),
               argnums=(0, 1))(h_t, emb_t.kernel)
  assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in g)


def test_fully_masked_is_zero():
  h_s, emb_s, h_t, emb_t, _ = _problem()
  mask = jnp.zeros((B, T))
  val, grad = jax.value_and_grad(lambda h: losses.divergence_from_hidden(
      h, emb_s, h_t, emb_t, mask=mask, chunk_size=3))(h_s)
  assert float(val) == 0.0 and float(jnp.max(jnp.abs(grad))) == 0.0


def test_choose_chunk_size():
  assert lv.choose_chunk_size(16384, 128256, 1 << 30) == 256
  assert lv.choose_chunk_size(100, 128256, 1 << 40) == 100  # capped at N
  assert lv.choose_chunk_size(10, 10 ** 9, 1024) == 1  # at least one token
  assert lv.choose_chunk_size(16384, 32000, 1 << 30) % 8 == 0
  with pytest.raises(ValueError, match="memory_budget_bytes"):
    lv.choose_chunk_size(10, 10, 0)


def test_clear_errors():
  h_s, emb_s, h_t, emb_t, mask = _problem()
  with pytest.raises(ValueError, match="hidden-size mismatch.*student"):
    losses.divergence_from_hidden(h_s[..., :4], emb_s, h_t, emb_t)
  with pytest.raises(ValueError, match="hidden-size mismatch.*teacher"):
    losses.divergence_from_hidden(h_s, emb_s, h_t[..., :3], emb_t)
  for bad in (0, -2, 2.5, True):
    with pytest.raises(ValueError, match="chunk_size"):
      losses.divergence_from_hidden(h_s, emb_s, h_t, emb_t, chunk_size=bad)
  with pytest.raises(ValueError, match="temperature"):
    losses.divergence_from_hidden(h_s, emb_s, h_t, emb_t, 0.0)
  with pytest.raises(ValueError, match="vocabulary mismatch.*11.*9.*Universal"):
    losses.divergence_from_hidden(
        h_s, emb_s, h_t, losses.Unembedding(emb_t.kernel[:, :9],
                                            emb_t.bias[:9]))
  with pytest.raises(ValueError, match="bias"):
    losses.divergence_from_hidden(
        h_s, losses.Unembedding(emb_s.kernel, emb_s.bias[:3]), h_t, emb_t)
  with pytest.raises(ValueError, match="mask shape"):
    losses.divergence_from_hidden(h_s, emb_s, h_t, emb_t, mask=mask[:, :2])
  with pytest.raises(ValueError, match="implementation"):
    losses.divergence_from_hidden(h_s, emb_s, h_t, emb_t,
                                  implementation="magic")
  with pytest.raises(ValueError, match="leading"):
    losses.divergence_from_hidden(h_s, emb_s, h_t[:1], emb_t)
  with pytest.raises(ValueError, match="vocab_size"):
    losses.divergence_from_hidden(h_s, emb_s, h_t, emb_t, vocab_size=V + 1)


def _temp_bytes(fn, *args) -> int:
  return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def test_memory_grows_by_far_less_than_full_logits():
  """Structural: at a fixed chunk, doubling the tokens barely grows temporaries."""
  v, d, chunk = 4096, 16, 64
  rng = np.random.default_rng(0)
  kernel_s = jnp.asarray(rng.standard_normal((d, v)), jnp.float32)
  kernel_t = jnp.asarray(rng.standard_normal((d, v)), jnp.float32)

  def grad_fn(implementation):
    def f(h_s, h_t):
      return jax.grad(lambda h, k: losses.divergence_from_hidden(
          h, losses.Unembedding(k), h_t, losses.Unembedding(kernel_t),
          chunk_size=chunk, implementation=implementation),
                      argnums=(0, 1))(h_s, kernel_s)
    return f

  temps = {}
  for n in (512, 1024):
    h = jnp.zeros((n, d), jnp.float32)
    for impl in ("fused", "plain"):
      temps[impl, n] = _temp_bytes(grad_fn(impl), h, h)
  full_logits = 512 * v * 4  # one [512, V] float32 array: 8 MiB
  growth = temps["fused", 1024] - temps["fused", 512]
  assert growth < full_logits / 4, (temps, full_logits)
  # ... while the plain version grows by several full logit arrays.
  assert temps["plain", 1024] - temps["plain", 512] > 2 * full_logits, temps
  assert temps["fused", 1024] < temps["plain", 1024] / 4, temps


SHARDED_CODE = r"""
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
from kdjax import losses
from kdjax.parallel import make_mesh

mesh = make_mesh({"data": 2, "model": 4})
rng = np.random.default_rng(0)
B, T, DS, DT, V = 4, 5, 6, 7, 16
arr = lambda *s: jnp.asarray(rng.standard_normal(s), jnp.float32)
h_s, h_t = arr(B, T, DS), arr(B, T, DT)
w_s, b_s, w_t, b_t = arr(DS, V), arr(V), arr(DT, V), arr(V)
mask = jnp.asarray(rng.random((B, T)) > 0.3)
worst = 0.0

def check(lean, plain):
  global worst
  ref, ref_g = jax.value_and_grad(plain, argnums=(0, 1, 2))(h_s, w_s, b_s)
  val, g = jax.jit(jax.value_and_grad(lean, argnums=(0, 1, 2)))(h_s, w_s, b_s)
  err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(g, ref_g))
  assert abs(float(val) - float(ref)) < 1e-5 * max(1.0, abs(float(ref))), (val, ref)
  assert err < 1e-5, err
  worst = max(worst, err)

for divergence in ("kl", "reverse_kl", "jsd", "skew_kl", "tvd"):
  for vocab_size in (None, 13):
    sl = slice(None, vocab_size)
    for impl in ("fused", "checkpointed", "plain"):
      check(lambda h, w, b: losses.vocab_sharded_divergence_from_hidden(
                mesh, h, losses.Unembedding(w, b), h_t,
                losses.Unembedding(w_t, b_t), 2.0, divergence=divergence,
                mask=mask, token_axis="data", vocab_size=vocab_size,
                chunk_size=3, implementation=impl),
            lambda h, w, b: losses.logit_divergence(
                (h @ w + b)[..., sl], (h_t @ w_t + b_t)[..., sl], 2.0,
                divergence=divergence, mask=mask))

top = losses.top_k_teacher(h_t @ w_t + b_t, 4, temperature=2.0)
check(lambda h, w, b: losses.vocab_sharded_divergence_from_hidden(
          mesh, h, losses.Unembedding(w, b), temperature=2.0,
          teacher_top_k=top, mask=mask, token_axis="data", chunk_size=3),
      lambda h, w, b: losses.top_k_divergence(h @ w + b, top, 2.0, mask=mask))

labels = jnp.asarray(rng.integers(0, 13, (B, T)), jnp.int32)
check(lambda h, w, b: losses.vocab_sharded_divergence_from_hidden(
          mesh, h, losses.Unembedding(w, b), labels=labels, mask=mask,
          token_axis="data", vocab_size=13, chunk_size=3),
      lambda h, w, b: losses.hard_label_cross_entropy((h @ w + b)[..., :13],
                                                      labels, mask=mask))

# Replicated tokens (no data axis) with the vocabulary over all 8 devices.
mesh8 = make_mesh({"model": 8})
check(lambda h, w, b: losses.vocab_sharded_divergence_from_hidden(
          mesh8, h, losses.Unembedding(w, b), h_t, losses.Unembedding(w_t, b_t),
          divergence="jsd", chunk_size=4),
      lambda h, w, b: losses.logit_divergence(h @ w + b, h_t @ w_t + b_t,
                                              divergence="jsd"))

# No [tokens, vocab] array is ever all-gathered.
lean = jax.jit(jax.grad(lambda h, w, b: losses.vocab_sharded_divergence_from_hidden(
    mesh, h, losses.Unembedding(w, b), h_t, losses.Unembedding(w_t, b_t),
    mask=mask, token_axis="data", chunk_size=3), argnums=(0, 1, 2)))
hlo = lean.lower(h_s, w_s, b_s).compile().as_text()
gathers = [l for l in hlo.splitlines() if "all-gather" in l and "=" in l]
big = [l for l in gathers if ",16]" in l.split("=")[0] or "16]" in l.split("all-gather")[0]]
assert not big, big

try:
  losses.vocab_sharded_divergence_from_hidden(
      mesh, h_s, losses.Unembedding(w_s[:, :15], b_s[:15]), h_t,
      losses.Unembedding(w_t[:, :15], b_t[:15]))
except ValueError as e:
  assert "does not divide" in str(e), e
else:
  raise AssertionError("expected a ValueError")
# A top-k index in a padded column: a clear error eagerly, NaN (never a
# silent value) when the indices are traced.
bad = top._replace(indices=top.indices.at[0, 0, 0].set(14))
try:
  losses.vocab_sharded_divergence_from_hidden(
      mesh, h_s, losses.Unembedding(w_s, b_s), temperature=2.0,
      teacher_top_k=bad, vocab_size=13, token_axis="data")
except ValueError as e:
  assert "class-count mismatch" in str(e), e
else:
  raise AssertionError("expected a ValueError")
traced = jax.jit(lambda idx: losses.vocab_sharded_divergence_from_hidden(
    mesh, h_s, losses.Unembedding(w_s, b_s), temperature=2.0,
    teacher_top_k=bad._replace(indices=idx), vocab_size=13,
    token_axis="data"))(bad.indices)
assert np.isnan(float(traced)), traced

# Inside a user's shard_map: check_vma=False would double-count the hidden
# gradient, so it is refused; an axis given as a list works like a tuple.
def inner(h, w, b, ht, wt, bt):
  return losses.divergence_from_hidden(
      h, losses.Unembedding(w, b), ht, losses.Unembedding(wt, bt),
      axis_name=["model"], reduction="sum")
specs = (P(), P(None, "model"), P("model"), P(), P(None, "model"), P("model"))
args = (h_s, w_s, b_s, h_t, w_t, b_t)
ok = jax.shard_map(inner, mesh=mesh8, in_specs=specs, out_specs=P())(*args)
np.testing.assert_allclose(ok, losses.kl_divergence(
    h_s @ w_s + b_s, h_t @ w_t + b_t, reduction="sum"), rtol=1e-5)
try:
  jax.shard_map(inner, mesh=mesh8, in_specs=specs, out_specs=P(),
                check_vma=False)(*args)
except ValueError as e:
  assert "check_vma=True" in str(e), e
else:
  raise AssertionError("expected a ValueError")
print("OK", worst)
"""


def test_vocab_sharded_equals_unsharded(subprocess_runner):
  out = subprocess_runner(SHARDED_CODE, devices=8)
  assert "OK" in out
