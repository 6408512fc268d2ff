"""The token cache (kdjax/lm/_token_cache.py) and LMBatches over it."""

from __future__ import annotations

import json
import os
import tracemalloc

import chex
import numpy as np
import pytest

from kdjax import lm
from kdjax.lm import _token_cache

B_ = 257  # the byte tokenizer's BOS
SEQ_LEN = 8


def _examples(n, seed=0):
  """``n`` examples of varied lengths (some longer than ``SEQ_LEN + 1``:
  truncated in the batches), ids in [0, 300)."""
  rng = np.random.default_rng(seed)
  prompts, completions = [], []
  for _ in range(n):
    p = int(rng.integers(1, 5))
    c = int(rng.integers(1, 10))
    prompts.append([B_] + rng.integers(0, 300, p - 1).tolist())
    completions.append(rng.integers(0, 300, c).tolist())
  return prompts, completions


def _write(path, prompts, completions, **kw):
  kw.setdefault("fingerprint", {"data": "test", "seq_len": SEQ_LEN})
  return lm.write_token_cache(path, zip(prompts, completions), **kw)


def _no_temporaries(parent):
  return [name for name in os.listdir(parent) if ".tmp-" in name
          or ".old-" in name] == []


# -----------------------------------------------------------------------------
# Writing and reading.
# -----------------------------------------------------------------------------


def test_round_trip_equals_the_examples(tmp_path):
  prompts, completions = _examples(30)
  cache = _write(tmp_path / "c", prompts, completions, shard_examples=7,
                 metadata={"skipped": 2})
  assert len(cache) == 30 and len(cache.manifest["shards"]) == 5  # 7*4 + 2
  for i in range(30):
    p, c = cache.example(i)
    assert p.dtype == c.dtype == np.int32
    assert p.tolist() == prompts[i] and c.tolist() == completions[i]
    assert cache.prompts[i].tolist() == prompts[i]
    assert cache.completions[i].tolist() == completions[i]
  assert cache[-1][1].tolist() == completions[-1]
  with pytest.raises(IndexError):
    cache.example(30)
  assert [p.tolist() for p, _ in cache] == prompts  # a Sequence
  prompt_lens, completion_lens = cache.lengths()
  assert prompt_lens.tolist() == [len(p) for p in prompts]
  assert completion_lens.tolist() == [len(c) for c in completions]
  assert cache.num_tokens == sum(map(len, prompts + completions))
  assert cache.metadata == {"skipped": 2}
  assert cache.fingerprint == lm.token_cache_fingerprint(
      {"seq_len": SEQ_LEN, "data": "test"})  # key order does not matter
  assert cache.fingerprint_parts == {"data": "test", "seq_len": SEQ_LEN}
  reopened = lm.open_token_cache(tmp_path / "c")
  assert all(isinstance(a, np.memmap) for a in reopened._tokens)
  chex.assert_trees_all_equal(reopened.example(12), cache.example(12))
  assert _no_temporaries(tmp_path)


def test_the_on_disk_format(tmp_path):
  cache = lm.write_token_cache(
      tmp_path / "c", [([1, 2], [3]), (np.array([4], np.int64), [])],
      fingerprint="fp-1")
  with open(tmp_path / "c" / "manifest.json", encoding="utf-8") as f:
    manifest = json.load(f)
  assert manifest["format"] == "kdjax.lm.token_cache"
  assert manifest["version"] == 1 and manifest["fingerprint"] == "fp-1"
  assert manifest["shards"] == [{"name": "shard-00000", "num_examples": 2,
                                 "num_tokens": 4}]
  shard = tmp_path / "c" / "shard-00000"
  np.testing.assert_array_equal(np.load(shard / "tokens.npy"), [1, 2, 3, 4])
  assert np.load(shard / "tokens.npy").dtype == np.int32
  np.testing.assert_array_equal(np.load(shard / "offsets.npy"), [0, 3, 4])
  np.testing.assert_array_equal(np.load(shard / "prompt_lens.npy"), [2, 1])
  assert cache[1][1].size == 0


