"""The run config of the kdjax command line: schema, overrides, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml

from kdjax.cli.config import image as cfg
from kdjax.cli.main import main

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
EXAMPLES = os.path.join(REPO_ROOT, "experiments", "configs")


def _write(tmp_path, data, name="c.yaml") -> str:
  path = tmp_path / name
  path.write_text(yaml.safe_dump(data) if not isinstance(data, str) else data)
  return str(path)


def test_defaults_file_and_overrides_in_order(tmp_path):
  path = _write(tmp_path, {"data": {"batch_size": 32}, "optimizer": {"lr": "1e-3"},
                           "distill": {"method": "dkd",
                                       "hparams": {"beta": 2}}})
  c = cfg.load_config([path], ["data.batch_size=16", "optimizer.lr=5e-4",
                               "student.hidden=[64, 32]", "distill.hparams.alpha=0.5",
                               "data.max_train_examples=null", "train.progress=false"])
  assert c["data"]["batch_size"] == 16
  # YAML 1.1 reads 1e-3 / 5e-4 as strings: float keys convert them.
  assert c["optimizer"]["lr"] == 5e-4 and isinstance(c["optimizer"]["lr"], float)
  assert c["student"]["hidden"] == [64, 32]
  assert c["distill"]["hparams"] == {"beta": 2, "alpha": 0.5}
  assert c["train"]["progress"] is False
  # Untouched keys keep their defaults.
  assert c["data"]["eval_batch_size"] == cfg.default_config()["data"]["eval_batch_size"]
  spec = cfg.method_spec(c)
  assert spec.hparams["beta"] == 2.0 and isinstance(spec.hparams["beta"], float)
  assert spec.hparams["alpha"] == 0.5 and spec.hparams["temperature"] == 4.0


def test_temperature_and_tuple_hparams():
  c = cfg.load_config([], ["distill.method=kd", "distill.temperature=2"])
  assert cfg.method_spec(c).hparams["temperature"] == 2.0
  # Methods without a temperature ignore it (student alone vs distilled with
  # one config).
  c = cfg.load_config([], ["distill.method=ce", "distill.temperature=2"])
  assert "temperature" not in cfg.method_spec(c).hparams
  c = cfg.load_config([], ["distill.method=at",
                           "distill.hparams.pairs=[[block_0, block_0]]"])
  assert cfg.method_spec(c).hparams["pairs"] == (("block_0", "block_0"),)


@pytest.mark.parametrize("overrides, pieces", [
    (["optimizer.learnig_rate=1"],
     ["unknown config key 'optimizer.learnig_rate'",
      "valid keys under 'optimizer': grad_clip, lr, momentum"]),
    (["optimiser.lr=1"],
     ["unknown config key 'optimiser'", "did you mean 'optimizer'",
      "valid keys at the top level"]),
    (["data.batch_size=abc"],
     ["'data.batch_size' must be an int >= 1, got 'abc' (str)"]),
    (["data.batch_size=0"], ["'data.batch_size' must be an int >= 1"]),
    (["train.progress=3"], ["'train.progress' must be true or false"]),
    (["optimizer.name=lamb"],
     ["'optimizer.name' must be one of adamw, adam, sgd; got 'lamb'"]),
    (["teacher.channels=[8, x]"], ["'teacher.channels' must be a list of ints"]),
    (["distill.method=dkdd"],
     ["'distill.method': unknown method 'dkdd'", "did you mean 'dkd'",
      "known methods: at, born_again, cc, ce, crd"]),
    (["distill.method=dkd", "distill.hparams.betta=1"],
     ["'distill.hparams.betta'", "did you mean 'beta'",
      "alpha, beta, ce_weight, dkd_weight, temperature, warmup_steps"]),
    (["distill.method=dkd", "distill.hparams.beta=big"],
     ["'distill.hparams.beta' (method 'dkd') must be a number, got 'big'"]),
    (["distill.method=ensemble"], ["recipe 'ensemble'", "not run by the command line"]),
    (["distill.teacher=cache", "data.augment.enabled=true"],
     ["'distill.teacher: cache'", "'data.augment.enabled: true' conflict"]),
    (["data=3"], ["'data' is a section"]),
    (["optimizer.lr.x=3"], ["'optimizer.lr' is a value"]),
    (["lr"], ["--set expects KEY=VALUE"]),
    (["data.batch_size=[1"], ["cannot read '[1' as a YAML value"]),
])
def test_config_errors_name_the_key(overrides, pieces):
  with pytest.raises(cfg.ConfigError) as info:
    cfg.load_config([], overrides)
  for piece in pieces:
    assert piece in str(info.value)


def test_file_errors(tmp_path):
  with pytest.raises(cfg.ConfigError, match="not found"):
    cfg.load_config([str(tmp_path / "missing.yaml")])
  with pytest.raises(cfg.ConfigError, match="not valid YAML"):
    cfg.load_config([_write(tmp_path, "data: [1,\n")])
  with pytest.raises(cfg.ConfigError, match="must hold a mapping"):
    cfg.load_config([_write(tmp_path, "- 1\n- 2\n")])
  path = _write(tmp_path, {"data": {"batchsize": 3}})
  with pytest.raises(cfg.ConfigError) as info:
    cfg.load_config([path])
  assert str(info.value).startswith(path)
  assert "unknown config key 'data.batchsize' (did you mean 'batch_size'?)" in str(
      info.value)


def test_dump_round_trips_and_schema_lists_every_key(tmp_path):
  c = cfg.load_config([], ["distill.method=at", "student.arch=cnn"])
  again = cfg.load_config([_write(tmp_path, cfg.dump(c))])
  assert again == c
  text = cfg.describe_schema()
  for section, fields in cfg.SCHEMA.items():
    assert f"{section}:" in text
    if isinstance(fields, dict):
      for key in fields:
        assert f"{key}:" in text


@pytest.mark.parametrize("name", ["tiny.yaml", "default.yaml"])
def test_example_configs_are_valid(name):
  c = cfg.load_config([os.path.join(EXAMPLES, name)])
  assert cfg.method_spec(c).name == c["distill"]["method"]


def test_main_exits_2_with_a_clear_message(capsys):
  rc = main(["distill", "--set", "distill.method=nope"])
  assert rc == 2  # argparse: --config is required
  capsys.readouterr()
  path = os.path.join(EXAMPLES, "tiny.yaml")
  rc = main(["distill", "--config", path, "--set", "distill.method=nope"])
  err = capsys.readouterr().err
  assert rc == 2
  assert "kdjax distill: config error: config key 'distill.method': unknown " \
         "method 'nope'" in err
  assert "Traceback" not in err
  rc = main(["train-teacher", "--config", path, "--set", "teacher.depth=3"])
  err = capsys.readouterr().err
  assert rc == 2 and "unknown config key 'teacher.depth'" in err
  assert "valid keys under 'teacher': arch, channels, dense" in err
  assert main(["config", "--config", path, "--set", "seed=3"]) == 0
  assert "seed: 3" in capsys.readouterr().out


def test_console_process_exit_status_and_no_traceback():
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run(
      [sys.executable, "-m", "kdjax.cli.main", "distill", "--config",
       os.path.join(EXAMPLES, "tiny.yaml"), "--set", "optimizer.lrr=1"],
      capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120)
  assert proc.returncode == 2
  assert "unknown config key 'optimizer.lrr' (did you mean 'lr'?)" in proc.stderr
  assert "Traceback" not in proc.stderr
