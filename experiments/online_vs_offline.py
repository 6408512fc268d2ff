"""Online vs offline distillation: the teacher run at every step vs its outputs read from a cache.

The same distillation (the main job's: teacher CNN conv 32-64 dense 256,
student MLP 784-128-10, ``0.5 CE + 0.5 T^2 KL`` at ``T = 2``, the same
initialisation and the same batches in the same order) trained

* **online**: the teacher's forward pass inside every jitted train step;
* **offline, full logits**: from a ``kdjax.cache`` teacher cache built once
  (one teacher pass over the training set), no teacher in memory;
* **offline, top-k**: from caches that keep only the teacher's ``k`` largest
  logits and ``logsumexp`` (``kdjax.cache.top_k_term``: the divergence over
  the top-k plus a tail bucket with the remaining mass).

Reports test accuracy, the wall time of each student run (compilation
included), the steady-state time per step (epochs after the first), the
one-time cost of building each cache, and the teacher outputs' size. With
full logits the offline student follows the online one (the cache holds the
online logits); top-k approximates it.

  python experiments/online_vs_offline.py
  python experiments/online_vs_offline.py --epochs 3 --top-k 1 3 5
  python experiments/online_vs_offline.py --smoke
"""

from __future__ import annotations

import os
import sys
import time
from typing import Optional, Sequence

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=g-import-not-at-top

from kdjax import cache  # noqa: E402  pylint: disable=g-import-not-at-top
from kdjax import losses  # noqa: E402  pylint: disable=g-import-not-at-top
from kdjax import models  # noqa: E402  pylint: disable=g-import-not-at-top

NAME = "online_vs_offline"

REAL = {"seeds": [0, 1, 2], "teacher_epochs": 3, "train_size": 0, "epochs": 15,
        "top_k": [1, 3]}
SMOKE = {"seeds": [0], "teacher_epochs": 1, "train_size": 512, "epochs": 2,
         "top_k": [2], "max_test": 500}


def top_k_kd_loss(temperature: float, kd_weight: float) -> losses.ComposedLoss:
  """``(1 - w) CE + w T^2 KL`` over the teacher's top-k plus a tail bucket."""
  return losses.compose(
      [losses.Term("ce", losses.label_term(), 1.0 - kd_weight,
                   needs_teacher=False),
       losses.Term("kd", cache.top_k_term(divergence="kl", tail_bucket=True),
                   kd_weight)],
      temperature=temperature)


def main(argv: Optional[Sequence[str]] = None) -> dict:
  p = common.base_parser(__doc__)
  p.add_argument("--train-size", type=int, default=None,
                 help="training examples (0: all 60,000)")
  p.add_argument("--epochs", type=int, default=None)
  p.add_argument("--top-k", type=int, nargs="*", default=None)
  p.add_argument("--temperature", type=float, default=2.0)
  p.add_argument("--kd-weight", type=float, default=0.5)
  p.add_argument("--student-hidden", type=int, nargs="+", default=[128])
  p.add_argument("--lr", type=float, default=2e-3)
  return common.execute(p, argv, SMOKE, REAL, run)