def test_bad_ids_leave_nothing(tmp_path):
  for bad, match in (([[1], [-1]], "example 1: token id -1"),
                     ([[1], [2**31]], "example 1: token id 2147483648 is"),
                     ([[1], [2**63]], "example 1: token ids must be"),
                     ([[1], [0.5]], "example 1: token ids must be")):
    pairs = [([1, 2], [3]), tuple(bad)]
    with pytest.raises(ValueError, match=match):
      lm.write_token_cache(tmp_path / "c", pairs, fingerprint="x")
    assert not os.path.exists(tmp_path / "c") and _no_temporaries(tmp_path)


# -----------------------------------------------------------------------------
# Atomicity and fingerprints.
# -----------------------------------------------------------------------------


def test_a_failed_write_leaves_no_cache(tmp_path):
  prompts, completions = _examples(20)

  def dying():
    for i, pair in enumerate(zip(prompts, completions)):
      if i == 13:  # two shards of 5 written, a third begun
        raise KeyboardInterrupt("killed")
      yield pair

  with pytest.raises(KeyboardInterrupt):
    lm.write_token_cache(tmp_path / "c", dying(), fingerprint="x",
                         shard_examples=5)
  assert not os.path.exists(tmp_path / "c") and _no_temporaries(tmp_path)
  with pytest.raises(lm.TokenCacheError, match="no token cache there"):
    lm.open_token_cache(tmp_path / "c")
  # A killed process leaves its temporary directory: shards, no manifest.
  tmp = tmp_path / ".c.tmp-killed"
  os.mkdir(tmp)
  with pytest.raises(KeyboardInterrupt):
    _token_cache._write(str(tmp), dying(), 5, {"format": "x"})
  assert os.path.exists(tmp / "shard-00001" / "tokens.npy")
  with pytest.raises(lm.TokenCacheError, match="no token cache there"):
    lm.open_token_cache(tmp)
  # ... which neither looks like the cache nor stops the next write.
  cache = _write(tmp_path / "c", prompts, completions, shard_examples=5)
  assert len(cache) == 20


def test_a_directory_that_is_not_a_cache_is_never_overwritten(tmp_path):
  os.mkdir(tmp_path / "c")
  (tmp_path / "c" / "notes.txt").write_text("mine")
  with pytest.raises(lm.TokenCacheError, match=r"c exists and is not a token "
                     "cache"):
    lm.write_token_cache(tmp_path / "c", [([1], [2])], fingerprint="x",
                         on_mismatch="rebuild")
  assert os.listdir(tmp_path / "c") == ["notes.txt"]
  os.mkdir(tmp_path / "empty")  # an empty directory is filled
  assert len(lm.write_token_cache(tmp_path / "empty", [([1], [2])],
                                  fingerprint="x")) == 1


def test_the_same_fingerprint_reuses_the_cache(tmp_path):
  prompts, completions = _examples(10)
  _write(tmp_path / "c", prompts, completions)

  def never():
    raise AssertionError("the examples were read again")
    yield  # pylint: disable=unreachable

  cache = lm.write_token_cache(
      tmp_path / "c", never(), fingerprint={"seq_len": SEQ_LEN,
                                            "data": "test"})
  assert len(cache) == 10
  assert cache.example(3)[0].tolist() == prompts[3]


def test_another_fingerprint_is_refused_or_rebuilt(tmp_path):
  prompts, completions = _examples(10)
  _write(tmp_path / "c", prompts, completions)
  other = {"data": "test", "seq_len": 16}
  with pytest.raises(lm.TokenCacheMismatchError) as e:
    lm.write_token_cache(tmp_path / "c", [([1], [2])], fingerprint=other)
  message = str(e.value)
  assert str(tmp_path / "c") in message
  assert "seq_len (8 -> 16)" in message and "on_mismatch='rebuild'" in message
  assert "data" not in message.split("differing:")[1]
  assert issubclass(lm.TokenCacheMismatchError, lm.TokenCacheError)
  with pytest.raises(lm.TokenCacheMismatchError, match="other inputs"):
    lm.open_token_cache(tmp_path / "c", fingerprint=other)
  assert len(lm.open_token_cache(tmp_path / "c")) == 10  # left as it was
  cache = lm.write_token_cache(tmp_path / "c", [([1], [2, 3])],
                               fingerprint=other, on_mismatch="rebuild")
  assert len(cache) == 1 and cache.example(0)[1].tolist() == [2, 3]
  assert lm.open_token_cache(tmp_path / "c", fingerprint=other).fingerprint \
      == lm.token_cache_fingerprint(other)
  assert _no_temporaries(tmp_path)
  with pytest.raises(ValueError, match="on_mismatch='replace'"):
    lm.write_token_cache(tmp_path / "c", [], fingerprint="x",
                         on_mismatch="replace")


