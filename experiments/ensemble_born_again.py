"""Ensemble distillation and born-again networks on Fashion-MNIST.

1. **Ensemble -> student** (Hinton et al. 2015; You et al. 2017). Three
   teachers of different architectures and seeds, each trained once on the
   60,000 training images and saved in the work directory: the main job's CNN
   (conv 32-64, dense 256, seed 0, 3 epochs), a narrower CNN (conv 16-32,
   dense 128, seed 1, 3 epochs) and an MLP 784-512-256-10 (seed 2, 5 epochs).
   The student MLP 784-128-10 is trained alone, distilled from the best single
   teacher (registry ``kd``) and from the ensemble (registry ``ensemble``:
   KL to the mean of the teachers' tempered distributions), all with
   ``0.5 CE + 0.5 T^2 KL`` at ``T = 2``, the same initialisation and the
   same batches. The three teachers run together through
   ``kdjax.models.ensemble_apply``; their stacked logits are cached once
   (``kdjax.cache``).
2. **Born-again networks** (Furlanello et al. 2018; ``kdjax.train.born_again``
   with the registry's ``born_again`` defaults: ``KL(p_prev || p_student)``
   at ``T = 1``, no label term): generation 0 is the MLP 784-128-10 trained
   on the labels, generation ``k`` learns from generation ``k - 1`` (same
   architecture, fresh initialisation), 3 generations; the table gives each
   generation's accuracy and that of the ensemble of generations 1-3 (BANE,
   mean of the probabilities).

Both in two regimes: the 3% subset (1,800 images, 100 epochs) and the full
set (60,000 images, 15 epochs), 3 seeds::

  python experiments/ensemble_born_again.py
  python experiments/ensemble_born_again.py --regimes subset --generations 3
  python experiments/ensemble_born_again.py --smoke
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

from kdjax import methods  # noqa: E402  pylint: disable=g-import-not-at-top
from kdjax import models  # noqa: E402  pylint: disable=g-import-not-at-top
from kdjax import train  # noqa: E402  pylint: disable=g-import-not-at-top

NAME = "ensemble_born_again"
# The ensemble's stacked [M, B, C] logits (what kdjax.losses.multi_teacher_term
# reads); the cache stores them example-major and gives them back as [M, B, C].
STACKED = "teacher_logits"

REAL = {"seeds": [0, 1, 2], "teacher_epochs": 3, "full_epochs": 15,
        "subset_size": 1800, "subset_epochs": 100, "full_size": 0,
        "generations": 3}
SMOKE = {"seeds": [0], "teacher_epochs": 1, "full_epochs": 1,
         "subset_size": 256, "subset_epochs": 2, "full_size": 512,
         "generations": 2, "max_test": 500}


def teacher_configs(args) -> list:
  """The ensemble's three teachers: (arch, sizes, dense, epochs, seed)."""
  if args.smoke:
    return [dict(arch="cnn", sizes=(4, 8), dense=16, epochs=1, seed=0, max_train=1024),
            dict(arch="cnn", sizes=(4, 4), dense=8, epochs=1, seed=1, max_train=1024),
            dict(arch="mlp", sizes=(32,), dense=0, epochs=1, seed=2, max_train=1024)]
  e = args.teacher_epochs
  return [dict(arch="cnn", sizes=(32, 64), dense=256, epochs=e, seed=0),
          dict(arch="cnn", sizes=(16, 32), dense=128, epochs=e, seed=1),
          dict(arch="mlp", sizes=(512, 256), dense=0, epochs=e + 2, seed=2)]


def main(argv: Optional[Sequence[str]] = None) -> dict:
  p = common.base_parser(__doc__)
  p.add_argument("--regimes", nargs="+", default=["subset", "full"],
                 choices=["full", "subset"])
  p.add_argument("--parts", nargs="+", default=["ensemble", "born_again"],
                 choices=["ensemble", "born_again"])
  p.add_argument("--full-size", type=int, default=None)
  p.add_argument("--full-epochs", type=int, default=None)
  p.add_argument("--subset-size", type=int, default=None)
  p.add_argument("--subset-epochs", type=int, default=None)
  p.add_argument("--generations", type=int, default=None)
  p.add_argument("--temperature", type=float, default=2.0)
  p.add_argument("--kd-weight", type=float, default=0.5)
  p.add_argument("--student-hidden", type=int, nargs="+", default=[128])
  p.add_argument("--lr", type=float, default=2e-3)
  return common.execute(p, argv, SMOKE, REAL, run)


