"""Exact resume under CPU load: `kdjax distill` and `kdjax lm distill`
(token KD, GKD) SIGKILLed mid-step, during an asynchronous checkpoint write
and after a commit, each time in a fresh process with a busy-looping process
beside it (and, in the suite, the other test worker: two cores
oversubscribed), then run to the end: the final state (params, optimizer
state, RNG, step), the logged records and the held-out metrics equal those
of an uninterrupted run bit for bit.

The LM objectives are token KD (the state, batches and checkpoints every
objective shares) and GKD (which also draws its samples from the step's RNG);
lean KD differs from token KD in the loss alone, which resume does not touch.

Every run is its own process (as a user's runs are), so nothing a test
process did before can leak into the comparison.
"""

from __future__ import annotations

import os

import pytest
import yaml

import _killed_runs as kr
from _killed_runs import Kill

pytestmark = pytest.mark.slow

REAL_DATA = os.path.exists(
    "/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz")
LM_TINY = os.path.join(kr.REPO_ROOT, "experiments", "configs", "lm_tiny.yaml")


def image_config(root) -> dict:
  return {
      "output_dir": str(root), "seed": 0,
      "data": {"source": "idx" if REAL_DATA else "synthetic",
               "max_train_examples": 256, "max_eval_examples": 96,
               "batch_size": 32, "eval_batch_size": 64},
      "teacher": {"arch": "cnn", "channels": [4, 8], "dense": 16, "steps": 8},
      "student": {"arch": "mlp", "hidden": [16], "dropout": 0.1},
      "optimizer": {"lr": 0.01},
      "train": {"steps": 16, "log_every": 4, "eval_every": 8,
                "progress": False},
      "distill": {"method": "kd", "temperature": 2.0},
      "checkpoint": {"save_every": 4, "keep": 2, "async": True},
  }


def test_image_distill_resumes_exactly_under_load(tmp_path):
  config = tmp_path / "tiny.yaml"
  config.write_text(yaml.safe_dump(image_config(tmp_path / "runs")))
  proc = kr.run(["train-teacher", "--config", config])
  assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]

  def args(name):
    return ["distill", "--config", config, "--set", f"distill.run_name={name}"]

  cc = tmp_path / "jax_cache"
  with kr.cpu_load(processes=1):
    proc = kr.run(args("straight"), compilation_cache=cc)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    out = kr.killed_then_resumed(args("killed"), [
        Kill("mid_step", 5, delay=0.05), Kill("during_save", 8),
        Kill("after_save", 12)], compilation_cache=cc)
  assert "resuming" in out and "from step 12" in out
  kr.assert_same_run(tmp_path / "runs" / "killed", tmp_path / "runs" / "straight")


@pytest.fixture(scope="module")
def lm_root(tmp_path_factory):
  """A trained tiny LM teacher (and its tokenizer) under the root."""
  root = tmp_path_factory.mktemp("lm")
  proc = kr.run(["lm", "train-teacher", "--config", LM_TINY, "--set",
                 f"output_dir={root}"])
  assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
  return root


@pytest.mark.parametrize("objective", ["token_kd", "gkd"])
def test_lm_distill_resumes_exactly_under_load(lm_root, objective):
  def args(name):
    return ["lm", "distill", "--config", LM_TINY, "--set",
            f"output_dir={lm_root}", f"distill.objective={objective}",
            "checkpoint.save_every=3", "checkpoint.async=true",
            f"distill.run_name={name}"]

  straight, killed = f"{objective}_straight", f"{objective}_killed"
  cc = lm_root / f"jax_cache_{objective}"
  with kr.cpu_load(processes=1):
    proc = kr.run(args(straight), compilation_cache=cc)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
    out = kr.killed_then_resumed(args(killed), [
        Kill("mid_step", 4, delay=0.05), Kill("during_save", 6),
        Kill("after_save", 9)], compilation_cache=cc)
  assert "from step 9" in out
  kr.assert_same_run(lm_root / killed, lm_root / straight)
