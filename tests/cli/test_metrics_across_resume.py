"""A run interrupted inside a log window and resumed logs the records of an
uninterrupted run.

``kdjax distill`` on experiments/configs/tiny.yaml (shrunk), ``log_every=4``,
``save_every=6``: stopped by SIGTERM after step 10, or crashed after step 9
(resumed from the step-6 checkpoint), both off the log grid. Every record of
``metrics.jsonl`` must equal the uninterrupted run's, except the wall-clock
fields ``time`` (seconds since the process started) and ``samples_per_s``
(throughput), which differ between any two runs.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import threading

import pytest

from kdjax.checkpoint import DistillCheckpointer
from kdjax.cli.main import main

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
TINY = os.path.join(REPO_ROOT, "experiments", "configs", "tiny.yaml")
REAL_DATA = os.path.exists(
    "/usr/share/datasets/fashion-mnist/train-labels-idx1-ubyte.gz")
WALL_CLOCK = ("time", "samples_per_s")

pytestmark = pytest.mark.skipif(
    threading.current_thread() is not threading.main_thread(),
    reason="signal handlers need the main thread")


class Crash(BaseException):
  """Stands for a SIGKILL right after a step: the run stops without a
  checkpoint of that step (main() does not catch it)."""


def _args(root, name: str) -> list[str]:
  return ["distill", "--config", TINY, "--set", f"output_dir={root}",
          f"distill.run_name={name}", "distill.method=ce",
          "data.source=" + ("idx" if REAL_DATA else "synthetic"),
          "data.max_train_examples=128", "data.max_eval_examples=64",
          "data.batch_size=16", "data.eval_batch_size=64",
          "student.hidden=[8]", "train.steps=16", "train.log_every=4",
          "train.eval_every=8", "train.progress=false",
          "checkpoint.save_every=6", "checkpoint.keep=3"]


def _run(args) -> tuple[int, str]:
  out = io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
    rc = main(args)
  return rc, out.getvalue()


def _records(run_dir) -> list[dict]:
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f if line.strip()]


def _without_wall_clock(records) -> list[dict]:
  return [{k: v for k, v in r.items() if k not in WALL_CLOCK}
          for r in records]


def _interrupt_at(monkeypatch, step: int, action) -> None:
  """Runs ``action()`` right after the loop's checkpoint call of ``step``."""
  original = DistillCheckpointer.save

  def save(self, state, *, step=None, **kwargs):
    result = original(self, state, step=step, **kwargs)
    if step == stop_step and not kwargs.get("force"):
      action(self)
    return result

  stop_step = step
  monkeypatch.setattr(DistillCheckpointer, "save", save)


def _sigterm(_):
  os.kill(os.getpid(), signal.SIGTERM)


def _crash(ckpt):
  ckpt.wait_until_finished()
  raise Crash()


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  root = tmp_path_factory.mktemp("metrics_resume")
  rc, out = _run(_args(root, "straight"))
  assert rc == 0, out
  return root, _records(root / "straight")


def test_sigterm_off_the_log_grid(reference, monkeypatch):
  root, want = reference
  args = _args(root, "terminated")
  _interrupt_at(monkeypatch, 10, _sigterm)
  rc, out = _run(args)
  assert rc == 143 and "interrupted at step 10/16" in out, out
  # No partial window record: only the completed windows (and the eval).
  assert [(r["step"], r["split"]) for r in _records(root / "terminated")] == [
      (4, "train"), (8, "train"), (8, "eval")]
  monkeypatch.undo()
  rc, out = _run(args)
  assert rc == 0 and "from step 10" in out, out
  assert _without_wall_clock(_records(root / "terminated")) == (
      _without_wall_clock(want))


def test_crash_after_a_checkpoint_off_the_log_grid(reference, monkeypatch):
  root, want = reference
  args = _args(root, "crashed")
  _interrupt_at(monkeypatch, 9, _crash)
  with pytest.raises(Crash):
    _run(args)
  monkeypatch.undo()
  rc, out = _run(args)  # resumes from step 6, inside the window 5..8
  assert rc == 0 and "from step 6" in out, out
  assert _without_wall_clock(_records(root / "crashed")) == (
      _without_wall_clock(want))
