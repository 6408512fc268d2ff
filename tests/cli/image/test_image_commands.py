"""The kdjax command line end to end on a tiny config.

train-teacher -> cache-teacher -> distill (from the cache, from the teacher
run, and the student alone) -> eval -> export -> report, in-process through
``main([...])``; then resuming through the command line after a SIGKILL (in a
subprocess) and after a SIGTERM, compared with an uninterrupted run.

The data are a small slice of the real Fashion-MNIST when Debian's
dataset-fashion-mnist is installed, else generated class patterns.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading

import jax
import numpy as np
import pytest
import yaml

# The exact-resume helpers live in tests/cli (shared with test_resume_exact.py).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _killed_runs  # noqa: E402  pylint: disable=g-import-not-at-top
from kdjax.cli.image import data as _data
from kdjax.cli.image import models as _models
from kdjax.cli.main import main

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
REAL_DATA = os.path.exists(
    "/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz")

HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
HAS_TENSORBOARDX = importlib.util.find_spec("tensorboardX") is not None

pytestmark = pytest.mark.slow


def tiny_config(root) -> dict:
  return {
      "output_dir": str(root), "seed": 0,
      "data": {"source": "idx" if REAL_DATA else "synthetic",
               "max_train_examples": 256, "max_eval_examples": 96,
               "batch_size": 32, "eval_batch_size": 64},
      "teacher": {"arch": "cnn", "channels": [4, 8], "dense": 16, "steps": 24},
      "student": {"arch": "mlp", "hidden": [16], "dropout": 0.1},
      "optimizer": {"lr": 0.01},
      "train": {"steps": 16, "log_every": 4, "eval_every": 8},
      "distill": {"method": "kd", "temperature": 2.0},
      "checkpoint": {"save_every": 8, "keep": 2},
      "eval": {"latency_runs": 3, "latency_batch_sizes": [1, 8]},
  }


def run_main(args) -> tuple[int, str, str]:
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    rc = main([str(a) for a in args])
  return rc, out.getvalue(), err.getvalue()


def records(run_dir, split):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["split"] == split]


def event_scalars(tb_dir) -> dict:
  """{tag: [(step, value)]} read from TensorBoard event files (TFRecord framing)."""
  from tensorboardX.proto import event_pb2
  out = {}
  for name in sorted(os.listdir(tb_dir)):
    if "tfevents" not in name:
      continue
    data = open(os.path.join(tb_dir, name), "rb").read()
    pos = 0
    while pos + 12 <= len(data):
      (length,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
      pos += 12 + length + 4
      for value in event.summary.value:
        out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


ALONE = ["distill", "--set", "distill.method=ce", "data.augment.enabled=true"]


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
  """Runs the whole chain once; the tests below check its pieces."""
  root = tmp_path_factory.mktemp("kdjax_cli")
  path = root / "tiny.yaml"
  path.write_text(yaml.safe_dump(tiny_config(root / "runs")))
  c = ["--config", path]
  outputs = {}
  outputs["teacher"] = run_main(["train-teacher", *c])
  outputs["cache"] = run_main(["cache-teacher", *c])
  outputs["cached"] = run_main(["distill", *c, "--set", "distill.teacher=cache",
                                "train.progress=false"])
  outputs["online"] = run_main(["distill", *c])
  # The student alone, with augmentation (one view per step).
  outputs["alone"] = run_main(ALONE + c)
  runs = root / "runs"
  outputs["eval"] = run_main(["eval", runs / "student_kd"])
  outputs["export"] = run_main(["export", runs / "student_kd",
                                root / "export"])
  if HAS_MATPLOTLIB:
    outputs["report"] = run_main(["report", runs / "student_ce",
                                  runs / "student_kd",
                                  runs / "student_kd_cached",
                                  "--out", root / "report"])
  return {"root": root, "runs": runs, "config": path, "out": outputs}


def test_every_command_succeeds(flow):
  for name, (rc, out, err) in flow["out"].items():
    assert rc == 0, f"{name}: {out}\n{err}"
    assert "Traceback" not in err


def test_teacher_run_files_metrics_and_events(flow):
  run = flow["runs"] / "teacher"
  for name in ("config.yaml", "run.json", "metrics.jsonl", "summary.json"):
    assert (run / name).exists(), name
  meta = json.loads((run / "run.json").read_text())
  assert meta["model"] == "teacher" and meta["steps"] == 24
  train = records(run, "train")
  assert [r["step"] for r in train] == [4, 8, 12, 16, 20, 24]
  assert all(r["samples_per_s"] > 0 and np.isfinite(r["loss"]) for r in train)
  assert train[-1]["loss"] < train[0]["loss"]
  evals = records(run, "eval")
  assert [r["step"] for r in evals] == [8, 16, 24]
  assert 0.0 <= evals[-1]["accuracy"] <= 1.0
  # keep=2 of the steps saved every 8.
  assert sorted(os.listdir(run / "checkpoints")) == ["16", "24"]
  if HAS_TENSORBOARDX:  # else only metrics.jsonl is written
    check_events(run, train)
  rc, out, err = flow["out"]["teacher"]
  assert "[train-teacher] eval on 96 test examples: accuracy" in out
  assert "step/s" in err and "samples/s" in err  # the tqdm bar


def check_events(run, train):
  scalars = event_scalars(run / "tb")
  assert [s for s, _ in scalars["train/loss"]] == [4, 8, 12, 16, 20, 24]
  np.testing.assert_allclose([v for _, v in scalars["train/loss"]],
                             [r["loss"] for r in train], rtol=1e-6)
  assert [s for s, _ in scalars["eval/accuracy"]] == [8, 16, 24]


def test_cached_distillation_reproduces_the_online_run(flow):
  online = records(flow["runs"] / "student_kd", "train")
  cached = records(flow["runs"] / "student_kd_cached", "train")
  assert [r["step"] for r in online] == [r["step"] for r in cached]
  for key in ("loss", "kd", "ce"):
    np.testing.assert_allclose([r[key] for r in cached],
                               [r[key] for r in online], rtol=1e-5, atol=1e-6)
  assert online[0]["temperature"] == 2.0
  meta = json.loads((flow["runs"] / "student_kd_cached" / "run.json").read_text())
  assert meta["teacher_source"] == "cache"
  assert os.path.samefile(meta["teacher_run"], flow["runs"] / "teacher")
  manifest = json.loads((flow["runs"] / "teacher_cache" / "manifest.json")
                        .read_text())
  assert manifest["num_examples"] == 256 and manifest["mode"] == "full"
  # The student alone trains on the labels only.
  alone = records(flow["runs"] / "student_ce", "train")
  assert "kd" not in alone[0] and "ce" in alone[0]


def test_eval_report(flow):
  rc, out, _ = flow["out"]["eval"]
  result = json.loads((flow["runs"] / "student_kd" / "eval.json").read_text())
  # Independent code paths agree: the training run's final evaluation
  # (kdjax.train.evaluate) and kdjax eval.
  summary = json.loads((flow["runs"] / "student_kd" / "summary.json").read_text())
  teacher_summary = json.loads((flow["runs"] / "teacher" / "summary.json")
                               .read_text())
  assert result["count"] == 96
  assert result["student"]["accuracy"] == pytest.approx(
      summary["eval"]["accuracy"], abs=1e-9)
  assert result["teacher"]["accuracy"] == pytest.approx(
      teacher_summary["eval"]["accuracy"], abs=1e-9)
  assert result["agreement"] == pytest.approx(summary["eval"]["agreement"],
                                              abs=1e-9)
  # Hand-counted parameters: MLP 784*16+16 + 16*10+10; CNN conv 3*3*1*4+4,
  # 3*3*4*8+8, dense 7*7*8*16+16, head 16*10+10.
  assert result["student"]["params"] == 12730
  assert result["teacher"]["params"] == 40 + 296 + 6288 + 170
  for side in ("student", "teacher"):
    assert set(result[side]["latency_ms"]) == {"1", "8"}
    assert all(v > 0 for v in result[side]["latency_ms"].values())
    assert 0.0 <= result[side]["ece"] <= 1.0
    assert sum(result[side]["reliability"]["count"]) == 96
  assert "top-1 agreement" in out and "ece (15 bins)" in out
  assert f"{result['student']['accuracy']:.4f}" in out
  # ECE against a NumPy reference on the student's own logits.
  run = _models.read_run(str(flow["runs"] / "student_kd"))
  variables = run.restore_variables()
  apply = _models.make_apply(run.module())
  batches = _data.eval_batches(run.config["data"],
                               _data.build_source(run.config["data"], "eval"))
  logits = np.concatenate([np.asarray(apply(variables, b).logits)[b["mask"] > 0]
                           for b in batches]).astype(np.float64)
  labels = np.concatenate([b["label"][b["mask"] > 0] for b in batches])
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  conf, correct = probs.max(-1), probs.argmax(-1) == labels
  expected = 0.0
  for m in range(15):
    in_bin = (conf > m / 15) & (conf <= (m + 1) / 15)
    if in_bin.any():
      expected += in_bin.mean() * abs(correct[in_bin].mean()
                                      - conf[in_bin].mean())
  assert result["student"]["ece"] == pytest.approx(expected, abs=1e-5)
  assert result["student"]["accuracy"] == pytest.approx(correct.mean())


def test_export_holds_the_student_alone(flow):
  import orbax.checkpoint as ocp
  restored = ocp.StandardCheckpointer().restore(str(flow["root"] / "export"))
  assert set(restored) == {"params"}
  run = _models.read_run(str(flow["runs"] / "student_kd"))
  expected = run.restore_variables()
  jax.tree.map(np.testing.assert_array_equal, dict(restored),
               jax.device_get(expected))
  assert "[export] student" in flow["out"]["export"][1]


@pytest.mark.skipif(not HAS_MATPLOTLIB, reason="kdjax report needs matplotlib "
                    "(the 'plots' extra)")
def test_report_files(flow):
  report = flow["root"] / "report"
  for name in ("loss.png", "accuracy.png", "reliability.png"):
    data = (report / name).read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
  table = (report / "summary.md").read_text()
  for label in ("student_ce", "student_kd", "student_kd_cached"):
    assert f"| {label} |" in table
  assert table in flow["out"]["report"][1]


def test_missing_teacher_and_unproducible_feature(flow, tmp_path):
  c = ["--config", flow["config"]]
  rc, _, err = run_main(["distill", *c, "--set",
                         f"teacher.run_dir={tmp_path / 'none'}"])
  # Missing inputs are fixed before the run: exit 2 (kdjax.cli.errors).
  assert rc == 2 and "no teacher run at" in err and "kdjax train-teacher" in err
  rc, _, err = run_main(["distill", *c, "--set", "distill.method=fitnets"])
  assert rc == 2
  assert "reads a feature the student (mlp) does not produce" in err
  assert "'block_1'" in err and "available names:" in err
  assert "'penultimate'" in err
  rc, _, err = run_main(["distill", *c, "--set", "distill.teacher=cache",
                         f"cache.dir={tmp_path / 'nocache'}"])
  assert rc == 2 and "kdjax cache-teacher" in err
  rc, _, err = run_main(["eval", tmp_path])
  assert rc == 2 and "not a kdjax run directory" in err
  # A hyper-parameter the loss rejects is found before the run (the loss is
  # traced on an example batch): a config error, exit 2.
  rc, _, err = run_main(["distill", *c, "--set", "distill.method=jsd",
                         "distill.hparams.beta=2", "distill.run_name=bad_jsd"])
  assert rc == 2 and "config error: config key 'distill.hparams'" in err
  assert "beta (generalised JSD) must lie in [0, 1]" in err
  assert "Traceback" not in err


# -----------------------------------------------------------------------------
# Resuming through the command line.
# -----------------------------------------------------------------------------

def _same_run(flow, name, reference):
  """``name`` ended with the params and logged losses of ``reference`` (a run
  stopped inside a log window logs no partial record: its checkpoint carries
  the window's sums; see tests/cli/test_metrics_across_resume.py)."""
  ref = _models.read_run(str(flow["runs"] / reference))
  run = _models.read_run(str(flow["runs"] / name))
  jax.tree.map(np.testing.assert_array_equal,
               jax.device_get(run.restore_variables()),
               jax.device_get(ref.restore_variables()))
  for split, key in (("train", "loss"), ("eval", "accuracy")):
    got = {r["step"]: r[key] for r in records(run.path, split)}
    want = {r["step"]: r[key] for r in records(ref.path, split)}
    assert got == want


def test_resume_after_sigkill(flow):
  # The same command as the flow's student_kd run, killed right after step 12
  # (its last checkpoint: step 8), then run again: it continues from step 8
  # (state, RNG, data position) and ends exactly like the straight run.
  args = ["distill", "--config", flow["config"], "--set",
          "distill.run_name=killed", "train.progress=false"]
  code = textwrap.dedent(f"""
      import os, signal, sys
      from kdjax.checkpoint import DistillCheckpointer
      original = DistillCheckpointer.save
      def save(self, state, *, step=None, **kwargs):
        result = original(self, state, step=step, **kwargs)
        if step == 12:
          self.wait_until_finished()
          print("KILLING AT 12", flush=True)
          os.kill(os.getpid(), signal.SIGKILL)
        return result
      DistillCheckpointer.save = save
      from kdjax.cli.main import main
      sys.exit(main({[str(a) for a in args]!r}))
  """)
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                        text=True, env=env, cwd=REPO_ROOT, timeout=300)
  assert proc.returncode == -signal.SIGKILL, proc.stdout + proc.stderr
  assert "KILLING AT 12" in proc.stdout
  run_dir = flow["runs"] / "killed"
  assert sorted(os.listdir(run_dir / "checkpoints")) == ["8"]
  assert [r["step"] for r in records(run_dir, "train")] == [4, 8, 12]
  # Where a difference would come from: steps 1-8 (the killed process vs this
  # one) or the resumed steps 9-16 (tests/cli/test_resume_exact.py repeats
  # this in fresh processes, under load).
  straight_8 = _killed_runs.state_at(flow["runs"] / "student_kd", 8)
  killed_8 = _killed_runs.state_at(run_dir, 8)
  assert not _killed_runs.differing_leaves(killed_8, straight_8), (
      "steps 1-8 of the killed run differ from the straight run's")
  rc, out, err = run_main(args)
  assert rc == 0, out + err
  assert "resuming" in out and "from step 8" in out
  _same_run(flow, "killed", "student_kd")


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signal handlers need the main thread")
def test_sigterm_saves_then_resumes(flow, monkeypatch):
  # The flow's student_ce run (augmented batches, dropout), stopped by SIGTERM
  # after step 10: it saves step 10 and exits 143; the same command continues.
  from kdjax.checkpoint import DistillCheckpointer
  original = DistillCheckpointer.save

  def save(self, state, *, step=None, **kwargs):
    result = original(self, state, step=step, **kwargs)
    if step == 10 and not kwargs.get("force"):
      os.kill(os.getpid(), signal.SIGTERM)
    return result

  args = ALONE + ["--config", flow["config"], "--set",
                  "distill.run_name=terminated", "train.progress=false"]
  monkeypatch.setattr(DistillCheckpointer, "save", save)
  rc, out, _ = run_main(args)
  assert rc == 143
  assert "interrupted at step 10/16" in out
  assert sorted(os.listdir(flow["runs"] / "terminated" / "checkpoints")) == [
      "10", "8"]
  monkeypatch.setattr(DistillCheckpointer, "save", original)
  rc, out, err = run_main(args)
  assert rc == 0, out + err
  assert "from step 10" in out
  _same_run(flow, "terminated", "student_ce")
  steps = [r["step"] for r in records(flow["runs"] / "terminated", "train")]
  assert steps == [4, 8, 12, 16]
  # Once more: nothing left to train.
  rc, out, _ = run_main(args)
  assert rc == 0 and "already trained to step 16" in out


def test_tfds_source_matches_the_idx_arrays(tmp_path):
  if not REAL_DATA:
    pytest.skip("needs Debian's dataset-fashion-mnist")
  from kdjax.cli.config import image as cfg
  c = cfg.load_config([], [f"data.tfds_data_dir={tmp_path}",
                           "data.max_train_examples=48",
                           "data.max_eval_examples=32"])
  tfds_source = _data.build_source(c["data"], "train")
  c["data"]["source"] = "idx"
  idx_source = _data.build_source(c["data"], "train")
  assert len(tfds_source) == len(idx_source) == 48
  for i in (0, 47):
    np.testing.assert_array_equal(np.asarray(tfds_source[i]["image"]),
                                  idx_source[i]["image"])
    assert int(tfds_source[i]["label"]) == idx_source[i]["label"]
