"""Chooses the main job's student, temperature, KD weight and epochs on a validation split.

The 60,000 training images are split (fixed seed) into 54,000 for training
and 6,000 for validation; the test set is never read. Stage 1 trains each
student alone and distilled (``(1 - w) CE + w T^2 KL``) over a grid of
``T`` and ``w`` at the middle epoch budget; stage 2 trains the student alone and the
best KD setting of stage 1 at every epoch budget. Every configuration runs
for ``--seeds`` (same initialisation and batches for alone and distilled),
and is scored by its mean validation accuracy. The same is done for the 3%
subset regime (1,800 images drawn from the 54,000). The choice and every score
go to ``experiments/results/fashion_mnist_select.json``::

  python experiments/fashion_mnist_select.py
  python experiments/fashion_mnist_select.py --students mlp128 cnn8-16 --seeds 0 1

The teacher is the project's artifact (``experiments/teacher/``). It was
trained on all 60,000 images, the validation images included: it is the
given teacher of this study, as a downloaded teacher would be; the students
never see the validation images.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time

import numpy as np

EXPERIMENTS_DIR = os.path.dirname(os.path.abspath(__file__))
if EXPERIMENTS_DIR not in sys.path:
  sys.path.insert(0, EXPERIMENTS_DIR)

# pylint: disable=g-import-not-at-top,wrong-import-position
from kdjax import cache
import fashion_mnist_kd as main_job
import fashion_mnist_teacher as teacher_lib
# pylint: enable=g-import-not-at-top,wrong-import-position

RESULTS = os.path.join(EXPERIMENTS_DIR, "results", "fashion_mnist_select.json")


def parse_args(argv):
  p = argparse.ArgumentParser(
      description=__doc__.splitlines()[0],
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--data-dir", default=None)
  p.add_argument("--teacher-dir", default=teacher_lib.DEFAULT_ARTIFACT)
  p.add_argument("--students", nargs="+", default=["mlp128"],
                 choices=sorted(main_job.STUDENTS))
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--temperatures", type=float, nargs="+", default=[1, 2, 4])
  p.add_argument("--kd-weights", type=float, nargs="+", default=[0.5, 0.7, 0.9])
  p.add_argument("--full-epochs", type=int, nargs="+", default=[20, 40, 60],
                 help="epoch budgets of the full regime (stage 1 uses the middle one)")
  p.add_argument("--subset-size", type=int, default=1800, help="0: skip the subset regime")
  p.add_argument("--subset-epochs", type=int, nargs="+", default=[50, 100, 200])
  p.add_argument("--lr", type=float, default=main_job.DEFAULTS["lr"])
  p.add_argument("--batch-size", type=int, default=main_job.DEFAULTS["batch_size"])
  p.add_argument("--max-train", type=int, default=0, help="smoke runs")
  p.add_argument("--no-progress", action="store_true")
  p.add_argument("--out", default=RESULTS)
  return p.parse_args(argv)


def score(trainer, objective, key, seeds, inits, progress_desc):
  accs = []
  for seed in seeds:
    out = trainer.run(seed, objective, key=key, init_variables=inits[seed],
                      desc=f"{progress_desc} seed {seed}", curve=False)
    accs.append(out["accuracy"])
  return accs


def search_regime(name, train_cache, val_cache, epochs_grid, args, student,
                  log) -> dict:
  """Stage 1 (T x w at the middle budget) then stage 2 (epochs) for one regime."""
  rows = []

  def trainer_for(epochs):
    return main_job.StudentTrainer(student, train_cache, epochs=epochs,
                                   batch_size=args.batch_size, lr=args.lr,
                                   eval_cache=val_cache,
                                   progress_bars=not args.no_progress)

  def record(config, accs):
    row = {"regime": name, "student": student, **config,
           "val_accuracy": accs, "mean": float(np.mean(accs))}
    rows.append(row)
    log(f"{name:>6} {student:>8} {json.dumps(config)}: val "
        f"{100 * row['mean']:.2f} ({', '.join(f'{100 * a:.2f}' for a in accs)})")
    return row

  mid = epochs_grid[len(epochs_grid) // 2]
  trainer = trainer_for(mid)
  inits = {s: trainer.init_variables(s) for s in args.seeds}
  alone = record({"run": "alone", "epochs": mid},
                 score(trainer, main_job.CE_ONLY, "ce", args.seeds, inits,
                       f"{name} alone {mid} ep"))
  kd_rows = []
  for t, w in itertools.product(args.temperatures, args.kd_weights):
    objective = main_job.kd_objective(t, w)
    kd_rows.append(record({"run": "kd", "temperature": t, "kd_weight": w,
                           "epochs": mid},
                          score(trainer, objective, f"kd_{t}_{w}", args.seeds,
                                inits, f"{name} T {t:g} w {w:g} {mid} ep")))
  best_kd = max(kd_rows, key=lambda r: r["mean"])
  best = {"alone": alone, "kd": best_kd}
  for epochs in epochs_grid:
    if epochs == mid:
      continue
    trainer = trainer_for(epochs)
    for run in ("alone", "kd"):
      if run == "alone":
        objective, key, config = main_job.CE_ONLY, "ce", {"run": "alone"}
      else:
        t, w = best_kd["temperature"], best_kd["kd_weight"]
        objective, key = main_job.kd_objective(t, w), "kd"
        config = {"run": "kd", "temperature": t, "kd_weight": w}
      row = record({**config, "epochs": epochs},
                   score(trainer, objective, key, args.seeds, inits,
                         f"{name} {run} {epochs} ep"))
      if row["mean"] > best[run]["mean"]:
        best[run] = row
  return {"rows": rows, "best_alone": best["alone"], "best_kd": best["kd"]}


def main(argv=None) -> dict:
  args = parse_args(argv)
  t0 = time.perf_counter()
  data = main_job.load(args.data_dir)
  x, y = data["train"]
  if args.max_train:
    x, y = x[:args.max_train], y[:args.max_train]
  train_idx, val_idx = main_job.validation_split(
      len(y), main_job.VALIDATION_SIZE if not args.max_train else len(y) // 10)
  recipe = teacher_lib.TEACHER_RECIPE
  if args.max_train:  # a smoke run reads a smoke teacher (2 epochs, N images)
    recipe = teacher_lib.smoke_recipe(args.max_train)
  teacher = teacher_lib.load_teacher(args.teacher_dir, recipe)
  workdir = tempfile.mkdtemp(prefix="kdjax_select_")

  def build(name, idx):
    return cache.build_teacher_cache(
        os.path.join(workdir, name), teacher["apply"], teacher["variables"],
        {"image": x[idx], "label": y[idx]}, batch_size=1000, overwrite=True)

  val_cache = build("val", val_idx)
  sub = train_idx[main_job.subset_indices(len(train_idx), args.subset_size)]
  caches = {"full": (build("train", train_idx), args.full_epochs)}
  if args.subset_size:
    caches["subset"] = (build("subset", sub), args.subset_epochs)
  lines = []

  def log(text):
    lines.append(text)
    print(text, flush=True)

  log(f"train {len(train_idx):,} / validation {len(val_idx):,} images "
      f"(subset {len(sub):,}); seeds {args.seeds}")
  regimes = {}
  for regime, (train_cache, epochs_grid) in caches.items():
    for student in args.students:
      regimes[f"{regime}/{student}"] = search_regime(
          regime, train_cache, val_cache, epochs_grid, args, student, log)
  choice = {}
  for key, r in regimes.items():
    a, k = r["best_alone"], r["best_kd"]
    choice[key] = {"alone_epochs": a["epochs"], "alone_val": a["mean"],
                   "kd": {n: k[n] for n in ("temperature", "kd_weight", "epochs")},
                   "kd_val": k["mean"], "val_gain_points": 100 * (k["mean"] - a["mean"])}
    log(f"chosen {key}: alone {a['epochs']} ep ({100 * a['mean']:.2f}), KD "
        f"T {k['temperature']:g} w {k['kd_weight']:g} {k['epochs']} ep "
        f"({100 * k['mean']:.2f})")
  payload = {"experiment": "fashion_mnist_select", "args": vars(args),
             "command": "python experiments/fashion_mnist_select.py "
             + " ".join(argv if argv is not None else sys.argv[1:]),
             "teacher_fingerprint": teacher["meta"]["fingerprint"],
             "regimes": regimes, "choice": choice, "log": lines,
             "time_s": time.perf_counter() - t0}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(payload, f, indent=1)
  print(f"written {args.out} ({payload['time_s']:.0f} s)")
  return payload


if __name__ == "__main__":
  main()
