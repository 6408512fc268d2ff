"""Deployment table: size, test accuracy and latency (batch 1 and 256) of exported models.

Trains a student MLP (784-128-10) and a CNN (the teacher shape, conv 32-64,
dense 256) briefly on the real Fashion-MNIST
(``kdjax.data.load_fashion_mnist_split``), exports each
(``kdjax.compress.export_for_inference``: serialized jax.export + ``.npz``)
as float32 and in the int8 variants below, loads every artifact as a
kdjax-free program would (``jax.export.deserialize``), measures its accuracy
on the 10,000 test images and times warm calls at batch 1 and 256::

  float32            the float model
  w8a8 dequantise    int8 weights dequantised in the artifact (W = q_w s_w),
                     fake-quantised activations, float32 matmuls (the old path)
  w8a8 int8          s8 x s8 -> s32 dot_general, dynamic per-example
                     activation scale, y = s_x[b] s_w[n] acc + bias
                     (convolutions as conv_general_dilated s8 -> s32 from 32
                     channels, else im2col + dot); layers with a contraction
                     depth K < 64 (the CNN's first conv, K = 9) stay
                     dequantise-first (the default int8_min_depth)
  w8a8 int8, im2col        every conv as im2col + s8 dot
  w8a8 int8, every layer   int8_min_depth=1 (conv_0 too)
  w4 (weights only), pruned 90% (magnitude, after training, no fine-tuning;
                     zeros stored densely, "deflated" = np.savez_compressed)

The timings are interleaved: ``--rounds`` rounds, each visiting every
(artifact, batch) once in a random order (one untimed call, then a slice of
its timed calls), so that load from other processes and cache effects spread
over all variants; the table shows the median call::

  python benchmarks/bench_deploy.py [--epochs 2] [--cnn-epochs 1] [--rounds 20]

XLA flags (``XLA_FLAGS``) are printed; on a GPU machine the same script
times the ``cuda`` lowering.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax import compress
from kdjax import data
from kdjax import models

IMAGE_SHAPE = (28, 28, 1)
BATCHES = (1, 256)
W8A8 = compress.QuantConfig(8, 8)


def compressed_size(directory: str) -> int:
  with np.load(os.path.join(directory, "params.npz")) as z:
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: z[k] for k in z.files})
  return buf.tell()


def load_split(split: str, limit: int = 0):
  images, labels = data.load_fashion_mnist_split(split)
  if limit:
    images, labels = images[:limit], labels[:limit]
  x = (images.astype(np.float32) / 255.0 - data.FASHION_MNIST_MEAN) / (
      data.FASHION_MNIST_STD)
  return x[..., None].astype(np.float32), labels


def train(module, x, y, *, epochs: int, seed: int, batch: int = 128,
          lr: float = 1e-3):
  """Plain Adam on cross-entropy: a briefly trained model, not a tuned one."""
  variables = module.init(jax.random.PRNGKey(seed), x[:1])
  opt = optax.adam(lr)
  params = variables["params"]
  state = opt.init(params)

  @jax.jit
  def step(params, state, xb, yb):
    def loss(p):
      logits = module.apply({"params": p}, xb)
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    g = jax.grad(loss)(params)
    updates, state = opt.update(g, state, params)
    return optax.apply_updates(params, updates), state

  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    order = rng.permutation(len(x))
    for i in range(0, len(x) - batch + 1, batch):
      idx = order[i:i + batch]
      params, state = step(params, state, x[idx], y[idx])
  return jax.device_get({"params": params})


class Artifact:
  """A deserialized export, called as a kdjax-free loader would."""

  def __init__(self, directory: str):
    with open(os.path.join(directory, "export.json")) as f:
      self.manifest = json.load(f)
    with open(os.path.join(directory, "model.jaxexport"), "rb") as f:
      exported = jax.export.deserialize(bytearray(f.read()))
    with np.load(os.path.join(directory, "params.npz")) as z:
      self.arrays = [jnp.asarray(z[k]) for k in self.manifest["array_keys"]]
    self.fn = jax.jit(exported.call)

  def __call__(self, x):
    return self.fn(*self.arrays, x)

  def accuracy(self, x, y, chunk: int = 1000) -> float:
    hits = 0
    for i in range(0, len(x), chunk):
      logits = np.asarray(self(jnp.asarray(x[i:i + chunk])))
      hits += int((logits.argmax(-1) == y[i:i + chunk]).sum())
    return 100.0 * hits / len(x)


def describe(manifest: dict) -> str:
  """``"int8: conv_1, dense, head"`` / ``"dequantize"`` / ``"float"``."""
  layers = manifest.get("int8_layers") or []
  if not layers:
    return manifest["compute"]
  return f"{manifest['compute']}: {', '.join(layers)}"


def interleaved_ms(calls: dict, counts: dict, rounds: int,
                   warmup: int, seed: int = 0) -> dict:
  """Median ms per call of each ``calls[key]()``, timed in interleaved rounds.

  Each round visits every key once, in a fresh random order; a visit makes
  one untimed call (caches and threads warm after the previous artifact),
  then times ``counts[key] // rounds`` calls.
  """
  for key, fn in calls.items():
    for _ in range(warmup):
      fn().block_until_ready()
  keys = list(calls)
  times = {k: [] for k in keys}
  rng = np.random.default_rng(seed)
  for _ in range(rounds):
    for j in rng.permutation(len(keys)):
      key = keys[j]
      fn = calls[key]
      fn().block_until_ready()
      for _ in range(max(1, counts[key] // rounds)):
        t = time.perf_counter()
        fn().block_until_ready()
        times[key].append(time.perf_counter() - t)
  return {k: 1e3 * float(np.median(v)) for k, v in times.items()}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--epochs", type=int, default=2, help="MLP training epochs")
  p.add_argument("--cnn-epochs", type=int, default=1)
  p.add_argument("--train-examples", type=int, default=0,
                 help="0: all 60,000")
  p.add_argument("--rounds", type=int, default=20)
  p.add_argument("--runs", type=int, default=400,
                 help="timed batch-1 calls per artifact (over all rounds)")
  p.add_argument("--runs-large", type=int, default=60,
                 help="timed batch-256 calls per artifact")
  p.add_argument("--warmup", type=int, default=10)
  p.add_argument("--sparsity", type=float, default=0.9)
  p.add_argument("--skip-cnn", action="store_true")
  p.add_argument("--out", default=None, help="export directory (default: temp)")
  args = p.parse_args(argv)
  compress.check_sparsity(args.sparsity)
  root = args.out or tempfile.mkdtemp(prefix="kdjax_deploy_")
  platform = jax.devices()[0].platform
  x_train, y_train = load_split("train", args.train_examples)
  x_test, y_test = load_split("test")

  t0 = time.time()
  student = models.MLP(hidden=(128,), num_classes=10)
  sv = train(student, x_train, y_train, epochs=args.epochs, seed=1)
  entries = []
  mlp = "student MLP 784-128-10"
  entries += [
      (f"{mlp} float32", student, sv, None, {}),
      (f"{mlp} w8a8 dequantise", student, sv, W8A8,
       {"compute": "dequantize"}),
      (f"{mlp} w8a8 int8", student, sv, W8A8, {}),
      (f"{mlp} w4 (weights only)", student, sv, compress.QuantConfig(4, None),
       {}),
      (f"{mlp} pruned {100 * args.sparsity:.0f}%", student,
       {"params": compress.prune_params(sv["params"], args.sparsity,
                                        exclude=("head",))}, None, {}),
  ]
  if not args.skip_cnn:
    cnn = models.CNN(channels=(32, 64), dense=256, num_classes=10)
    cv = train(cnn, x_train, y_train, epochs=args.cnn_epochs, seed=0)
    entries += [
        ("CNN 32-64-256 float32", cnn, cv, None, {}),
        ("CNN w8a8 dequantise", cnn, cv, W8A8, {"compute": "dequantize"}),
        ("CNN w8a8 int8", cnn, cv, W8A8, {}),
        ("CNN w8a8 int8, im2col", cnn, cv, W8A8, {"compute": "int8_im2col"}),
        ("CNN w8a8 int8, every layer", cnn, cv, W8A8, {"int8_min_depth": 1}),
    ]
  train_s = time.time() - t0

  rows, calls, counts = [], {}, {}
  rng = np.random.default_rng(0)
  inputs = {b: jnp.asarray(x_test[rng.choice(len(x_test), b, replace=False)])
            for b in BATCHES}
  for i, (name, module, variables, q, options) in enumerate(entries):
    d = os.path.join(root, f"m{i}")
    compress.export_for_inference(
        models.from_linen(module, train_kwarg="train"), variables, d,
        input_shape=IMAGE_SHAPE, quantize=q, platforms=(platform,),
        overwrite=True, **options)
    art = Artifact(d)
    n = sum(int(np.size(v)) for v in jax.tree.leaves(variables["params"]))
    size = compress.directory_size(d) - os.path.getsize(
        os.path.join(d, "run_exported.py"))
    rows.append((name, n, size, compressed_size(d),
                 art.accuracy(x_test, y_test), describe(art.manifest)))
    for b in BATCHES:
      calls[(i, b)] = (lambda a, x: lambda: a(x))(art, inputs[b])
      counts[(i, b)] = args.runs if b == 1 else args.runs_large
  ms = interleaved_ms(calls, counts, args.rounds, args.warmup)

  print(f"platform {platform}, {jax.device_count()} device(s), jax "
        f"{jax.__version__}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
        f"trained {train_s:.0f} s; median call of {args.runs} (batch 1) / "
        f"{args.runs_large} (batch 256), {args.rounds} interleaved rounds\n")
  print("| model | compute | params | artifact + .npz (KiB) | .npz deflated "
        "(KiB) | test acc (%) | batch 1 (ms) | batch 256 (ms) | "
        "batch 256 vs float |")
  print("|---|---|---|---|---|---|---|---|---|")
  base = None
  for i, (name, n, size, deflated, acc, compute) in enumerate(rows):
    if name.endswith("float32"):
      base = ms[(i, 256)]
    print(f"| {name} | {compute} | {n:,} | {size / 1024:.1f} | "
          f"{deflated / 1024:.1f} | {acc:.2f} | {ms[(i, 1)]:.3f} | "
          f"{ms[(i, 256)]:.3f} | {base / ms[(i, 256)]:.2f}x |", flush=True)


if __name__ == "__main__":
  main()
