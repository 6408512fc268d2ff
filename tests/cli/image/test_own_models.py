"""A user's own models through the command line.

``teacher.arch`` / ``student.arch`` name a Flax linen or NNX module class
(``package.module:ClassName``) written by the test into a temp dir on
``sys.path``; ``kwargs`` come from the YAML, ``num_classes`` and (NNX)
``input_shape`` from the data, ``features`` name what the feature methods
read. train-teacher + distill run end to end on 64 random 8x8x1 images of 3
classes (``data.source: arrays``).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

from kdjax.cli.image import models as _models
from kdjax.cli.config import image as cfg
from kdjax.cli.main import main

PACKAGE = "kdjax_test_user_nets"

_NETS = '''
"""A user's models: one linen, one NNX, and two that do not fit."""
import flax.linen as nn
from flax import nnx


class LinenCNN(nn.Module):
  width: int = 4
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train: bool = False):
    x = nn.relu(nn.Conv(self.width, (3, 3), name="block1")(x))
    x = nn.Dropout(0.1, deterministic=not train)(x)
    return nn.Dense(self.num_classes, name="head")(x.reshape(x.shape[0], -1))


class NnxCNN(nnx.Module):
  def __init__(self, input_shape, num_classes, width=4, *, rngs):
    h, w, c = input_shape
    self.block1 = nnx.Conv(c, width, (3, 3), rngs=rngs)
    self.bn = nnx.BatchNorm(width, rngs=rngs)
    self.drop = nnx.Dropout(0.1, rngs=rngs)
    self.head = nnx.Linear(h * w * width, num_classes, rngs=rngs)

  def __call__(self, x):
    x = self.drop(nnx.relu(self.bn(self.block1(x))))
    return self.head(x.reshape(x.shape[0], -1))


class FixedFive(nn.Module):
  """Five logits whatever the data."""

  @nn.compact
  def __call__(self, x):
    return nn.Dense(5)(x.reshape(x.shape[0], -1))


def not_a_module():
  return None
