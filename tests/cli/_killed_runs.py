"""Helpers of the exact-resume tests: `kdjax` commands run in fresh
processes, SIGKILLed at chosen points, under CPU load; their final state read
straight from the orbax checkpoint (no kdjax reader, so the comparison does
not depend on the code it checks).

Kill points (``Kill.mode``):

* ``mid_step``: a timer thread SIGKILLs the process ``delay`` seconds after
  the step-``step`` checkpoint hook ran, while later steps run;
* ``during_save``: right after ``save`` of step ``step`` returned, while its
  background (asynchronous) write is still in flight;
* ``after_save``: once the write of step ``step`` has committed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import subprocess
import sys
import warnings
from typing import Iterator, Optional, Sequence

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
WALL_CLOCK = ("time", "samples_per_s")

_KILLER = r"""
import os, signal, sys, threading
from kdjax.checkpoint import DistillCheckpointer
mode, at, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
original = DistillCheckpointer.save

def kill():
  sys.stdout.flush()
  os.kill(os.getpid(), signal.SIGKILL)

def save(self, state, *, step=None, **kwargs):
  if mode == "mid_step" and step == at:
    threading.Timer(delay, kill).start()
  started = original(self, state, step=step, **kwargs)
  if started and step == at and mode == "during_save":
    print("KILL during the write of step", step, flush=True)
    kill()
  if started and step == at and mode == "after_save":
    self.wait_until_finished()
    print("KILL after step", step, "committed", flush=True)
    kill()
  return started

DistillCheckpointer.save = save
from kdjax.cli.main import main
sys.exit(main(sys.argv[4:]))
"""


@dataclasses.dataclass(frozen=True)
class Kill:
  mode: str            # "mid_step" | "during_save" | "after_save"
  step: int
  delay: float = 0.0   # mid_step: seconds after the step's hook


def env(compilation_cache: Optional[str] = None) -> dict:
  """The environment of a command's process: one CPU device, this checkout;
  with ``compilation_cache``, JAX's persistent compilation cache there (the
  processes of one test compile each step once; a cached executable is the
  same program, so the comparison still covers a real user's runs)."""
  out = dict(os.environ, JAX_PLATFORMS="cpu")
  out["PYTHONPATH"] = REPO_ROOT + os.pathsep + out.get("PYTHONPATH", "")
  out.pop("XLA_FLAGS", None)
  if compilation_cache:
    out.update(JAX_COMPILATION_CACHE_DIR=str(compilation_cache),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return out


def run(args: Sequence[str], kill: Optional[Kill] = None, *,
        compilation_cache: Optional[str] = None,
        timeout: float = 900) -> subprocess.CompletedProcess:
  """``kdjax *args`` in a fresh Python, SIGKILLed at ``kill`` if given."""
  mode = (kill.mode, str(kill.step), str(kill.delay)) if kill else (
      "none", "-1", "0")
  return subprocess.run(
      [sys.executable, "-c", _KILLER, *mode, *map(str, args)],
      capture_output=True, text=True, env=env(compilation_cache),
      cwd=REPO_ROOT, timeout=timeout)


def killed_then_resumed(args: Sequence[str], kills: Sequence[Kill], *,
                        compilation_cache: Optional[str] = None) -> str:
  """Runs ``args`` killed at each of ``kills`` in turn, then to the end;
  returns the last run's stdout. Asserts every kill happened."""
  for kill in kills:
    proc = run(args, kill, compilation_cache=compilation_cache)
    assert proc.returncode == -9, (
        f"expected a SIGKILL at {kill}, got exit {proc.returncode}\n"
        f"{proc.stdout}\n{proc.stderr[-4000:]}")
  proc = run(args, compilation_cache=compilation_cache)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-4000:]
  return proc.stdout


def checkpoint_steps(run_dir: str) -> list[int]:
  """The committed checkpoint steps of a run, oldest first."""
  return sorted(int(os.path.basename(p)) for p in glob.glob(
      os.path.join(run_dir, "checkpoints", "*"))
                if os.path.basename(p).isdigit())


def latest_state(run_dir: str) -> tuple[int, dict]:
  """``(step, {path: array})`` of the newest committed checkpoint."""
  steps = checkpoint_steps(run_dir)
  assert steps, f"no checkpoint in {run_dir}"
  return steps[-1], state_at(run_dir, steps[-1])


def state_at(run_dir: str, step: int) -> dict:
  """``{path: array}`` of the state item of checkpoint ``step``, read by
  orbax alone (as saved: no template, no kdjax reader)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  path = os.path.join(run_dir, "checkpoints", str(step), "state")
  with warnings.catch_warnings():
    # "Sharding info not provided when restoring": one CPU device here.
    warnings.simplefilter("ignore", UserWarning)
    with ocp.PyTreeCheckpointer() as ckptr:
      tree = ckptr.restore(path)
  flat = {}

  def walk(prefix, node):
    if isinstance(node, dict):
      for k, v in node.items():
        walk(f"{prefix}/{k}", v)
    elif isinstance(node, (list, tuple)):
      for i, v in enumerate(node):
        walk(f"{prefix}/{i}", v)
    elif node is not None:
      flat[prefix] = np.asarray(node)

  walk("", tree)
  return flat


def differing_leaves(got: dict, want: dict) -> dict:
  """``{path: max abs difference}`` of the leaves that are not bit-equal."""
  assert sorted(got) == sorted(want), (sorted(got), sorted(want))
  return {k: float(np.max(np.abs(got[k].astype(np.float64)
                                 - want[k].astype(np.float64))))
          for k in want if not np.array_equal(got[k], want[k])}


def records(run_dir: str) -> list[dict]:
  """metrics.jsonl without its wall-clock fields."""
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK}
            for line in f if line.strip()]


def summary_eval(run_dir: str) -> dict:
  with open(os.path.join(run_dir, "summary.json")) as f:
    return json.load(f)["eval"]


def assert_same_run(run_dir: str, reference_dir: str) -> None:
  """Same final step, bit-identical state (params, optimizer state, RNG,
  step), the same logged records and the same held-out metrics."""
  step, got = latest_state(run_dir)
  ref_step, want = latest_state(reference_dir)
  assert step == ref_step
  differing = differing_leaves(got, want)
  assert not differing, f"state differs from the straight run: {differing}"
  assert records(run_dir) == records(reference_dir)
  assert summary_eval(run_dir) == summary_eval(reference_dir)


# Busy-loops until its parent is gone (a test process killed by a timeout
# leaves no burner behind).
_BURNER = """
import os
parent = os.getppid()
while os.getppid() == parent:
  pass
"""


@contextlib.contextmanager
def cpu_load(processes: int = 2) -> Iterator[None]:
  """``processes`` busy-looping Pythons for the duration (the CPU load the
  resume must be exact under)."""
  burners = [subprocess.Popen([sys.executable, "-c", _BURNER])
             for _ in range(processes)]
  try:
    yield
  finally:
    for p in burners:
      p.kill()
    for p in burners:
      p.wait()
