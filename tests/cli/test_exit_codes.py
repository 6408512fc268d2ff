"""Exit statuses of the ``kdjax`` process (kdjax.cli.errors documents them).

Each case runs ``python -m kdjax.cli.main`` in a subprocess: what the user can
fix before the run starts (a bad argument, an unknown key, bad YAML, a missing
teacher run, data directory or run directory, an impossible batch size) exits
2 with one line on stderr and no traceback; a failure during a run (here a
corrupt checkpoint found when the run resumes) exits 1 and ends with one
line, after the checkpointer's own log lines.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from kdjax.cache import CacheMismatchError
from kdjax.checkpoint import CheckpointCorruptedError
from kdjax.cli.image import models as _models
from kdjax.cli import errors
from kdjax.cli import main as kmain
from kdjax.cli.config.base import ConfigError
from kdjax.data import DataError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
TINY = os.path.join(REPO_ROOT, "experiments", "configs", "tiny.yaml")


def kdjax(*args, cwd=REPO_ROOT, timeout=300) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  env.pop("KDJAX_TRACEBACK", None)
  return subprocess.run([sys.executable, "-m", "kdjax.cli.main",
                         *map(str, args)], capture_output=True, text=True,
                        env=env, cwd=cwd, timeout=timeout)


def assert_one_line(proc, status: int, *pieces: str) -> str:
  """``proc`` exited ``status`` with one stderr line holding ``pieces``."""
  err = proc.stderr
  assert proc.returncode == status, (proc.returncode, proc.stdout, err)
  assert "Traceback" not in err, err
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1, err
  for piece in pieces:
    assert piece in lines[0], err
  return lines[0]


def tiny_sets(tmp_path, *extra) -> list[str]:
  """``--set`` overrides of a tiny synthetic-data run under ``tmp_path``."""
  return ["--set", f"output_dir={tmp_path / 'runs'}", "data.source=synthetic",
          "data.max_train_examples=64", "data.max_eval_examples=32",
          "data.batch_size=32", "data.eval_batch_size=32",
          "student.hidden=[8]", "train.progress=false", *extra]


def test_usage_error_is_2():
  # argparse: --config is required; one line, not argparse's usage block.
  proc = kdjax("distill")
  assert_one_line(proc, errors.EXIT_USAGE, "kdjax distill: error:", "--config")


def test_unknown_key_is_2():
  proc = kdjax("distill", "--config", TINY, "--set", "train.epoch=3")
  assert_one_line(proc, errors.EXIT_USAGE, "unknown config key 'train.epoch'")


def test_bad_yaml_is_2(tmp_path):
  path = tmp_path / "bad.yaml"
  path.write_text("data: [1,\n  batch_size: 3\n")
  proc = kdjax("train-teacher", "--config", path)
  assert_one_line(proc, errors.EXIT_USAGE, "config error:", "not valid YAML")


def test_missing_teacher_run_is_2(tmp_path):
  proc = kdjax("distill", "--config", TINY,
               *tiny_sets(tmp_path, f"teacher.run_dir={tmp_path / 'none'}"))
  assert_one_line(proc, errors.EXIT_USAGE, "no teacher run at",
                  "kdjax train-teacher")


def test_missing_data_directory_is_2(tmp_path):
  proc = kdjax("distill", "--config", TINY, "--set", "distill.method=ce",
               "data.source=idx", f"data.dir={tmp_path / 'no_data'}",
               f"output_dir={tmp_path / 'runs'}")
  assert_one_line(proc, errors.EXIT_USAGE, str(tmp_path / "no_data"))


def test_report_labels_mismatch_is_2(tmp_path):
  proc = kdjax("report", tmp_path / "a", tmp_path / "b", "--out",
               tmp_path / "report", "--labels", "one")
  assert_one_line(proc, errors.EXIT_USAGE, "--labels gives 1 names for 2 runs")


def test_missing_run_directory_is_2(tmp_path):
  proc = kdjax("eval", tmp_path)
  assert_one_line(proc, errors.EXIT_USAGE, "not a kdjax run directory")


def test_batch_larger_than_the_dataset_is_2(tmp_path):
  proc = kdjax("distill", "--config", TINY,
               *tiny_sets(tmp_path, "distill.method=ce", "data.batch_size=128"))
  assert_one_line(proc, errors.EXIT_USAGE, "data.batch_size", "128")


@pytest.mark.slow
def test_corrupt_checkpoint_during_the_run_is_1(tmp_path):
  sets = tiny_sets(tmp_path, "distill.method=ce", "checkpoint.save_every=1",
                   "checkpoint.keep=2", "train.log_every=1")
  proc = kdjax("distill", "--config", TINY, *sets, "train.steps=2")
  assert proc.returncode == 0, proc.stdout + proc.stderr
  checkpoints = tmp_path / "runs" / "student_ce" / "checkpoints"
  corrupted = 0
  for root, _, files in os.walk(checkpoints):
    for name in files:
      with open(os.path.join(root, name), "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(0)
        f.write(b"\xff" * max(size, 1))
      corrupted += 1
  assert corrupted
  proc = kdjax("distill", "--config", TINY, *sets, "train.steps=4")
  # The checkpointer logs each unreadable step; kdjax's own message is one
  # line, the last, with no traceback.
  assert proc.returncode == errors.EXIT_FAILURE, proc.stdout + proc.stderr
  assert "Traceback" not in proc.stderr, proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("kdjax distill: error:"), proc.stderr
  assert "no restorable checkpoint" in last


def test_during_run_marks_any_error_as_a_failure():
  with pytest.raises(FileNotFoundError) as info:
    with errors.during_run():
      raise errors.MissingRunError("gone")
  assert errors.raised_during_run(info.value)
  assert not errors.raised_during_run(FileNotFoundError("x"))


def test_exit_status_mapping():
  exit_status = kmain.exit_status
  assert exit_status(ConfigError("bad key")) == 2
  assert exit_status(errors.BatchSizeError("too big")) == 2
  assert exit_status(FileNotFoundError("no run")) == 2
  assert exit_status(ModuleNotFoundError("no matplotlib")) == 2
  assert exit_status(ValueError("beta")) == 1
  assert exit_status(FloatingPointError("nan")) == 1
  assert exit_status(RuntimeError("?")) == 1
  assert exit_status(KeyboardInterrupt()) == 130
  marked = FileNotFoundError("vanished")
  setattr(marked, errors.DURING_RUN_ATTR, True)
  assert exit_status(marked) == 1


def test_failure_types_carry_their_status():
  # main.py reads the class attribute ``exit_code`` (so that the error path
  # imports no JAX or orbax): they declare and map to 1.
  for exc in (CacheMismatchError("x"), CheckpointCorruptedError("x"),
              DataError("x")):
    assert errors.exit_code_of(exc) == errors.EXIT_FAILURE
    assert kmain.exit_status(exc) == 1
