"""Tests of the teacher fingerprint and the per-leaf checksums."""

from __future__ import annotations

import hashlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import checkpoint as kc


def _reference_fingerprint(named_arrays: dict) -> str:
  digest = hashlib.sha256()
  for name in sorted(named_arrays):
    value = np.ascontiguousarray(named_arrays[name])
    digest.update(name.encode())
    digest.update(repr(tuple(value.shape)).encode())
    digest.update(value.dtype.str.encode())
    digest.update(value.tobytes())
  return digest.hexdigest()


def _reference_checksum(words: np.ndarray) -> int:
  """sum_i u_i * ((i * 0x9E3779B1) | 1) mod 2^32, in Python integers."""
  words = [int(w) for w in np.asarray(words).reshape(-1)]
  total = 0
  for i, u in enumerate(words):
    total += u * (((i * 0x9E3779B1) % 2**32) | 1)
  return total % 2**32


def _teacher():
  rng = np.random.default_rng(0)
  return {"params": {"dense": {"kernel": rng.normal(size=(3, 4)).astype(np.float32),
                               "bias": np.zeros(4, np.float32)}},
          "batch_stats": {"mean": np.arange(4, dtype=np.float32)}}


def test_fingerprint_matches_reference_and_ignores_order():
  teacher = _teacher()
  expected = _reference_fingerprint({
      "params/dense/kernel": teacher["params"]["dense"]["kernel"],
      "params/dense/bias": teacher["params"]["dense"]["bias"],
      "batch_stats/mean": teacher["batch_stats"]["mean"]})
  assert kc.tree_fingerprint(teacher) == expected
  reordered = {"batch_stats": teacher["batch_stats"],
               "params": {"dense": {"bias": teacher["params"]["dense"]["bias"],
                                    "kernel": teacher["params"]["dense"]["kernel"]}}}
  assert kc.tree_fingerprint(reordered) == expected
  on_device = jax.tree.map(jnp.asarray, teacher)
  assert kc.tree_fingerprint(on_device) == expected


def test_fingerprint_sees_values_shapes_dtypes_names():
  base = kc.tree_fingerprint(_teacher())
  flipped = _teacher()
  flipped["params"]["dense"]["kernel"].view(np.uint32)[1, 2] ^= 1
  reshaped = _teacher()
  reshaped["params"]["dense"]["kernel"] = reshaped["params"]["dense"]["kernel"].reshape(4, 3)
  retyped = _teacher()
  retyped["batch_stats"]["mean"] = retyped["batch_stats"]["mean"].view(np.int32)
  renamed = _teacher()
  renamed["batch_stats"] = {"var": renamed["batch_stats"].pop("mean")}
  prints = {kc.tree_fingerprint(t) for t in (flipped, reshaped, retyped, renamed)}
  assert base not in prints and len(prints) == 4
  with pytest.raises(TypeError, match="concrete"):
    kc.tree_fingerprint(jax.eval_shape(_teacher))


@pytest.mark.parametrize("dtype,view", [
    (np.float32, np.uint32), (np.int32, np.uint32), (jnp.bfloat16, np.uint16),
    (np.uint8, np.uint8), (np.float16, np.uint16)])
def test_checksums_match_reference(dtype, view):
  x = (np.arange(37) * 7.25 - 100).astype(dtype).reshape(37, 1)
  sums = kc.tree_checksums({"a": jnp.asarray(x)})
  assert sums == {"a": _reference_checksum(np.asarray(x).view(view))}


def test_checksums_of_bool_and_prng_key():
  mask = np.array([True, False, True, True])
  key = jax.random.key(3)
  sums = kc.tree_checksums({"mask": jnp.asarray(mask), "rng": key})
  assert sums["mask"] == _reference_checksum(mask.astype(np.uint32))
  assert sums["rng"] == _reference_checksum(
      np.asarray(jax.random.key_data(key)))


def test_every_single_bit_flip_changes_the_checksum():
  x = np.random.default_rng(1).normal(size=(5,)).astype(np.float32)
  base = kc.tree_checksums({"x": jnp.asarray(x)})["x"]
  for i in range(x.size):
    for bit in range(32):
      y = x.copy()
      y.view(np.uint32)[i] ^= np.uint32(1 << bit)
      assert kc.tree_checksums({"x": jnp.asarray(y)})["x"] != base, (i, bit)
  swapped = x[::-1].copy()
  assert kc.tree_checksums({"x": jnp.asarray(swapped)})["x"] != base
