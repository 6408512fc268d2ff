"""Every distillation method of the registry (``kdjax.methods``) on one teacher -> student pair.

Teacher: the main job's CNN (conv 32-64, dense 256, 3 epochs on the 60,000
training images, ~91%), trained once and saved in the work directory (shared
with the other experiments). Student: a CNN (conv 8-16, dense 64), so that the
feature methods have blocks to match (``block_0`` 28x28, ``block_1`` 14x14,
``penultimate``). Data: a 10,000-image subset of the training set (fixed),
5 epochs, batch 128, Adam-W 2e-3 with cosine decay; every method starts from
the same initialisation for a given seed and sees the same batches.

Each method runs with its registry defaults (the papers' CIFAR settings),
except the step-based schedules and sizes that assume CIFAR, scaled to this
run and listed in the table (DKD's warm-up and the mean teacher's ramp-up:
one epoch; CRD's negatives: 4,096 < 10,000 examples). Teacher outputs come
from ``kdjax.cache`` (logits and the ``penultimate`` features: exact, no
augmentation) except for the methods that read convolutional blocks (FitNets,
AT, SP), whose teacher runs online (caching 14x14x64 maps of 10,000 images
would take 0.5 GB). ``ensemble`` and ``born_again`` need several teachers or
generations: see ``ensemble_born_again.py``.

  python experiments/method_comparison.py
  python experiments/method_comparison.py --methods ce kd dkd crd --epochs 3
  python experiments/method_comparison.py --smoke
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

NAME = "method_comparison"
FEATURES = ("block_0", "block_1", "penultimate")
CACHED_FEATURES = ("penultimate",)
SEPARATE = ("ensemble", "born_again")  # covered by ensemble_born_again.py
# Rows beside the registry's defaults: (registry method, hyper-parameters).
# "kd_t2": the main job's KD setting, chosen on its validation split
# (fashion_mnist_select.py), not on the test set.
VARIANTS = {"kd_t2": ("kd", {"temperature": 2.0, "ce_weight": 0.5,
                             "kd_weight": 0.5})}

REAL = {"seeds": [0, 1, 2], "teacher_epochs": 3, "train_size": 0,
        "epochs": 5, "time_steps": 30, "methods": None, "crd_nce_k": 4096,
        "teacher": "artifact"}
SMOKE = {"seeds": [0], "teacher_epochs": 1, "train_size": 512, "epochs": 1,
         "methods": ["ce", "kd", "dkd", "fitnets", "crd", "mean_teacher"],
         "crd_nce_k": 64, "max_test": 500, "time_steps": 2}


def overrides_for(name: str, steps_per_epoch: int, args) -> dict:
  """The registry defaults that assume CIFAR, scaled to this run."""
  if name == "dkd":
    return {"warmup_steps": steps_per_epoch}
  if name == "mean_teacher":
    return {"rampup_steps": steps_per_epoch}
  if name == "crd":
    return {"nce_k": args.crd_nce_k}
  return {}


def main(argv: Optional[Sequence[str]] = None) -> dict:
  p = common.base_parser(__doc__)
  p.add_argument("--methods", nargs="+", default=None,
                 help="registry names (default: all but ensemble, born_again)")
  p.add_argument("--train-size", type=int, default=None)
  p.add_argument("--epochs", type=int, default=None)
  p.add_argument("--student-channels", type=int, nargs="+", default=[8, 16])
  p.add_argument("--student-dense", type=int, default=64)
  p.add_argument("--crd-nce-k", type=int, default=None)
  p.add_argument("--lr", type=float, default=2e-3)
  p.add_argument("--time-steps", type=int, default=None,
                 help="after training, time this many steps of every method "
                 "on one batch, the methods interleaved (0: skip)")
  p.add_argument("--time-rounds", type=int, default=3)
  return common.execute(p, argv, SMOKE, REAL, run)


def run(args, argv) -> dict:
  """Runs the experiment with parsed ``args``; returns the JSON payload."""
  names = args.methods or ([n for n in methods.METHODS if n not in SEPARATE]
                           + list(VARIANTS))
  for n in names:
    if n not in VARIANTS:
      methods.get_method(n)  # unknown names raise, listing the known ones
  json_path, png_path = common.output_paths(args, NAME)
  timer = common.Timer()

  data, teacher = common.prepare(args, timer, feature_names=FEATURES)

  student = models.CNN(channels=tuple(args.student_channels),
                       dense=args.student_dense, num_classes=10)
  student_apply = models.from_linen(student, feature_names=FEATURES,
                                    train_kwarg="train")
  x, y, _ = common.subset(data, args.train_size)
  with timer("cache"):
    tc = common.build_cache(
        args.workdir, f"{NAME}_{len(y)}", teacher,
        {"image": x, "label": y, "index": np.arange(len(y), dtype=np.int32)},
        feature_names=CACHED_FEATURES)
  steps_per_epoch = len(y) // args.batch_size

  runs, info, runners = {}, {}, {}
  # Finished (method, seed) runs are appended to a JSONL file beside the
  # results and reused by a rerun with the same settings: a long run that is
  # stopped resumes where it was (delete the file to start again).
  signature = {k: getattr(args, k) for k in (
      "epochs", "train_size", "batch_size", "lr", "teacher", "student_channels",
      "student_dense", "crd_nce_k", "max_test", "smoke")}
  partial_path = json_path + ".partial.jsonl"
  partial = common.read_partial(partial_path, signature)
  for name in names:
    base, fixed = VARIANTS.get(name, (name, {}))
    spec = methods.get_method(base, **fixed,
                              **overrides_for(base, steps_per_epoch, args))
    loss_fn = methods.build_loss(spec, num_data=len(y), dataset_labels=y)
    online = spec.needs_teacher and not set(
        spec.feature_names()["teacher"]) <= set(CACHED_FEATURES)
    if spec.recipe == "distill":
      t_apply, t_vars = ((teacher["apply"], teacher["variables"]) if online
                         else (tc.teacher_apply(), None))
    elif spec.recipe in ("student_only", "mean_teacher"):
      t_apply, t_vars = None, None
    else:
      raise ValueError(f"method {name!r} (recipe {spec.recipe!r}) needs "
                       "several teachers or generations: see "
                       "ensemble_born_again.py.")
    runner = runners[name] = common.StudentRunner(
        student, student_apply, loss_fn, tc, epochs=args.epochs,
        batch_size=args.batch_size, lr=args.lr, teacher_apply=t_apply,
        teacher_variables=t_vars, online=online,
        ema=spec.recipe == "mean_teacher", step_kwargs=spec.train_step_kwargs())
    source = ("online" if online else "cache") if spec.needs_teacher else (
        "EMA of student" if spec.recipe == "mean_teacher" else "-")
    changed = {**fixed, **overrides_for(base, steps_per_epoch, args)}
    info[name] = {"recipe": spec.recipe, "teacher": source,
                  "hparams": dict(spec.hparams), "changed": changed,
                  "paper": spec.paper}
    for seed in args.seeds:
      done = partial.get((name, seed))
      if done is not None:
        runs.setdefault(name, []).append(done)
        print(f"{name:>16} seed {seed}: accuracy {100 * done['accuracy']:.2f} "
              f"(from {partial_path})", flush=True)
        continue
      with timer("students"):
        variables, seconds = runner.run(seed)
      ev = common.evaluate_student(student_apply, variables, data, teacher)
      steps = runner.steps
      # ms/step of the epochs after the first (the first one compiles).
      later = runner.epoch_times[1:] or runner.epoch_times
      ms_per_step = 1e3 * sum(later) / (len(later) * (steps // args.epochs))
      record = {"seed": seed, "time_s": seconds, "steps": steps,
                "ms_per_step": ms_per_step, "load_average": os.getloadavg()[0],
                **ev}
      runs.setdefault(name, []).append(record)
      common.append_partial(partial_path, signature, name, record)
      print(f"{name:>16} seed {seed}: accuracy {100 * ev['accuracy']:.2f}  "
            f"agreement {100 * ev['agreement']:.2f}  ({seconds:.1f} s, "
            f"{ms_per_step:.1f} ms/step, teacher {source})", flush=True)

  step_ms = time_steps(runners, args.time_steps, args.time_rounds) if (
      args.time_steps) else {}
  n_s = common.param_count(student.init(jax.random.PRNGKey(0), x[:2]))
  base = [r["accuracy"] for r in runs["ce"]] if "ce" in runs else None
  rows, summary = [], {}
  for name in names:
    acc = [r["accuracy"] for r in runs[name]]
    gain = None if base is None or name == "ce" else np.asarray(acc) - np.asarray(base)
    better = None if gain is None else common.beyond_spread(base, acc)
    changed = ", ".join(f"{k}={v}" for k, v in info[name]["changed"].items())
    rows.append([f"`{name}`", info[name]["teacher"], changed or "-",
                 common.fmt(acc), "-" if gain is None else common.fmt(gain, signed=True),
                 "-" if better is None else ("yes" if better else "no"),
                 common.fmt([r["agreement"] for r in runs[name]]),
                 f"{step_ms[name]:.1f}" if name in step_ms else
                 f"({np.mean([r['ms_per_step'] for r in runs[name]]):.1f})"])
    summary[name] = {**info[name], "accuracy": common.stats(acc),
                     "gain_vs_ce": None if gain is None else common.stats(gain),
                     "beyond_spread": better,
                     "agreement": common.stats([r["agreement"] for r in runs[name]]),
                     "time_s": [r["time_s"] for r in runs[name]],
                     "ms_per_step_training": common.stats(
                         [r["ms_per_step"] for r in runs[name]]),
                     "ms_per_step": step_ms.get(name)}
  table = common.markdown_table(
      ["method", "teacher outputs", "changed defaults", "test accuracy",
       "gain vs ce", "gain > spread", "agreement", "ms / step"], rows)
  print()
  print(f"Fashion-MNIST test accuracy (%), mean ± std over seeds {args.seeds}. "
        f"Teacher {teacher['name']} ({teacher['params']:,} params): "
        f"{100 * teacher['accuracy']:.2f}. Student CNN conv "
        f"{'-'.join(map(str, args.student_channels))} dense {args.student_dense} "
        f"({n_s:,} params), {len(y):,} training images, {args.epochs} epochs.")
  print(table)
  print("\ntimes (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timer.times.items())
        + f"; total {timer.total():.0f}")

  plot(summary, names, teacher["accuracy"], len(y), args.epochs, png_path)
  payload = {"experiment": NAME, "command": common.command_line(NAME, argv),
             "args": vars(args),
             "teacher": {k: teacher[k] for k in ("name", "params", "accuracy",
                                                 "epochs", "train_time_s")},
             "student_params": n_s, "train_size": len(y), "runs": runs,
             "summary": summary, "table": table, "times_s": timer.times,
             "total_time_s": timer.total(),
             "not_run": {n: "see ensemble_born_again.py" for n in SEPARATE}}
  common.write_json(json_path, payload)
  return payload


def time_steps(runners: dict, steps: int, rounds: int) -> dict:
  """Median ms per step of each runner's jitted step on one fixed batch.

  Every method's step is compiled and warmed up first, then ``rounds``
  rounds time ``steps`` steps of each method in turn (interleaved, so that a
  change of the machine's load touches every method alike); the median over
  rounds is returned. Online teachers run inside their step, as in training.
  """
  jobs = {}
  for name, runner in runners.items():
    state, batch = runner.initial_state(0)
    for _ in range(2):  # compile + warm up
      state, _ = runner.step(state, runner.teacher_variables, batch)
    jax.block_until_ready(state.params)
    jobs[name] = [runner, state, batch, []]
  for _ in range(rounds):
    for name, job in jobs.items():
      runner, state, batch, times = job
      tick = time.perf_counter()
      for _ in range(steps):
        state, _ = runner.step(state, runner.teacher_variables, batch)
      jax.block_until_ready(state.params)
      times.append(1e3 * (time.perf_counter() - tick) / steps)
      job[1] = state
  out = {name: float(np.median(job[3])) for name, job in jobs.items()}
  print("ms / step (median of %d interleaved rounds of %d steps, load %.1f): %s"
        % (rounds, steps, os.getloadavg()[0],
           ", ".join(f"{k} {v:.1f}" for k, v in out.items())), flush=True)
  return out


def plot(summary: dict, names: Sequence[str], teacher_accuracy: float,
         train_size: int, epochs: int, png_path: str) -> None:
  """Horizontal bars: each method's test accuracy (mean ± std), sorted."""
  plt = common.pyplot()
  order = sorted(names, key=lambda n: summary[n]["accuracy"]["mean"])
  fig, ax = plt.subplots(figsize=(7, 0.32 * len(order) + 1.7))
  means = [summary[n]["accuracy"]["mean"] for n in order]
  stds = [summary[n]["accuracy"]["std"] for n in order]
  colors = ["tab:gray" if n == "ce" else
            "tab:orange" if summary[n]["teacher"] == "online" else "tab:blue"
            for n in order]
  ax.barh(range(len(order)), means, xerr=stds, color=colors, capsize=3)
  ax.set_yticks(range(len(order)))
  ax.set_yticklabels(order)
  if "ce" in summary:
    ax.axvline(summary["ce"]["accuracy"]["mean"], color="gray", ls="--",
               label="ce (student alone)")
  ax.axvline(100 * teacher_accuracy, color="k", ls=":", label="teacher")
  lo = min(m - s for m, s in zip(means, stds))
  ax.set_xlim(max(0.0, lo - 1.0), max(100 * teacher_accuracy, max(means)) + 0.5)
  ax.set_xlabel("test accuracy (%), mean ± std over seeds")
  ax.set_title(f"kdjax.methods on Fashion-MNIST ({train_size:,} images, {epochs} "
               "epochs)\nblue: cached teacher outputs, orange: online teacher",
               fontsize=9)
  ax.legend(fontsize=8, loc="lower right")
  common.save_figure(fig, png_path)


if __name__ == "__main__":
  main()
