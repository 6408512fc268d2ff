"""Deployment table: size on disk and batch-1 latency of exported models (issue 11).

Exports (``kdjax.compress.export_for_inference``: serialized jax.export +
``.npz``) the teacher CNN, the float student MLP, the int8 student (w8a8:
int8 per-channel weights stored as int8, int8 activations) and a pruned
student (90% unstructured; the zeros are stored densely: an .npz compressed
with ``np.savez_compressed`` shows what sparse storage would save), then
loads each artifact as a kdjax-free program would (``jax.export.deserialize``)
and times a batch of 1 (median of ``--runs`` warm calls, after ``--warmup``).
Weights are random (size and latency do not depend on training)::

  python benchmarks/bench_deploy.py [--runs 500]

On a GPU machine the same script times the ``cuda`` lowering.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import compress
from kdjax import models

IMAGE_SHAPE = (28, 28, 1)


def compressed_size(directory: str) -> int:
  with np.load(os.path.join(directory, "params.npz")) as z:
    buf = io.BytesIO()
    np.savez_compressed(buf, **{k: z[k] for k in z.files})
  return buf.tell()


def time_artifact(directory: str, runs: int, warmup: int) -> float:
  """Median batch-1 latency (ms) of the deserialized artifact, warm."""
  with open(os.path.join(directory, "model.jaxexport"), "rb") as f:
    exported = jax.export.deserialize(bytearray(f.read()))
  with np.load(os.path.join(directory, "params.npz")) as z:
    arrays = [jnp.asarray(z[k]) for k in sorted(z.files)]
  fn = jax.jit(exported.call)
  x = jnp.asarray(np.random.default_rng(0).standard_normal((1, *IMAGE_SHAPE)),
                  jnp.float32)
  for _ in range(warmup):
    fn(*arrays, x).block_until_ready()
  times = []
  for _ in range(runs):
    t = time.perf_counter()
    fn(*arrays, x).block_until_ready()
    times.append(time.perf_counter() - t)
  return 1e3 * float(np.median(times))


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--runs", type=int, default=500)
  p.add_argument("--warmup", type=int, default=50)
  p.add_argument("--sparsity", type=float, default=0.9)
  p.add_argument("--out", default=None, help="export directory (default: temp)")
  args = p.parse_args(argv)
  compress.check_sparsity(args.sparsity)
  root = args.out or tempfile.mkdtemp(prefix="kdjax_deploy_")
  platform = jax.devices()[0].platform
  x0 = jnp.zeros((1, *IMAGE_SHAPE))
  teacher = models.CNN(channels=(32, 64), dense=256, num_classes=10)
  student = models.MLP(hidden=(128,), num_classes=10)
  tv = teacher.init(jax.random.PRNGKey(0), x0)
  sv = student.init(jax.random.PRNGKey(1), x0)
  pruned = {"params": compress.prune_params(sv["params"], args.sparsity,
                                            exclude=("head",))}
  entries = [
      ("teacher CNN", teacher, tv, None),
      ("student MLP float32", student, sv, None),
      ("student MLP int8 (w8a8)", student, sv, compress.QuantConfig(8, 8)),
      ("student MLP int4 weights (w4)", student, sv, compress.QuantConfig(4, None)),
      (f"student MLP pruned {100 * args.sparsity:.0f}%", student, pruned, None),
  ]
  print(f"platform {platform}, {jax.device_count()} device(s); batch 1, median "
        f"of {args.runs} warm runs\n")
  print("| model | params | artifact + .npz (KiB) | .npz deflated (KiB) | "
        "batch-1 latency (ms) |")
  print("|---|---|---|---|---|")
  for i, (name, module, variables, q) in enumerate(entries):
    d = os.path.join(root, f"m{i}")
    compress.export_for_inference(
        models.from_linen(module, train_kwarg="train"), variables, d,
        input_shape=IMAGE_SHAPE, quantize=q, platforms=(platform,),
        overwrite=True)
    n = sum(int(np.size(v)) for v in jax.tree.leaves(variables["params"]))
    size = compress.directory_size(d) - os.path.getsize(
        os.path.join(d, "run_exported.py"))
    ms = time_artifact(d, args.runs, args.warmup)
    print(f"| {name} | {n:,} | {size / 1024:.1f} | "
          f"{compressed_size(d) / 1024:.1f} | {ms:.3f} |", flush=True)


if __name__ == "__main__":
  main()
