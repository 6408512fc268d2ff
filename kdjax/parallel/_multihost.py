"""Multi-host (multi-process) runs: initialisation, per-process data, global batches.

Each process runs the same program on its own devices. The recipe::

  kdjax.parallel.initialize(coordinator, num_processes, process_id)
  mesh = kdjax.parallel.make_mesh({"data": jax.device_count()})  # global devices
  rules = kdjax.parallel.ShardingRules.data_parallel()
  # each process reads only its part of the data ...
  ds = kdjax.parallel.load_tfds_for_process("mnist", "train")  # or process_slice
  # ... and the global batch is assembled without moving data between hosts:
  batch = kdjax.parallel.global_batch(local_batch, mesh, rules)
  state, metrics = step(state, teacher, batch)

The per-process batch is ``global_batch_size / jax.process_count()`` examples;
process ``i`` holds the ``i``-th block of the global batch (the order
``jax.make_array_from_process_local_data`` uses for a batch split over the
mesh's devices in process order).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import numpy as np
from jax.sharding import Mesh

from kdjax.parallel import _mesh
from kdjax.parallel._mesh import ShardingRules


def initialize(coordinator_address: Optional[str] = None,
               num_processes: Optional[int] = None,
               process_id: Optional[int] = None,
               *,
               local_device_ids: Optional[Sequence[int]] = None,
               cpu_collectives: Optional[str] = "gloo",
               **kwargs: Any) -> None:
  """``jax.distributed.initialize`` with CPU collectives configured.

  Call once per process, before any other JAX call. On CPU, cross-process
  collectives need an implementation (``"gloo"``, or ``"mpi"``); it is set
  with ``jax.config.update("jax_cpu_collectives_implementation", ...)``
  before the backend starts (it does not affect GPU/TPU backends). On managed
  clusters (TPU pods, SLURM) the arguments may be omitted: JAX detects them.

  Args:
    coordinator_address: ``"host:port"`` of process 0.
    num_processes: number of processes.
    process_id: this process's index in ``[0, num_processes)``.
    local_device_ids: the devices this process uses (GPU hosts).
    cpu_collectives: ``"gloo"``, ``"mpi"`` or ``None`` (leave the setting).
    **kwargs: passed to ``jax.distributed.initialize``.
  """
  if cpu_collectives is not None:
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes,
                             process_id=process_id,
                             local_device_ids=local_device_ids, **kwargs)


def process_slice(num_examples: int,
                  *,
                  process_index: Optional[int] = None,
                  process_count: Optional[int] = None,
                  drop_remainder: bool = True) -> slice:
  """This process's contiguous block of ``num_examples`` (in-memory datasets).

  The equivalent of ``tfds.split_for_jax_process`` for arrays: process ``i``
  of ``n`` gets ``[i * m, (i + 1) * m)`` with ``m = num_examples // n``
  (``drop_remainder``: every process gets the same count, so that all take
  the same number of steps); otherwise the first ``num_examples % n``
  processes get one more.
  """
  i = jax.process_index() if process_index is None else process_index
  n = jax.process_count() if process_count is None else process_count
  if not 0 <= i < n:
    raise ValueError(f"process_index {i} is not in [0, {n}).")
  if drop_remainder:
    per = num_examples // n
    return slice(i * per, (i + 1) * per)
  base, extra = divmod(num_examples, n)
  start = i * base + min(i, extra)
  return slice(start, start + base + (1 if i < extra else 0))


def load_tfds_for_process(name: str, split: str = "train", *,
                          drop_remainder: bool = True,
                          **load_kwargs: Any) -> Any:
  """``tfds.load`` of this process's part of ``split`` (``tfds.split_for_jax_process``).

  tensorflow_datasets is imported here only. Returns the ``tf.data.Dataset``
  of ``tfds.load(name, split=<this process's sub-split>, **load_kwargs)``.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  process_split = tfds.split_for_jax_process(split,
                                             drop_remainder=drop_remainder)
  return tfds.load(name, split=process_split, **load_kwargs)


def global_batch(local_batch: Any, mesh: Mesh,
                 rules: Optional[ShardingRules] = None) -> Any:
  """Assembles the global batch from every process's local batch.

  Each leaf ``[b, ...]`` of this process's batch becomes a global
  ``jax.Array`` of shape ``[b * process_count, ...]`` split over
  ``rules.batch_axes`` with ``jax.make_array_from_process_local_data``; no
  data moves between hosts. In a single-process run this is
  ``shard_batch``.

  Raises:
    ValueError: the local batch does not split over this process's devices
      along the batch axes.
  """
  rules = rules or ShardingRules.data_parallel()
  rules.check(mesh)
  _mesh.check_batch(local_batch, mesh, rules, global_batch=False)
  sharding = _mesh.batch_sharding(mesh, rules)

  def make(x):
    x = np.asarray(x)
    global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
    return jax.make_array_from_process_local_data(sharding, x, global_shape)

  return jax.tree.map(make, local_batch)


def to_host(tree: Any) -> Any:
  """Fetches a (possibly multi-host sharded) pytree as NumPy arrays on every process."""
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return jax.device_get(tree)
  return multihost_utils.process_allgather(tree, tiled=True)
