"""Tests of kdjax.checkpoint.ArrayBatchIterator and the ResumableIterator protocol."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from kdjax import checkpoint as kc


def _data(n=10):
  return {"x": np.arange(n) * 10, "y": np.arange(n)[:, None] * np.ones((1, 2))}


def _reference_batches(n, batch_size, seed, shuffle, drop_remainder, count):
  """Independent NumPy reference of the documented order."""
  out, epoch = [], 0
  while len(out) < count:
    order = (np.random.default_rng([seed, epoch]).permutation(n) if shuffle
             else np.arange(n))
    stop = n - n % batch_size if drop_remainder else n
    for start in range(0, stop, batch_size):
      out.append(order[start:start + batch_size])
    epoch += 1
  return out[:count]


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("drop_remainder", [True, False])
def test_matches_reference_order(shuffle, drop_remainder):
  it = kc.ArrayBatchIterator(_data(), 3, seed=4, shuffle=shuffle,
                             drop_remainder=drop_remainder)
  expected = _reference_batches(10, 3, 4, shuffle, drop_remainder, 14)
  for idx in expected:
    batch = next(it)
    np.testing.assert_array_equal(batch["x"], idx * 10)
    np.testing.assert_array_equal(batch["y"], idx[:, None] * np.ones((1, 2)))


def test_epoch_coverage_and_sizes():
  it = kc.ArrayBatchIterator(_data(), 3, seed=0, drop_remainder=False)
  assert it.steps_per_epoch == 4
  epoch = [next(it)["x"] for _ in range(4)]
  assert [len(b) for b in epoch] == [3, 3, 3, 1]
  np.testing.assert_array_equal(np.sort(np.concatenate(epoch)),
                                np.arange(10) * 10)
  it = kc.ArrayBatchIterator(_data(), 3, seed=0)
  assert it.steps_per_epoch == 3
  assert all(len(next(it)["x"]) == 3 for _ in range(9))
  # Two epochs are permuted differently.
  it = kc.ArrayBatchIterator(_data(), 10, seed=0)
  assert not np.array_equal(next(it)["x"], next(it)["x"])


@pytest.mark.parametrize("consumed", [0, 1, 2, 3, 4, 7, 11])
@pytest.mark.parametrize("drop_remainder", [True, False])
def test_resume_continues_identically(consumed, drop_remainder):
  original = kc.ArrayBatchIterator(_data(), 3, seed=9,
                                   drop_remainder=drop_remainder)
  for _ in range(consumed):
    next(original)
  state = json.loads(json.dumps(original.get_state()))  # as checkpointed
  resumed = kc.ArrayBatchIterator(_data(), 3, seed=9,
                                  drop_remainder=drop_remainder)
  resumed.set_state(state)
  for _ in range(8):
    a, b = next(original), next(resumed)
    np.testing.assert_array_equal(a["x"], b["x"])
  assert resumed.get_state() == original.get_state()


def test_position_is_epoch_and_index():
  it = kc.ArrayBatchIterator(_data(), 4, seed=1)
  assert (it.get_state()["epoch"], it.get_state()["index"]) == (0, 0)
  next(it), next(it)
  assert (it.get_state()["epoch"], it.get_state()["index"]) == (0, 8)
  next(it)  # 2 examples left < 4: the next epoch starts
  assert (it.get_state()["epoch"], it.get_state()["index"]) == (1, 4)


def test_num_epochs_stops():
  it = kc.ArrayBatchIterator(_data(), 5, seed=1, num_epochs=2)
  assert len(list(it)) == 4
  with pytest.raises(StopIteration):
    next(it)


def test_resume_refuses_other_options():
  it = kc.ArrayBatchIterator(_data(), 3, seed=1)
  state = it.get_state()
  for kwargs in ({"seed": 2}, {"batch_size": 2}, {"shuffle": False}):
    options = {"batch_size": 3, "seed": 1, **kwargs}
    other = kc.ArrayBatchIterator(_data(), **options)
    with pytest.raises(ValueError, match=next(iter(kwargs))):
      other.set_state(state)
  with pytest.raises(ValueError, match="num_examples"):
    kc.ArrayBatchIterator(_data(12), 3, seed=1).set_state(state)
  with pytest.raises(KeyError, match="index"):
    it.set_state({"epoch": 0})
  with pytest.raises(ValueError, match="out of range"):
    it.set_state({"epoch": 0, "index": 11})


def test_bad_construction():
  with pytest.raises(ValueError, match="same leading"):
    kc.ArrayBatchIterator({"a": np.zeros(3), "b": np.zeros(4)}, 2)
  with pytest.raises(ValueError, match="drop_remainder"):
    kc.ArrayBatchIterator({"a": np.zeros(3)}, 4)
  with pytest.raises(ValueError, match="batch_size"):
    kc.ArrayBatchIterator({"a": np.zeros(3)}, 0)
  with pytest.raises(ValueError, match="non-empty"):
    kc.ArrayBatchIterator({}, 1)


def test_protocol():
  assert isinstance(kc.ArrayBatchIterator(_data(), 2), kc.ResumableIterator)
  assert not isinstance(itertools.count(), kc.ResumableIterator)
