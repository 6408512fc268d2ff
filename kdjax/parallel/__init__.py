"""kdjax.parallel: meshes, sharding rules, sharded/pmap steps and multi-host helpers.

Data parallelism, FSDP (student state split over an axis, all-gathered in
the step) and a teacher sharded independently of the student, all with
``jax.sharding`` and ``jax.jit`` in/out shardings; a ``jax.pmap`` step for
legacy code; ``jax.distributed`` initialisation and global batches built from
per-process data.
"""

from kdjax.parallel._mesh import DATA
from kdjax.parallel._mesh import FSDP
from kdjax.parallel._mesh import ShardingRules
from kdjax.parallel._mesh import batch_sharding
from kdjax.parallel._mesh import check_batch
from kdjax.parallel._mesh import leaf_partition_spec
from kdjax.parallel._mesh import make_mesh
from kdjax.parallel._mesh import put_global
from kdjax.parallel._mesh import replicated
from kdjax.parallel._mesh import shard_batch
from kdjax.parallel._mesh import shard_state
from kdjax.parallel._mesh import shard_teacher
from kdjax.parallel._mesh import state_sharding
from kdjax.parallel._mesh import teacher_sharding
from kdjax.parallel._mesh import tree_sharding
from kdjax.parallel._multihost import global_batch
from kdjax.parallel._multihost import initialize
from kdjax.parallel._multihost import load_tfds_for_process
from kdjax.parallel._multihost import process_slice
from kdjax.parallel._multihost import to_host
from kdjax.parallel._step import make_pmap_train_step
from kdjax.parallel._step import make_sharded_train_step
from kdjax.parallel._step import replicate
from kdjax.parallel._step import split_batch
from kdjax.parallel._step import unreplicate
