"""Memory-lean LM terms (kdjax/lm/_lean.py) against the full-logit terms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import lm
from kdjax import losses
from kdjax import train

V = 300
STUDENT = lm.TransformerConfig(vocab_size=V, num_layers=1, num_heads=2,
                               d_model=16, max_len=16)
TEACHER = lm.TransformerConfig(vocab_size=V + 20, num_layers=1, num_heads=2,
                               d_model=24, max_len=16)


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  return {"tokens": jnp.asarray(rng.integers(0, V, (4, 16)), jnp.int32),
          "targets": jnp.asarray(rng.integers(0, V, (4, 16)), jnp.int32),
          "loss_mask": jnp.asarray(rng.random((4, 16)) > 0.3, jnp.float32)}


def test_compute_logits_false_returns_hidden_and_unembedding():
  variables = lm.init_lm(STUDENT, jax.random.key(0))
  batch = _batch()
  full = lm.make_lm_apply(STUDENT)(variables, batch)
  lean = lm.make_lm_apply(STUDENT, compute_logits=False)(variables, batch)
  assert lean.logits is None
  kernel = lean.features["unembedding_kernel"]
  bias = lean.features["unembedding_bias"]
  np.testing.assert_allclose(lean.features["hidden"] @ kernel + bias,
                             full.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("divergence", ["kl", "jsd"])
def test_lean_step_equals_full_logit_step(divergence):
  # SGD, not Adam: Adam turns the rounding noise of exactly-zero gradients
  # (the attention key bias) into lr-sized updates.
  opt = optax.sgd(0.1)
  full_loss = losses.compose([
      losses.Term("kd", lm.token_kd_term(divergence, vocab_size=V)),
      losses.Term("ce", lm.token_ce_term(vocab_size=V), needs_teacher=False),
  ], temperature=2.0)
  lean_loss = losses.compose([
      losses.Term("kd", lm.lean_token_kd_term(divergence, vocab_size=V,
                                              chunk_size=7)),
      losses.Term("ce", lm.lean_token_ce_term(vocab_size=V, chunk_size=7),
                  needs_teacher=False),
  ], temperature=2.0)
  full_step = lm.make_lm_train_step(
      lm.make_lm_apply(STUDENT), lm.make_lm_apply(TEACHER), full_loss, opt,
      donate=False)
  lean_step = lm.make_lm_train_step(
      lm.make_lm_apply(STUDENT, compute_logits=False),
      lm.make_lm_apply(TEACHER, compute_logits=False), lean_loss, opt,
      donate=False)
  teacher = lm.init_lm(TEACHER, jax.random.key(1))
  state_a = state_b = train.create_state(lm.init_lm(STUDENT, jax.random.key(2)),
                                         opt, rng=jax.random.key(0))
  for seed in range(3):
    batch = _batch(seed)
    state_a, m_a = full_step(state_a, teacher, batch)
    state_b, m_b = lean_step(state_b, teacher, batch)
    for key in ("kd", "ce", "loss"):
      np.testing.assert_allclose(m_b[key], m_a[key], rtol=2e-5)
  for a, b in zip(jax.tree.leaves(state_a.params),
                  jax.tree.leaves(state_b.params)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_missing_features_error_names_the_fix():
  term = lm.lean_token_kd_term()
  variables = lm.init_lm(STUDENT, jax.random.key(0))
  out = lm.make_lm_apply(STUDENT)(variables, _batch())
  inputs = losses.TermInputs(student=out, teacher=out, batch=_batch(),
                             temperature=1.0, step=0, params=None, state=None,
                             rng=None, train=True)
  with pytest.raises(KeyError, match="compute_logits=False"):
    term(inputs)


def test_bf16_policy_keeps_lean_operands_in_compute_dtype():
  policy = train.Policy.bf16()
  variables = lm.init_lm(STUDENT, jax.random.key(0))
  bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), variables)
  lean = lm.make_lm_apply(STUDENT, compute_logits=False)(bf16, _batch())
  cast = policy.cast_output(lean)
  assert {k: v.dtype for k, v in cast.features.items()} == {
      "hidden": jnp.bfloat16, "unembedding_kernel": jnp.bfloat16,
      "unembedding_bias": jnp.bfloat16}
  # Ordinary outputs are still cast to float32 for the loss.
  full = policy.cast_output(lm.make_lm_apply(STUDENT, return_hidden=True)(
      bf16, _batch()))
  assert full.logits.dtype == jnp.float32
  assert full.features["hidden"].dtype == jnp.float32
  # And the bf16 lean step tracks the bf16 full-logit step.
  opt = optax.sgd(0.1)
  state = train.create_state(variables, opt, rng=jax.random.key(0))
  teacher = lm.init_lm(TEACHER, jax.random.key(1))
  values = []
  for apply_kw, term in (({}, lm.token_kd_term(vocab_size=V)),
                         ({"compute_logits": False},
                          lm.lean_token_kd_term(vocab_size=V, chunk_size=16))):
    step = lm.make_lm_train_step(
        lm.make_lm_apply(STUDENT, **apply_kw),
        lm.make_lm_apply(TEACHER, **apply_kw),
        losses.compose([losses.Term("kd", term)]), opt, policy=policy,
        donate=False)
    values.append(float(step(state, teacher, _batch())[1]["kd"]))
  np.testing.assert_allclose(values[1], values[0], rtol=2e-2)


SHARDED_STEP_CODE = r"""
import jax, jax.numpy as jnp, numpy as np, optax
from kdjax import lm, losses, parallel, train

