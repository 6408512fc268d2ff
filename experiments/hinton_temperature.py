"""Hinton et al. (2015) on Fashion-MNIST: the student alone vs distilled at T in {1, 2, 4, 8, 20}.

The teacher is the main job's committed artifact (``experiments/teacher``:
BN-CNN conv 32-64, dense 256, 93.28%; ``--teacher trained``: the old 3-epoch
CNN, ~91%, trained once into the work directory); its logits are cached once
per training set (``kdjax.cache``, exact: no
augmentation). The student is the main job's MLP 784-128-10, trained alone
(hard labels) and distilled with ``(1 - w) CE + w T^2 KL(p_t || p_s)``
(``w = 0.5``) from the same initialisation and the same batches, for each
temperature and seed, in two regimes:

* the full training set (60,000 images, 15 epochs);
* a 3% subset (1,800 images, 100 epochs; Hinton et al. 2015, section 6, "soft
  targets as regularizers"), where the soft targets carry most of what the
  student can learn beyond the few labels.

Prints one markdown table per regime (test accuracy, mean ± std over seeds;
the gain over the student alone, paired by seed; agreement with the teacher)
and writes ``experiments/results/hinton_temperature.json`` and
``experiments/plots/hinton_temperature.png``::

  python experiments/hinton_temperature.py
  python experiments/hinton_temperature.py --regimes subset --temperatures 1 2 4
  python experiments/hinton_temperature.py --smoke
"""

from __future__ import annotations

import os
import sys
from typing import Optional, Sequence

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  pylint: disable=g-import-not-at-top

from kdjax import models  # noqa: E402  pylint: disable=g-import-not-at-top

NAME = "hinton_temperature"

REAL = {"seeds": [0, 1, 2], "teacher": "artifact", "teacher_epochs": 3,
        "temperatures": [1, 2, 4, 8, 20],
        "full_epochs": 15, "subset_size": 1800, "subset_epochs": 100,
        "full_size": 0}
SMOKE = {"seeds": [0], "teacher_epochs": 1, "temperatures": [1, 4],
         "full_epochs": 1, "subset_size": 256, "subset_epochs": 2,
         "full_size": 1024, "max_test": 500}


def main(argv: Optional[Sequence[str]] = None) -> dict:
  p = common.base_parser(__doc__)
  p.add_argument("--temperatures", type=float, nargs="+", default=None)
  p.add_argument("--kd-weight", type=float, default=0.5,
                 help="w of (1 - w) CE + w T^2 KL")
  p.add_argument("--student-hidden", type=int, nargs="+", default=[128])
  p.add_argument("--regimes", nargs="+", default=["full", "subset"],
                 choices=["full", "subset"])
  p.add_argument("--full-size", type=int, default=None,
                 help="training examples of the 'full' regime (0: all 60,000)")
  p.add_argument("--full-epochs", type=int, default=None)
  p.add_argument("--subset-size", type=int, default=None)
  p.add_argument("--subset-epochs", type=int, default=None)
  p.add_argument("--lr", type=float, default=2e-3)
  return common.execute(p, argv, SMOKE, REAL, run)


