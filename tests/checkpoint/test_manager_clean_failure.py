"""Restoring past corrupted steps prints kdjax's messages only.

Orbax reads a step's leaves concurrently; when one read fails it used to
close its event loop under the others, which then printed ``RuntimeError:
Event loop is closed`` tracebacks (or ``Exception ignored in <coroutine>``)
around kdjax's own message. Each case runs in a subprocess so that its real
stderr, including what the interpreter prints while collecting, is checked.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

# Saves steps 1 and 2 of a state with many leaves (many concurrent reads),
# damages step 2 (or both) in each way, restores with fallback like
# `kdjax distill` does and reports as the command line does.
SCRIPT = textwrap.dedent("""
    import gc, logging, os, sys
    logging.basicConfig(format="%(levelname)s %(name)s: %(message)s")
    import jax.numpy as jnp
    import numpy as np
    from kdjax import checkpoint as kc

    def truncate(path):
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)

    def largest_data_file(state_dir):
      files = [os.path.join(r, n) for r, _, names in os.walk(state_dir)
               for n in names if os.sep + "d" + os.sep in os.path.join(r, n)]
      return max(files, key=os.path.getsize)

    DAMAGE = {
        "manifest": lambda d: truncate(os.path.join(d, "manifest.ocdbt")),
        "data": lambda d: truncate(largest_data_file(d)),
    }
    root, mode = sys.argv[1], sys.argv[2]
    rng = np.random.default_rng(0)
    state = {f"leaf_{i:02d}": jnp.asarray(rng.normal(size=(32, 32 + i)),
                                          jnp.float32) for i in range(24)}
    for kind, damage in DAMAGE.items():
      directory = os.path.join(root, kind)
      with kc.DistillCheckpointer(directory, save_every=1,
                                  async_save=False) as ckpt:
        ckpt.save(state, step=1)
        ckpt.save({k: v + 1 for k, v in state.items()}, step=2)
      for step in ([2] if mode == "fallback" else [2, 1]):
        damage(os.path.join(directory, str(step), "state"))
      ckpt = kc.DistillCheckpointer(directory, save_every=1)
      try:
        run = ckpt.restore({k: jnp.zeros_like(v) for k, v in state.items()},
                           fallback=True)
        print(f"{kind}: restored step {run.step}, skipped {run.skipped_steps}")
      except kc.CheckpointCorruptedError as e:
        print(f"error: {e}", file=sys.stderr)
      finally:
        ckpt.close()
      gc.collect()
""")

STRAY = ("Traceback", "Event loop is closed", "Exception ignored",
         "was never retrieved", "Task was destroyed", "tensorstore_spec")


def _run(tmp_path, mode: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH",
                                                                 ""))
  return subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), mode],
                        capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                        timeout=300)


def _check_clean(stderr: str) -> None:
  for text in STRAY:
    assert text not in stderr, f"{text!r} in stderr:\n{stderr}"


@pytest.mark.parametrize("mode", ["fallback", "all_corrupted"])
def test_restore_past_corrupted_steps_prints_no_traceback(tmp_path, mode):
  proc = _run(tmp_path, mode)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  _check_clean(proc.stderr)
  # The manifest's DATA_LOSS detail, once per damaged step.
  damaged = 1 if mode == "fallback" else 2
  assert proc.stderr.count("DATA_LOSS") == damaged, proc.stderr
  lines = proc.stderr.splitlines()
  if mode == "fallback":
    assert "manifest: restored step 1, skipped (2,)" in proc.stdout
    assert "data: restored step 1, skipped (2,)" in proc.stdout
    assert sum("Falling back to step 1" in line for line in lines) == 2
    assert not any(line.startswith("error:") for line in lines)
  else:
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 2, proc.stderr
    for line in errors:
      assert "no restorable checkpoint" in line and "steps [2, 1]" in line
    # Step 2 is logged (falling back to 1); step 1 is in the error alone.
    assert sum("Falling back" in line for line in lines) == 2
