"""Smoke test of experiments/lm_instructions.py (--smoke: tiny Qwen3 models,
a few modules of the built-in instruction set, a few steps), run as a
subprocess so that no jax flag of the test process changes."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO_ROOT, "experiments", "lm_instructions.py")


def test_lm_instructions_smoke(tmp_path):
  out = tmp_path / "lm_instructions.json"
  proc = subprocess.run(
      [sys.executable, SCRIPT, "--smoke", "--out-dir", str(tmp_path / "runs"),
       "--json", str(out)],
      capture_output=True, text=True, timeout=600, check=False,
      cwd=REPO_ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu",
                          "PYTHONPATH": REPO_ROOT})
  assert proc.returncode == 0, proc.stderr[-3000:]
  payload = json.loads(out.read_text())
  assert payload["smoke"] and payload["seeds"] == [0, 1]
  assert set(payload["runs"]) == {"alone", "token_kd", "gkd"}
  for name, runs in payload["runs"].items():
    assert [r["seed"] for r in runs] == [0, 1], name
    for r in runs:
      assert math.isfinite(r["perplexity"]) and r["perplexity"] > 1.0
      assert math.isfinite(r["teacher_kl"]) and r["teacher_kl"] >= 0.0
      assert r["per_file"] and set(r["per_file"]) == set(
          payload["held_out_files"])
    s = payload["summary"][name]
    assert all(math.isfinite(s[k]["mean"]) for k in ("perplexity", "nll",
                                                     "teacher_kl"))
  for name in ("token_kd", "gkd"):
    c = payload["comparisons"][name]
    assert math.isfinite(c["nll_diff"]["mean"])
    for level in ("ci95", "ci97_5"):
      lo, hi = c["bootstrap"]["nll"][level]
      assert math.isfinite(lo) and math.isfinite(hi) and lo <= hi
    # The corrected interval holds the uncorrected one.
    assert (c["bootstrap"]["nll"]["ci97_5"][0]
            <= c["bootstrap"]["nll"]["ci95"][0])
    assert isinstance(c["beats_alone"], bool)
  # Paired differences are of the runs' own numbers.
  d = [k - a for k, a in zip(payload["summary"]["token_kd"]["nll"]["per_seed"],
                             payload["summary"]["alone"]["nll"]["per_seed"])]
  assert abs(payload["comparisons"]["token_kd"]["nll_diff"]["mean"]
             - sum(d) / len(d)) < 1e-9
  assert set(payload["samples"]) == {"teacher", "alone", "token_kd"}
  assert all(len(s) == 3 for s in payload["samples"].values())
  assert "| student alone |" in payload["table"]
