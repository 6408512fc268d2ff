"""kdjax.parallel: meshes, sharding rules, sharded/pmap steps and multi-host helpers.

Data parallelism, FSDP (student state split over an axis, all-gathered in
the step) and a teacher sharded independently of the student, all with
``jax.sharding`` and ``jax.jit`` in/out shardings; a ``jax.pmap`` step for
legacy code; ``jax.distributed`` initialisation and global batches built from
per-process data; a memory plan of a sharded step compiled on abstract inputs
(:func:`plan_train_step_memory`).
"""

from typing import TYPE_CHECKING

from kdjax import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, {
    "._mesh": ("DATA", "FSDP", "ShardingRules", "batch_sharding",
        "check_batch", "fsdp_gather_fn", "leaf_partition_spec", "make_mesh",
        "put_global", "replicated", "shard_batch", "shard_state",
        "shard_teacher", "state_sharding", "teacher_sharding",
        "tree_sharding"),
    "._multihost": ("global_batch", "initialize", "load_tfds_for_process",
        "process_slice", "to_host"),
    "._plan": ("MemoryPlan", "plan_train_step_memory", "sharded_bytes"),
    "._step": ("make_pmap_train_step", "make_sharded_train_step", "replicate",
        "split_batch", "unreplicate"),
})

if TYPE_CHECKING:  # the lazy names above, for type checkers and IDEs
  from kdjax.parallel._mesh import (
      DATA, FSDP, ShardingRules, batch_sharding, check_batch, fsdp_gather_fn,
      leaf_partition_spec, make_mesh, put_global, replicated, shard_batch,
      shard_state, shard_teacher, state_sharding, teacher_sharding,
      tree_sharding)
  from kdjax.parallel._multihost import (
      global_batch, initialize, load_tfds_for_process, process_slice, to_host)
  from kdjax.parallel._plan import (
      MemoryPlan, plan_train_step_memory, sharded_bytes)
  from kdjax.parallel._step import (
      make_pmap_train_step, make_sharded_train_step, replicate, split_batch,
      unreplicate)