def test_a_concurrent_writer_of_the_same_inputs_is_reused(tmp_path):
  prompts, completions = _examples(6)

  def racing():  # another process finishes the same cache first
    yield from zip(prompts, completions)
    _write(tmp_path / "c", prompts, completions)

  cache = lm.write_token_cache(tmp_path / "c", racing(), fingerprint={
      "data": "test", "seq_len": SEQ_LEN})
  assert len(cache) == 6 and _no_temporaries(tmp_path)


def test_another_format_version_is_refused(tmp_path):
  _write(tmp_path / "c", *_examples(3))
  path = tmp_path / "c" / "manifest.json"
  manifest = json.loads(path.read_text())
  path.write_text(json.dumps(dict(manifest, version=99)))
  with pytest.raises(lm.TokenCacheError, match="format version 99"):
    lm.open_token_cache(tmp_path / "c")
  with pytest.raises(lm.TokenCacheMismatchError, match="format version 99"):
    _write(tmp_path / "c", *_examples(3))


# -----------------------------------------------------------------------------
# LMBatches over a cache.
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("pack", [False, True])
def test_batches_of_a_cache_equal_batches_of_the_lists(tmp_path, pack):
  prompts, completions = _examples(23)
  cache = _write(tmp_path / "c", prompts, completions, shard_examples=6)
  lists = lm.LMBatches(prompts, completions, 3, SEQ_LEN, 256, seed=4,
                       pack=pack)
  cached = lm.LMBatches.from_examples(cache, 3, SEQ_LEN, 256, seed=4,
                                      pack=pack)
  pairs = lm.LMBatches(list(zip(prompts, completions)), None, 3, SEQ_LEN,
                       256, seed=4, pack=pack)  # a generic source
  assert cached.packed_rows == lists.packed_rows == pairs.packed_rows
  assert cached.steps_per_epoch == lists.steps_per_epoch >= 2
  steps = 2 * lists.steps_per_epoch + 1  # two epoch boundaries
  expected = [next(lists) for _ in range(steps)]
  chex.assert_trees_all_equal([next(cached) for _ in range(steps)], expected)
  chex.assert_trees_all_equal([next(pairs) for _ in range(steps)], expected)
  assert cached.get_state() == lists.get_state()
  for step in (0, steps - 1):
    chex.assert_trees_all_equal(cached.batch_at(step), expected[step])
  if pack:
    assert lm.is_packed(expected[0])


def test_packing_a_cache_reads_no_token(tmp_path, monkeypatch):
  prompts, completions = _examples(40)
  cache = _write(tmp_path / "c", prompts, completions)

  def no_read(*args):
    raise AssertionError("a token was read")

  monkeypatch.setattr(cache, "_read", no_read)
  batches = lm.LMBatches.from_examples(cache, 4, SEQ_LEN, 256, seed=0,
                                       pack=True)
  assert batches.packed_rows == lm.pack_examples(prompts, completions,
                                                 SEQ_LEN)


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("k", [0, 3, 7])
def test_resume_of_a_cache_equals_the_uninterrupted_batches(tmp_path, pack,
                                                            k):
  cache = _write(tmp_path / "c", *_examples(17))
  first = lm.LMBatches.from_examples(cache, 2, SEQ_LEN, 256, seed=9,
                                     pack=pack)
  for _ in range(k):  # k = 7 crosses an epoch boundary
    next(first)
  state = json.loads(json.dumps(first.get_state()))  # as in a checkpoint
  expected = [next(first) for _ in range(5)]
  resumed = lm.LMBatches.from_examples(lm.open_token_cache(tmp_path / "c"),
                                       2, SEQ_LEN, 256, seed=9, pack=pack)
  resumed.set_state(state)
  chex.assert_trees_all_equal([next(resumed) for _ in range(5)], expected)


