"""Subprocess worker of the checkpoint tests: a tiny distillation run.

``python _worker.py train --dir D --steps N --log L --out O [--kill-after K]
[--hang-at S]`` trains a tiny student against a tiny teacher (KD + CE + a
FitNets-style connector with learnable params + a stateful memory term,
dropout, EMA, adam with a schedule) from an ``ArrayBatchIterator``, resuming
from ``D`` if it holds a checkpoint, saving every ``--save-every`` steps. Each
step's loss goes to ``L`` (JSON lines, float.hex); the final state to ``O``
(npz of raw leaves).

* ``--kill-after K``: after the save at step K has committed, print
  ``SAVED K`` and keep training slowly (the parent SIGKILLs it).
* ``--hang-at S``: the write of step S blocks just before its atomic commit,
  after printing ``WRITING S`` (the parent SIGKILLs it mid-write).

``python _worker.py layout --phase {save8,restore1,restore8} ...``: the
8 -> 1 -> 8 device-layout round trip (see test_resume.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax import checkpoint as kc
from kdjax import losses
from kdjax import models
from kdjax import train

NUM_EXAMPLES, DIM, CLASSES, BATCH = 40, 6, 3, 8


def make_data():
  rng = np.random.default_rng(0)
  return {"image": rng.normal(size=(NUM_EXAMPLES, DIM)).astype(np.float32),
          "label": rng.integers(0, CLASSES, NUM_EXAMPLES).astype(np.int32)}


def _hint(inputs):
  projected = inputs.student.feature("penultimate") @ inputs.params["w"]
  return jnp.mean((projected - inputs.teacher.feature("penultimate")) ** 2)


def _hint_init(rng, student_out, teacher_out, batch):
  del batch
  shape = (student_out.feature("penultimate").shape[-1],
           teacher_out.feature("penultimate").shape[-1])
  return {"w": 0.1 * jax.random.normal(rng, shape)}


def _memory(inputs):
  probs = jax.nn.softmax(inputs.teacher.logits).mean(0)
  bank = 0.9 * inputs.state["bank"] + 0.1 * probs
  s_probs = jax.nn.softmax(inputs.student.logits).mean(0)
  return jnp.sum((s_probs - bank) ** 2), {"bank": bank,
                                          "count": inputs.state["count"] + 1}


def _memory_init(rng, student_out, teacher_out, batch):
  del rng, student_out, batch
  return {"bank": jnp.zeros(teacher_out.logits.shape[-1]),
          "count": jnp.zeros((), jnp.int32)}


def build(teacher_seed: int = 0):
  """Returns (state, step_fn, teacher_variables, data)."""
  data = make_data()
  teacher = models.MLP(hidden=(12,), num_classes=CLASSES)
  student = models.MLP(hidden=(8,), num_classes=CLASSES, dropout_rate=0.1)
  t_apply = models.from_linen(teacher, feature_names=("penultimate",))
  s_apply = models.from_linen(student, feature_names=("penultimate",),
                              train_kwarg="train")
  batch0 = {k: jnp.asarray(v[:BATCH]) for k, v in data.items()}
  loss_fn = losses.compose([
      losses.Term("ce", losses.label_term(), 0.5, needs_teacher=False),
      losses.Term("kd", losses.logit_term(losses.kl_divergence), 1.0),
      losses.Term("hint", _hint, 0.1, init_params=_hint_init),
      losses.Term("mem", _memory, 0.1, stateful=True, init_state=_memory_init),
  ], temperature=2.0)
  optimizer = optax.chain(
      optax.clip_by_global_norm(1.0),
      optax.adam(optax.cosine_decay_schedule(3e-2, 50)))

  @jax.jit
  def init(batch):  # one compiled program instead of many eager ops
    t_vars = teacher.init(jax.random.PRNGKey(100 + teacher_seed), batch["image"])
    s_vars = student.init(jax.random.PRNGKey(1), batch["image"])
    s_out = s_apply(s_vars, batch)
    t_out = t_apply(t_vars, batch)
    key = jax.random.PRNGKey(5)
    state = train.create_state(
        s_vars, optimizer, rng=jax.random.key(7),
        loss_params=loss_fn.init_params(key, s_out, t_out, batch),
        loss_state=loss_fn.init_state(key, s_out, t_out, batch), ema=True)
    return state, t_vars

  state, t_vars = init(batch0)
  step_fn = train.make_train_step(s_apply, t_apply, loss_fn, optimizer,
                                  ema_decay=0.9)
  return state, step_fn, t_vars, data


def raw_leaves(tree) -> dict:
  """``{"a/b": np.ndarray}`` with PRNG keys as key data (exact bytes)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    out[jax.tree_util.keystr(path)] = np.asarray(jax.device_get(leaf))
  return out


def _install_hang(step: int):
  """Blocks the commit (atomic rename) of ``step``'s directory forever."""
  import asyncio  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top

  original = atomicity.AtomicRenameTemporaryPath.finalize

  async def finalize(self):
    if self.get_final().name == str(step):
      print(f"WRITING {step}", flush=True)
      while True:
        await asyncio.sleep(1.0)
    return await original(self)

  atomicity.AtomicRenameTemporaryPath.finalize = finalize


