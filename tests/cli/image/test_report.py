"""``kdjax report``: evaluates runs without eval.json, plots every loss term
and the teacher's accuracy.

The fast tests feed hand-written records to the functions that gather the
series; the slow ones make one tiny teacher run and one tiny KD run (the
synthetic class patterns, or a slice of Fashion-MNIST when Debian's
dataset-fashion-mnist is installed) and report on them through ``main``.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil

import pytest
import yaml

from kdjax.cli.image import report as _report
from kdjax.cli.main import main

REAL_DATA = os.path.exists(
    "/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz")
HAS_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None
needs_matplotlib = pytest.mark.skipif(
    not HAS_MATPLOTLIB, reason="kdjax report needs matplotlib (the 'plots' "
    "extra)")


def _train(step, loss, ce, kd):
  return {"step": step, "split": "train", "time": 0.1 * step, "loss": loss,
          "ce": ce, "kd": kd, "temperature": 2.0, "weight/ce": 0.1,
          "weight/kd": 0.9, "samples_per_s": 100.0, "lr": 1e-3}


def _fake_run(label, records, meta=None, ev=None):
  return {"path": label, "label": label, "records": records,
          "meta": meta or {}, "summary": None, "eval": ev}


def test_loss_series_holds_every_term():
  kd = _fake_run("kd", [_train(4, 1.0, 2.0, 0.9), _train(8, 0.8, 1.8, 0.7),
                        {"step": 8, "split": "eval", "accuracy": 0.5,
                         "teacher_accuracy": 0.6}])
  ce = _fake_run("ce", [{"step": 4, "split": "train", "loss": 2.0, "ce": 2.0,
                         "weight/ce": 1.0, "temperature": 1.0, "lr": 1e-3}])
  assert _report.loss_terms(kd["records"]) == ["ce", "kd"]
  series = _report.loss_series([ce, kd])
  # Objective first, then every term; bookkeeping keys are not terms.
  assert list(series) == ["loss", "ce", "kd"]
  assert series["kd"] == {"kd": ([4, 8], [0.9, 0.7])}
  assert set(series["ce"]) == {"ce", "kd"}
  # The teacher's accuracy from training-time evals when there is no eval.json.
  assert _report.teacher_accuracies([ce, kd]) == [("teacher", 0.6)]
  kd["eval"] = {"teacher_run": "/runs/teacher", "teacher": {"accuracy": 0.7}}
  assert _report.teacher_accuracies([ce, kd]) == [("teacher", 0.7)]


@needs_matplotlib
def test_figures_label_terms_and_teacher():
  kd = _fake_run("student_kd", [_train(4, 1.0, 2.0, 0.9),
                                {"step": 4, "split": "eval", "accuracy": 0.5,
                                 "teacher_accuracy": 0.625}],
                 meta={"teacher_run": "/x/teacher"})
  panels = {ax.get_title(): [ln.get_label() for ln in ax.get_lines()]
            for ax in _report.loss_figure([kd]).axes}
  assert panels == {"training loss (objective) vs step": ["student_kd"],
                    "ce (unweighted) vs step": ["student_kd"],
                    "kd (unweighted) vs step": ["student_kd"]}
  (ax,) = _report.accuracy_figure([kd]).axes
  lines = {ln.get_label(): ln for ln in ax.get_lines()}
  assert set(lines) == {"student_kd", "teacher (62.50%)"}
  assert list(lines["teacher (62.50%)"].get_ydata()) == [0.625, 0.625]
  # Several teachers: one line each, named by their run directories.
  other = _fake_run("student_b", [], meta={"teacher_run": "/x/big_teacher"},
                    ev={"teacher_run": "/x/big_teacher",
                        "teacher": {"accuracy": 0.75},
                        "student": {"accuracy": 0.5}, "step": 4})
  (ax,) = _report.accuracy_figure([kd, other]).axes
  assert {ln.get_label() for ln in ax.get_lines()} == {
      "student_kd", "student_b", "teacher teacher (62.50%)",
      "teacher big_teacher (75.00%)"}


# -----------------------------------------------------------------------------
# On real (tiny) runs.
# -----------------------------------------------------------------------------


def _tiny_config(root) -> dict:
  return {
      "output_dir": str(root), "seed": 0,
      "data": {"source": "idx" if REAL_DATA else "synthetic",
               "max_train_examples": 128, "max_eval_examples": 64,
               "batch_size": 32, "eval_batch_size": 64},
      "teacher": {"arch": "cnn", "channels": [4, 8], "dense": 16, "steps": 8},
      "student": {"arch": "mlp", "hidden": [16]},
      "optimizer": {"lr": 0.01},
      "train": {"steps": 8, "log_every": 4, "eval_every": 4,
                "progress": False},
      "distill": {"method": "kd", "temperature": 2.0},
      "checkpoint": {"save_every": 8, "keep": 1},
      "eval": {"latency_runs": 2, "latency_batch_sizes": [1]},
  }


def _main(args) -> tuple[int, str, str]:
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    rc = main([str(a) for a in args])
  return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """A tiny teacher run and a KD student from it, neither evaluated."""
  root = tmp_path_factory.mktemp("kdjax_report")
  config = root / "tiny.yaml"
  config.write_text(yaml.safe_dump(_tiny_config(root / "runs")))
  for command in ("train-teacher", "distill"):
    rc, _, err = _main([command, "--config", config])
    assert rc == 0, err
  runs = root / "runs"
  for name in ("teacher", "student_kd"):
    assert not (runs / name / "eval.json").exists()
  return {"root": root, "teacher": runs / "teacher",
          "student": runs / "student_kd"}


@pytest.mark.slow
@needs_matplotlib
def test_report_evaluates_and_plots(runs):
  out_dir = runs["root"] / "report"
  rc, out, err = _main(["report", runs["student"], "--out", out_dir])
  assert rc == 0, err
  # The run had no eval.json: the report evaluated it against its teacher.
  ev = json.loads((runs["student"] / "eval.json").read_text())
  assert ev["teacher_run"] == os.path.abspath(runs["teacher"])
  assert "evaluating it against its teacher" in out
  for name in ("loss.png", "accuracy.png", "reliability.png", "summary.md"):
    assert (out_dir / name).exists(), name

  loaded = _report.load_runs([str(runs["student"])])
  # loss.png: the objective and every logged term, the KD term included.
  assert list(_report.loss_series(loaded)) == ["loss", "ce", "kd"]
  titles = [ax.get_title() for ax in _report.loss_figure(loaded).axes]
  assert "kd (unweighted) vs step" in titles
  # accuracy.png: the teacher's eval accuracy as a horizontal line.
  (ax,) = _report.accuracy_figure(loaded).axes
  teacher = [ln for ln in ax.get_lines()
             if ln.get_label().startswith("teacher (")]
  assert len(teacher) == 1
  assert set(teacher[0].get_ydata()) == {ev["teacher"]["accuracy"]}

  # A second report reuses eval.json (no second evaluation).
  rc, out, _ = _main(["report", runs["student"], "--out", out_dir])
  assert rc == 0 and "evaluating" not in out


@pytest.mark.slow
@needs_matplotlib
def test_report_says_how_when_it_cannot_evaluate(runs, tmp_path):
  # A copy of the run without its checkpoints (and without eval.json).
  copy = tmp_path / "student_copy"
  shutil.copytree(runs["student"], copy,
                  ignore=shutil.ignore_patterns("checkpoints", "eval.json"))
  rc, out, err = _main(["report", copy, "--out", tmp_path / "report"])
  assert rc == 0, err
  assert "no checkpoint to evaluate" in out
  assert f"kdjax eval {copy}" in out
  assert not (copy / "eval.json").exists()
  assert (tmp_path / "report" / "loss.png").exists()
  assert not (tmp_path / "report" / "reliability.png").exists()
