"""Compression with distillation on the real Fashion-MNIST (issue 11).

1. trains a teacher CNN on the labels, caches its logits once over the
   student's training set (``kdjax.cache``);
2. quantisation: a student MLP trained alone and distilled (``0.5 CE + 0.5 T^2
   KL``, T = 2), each evaluated in float32 and post-training quantised (PTQ:
   w8a8 = int8 per-channel weights + int8 per-example activations; w4 = int4
   weights); the same student trained quantisation-aware (QAT,
   ``kdjax.compress.quantize_apply``: fake-quant with straight-through
   gradients) alone and distilled;
3. pruning: the student pruned to sparsity s in {0, .5, .8, .9, .95}
   of the hidden kernels (unstructured magnitude and structured neuron pruning,
   Zhu & Gupta's cubic schedule from 10% to 60% of training,
   ``kdjax.compress.prune``; the classifier stays dense) alone and distilled:
   a table and ``sparsity.png``.

Test accuracy (%) on the 10,000 test images, mean ± std over seeds::

  python experiments/compression_kd.py                 # 3 seeds (a few minutes on 2 CPU cores)
  python experiments/compression_kd.py --smoke         # seconds: plumbing only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time


import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax import cache
from kdjax import compress
from kdjax import losses
from kdjax import models
from kdjax import train
from kdjax.data import load_fashion_mnist_split

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# The main job's batchers (one copy of the shuffling and evaluation order).
from fashion_mnist_teacher import epoch_batches  # noqa: E402  pylint: disable=g-import-not-at-top
from fashion_mnist_teacher import eval_batches  # noqa: E402  pylint: disable=g-import-not-at-top

MEAN, STD = 0.2860, 0.3530


def load(data_dir, max_test=None):
  out = {}
  for split in ("train", "test"):
    images, labels = load_fashion_mnist_split(split, data_dir)
    images = ((images.astype(np.float32) / 255.0 - MEAN) / STD)[..., None]
    if split == "test" and max_test:
      images, labels = images[:max_test], labels[:max_test]
    out[split] = (images, labels)
  return out


def accuracy(apply, variables, test) -> float:
  return 100 * train.evaluate(train.make_eval_step(apply), variables, None,
                              eval_batches(*test))["student_accuracy"]


def mean_std(values) -> str:
  v = np.asarray(values, np.float64)
  return f"{v.mean():.2f}" if len(v) == 1 else f"{v.mean():.2f} ± {v.std(ddof=1):.2f}"


def train_teacher(data, args):
  images, labels = data["train"]
  if args.teacher_examples:
    images, labels = images[:args.teacher_examples], labels[:args.teacher_examples]
  module = models.CNN(channels=(16, 32), dense=128, num_classes=10)
  apply = models.from_linen(module, train_kwarg="train")
  ce = losses.compose([losses.Term("ce", losses.label_term(), 1.0,
                                   needs_teacher=False)])
  steps = args.teacher_epochs * (len(labels) // args.batch_size)
  opt = optax.adamw(optax.cosine_decay_schedule(2e-3, steps), weight_decay=1e-4)
  state = train.create_state(module.init(jax.random.PRNGKey(0), images[:2]),
                             opt, rng=jax.random.PRNGKey(0))
  step = train.make_train_step(apply, None, ce, opt)
  rng = np.random.default_rng(0)
  for _ in range(args.teacher_epochs):
    state, _ = train.fit(step, state, None,
                         epoch_batches(images, labels, args.batch_size, rng),
                         log_every=10_000)
  return module, apply, state.student_variables()


def train_student(apply, init, objective, tc, *, distill, args, seed,
                  prune=None):
  """Trains from the cache's batches; ``prune = (sparsity, structured)``."""
  steps = args.epochs * (tc.num_examples // args.batch_size)
  opt = optax.adamw(optax.cosine_decay_schedule(args.lr, steps),
                    weight_decay=1e-4)
  if prune is not None and prune[0] > 0:
    schedule = compress.sparsity_schedule(
        prune[0], begin_step=int(0.1 * steps), end_step=max(int(0.6 * steps), int(0.1 * steps) + 1))
    # The classifier stays dense (structured pruning of its outputs would
    # delete classes); the sparsity is that of the hidden kernels.
    opt = optax.chain(opt, compress.prune(schedule, structured=prune[1],
                                          frequency=args.prune_every,
                                          exclude=("head",)))
  state = train.create_state(jax.tree.map(jnp.copy, init), opt,
                             rng=jax.random.PRNGKey(seed))
  if distill:
    step = cache.make_cached_train_step(apply, tc, objective, opt)
  else:
    step = train.make_train_step(apply, None, objective, opt)
  for epoch in range(args.epochs):
    state, _ = train.fit(step, state, None,
                         tc.batches(args.batch_size, shuffle=True, seed=seed,
                                    epoch=epoch), log_every=10_000)
  return state.student_variables()


def plot(curves, sparsities, path):
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("(matplotlib missing: no PNG; pip install matplotlib)")
    return
  fig, ax = plt.subplots(figsize=(6, 4))
  for (kind, mode), accs in sorted(curves.items()):
    a = np.asarray(accs)  # [sparsity, seed]
    x = 100 * np.asarray(sparsities)
    ax.errorbar(x, a.mean(1), yerr=a.std(1, ddof=1) if a.shape[1] > 1 else None,
                marker="o", capsize=3, label=f"{kind}, {mode}",
                linestyle="-" if mode == "distilled" else "--")
  ax.set_xlabel("sparsity of the hidden kernels (%)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_title("Fashion-MNIST student MLP: pruned alone vs pruned + KD")
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--data-dir", default=None)
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--teacher-epochs", type=int, default=2)
  p.add_argument("--teacher-examples", type=int, default=0,
                 help="train the teacher on the first N images (0: all)")
  p.add_argument("--train-examples", type=int, default=6000,
                 help="the students' training subset (from the 60,000)")
  p.add_argument("--epochs", type=int, default=8)
  p.add_argument("--hidden", type=int, nargs="+", default=[128])
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--lr", type=float, default=2e-3)
  p.add_argument("--temperature", type=float, default=2.0)
  p.add_argument("--kd-weight", type=float, default=0.5)
  p.add_argument("--sparsities", type=float, nargs="+",
                 default=[0.0, 0.5, 0.8, 0.9, 0.95])
  p.add_argument("--prune-every", type=int, default=10)
  p.add_argument("--max-test", type=int, default=0)
  p.add_argument("--out", default="runs/compression")
  p.add_argument("--smoke", action="store_true", help="a tiny run")
  args = p.parse_args(argv)
  if args.smoke:
    args.seeds, args.teacher_epochs, args.teacher_examples = [0], 1, 2048
    args.train_examples, args.epochs, args.sparsities = 512, 1, [0.0, 0.9]
    args.max_test, args.prune_every = 1000, 1
  for s in args.sparsities:
    compress.check_sparsity(s)
  os.makedirs(args.out, exist_ok=True)
  t0 = time.perf_counter()
  data = load(args.data_dir, args.max_test)
  teacher, teacher_apply, teacher_vars = train_teacher(data, args)
  teacher_acc = accuracy(teacher_apply, teacher_vars, data["test"])
  print(f"teacher CNN: {teacher_acc:.2f}% ({time.perf_counter() - t0:.0f} s)",
        flush=True)

  train_x, train_y = data["train"]
  subset = np.sort(np.random.default_rng(1234).permutation(len(train_y))
                   [:args.train_examples])
  tc = cache.build_teacher_cache(
      tempfile.mkdtemp(prefix="kdjax_compress_"), teacher_apply, teacher_vars,
      {"image": train_x[subset], "label": train_y[subset]}, batch_size=1000,
      overwrite=True)
  student = models.MLP(hidden=tuple(args.hidden), num_classes=10)
  apply = models.from_linen(student, train_kwarg="train")
  ce = losses.compose([losses.Term("ce", losses.label_term(), 1.0,
                                   needs_teacher=False)])
  kd = losses.compose(
      [losses.Term("ce", losses.label_term(), 1 - args.kd_weight,
                   needs_teacher=False),
       losses.Term("kd", losses.logit_term(losses.kl_divergence),
                   args.kd_weight)], temperature=args.temperature)
  quants = {"w8a8": compress.QuantConfig(8, 8),
            "w4": compress.QuantConfig(4, None)}
  qapply = {n: compress.quantize_apply(apply, q) for n, q in quants.items()}

  rows = {}        # (training, evaluation) -> [acc per seed]
  curves = {}      # (kind, mode) -> [[acc per seed] per sparsity]
  for seed in args.seeds:
    init = student.init(jax.random.PRNGKey(100 + seed), train_x[:2])
    for mode, distill in (("alone", False), ("distilled", True)):
      obj = kd if distill else ce
      v = train_student(apply, init, obj, tc, distill=distill, args=args,
                        seed=seed)
      rows.setdefault((f"float, {mode}", "float32"), []).append(
          accuracy(apply, v, data["test"]))
      for name in quants:
        rows.setdefault((f"float, {mode}", f"PTQ {name}"), []).append(
            accuracy(qapply[name], v, data["test"]))
      for name in quants:
        vq = train_student(qapply[name], init, obj, tc, distill=distill,
                           args=args, seed=seed)
        rows.setdefault((f"QAT {name}, {mode}", name), []).append(
            accuracy(qapply[name], vq, data["test"]))
      for kind, structured in (("unstructured", False), ("structured", True)):
        accs = curves.setdefault((kind, mode), [[] for _ in args.sparsities])
        for i, s in enumerate(args.sparsities):
          if s == 0 and kind == "structured" and curves.get(("unstructured", mode)):
            accs[i].append(curves[("unstructured", mode)][i][-1])
            continue
          vp = train_student(apply, init, obj, tc, distill=distill, args=args,
                             seed=seed, prune=(s, structured))
          accs[i].append(accuracy(apply, vp, data["test"]))
    print(f"seed {seed} done ({time.perf_counter() - t0:.0f} s)", flush=True)

  lines = [f"Fashion-MNIST, student MLP {[784, *args.hidden, 10]} on "
           f"{args.train_examples} training images, {args.epochs} epochs; "
           f"teacher CNN {teacher_acc:.2f}%; KD {1 - args.kd_weight:g} CE + "
           f"{args.kd_weight:g} T^2 KL at T = {args.temperature:g}; seeds "
           f"{args.seeds}; test accuracy (%) on {len(data['test'][1])} images",
           "", "| student (training) | evaluated as | accuracy |",
           "|---|---|---|"]
  for (training, evaluation), accs in rows.items():
    lines.append(f"| {training} | {evaluation} | {mean_std(accs)} |")
  lines += ["", "| pruning | " + " | ".join(f"{100 * s:.0f}%" for s in
                                             args.sparsities) + " |",
            "|---|" + "---|" * len(args.sparsities)]
  for (kind, mode), accs in sorted(curves.items()):
    lines.append(f"| {kind}, {mode} | " + " | ".join(mean_std(a) for a in accs)
                 + " |")
  text = "\n".join(lines)
  print("\n" + text)
  with open(os.path.join(args.out, "compression.md"), "w") as f:
    f.write(text + "\n")
  with open(os.path.join(args.out, "compression.json"), "w") as f:
    json.dump({"args": vars(args), "teacher_accuracy": teacher_acc,
               "rows": [{"training": t, "evaluation": e, "accuracy": a}
                        for (t, e), a in rows.items()],
               "sparsity": [{"kind": k, "mode": m, "sparsities": args.sparsities,
                             "accuracy": a} for (k, m), a in curves.items()],
               "time_s": time.perf_counter() - t0}, f, indent=1)
  plot(curves, args.sparsities, os.path.join(args.out, "sparsity.png"))
  print(f"\nwrote {args.out}/compression.md, compression.json, sparsity.png "
        f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
  main()
