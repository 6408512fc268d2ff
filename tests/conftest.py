"""Test configuration shared by the whole suite.

JAX runs on the CPU here. Tests that need several (simulated) devices start a
subprocess with ``XLA_FLAGS=--xla_force_host_platform_device_count=8`` set
before JAX is imported (see ``run_in_subprocess``); the main test process
keeps one device so that its compiled programs stay small.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

# Before any test computes: kdjax's XLA_FLAGS workaround for XLA:CPU's racing
# YNNPACK reductions (kdjax/_xla_flags.py) reaches this process and, through
# os.environ, every subprocess the tests start.
import kdjax  # noqa: E402,F401  pylint: disable=unused-import

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_in_subprocess(code: str, *, devices: int = 8, timeout: float = 600,
                      env: dict | None = None) -> str:
  """Runs ``code`` in a fresh Python with ``devices`` simulated CPU devices.

  Returns its stdout; raises with stdout/stderr when it exits non-zero.
  """
  full_env = dict(os.environ)
  full_env["XLA_FLAGS"] = (
      f"--xla_force_host_platform_device_count={devices} "
      + full_env.get("XLA_FLAGS", "")).strip()
  full_env["JAX_PLATFORMS"] = "cpu"
  full_env["PYTHONPATH"] = REPO_ROOT + os.pathsep + full_env.get("PYTHONPATH", "")
  full_env.update(env or {})
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)],
                        capture_output=True, text=True, timeout=timeout,
                        env=full_env, cwd=REPO_ROOT)
  if proc.returncode != 0:
    raise AssertionError(
        f"subprocess failed (exit {proc.returncode}):\nSTDOUT:\n{proc.stdout}"
        f"\nSTDERR:\n{proc.stderr[-6000:]}")
  return proc.stdout


@pytest.fixture(scope="session")
def subprocess_runner():
  return run_in_subprocess
