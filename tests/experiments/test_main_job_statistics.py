"""The main job's statistics (paired t, one-sided p, 95% CI) and what its
committed readings say about reproducing the table elsewhere.

Every reading of the main job (experiments/results/fashion_mnist_kd*.json
written by ``python experiments/fashion_mnist_kd.py``) records the machine
and code it came from; bits repeat only on the same CPU, flags and code
(BUILD_NOTES.md, "Reproducibility"). What must hold across readings is the
README's claim: each reading's mean full-set gain lies inside the 95%
interval of the others.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import math
import os

import jax  # noqa: F401  (imported before experiments/ joins sys.path)
import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
RESULTS = os.path.join(REPO_ROOT, "experiments", "results")


@pytest.fixture(scope="module")
def main_job():
  """experiments/fashion_mnist_kd.py as a module (sys.path restored
  afterwards, and the experiments' modules forgotten, as
  tests/experiments/test_experiments_smoke.py does)."""
  import sys  # pylint: disable=g-import-not-at-top
  saved_path, saved_modules = list(sys.path), set(sys.modules)
  sys.path.insert(0, os.path.join(REPO_ROOT, "experiments"))
  spec = importlib.util.spec_from_file_location(
      "fashion_mnist_kd_statistics", os.path.join(REPO_ROOT, "experiments",
                                                  "fashion_mnist_kd.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  yield module
  sys.path[:] = saved_path
  # Only the experiments' own modules are forgotten: a third-party module
  # imported meanwhile (scipy.stats imports numpy.fft) stays, since an
  # extension module cannot be loaded twice in one process (a later
  # `import numpy.fft` would raise "cannot load module more than once").
  experiments = os.path.join(REPO_ROOT, "experiments")
  for name in set(sys.modules) - saved_modules:
    path = getattr(sys.modules[name], "__file__", None) or ""
    if name == spec.name or os.path.abspath(path).startswith(experiments):
      del sys.modules[name]


# Student's t table values (two-sided 95%: the 0.975 quantile).
@pytest.mark.parametrize("df, quantile", [(1, 12.7062), (2, 4.3027),
                                          (4, 2.7764), (9, 2.2622),
                                          (14, 2.1448)])
def test_t_quantiles_match_the_table(main_job, df, quantile):
  assert main_job.student_t_quantile(0.975, df) == pytest.approx(
      quantile, abs=1e-4)


def test_t_p_values_match_scipy(main_job):
  stats = pytest.importorskip("scipy.stats")
  for t in (0.3, 1.0, 2.5, 6.53, 12.0):
    for df in (1, 2, 3, 4, 7, 14):
      assert main_job.student_t_two_sided_p(t, df) == pytest.approx(
          2 * stats.t.sf(t, df), rel=1e-9, abs=1e-12)


def test_paired_gain_of_the_audit(main_job):
  # The per-seed gains of the session-5 table: the audit's t 6.53, one-sided
  # p 0.0014, 95% CI [0.44, 1.09].
  alone = [0.9] * 5
  distilled = [0.9 + g / 100 for g in (0.88, 1.09, 0.50, 0.49, 0.86)]
  g = main_job.paired_gain(alone, distilled)
  assert g["t"] == pytest.approx(6.53, abs=0.01)
  assert g["p_one_sided"] == pytest.approx(0.00142, abs=1e-5)
  assert g["ci95"] == pytest.approx([0.44, 1.09], abs=0.01)
  assert main_job.fmt_test(g) == ("t = 6.53, p = 0.0014", "[+0.44, +1.09]")


# The options that define the full-set arms: readings that agree on them are
# the same experiment (on another machine or code version).
SAME_EXPERIMENT = ("retrain_teacher", "seeds", "student", "temperature",
                   "kd_weight", "full_epochs", "alone_full_epochs",
                   "batch_size", "lr", "max_train", "max_test")


def _readings() -> list[tuple[str, dict]]:
  with open(os.path.join(RESULTS, "fashion_mnist_kd.json")) as f:
    reference = json.load(f)["args"]
  out = []
  for path in sorted(glob.glob(os.path.join(RESULTS, "fashion_mnist_kd*.json"))):
    with open(path) as f:
      payload = json.load(f)
    if any(payload["args"].get(k) != reference.get(k) for k in SAME_EXPERIMENT):
      continue
    row = next((r for r in payload["rows"] if r["regime"].startswith("full")
                and r["run"] == "distilled"), None)
    if row is not None and len(row["gain"]["per_seed"]) > 1:
      out.append((os.path.basename(path), row["gain"]["per_seed"]))
  return out


def test_each_reading_lies_in_the_others_interval(main_job):
  readings = _readings()
  assert len(readings) >= 2, readings
  for name, gains in readings:
    mean = sum(gains) / len(gains)
    for other, other_gains in readings:
      g = main_job.paired_gain([0.0] * len(other_gains),
                               [x / 100 for x in other_gains])
      lo, hi = g["ci95"]
      assert lo <= mean <= hi, (
          f"{name}'s mean gain {mean:+.2f} lies outside {other}'s 95% CI "
          f"[{lo:+.2f}, {hi:+.2f}]")
      assert math.isfinite(mean)


def test_the_fixture_leaves_third_party_modules_loaded(tmp_path):
  """The main_job fixture once forgot every module imported while it lived,
  numpy.fft among them (scipy.stats imports it): the next test in the same
  process to need scipy.linalg (jax's export does) failed with "cannot load
  module more than once per process". Replayed in a fresh pytest process,
  in that order."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  after = tmp_path / "test_after.py"
  after.write_text("def test_scipy_linalg_imports():\n"
                   "  import scipy.linalg  # noqa: F401\n")
  first = os.path.abspath(__file__) + "::test_t_p_values_match_scipy"
  proc = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
       "-p", "no:randomly", first, str(after)], capture_output=True,
      text=True, timeout=300, cwd=REPO_ROOT, check=False)
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
  assert "2 passed" in proc.stdout