def run(args, argv) -> dict:
  """Runs the experiment with parsed ``args``; returns the JSON payload."""
  json_path, png_path = common.output_paths(args, NAME)
  timer = common.Timer()

  data, teacher = common.prepare(args, timer)

  student = models.MLP(hidden=tuple(args.student_hidden), num_classes=10)
  student_apply = models.from_linen(student, train_kwarg="train")
  n_train = len(data["train"][1])
  regimes = []
  if "full" in args.regimes:
    size = args.full_size if args.full_size and args.full_size < n_train else n_train
    regimes.append(("full", size, args.full_epochs))
  if "subset" in args.regimes:
    regimes.append(("subset", min(args.subset_size, n_train), args.subset_epochs))

  results = []
  for regime, size, epochs in regimes:
    x, y, _ = common.subset(data, size)
    label = (f"{'full set' if size == n_train else 'subset'} "
             f"({size:,} images = {100 * size / n_train:.0f}%, {epochs} ep)")
    with timer(f"cache {regime}"):
      tc = common.build_cache(args.workdir, f"{NAME}_{size}", teacher,
                              {"image": x, "label": y})
    runs = {}
    configs = [("alone", None)] + [(f"T={t:g}", t) for t in args.temperatures]
    for name, temperature in configs:
      loss_fn = (common.CE_ONLY if temperature is None
                 else common.kd_loss(temperature, args.kd_weight))
      runner = common.StudentRunner(
          student, student_apply, loss_fn, tc, epochs=epochs,
          batch_size=args.batch_size, lr=args.lr,
          teacher_apply=None if temperature is None else tc.teacher_apply())
      for seed in args.seeds:
        with timer("students"):
          variables, seconds = runner.run(seed)
        ev = common.evaluate_student(student_apply, variables, data, teacher)
        runs.setdefault(name, []).append({"seed": seed, "time_s": seconds, **ev})
        print(f"{regime:>6} {name:>6} seed {seed}: accuracy "
              f"{100 * ev['accuracy']:.2f}  agreement "
              f"{100 * ev['agreement']:.2f}  ({seconds:.1f} s)", flush=True)
    results.append({"regime": regime, "label": label, "size": size,
                    "epochs": epochs, "runs": runs})

  n_params = common.param_count(student.init(
      jax.random.PRNGKey(0), data["train"][0][:2]))
  print()
  print(f"Fashion-MNIST test accuracy (%), mean ± std over seeds {args.seeds}. "
        f"Teacher {teacher['name']} ({teacher['params']:,} params): "
        f"{100 * teacher['accuracy']:.2f}. Student MLP 784-"
        f"{'-'.join(map(str, args.student_hidden))}-10 ({n_params:,} params); "
        f"KD = {1 - args.kd_weight:g} CE + {args.kd_weight:g} T^2 KL.")
  tables = {}
  for r in results:
    alone = [x["accuracy"] for x in r["runs"]["alone"]]
    rows = []
    for name, runs in r["runs"].items():
      acc = [x["accuracy"] for x in runs]
      gain = np.asarray(acc) - np.asarray(alone)
      rows.append([
          "student alone" if name == "alone" else f"distilled, {name}",
          common.fmt(acc),
          "-" if name == "alone" else common.fmt(gain, signed=True),
          "-" if name == "alone" else
          ("yes" if common.beyond_spread(alone, acc) else "no"),
          common.fmt([x["agreement"] for x in runs])])
      r.setdefault("summary", {})[name] = {
          "accuracy": common.stats(acc),
          "gain": common.stats(gain) if name != "alone" else None,
          "agreement": common.stats([x["agreement"] for x in runs]),
          "beyond_spread": (common.beyond_spread(alone, acc)
                            if name != "alone" else None)}
    table = common.markdown_table(
        ["student", "test accuracy", "gain (points)", "gain > spread",
         "agreement with teacher"], rows)
    tables[r["regime"]] = table
    print(f"\n{r['label']}:\n{table}")
  print("\ntimes (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timer.times.items())
        + f"; total {timer.total():.0f}")

  plt = common.pyplot()
  fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4),
                           squeeze=False)
  for ax, r in zip(axes[0], results):
    ts = args.temperatures
    common.errorbar(ax, ts, [[x["accuracy"] for x in r["runs"][f"T={t:g}"]]
                             for t in ts], "distilled")
    alone = common.stats([x["accuracy"] for x in r["runs"]["alone"]])
    ax.axhline(alone["mean"], color="gray", ls="--", label="student alone")
    ax.axhspan(alone["mean"] - alone["std"], alone["mean"] + alone["std"],
               color="gray", alpha=0.2)
    ax.axhline(100 * teacher["accuracy"], color="k", ls=":", label="teacher")
    ax.set_xscale("log")
    ax.set_xticks(ts)
    ax.set_xticklabels([f"{t:g}" for t in ts])
    ax.set_xlabel("temperature T")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(r["label"], fontsize=9)
    ax.legend(fontsize=8)
  fig.suptitle(f"Hinton KD on Fashion-MNIST ({1 - args.kd_weight:g} CE + "
               f"{args.kd_weight:g} T² KL), mean ± std over {len(args.seeds)} seeds",
               fontsize=10)
  common.save_figure(fig, png_path)
  payload = {"experiment": NAME, "command": common.command_line(NAME, argv),
             "args": vars(args),
             "teacher": {k: teacher[k] for k in ("name", "params", "accuracy",
                                                 "epochs", "train_time_s")},
             "student_params": n_params, "regimes": results, "tables": tables,
             "times_s": timer.times, "total_time_s": timer.total()}
  common.write_json(json_path, payload)
  return payload


if __name__ == "__main__":
  main()
