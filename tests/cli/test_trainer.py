"""The command line's shared trainer (kdjax/cli/trainer.py): ``train.checks``
and the objective check, on the image commands (tiny synthetic runs)."""

from __future__ import annotations

import contextlib
import io
import json
import os

import jax
import jax.numpy as jnp
import pytest

from kdjax.cli import runs
from kdjax.cli import trainer as _trainer
from kdjax.cli.config import image as cfg
from kdjax.cli.config.base import ConfigError
from kdjax.cli.main import main

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
TINY = os.path.join(REPO_ROOT, "experiments", "configs", "tiny.yaml")
WALL_CLOCK = ("time", "samples_per_s")


def _run(args) -> tuple[int, str]:
  out = io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
    rc = main([str(a) for a in args])
  return rc, out.getvalue()


def _args(root, name, *extra) -> list:
  return ["distill", "--config", TINY, "--set", f"output_dir={root}",
          f"distill.run_name={name}", "distill.method=ce",
          "data.source=synthetic", "data.max_train_examples=64",
          "data.max_eval_examples=32", "data.batch_size=16",
          "data.eval_batch_size=32", "student.hidden=[8]", "train.steps=4",
          "train.log_every=2", "train.progress=false",
          "checkpoint.save_every=0", *extra]


def _records(run_dir) -> list[dict]:
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK}
            for line in f if line.strip()]


def test_train_checks_runs_the_checkified_step(tmp_path):
  # The checkified step (train.checks: true) computes what the plain one does.
  rc, out = _run(_args(tmp_path, "plain"))
  assert rc == 0, out
  rc, out = _run(_args(tmp_path, "checked", "train.checks=true"))
  assert rc == 0, out
  assert _records(tmp_path / "checked") == _records(tmp_path / "plain")
  with open(tmp_path / "checked" / "config.yaml") as f:
    assert "checks: true" in f.read()


def test_train_checks_is_documented_and_off_by_default():
  assert cfg.default_config()["train"]["checks"] is False
  assert "checks: false  # run-time checks in the jitted step" in (
      cfg.describe_schema())


def test_finalize_with_checks_raises_the_checks_error():
  from jax.experimental import checkify  # pylint: disable=g-import-not-at-top

  def step(state, teacher_variables, batch):
    del teacher_variables
    checkify.check(jnp.all(batch > 0), "batch must be positive")
    return state + 1, {"loss": jnp.sum(batch)}

  checked = _trainer.finalize(step, checks=True)
  state, metrics = checked(jnp.zeros(()), None, jnp.ones((2,)))
  assert float(state) == 1.0 and float(metrics["loss"]) == 2.0
  with pytest.raises(ValueError, match="batch must be positive"):
    checked(jnp.zeros(()), None, -jnp.ones((2,)))


def test_check_objective_turns_a_rejected_hparam_into_a_config_error():
  from kdjax import losses  # pylint: disable=g-import-not-at-top
  logits = jnp.zeros((2, 5))

  def trace():
    return jax.eval_shape(lambda s, t: losses.jensen_shannon_divergence(
        s, t, 1.0, beta=2.0), logits, logits)

  with pytest.raises(ConfigError, match=r"distill.hparams.*beta"):
    _trainer.check_objective(trace, "jsd")
  _trainer.check_objective(lambda: None, "jsd")  # nothing raised: fine


def test_throughput_leaves_the_compiling_first_step_out(tmp_path):
  """summary.json times the first step apart; the closing line says so."""
  rc, out = _run(_args(tmp_path, "timed"))
  assert rc == 0, out
  with open(tmp_path / "timed" / runs.SUMMARY_FILE) as f:
    summary = json.load(f)
  assert 0 < summary["first_step_s"] < summary["wall_s"]
  line = next(l for l in out.splitlines() if "trained steps 0..4" in l)
  assert "first step" in line and "with compilation, then" in line
  with open(tmp_path / "timed" / "metrics.jsonl") as f:
    train = [json.loads(l) for l in f if '"train"' in l]
  assert len(train) == 2 and all(r["samples_per_s"] > 0 for r in train)
