"""One process of the two-process checkpoint test.

``python _mp_worker.py PHASE PORT PID DIR``, PHASE in ``save``/``restore``.
Two processes with 2 CPU devices each form a 4-device mesh; the state's
arrays are sharded over it (not fully addressable by either process).

* ``save``: saves two steps (values of seeds 1 and 2) with per-process data
  positions, and writes this process's addressable shards of each to
  ``DIR/shards_<pid>.npz``; also checks that the compiled checksum has no
  all-gather.
* ``restore`` (fresh processes): restores the latest step and step 1 and
  compares the addressable shards with the saved ones; then process 0 flips a
  byte in process 1's array data of step 2, and both restore again (expecting
  the same error, then a fallback to step 1 with step 2 quarantined).

Each process writes ``DIR/<phase>_<pid>.json`` with what it saw.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, NamedTuple

if __name__ == "__main__":  # the test imports global_values from here
  os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

SPECS = {  # a DistillState-like tree: leaf -> (shape, dtype, spec)
    "params/dense/kernel": ((8, 4), np.float32, P("d", None)),
    "params/dense/bias": ((4,), np.float32, P()),
    "opt_state/mu/kernel": ((4, 8), np.float32, P(None, "d")),
    # Random bits (incompressible): most of each process's data file, so a
    # byte flipped in its middle changes this leaf's values.
    "loss_state/bank": ((64, 16), np.uint32, P("d", None)),
    "ema_params/dense/kernel": ((4, 6), jnp.bfloat16, P("d", None)),
    "step": ((), np.int32, P()),
}


class DistillLike(NamedTuple):
  params: dict
  opt_state: dict
  loss_state: dict
  ema_params: dict
  step: Any


class Position:
  """A minimal resumable iterator: its state is this process's position."""

  def __init__(self, position: int = -1):
    self.position = position

  def get_state(self) -> dict:
    return {"position": self.position}

  def set_state(self, state: dict) -> None:
    self.position = int(state["position"])


def _nest(flat: dict) -> DistillLike:
  out = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = out
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return DistillLike(**out)


def global_values(seed: int) -> dict[str, np.ndarray]:
  """The whole (global) value of every leaf of the state of ``seed``."""
  rng = np.random.default_rng(seed)
  out = {}
  for name, (shape, dtype, _) in SPECS.items():
    if dtype == np.uint32:
      out[name] = rng.integers(0, 2**32, shape, dtype=np.uint32)
    elif shape:
      out[name] = np.asarray(jnp.asarray(rng.standard_normal(shape) * 10,
                                         dtype))
    else:
      out[name] = np.asarray(seed, np.int32)
  return out


def _state(mesh, seed: int) -> DistillLike:
  """Each process builds only its own shards of the global values."""
  flat = {}
  for name, value in global_values(seed).items():
    _, _, spec = SPECS[name]
    flat[name] = jax.make_array_from_callback(
        value.shape, NamedSharding(mesh, spec), lambda idx, v=value: v[idx])
  return _nest(flat)


def _template(mesh) -> DistillLike:
  return _nest({name: jax.ShapeDtypeStruct(shape, dtype,
                                           sharding=NamedSharding(mesh, spec))
                for name, (shape, dtype, spec) in SPECS.items()})


def _shards(state) -> dict:
  """``{"<leaf>@<index>": data}`` of this process's addressable shards."""
  from kdjax.checkpoint import _integrity
  out = {}
  for name, leaf in _integrity.flat_with_paths(state).items():
    for shard in leaf.addressable_shards:
      data = np.asarray(shard.data)
      if data.dtype == jnp.bfloat16:
        data = data.view(np.uint16)
      out[f"{name}@{shard.index}"] = data
  return out


def _same(state, saved) -> bool:
  got = _shards(state)
  return set(got) == set(saved) and all(
      np.array_equal(got[k], saved[k]) for k in got)


def _process1_data_file(step_dir: str) -> str:
  data_dir = os.path.join(step_dir, "state", "ocdbt.process_1", "d")
  return max((os.path.join(data_dir, f) for f in os.listdir(data_dir)),
             key=os.path.getsize)


def _truncate_process1_data(step_dir: str) -> None:
  path = _process1_data_file(step_dir)
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _flip_process1_data(step_dir: str) -> str:
  path = _process1_data_file(step_dir)
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)[0]
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte ^ 0x5A]))
  return path