def run(args, argv) -> dict:
  """Runs the experiment with parsed ``args``; returns the JSON payload."""
  json_path, png_path = common.output_paths(args, NAME)
  timer = common.Timer()
  data, teacher = common.prepare(args, timer)
  student = models.MLP(hidden=tuple(args.student_hidden), num_classes=10)
  student_apply = models.from_linen(student, train_kwarg="train")
  x, y, _ = common.subset(data, args.train_size)
  arrays = {"image": x, "label": y}
  T, w = args.temperature, args.kd_weight

  # (name, cache k, loss, online)
  modes = [("online (teacher forward each step)", None, common.kd_loss(T, w), True),
           ("offline, cached full logits", None, common.kd_loss(T, w), False)]
  modes += [(f"offline, cached top-{k} + tail", k, top_k_kd_loss(T, w), False)
            for k in args.top_k]
  caches, build_s, teacher_bytes = {}, {}, {}
  for _, k, _, _ in modes:
    if k in caches:
      continue
    with timer("caches"):
      tick = time.perf_counter()
      caches[k] = common.build_cache(
          args.workdir, f"{NAME}_{len(y)}_{'full' if k is None else f'top{k}'}",
          teacher, arrays, k=k, temperature=1.0 if k is None else T)
      build_s[k] = time.perf_counter() - tick
    # float32 logits, or float32 values + int32 indices + float32 logsumexp.
    per_example = 4 * caches[k].num_classes if k is None else 8 * k + 4
    teacher_bytes[k] = per_example * len(y)

  runs, reference = {}, {}
  for name, k, loss_fn, online in modes:
    tc = caches[k]
    runner = common.StudentRunner(
        student, student_apply, loss_fn, tc, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr,
        teacher_apply=teacher["apply"] if online else tc.teacher_apply(),
        teacher_variables=teacher["variables"] if online else None,
        online=online)
    steps_per_epoch = tc.num_examples // args.batch_size
    for seed in args.seeds:
      with timer("students"):
        variables, seconds = runner.run(seed)
      ev = common.evaluate_student(student_apply, variables, data, teacher)
      logits = np.concatenate([
          np.asarray(student_apply(variables, b).logits)
          for b in common.eval_batches(*data["test"])])
      if online:
        reference[seed] = logits
        same = None
      else:
        same = float(np.mean(logits.argmax(-1) == reference[seed].argmax(-1)))
      steady = runner.epoch_times[1:] or runner.epoch_times
      per_step_ms = 1000 * float(np.mean(steady)) / steps_per_epoch
      runs.setdefault(name, []).append(
          {"seed": seed, "time_s": seconds, "epoch_times_s": runner.epoch_times,
           "step_ms": per_step_ms, "same_predictions_as_online": same,
           "max_abs_logit_diff_vs_online": None if online else float(
               np.max(np.abs(logits - reference[seed]))), **ev})
      print(f"{name[:36]:>36} seed {seed}: accuracy {100 * ev['accuracy']:.2f}  "
            f"{seconds:.1f} s ({per_step_ms:.2f} ms/step)"
            + ("" if same is None else
               f"  same predictions as online: {100 * same:.2f}%"), flush=True)

  online_name = modes[0][0]
  t_online = np.mean([r["time_s"] for r in runs[online_name]])
  step_online = np.mean([r["step_ms"] for r in runs[online_name]])
  n_runs = len(args.seeds)
  rows, summary = [], {}
  for name, k, _, online in modes:
    rs = runs[name]
    t = float(np.mean([r["time_s"] for r in rs]))
    step = float(np.mean([r["step_ms"] for r in rs]))
    build = 0.0 if online else build_s[k]
    # Total for all seeds, the cache built once.
    amortised = t_online * n_runs / (build + t * n_runs)
    same = [r["same_predictions_as_online"] for r in rs]
    rows.append([name, common.fmt([r["accuracy"] for r in rs]),
                 f"{t:.1f}", f"{step:.2f}", f"{step_online / step:.1f}x",
                 "-" if online else f"{build:.1f}",
                 f"{amortised:.1f}x",
                 "-" if online else f"{teacher_bytes[k] / 2**20:.2f}",
                 "-" if online else common.fmt(same)])
    summary[name] = {"k": k, "online": online,
                     "accuracy": common.stats([r["accuracy"] for r in rs]),
                     "time_s": t, "step_ms": step,
                     "speedup_per_step": step_online / step,
                     "cache_build_s": None if online else build,
                     "speedup_with_build": amortised,
                     "teacher_outputs_mb": None if online else teacher_bytes[k] / 2**20,
                     "same_predictions_as_online": None if online else common.stats(same)}
  table = common.markdown_table(
      ["teacher", "test accuracy", "s / run", "ms / step", "step speed-up",
       "cache build (s)", f"speed-up, {n_runs} runs + build",
       "teacher outputs (MB)", "same test predictions as online (%)"], rows)
  print()
  print(f"Fashion-MNIST, {len(y):,} training images, {args.epochs} epochs, "
        f"batch {args.batch_size}; test accuracy (%), mean ± std over seeds "
        f"{args.seeds}. Teacher {teacher['name']} ({teacher['params']:,} params, "
        f"{100 * teacher['accuracy']:.2f}%); student MLP 784-"
        f"{'-'.join(map(str, args.student_hidden))}-10; KD {1 - w:g} CE + "
        f"{w:g} T^2 KL at T = {T:g}. Times on {jax.devices()[0].platform}, "
        "compilation included in s / run.")
  print(table)
  print("\ntimes (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timer.times.items())
        + f"; total {timer.total():.0f}")

  plt = common.pyplot()
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
  names = [m[0] for m in modes]
  short = [n.split(" (")[0].replace("offline, cached ", "cache: ") for n in names]
  ax1.bar(range(len(names)), [summary[n]["step_ms"] for n in names],
          color=["tab:orange"] + ["tab:blue"] * (len(names) - 1))
  ax1.set_xticks(range(len(names)))
  ax1.set_xticklabels(short, fontsize=8)
  ax1.set_ylabel("ms per train step (steady state)")
  ax1.set_title("time per step", fontsize=9)
  s = [summary[n]["accuracy"] for n in names]
  ax2.bar(range(len(names)), [t["mean"] for t in s], yerr=[t["std"] for t in s],
          capsize=3, color=["tab:orange"] + ["tab:blue"] * (len(names) - 1))
  ax2.set_xticks(range(len(names)))
  ax2.set_xticklabels(short, fontsize=8)
  lo = min(t["mean"] - t["std"] for t in s)
  ax2.set_ylim(lo - 1.0, max(t["mean"] + t["std"] for t in s) + 0.5)
  ax2.set_ylabel("test accuracy (%)")
  ax2.set_title("student accuracy", fontsize=9)
  fig.suptitle(f"online vs offline (kdjax.cache) distillation: {len(y):,} images, "
               f"{args.epochs} epochs, {n_runs} seeds", fontsize=10)
  common.save_figure(fig, png_path)
  payload = {"experiment": NAME, "command": common.command_line(NAME, argv),
             "args": vars(args),
             "teacher": {k: teacher[k] for k in ("name", "params", "accuracy",
                                                 "epochs", "train_time_s")},
             "train_size": len(y), "cache_build_s": {str(k): v for k, v in build_s.items()},
             "runs": runs, "summary": summary, "table": table,
             "times_s": timer.times, "total_time_s": timer.total()}
  common.write_json(json_path, payload)
  return payload


if __name__ == "__main__":
  main()
