"""kdjax.lm: token-level KD terms, vocabularies, accumulation, constants, GKD, seq-KD."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import losses
from kdjax import lm
from kdjax import train
from kdjax.models import ModelOutput

TOK = lm.ByteTokenizer()
V = 259
T = 2.0


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_kl(p, q):
  return np.sum(np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0), -1)


def np_divergence(kind, zs, zt, temperature, beta=0.5, alpha=0.1):
  """Independent NumPy reference, per position (float64)."""
  q = np.exp(np_log_softmax(zs.astype(np.float64) / temperature))
  p = np.exp(np_log_softmax(zt.astype(np.float64) / temperature))
  if kind == "kl":
    d = np_kl(p, q)
  elif kind == "reverse_kl":
    d = np_kl(q, p)
  elif kind == "jsd":
    m = beta * p + (1 - beta) * q
    d = beta * np_kl(p, m) + (1 - beta) * np_kl(q, m)
  elif kind == "skew_kl":
    d = np_kl(p, alpha * p + (1 - alpha) * q)
  elif kind == "skew_reverse_kl":
    d = np_kl(q, alpha * q + (1 - alpha) * p)
  elif kind == "tvd":
    return 0.5 * np.abs(p - q).sum(-1)
  return temperature**2 * d


def np_masked_mean(values, mask):
  return np.sum(values * mask) / np.sum(mask)


def random_logits(seed, shape, scale=3.0):
  return (scale * np.random.default_rng(seed).normal(size=shape)).astype(
      np.float32)


MASK = np.array([[0, 1, 1, 1, 0], [0, 0, 0, 1, 1], [0, 0, 0, 0, 0]],
                np.float32)


def term_value(term, zs, zt, mask=MASK, temperature=T):
  inputs = losses.TermInputs(
      student=ModelOutput(logits=jnp.asarray(zs)),
      teacher=ModelOutput(logits=jnp.asarray(zt)),
      batch={"loss_mask": jnp.asarray(mask)},
      temperature=jnp.asarray(temperature, jnp.float32), step=jnp.asarray(0))
  return term(inputs)


# ----------------------------------------------------------------------------
# The token KD term.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind,kw", [("kl", {}), ("reverse_kl", {}),
                                     ("jsd", {"beta": 0.3}),
                                     ("skew_kl", {"alpha": 0.2}),
                                     ("skew_reverse_kl", {"alpha": 0.2}),
                                     ("tvd", {})])
def test_token_kd_every_divergence_matches_numpy_masked_mean(kind, kw):
  zs, zt = random_logits(0, (3, 5, 11)), random_logits(1, (3, 5, 11))
  term = lm.token_kd_term(kind, **kw)
  value = term_value(term, zs, zt)
  expected = np_masked_mean(np_divergence(kind, zs, zt, T, **kw), MASK)
  np.testing.assert_allclose(value, expected, rtol=2e-5, atol=1e-6)
  jitted = jax.jit(lambda a, b: term_value(term, a, b))(zs, zt)
  np.testing.assert_allclose(jitted, value, rtol=1e-6, atol=1e-7)
  grad = jax.grad(lambda a: term_value(term, a, zt))(jnp.asarray(zs))
  assert np.all(np.isfinite(grad))


def test_masked_tokens_change_nothing_and_padding_never_dilutes():
  zs, zt = random_logits(2, (3, 5, 11)), random_logits(3, (3, 5, 11))
  term = lm.token_kd_term("kl")
  value = term_value(term, zs, zt)
  # Arbitrary (even huge / non-finite) logits at masked positions.
  zs2, zt2 = zs.copy(), zt.copy()
  masked = MASK == 0
  zs2[masked] = 1e4 * random_logits(4, zs2[masked].shape)
  zt2[masked] = np.nan
  np.testing.assert_allclose(term_value(term, zs2, zt2), value, rtol=1e-6)
  grad = jax.grad(lambda a: term_value(term, a, zt2))(jnp.asarray(zs2))
  assert np.all(np.asarray(grad)[masked] == 0)
  assert np.all(np.isfinite(grad))
  # Extra padding (longer sequences, more padded examples) does not change it.
  pad = lambda x, v: np.pad(x, ((0, 2), (0, 3)) + ((0, 0),) * (x.ndim - 2),
                            constant_values=v)
  np.testing.assert_allclose(
      term_value(term, pad(zs, 1.0), pad(zt, -2.0), mask=pad(MASK, 0.0)),
      value, rtol=1e-6)
  # The mean is over the 5 unmasked tokens, not over the 15 positions.
  per_token = np_divergence("kl", zs, zt, T)
  np.testing.assert_allclose(value, (per_token * MASK).sum() / 5, rtol=2e-5)


@pytest.mark.parametrize("kind", ["kl", "reverse_kl", "jsd"])
def test_token_kd_from_top_k_teacher_with_tail_bucket_matches_numpy(kind):
  zs, zt = random_logits(5, (3, 5, 11)), random_logits(6, (3, 5, 11))
  k = 4
  term = lm.token_kd_term(kind, top_k=k)
  value = term_value(term, zs, zt)
  # NumPy: teacher's top-4 + tail bucket; student's mass at those indices + tail.
  idx = np.argsort(-zt, -1)[..., :k]
  p_full = np.exp(np_log_softmax(zt.astype(np.float64) / T))
  q_full = np.exp(np_log_softmax(zs.astype(np.float64) / T))
  p = np.take_along_axis(p_full, idx, -1)
  q = np.take_along_axis(q_full, idx, -1)
  p = np.concatenate([p, 1 - p.sum(-1, keepdims=True)], -1)
  q = np.concatenate([q, 1 - q.sum(-1, keepdims=True)], -1)
  if kind == "kl":
    d = np_kl(p, q)
  elif kind == "reverse_kl":
    d = np_kl(q, p)
  else:
    m = 0.5 * (p + q)
    d = 0.5 * np_kl(p, m) + 0.5 * np_kl(q, m)
  np.testing.assert_allclose(value, np_masked_mean(T**2 * d, MASK), rtol=1e-4)
  # k = V with the tail bucket is the dense divergence.
  dense = term_value(lm.token_kd_term(kind), zs, zt)
  full_k = term_value(lm.token_kd_term(kind, top_k=11), zs, zt)
  np.testing.assert_allclose(full_k, dense, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------
# Vocabularies.
# ----------------------------------------------------------------------------


def test_padded_vocabulary_rows_are_sliced_off():
  # One 9-token tokenizer; the student has 12 rows and the teacher 16.
  zs, zt = random_logits(7, (3, 5, 12)), random_logits(8, (3, 5, 16))
  value = term_value(lm.token_kd_term("kl", vocab_size=9), zs, zt)
  expected = np_masked_mean(
      np_divergence("kl", zs[..., :9], zt[..., :9], T), MASK)
  np.testing.assert_allclose(value, expected, rtol=2e-5)
  # The padding rows' logits do not matter.
  zs2, zt2 = zs.copy(), zt.copy()
  zs2[..., 9:] += 50.0
  zt2[..., 9:] = -7.0
  np.testing.assert_allclose(
      term_value(lm.token_kd_term("kl", vocab_size=9), zs2, zt2), value,
      rtol=1e-6)
  # Top-k teacher on the sliced teacher: indices stay below 9.
  top = term_value(lm.token_kd_term("kl", vocab_size=9, top_k=9), zs, zt)
  np.testing.assert_allclose(top, expected, rtol=1e-4)
  assert lm.check_vocabularies(264, 259, 259) == 259
  assert lm.check_vocabularies(259, 259) == 259


def test_different_vocabularies_are_rejected_with_both_sizes():
  zs, zt = random_logits(9, (3, 5, 12)), random_logits(10, (3, 5, 16))
  with pytest.raises(ValueError, match=r"student has 12.*teacher 16.*"
                     r"vocab_size=.*cross-tokenizer.*ULD"):
    term_value(lm.token_kd_term("kl"), zs, zt)
  with pytest.raises(ValueError, match=r"student has 12.*teacher 16.*"
                     r"tokenizer has 14.*cross-tokenizer"):
    term_value(lm.token_kd_term("kl", vocab_size=14), zs, zt)
  with pytest.raises(ValueError, match="unknown divergence"):
    lm.token_kd_term("hellinger")


# ----------------------------------------------------------------------------
# Train steps on a tiny transformer pair.
# ----------------------------------------------------------------------------

S_CFG = lm.TransformerConfig(vocab_size=264, num_layers=1, num_heads=2,
                             d_model=16, max_len=16)
T_CFG = lm.TransformerConfig(vocab_size=259, num_layers=2, num_heads=2,
                             d_model=32, max_len=16)
S_APPLY, T_APPLY = lm.make_lm_apply(S_CFG), lm.make_lm_apply(T_CFG)
L = 10


def kd_loss(kind="kl", **kw):
  return losses.compose(
      [losses.Term("kd", lm.token_kd_term(kind, vocab_size=V, **kw))],
      temperature=T)


def uneven_batch():
  """4 sequences with 6, 2, 5 and 0 trained tokens (completion + EOS)."""
  texts = [("ab", "cdefg"), ("hello w", "o"), ("x", "yzzy"), ("abcdefghi", "")]
  prompts = [TOK.encode(p) for p, _ in texts]
  completions = [list(c.encode()) + ([TOK.eos_id] if c else [])
                 for _, c in texts]
  return lm.make_lm_batch(prompts, completions, L)


def fresh_state(opt, seed=0):
  return train.create_state(lm.init_lm(S_CFG, jax.random.key(seed)), opt,
                            rng=jax.random.key(42))


@pytest.fixture(scope="module")
def teacher():
  return lm.init_lm(T_CFG, jax.random.key(1))


def test_uneven_accumulation_equals_full_batch(teacher):
  batch = uneven_batch()
  # Strided micro-batches: examples {0, 2} (11 tokens) and {1, 3} (2 tokens).
  assert batch["loss_mask"][0::2].sum() != batch["loss_mask"][1::2].sum()
  opt = optax.sgd(0.5)
  full_step = lm.make_lm_train_step(S_APPLY, T_APPLY, kd_loss(), opt,
                                    donate=False)
  acc_step = lm.make_lm_train_step(S_APPLY, T_APPLY, kd_loss(), opt,
                                   accumulation_steps=2, donate=False)
  equal_step = lm.make_lm_train_step(
      S_APPLY, T_APPLY, kd_loss(), opt, accumulation_steps=2, donate=False,
      accumulation_weighting="equal")
  state = fresh_state(opt)
  s_full, m_full = full_step(state, teacher, batch)
  s_acc, m_acc = acc_step(state, teacher, batch)
  s_eq, _ = equal_step(state, teacher, batch)
  np.testing.assert_allclose(m_acc["loss"], m_full["loss"], rtol=1e-5)
  diffs = jax.tree.map(lambda a, b: np.abs(np.asarray(a - b)).max(),
                       s_acc.params, s_full.params)
  assert max(jax.tree.leaves(diffs)) < 1e-6
  # The check can fail: averaging micro-batch means weights tokens unevenly.
  diffs = jax.tree.map(lambda a, b: np.abs(np.asarray(a - b)).max(),
                       s_eq.params, s_full.params)
  assert max(jax.tree.leaves(diffs)) > 1e-4
  # The full-batch loss is the token mean computed independently.
  s_logits = S_APPLY(fresh_state(opt).student_variables(), batch).logits
  t_logits = T_APPLY(teacher, batch).logits
  ref = np_masked_mean(np_divergence("kl", np.asarray(s_logits)[..., :V],
                                     np.asarray(t_logits), T),
                       batch["loss_mask"])
  np.testing.assert_allclose(m_full["loss"], ref, rtol=1e-4)


_DTYPE_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "i32": 4, "i64": 8, "f64": 8}


def largest_constant_bytes(text: str) -> int:
  largest = 0
  for match in re.finditer(r"stablehlo\.constant dense.*?: tensor<([^>]*)>",
                           text):
    *dims, dtype = match.group(1).split("x")
    size = int(np.prod([int(d) for d in dims])) if dims else 1
    largest = max(largest, size * _DTYPE_BYTES.get(dtype, 4))
  return largest


def test_teacher_params_are_arguments_not_constants():
  # A teacher whose embedding/unembedding (1040 x 256 floats) exceed 1 MiB.
  big_cfg = lm.TransformerConfig(vocab_size=1040, num_layers=1, num_heads=2,
                                 d_model=256, max_len=16)
  big_apply = lm.make_lm_apply(big_cfg)
  big = jax.eval_shape(lambda: lm.init_lm(big_cfg, jax.random.key(0)))
  big = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), big)
  assert big["params"]["unembed"]["kernel"].nbytes > 2**20
  opt = optax.adamw(1e-3)
  state = fresh_state(opt)
  batch = uneven_batch()
  step = lm.make_lm_train_step(S_APPLY, big_apply, kd_loss(), opt)
  text = step.lower(state, big, batch).as_text()
  assert largest_constant_bytes(text) < 2**20
  main = next(l for l in text.splitlines() if "func.func public @main" in l)
  assert "tensor<256x1040xf32>" in main
  gkd = lm.make_gkd_train_step(
      S_APPLY, big_apply, kd_loss(), opt, lmbda=0.5,
      sampling=lm.SamplingConfig(vocab_size=V, eos_id=258, pad_id=256))
  assert largest_constant_bytes(gkd.lower(state, big, batch).as_text()) < 2**20
  # The check can fail: a closed-over teacher becomes a constant.
  closed = lambda v, b, **kw: big_apply(big, b, **kw)
  step = lm.make_lm_train_step(S_APPLY, closed, kd_loss(), opt)
  assert largest_constant_bytes(step.lower(state, None, batch).as_text()) > 2**20


SAMPLING = lm.SamplingConfig(temperature=1.0, top_k=50, vocab_size=V,
                             eos_id=258, pad_id=256, suppress_ids=(256, 257))


def test_gkd_lambda_zero_equals_supervised_token_kd(teacher):
  opt = optax.adam(1e-2)
  batch = uneven_batch()
  loss = kd_loss("jsd", beta=0.5)
  supervised = lm.make_lm_train_step(S_APPLY, T_APPLY, loss, opt, donate=False)
  gkd0 = lm.make_gkd_train_step(S_APPLY, T_APPLY, loss, opt, lmbda=0.0,
                                sampling=SAMPLING, donate=False)
  gkd1 = lm.make_gkd_train_step(S_APPLY, T_APPLY, loss, opt, lmbda=1.0,
                                sampling=SAMPLING, donate=False)
  state = fresh_state(opt)
  s_sup, m_sup = supervised(state, teacher, batch)
  s_gkd, m_gkd = gkd0(state, teacher, batch)
  for a, b in zip(jax.tree.leaves(s_sup), jax.tree.leaves(s_gkd)):
    if jnp.issubdtype(a.dtype, jnp.floating):
      np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(m_sup["loss"], m_gkd["loss"])
  assert float(m_gkd["on_policy"]) == 0.0
  assert float(m_gkd["tokens"]) == batch["loss_mask"].sum()
  # lambda = 1: the student's own continuations are scored instead.
  s_on, m_on = gkd1(state, teacher, batch)
  assert float(m_on["on_policy"]) == 1.0
  assert float(m_on["loss"]) != float(m_sup["loss"])
  assert np.isfinite(float(m_on["loss"]))
  # The on-policy loss is the JSD over the student's generated tokens.
  rollout = lm.make_rollout_fn(S_APPLY.module, SAMPLING)
  key = jax.random.split(jax.random.fold_in(state.rng, 0x6B64))[1]
  gen = rollout(state.student_variables(), dict(batch), key)
  ref = term_value(lm.token_kd_term("jsd", beta=0.5, vocab_size=V),
                   S_APPLY(state.student_variables(), gen).logits,
                   T_APPLY(teacher, gen).logits, mask=gen["loss_mask"])
  np.testing.assert_allclose(m_on["loss"], ref, rtol=1e-5)
  assert float(m_on["tokens"]) == float(np.sum(gen["loss_mask"]))
  with pytest.raises(ValueError, match="lmbda"):
    lm.make_gkd_train_step(S_APPLY, T_APPLY, loss, opt, lmbda=1.5,
                           sampling=SAMPLING)


def test_sequence_kd_trains_on_teacher_generations(teacher):
  opt = optax.adam(1e-2)
  greedy = lm.SamplingConfig(temperature=0.0, vocab_size=V, eos_id=258,
                             pad_id=256, suppress_ids=(256, 257))
  loss = losses.compose([losses.Term("ce", lm.token_ce_term(vocab_size=V),
                                     needs_teacher=False)])
  step = lm.make_sequence_kd_step(S_APPLY, T_APPLY, loss, opt,
                                  sampling=greedy, donate=False)
  batch = uneven_batch()
  gen = lm.make_rollout_fn(T_APPLY.module, greedy)(teacher, dict(batch),
                                                   jax.random.key(0))
  # Targets are the teacher's greedy continuations.
  t_pred = np.argmax(np.asarray(T_APPLY(teacher, gen).logits), -1)
  m = np.asarray(gen["loss_mask"]) > 0
  np.testing.assert_array_equal(np.asarray(gen["targets"])[m], t_pred[m])
  state = fresh_state(opt)
  first = None
  for _ in range(8):
    state, metrics = step(state, teacher, batch)
    first = float(metrics["ce"]) if first is None else first
  assert float(metrics["ce"]) < first


def test_lm_step_options_are_token_mask_options(teacher):
  options = lm.lm_step_options()
  assert (options.mask_key, options.accumulation_weighting) == (
      lm.MASK_KEY, "mask")
  assert lm.lm_step_options(accumulation_steps=2).accumulation_steps == 2
  given = train.StepOptions(accumulation_steps=2)
  assert lm.lm_step_options(given) is given  # an object is used as it is
  opt = optax.sgd(0.5)
  batch = uneven_batch()
  by_keywords = lm.make_lm_train_step(S_APPLY, T_APPLY, kd_loss(), opt,
                                      accumulation_steps=2, donate=False)
  by_object = lm.make_lm_train_step(
      S_APPLY, T_APPLY, kd_loss(), opt,
      lm.lm_step_options(accumulation_steps=2), donate=False)
  state = fresh_state(opt)
  for a, b in zip(jax.tree.leaves(by_keywords(state, teacher, batch)[1]),
                  jax.tree.leaves(by_object(state, teacher, batch)[1])):
    np.testing.assert_array_equal(a, b)


def test_jitted_gkd_step_with_checks_is_checkified(teacher):
  """A GKD step built with checks raises on a bad teacher (it used to fail
  to compile: its checks were jitted without checkify)."""
  opt = optax.sgd(0.1)
  loss = kd_loss("jsd", beta=0.5)
  batch = uneven_batch()
  checked = lm.make_gkd_train_step(S_APPLY, T_APPLY, loss, opt, lmbda=0.0,
                                   sampling=SAMPLING, donate=False,
                                   checks=True)
  plain = lm.make_gkd_train_step(S_APPLY, T_APPLY, loss, opt, lmbda=0.0,
                                 sampling=SAMPLING, donate=False)
  state = fresh_state(opt)
  np.testing.assert_array_equal(checked(state, teacher, batch)[1]["loss"],
                                plain(state, teacher, batch)[1]["loss"])
  bad = jax.tree.map(lambda x: x * jnp.nan, teacher)
  with pytest.raises(FloatingPointError, match="non-finite"):
    checked(state, bad, batch)


def test_distilled_student_divergence_to_teacher_falls(teacher):
  rng = np.random.default_rng(0)
  prompts = [TOK.encode(chr(97 + i % 26)) for i in range(8)]
  completions = [list(rng.integers(97, 123, size=L - 1)) for _ in range(8)]
  batch = lm.make_lm_batch(prompts, completions, L)
  opt = optax.adam(3e-3)
  step = lm.make_lm_train_step(S_APPLY, T_APPLY, kd_loss(), opt)
  state = fresh_state(opt)

  def divergence(params):
    s = S_APPLY({"params": params}, batch).logits
    t = T_APPLY(teacher, batch).logits
    total, n = lm.token_divergence_sums(s, t, batch["loss_mask"],
                                        vocab_size=V)
    return float(total / n)

  before = divergence(state.params)
  for _ in range(25):
    state, _ = step(state, teacher, batch)
  after = divergence(state.params)
  assert after < 0.5 * before, (before, after)
