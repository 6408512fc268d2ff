"""``experiments/common.py``'s ``fast_compiles`` leaves no unoptimised code behind.

``jax_disable_most_optimizations`` is not part of JAX's cache keys: an eager
op compiled inside the block (here a flax ``init``'s) is reused after it unless
the caches are cleared, and the same init then differs in its last bits from a
fresh process's. That made ``test_resume_after_sigkill`` fail when a smoke
experiment had run earlier in the same pytest worker.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

_INIT = textwrap.dedent("""
    import sys
    sys.path.insert(0, "experiments")
    import jax, numpy as np
    import common
    from kdjax.models import MLP

    def init():
      x = jax.numpy.zeros((1, 28, 28, 1))
      v = MLP(hidden=(16,), num_classes=10).init(jax.random.PRNGKey(0), x)
      return np.concatenate([np.ravel(a) for a in jax.tree.leaves(v)])

    if sys.argv[1] == "after_fast_compiles":
      with common.fast_compiles(True):
        init()
    np.save(sys.argv[2], init())
""")


def _init_in_a_fresh_process(mode: str, out: str) -> np.ndarray:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH",
                                                                ""))
  proc = subprocess.run([sys.executable, "-c", _INIT, mode, out],
                        capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return np.load(out)


def test_an_init_after_fast_compiles_equals_a_fresh_processs(tmp_path):
  fresh = _init_in_a_fresh_process("fresh", str(tmp_path / "fresh.npy"))
  after = _init_in_a_fresh_process("after_fast_compiles",
                                   str(tmp_path / "after.npy"))
  np.testing.assert_array_equal(after, fresh)
