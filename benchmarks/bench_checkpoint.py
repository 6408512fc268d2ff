"""Save/restore times of kdjax.checkpoint for a ~10M-parameter distillation state.

The state is a :class:`kdjax.train.DistillState` of an MLP student
(784-2048-2048-2048-10, 10.0M params) with adam (params + 2 moments: ~30M
float32, ~120 MB). Reported, median over ``--repeats``:

* sync save: ``save()`` with ``async_save=False`` (returns once committed);
* async save, blocking: what ``save()`` costs the step loop with
  ``async_save=True`` (device->host copy + checksums);
* async save, until committed: blocking part + background write;
* async save, blocking, without checksums (``checksums=False``);
* restore: ``restore()`` into a template, with and without checksum
  verification;
* checksums alone (``tree_checksums`` over the state).

Usage::

  python benchmarks/bench_checkpoint.py [--repeats 3] [--dir /tmp/x]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import optax

from kdjax import checkpoint as kc
from kdjax import models
from kdjax import train


def build_state(hidden):
  model = models.MLP(hidden=hidden, num_classes=10)
  optimizer = optax.adam(1e-3)

  @jax.jit
  def init():
    variables = model.init(jax.random.PRNGKey(0), jnp.zeros((1, 784)))
    return train.create_state(variables, optimizer, rng=jax.random.key(1))

  state = init()
  jax.block_until_ready(state)
  return state


def _median_ms(values):
  return 1e3 * statistics.median(values)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--dir", default=None,
                      help="scratch directory (default: a temporary one)")
  parser.add_argument("--hidden", type=int, nargs="+", default=[2048] * 3)
  args = parser.parse_args()

  state = build_state(tuple(args.hidden))
  n_params = sum(x.size for x in jax.tree.leaves(state.params))
  n_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state)
                if not jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key))
  root = args.dir or tempfile.mkdtemp(prefix="kdjax_bench_ckpt_")
  template = jax.tree.map(jnp.zeros_like, state)
  rows = {}

  kc.tree_checksums(state)  # compile once
  rows["checksums alone"] = [
      _timed(lambda: kc.tree_checksums(state)) for _ in range(args.repeats)]

  sync_dir = f"{root}/sync"
  with kc.DistillCheckpointer(sync_dir, save_every=1, keep_last=2,
                              async_save=False) as ckpt:
    ckpt.save(state, step=0)  # warm-up (orbax and jit caches)
    rows["sync save"] = [_timed(lambda s=s: ckpt.save(state, step=s))
                         for s in range(1, args.repeats + 1)]

  async_dir = f"{root}/async"
  blocking, committed = [], []
  with kc.DistillCheckpointer(async_dir, save_every=1, keep_last=2,
                              async_save=True) as ckpt:
    ckpt.save(state, step=0)
    ckpt.wait_until_finished()
    for s in range(1, args.repeats + 1):
      start = time.perf_counter()
      ckpt.save(state, step=s)
      blocking.append(time.perf_counter() - start)
      ckpt.wait_until_finished()
      committed.append(time.perf_counter() - start)
  rows["async save, blocking"] = blocking
  rows["async save, until committed"] = committed

  blocking = []
  with kc.DistillCheckpointer(f"{root}/async_nosum", save_every=1, keep_last=2,
                              async_save=True, checksums=False) as ckpt:
    ckpt.save(state, step=0)
    ckpt.wait_until_finished()
    for s in range(1, args.repeats + 1):
      start = time.perf_counter()
      ckpt.save(state, step=s)
      blocking.append(time.perf_counter() - start)
      ckpt.wait_until_finished()
  rows["async save, blocking, no checksums"] = blocking

  with kc.DistillCheckpointer(sync_dir) as ckpt:
    ckpt.restore(template)  # warm-up
    rows["restore (verify checksums)"] = [
        _timed(lambda: jax.block_until_ready(ckpt.restore(template).state))
        for _ in range(args.repeats)]
    rows["restore (no verify)"] = [
        _timed(lambda: jax.block_until_ready(
            ckpt.restore(template, verify=False).state))
        for _ in range(args.repeats)]
  if args.dir is None:
    shutil.rmtree(root, ignore_errors=True)

  device = jax.devices()[0]
  print(f"kdjax.checkpoint: {n_params / 1e6:.2f}M params, state "
        f"{n_bytes / 2**20:.0f} MiB (params + adam moments), "
        f"{device.platform} ({device.device_kind}), median of {args.repeats}")
  print(f"| {'operation':<36} | {'time (ms)':>10} |")
  print(f"|{'-' * 38}|{'-' * 12}|")
  for name, values in rows.items():
    print(f"| {name:<36} | {_median_ms(values):>10.1f} |")


def _timed(fn) -> float:
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


if __name__ == "__main__":
  main()
