"""Qwen3-family distillation with the `kdjax lm` command line, stdlib corpus.

One teacher (Tunix Qwen3, trained with ``kdjax lm train-teacher``), then for
each seed the student (a smaller Qwen3) alone (``distill.objective: ce``),
distilled with token-level KD (forward KL) and with on-policy GKD (lambda
0.5; the generalised JSD, beta 0.5, and forward KL); every run scored by
``kdjax lm eval`` (held-out perplexity over the completion tokens of
held-out files, and KL(teacher || student) per token). Every command is the CLI's own
(``kdjax.cli.main.main``), with the config experiments/configs/
lm_qwen3_stdlib.yaml.

  python experiments/lm_cli_experiment.py \
      --json experiments/results/lm_cli_experiment.json
  python experiments/lm_cli_experiment.py --smoke     # seconds: tiny sizes

Prints a markdown table (mean +- sample std over seeds, paired gains).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# pylint: disable-next=g-import-not-at-top,wrong-import-position
from kdjax.cli.main import main

CONFIG = os.path.join(REPO, "experiments", "configs", "lm_qwen3_stdlib.yaml")
SMOKE = ("train.steps=4", "teacher.steps=4", "data.max_files=24",
         "data.max_file_bytes=4096", "data.eval_every=6",
         "data.max_eval_sequences=32", "tokenizer.vocab_size=300",
         "checkpoint.save_every=0")
RUNS = (("alone", ("distill.objective=ce",)),
        ("token_kd", ("distill.objective=token_kd", "distill.divergence=kl")),
        ("gkd", ("distill.objective=gkd", "distill.divergence=jsd",
                 "distill.beta=0.5", "distill.lmbda=0.5")),
        # GKD with token KD's divergence: separates the on-policy samples
        # from the change of divergence.
        ("gkd_kl", ("distill.objective=gkd", "distill.divergence=kl",
                    "distill.lmbda=0.5")))


def run(args: list) -> float:
  t0 = time.perf_counter()
  rc = main([str(a) for a in args])
  if rc != 0:
    raise SystemExit(f"command failed ({rc}): kdjax {' '.join(map(str, args))}")
  return time.perf_counter() - t0


def mean_std(values) -> str:
  v = np.asarray(values, np.float64)
  std = v.std(ddof=1) if len(v) > 1 else 0.0
  return f"{v.mean():.3f} ± {std:.3f}"


def main_(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default=CONFIG)
  p.add_argument("--out-dir", default=os.path.join(REPO, "runs",
                                                   "lm_cli_experiment"))
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--json", default=None, help="write every number here")
  p.add_argument("--smoke", action="store_true")
  a = p.parse_args(argv)
  out_dir = os.path.join(a.out_dir, "smoke") if a.smoke else a.out_dir
  base = ["--config", a.config, "--set", f"output_dir={out_dir}",
          *(SMOKE if a.smoke else ())]
  times = {"teacher": run(["lm", "train-teacher", *base])}
  run(["lm", "eval", os.path.join(out_dir, "teacher"), "--no-teacher"])
  with open(os.path.join(out_dir, "teacher", "eval.json")) as f:
    teacher = json.load(f)
  results = {name: [] for name, _ in RUNS}
  for seed in a.seeds:
    for name, sets in RUNS:
      run_name = f"{name}_seed{seed}"
      times[run_name] = run(["lm", "distill", *base, f"seed={seed}",
                             f"distill.run_name={run_name}", *sets])
      run_dir = os.path.join(out_dir, run_name)
      # The student alone is compared with the same teacher.
      run(["lm", "eval", run_dir, "--teacher", os.path.join(out_dir,
                                                            "teacher")])
      with open(os.path.join(run_dir, "eval.json")) as f:
        result = json.load(f)
      with open(os.path.join(run_dir, "summary.json")) as f:
        # The training's own wall time (a rerun finds the run trained).
        result["train_wall_s"] = json.load(f).get("wall_s")
      results[name].append({"seed": seed, **result})
  ppl = {k: [r["perplexity"] for r in v] for k, v in results.items()}
  kl = {k: [r["teacher_kl"] for r in v] for k, v in results.items()}
  lines = [
      f"| run | params | held-out perplexity | KL(teacher ‖ student) |",
      "|---|---|---|---|",
      f"| teacher | {teacher['params']:,} | {teacher['perplexity']:.3f} | 0 |"]
  labels = {"alone": "student alone", "token_kd": "token KD (forward KL)",
            "gkd": "on-policy GKD (JSD β 0.5, λ 0.5)",
            "gkd_kl": "on-policy GKD (forward KL, λ 0.5)"}
  for name, _ in RUNS:
    lines.append(f"| {labels[name]} | {results[name][0]['params']:,} | "
                 f"{mean_std(ppl[name])} | {mean_std(kl[name])} |")
  print("\n".join(lines))
  for name in ("token_kd", "gkd", "gkd_kl"):
    gain = np.asarray(ppl["alone"]) - np.asarray(ppl[name])
    print(f"{labels[name]}: perplexity lower than alone by "
          f"{mean_std(gain)} (paired by seed: "
          f"{', '.join(f'{g:.3f}' for g in gain)})")
  if a.json:
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
      json.dump({"command": " ".join(["python", *sys.argv]),
                 "config": a.config, "teacher": teacher, "runs": results,
                 "wall_s": times}, f, indent=1)


if __name__ == "__main__":
  main_()
