"""``benchmarks/gpu_suite.py`` at CPU size, with grain and tensorflow-datasets blocked.

The GPU image the suite is written for has no ``grain`` and no
``tensorflow_datasets``: the subprocess sets both to ``None`` in
``sys.modules`` (an import of either raises ``ImportError``) before it runs
the script, so any import of them on the suite's path fails a section (or
the script). Two simulated CPU devices make the sharded section really split
the batch. XLA optimisations are mostly off
(``JAX_DISABLE_MOST_OPTIMIZATIONS``): the run is about the suite's plumbing,
not its CPU numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUITE = os.path.join(REPO_ROOT, "benchmarks", "gpu_suite.py")
SECTIONS = ("matmul_peak", "lm_step", "memory", "loop", "sharded",
            "large_vocab")

RUNNER = textwrap.dedent("""
    import runpy, sys
    for name in ("grain", "tensorflow_datasets", "tensorflow"):
      sys.modules[name] = None  # 'import name' now raises ImportError
    sys.argv = [sys.argv[1]] + sys.argv[2:]
    runpy.run_path(sys.argv[0], run_name="__main__")
    leaked = [m for m in ("grain", "tensorflow_datasets", "tensorflow")
              if sys.modules.get(m) is not None]
    assert not leaked, leaked
""")


def _run_suite(out_dir, *args, devices=2, timeout=300):
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_DISABLE_MOST_OPTIMIZATIONS"] = "true"
  env["XLA_FLAGS"] = (f"--xla_force_host_platform_device_count={devices} "
                      + env.get("XLA_FLAGS", "")).strip()
  env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return subprocess.run(
      [sys.executable, "-c", RUNNER, SUITE, "--cpu-size", "--out",
       str(out_dir), *args],
      capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO_ROOT)


@pytest.mark.slow
def test_cpu_size_run_has_every_section(tmp_path):
  proc = _run_suite(tmp_path, "--budget-s", "120", "--steps", "1",
                    "--repeats", "2", "--loop-steps", "2")
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  assert sorted(os.listdir(tmp_path)) == ["gpu_suite.json", "gpu_suite.log",
                                          "gpu_suite.md"]
  report = json.loads((tmp_path / "gpu_suite.json").read_text())
  assert report["device"]["device_kind"]
  assert report["device"]["backend"] == "cpu"
  assert report["device"]["local_device_count"] == 2
  assert proc.stdout.startswith("device: ")
  assert set(report["sections"]) == set(SECTIONS)
  for key, sec in report["sections"].items():
    # On CPU, with a 120 s budget, every section runs (a blocked grain/tfds
    # import would show up here as a failed section).
    assert sec["status"] == "ok", (key, sec.get("reason"),
                                   sec.get("traceback"))
    assert sec["rows"] and len(sec["columns"]) == len(sec["rows"][0]), key
  lm_ms = report["sections"]["lm_step"]["data"]["ms"]
  assert set(lm_ms) == {"kdjax", "hand-written"}
  assert all(v > 0 for v in lm_ms.values())
  # The memory section measures nothing on CPU: it says n/a, not a number.
  mem = report["sections"]["memory"]
  assert mem["data"]["device_after"] is None
  assert mem["data"]["estimate_bytes"] > 0
  assert report["sections"]["sharded"]["data"]["devices"] == 2
  large = report["sections"]["large_vocab"]["data"]
  assert set(large["ms"]) == {"plain", "hand-written", "lean fused"}
  assert not large["failed"]
  md = (tmp_path / "gpu_suite.md").read_text()
  assert report["device"]["device_kind"] in md
  assert "CPU numbers, not GPU numbers" in md
  for title in ("1. bf16 matmul peak", "2. LM token-KD step", "3. large",
                "4. kdjax step sharded", "5. library loop", "6. memory"):
    assert title in md


def test_spent_budget_skips_every_section_and_says_so(tmp_path):
  proc = _run_suite(tmp_path, "--budget-s", "0", devices=1)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  report = json.loads((tmp_path / "gpu_suite.json").read_text())
  assert set(report["sections"]) == set(SECTIONS)
  for sec in report["sections"].values():
    assert sec["status"] == "skipped"
    assert "time budget" in sec["reason"]
  assert proc.stdout.count("SKIPPED: time budget") == len(SECTIONS)
  assert "**skipped**: time budget" in (tmp_path / "gpu_suite.md").read_text()


def test_failing_section_is_reported_and_the_rest_run(tmp_path, monkeypatch):
  sys.path.insert(0, os.path.dirname(SUITE))
  try:
    import gpu_suite  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.remove(os.path.dirname(SUITE))

  def boom(ctx):
    raise MemoryError("RESOURCE_EXHAUSTED: out of memory (simulated)")

  def fine(ctx):
    return {"columns": ["a", "b"], "rows": [["x", 1.5]], "notes": ["n"]}

  monkeypatch.setattr(gpu_suite, "SECTIONS", (
      gpu_suite.Section("one", "one", boom, 0),
      gpu_suite.Section("two", "two", fine, 0)))
  args = types.SimpleNamespace(
      out=str(tmp_path), cpu_size=True, budget_s=60.0, grace_s=5.0,
      sections=None, steps=None, repeats=None, loop_steps=None)
  report = gpu_suite.run_suite(args)
  assert report["sections"]["one"]["status"] == "failed"
  assert "out of memory" in report["sections"]["one"]["reason"]
  assert report["sections"]["two"]["status"] == "ok"
  md = (tmp_path / "gpu_suite.md").read_text()
  assert "**failed**: MemoryError" in md and "| x | 1.5 |" in md


def test_section_running_past_budget_is_interrupted(tmp_path, monkeypatch):
  sys.path.insert(0, os.path.dirname(SUITE))
  try:
    import gpu_suite  # pylint: disable=g-import-not-at-top
  finally:
    sys.path.remove(os.path.dirname(SUITE))
  import time  # pylint: disable=g-import-not-at-top

  def slow(ctx):
    for _ in range(400):
      time.sleep(0.025)
    return {"columns": ["a"], "rows": [["never"]]}

  monkeypatch.setattr(gpu_suite, "SECTIONS", (
      gpu_suite.Section("slow", "slow", slow, 0),
      gpu_suite.Section("after", "after", slow, 0)))
  args = types.SimpleNamespace(
      out=str(tmp_path), cpu_size=True, budget_s=0.5, grace_s=0.5,
      sections=None, steps=None, repeats=None, loop_steps=None)
  report = gpu_suite.run_suite(args)
  assert report["sections"]["slow"]["status"] == "failed"
  assert "interrupted" in report["sections"]["slow"]["reason"]
  assert report["sections"]["slow"]["wall_s"] < 5
  assert report["sections"]["after"]["status"] == "skipped"
  assert "time budget" in report["sections"]["after"]["reason"]
