"""Runs the 8-device checks in a fresh process; prints one JSON line of results.

Usage: XLA_FLAGS=--xla_force_host_platform_device_count=8 python _devices_worker.py
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _parallel_common as _common  # noqa: E402

from kdjax import parallel, train  # noqa: E402


def max_diff(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def spec_of(x) -> str:
  return str(tuple(x.sharding.spec))


def main():
  assert jax.device_count() == 8
  sa, student_vars, ta, teacher_vars, loss_fn, opt = _common.setup()
  data = _common.data()
  out = {}

  # Reference: the plain jitted step on one device.
  state = train.create_state(student_vars(), opt, rng=jax.random.key(0))
  step = train.make_train_step(sa, ta, loss_fn, opt)
  ref_losses = []
  for _ in range(_common.NUM_STEPS):
    state, metrics = step(state, teacher_vars, data)
    ref_losses.append(float(metrics["loss"]))
  reference = state.params
  out["ref_devices"] = len(reference["head"]["kernel"].sharding.device_set)
  out["ref_losses"] = ref_losses

  configs = {
      "dp": ({"data": 8}, parallel.ShardingRules.data_parallel()),
      "fsdp": ({"data": 2, "fsdp": 4},
               parallel.ShardingRules.fsdp(min_shard_size=16)),
      "fsdp_only": ({"fsdp": 8},
                    parallel.ShardingRules.fsdp(data_axis=None,
                                                min_shard_size=16)),
      # Student replicated, teacher split over the data axis.
      "dp_teacher_sharded": ({"data": 8}, parallel.ShardingRules(
          batch_axes=("data",), teacher_axis="data", min_shard_size=16)),
      "dp_accumulate": ({"data": 4}, parallel.ShardingRules.data_parallel()),
  }
  for name, (axes, rules) in configs.items():
    mesh = parallel.make_mesh(axes)
    kwargs = {"accumulation_steps": 2} if name == "dp_accumulate" else {}
    state = train.create_state(student_vars(), opt, rng=jax.random.key(0))
    step = parallel.make_sharded_train_step(
        sa, ta, loss_fn, opt, mesh=mesh, state=state,
        teacher_variables=teacher_vars, rules=rules, **kwargs)
    state = parallel.shard_state(state, mesh, rules)
    teacher = parallel.shard_teacher(teacher_vars, mesh, rules)
    batch = parallel.shard_batch(data, mesh, rules)
    losses = []
    for _ in range(_common.NUM_STEPS):
      state, metrics = step(state, teacher, batch)
      losses.append(float(metrics["loss"]))
    momentum = state.opt_state[0].trace["student"]["dense_0"]["kernel"]
    out[name] = {
        "param_diff": max_diff(state.params, reference),
        "loss_diff": float(np.max(np.abs(np.array(losses) - ref_losses))),
        "kernel_spec": spec_of(state.params["dense_0"]["kernel"]),
        "kernel_shard_shape": list(
            state.params["dense_0"]["kernel"].addressable_shards[0].data.shape),
        "momentum_spec": spec_of(momentum),
        "bias_spec": spec_of(state.params["head"]["bias"]),
        "teacher_kernel_spec": spec_of(teacher["params"]["dense_0"]["kernel"]),
        "batch_spec": spec_of(batch["image"]),
        "num_devices": len(state.params["dense_0"]["kernel"].sharding.device_set),
    }

  # Legacy pmap step.
  state = train.create_state(student_vars(), opt, rng=jax.random.key(0))
  pstep = parallel.make_pmap_train_step(sa, ta, loss_fn, opt)
  state = parallel.replicate(state)
  teacher = parallel.replicate(teacher_vars)
  batch = parallel.split_batch(data)
  for _ in range(_common.NUM_STEPS):
    state, metrics = pstep(state, teacher, batch)
  out["pmap"] = {"param_diff": max_diff(parallel.unreplicate(state).params,
                                        reference),
                 "replica_shape": list(state.params["head"]["kernel"].shape)}

  # Clear errors.
  errors = {}
  mesh = parallel.make_mesh({"data": 8})
  rules = parallel.ShardingRules.data_parallel()
  bad_batch = jax.tree.map(lambda a: a[:12], data)
  try:
    parallel.shard_batch(bad_batch, mesh, rules)
  except ValueError as e:
    errors["shard_batch"] = str(e)
  state = train.create_state(student_vars(), opt, rng=jax.random.key(0))
  step = parallel.make_sharded_train_step(sa, ta, loss_fn, opt, mesh=mesh,
                                          state=state,
                                          teacher_variables=teacher_vars)
  try:
    step(state, teacher_vars, bad_batch)
  except ValueError as e:
    errors["step"] = str(e)
  try:
    parallel.make_mesh({"data": 4, "fsdp": 4})
  except ValueError as e:
    errors["mesh"] = str(e)
  try:
    parallel.shard_state(state, mesh, parallel.ShardingRules.fsdp())
  except ValueError as e:
    errors["axis"] = str(e)
  try:
    parallel.split_batch(bad_batch)
  except ValueError as e:
    errors["pmap"] = str(e)
  out["errors"] = errors
  print("RESULT " + json.dumps(out))


if __name__ == "__main__":
  main()