def cmd_train(args):
  state, step_fn, t_vars, data = build(args.teacher_seed)
  if args.hang_at:
    _install_hang(args.hang_at)
  batches = kc.ArrayBatchIterator(data, BATCH, seed=3)
  ckpt = kc.DistillCheckpointer(
      args.dir, save_every=args.save_every, keep_last=2, async_save=True,
      config={"steps": args.steps, "batch": BATCH}, teacher=t_vars)
  if ckpt.latest_step() is not None:
    restored = ckpt.restore(state, data_iterator=batches,
                            allow_teacher_change=args.force_teacher)
    state = restored.state
    print(f"RESTORED {restored.step}", flush=True)
  slow = False
  with open(args.log, "a") as log:
    for i in range(int(state.step), args.steps):
      state, metrics = step_fn(state, t_vars, next(batches))
      log.write(json.dumps({"step": i + 1,
                            "loss": float(metrics["loss"]).hex()}) + "\n")
      log.flush()
      saved = ckpt.save(state, step=i + 1, data_iterator=batches)
      if saved and args.kill_after == i + 1:
        ckpt.wait_until_finished()
        print(f"SAVED {i + 1}", flush=True)
        slow = True
      if slow:
        time.sleep(0.5)
  ckpt.save(state, step=args.steps, data_iterator=batches, force=True)
  ckpt.close()
  np.savez(args.out, **raw_leaves(state))
  print("DONE", flush=True)


def _mesh_shardings(tree, mesh):
  """Shards each leaf's first dimension divisible by the mesh size."""
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  n = mesh.devices.size

  def one(x):
    shape = np.shape(x)
    for axis, size in enumerate(shape):
      if size % n == 0:
        spec = [None] * len(shape)
        spec[axis] = "d"
        return NamedSharding(mesh, P(*spec))
    return NamedSharding(mesh, P())

  return jax.tree.map(one, tree)


def cmd_layout(args):
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  assert jax.device_count() == args.devices, (jax.device_count(), args.devices)
  mesh = Mesh(np.array(jax.devices()), ("d",))
  state, step_fn, t_vars, data = build()
  shardings = _mesh_shardings(state, mesh)
  batches = kc.ArrayBatchIterator(data, BATCH, seed=3)
  report = {"devices": jax.device_count()}
  if args.phase == "save8":
    state = jax.device_put(state, shardings)
    for _ in range(2):
      state, _ = step_fn(state, t_vars, next(batches))
    with kc.DistillCheckpointer(args.dir, save_every=0) as ckpt:
      ckpt.save(state, data_iterator=batches, force=True)
    np.savez(args.out, **raw_leaves(state))
  else:
    with kc.DistillCheckpointer(args.src) as ckpt:
      restored = ckpt.restore(state, shardings=shardings,
                              data_iterator=batches)
    state = restored.state
    np.savez(args.out, **raw_leaves(state))
    report["step"] = restored.step
    report["num_devices"] = sorted(
        {len(x.sharding.device_set) for x in jax.tree.leaves(state)})
    report["sharded_leaves"] = sum(
        1 for x, s in zip(jax.tree.leaves(state), jax.tree.leaves(shardings))
        if x.sharding.is_equivalent_to(s, x.ndim) and
        any(a is not None for a in s.spec))
    if args.phase == "restore1":
      for _ in range(2):
        state, _ = step_fn(state, t_vars, next(batches))
      with kc.DistillCheckpointer(args.dir, save_every=0) as ckpt:
        ckpt.save(state, data_iterator=batches, force=True)
      np.savez(args.out2, **raw_leaves(state))
      kc.export_student(state, args.export)
    else:
      teacher = kc.restore_teacher(
          args.export, jax.eval_shape(lambda: state.student_variables()),
          shardings=NamedSharding(mesh, P()))
      np.savez(args.out2, **raw_leaves(teacher))
      report["teacher_devices"] = sorted(
          {len(x.sharding.device_set) for x in jax.tree.leaves(teacher)})
  with open(args.report, "w") as f:
    json.dump(report, f)
  print("DONE", flush=True)


def main(argv):
  parser = argparse.ArgumentParser()
  sub = parser.add_subparsers(dest="cmd", required=True)
  t = sub.add_parser("train")
  t.add_argument("--dir", required=True)
  t.add_argument("--steps", type=int, required=True)
  t.add_argument("--save-every", type=int, default=3)
  t.add_argument("--log", required=True)
  t.add_argument("--out", required=True)
  t.add_argument("--kill-after", type=int, default=0)
  t.add_argument("--hang-at", type=int, default=0)
  t.add_argument("--teacher-seed", type=int, default=0)
  t.add_argument("--force-teacher", action="store_true")
  lay = sub.add_parser("layout")
  lay.add_argument("--phase", choices=("save8", "restore1", "restore8"),
                   required=True)
  lay.add_argument("--devices", type=int, required=True)
  lay.add_argument("--dir", default="")
  lay.add_argument("--src", default="")
  lay.add_argument("--out", required=True)
  lay.add_argument("--out2", default="")
  lay.add_argument("--export", default="")
  lay.add_argument("--report", required=True)
  args = parser.parse_args(argv)
  if args.cmd == "train":
    cmd_train(args)
  else:
    cmd_layout(args)


if __name__ == "__main__":
  main(sys.argv[1:])