def run(args, argv) -> dict:
  """Runs the experiment with parsed ``args``; returns the JSON payload."""
  json_path, png_path = common.output_paths(args, NAME)
  timer = common.Timer()

  data = common.load_data(args)
  common.run_header(args, data)
  student = models.MLP(hidden=tuple(args.student_hidden), num_classes=10)
  student_apply = models.from_linen(student, train_kwarg="train")
  if args.teacher == "artifact":
    raise SystemExit("error: ensemble_born_again.py trains its own teachers "
                     "(several architectures and generations); --teacher "
                     "artifact does not apply here.")
  n_train = len(data["train"][1])
  regimes = []
  if "subset" in args.regimes:
    regimes.append(("subset", min(args.subset_size, n_train), args.subset_epochs))
  if "full" in args.regimes:
    size = args.full_size if args.full_size and args.full_size < n_train else n_train
    regimes.append(("full", size, args.full_epochs))
  labels = {r: f"{'full set' if s == n_train else 'subset'} ({s:,} images, {e} ep)"
            for r, s, e in regimes}
  payload = {"experiment": NAME, "command": common.command_line(NAME, argv),
             "args": vars(args), "regimes": labels}
  tables = {}

  # ---------------------------------------------------------------- ensemble
  if "ensemble" in args.parts:
    with timer("teachers"):
      teachers = [common.get_teacher(data, args.workdir, **cfg)
                  for cfg in teacher_configs(args)]
    ensemble = models.ensemble_apply([t["apply"] for t in teachers])
    ens_vars = tuple(t["variables"] for t in teachers)
    ens_acc = common.evaluate_accuracy(ensemble, ens_vars, data)
    best = max(teachers, key=lambda t: t["accuracy"])
    for t in teachers:
      print(f"teacher {t['name']}: {t['params']:,} params, "
            f"{100 * t['accuracy']:.2f}%", flush=True)
    print(f"ensemble (mean of probabilities): {100 * ens_acc:.2f}%; best single "
          f"teacher: {best['name']}", flush=True)
    hp = dict(temperature=args.temperature, ce_weight=1 - args.kd_weight,
              kd_weight=args.kd_weight)
    kd_loss = methods.build_loss(methods.get_method("kd", **hp))
    ens_loss = methods.build_loss(methods.get_method("ensemble", **hp))
    ens_teacher = {"apply": ensemble, "variables": ens_vars}
    results = {}
    for regime, size, epochs in regimes:
      x, y, _ = common.subset(data, size)
      arrays = {"image": x, "label": y}
      with timer("caches"):
        best_cache = common.build_cache(args.workdir, f"{NAME}_best_{size}",
                                        best, arrays)
        ens_cache = common.build_cache(
            args.workdir, f"{NAME}_ensemble_{size}", ens_teacher, arrays,
            feature_names=(STACKED,))
      configs = [
          ("student alone", common.CE_ONLY, best_cache, None, best),
          (f"KD from the best teacher ({best['name']})", kd_loss, best_cache,
           best_cache.teacher_apply(), best),
          ("KD from the ensemble of 3", ens_loss, ens_cache,
           ens_cache.teacher_apply(), ens_teacher)]
      for name, loss_fn, tc, t_apply, agree_with in configs:
        runner = common.StudentRunner(
            student, student_apply, loss_fn, tc, epochs=epochs,
            batch_size=args.batch_size, lr=args.lr, teacher_apply=t_apply)
        for seed in args.seeds:
          with timer("ensemble students"):
            variables, seconds = runner.run(seed)
          ev = common.evaluate_student(student_apply, variables, data, agree_with)
          results.setdefault(regime, {}).setdefault(name, []).append(
              {"seed": seed, "time_s": seconds, **ev})
          print(f"{regime:>6} {name[:40]:>40} seed {seed}: accuracy "
                f"{100 * ev['accuracy']:.2f}  ({seconds:.1f} s)", flush=True)
    ens_summary = {}
    for regime, _, _ in regimes:
      rows = []
      alone = [r["accuracy"] for r in results[regime]["student alone"]]
      for name, runs in results[regime].items():
        acc = [r["accuracy"] for r in runs]
        is_base = name == "student alone"
        gain = np.asarray(acc) - np.asarray(alone)
        rows.append([name, common.fmt(acc),
                     "-" if is_base else common.fmt(gain, signed=True),
                     "-" if is_base else
                     ("yes" if common.beyond_spread(alone, acc) else "no"),
                     common.fmt([r["agreement"] for r in runs])])
        ens_summary.setdefault(regime, {})[name] = {
            "accuracy": common.stats(acc),
            "gain": None if is_base else common.stats(gain),
            "beyond_spread": None if is_base else common.beyond_spread(alone, acc)}
      tables[f"ensemble {regime}"] = common.markdown_table(
          ["student MLP 784-128-10", "test accuracy", "gain vs alone",
           "gain > spread", "agreement with its teacher"], rows)
    payload["ensemble"] = {
        "teachers": [{k: t[k] for k in ("name", "params", "accuracy", "epochs",
                                         "train_time_s")} for t in teachers],
        "ensemble_accuracy": ens_acc, "best_teacher": best["name"],
        "runs": results, "summary": ens_summary}

  # -------------------------------------------------------------- born-again
  if "born_again" in args.parts:
    spec = methods.get_method("born_again", generations=args.generations)
    ban_loss = methods.build_loss(spec)
    ban = {}
    for regime, size, epochs in regimes:
      x, y, _ = common.subset(data, size)
      steps = epochs * (len(y) // args.batch_size)
      optimizer = common.make_optimizer(args.lr, steps)
      for seed in args.seeds:

        def batches(generation, seed=seed, x=x, y=y, epochs=epochs):
          del generation  # every generation sees the same batches
          rng = np.random.default_rng(seed)
          for _ in range(epochs):
            yield from common.epoch_batches(x, y, args.batch_size, rng)

        tick = time.perf_counter()
        with timer("born-again"):
          gens = train.born_again(
              student_apply, lambda k: student.init(k, x[:2]), optimizer,
              batches, generations=spec.hparams["generations"],
              rng=jax.random.PRNGKey(seed), loss_fn=ban_loss,
              eval_batches=lambda: common.eval_batches(*data["test"]),
              log_every=1000)
        seconds = time.perf_counter() - tick
        accs = [g.eval["student_accuracy"] for g in gens]
        bane = models.ensemble_apply([student_apply] * (len(gens) - 1))
        bane_acc = common.evaluate_accuracy(
            bane, tuple(g.variables for g in gens[1:]), data)
        ban.setdefault(regime, []).append(
            {"seed": seed, "accuracy": accs, "bane_accuracy": bane_acc,
             "agreement_with_previous": [None] + [g.eval["agreement"]
                                                  for g in gens[1:]],
             "time_s": seconds})
        print(f"{regime:>6} born-again seed {seed}: generations "
              + " -> ".join(f"{100 * a:.2f}" for a in accs)
              + f"; BANE {100 * bane_acc:.2f} ({seconds:.0f} s)", flush=True)
    ban_summary = {}
    for regime, _, _ in regimes:
      runs = ban[regime]
      gen0 = [r["accuracy"][0] for r in runs]
      rows = []
      for g in range(len(runs[0]["accuracy"])):
        acc = [r["accuracy"][g] for r in runs]
        gain = np.asarray(acc) - np.asarray(gen0)
        rows.append([f"generation {g}" + (" (labels only)" if g == 0 else
                                          f" (teacher: gen {g - 1})"),
                     common.fmt(acc), "-" if g == 0 else common.fmt(gain, signed=True),
                     "-" if g == 0 else
                     ("yes" if common.beyond_spread(gen0, acc) else "no"),
                     "-" if g == 0 else common.fmt(
                         [r["agreement_with_previous"][g] for r in runs])])
        ban_summary.setdefault(regime, []).append(
            {"generation": g, "accuracy": common.stats(acc),
             "gain_vs_gen0": None if g == 0 else common.stats(gain)})
      bane = [r["bane_accuracy"] for r in runs]
      rows.append([f"BANE (mean of gens 1-{len(runs[0]['accuracy']) - 1})",
                   common.fmt(bane),
                   common.fmt(np.asarray(bane) - np.asarray(gen0), signed=True),
                   "yes" if common.beyond_spread(gen0, bane) else "no", "-"])
      tables[f"born-again {regime}"] = common.markdown_table(
          ["born-again MLP 784-128-10", "test accuracy", "gain vs gen 0",
           "gain > spread", "agreement with teacher"], rows)
    payload["born_again"] = {"hparams": dict(spec.hparams), "runs": ban,
                             "summary": ban_summary}

  print()
  print(f"Fashion-MNIST test accuracy (%), mean ± std over seeds {args.seeds}.")
  if "ensemble" in payload:
    print("Teachers: " + "; ".join(
        f"{t['name']} {100 * t['accuracy']:.2f}" for t in payload["ensemble"]["teachers"])
          + f"; ensemble {100 * payload['ensemble']['ensemble_accuracy']:.2f}. "
          f"KD: {1 - args.kd_weight:g} CE + {args.kd_weight:g} T^2 KL, "
          f"T = {args.temperature:g}.")
  for key, table in tables.items():
    part, regime = key.rsplit(" ", 1)
    print(f"\n{part}, {labels[regime]}:\n{table}")
  print("\ntimes (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timer.times.items())
        + f"; total {timer.total():.0f}")

  plot(payload, [r for r, _, _ in regimes], labels, png_path)
  payload.update({"tables": tables, "times_s": timer.times,
                  "total_time_s": timer.total()})
  common.write_json(json_path, payload)
  return payload


def plot(payload: dict, regimes: Sequence[str], labels: dict, png_path: str) -> None:
  """Left: alone / best teacher / ensemble per regime; right: accuracy per BAN generation."""
  plt = common.pyplot()
  panels = [k for k in ("ensemble", "born_again") if k in payload]
  fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2),
                           squeeze=False)
  for ax, part in zip(axes[0], panels):
    if part == "ensemble":
      res = payload["ensemble"]["runs"]
      names = list(next(iter(res.values())).keys())
      width = 0.8 / len(names)
      for i, name in enumerate(names):
        s = [common.stats([r["accuracy"] for r in res[reg][name]]) for reg in regimes]
        ax.bar(np.arange(len(regimes)) + (i - (len(names) - 1) / 2) * width,
               [t["mean"] for t in s], width, yerr=[t["std"] for t in s],
               capsize=3, label=name.replace(" (", "\n("))
      ax.axhline(100 * payload["ensemble"]["ensemble_accuracy"], color="k",
                 ls=":", label="ensemble of teachers")
      ax.set_xticks(range(len(regimes)))
      ax.set_xticklabels([labels[r] for r in regimes], fontsize=8)
      lo = min(r["accuracy"] for reg in res.values() for runs in reg.values()
               for r in runs)
      ax.set_ylim(100 * lo - 2, 100 * payload["ensemble"]["ensemble_accuracy"] + 4)
      ax.set_ylabel("test accuracy (%)")
      ax.set_title("student MLP: alone / best teacher / ensemble of 3", fontsize=9)
      ax.legend(fontsize=7, loc="upper left")
    else:
      res = payload["born_again"]["runs"]
      for reg in regimes:
        gens = len(res[reg][0]["accuracy"])
        common.errorbar(ax, list(range(gens)),
                        [[r["accuracy"][g] for r in res[reg]] for g in range(gens)],
                        labels[reg])
      ax.set_xticks(range(gens))
      ax.set_xlabel("born-again generation (0: labels only)")
      ax.set_ylabel("test accuracy (%)")
      ax.set_title("born-again networks (KL to the previous generation, T=1)",
                   fontsize=9)
      ax.legend(fontsize=8)
  common.save_figure(fig, png_path)


if __name__ == "__main__":
  main()
