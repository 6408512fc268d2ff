"""In-process tests of kdjax.checkpoint.DistillCheckpointer, export and teacher restore."""

from __future__ import annotations

import gc
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from kdjax import checkpoint as kc
from kdjax import train

# Restoring a broken step, orbax leaves the reads of its other arrays
# un-awaited; Python reports them when they are collected (in any test).
pytestmark = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")


def _variables(hidden=4, seed=0):
  rng = np.random.default_rng(seed)
  return {"params": {"dense": {"kernel": rng.normal(size=(3, hidden)).astype(np.float32),
                               "bias": rng.normal(size=(hidden,)).astype(np.float32)},
                     "big": rng.normal(size=(48, 48)).astype(np.float32)},
          "batch_stats": {"mean": rng.normal(size=(hidden,)).astype(np.float32)}}


def _state(hidden=4, seed=0):
  variables = jax.tree.map(jnp.asarray, _variables(hidden, seed))
  state = train.create_state(
      variables, optax.adam(1e-2), rng=jax.random.key(seed + 1), ema=True,
      loss_params={"hint": {"w": jnp.full((2, 2), 0.5 + seed)}},
      loss_state={"crd": {"bank": jnp.arange(6.0).reshape(3, 2) + seed,
                          "ptr": jnp.asarray(seed, jnp.int32)}})
  # Make every leaf distinct from a fresh state: one update, new rng, new EMA.
  grads = jax.tree.map(jnp.ones_like, state.trainable)
  updates, opt_state = optax.adam(1e-2).update(grads, state.opt_state,
                                               state.trainable)
  trainable = optax.apply_updates(state.trainable, updates)
  return state.replace(step=jnp.asarray(1, jnp.int32),
                       params=trainable["student"],
                       loss_params=trainable["loss"], opt_state=opt_state,
                       rng=jax.random.split(state.rng)[0],
                       ema_params=jax.tree.map(lambda p: 0.5 * p,
                                               trainable["student"]))


