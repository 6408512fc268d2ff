"""Start-up cost of the ``kdjax`` command line: wall time and what it imports.

Each case runs in a fresh interpreter (``python -c`` wrapper around
``kdjax.cli.main``, as the console script does); the parent measures the
wall time from spawn to exit, the child reports which heavy packages ended
up in ``sys.modules`` and, for the training case, when the first optimizer
step was logged. Median over ``--repeats`` runs:

* ``import kdjax``;
* ``kdjax --help``;
* ``kdjax config --schema``;
* ``kdjax distill`` of a tiny student on synthetic data (``distill.method=ce``,
  2 steps, ``train.log_every=1``): wall time, time to the first logged step
  (setup + imports + first compile) and the imports of a training command.

``--importtime`` adds, per case, the packages that took longest to import
(self times of ``python -X importtime`` summed per top-level package).

Usage::

  python benchmarks/bench_cli_startup.py [--repeats 3] [--importtime]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HEAVY = ("jax", "flax", "optax", "orbax", "tensorflow_datasets", "tensorflow",
         "grain", "matplotlib", "tensorboardX", "tensorboard", "chex")

# Runs ``argv`` through kdjax.cli.main in this process; at exit writes the
# heavy packages imported and the wall-clock time of the first train record.
_WRAPPER = r"""
import atexit, json, os, sys, time
_report = {"first_step_at": None}
def _dump():
  _report["modules"] = sorted({m.split(".")[0] for m in sys.modules})
  with open(os.environ["KDJAX_BENCH_OUT"], "w") as f:
    json.dump(_report, f)
atexit.register(_dump)
argv = json.loads(os.environ["KDJAX_BENCH_ARGV"])
if argv == ["import"]:
  import kdjax
  sys.exit(0)
if "distill" in argv:
  from kdjax.cli import metrics_log as _logging
  _log = _logging.MetricsLogger.log
  def log(self, step, split, values):
    if split == "train" and _report["first_step_at"] is None:
      _report["first_step_at"] = time.time()
    return _log(self, step, split, values)
  _logging.MetricsLogger.log = log
from kdjax.cli.main import main
sys.exit(main(argv))
"""


def _env(out: str, argv) -> dict:
  return dict(os.environ, KDJAX_BENCH_OUT=out,
              KDJAX_BENCH_ARGV=json.dumps(argv), JAX_PLATFORMS="cpu",
              PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))


def run_once(argv, tmp: str) -> dict:
  """Wall time, first-step time (or None) and heavy imports of one run."""
  out = os.path.join(tmp, "report.json")
  t0 = time.time()
  proc = subprocess.run([sys.executable, "-c", _WRAPPER], cwd=REPO_ROOT,
                        env=_env(out, argv), capture_output=True, text=True)
  wall = time.time() - t0
  if proc.returncode != 0:
    raise RuntimeError(f"{argv} exited {proc.returncode}:\n{proc.stderr}")
  with open(out) as f:
    report = json.load(f)
  first = report["first_step_at"]
  return {"wall": wall, "first_step": None if first is None else first - t0,
          "heavy": [m for m in HEAVY if m in report["modules"]],
          "modules": len(report["modules"])}


def import_times(argv, tmp: str, top: int = 8) -> list[tuple[int, str]]:
  """The ``top`` packages whose modules took longest to import (the sum of
  their self times in ``python -X importtime``, us) in one run."""
  out = os.path.join(tmp, "report.json")
  proc = subprocess.run([sys.executable, "-X", "importtime", "-c", _WRAPPER],
                        cwd=REPO_ROOT, env=_env(out, argv),
                        capture_output=True, text=True)
  totals: dict[str, int] = {}
  for line in proc.stderr.splitlines():
    if not line.startswith("import time:") or "cumulative" in line:
      continue
    self_us, _, name = line[len("import time:"):].split("|")
    package = name.strip().split(".")[0]
    totals[package] = totals.get(package, 0) + int(self_us)
  return sorted(((us, name) for name, us in totals.items()), reverse=True)[:top]


def distill_argv(tmp: str) -> list[str]:
  return ["distill", "--config",
          os.path.join(REPO_ROOT, "experiments", "configs", "tiny.yaml"),
          "--set", f"output_dir={os.path.join(tmp, 'runs')}",
          "data.source=synthetic", "data.max_train_examples=256",
          "data.max_eval_examples=128", "data.eval_batch_size=128",
          "distill.method=ce", "train.steps=2", "train.log_every=1",
          "train.eval_every=0", "train.progress=false",
          "checkpoint.save_every=0"]


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--importtime", action="store_true",
                      help="also list the slowest imports of each case")
  args = parser.parse_args()
  tmp = tempfile.mkdtemp(prefix="kdjax_bench_cli_")
  cases = [("import kdjax", ["import"]), ("kdjax --help", ["--help"]),
           ("kdjax config --schema", ["config", "--schema"]),
           ("kdjax distill (tiny, 2 steps)", distill_argv(tmp))]
  try:
    rows = []
    for label, argv in cases:
      runs = []
      for _ in range(args.repeats):
        shutil.rmtree(os.path.join(tmp, "runs"), ignore_errors=True)
        runs.append(run_once(argv, tmp))
      firsts = [r["first_step"] for r in runs if r["first_step"] is not None]
      rows.append((label, statistics.median(r["wall"] for r in runs),
                   statistics.median(firsts) if firsts else None,
                   runs[-1]["modules"], runs[-1]["heavy"]))
    print(f"median of {args.repeats} runs, python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs, JAX_PLATFORMS=cpu\n")
    print("| command | wall (s) | first step (s) | top-level modules | "
          "heavy packages imported |")
    print("|---|---:|---:|---:|---|")
    for label, wall, first, count, heavy in rows:
      first_text = "" if first is None else f"{first:.2f}"
      print(f"| {label} | {wall:.2f} | {first_text} | {count} | "
            f"{', '.join(heavy) or '-'} |")
    if args.importtime:
      for label, argv in cases:
        shutil.rmtree(os.path.join(tmp, "runs"), ignore_errors=True)
        print(f"\nimport time of {label} by package (ms, self times summed):")
        for us, name in import_times(argv, tmp):
          print(f"  {us / 1000:8.1f}  {name}")
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
  main()
