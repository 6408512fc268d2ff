"""2x2 max pooling on XLA:CPU: ``nn.max_pool`` against ``kdjax.models.max_pool_2x2``.

Prints a table of jitted forward and backward (``jax.grad`` of the sum) times
in ms, best of 3 rounds of ``--calls`` calls, for the activation shapes of the
reference CNNs at batch 128 (the student 8-16's and the teacher 32-64's)::

  python benchmarks/bench_pool.py
"""

from __future__ import annotations

import argparse
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdjax import models

SHAPES = ((128, 28, 28, 8), (128, 14, 14, 16), (128, 28, 28, 32), (128, 14, 14, 64))


def best_ms(fn, x, calls: int) -> float:
  fn = jax.jit(fn)
  jax.block_until_ready(fn(x))
  times = []
  for _ in range(3):
    tick = time.perf_counter()
    for _ in range(calls):
      out = fn(x)
    jax.block_until_ready(out)
    times.append((time.perf_counter() - tick) / calls * 1e3)
  return min(times)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--calls", type=int, default=50)
  args = p.parse_args(argv)
  flax_pool = lambda v: nn.max_pool(v, (2, 2), strides=(2, 2))
  ours = models.max_pool_2x2
  print(f"{jax.devices()[0].platform}, {jax.device_count()} device(s)")
  print("| shape | forward nn.max_pool | forward max_pool_2x2 | backward nn.max_pool "
        "| backward max_pool_2x2 |")
  print("|---|---|---|---|---|")
  for shape in SHAPES:
    x = jnp.asarray(np.random.default_rng(0).random(shape, np.float32))
    row = [best_ms(f, x, args.calls) for f in (
        flax_pool, ours, jax.grad(lambda v: flax_pool(v).sum()),
        jax.grad(lambda v: ours(v).sum()))]
    print(f"| {list(shape)} | " + " | ".join(f"{t:.2f}" for t in row) + " |")


if __name__ == "__main__":
  main()
