"""Start-up imports: ``kdjax --help`` and ``kdjax config`` import no JAX, and
``import kdjax`` none of the heavy optional packages.

Each case runs in a fresh interpreter and lists what ended up in
``sys.modules``; ``benchmarks/bench_cli_startup.py`` measures the times.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))

HEAVY = ("jax", "jaxlib", "flax", "optax", "orbax", "chex",
         "tensorflow_datasets", "tensorflow", "grain", "matplotlib",
         "tensorboardX")

# Runs ``code`` (then, if given, kdjax.cli.main with ``argv``); prints the
# top-level packages imported, as JSON, on the last line of stdout.
_PROBE = r"""
import atexit, json, sys
def _dump():
  print("\n" + json.dumps(sorted({m.split(".")[0] for m in sys.modules})))
atexit.register(_dump)
exec(sys.argv[1])
argv = json.loads(sys.argv[2])
if argv is not None:
  from kdjax.cli.main import main
  sys.exit(main(argv))
"""


def imported(code: str = "", argv=None) -> tuple[int, set]:
  """``(exit status, top-level packages imported)`` of one fresh process
  (its stderr is printed, for a failing test's report)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
  proc = subprocess.run([sys.executable, "-c", _PROBE, code, json.dumps(argv)],
                        capture_output=True, text=True, env=env, cwd=REPO_ROOT,
                        timeout=300)
  print(proc.stderr, file=sys.stderr)
  return proc.returncode, set(json.loads(proc.stdout.strip().splitlines()[-1]))


# (``kdjax config --config C`` validates distill.method against kdjax.methods,
# which imports JAX and Flax.)
@pytest.mark.parametrize("argv", [["--help"], ["config", "--schema"],
                                  ["distill", "--help"], ["distill"]])
def test_help_and_config_import_no_jax(argv):
  status, modules = imported(argv=argv)
  assert status in (0, 2)
  assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


def test_a_config_error_imports_no_jax():
  # The config is read before the command imports its trainer.
  status, modules = imported(argv=[
      "distill", "--config", os.path.join("experiments", "configs",
                                          "tiny.yaml"),
      "--set", "optimizer.lrr=1"])
  assert status == 2
  assert "jax" not in modules


def test_import_kdjax_imports_no_heavy_package():
  status, modules = imported("import kdjax, kdjax.data, kdjax.checkpoint; "
                             "kdjax.__version__")
  assert status == 0
  assert not modules & set(HEAVY), sorted(modules & set(HEAVY))


def test_public_names_load_on_first_access():
  # The lazy packages keep every name: attribute access, from-imports,
  # star-imports and dir().
  code = (
      "import kdjax\n"
      "from kdjax import losses\n"
      "assert kdjax.losses is losses\n"
      "assert callable(kdjax.losses.kl_divergence)\n"
      "from kdjax.losses._divergences import kl_divergence\n"
      "assert losses.kl_divergence is kl_divergence\n"
      "assert kdjax.ModelOutput is kdjax.models.ModelOutput\n"
      "assert 'kl_divergence' in dir(losses) and 'train' in dir(kdjax)\n"
      "ns = {}\n"
      "exec('from kdjax.train import *', ns)\n"
      "assert 'DistillState' in ns and 'make_train_step' in ns\n"
      "from kdjax.checkpoint import CheckpointError\n"
      "import sys\n"
      "assert 'orbax' not in {m.split('.')[0] for m in sys.modules}\n"
      "import kdjax.data\n"
      "assert kdjax.data.augment.random_crop is kdjax.data.random_crop\n"
      "try:\n"
      "  kdjax.losses.no_such_loss\n"
      "except AttributeError as e:\n"
      "  assert 'no_such_loss' in str(e)\n"
      "else:\n"
      "  raise AssertionError('no AttributeError')\n")
  status, modules = imported(code)
  assert status == 0
  assert "tensorflow_datasets" not in modules and "matplotlib" not in modules
