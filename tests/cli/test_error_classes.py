"""Exit statuses of the errors raised by the CLI's helpers.

The errors of ``kdjax.cli.image.models``, ``data``, ``evaluate`` and ``report`` are
the classes of :mod:`kdjax.cli.errors`: what the user fixes before the run
(a teacher of another class count, a split the data lack, a missing data
directory or TFDS preparation, a run without a checkpoint, a report's
arguments) exits 2 with one line; a damaged run directory exits 1 with a line
naming the file. The runs here are config.yaml + run.json only: every error
is found before a checkpoint is read.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from kdjax.cli import runs
from kdjax.cli.image import data as _data
from kdjax.cli.image import models as _models
from kdjax.cli.image import report as _report
from kdjax.cli.config import image as cfg
from kdjax.cli import errors
from kdjax.cli import main as kmain

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
TINY = os.path.join(REPO_ROOT, "experiments", "configs", "tiny.yaml")


def make_run(path, *sets: str) -> str:
  """A run directory (config.yaml, run.json) of a tiny synthetic-data teacher,
  without a checkpoint."""
  config = cfg.load_config([TINY], ["data.source=synthetic",
                                    "data.max_train_examples=64",
                                    "data.max_eval_examples=32",
                                    "data.batch_size=32",
                                    "data.eval_batch_size=32", *sets])
  _models.write_run(str(path), config, {"command": "train-teacher",
                                        "model": "teacher",
                                        "image_shape": [28, 28, 1]})
  return str(path)


def run_main(capsys, *argv) -> tuple[int, str]:
  """``kdjax ARGV`` in this process: (exit status, the stderr line)."""
  status = kmain.main([str(a) for a in argv])
  err = capsys.readouterr().err
  assert "Traceback" not in err, err
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1, err
  return status, lines[0]


def test_eval_against_a_teacher_of_other_classes_is_2(tmp_path, capsys):
  run = make_run(tmp_path / "run")
  teacher = make_run(tmp_path / "teacher5", "data.num_classes=5")
  status, line = run_main(capsys, "eval", run, "--teacher", teacher)
  assert status == errors.EXIT_USAGE, line
  assert "has 5 classes" in line and "--no-teacher" in line, line


def test_idx_split_the_files_lack_is_2(tmp_path, capsys):
  run = make_run(tmp_path / "run")
  status, line = run_main(capsys, "eval", run, "--set", "data.source=idx",
                          "data.eval_split=validation")
  assert status == errors.EXIT_USAGE, line
  assert "'data.eval_split'" in line and "'validation'" in line, line


def test_missing_idx_directory_names_the_key(tmp_path, capsys):
  run = make_run(tmp_path / "run")
  status, line = run_main(capsys, "eval", run, "--set", "data.source=idx",
                          f"data.dir={tmp_path / 'no_data'}")
  assert status == errors.EXIT_USAGE, line
  assert "'data.dir'" in line and str(tmp_path / "no_data") in line, line


def test_unprepared_tfds_dataset_is_one_line(tmp_path):
  # A subprocess: TFDS's absl warning about the missing folder went to the
  # process's stderr beside kdjax's message.
  pytest.importorskip("tensorflow_datasets")
  run = make_run(tmp_path / "run")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH",
                                                                ""))
  env.pop("KDJAX_TRACEBACK", None)
  proc = subprocess.run(
      [sys.executable, "-m", "kdjax.cli.main", "eval", run, "--set",
       "data.source=tfds", "data.name=mnist",
       f"data.data_dir={tmp_path / 'tfds'}"],
      capture_output=True, text=True, env=env, cwd=str(tmp_path), timeout=300)
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert proc.returncode == errors.EXIT_USAGE, proc.stderr
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
  assert "not prepared" in lines[0] and "tfds build mnist" in lines[0]


def test_damaged_run_json_is_1_and_names_the_file(tmp_path, capsys):
  run = make_run(tmp_path / "run")
  with open(os.path.join(run, runs.RUN_META), "w") as f:
    f.write('{"command": "train-')
  status, line = run_main(capsys, "eval", run)
  assert status == errors.EXIT_FAILURE, line
  assert os.path.join(run, runs.RUN_META) in line, line
  assert "not valid JSON" in line, line


def test_damaged_lm_run_json_is_a_run_error(tmp_path):
  """LM runs read run.json through the same reader: a damaged one is a RunError."""
  from kdjax.cli.lm import models as _lm_models  # pylint: disable=g-import-not-at-top
  run = tmp_path / "lm_run"
  run.mkdir()
  (run / runs.RUN_META).write_text('{"kind": "lm", "comm')
  with pytest.raises(errors.RunError, match="not valid JSON"):
    _lm_models.read_lm_run(str(run))
  with pytest.raises(errors.MissingRunError, match="kdjax lm train-teacher"):
    _lm_models.read_lm_run(str(tmp_path / "missing"))


def test_run_without_checkpoint_is_a_missing_run(tmp_path, capsys):
  run = _models.read_run(make_run(tmp_path / "run"))
  with pytest.raises(errors.MissingRunError, match="no checkpoint yet"):
    run.restore_variables()
  with pytest.raises(errors.MissingRunError, match="not a kdjax run"):
    _models.read_run(str(tmp_path))
  status, line = run_main(capsys, "eval", run.path)
  assert status == errors.EXIT_USAGE and "train it first" in line, line


def test_batch_larger_than_the_data_is_a_batch_size_error(tmp_path):
  config = cfg.load_config([TINY], ["data.source=synthetic",
                                    "data.max_train_examples=16"])
  source = _data.build_source(config["data"], "train")
  with pytest.raises(errors.BatchSizeError, match="data.batch_size"):
    _data.train_pipeline(config["data"], source, seed=0, batch_size=32)


def test_report_errors_are_usage_errors(tmp_path):
  pytest.importorskip("matplotlib")
  out = str(tmp_path / "report")
  with pytest.raises(errors.UsageError) as info:
    _report.write_report([str(tmp_path), str(tmp_path)], out, ["one"],
                         evaluate=False)
  assert kmain.exit_status(info.value) == errors.EXIT_USAGE
  with pytest.raises(errors.MissingRunError, match="no run directory"):
    _report.write_report([str(tmp_path / "none")], out, evaluate=False)
  with pytest.raises(errors.MissingRunError, match="neither"):
    _report.write_report([str(tmp_path)], out, evaluate=False)


def test_split_name_of_each_source():
  data = {**cfg.default_config()["data"], "source": "arrays",
          "train_path": "/d/digits_train.npz",
          "eval_path": "/d/digits_eval.npz"}
  assert _data.split_name(data, "eval") == "digits_eval.npz"
  assert _data.split_name(data, "train") == "digits_train.npz"
  assert _data.split_name({**data, "source": "synthetic"},
                          "eval") == "synthetic eval"
  assert _data.split_name({**data, "source": "idx"}, "eval") == "test"
  assert _data.split_name({**data, "source": "tfds",
                           "eval_split": "validation"}, "eval") == "validation"


@pytest.mark.slow
def test_eval_of_arrays_names_the_file(tmp_path, capsys):
  rng = np.random.default_rng(0)
  for split, n in (("train", 32), ("held_out", 12)):
    np.savez(tmp_path / f"{split}.npz",
             image=rng.integers(0, 256, (n, 6, 6), dtype=np.uint8),
             label=rng.integers(0, 3, n))
  sets = [f"output_dir={tmp_path / 'runs'}", "data.source=arrays",
          f"data.train_path={tmp_path / 'train.npz'}",
          f"data.eval_path={tmp_path / 'held_out.npz'}", "data.batch_size=16",
          "data.eval_batch_size=16", "teacher.arch=mlp", "teacher.hidden=[4]",
          "teacher.steps=1", "teacher.epochs=null", "train.progress=false",
          "eval.latency_runs=1", "eval.latency_batch_sizes=[1]"]
  assert kmain.main(["train-teacher", "--config", TINY, "--set", *sets]) == 0
  capsys.readouterr()
  run = str(tmp_path / "runs" / "teacher")
  assert kmain.main(["eval", run]) == 0
  out = capsys.readouterr().out
  assert "on 12 held_out.npz examples" in out, out
