"""One process of the two-process test: python _multihost_worker.py PORT PID OUT."""

import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _parallel_common as _common  # noqa: E402

from kdjax import parallel, train  # noqa: E402


def main():
  port, pid, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
  parallel.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                      cpu_collectives="gloo")
  assert jax.process_count() == 2 and jax.device_count() == 4, (
      jax.process_count(), jax.device_count())
  sa, student_vars, ta, teacher_vars, loss_fn, opt = _common.setup()
  data = _common.data()
  local = jax.tree.map(lambda a: a[parallel.process_slice(_common.BATCH)],
                       data)
  results = {}
  for name, axes, rules in [
      ("dp", {"data": 4}, parallel.ShardingRules.data_parallel()),
      ("fsdp", {"data": 2, "fsdp": 2},
       parallel.ShardingRules.fsdp(min_shard_size=16))]:
    mesh = parallel.make_mesh(axes)
    state = train.create_state(student_vars(), opt, rng=jax.random.key(0))
    step = parallel.make_sharded_train_step(
        sa, ta, loss_fn, opt, mesh=mesh, state=state,
        teacher_variables=teacher_vars, rules=rules)
    state = parallel.shard_state(state, mesh, rules)
    teacher = parallel.shard_teacher(teacher_vars, mesh, rules)
    batch = parallel.global_batch(local, mesh, rules)
    assert batch["image"].shape == (_common.BATCH, _common.FEATURES)
    losses = []
    for _ in range(_common.NUM_STEPS):
      state, metrics = step(state, teacher, batch)
      losses.append(float(metrics["loss"]))
    params = parallel.to_host(state.params)
    for key, value in _common.flat_params(params).items():
      results[f"{name}/{key}"] = value
    results[f"{name}/losses"] = np.asarray(losses)
  np.savez(out, **results)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()