'''


@pytest.fixture(scope="module")
def user_package(tmp_path_factory):
  """The user's package in a temp dir on sys.path."""
  root = tmp_path_factory.mktemp("user")
  (root / PACKAGE).mkdir()
  (root / PACKAGE / "__init__.py").write_text("")
  (root / PACKAGE / "nets.py").write_text(_NETS)
  sys.path.insert(0, str(root))
  yield root
  sys.path.remove(str(root))
  for name in [m for m in sys.modules if m.split(".")[0] == PACKAGE]:
    del sys.modules[name]


@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
  """64 training and 24 evaluation random 8x8x1 images of 3 classes."""
  root = tmp_path_factory.mktemp("arrays")
  rng = np.random.default_rng(0)
  paths = {}
  for split, n in (("train", 64), ("eval", 24)):
    paths[split] = str(root / f"{split}.npz")
    np.savez(paths[split],
             image=rng.integers(0, 256, (n, 8, 8, 1), dtype=np.uint8),
             label=rng.integers(0, 3, n))
  return paths


def run_main(args) -> tuple[int, str, str]:
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    rc = main([str(a) for a in args])
  return rc, out.getvalue(), err.getvalue()


def _config(root, arrays, teacher: dict, student: dict, method: str) -> str:
  config = {
      "output_dir": str(root / "runs"), "seed": 0,
      "data": {"source": "arrays", "train_path": arrays["train"],
               "eval_path": arrays["eval"], "batch_size": 16,
               "eval_batch_size": 24},
      "teacher": {**teacher, "steps": 4},
      "student": student,
      "train": {"steps": 4, "log_every": 2, "progress": False},
      "distill": {"method": method},
      "checkpoint": {"save_every": 2},
      "eval": {"latency_runs": 1, "latency_batch_sizes": [1]},
  }
  path = root / "c.yaml"
  path.write_text(yaml.safe_dump(config))
  return str(path)


def _nets(name: str) -> str:
  return f"{PACKAGE}.nets:{name}"


@pytest.mark.slow
def test_linen_teacher_nnx_student_with_features(user_package, arrays,
                                                 tmp_path):
  del user_package
  path = _config(tmp_path, arrays,
                 {"arch": _nets("LinenCNN"), "kwargs": {"width": 6},
                  "features": ["block1"]},
                 {"arch": _nets("NnxCNN"), "kwargs": {"width": 3},
                  "features": ["block1"]}, "fitnets")
  c = cfg.load_config([path])
  assert c["data"]["num_classes"] == 3
  # The models' features are what the feature method reads.
  assert cfg.method_spec(c).feature_names() == {"student": ("block1",),
                                                "teacher": ("block1",)}
  rc, out, err = run_main(["train-teacher", "--config", path])
  assert rc == 0, out + err
  rc, out, err = run_main(["distill", "--config", path])
  assert rc == 0, out + err
  assert "method fitnets" in out and _nets("NnxCNN") in out
  runs = tmp_path / "runs"
  teacher = _models.read_run(str(runs / "teacher"))
  t_vars = teacher.restore_variables()
  assert t_vars["params"]["block1"]["kernel"].shape == (3, 3, 1, 6)
  assert t_vars["params"]["head"]["kernel"].shape == (8 * 8 * 6, 3)
  student = _models.read_run(str(runs / "student_fitnets"))
  s_vars = student.restore_variables()
  assert s_vars["params"]["head"]["kernel"].shape == (8 * 8 * 3, 3)
  apply = _models.make_apply(student.module(), ["block1"])
  out = apply(s_vars, {"image": np.zeros((2, 8, 8, 1), np.float32)})
  assert out.logits.shape == (2, 3)
  assert out.features["block1"].shape == (2, 8, 8, 3)
  # eval reads both models back from their runs.
  rc, out, err = run_main(["eval", runs / "student_fitnets"])
  assert rc == 0, out + err
  result = json.loads((runs / "student_fitnets" / "eval.json").read_text())
  assert result["count"] == 24 and "teacher" in result


@pytest.mark.slow
def test_nnx_teacher_linen_student(user_package, arrays, tmp_path):
  del user_package
  path = _config(tmp_path, arrays,
                 {"arch": _nets("NnxCNN"), "kwargs": {"width": 5}},
                 {"arch": _nets("LinenCNN"), "kwargs": {"width": 2}}, "kd")
  rc, out, err = run_main(["train-teacher", "--config", path])
  assert rc == 0, out + err
  rc, out, err = run_main(["distill", "--config", path])
  assert rc == 0, out + err
  assert "teacher online" in out
  summary = json.loads((tmp_path / "runs" / "student_kd" /
                        "summary.json").read_text())
  assert 0.0 <= summary["eval"]["accuracy"] <= 1.0


@pytest.mark.parametrize("arch, pieces", [
    ("no_such_pkg_kdjax.nets:Net",
     ["'teacher.arch'", "cannot import module 'no_such_pkg_kdjax.nets'",
      "PYTHONPATH"]),
    (f"{PACKAGE}.nets:Missing",
     ["'teacher.arch'", "has no class 'Missing'", "FixedFive, LinenCNN, "
      "NnxCNN"]),
    (f"{PACKAGE}.nets:not_a_module",
     ["'teacher.arch'", "not a Flax linen or NNX module class"]),
    (f"{PACKAGE}.nets.LinenCNN",
     ["'teacher.arch' must be one of cnn, mlp or an import path",
      f"did you mean '{PACKAGE}.nets:LinenCNN'"]),
])
def test_bad_import_paths_are_config_errors(user_package, tmp_path, arch,
                                            pieces):
  del user_package
  with pytest.raises(cfg.ConfigError) as info:
    cfg.load_config([], [f"teacher.arch={arch}"])
  for piece in pieces:
    assert piece in str(info.value)
  config = tmp_path / "c.yaml"
  config.write_text(yaml.safe_dump({"teacher": {"arch": arch}}))
  rc, _, err = run_main(["train-teacher", "--config", config])
  assert rc == 2 and "config error" in err and pieces[-1] in err


@pytest.mark.parametrize("teacher, pieces", [
    ({"arch": _nets("LinenCNN"), "kwargs": {"depth": 2}},
     ["does not take the arguments", "depth"]),
    ({"arch": _nets("NnxCNN"), "kwargs": {"depth": 2}},
     ["does not take the arguments", "depth"]),
    ({"arch": _nets("FixedFive")},
     ["logits of shape (1, 5)", "3 classes", "num_classes"]),
    ({"arch": "cnn", "channels": [4, 4, 4, 4]},
     ["4 conv blocks", "8x8 images"]),
])
def test_models_that_do_not_fit_the_data(user_package, arrays, tmp_path,
                                         teacher, pieces):
  del user_package
  path = _config(tmp_path, arrays, teacher, {"arch": "mlp"}, "kd")
  rc, out, err = run_main(["train-teacher", "--config", path])
  assert rc == 2, out + err
  for piece in pieces:
    assert piece in err


def test_features_pair_up_for_pair_methods(user_package):
  del user_package
  c = cfg.load_config([], ["distill.method=at",
                           "student.features=[a, b]",
                           "teacher.features=[c, d]"])
  assert cfg.method_spec(c).hparams["pairs"] == (("a", "c"), ("b", "d"))
  # distill.hparams still win over the models' features.
  c = cfg.load_config([], ["distill.method=fitnets", "student.features=[a]",
                           "distill.hparams.student_feature=z"])
  assert cfg.method_spec(c).hparams["student_feature"] == "z"
  with pytest.raises(cfg.ConfigError, match="as many of each"):
    cfg.load_config([], ["distill.method=at", "student.features=[a, b]",
                         "teacher.features=[c]"])


def test_a_module_on_pythonpath_in_a_fresh_process(user_package, tmp_path):
  env = {**os.environ, "PYTHONPATH": str(user_package)}
  config = tmp_path / "c.yaml"
  config.write_text(yaml.safe_dump(
      {"student": {"arch": _nets("NnxCNN"), "kwargs": {"width": 16}}}))
  proc = subprocess.run(
      [sys.executable, "-m", "kdjax.cli.main", "config", "--config", config],
      env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
      check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  student = yaml.safe_load(proc.stdout)["student"]
  assert student["arch"] == _nets("NnxCNN") and student["kwargs"] == {
      "width": 16}
