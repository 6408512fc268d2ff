"""LM distillation on the built-in instruction set, every step a `kdjax lm` command.

The data is ``data.corpus: stdlib_functions`` (kdjax.lm.stdlib_function_records:
the standard library's documented functions, prompt = signature + docstring,
completion = body, split by module): tokenizer, teacher and students train on
the train split; every example of the validation split that fits
``data.seq_len`` is scored (held-out modules, never seen in training); the
test split is not read. One Tunix Qwen3 teacher (``kdjax lm train-teacher``,
seed 0); for each seed a Qwen3 student about 4x smaller trained alone
(``distill.objective=ce``), with token KD (forward KL) and with on-policy GKD
(forward KL, lambda 0.5), the same initialisation and batch order for every
objective of a seed; every run scored by ``kdjax lm eval RUN --teacher
TEACHER`` (its eval.json's per-file sums), greedy completions of three
held-out prompts by ``kdjax lm generate``. Config:
experiments/configs/lm_qwen3_functions.yaml.

  python experiments/lm_instructions.py \
      --json experiments/results/lm_instructions.json
  python experiments/lm_instructions.py --smoke   # tiny sizes, seconds

Statistics: per method, held-out perplexity exp(sum NLL / sum tokens) and
KL(teacher || student) per token, mean +- sample std over seeds; paired by
seed, the difference vs the student alone of per-token NLL and of perplexity
with a paired t-test over seeds (Holm-corrected over the two comparisons) and
a percentile bootstrap over held-out modules (files; 2000 resamples, numpy
seed 0): 95% intervals and the corrected 97.5% ones (Bonferroni for two).
Decision rule: a method beats the student alone when its corrected (97.5%)
bootstrap interval of the NLL difference lies below 0.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import sys
import time

import numpy as np
from scipy import stats

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# pylint: disable-next=g-import-not-at-top,wrong-import-position
from kdjax.cli.main import main

CONFIG = os.path.join(REPO, "experiments", "configs",
                      "lm_qwen3_functions.yaml")
SMOKE = ("train.steps=3", "teacher.steps=3", "data.max_files=20",
         "data.seq_len=128", "data.batch_size=4",
         "data.max_eval_sequences=24",
         "data.max_train_sequences=64", "tokenizer.vocab_size=300",
         "optimizer.warmup_steps=1",
         "teacher.kwargs={num_layers: 1, embed_dim: 16, hidden_dim: 32, "
         "num_heads: 2, head_dim: 8, num_kv_heads: 1}",
         "student.kwargs={num_layers: 1, embed_dim: 8, hidden_dim: 16, "
         "num_heads: 2, head_dim: 4, num_kv_heads: 1}",
         "generate.max_new_tokens=4")
METHODS = (("alone", ("distill.objective=ce",)),
           ("token_kd", ("distill.objective=token_kd",
                         "distill.divergence=kl")),
           ("gkd", ("distill.objective=gkd", "distill.divergence=kl",
                    "distill.lmbda=0.5")))
LABELS = {"alone": "student alone", "token_kd": "token KD (forward KL)",
          "gkd": "on-policy GKD (forward KL, λ 0.5)"}
COMPARED = ("token_kd", "gkd")
NUM_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
NUM_PROMPTS = 3
SAMPLED = ("teacher", "alone", "token_kd")  # generate: these runs, seed 0


class _Tee(io.TextIOBase):
  """Writes to the real stdout and keeps the lines (kdjax's counts)."""

  def __init__(self, stream):
    self.stream, self.lines = stream, []

  def write(self, s):
    self.stream.write(s)
    self.lines.extend(s.splitlines())
    return len(s)

  def flush(self):
    self.stream.flush()


def run(args: list, log: list) -> float:
  """One `kdjax` command in-process; its wall time (s)."""
  t0 = time.perf_counter()
  tee = _Tee(sys.stdout)
  with contextlib.redirect_stdout(tee):
    rc = main([str(a) for a in args])
  log.append({"command": "kdjax " + " ".join(map(str, args)),
              "wall_s": time.perf_counter() - t0, "output": tee.lines})
  if rc != 0:
    raise SystemExit(f"command failed ({rc}): kdjax {' '.join(map(str, args))}")
  return time.perf_counter() - t0


def mean_std(values, fmt=".3f") -> str:
  v = np.asarray(values, np.float64)
  std = v.std(ddof=1) if len(v) > 1 else float("nan")
  return f"{v.mean():{fmt}} ± {std:{fmt}}"


def summary(values) -> dict:
  v = np.asarray(values, np.float64)
  return {"mean": float(v.mean()),
          "std": float(v.std(ddof=1)) if len(v) > 1 else float("nan"),
          "per_seed": v.tolist()}


def holm(pvalues: dict) -> dict:
  """Holm's step-down adjusted p-values."""
  names = sorted(pvalues, key=lambda k: pvalues[k])
  m, out, running = len(names), {}, 0.0
  for i, name in enumerate(names):
    running = max(running, min(1.0, (m - i) * pvalues[name]))
    out[name] = running
  return out


def paired_ttest(diffs) -> dict:
  d = np.asarray(diffs, np.float64)
  if len(d) < 2 or np.all(d == d[0]):
    return {"t": float("nan"), "p": float("nan"), "df": len(d) - 1}
  res = stats.ttest_1samp(d, 0.0)
  return {"t": float(res.statistic), "p": float(res.pvalue), "df": len(d) - 1}


def file_bootstrap(runs: dict, seeds, files, rng) -> dict:
  """Percentile bootstrap over held-out files of each compared method's
  per-token NLL (and perplexity) difference vs alone, averaged over seeds."""
  tokens = np.array([runs["alone"][0]["per_file"][f]["tokens"] for f in files])
  nll = {m: np.array([[r["per_file"][f]["nll"] for f in files]
                      for r in runs[m]]) for m in runs}   # [seeds, files]
  for m in runs:
    for r in runs[m]:
      got = np.array([r["per_file"][f]["tokens"] for f in files])
      assert np.array_equal(got, tokens), "runs scored different tokens"
  idx = rng.integers(0, len(files), (NUM_RESAMPLES, len(files)))
  weights = np.stack([np.bincount(i, minlength=len(files)) for i in idx])
  w_tokens = weights @ tokens                                # [R]
  per_token = {m: (weights @ nll[m].T) / w_tokens[:, None] for m in nll}
  out = {}
  for m in COMPARED:
    d_nll = (per_token[m] - per_token["alone"]).mean(axis=1)       # [R]
    d_ppl = (np.exp(per_token[m]) - np.exp(per_token["alone"])).mean(axis=1)
    entry = {}
    for name, d in (("nll", d_nll), ("perplexity", d_ppl)):
      entry[name] = {
          "ci95": np.percentile(d, [2.5, 97.5]).tolist(),
          "ci97_5": np.percentile(d, [1.25, 98.75]).tolist()}
    out[m] = entry
  return out


def run_seq_len(run_dir: str) -> int:
  """data.seq_len of a run (its resolved config.yaml)."""
  import yaml  # pylint: disable=g-import-not-at-top
  with open(os.path.join(run_dir, "config.yaml")) as f:
    return int(yaml.safe_load(f)["data"]["seq_len"])


def counts_of(log: list) -> dict:
  """kdjax's printed data counts (examples used/skipped per split)."""
  keep = ("[lm] held-out data:", "[lm] training data:", "[lm] stdlib ",
          "[lm train-teacher] teacher", "[lm train-teacher] eval on")
  lines = []
  for entry in log:
    for line in entry["output"]:
      if line.startswith(keep) and line not in lines:
        lines.append(line)
  return {"lines": lines}


def main_(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--config", default=CONFIG)
  p.add_argument("--out-dir", default=os.path.join(REPO, "runs",
                                                   "lm_instructions"))
  p.add_argument("--seeds", type=int, nargs="+", default=None,
                 help="default 0 1 2 (--smoke: 0 1)")
  p.add_argument("--json", default=None, help="write every number here")
  p.add_argument("--smoke", action="store_true")
  a = p.parse_args(argv)
  seeds = a.seeds or ([0, 1] if a.smoke else [0, 1, 2])
  out_dir = os.path.join(a.out_dir, "smoke") if a.smoke else a.out_dir
  base = ["--config", a.config, "--set", f"output_dir={out_dir}",
          *(SMOKE if a.smoke else ())]
  log: list = []
  t_start, load_start = time.perf_counter(), os.getloadavg()
  times = {"teacher": run(["lm", "train-teacher", *base], log)}
  teacher_dir = os.path.join(out_dir, "teacher")
  times["teacher_eval"] = run(["lm", "eval", teacher_dir, "--no-teacher"],
                              log)
  with open(os.path.join(teacher_dir, "eval.json")) as f:
    teacher = json.load(f)
  runs = {name: [] for name, _ in METHODS}
  for seed in seeds:
    for name, sets in METHODS:
      run_name = f"{name}_seed{seed}"
      run_dir = os.path.join(out_dir, run_name)
      times[run_name] = run(["lm", "distill", *base, f"seed={seed}",
                             f"distill.run_name={run_name}", *sets], log)
      times[f"{run_name}_eval"] = run(
          ["lm", "eval", run_dir, "--teacher", teacher_dir], log)
      with open(os.path.join(run_dir, "eval.json")) as f:
        result = json.load(f)
      with open(os.path.join(run_dir, "summary.json")) as f:
        result["train_wall_s"] = json.load(f).get("wall_s")
      runs[name].append({"seed": seed, **result})

  # Greedy completions of the first held-out prompts (signature + docstring).
  from kdjax import lm  # pylint: disable=g-import-not-at-top
  max_modules = None if not a.smoke else 20
  # The first held-out examples: records whose prompt fits data.seq_len (as
  # kdjax counts it: BOS + the prompt's tokens), in the validation order.
  tokenizer = lm.load_tokenizer(out_dir, kind="bpe")
  seq_len = run_seq_len(teacher_dir)
  prompts = [r.prompt for r in lm.stdlib_function_records(
      "validation", max_modules=max_modules)
             if 1 + len(tokenizer.encode(r.prompt)) <= seq_len][:NUM_PROMPTS]
  samples = {}
  gen_sets = ["--set", "generate.temperature=0",
              f"generate.max_new_tokens={4 if a.smoke else 64}"]
  for name in SAMPLED:
    run_dir = teacher_dir if name == "teacher" else os.path.join(
        out_dir, f"{name}_seed{seeds[0]}")
    samples[name] = []
    # One prompt a command: with several --prompt, `kdjax lm generate`
    # gives the shorter prompts more than generate.max_new_tokens tokens
    # (its buffer is the longest prompt + max_new_tokens; see the README).
    for i, text in enumerate(prompts):
      times[f"generate_{name}_{i}"] = run(["lm", "generate", run_dir,
                                           "--prompt", text, *gen_sets], log)
      with open(os.path.join(run_dir, "samples.json")) as f:
        samples[name] += json.load(f)["samples"]

  # Statistics.
  ppl = {m: [r["perplexity"] for r in v] for m, v in runs.items()}
  nll = {m: [r["loss"] for r in v] for m, v in runs.items()}
  kl = {m: [r["teacher_kl"] for r in v] for m, v in runs.items()}
  files = sorted(runs["alone"][0]["per_file"])
  for v in runs.values():
    for r in v:
      assert sorted(r["per_file"]) == files
  boot = file_bootstrap(runs, seeds, files,
                        np.random.default_rng(BOOTSTRAP_SEED))
  comparisons = {}
  for m in COMPARED:
    d_nll = np.asarray(nll[m]) - np.asarray(nll["alone"])
    d_ppl = np.asarray(ppl[m]) - np.asarray(ppl["alone"])
    comparisons[m] = {"nll_diff": summary(d_nll), "ppl_diff": summary(d_ppl),
                      "nll_ttest": paired_ttest(d_nll),
                      "ppl_ttest": paired_ttest(d_ppl),
                      "bootstrap": boot[m]}
  for key in ("nll_ttest", "ppl_ttest"):
    ps = {m: comparisons[m][key]["p"] for m in COMPARED}
    if all(math.isfinite(v) for v in ps.values()):
      for m, adj in holm(ps).items():
        comparisons[m][key]["p_holm"] = adj
    else:
      for m in COMPARED:
        comparisons[m][key]["p_holm"] = float("nan")
  for m in COMPARED:
    lo, hi = comparisons[m]["bootstrap"]["nll"]["ci97_5"]
    comparisons[m]["beats_alone"] = bool(hi < 0)

  # The table.
  tokens = runs["alone"][0]["tokens"]
  lines = [
      "| run | params | held-out perplexity | per-token NLL | "
      "KL(teacher ‖ student) |",
      "|---|---|---|---|---|",
      f"| teacher | {teacher['params']:,} | {teacher['perplexity']:.3f} | "
      f"{teacher['loss']:.4f} | 0 |"]
  for m, _ in METHODS:
    lines.append(f"| {LABELS[m]} | {runs[m][0]['params']:,} | "
                 f"{mean_std(ppl[m])} | {mean_std(nll[m], '.4f')} | "
                 f"{mean_std(kl[m], '.4f')} |")
  lines += ["", "| vs student alone (paired by seed) | Δ NLL/token "
            "(mean ± sd) | t, p, Holm p | bootstrap 95% | corrected "
            "97.5% | Δ perplexity | t, p, Holm p | Δ ppl bootstrap 97.5% "
            "| beats alone |",
            "|---|---|---|---|---|---|---|---|---|"]
  for m in COMPARED:
    c = comparisons[m]
    b = c["bootstrap"]

    def ci(x):
      return f"[{x[0]:+.4f}, {x[1]:+.4f}]"

    def tp(t):
      return f"{t['t']:.2f}, {t['p']:.3f}, {t['p_holm']:.3f}"

    lines.append(
        f"| {LABELS[m]} | {c['nll_diff']['mean']:+.4f} ± "
        f"{c['nll_diff']['std']:.4f} | {tp(c['nll_ttest'])} | "
        f"{ci(b['nll']['ci95'])} | {ci(b['nll']['ci97_5'])} | "
        f"{c['ppl_diff']['mean']:+.3f} ± {c['ppl_diff']['std']:.3f} | "
        f"{tp(c['ppl_ttest'])} | "
        f"[{b['perplexity']['ci97_5'][0]:+.3f}, "
        f"{b['perplexity']['ci97_5'][1]:+.3f}] | "
        f"{'yes' if c['beats_alone'] else 'no'} |")
  table = "\n".join(lines)
  print(table)
  print(f"held-out: {len(files)} modules with a scored example, "
        f"{runs['alone'][0]['held_out_sequences']} examples, {int(tokens)} "
        f"completion tokens")
  counts = counts_of(log)
  for line in counts["lines"]:
    print(line)
  total = time.perf_counter() - t_start
  print(f"wall time {total:.0f} s; load average {load_start} -> "
        f"{os.getloadavg()}")
  payload = {
      "command": " ".join(["python", "experiments/lm_instructions.py",
                           *(argv if argv is not None else sys.argv[1:])]),
      "config": os.path.relpath(a.config, REPO), "smoke": a.smoke,
      "overrides": list(SMOKE) if a.smoke else [], "seeds": seeds,
      "teacher": teacher, "runs": runs, "comparisons": comparisons,
      "summary": {m: {"perplexity": summary(ppl[m]), "nll": summary(nll[m]),
                      "teacher_kl": summary(kl[m]),
                      "params": runs[m][0]["params"]} for m, _ in METHODS},
      "held_out_files": files, "held_out_tokens": tokens,
      "bootstrap": {"resamples": NUM_RESAMPLES, "numpy_seed": BOOTSTRAP_SEED,
                    "unit": "held-out file (module)"},
      "decision_rule": "beats alone: the corrected (97.5%) file-bootstrap "
                       "interval of the NLL difference lies below 0",
      "samples": samples, "prompts": prompts, "counts": counts,
      "table": table, "wall_s": {**times, "total": total},
      "load_average": {"start": list(load_start),
                       "end": list(os.getloadavg())},
      "commands": [{k: e[k] for k in ("command", "wall_s")} for e in log]}
  if a.json:
    os.makedirs(os.path.dirname(os.path.abspath(a.json)), exist_ok=True)
    with open(a.json, "w") as f:
      json.dump(payload, f, indent=1)
  return payload


if __name__ == "__main__":
  main_()