def save(mesh, directory: str, pid: int) -> dict:
  from kdjax import checkpoint as kc
  from kdjax.checkpoint import _integrity
  report = {}
  state1, state2 = _state(mesh, 1), _state(mesh, 2)
  hlo = _integrity._checksum_leaves_jit.lower(  # pylint: disable=protected-access
      jax.tree.leaves(state1)).compile().as_text()
  report["checksum_all_gather"] = "all-gather" in hlo
  report["checksum_all_reduce"] = "all-reduce" in hlo
  report["checksums"] = kc.tree_checksums(state2)
  ckpt = kc.DistillCheckpointer(directory, save_every=1, keep_last=3,
                                config={"lr": 0.1})
  report["saved"] = [
      ckpt.save(state1, step=1, data_iterator=Position(100 + pid)),
      ckpt.save(state2, data_iterator=Position(200 + pid))]  # step read: 2
  ckpt.wait_until_finished()
  report["meta_checksums"] = ckpt.read_meta(2)["checksums"]
  ckpt.close()
  np.savez(os.path.join(directory, f"shards_{pid}.npz"),
           **{f"s1/{k}": v for k, v in _shards(state1).items()},
           **{f"s2/{k}": v for k, v in _shards(state2).items()})
  return report


def restore(mesh, directory: str, pid: int) -> dict:
  from kdjax import checkpoint as kc
  report = {}
  saved = np.load(os.path.join(directory, f"shards_{pid}.npz"))
  s1 = {k[3:]: saved[k] for k in saved.files if k.startswith("s1/")}
  s2 = {k[3:]: saved[k] for k in saved.files if k.startswith("s2/")}
  template = _template(mesh)
  ckpt = kc.DistillCheckpointer(directory, save_every=1, keep_last=3,
                                config={"lr": 0.1})
  report["steps"] = ckpt.all_steps()
  position = Position()
  run = ckpt.restore(template, data_iterator=position)
  report["latest"] = [run.step, _same(run.state, s2), position.position,
                      run.config]
  report["fully_addressable"] = any(
      x.is_fully_addressable for x in jax.tree.leaves(run.state)
      if not x.sharding.is_fully_replicated)
  run = ckpt.restore(template, step=1, data_iterator=position)
  report["step1"] = [run.step, _same(run.state, s1), position.position]

  multihost_utils.sync_global_devices("before flip")
  if pid == 0:
    report["flipped"] = _flip_process1_data(str(ckpt.step_path(2)))
  multihost_utils.sync_global_devices("after flip")
  try:
    ckpt.restore(template)
    report["error"] = None
  except kc.CheckpointCorruptedError as e:
    report["error"] = [type(e).__name__, e.step, str(e)]
  run = ckpt.restore(template, fallback=True, data_iterator=position)
  report["fallback"] = [run.step, list(run.skipped_steps),
                        _same(run.state, s1), position.position]
  report["after_quarantine"] = [
      ckpt.all_steps(), os.path.isdir(os.path.join(directory, "corrupted", "2"))]

  # A step whose part on process 1 cannot be read at all: only process 1's
  # read fails, and both must still take the same decision.
  assert ckpt.save(_state(mesh, 2), step=2, data_iterator=Position(300 + pid))
  ckpt.wait_until_finished()
  multihost_utils.sync_global_devices("before truncation")
  if pid == 0:
    _truncate_process1_data(str(ckpt.step_path(2)))
  multihost_utils.sync_global_devices("after truncation")
  run = ckpt.restore(template, fallback=True, data_iterator=position)
  report["unreadable"] = [run.step, list(run.skipped_steps),
                          _same(run.state, s1), position.position,
                          ckpt.all_steps()]
  ckpt.close()
  return report


def main():
  phase, port, pid, directory = (sys.argv[1], int(sys.argv[2]),
                                 int(sys.argv[3]), sys.argv[4])
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2,
                             process_id=pid)
  assert jax.process_count() == 2 and jax.device_count() == 4
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("d",))
  report = {"save": save, "restore": restore}[phase](mesh, directory, pid)
  with open(os.path.join(directory, f"{phase}_{pid}.json"), "w") as f:
    json.dump(report, f)
  multihost_utils.sync_global_devices("done")
  jax.distributed.shutdown()


if __name__ == "__main__":
  main()