@pytest.mark.parametrize("pack", [False, True])
@pytest.mark.parametrize("count", [2, 4])
def test_process_slices_concatenate_to_the_global_batch(tmp_path, pack,
                                                        count):
  prompts, completions = _examples(37)
  cache = _write(tmp_path / "c", prompts, completions, shard_examples=10)
  one = lm.LMBatches(prompts, completions, 4, SEQ_LEN, 256, seed=2,
                     pack=pack)
  steps = 2 * one.steps_per_epoch + 1
  expected = [next(one) for _ in range(steps)]
  for source in ("lists", "cache"):
    parts = []
    for p in range(count):
      if source == "lists":
        b = lm.LMBatches(prompts, completions, 4, SEQ_LEN, 256, seed=2,
                         pack=pack, process_index=p, process_count=count)
      else:
        b = lm.LMBatches.from_examples(cache, 4, SEQ_LEN, 256, seed=2,
                                       pack=pack, process_index=p,
                                       process_count=count)
      assert b.local_batch_size == 4 // count
      assert b.steps_per_epoch == one.steps_per_epoch
      parts.append([next(b) for _ in range(steps)])
      chex.assert_trees_all_equal(b.batch_at(1), parts[-1][1])
    for step in range(steps):
      glued = {key: np.concatenate([parts[p][step][key]
                                    for p in range(count)])
               for key in expected[step]}
      chex.assert_trees_all_equal(glued, expected[step])
      assert parts[0][step]["tokens"].shape[0] == 4 // count


def test_process_arguments_are_checked():
  prompts, completions = _examples(10)
  with pytest.raises(ValueError, match=r"divisible by process_count \(3\)"):
    lm.LMBatches(prompts, completions, 4, SEQ_LEN, 256, 0, process_count=3)
  with pytest.raises(ValueError, match=r"process_index \(2\) must be"):
    lm.LMBatches(prompts, completions, 4, SEQ_LEN, 256, 0, process_index=2,
                 process_count=2)


def test_pack_lengths_is_pack_examples():
  prompts, completions = _examples(50, seed=3)
  assert lm.pack_lengths([len(p) for p in prompts],
                         [len(c) for c in completions], SEQ_LEN) == \
      lm.pack_examples(prompts, completions, SEQ_LEN)
  for bad in ([], list(range(SEQ_LEN + 1))):  # empty, too long
    prompts_bad = prompts[:3] + [bad] + [[]]
    with pytest.raises(ValueError, match="prompt 3") as want:
      lm.pack_examples(prompts_bad, completions[:5], SEQ_LEN)
    with pytest.raises(ValueError) as got:
      lm.pack_lengths([len(p) for p in prompts_bad],
                      [len(c) for c in completions[:5]], SEQ_LEN)
    assert str(got.value) == str(want.value)
  with pytest.raises(ValueError, match="completion 1 has a negative length"):
    lm.pack_lengths([1, 1], [0, -1], SEQ_LEN)


# -----------------------------------------------------------------------------
# Memory.
# -----------------------------------------------------------------------------


def test_batches_of_a_large_cache_do_not_load_it(tmp_path):
  n, prompt, completion = 200_000, (B_, 1, 2, 3), tuple(range(4, 32))
  lm.write_token_cache(tmp_path / "c",
                       ((prompt, completion) for _ in range(n)),
                       fingerprint="big", shard_examples=1 << 16)
  cache = lm.open_token_cache(tmp_path / "c")
  token_bytes = cache.num_tokens * 4
  assert len(cache) == n and token_bytes == 25_600_000
  assert all(isinstance(a, np.memmap) for a in cache._tokens)
  tracemalloc.start()
  try:
    batches = lm.LMBatches.from_examples(cache, 64, SEQ_LEN, 256, seed=0)
    for _ in range(3):
      batch = next(batches)
    batch = batches.batch_at(batches.steps_per_epoch + 1)
    _, peak = tracemalloc.get_traced_memory()
  finally:
    tracemalloc.stop()
  # Two epochs' permutations (8 bytes an example: the iterator's and
  # batch_at's) and a few small batches.
  assert peak < 16 * n + 1_000_000 < token_bytes / 4
  np.testing.assert_array_equal(batch["tokens"][0], list(prompt)
                                + list(completion[:SEQ_LEN - 4]))
