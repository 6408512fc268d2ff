"""kdjax's XLA_FLAGS workaround for XLA:CPU's racing YNNPACK reductions."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

from kdjax import _xla_flags

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAFE = (f"{_xla_flags.YNN_FUSION_FLAG}="
        f"{_xla_flags.SAFE_YNN_FUSIONS}")


def test_adds_the_flag_after_the_users_flags():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
  assert _xla_flags.apply(env, jaxlib_version=(0, 10))
  assert env["XLA_FLAGS"] == (
      "--xla_force_host_platform_device_count=8 " + SAFE)
  empty = {}
  assert _xla_flags.apply(empty, jaxlib_version=(0, 10))
  assert empty["XLA_FLAGS"] == SAFE
  # Applying twice changes nothing.
  assert not _xla_flags.apply(env, jaxlib_version=(0, 10))
  assert env["XLA_FLAGS"].count("ynn_fusion_type") == 1


def test_leaves_the_users_choice_the_opt_out_and_other_jaxlibs_alone():
  own = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=reduce"}
  assert not _xla_flags.apply(own, jaxlib_version=(0, 10))
  assert own["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=reduce"
  opted_out = {"KDJAX_KEEP_XLA_FLAGS": "1"}
  assert not _xla_flags.apply(opted_out, jaxlib_version=(0, 10))
  assert "XLA_FLAGS" not in opted_out
  # A jaxlib that may not know the flag (an unknown flag is fatal in XLA).
  older = {}
  assert not _xla_flags.apply(older, jaxlib_version=(0, 6))
  assert "XLA_FLAGS" not in older


_RACE = textwrap.dedent("""
    import sys
    if sys.argv[1] == "kdjax":
      import kdjax  # before JAX's first computation
    import jax, jax.numpy as jnp
    a = jnp.ones((1024, 1), jnp.float32)
    f = jax.jit(lambda a: jnp.sum(jnp.broadcast_to(a, (2, 1024, 1024))))
    values = [float(f(a)) for _ in range(300)]
    print(sum(v != 2097152.0 for v in values))
""")


def _wrong_sums(mode: str) -> int:
  env = {k: v for k, v in os.environ.items()
         if k not in ("XLA_FLAGS", "KDJAX_KEEP_XLA_FLAGS")}
  env.update(JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO_ROOT + os.pathsep + env.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", _RACE, mode],
                        capture_output=True, text=True, env=env,
                        cwd=REPO_ROOT, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return int(proc.stdout.split()[-1])


def test_importing_kdjax_makes_the_racing_reduction_exact():
  # The sum of 2**21 ones is exact in float32; with YNNPACK's threaded
  # reduction some of 300 calls return more (7/200 on a quiet 2-core
  # machine, most calls under load). With kdjax imported first, none.
  assert _wrong_sums("kdjax") == 0