def _host(tree) -> dict:
  """``{path: bytes}``, PRNG keys as key data: a copy independent of the device."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      leaf = jax.random.key_data(leaf)
    value = np.asarray(jax.device_get(leaf))
    out[jax.tree_util.keystr(path)] = (value.dtype.str, value.shape,
                                       value.tobytes())
  return out


def _template():
  return jax.tree.map(jnp.zeros_like, _state(seed=7))


def test_roundtrip_every_field(tmp_path):
  state = _state()
  expected = _host(state)
  iterator = kc.ArrayBatchIterator({"x": np.arange(10)}, 3, seed=2)
  next(iterator)
  with kc.DistillCheckpointer(tmp_path, save_every=0,
                              config={"lr": 0.01, "model": "mlp"}) as ckpt:
    assert ckpt.save(state, data_iterator=iterator, force=True,
                     extra={"note": "first"})
  resumed_iterator = kc.ArrayBatchIterator({"x": np.arange(10)}, 3, seed=2)
  with kc.DistillCheckpointer(tmp_path, save_every=0) as ckpt:
    restored = ckpt.restore(_template(), data_iterator=resumed_iterator)
  assert restored.step == 1
  assert _host(restored.state) == expected
  assert isinstance(restored.state, train.DistillState)
  assert jax.dtypes.issubdtype(restored.state.rng.dtype, jax.dtypes.prng_key)
  assert restored.config == {"lr": 0.01, "model": "mlp"}
  assert restored.extra == {"note": "first"}
  assert restored.data_state == iterator.get_state()
  np.testing.assert_array_equal(next(resumed_iterator)["x"],
                                next(iterator)["x"])


def test_template_may_be_abstract(tmp_path):
  state = _state()
  with kc.DistillCheckpointer(tmp_path) as ckpt:
    ckpt.save(state, force=True)
    restored = ckpt.restore(jax.eval_shape(lambda: _state(seed=3)))
  assert _host(restored.state) == _host(state)
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(restored.state))


def test_bytes_iterator_state(tmp_path):
  class BytesIterator:  # grain's DataLoader iterators use bytes

    def __init__(self):
      self.position = b"\x00pos"

    def get_state(self):
      return self.position

    def set_state(self, state):
      self.position = state

  source, target = BytesIterator(), BytesIterator()
  source.position = b"\xffsaved"
  with kc.DistillCheckpointer(tmp_path) as ckpt:
    ckpt.save(_state(), data_iterator=source, force=True)
    ckpt.restore(_template(), data_iterator=target)
  assert target.position == b"\xffsaved"


def test_save_every_and_final(tmp_path):
  state = _state()
  with kc.DistillCheckpointer(tmp_path, save_every=3, keep_last=None,
                              async_save=False) as ckpt:
    written = [s for s in range(1, 11) if ckpt.save(state, step=s)]
    assert written == [3, 6, 9]
    assert ckpt.save(state, step=10, force=True)  # end of run
    assert not ckpt.save(state, step=10, force=True)  # already saved
    assert ckpt.all_steps() == [3, 6, 9, 10]
    with pytest.raises(ValueError, match="newer step 10"):
      ckpt.save(state, step=4, force=True)
  assert sorted(int(n) for n in os.listdir(tmp_path) if n.isdigit()) == [
      3, 6, 9, 10]


def test_keep_last(tmp_path):
  with kc.DistillCheckpointer(tmp_path, save_every=1, keep_last=2) as ckpt:
    for step in range(1, 7):
      ckpt.save(_state(), step=step)
  assert sorted(int(n) for n in os.listdir(tmp_path) if n.isdigit()) == [5, 6]


@pytest.mark.parametrize("mode,kept,best", [("max", [2, 4, 5], 2),
                                            ("min", [3, 5], 3)])
def test_keep_best_by_metric(tmp_path, mode, kept, best):
  accuracy = {1: 0.3, 2: 0.9, 3: 0.1, 4: 0.5, 5: 0.2}
  with kc.DistillCheckpointer(tmp_path, save_every=1, keep_last=1,
                              best_metric="acc", best_mode=mode,
                              keep_best=2) as ckpt:
    for step, acc in accuracy.items():
      ckpt.save(_state(), step=step, metrics={"acc": acc, "loss": 1.0})
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == kept
    assert ckpt.best_step() == best
    with pytest.raises(KeyError, match="acc"):
      ckpt.save(_state(), step=6, metrics={"loss": 0.1})
  assert sorted(int(n) for n in os.listdir(tmp_path) if n.isdigit()) == kept
  with kc.DistillCheckpointer(tmp_path, best_metric="acc",
                              best_mode=mode) as reopened:
    assert reopened.best_step() == best
    assert reopened.restore(_template(), step=best).metrics["acc"] == accuracy[best]


def test_async_save_survives_buffer_donation(tmp_path):
  state = _state()
  expected = _host(state)
  bump = jax.jit(lambda s: s.replace(params=jax.tree.map(lambda p: p + 1.0,
                                                         s.params)),
                 donate_argnums=0)
  with kc.DistillCheckpointer(tmp_path, async_save=True) as ckpt:
    assert ckpt.save(state, step=1, force=True)
    state = bump(state)  # donates the saved buffers while the write runs
    jax.block_until_ready(state)
    ckpt.wait_until_finished()
    restored = ckpt.restore(_template())
  assert _host(restored.state) == expected


def _largest_data_file(step_dir):
  files = [os.path.join(root, f) for root, _, names in
           os.walk(os.path.join(step_dir, "state")) for f in names
           if os.sep + "d" + os.sep in os.path.join(root, f)]
  return max(files, key=os.path.getsize)


def _truncate(path):
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _flip_middle_byte(path):
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    byte = f.read(1)[0]
    f.seek(-1, os.SEEK_CUR)
    f.write(bytes([byte ^ 0x5A]))


CORRUPTIONS = {
    "truncated_data": lambda d: _truncate(_largest_data_file(d)),
    "flipped_data": lambda d: _flip_middle_byte(_largest_data_file(d)),
    "truncated_manifest": lambda d: _truncate(
        os.path.join(d, "state", "manifest.ocdbt")),
    "truncated_meta": lambda d: _truncate(os.path.join(d, "meta", "metadata")),
    "missing_tree_metadata": lambda d: os.remove(
        os.path.join(d, "state", "_METADATA")),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupted_checkpoint_error_and_fallback(tmp_path, corruption):
  good, newer = _state(seed=0), _state(seed=1)
  with kc.DistillCheckpointer(tmp_path, save_every=1, keep_last=3) as ckpt:
    ckpt.save(good, step=1)
    ckpt.save(newer, step=2)
  CORRUPTIONS[corruption](str(tmp_path / "2"))
  with kc.DistillCheckpointer(tmp_path, save_every=1, keep_last=3) as ckpt:
    with pytest.raises(kc.CheckpointCorruptedError) as info:
      ckpt.restore(_template())
    message = str(info.value)
    assert "step 2" in message and str(tmp_path / "2") in message
    assert info.value.step == 2
    restored = ckpt.restore(_template(), fallback=True)
    assert restored.step == 1 and restored.skipped_steps == (2,)
    assert _host(restored.state) == _host(good)
    # The broken step is set aside (kept for inspection); step 2 can be
    # written again by the resumed run.
    assert ckpt.all_steps() == [1]
    assert (tmp_path / "corrupted" / "2").is_dir()
    assert ckpt.save(newer, step=2)
    ckpt.wait_until_finished()
    assert _host(ckpt.restore(_template()).state) == _host(newer)
  gc.collect()  # collect orbax's un-awaited reads here, under the filter


def test_every_step_corrupted(tmp_path):
  with kc.DistillCheckpointer(tmp_path, save_every=1) as ckpt:
    ckpt.save(_state(), step=1)
  _truncate(os.path.join(tmp_path, "1", "state", "manifest.ocdbt"))
  with kc.DistillCheckpointer(tmp_path) as ckpt:
    with pytest.raises(kc.CheckpointCorruptedError, match="no restorable"):
      ckpt.restore(_template(), fallback=True)
  gc.collect()


def test_changed_teacher_refused_unless_forced(tmp_path):
  teacher, other = _variables(seed=10), _variables(seed=11)
  with kc.DistillCheckpointer(tmp_path, teacher=teacher) as ckpt:
    ckpt.save(_state(), force=True)
  with kc.DistillCheckpointer(tmp_path, teacher=teacher) as ckpt:
    assert ckpt.restore(_template()).step == 1
  with kc.DistillCheckpointer(tmp_path, teacher=other) as ckpt:
    with pytest.raises(kc.TeacherMismatchError, match="allow_teacher_change"):
      ckpt.restore(_template())
    with pytest.raises(kc.TeacherMismatchError):  # never a "corruption"
      ckpt.restore(_template(), fallback=True)
    assert ckpt.restore(_template(), allow_teacher_change=True).step == 1
  fingerprint = kc.tree_fingerprint(teacher)
  with kc.DistillCheckpointer(tmp_path, teacher_fingerprint=fingerprint) as ckpt:
    assert ckpt.read_meta(1)["teacher_fingerprint"] == fingerprint


def test_template_mismatch_lists_leaves(tmp_path):
  with kc.DistillCheckpointer(tmp_path) as ckpt:
    ckpt.save(_state(), force=True)
    wider = jax.tree.map(jnp.zeros_like, _state(hidden=5))
    with pytest.raises(kc.StructureMismatchError) as info:
      ckpt.restore(wider)
  message = str(info.value)
  assert "params/dense/kernel: checkpoint (3, 4) float32, model (3, 5) float32" in message
  assert "opt_state/0/mu/student/dense/bias" in message


def test_restore_errors(tmp_path):
  with kc.DistillCheckpointer(tmp_path) as ckpt:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
      ckpt.restore(_template())
    ckpt.save(_state(), step=4, force=True)
    with pytest.raises(FileNotFoundError, match=r"available steps: \[4\]"):
      ckpt.restore(_template(), step=3)
    with pytest.raises(ValueError, match="no data iterator state"):
      ckpt.restore(_template(),
                   data_iterator=kc.ArrayBatchIterator({"x": np.arange(4)}, 2))
  with pytest.raises(ValueError, match="keep_last"):
    kc.DistillCheckpointer(tmp_path, keep_last=0)
  with pytest.raises(TypeError, match="JSON"):
    kc.DistillCheckpointer(tmp_path, config={"fn": print})


def test_export_student_alone(tmp_path):
  state = _state()
  path = kc.export_student(state, tmp_path / "export")
  plain = ocp.StandardCheckpointer().restore(path)  # readable without kdjax
  assert set(plain) == {"params", "batch_stats"}
  assert _host(plain) == _host(state.student_variables())
  ema = kc.export_student(state, tmp_path / "ema", use_ema=True)
  assert _host(ocp.StandardCheckpointer().restore(ema)) == _host(
      state.ema_variables())
  with pytest.raises(FileExistsError):
    kc.export_student(state, tmp_path / "export")


def test_restore_teacher_from_export_and_run(tmp_path):
  state = _state()
  kc.export_student(state, tmp_path / "export")
  with kc.DistillCheckpointer(tmp_path / "run") as ckpt:
    ckpt.save(state, force=True)
  target = jax.eval_shape(lambda: _variables())
  for source in (tmp_path / "export", tmp_path / "run", tmp_path / "run" / "1"):
    teacher = kc.restore_teacher(source, target)
    assert _host(teacher) == _host(state.student_variables()), source
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(teacher))
  # Params only: asking for the params restores nothing else.
  params_only = kc.restore_teacher(tmp_path / "run",
                                   {"params": target["params"]})
  assert set(params_only) == {"params"}


def test_restore_teacher_shape_mismatch_lists_leaves(tmp_path):
  kc.export_student(_state(), tmp_path / "export")
  wrong = jax.eval_shape(lambda: _variables(hidden=6))
  with pytest.raises(kc.TeacherMismatchError) as info:
    kc.restore_teacher(tmp_path / "export", wrong)
  message = str(info.value)
  for line in ("params/dense/kernel: checkpoint (3, 4) float32, model (3, 6) float32",
               "params/dense/bias: checkpoint (4,) float32, model (6,) float32",
               "batch_stats/mean: checkpoint (4,) float32, model (6,) float32"):
    assert line in message
  assert "params/big" not in message
  extra_leaf = dict(jax.eval_shape(lambda: _variables()))
  extra_leaf["params"] = {**extra_leaf["params"],
                          "head": jax.ShapeDtypeStruct((2,), jnp.float32)}
  with pytest.raises(kc.TeacherMismatchError, match="missing from the checkpoint"):
    kc.restore_teacher(tmp_path / "export", extra_leaf)
  with pytest.raises(FileNotFoundError):
    kc.restore_teacher(tmp_path / "nowhere", wrong)