V, ROWS = 300, 320   # tokenizer size; rows padded to a multiple of 4 devices
s_cfg = lm.TransformerConfig(vocab_size=ROWS, num_layers=1, num_heads=2, d_model=16, max_len=16)
t_cfg = lm.TransformerConfig(vocab_size=ROWS, num_layers=1, num_heads=2, d_model=24, max_len=16)
rng = np.random.default_rng(0)
batch = {"tokens": jnp.asarray(rng.integers(0, V, (4, 16)), jnp.int32),
         "targets": jnp.asarray(rng.integers(0, V, (4, 16)), jnp.int32),
         "loss_mask": jnp.asarray(rng.random((4, 16)) > 0.3, jnp.float32)}
mesh = parallel.make_mesh({"data": 2, "model": 4})
opt = optax.sgd(0.1)
teacher = lm.init_lm(t_cfg, jax.random.key(1))
state = train.create_state(lm.init_lm(s_cfg, jax.random.key(2)), opt, rng=jax.random.key(0))
results = []
for kw in ({}, {"mesh": mesh, "token_axis": "data"}):
  loss = losses.compose([
      losses.Term("kd", lm.lean_token_kd_term("jsd", vocab_size=V, chunk_size=8, **kw)),
      losses.Term("ce", lm.lean_token_ce_term(vocab_size=V, chunk_size=8, **kw), needs_teacher=False)],
      temperature=2.0)
  step = lm.make_lm_train_step(lm.make_lm_apply(s_cfg, compute_logits=False),
                               lm.make_lm_apply(t_cfg, compute_logits=False), loss, opt, donate=False)
  results.append(step(state, teacher, batch))
(a, ma), (b, mb) = results
for key in ("kd", "ce"):
  np.testing.assert_allclose(mb[key], ma[key], rtol=1e-5)
err = max(float(jnp.max(jnp.abs(x - y))) for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)))
assert err < 1e-5, err
print("OK", err)
"""


def test_vocab_sharded_lean_step_equals_unsharded(subprocess_runner):
  assert "OK" in subprocess_runner(SHARDED_STEP_CODE, devices=8)


def test_on_policy_gkd_with_lean_terms():
  """GKD (lambda = 1) with the memory-lean JSD equals GKD with full logits."""
  sampling = lm.SamplingConfig(temperature=1.0, top_k=20, vocab_size=V,
                               eos_id=258, pad_id=256, suppress_ids=(256, 257))
  opt = optax.sgd(0.1)
  teacher = lm.init_lm(TEACHER, jax.random.key(1))
  state = train.create_state(lm.init_lm(STUDENT, jax.random.key(2)), opt,
                             rng=jax.random.key(3))
  batch = _batch()
  batch["prompt_len"] = jnp.full((4,), 5, jnp.int32)
  outs = []
  for kw, term in (({}, lm.token_kd_term("jsd", vocab_size=V)),
                   ({"compute_logits": False},
                    lm.lean_token_kd_term("jsd", vocab_size=V, chunk_size=8))):
    step = lm.make_gkd_train_step(
        lm.make_lm_apply(STUDENT, **kw), lm.make_lm_apply(TEACHER, **kw),
        losses.compose([losses.Term("gkd", term)]), opt, lmbda=1.0,
        sampling=sampling, donate=False)
    outs.append(step(state, teacher, batch))
  (a, ma), (b, mb) = outs
  assert float(mb["on_policy"]) == 1.0
  np.testing.assert_allclose(mb["gkd"], ma["gkd"], rtol=1e-5)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(y, x, rtol=1e-4, atol=1e-6)
