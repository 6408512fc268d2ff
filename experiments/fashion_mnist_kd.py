"""The main job: a real distillation on the real Fashion-MNIST, end to end.

1. trains a teacher CNN on the 60,000 training images (hard labels);
2. caches the teacher's logits once over each student's training set
   (``kdjax.cache``: offline distillation; exact, since there is no augmentation);
3. in two regimes, the full training set and a 3% subset of it (1,800 images, as
   in Hinton et al. 2015, section 6 "soft targets as regularizers"), trains a small
   student MLP alone (hard labels) and the same student (same initialisation, same
   batches) distilled from the cached teacher (``0.5 CE + 0.5 T^2 KL`` at ``T = 2``);
4. prints test accuracies (10,000 test images; mean ± std over seeds),
   student-teacher agreement, parameter counts and the time of each phase.

Run from a fresh machine (see README.md)::

  python experiments/fashion_mnist_kd.py
  python experiments/fashion_mnist_kd.py --seeds 0 1 2 3 4 --temperature 2 --kd-weight 0.7

The data are Debian's ``dataset-fashion-mnist`` IDX files
(``/usr/share/datasets/fashion-mnist``; ``--data-dir`` to change).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax import cache
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


def make_optimizer(lr, steps):
  return optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=1e-4)


def train_teacher(teacher_apply, variables, loss_fn, data, *, epochs,
                  batch_size, lr, seed):
  images, labels = data
  optimizer = make_optimizer(lr, epochs * (len(labels) // batch_size))
  state = train.create_state(variables, optimizer, rng=jax.random.PRNGKey(seed))
  step = train.make_train_step(teacher_apply, None, loss_fn, optimizer)
  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    state, _ = train.fit(step, state, None,
                         epoch_batches(images, labels, batch_size, rng),
                         log_every=200)
  return state.student_variables()


def train_student(student_apply, init_variables, loss_fn, teacher_cache, *,
                  distill, epochs, batch_size, lr, seed):
  """Trains from the cache's batches (the student alone ignores the teacher).

  Both students see the same batches in the same order (the cache's shuffle
  depends on ``seed`` and the epoch only).
  """
  steps = epochs * (teacher_cache.num_examples // batch_size)
  optimizer = make_optimizer(lr, steps)
  # Copy: the step donates the state's buffers, and both students start from
  # the same initial variables.
  variables = jax.tree.map(jnp.copy, init_variables)
  state = train.create_state(variables, optimizer, rng=jax.random.PRNGKey(seed))
  if distill:
    step = cache.make_cached_train_step(student_apply, teacher_cache, loss_fn,
                                        optimizer)
  else:
    step = train.make_train_step(student_apply, None, loss_fn, optimizer)
  for epoch in range(epochs):
    state, _ = train.fit(
        step, state, None,
        teacher_cache.batches(batch_size, shuffle=True, seed=seed, epoch=epoch),
        log_every=500)
  return state.student_variables()


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data-dir", default=None)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--teacher-epochs", type=int, default=3)
  p.add_argument("--student-hidden", type=int, nargs="+", default=[128])
  p.add_argument("--full-epochs", type=int, default=15,
                 help="student epochs on the full training set")
  p.add_argument("--subset-size", type=int, default=1800,
                 help="examples of the small-data regime (0: skip it)")
  p.add_argument("--subset-epochs", type=int, default=100)
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--temperature", type=float, default=2.0)
  p.add_argument("--kd-weight", type=float, default=0.5)
  p.add_argument("--workdir", default=None,
                 help="where the teacher caches go (default: a temp dir)")
  p.add_argument("--json", default=None, help="also write the results here")
  args = p.parse_args(argv)

  t0 = time.perf_counter()
  data = load(args.data_dir)
  train_x, train_y = data["train"]
  print(f"Fashion-MNIST: {len(train_y)} train / {len(data['test'][1])} test "
        f"images; devices: {jax.devices()}", flush=True)

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

  tick = time.perf_counter()
  teacher_vars = train_teacher(
      teacher_apply, teacher.init(jax.random.PRNGKey(0), train_x[:2]), ce_only,
      data["train"], epochs=args.teacher_epochs, batch_size=args.batch_size,
      lr=2e-3, seed=0)
  times = {"teacher": time.perf_counter() - tick}
  teacher_report = train.evaluate(train.make_eval_step(teacher_apply),
                                  teacher_vars, None, eval_batches(*data["test"]))
  print(f"teacher: test accuracy {teacher_report['student_accuracy']:.4f} "
        f"({times['teacher']:.0f} s)", flush=True)

  regimes = [("full", len(train_y), args.full_epochs)]
  if args.subset_size:
    regimes.append((f"{100 * args.subset_size / len(train_y):.0f}% subset",
                    args.subset_size, args.subset_epochs))
  eval_step = train.make_eval_step(student_apply, teacher_apply)
  workdir = args.workdir or tempfile.mkdtemp(prefix="kdjax_main_")
  results = {}
  for regime, size, epochs in regimes:
    subset = np.random.default_rng(1234).permutation(len(train_y))[:size]
    subset.sort()
    tick = time.perf_counter()
    teacher_cache = cache.build_teacher_cache(
        os.path.join(workdir, f"cache_{size}"), teacher_apply, teacher_vars,
        {"image": train_x[subset], "label": train_y[subset]},
        batch_size=1000, overwrite=True)
    times[f"cache {regime}"] = time.perf_counter() - tick
    for seed in args.seeds:
      init = student.init(jax.random.PRNGKey(100 + seed), train_x[:2])
      for name, distill in (("alone", False), ("distilled", True)):
        tick = time.perf_counter()
        student_vars = train_student(
            student_apply, init, kd if distill else ce_only, teacher_cache,
            distill=distill, epochs=epochs, batch_size=args.batch_size,
            lr=2e-3, seed=seed)
        elapsed = time.perf_counter() - tick
        report = train.evaluate(eval_step, student_vars, teacher_vars,
                                eval_batches(*data["test"]))
        results.setdefault((regime, name), []).append(
            {"seed": seed, "accuracy": report["student_accuracy"],
             "agreement": report["agreement"], "time_s": elapsed})
      r = {n: results[(regime, n)][-1]["accuracy"] for n in ("alone", "distilled")}
      print(f"{regime:>10} seed {seed}: alone {r['alone']:.4f}  distilled "
            f"{r['distilled']:.4f}", flush=True)

  n_t, n_s = param_count(teacher_vars), param_count(init)

  def mean_std(values):
    v = 100 * np.asarray(values)
    return (f"{v.mean():.2f}" if len(v) == 1 else
            f"{v.mean():.2f} ± {v.std(ddof=1):.2f}")

  print()
  print(f"Fashion-MNIST test accuracy (%), mean ± std over seeds {args.seeds}; "
        f"KD: {1 - args.kd_weight:.1f} CE + {args.kd_weight:.1f} T^2 KL, "
        f"T = {args.temperature:g}")
  print(f"teacher CNN ({n_t:,} params, {args.teacher_epochs} epochs on 60,000 "
        f"images): {100 * teacher_report['student_accuracy']:.2f}")
  print(f"student MLP: {n_s:,} params ({n_t / n_s:.1f}x fewer)")
  print()
  print("| training set              | student alone   | student distilled | gain (points)  "
        "| agreement alone / distilled |")
  print("|---------------------------|-----------------|-------------------|----------------"
        "|-----------------------------|")
  summary = []
  for regime, size, epochs in regimes:
    alone = [r["accuracy"] for r in results[(regime, "alone")]]
    dist = [r["accuracy"] for r in results[(regime, "distilled")]]
    gains = np.asarray(dist) - np.asarray(alone)
    agree = (mean_std([r["agreement"] for r in results[(regime, "alone")]]),
             mean_std([r["agreement"] for r in results[(regime, "distilled")]]))
    label = f"{regime} ({size:,}, {epochs} ep)"
    print(f"| {label:<25} | {mean_std(alone):>15} | {mean_std(dist):>17} | "
          f"{mean_std(gains):>14} | {agree[0] + ' / ' + agree[1]:>27} |")
    summary.append({"regime": regime, "size": size, "epochs": epochs,
                    "alone": alone, "distilled": dist})
  total = time.perf_counter() - t0
  print("\ntimes (s): " + ", ".join(f"{k} {v:.0f}" for k, v in times.items())
        + f"; students {sum(r['time_s'] for v in results.values() for r in v):.0f}"
        f"; total {total:.0f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "teacher_accuracy":
                 teacher_report["student_accuracy"], "teacher_params": n_t,
                 "student_params": n_s, "regimes": summary,
                 "total_time_s": total}, f, indent=2)
  return summary


if __name__ == "__main__":
  main()
