"""What a training command does not import: ``flax.nnx`` for a linen model,
boto3 (tensorboardX's S3 support), Flax and optax to read the method registry.

Each case runs in a fresh interpreter and reports the modules imported
(``benchmarks/bench_cli_startup.py`` measures the times).
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
TINY = os.path.join(REPO_ROOT, "experiments", "configs", "tiny.yaml")

# Runs ``code``; prints the modules imported as JSON on the last line.
_PROBE = r"""
import json, sys
exec(sys.argv[1])
print("\n" + json.dumps(sorted(sys.modules)))
"""


def modules_after(code: str, cwd: str = REPO_ROOT) -> set:
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH",
                                                                ""))
  proc = subprocess.run([sys.executable, "-c", _PROBE, code],
                        capture_output=True, text=True, env=env, cwd=cwd,
                        timeout=300)
  assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
  return set(json.loads(proc.stdout.strip().splitlines()[-1]))


def test_linen_distill_imports_neither_nnx_nor_boto3(tmp_path):
  argv = ["distill", "--config", TINY, "--set", f"output_dir={tmp_path}",
          "data.source=synthetic", "data.max_train_examples=64",
          "data.max_eval_examples=32", "data.batch_size=32",
          "data.eval_batch_size=32", "student.hidden=[8]", "distill.method=ce",
          "train.steps=2", "train.log_every=1", "train.progress=false",
          "checkpoint.save_every=0"]
  modules = modules_after(
      "from kdjax.cli.main import main\n"
      f"assert main({argv!r}) == 0\n")
  assert "flax.linen" in modules and "tensorboardX" in modules
  assert "flax.nnx" not in modules
  assert "boto3" not in modules
  # The TensorBoard event file is still written.
  events = glob.glob(str(tmp_path / "student_ce" / "tb" / "events.out.*"))
  assert events and os.path.getsize(events[0]) > 0


def test_boto3_stays_importable_after_tensorboardx(tmp_path):
  modules = modules_after(
      "from kdjax.cli import metrics_log as _logging\n"
      f"log = _logging.MetricsLogger({str(tmp_path)!r})\n"
      "log.log(1, 'train', {'loss': 1.0}); log.close()\n"
      "import importlib.util, sys\n"
      "assert sys.modules.get('boto3', 0) is not None\n"
      "if importlib.util.find_spec('boto3') is not None:\n"
      "  import boto3\n")
  assert "tensorboardX" in modules


def test_method_registry_imports_no_flax_or_optax():
  modules = modules_after(
      "from kdjax import methods\n"
      "for name in methods.METHODS:\n"
      "  methods.get_method(name)\n")
  tops = {m.split(".")[0] for m in modules}
  assert "flax" not in tops and "optax" not in tops, sorted(
      tops & {"flax", "optax"})
