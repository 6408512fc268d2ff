"""InputPipeline: determinism, resumption, per-process sharding, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from _data_helpers import REAL_DIR, needs_real  # noqa: E402
from kdjax.data import DataError
from kdjax.data.pipeline import ArraySource
from kdjax.data.pipeline import InputPipeline
from kdjax.data.pipeline import fashion_mnist_source
from kdjax.data.pipeline import shard_range

pytest.importorskip("grain")

N = 37


@pytest.fixture(scope="module")
def arrays():
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (N, 6, 5), dtype=np.uint8)
  labels = rng.integers(0, 10, (N,)).astype(np.int64)
  return images, labels


def _pipe(arrays, **kw):
  opts = dict(batch_size=4, seed=0, process_index=0, process_count=1)
  opts.update(kw)
  return InputPipeline(ArraySource(*arrays), **opts)


def _indices(batches):
  return np.concatenate([b["index"] for b in batches])


def test_batches_match_numpy_reference(arrays):
  images, labels = arrays
  batches = list(_pipe(arrays, num_epochs=1, mean=0.25, std=0.5))
  assert len(batches) == N // 4
  for b in batches:
    assert b["image"].shape == (4, 6, 5, 1) and b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32 and b["index"].dtype == np.int32
    ref = (images[b["index"]].astype(np.float64) / 255.0 - 0.25) / 0.5
    np.testing.assert_allclose(b["image"][..., 0], ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(b["label"], labels[b["index"]])
  seen = _indices(batches)
  assert len(set(seen.tolist())) == len(seen) == 4 * (N // 4)  # no repeats.


def test_epochs_are_permutations_and_unshuffled_order(arrays):
  batches = list(_pipe(arrays, num_epochs=3, drop_remainder=False))
  assert len(batches) == 3 * 10 and batches[9]["index"].shape == (1,)
  per_epoch = _indices(batches).reshape(3, N)
  for epoch in per_epoch:
    np.testing.assert_array_equal(np.sort(epoch), np.arange(N))
  assert not np.array_equal(per_epoch[0], per_epoch[1])  # reshuffled.
  assert not np.array_equal(per_epoch[0], np.arange(N))
  plain = list(_pipe(arrays, num_epochs=2, shuffle=False, drop_remainder=False))
  np.testing.assert_array_equal(_indices(plain), np.tile(np.arange(N), 2))


def test_order_is_deterministic_for_a_seed_and_differs_across_seeds(arrays):
  def order(seed):
    return _indices(list(_pipe(arrays, seed=seed, num_epochs=2)))
  np.testing.assert_array_equal(order(3), order(3))
  assert not np.array_equal(order(3), order(4))
  # grain reseeds epoch e with seed' + e: seed 3's second epoch must not be
  # seed 4's first.
  p3 = _pipe(arrays, seed=3, num_epochs=2, drop_remainder=False)
  p4 = _pipe(arrays, seed=4, num_epochs=1, drop_remainder=False)
  assert not np.array_equal(_indices(list(p3))[N:], _indices(list(p4)))


@pytest.mark.parametrize("read_threads", [0, 2])
def test_resume_from_state_reproduces_remaining_batches(arrays, read_threads):
  full = list(_pipe(arrays, seed=7, num_epochs=3))
  steps = len(full)
  for k in (0, 5, 9, steps - 1):  # 9 = first batch of epoch 2.
    p = _pipe(arrays, seed=7, num_epochs=3, read_threads=read_threads)
    for _ in range(k):
      next(p)
    state = json.loads(json.dumps(p.get_state()))  # checkpointable.
    assert state["step"] == k
    resumed = _pipe(arrays, seed=7, num_epochs=3, read_threads=read_threads)
    resumed.set_state(state)
    rest = list(resumed)
    assert len(rest) == steps - k
    for a, b in zip(rest, full[k:]):
      for key in ("image", "label", "index"):
        np.testing.assert_array_equal(a[key], b[key])
  assert np.array_equal(_pipe(arrays, seed=7).batch_at(11)["index"],
                        full[11]["index"])


def test_set_state_rejects_other_pipelines(arrays):
  state = _pipe(arrays, seed=1).get_state()
  with pytest.raises(ValueError, match="seed=1 vs 2"):
    _pipe(arrays, seed=2).set_state(state)
  with pytest.raises(ValueError, match="batch_size"):
    _pipe(arrays, seed=1, batch_size=5).set_state(state)
  with pytest.raises(KeyError, match="step"):
    _pipe(arrays, seed=1).set_state({"seed": 1})


def test_shard_range_hand_computed():
  assert [shard_range(10, p, 3) for p in range(3)] == [(0, 3), (3, 6), (6, 9)]
  assert [shard_range(10, p, 3, drop_remainder=False) for p in range(3)] == [
      (0, 4), (4, 7), (7, 10)]
  with pytest.raises(ValueError, match="process_index"):
    shard_range(10, 3, 3)
  with pytest.raises(ValueError, match="process_count"):
    shard_range(10, 0, 0)


@pytest.mark.parametrize("shard_drop_remainder", [True, False])
def test_two_processes_partition_the_data(arrays, shard_drop_remainder):
  epochs = []
  for p in range(2):
    pipe = _pipe(arrays, batch_size=3, seed=11, num_epochs=1,
                 drop_remainder=False, process_index=p, process_count=2,
                 shard_drop_remainder=shard_drop_remainder)
    epochs.append(_indices(list(pipe)))
  a, b = (set(e.tolist()) for e in epochs)
  assert not a & b
  assert len(a) == len(epochs[0]) and len(b) == len(epochs[1])
  if shard_drop_remainder:  # equal shards: processes stay in lockstep.
    assert len(a) == len(b) == N // 2
    assert a | b == set(range(2 * (N // 2)))
  else:
    assert a | b == set(range(N))
  # Contiguous shards: N = 37 -> [0, 18) + [18, 36), or [0, 19) + [19, 37).
  assert a == set(range(18 if shard_drop_remainder else 19))


def test_stepping_properties_and_stop(arrays):
  p = _pipe(arrays, batch_size=5, num_epochs=2)
  assert p.steps_per_epoch == N // 5 and p.num_examples == N
  for _ in range(p.steps_per_epoch + 1):
    next(p)
  assert p.epoch == 1 and p.step == p.steps_per_epoch + 1
  assert len(list(p)) == p.steps_per_epoch - 1
  with pytest.raises(StopIteration):
    next(p)


def test_bad_labels_and_bad_options(arrays):
  images, labels = arrays
  bad = labels.copy()
  bad[6] = 10
  with pytest.raises(DataError, match=r"outside \[0, 10\).*label 10 of example 6"):
    list(_pipe((images, bad), shuffle=False, num_epochs=1))
  with pytest.raises(DataError, match="label -1"):
    bad[6] = -1
    list(_pipe((images, bad), shuffle=False, num_epochs=1))
  with pytest.raises(ValueError, match="batch_size=40 exceeds"):
    _pipe(arrays, batch_size=40)
  with pytest.raises(ValueError, match="seed"):
    _pipe(arrays, seed=-1)
  with pytest.raises(ValueError, match="images"):
    ArraySource(images[0], labels)
  with pytest.raises(KeyError, match="'pixels'"):
    list(_pipe(arrays, image_key="pixels", num_epochs=1))


@needs_real
def test_fashion_mnist_source_real_test_split():
  source = fashion_mnist_source("test", REAL_DIR)
  assert len(source) == 10000
  batch = next(InputPipeline(source, 16, seed=0, process_index=0,
                             process_count=1))
  assert batch["image"].shape == (16, 28, 28, 1)
  assert batch["label"].min() >= 0 and batch["label"].max() < 10
  # Normalised with the training statistics: roughly zero mean, unit std.
  assert abs(float(batch["image"].mean())) < 0.5
  assert 0.5 < float(batch["image"].std()) < 1.5
