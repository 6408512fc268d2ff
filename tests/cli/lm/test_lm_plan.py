"""``kdjax lm plan``: the distill step's memory per device on a simulated
mesh, for the tiny config (experiments/configs/lm_tiny.yaml); bad meshes and
batch sizes exit 2 naming the number to change."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
LM_TINY = os.path.join(REPO_ROOT, "experiments", "configs", "lm_tiny.yaml")

from kdjax.cli.main import main  # noqa: E402


def run_main(args) -> tuple[int, str, str]:
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    rc = main([str(a) for a in args])
  return rc, out.getvalue(), err.getvalue()


def plan_args(tmp_path, *extra) -> list:
  return ["lm", "plan", "--config", LM_TINY, "--set",
          f"output_dir={tmp_path}", *extra]


def check_table(text: str, devices: int, mesh: str) -> None:
  assert f"per device of {devices} (mesh {mesh})" in text, text
  for row in ("teacher parameters", "student parameters", "optimizer state",
              "activations/temporaries (XLA)", "total", "device memory",
              "fits:", "estimate", "measurement on the GPU"):
    assert row in text, text


def test_plan_from_a_process_with_jax(tmp_path):
  # JAX is imported here (by the test session): the plan runs in a fresh
  # interpreter with 8 simulated devices.
  import jax  # noqa: F401  pylint: disable=unused-import,g-import-not-at-top
  rc, out, err = run_main(plan_args(tmp_path, "--devices", 8))
  assert rc == 0, err
  assert "[lm plan] objective token_kd" in out
  check_table(out, 8, "fsdp=8")


def test_plan_command_line_lean_on_a_2d_mesh(tmp_path):
  # The command line imports JAX after setting XLA_FLAGS (in process).
  env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep
             + os.environ.get("PYTHONPATH", ""))
  env.pop("XLA_FLAGS", None)
  proc = subprocess.run(
      [sys.executable, "-m", "kdjax.cli.main", *map(str, plan_args(
          tmp_path, "distill.objective=lean_kd", "--devices", 8, "--mesh",
          "data=2,fsdp=4", "--device-memory-gib", 16))],
      capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300,
      check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "objective lean_kd" in proc.stdout
  check_table(proc.stdout, 8, "data=2 x fsdp=4")
  assert "teacher split over data x fsdp" in proc.stdout


def test_bad_mesh_exits_2_naming_the_size(tmp_path):
  rc, _, err = run_main(plan_args(tmp_path, "--devices", 8, "--mesh",
                                  "data=2,fsdp=3"))
  assert rc == 2
  assert "has 6 devices but --devices is 8" in err
  assert "set fsdp=4" in err and "--devices 6" in err
  rc, _, err = run_main(plan_args(tmp_path, "--devices", 8, "--mesh",
                                  "tensor=8"))
  assert rc == 2 and "unknown axis 'tensor'" in err


def test_batch_not_divisible_exits_2(tmp_path):
  rc, _, err = run_main(plan_args(tmp_path, "data.batch_size=12",
                                  "--devices", 8))
  assert rc == 2
  assert "'data.batch_size' (12)" in err and "multiple of 8" in err
