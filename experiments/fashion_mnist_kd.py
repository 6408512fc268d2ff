"""The main job: a real distillation on the real Fashion-MNIST, end to end.

1. trains a teacher CNN on the 60,000 training images;
2. trains a small student MLP alone (hard labels);
3. trains the same student (same initialisation, same batches) distilled from the
   teacher (Hinton et al. 2015: ``0.1 * CE + 0.9 * T^2 KL`` at ``T = 4``);
4. prints their test accuracies (10,000 test images), parameter counts, the
   student-teacher agreement and the wall time of each phase.

Run from a fresh machine (see README.md)::

  python experiments/fashion_mnist_kd.py            # default: 1 seed, ~minutes on 2 cores
  python experiments/fashion_mnist_kd.py --seeds 0 1 2 --temperature 4

The data are Debian's ``dataset-fashion-mnist`` IDX files
(``/usr/share/datasets/fashion-mnist``; ``--data-dir`` to change).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax import losses
from kdjax import models
from kdjax import train
from kdjax.data import load_fashion_mnist_split

MEAN, STD = 0.2860, 0.3530  # Fashion-MNIST training-set pixel statistics


def load(data_dir):
  splits = {}
  for split in ("train", "test"):
    images, labels = load_fashion_mnist_split(split, data_dir)
    images = ((images.astype(np.float32) / 255.0 - MEAN) / STD)[..., None]
    splits[split] = (images, labels)
  return splits


def epoch_batches(images, labels, batch_size, rng: np.random.Generator):
  """One epoch of shuffled full batches (the remainder is dropped)."""
  order = rng.permutation(len(labels))
  for i in range(len(order) // batch_size):
    idx = order[i * batch_size:(i + 1) * batch_size]
    yield {"image": images[idx], "label": labels[idx]}


def eval_batches(images, labels, batch_size=1000):
  for i in range(0, len(labels), batch_size):
    yield {"image": images[i:i + batch_size], "label": labels[i:i + batch_size]}


def param_count(variables) -> int:
  return sum(x.size for x in jax.tree.leaves(variables["params"]))


def train_model(apply_fn, variables, loss_fn, *, teacher_apply, teacher_vars,
                data, epochs, batch_size, lr, seed):
  """Trains with the composed loss; returns the final student variables."""
  images, labels = data
  steps = epochs * (len(labels) // batch_size)
  optimizer = optax.adamw(optax.cosine_decay_schedule(lr, steps),
                          weight_decay=1e-4)
  # Copy: the step donates the state's buffers, and `variables` may be reused
  # (both students start from the same initialisation).
  variables = jax.tree.map(jnp.copy, variables)
  state = train.create_state(variables, optimizer,
                             rng=jax.random.PRNGKey(seed))
  step = train.make_train_step(apply_fn, teacher_apply, loss_fn, optimizer)
  rng = np.random.default_rng(seed)
  history = []
  for _ in range(epochs):
    state, h = train.fit(step, state, teacher_vars,
                         epoch_batches(images, labels, batch_size, rng),
                         log_every=100)
    history.extend(h)
  return state.student_variables(), history


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data-dir", default=None)
  p.add_argument("--seeds", type=int, nargs="+", default=[0])
  p.add_argument("--teacher-epochs", type=int, default=4)
  p.add_argument("--student-epochs", type=int, default=6)
  p.add_argument("--student-hidden", type=int, nargs="+", default=[128])
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--temperature", type=float, default=4.0)
  p.add_argument("--kd-weight", type=float, default=0.9)
  p.add_argument("--json", default=None, help="also write the results here")
  args = p.parse_args(argv)

  t0 = time.perf_counter()
  data = load(args.data_dir)
  print(f"Fashion-MNIST: {len(data['train'][1])} train / "
        f"{len(data['test'][1])} test images, devices: {jax.devices()}",
        flush=True)
  example = {"image": data["train"][0][:2]}

  teacher = models.CNN(channels=(32, 64), dense=256, num_classes=10)
  student = models.MLP(hidden=tuple(args.student_hidden), num_classes=10)
  teacher_apply = models.from_linen(teacher, train_kwarg="train")
  student_apply = models.from_linen(student, train_kwarg="train")
  ce_only = losses.compose(
      [losses.Term("ce", losses.label_term(), 1.0, needs_teacher=False)])
  kd = losses.compose(
      [losses.Term("ce", losses.label_term(), 1.0 - args.kd_weight,
                   needs_teacher=False),
       losses.Term("kd", losses.logit_term(losses.kl_divergence),
                   args.kd_weight)],
      temperature=args.temperature)

  rows = []
  for seed in args.seeds:
    key_t, key_s = jax.random.split(jax.random.PRNGKey(seed))
    tick = time.perf_counter()
    teacher_vars, _ = train_model(
        teacher_apply, teacher.init(key_t, example["image"]), ce_only,
        teacher_apply=None, teacher_vars=None, data=data["train"],
        epochs=args.teacher_epochs, batch_size=args.batch_size, lr=2e-3,
        seed=seed)
    t_teacher = time.perf_counter() - tick
    student_init = student.init(key_s, example["image"])
    results = {}
    for name, loss_fn, t_apply in (("student alone", ce_only, None),
                                   ("student distilled", kd, teacher_apply)):
      tick = time.perf_counter()
      student_vars, history = train_model(
          student_apply, student_init, loss_fn, teacher_apply=t_apply,
          teacher_vars=teacher_vars if t_apply else None, data=data["train"],
          epochs=args.student_epochs, batch_size=args.batch_size, lr=2e-3,
          seed=seed + 1000)  # same batches for both students
      elapsed = time.perf_counter() - tick
      report = train.evaluate(
          train.make_eval_step(student_apply, teacher_apply), student_vars,
          teacher_vars, eval_batches(*data["test"]))
      results[name] = (report, elapsed, history[-1][1]["loss"])
    teacher_acc = results["student alone"][0]["teacher_accuracy"]
    rows.append({"seed": seed, "teacher": teacher_acc,
                 "teacher_time_s": t_teacher,
                 **{name: r[0]["student_accuracy"] for name, r in results.items()},
                 **{f"{name} agreement": r[0]["agreement"]
                    for name, r in results.items()},
                 **{f"{name} time_s": r[1] for name, r in results.items()}})
    print(f"seed {seed}: teacher {teacher_acc:.4f}  alone "
          f"{rows[-1]['student alone']:.4f}  distilled "
          f"{rows[-1]['student distilled']:.4f}", flush=True)

  n_t = param_count(teacher_vars)
  n_s = param_count(student_init)

  def stat(key):
    v = np.array([r[key] for r in rows])
    return (f"{100 * v.mean():.2f}" if len(v) == 1 else
            f"{100 * v.mean():.2f} ± {100 * v.std(ddof=1):.2f}")

  def secs(key):
    return f"{np.mean([r[key] for r in rows]):.0f}"

  print()
  print(f"Fashion-MNIST test accuracy (%), {len(rows)} seed(s) "
        f"{args.seeds}, T={args.temperature}, kd weight {args.kd_weight}")
  print(f"| model             | params    | test acc (%)  | agreement w/ teacher (%) | train time (s) |")
  print(f"|-------------------|-----------|---------------|--------------------------|----------------|")
  print(f"| teacher CNN       | {n_t:>9,} | {stat('teacher'):>13} | {'-':>24} | {secs('teacher_time_s'):>14} |")
  for name in ("student alone", "student distilled"):
    print(f"| {name + ' MLP':<17} | {n_s:>9,} | {stat(name):>13} | "
          f"{stat(name + ' agreement'):>24} | {secs(name + ' time_s'):>14} |")
  gain = np.array([r["student distilled"] - r["student alone"] for r in rows])
  print(f"\ndistillation gain: {100 * gain.mean():+.2f} points "
        f"(per seed: {', '.join(f'{100 * g:+.2f}' for g in gain)}); "
        f"total time {time.perf_counter() - t0:.0f} s")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "rows": rows, "teacher_params": n_t,
                 "student_params": n_s}, f, indent=2)
  return rows


if __name__ == "__main__":
  sys.exit(0 if main() else 1)
