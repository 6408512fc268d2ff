"""kdjax's token KD step vs Tunix's own distillation trainer (LogitStrategy).

The same tiny Qwen3 teacher / smaller Qwen3 student and the same batches.
Conventions (see BUILD_NOTES.md, "Tunix model families (#16)"):

* Tunix's ``LogitStrategy`` loss is ``alpha * T^2 * mean_{b,t} KL_t + (1 -
  alpha) * mean_{b,t} CE_t``, both means over all ``B x L`` positions, the KL
  *unmasked* (prompt and padding included) and the CE with masked one-hot
  labels (masked positions count 0 but stay in the denominator).
* kdjax's ``token_kd_term`` / ``token_ce_term`` are means over the unmasked
  tokens (``loss_mask``): padding never dilutes them.

Aligned: kdjax's KD term with ``mask_key=None`` and its CE term times ``N /
(B L)`` equal Tunix's terms, and one SGD step gives the same parameters.
"""

from __future__ import annotations

import importlib.util
import os
import sys

import numpy as np
import pytest

pytest.importorskip("tunix")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from kdjax import lm  # noqa: E402
from kdjax import train  # noqa: E402
from kdjax.losses import TermInputs  # noqa: E402

_BENCH = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks",
                      "bench_tunix.py")


def _bench():
  spec = importlib.util.spec_from_file_location("bench_tunix", _BENCH)
  module = importlib.util.module_from_spec(spec)
  sys.modules["bench_tunix"] = module  # dataclasses look their module up
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope="module")
def bench():
  return _bench()


def test_kdjax_step_equals_tunix_trainer_step_once_conventions_align(bench):
  from flax import nnx
  size = bench.Size("parity", vocab=320, batch=3, seq=16, student_layers=1,
                    student_dim=32, teacher_layers=2, teacher_dim=48)
  teacher, student = bench.make_pair(size)
  batches = bench.make_batches(size, 2, seed=0)
  opt = optax.sgd(0.5)
  kd_steps = {}
  for lean in (False, True):
    s_apply, s_vars = lm.make_tunix_lm_apply(student, compute_logits=not lean)
    t_apply, t_vars = lm.make_tunix_lm_apply(teacher, compute_logits=not lean)
    kd_steps[lean] = lm.make_lm_train_step(
        s_apply, t_apply, bench.aligned_kdjax_loss(lean=lean), opt,
        donate=False)
  # kdjax's copy of the student's initial parameters (Tunix updates in place).
  init = train.create_state(jax.tree.map(jnp.copy, s_vars), opt,
                            rng=jax.random.key(0))
  states = {False: init, True: init}
  tunix_step = bench.TunixStep(student, teacher, optax.sgd(0.5))
  first_aux = None
  for batch in batches:
    tunix_loss, tunix_aux = tunix_step(batch)
    first_aux = first_aux or tunix_aux
    for lean in (False, True):
      states[lean], metrics = kd_steps[lean](
          states[lean], t_vars, bench.with_pad_mask(batch))
      np.testing.assert_allclose(metrics["loss"], tunix_loss, rtol=1e-5)
      np.testing.assert_allclose(metrics["kd"], tunix_aux["distill/soft_loss"],
                                 rtol=1e-4)
      np.testing.assert_allclose(metrics["ce"], tunix_aux["distill/hard_loss"],
                                 rtol=1e-5)
  tunix_params = nnx.state(student, nnx.Param)
  for lean in (False, True):
    for a, b in zip(jax.tree.leaves(tunix_params),
                    jax.tree.leaves(states[lean].params)):
      np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)

  # kdjax's own convention (mean over the completion tokens) differs from
  # Tunix's on a padded batch: the factor is N / (B L) for the CE, and the KL
  # of the prompt and padding positions for the KD term.
  batch = bench.with_pad_mask(batches[0])
  s_apply, _ = lm.make_tunix_lm_apply(student)
  t_apply, _ = lm.make_tunix_lm_apply(teacher)

  @jax.jit
  def terms(s_vars, t_vars, batch):
    inputs = TermInputs(student=s_apply(s_vars, batch),
                        teacher=t_apply(t_vars, batch), batch=batch,
                        temperature=jnp.asarray(2.0), step=jnp.asarray(0))
    return (lm.token_kd_term()(inputs), lm.token_kd_term(mask_key=None)(inputs),
            lm.token_ce_term()(inputs))

  own_kd, all_kd, own_ce = terms(init.student_variables(), t_vars, batch)
  aux = first_aux  # Tunix's terms on batches[0], initial parameters
  n = float(jnp.sum(batch["loss_mask"]))
  np.testing.assert_allclose(own_ce * n / batch["loss_mask"].size,
                             aux["distill/hard_loss"], rtol=1e-5)
  np.testing.assert_allclose(all_kd, aux["distill/soft_loss"], rtol=1e-4)
  # (random-init models are near uniform, so the two KD means are close; the
  # gap is still ~1e3 x float32 rounding)
  assert abs(float(own_kd) - float(all_kd)) > 1e-5 * float(all_kd)


def test_benchmark_smoke_prints_the_table(bench, capsys):
  rows = bench.main(["--smoke"])
  out = capsys.readouterr().out
  for name in ("tunix", "kdjax plain", "kdjax lean"):
    assert name in out
  assert {r["step"] for r in rows} == {"tunix", "kdjax plain", "kdjax lean"}
  for r in rows:
    assert r["ms"] > 0 and r["temp_bytes"] > 0
