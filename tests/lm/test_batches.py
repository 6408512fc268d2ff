"""Token windows and LM batches (kdjax/lm/_batches.py)."""

from __future__ import annotations

import chex
import numpy as np
import pytest

from kdjax import lm

B_, E_ = 257, 258  # the byte tokenizer's BOS and EOS


def _examples(n, seq_len=6, prompt_len=2):
  """``n`` distinct examples: example ``i`` starts with BOS, then ``i``."""
  prompts = [[B_, i] + [0] * (prompt_len - 2) for i in range(n)]
  completions = [[i + 1] * (seq_len + 1 - prompt_len) for i in range(n)]
  return prompts, completions


# -----------------------------------------------------------------------------
# token_windows.
# -----------------------------------------------------------------------------


def test_token_windows_cut_the_stream():
  tok = lm.byte_tokenizer()
  a, b, c, d, e = b"abcde"
  # stream: B a b c E B d e E (9 ids); windows of 5 ids, stride 4.
  prompts, completions = lm.token_windows(["abc", "de"], tok, 4, 2)
  assert prompts == [[B_, a], [E_, B_]]
  assert completions == [[b, c, E_], [d, e, E_]]
  prompts, completions = lm.token_windows(["abc", "de"], tok, 4, 2, limit=1)
  assert (prompts, completions) == ([[B_, a]], [[b, c, E_]])


def test_token_windows_drop_a_short_tail():
  tok = lm.byte_tokenizer()
  assert lm.token_windows(["abc"], tok, 4, 1) == ([[B_]], [[97, 98, 99, E_]])
  assert lm.token_windows(["ab"], tok, 4, 1) == ([], [])  # 4 ids < 5
  prompts, _ = lm.token_windows(["abcdefgh"], tok, 4, 1)  # 10 ids
  assert prompts == [[B_], [100]]  # a third window would need ids 8..12


@pytest.mark.parametrize("prompt_len", [0, 4, 5])
def test_token_windows_prompt_len_range(prompt_len):
  with pytest.raises(ValueError, match=r"prompt_len \(\d\) must be at least "
                     r"1 and smaller than seq_len \(4\)"):
    lm.token_windows(["abc"], lm.byte_tokenizer(), 4, prompt_len)


# -----------------------------------------------------------------------------
# LMBatches.
# -----------------------------------------------------------------------------


def _rows(batch):
  """The example indices of a batch of :func:`_examples`."""
  return [int(t) for t in batch["tokens"][:, 1]]


def test_batches_shuffle_each_epoch_from_seed_and_epoch():
  prompts, completions = _examples(7)
  batches = lm.LMBatches(prompts, completions, 3, 6, 256, seed=5)
  assert batches.steps_per_epoch == 2  # 7 // 3, the remainder dropped
  seen = [_rows(next(batches)) for _ in range(6)]
  for epoch in range(3):
    order = np.random.default_rng([5, epoch]).permutation(7)
    assert seen[2 * epoch] + seen[2 * epoch + 1] == list(order[:6])
  assert seen[:2] != seen[2:4]  # a new order per epoch


def test_batches_are_make_lm_batch():
  prompts, completions = _examples(4)
  batch = next(iter(lm.LMBatches(prompts, completions, 4, 6, 256, seed=0)))
  rows = _rows(batch)
  expected = lm.make_lm_batch([prompts[i] for i in rows],
                              [completions[i] for i in rows], 6, pad_id=256)
  chex.assert_trees_all_equal(batch, expected)


@pytest.mark.parametrize("k", [0, 1, 2, 3, 5])
def test_resume_gives_the_same_next_batches(k):
  prompts, completions = _examples(5)
  first = lm.LMBatches(prompts, completions, 2, 6, 256, seed=3)
  for _ in range(k):  # k crosses epoch boundaries (2 batches per epoch)
    next(first)
  state = first.get_state()
  expected = [next(first) for _ in range(4)]
  resumed = lm.LMBatches(prompts, completions, 2, 6, 256, seed=3)
  resumed.set_state(dict(state))
  chex.assert_trees_all_equal([next(resumed) for _ in range(4)], expected)
  assert resumed.get_state() == first.get_state()


def test_batch_at_is_the_step_s_batch():
  prompts, completions = _examples(5)
  batches = lm.LMBatches(prompts, completions, 2, 6, 256, seed=1)
  expected = [next(batches) for _ in range(5)]
  state = batches.get_state()
  for step in (4, 0, 3):
    chex.assert_trees_all_equal(batches.batch_at(step), expected[step])
  assert batches.get_state() == state  # batch_at does not move it


def test_batch_size_too_large():
  prompts, completions = _examples(4)
  with pytest.raises(lm.BatchSizeError,
                     match=r"batch_size \(5\) exceeds the 4 training "
                     "sequences"):
    lm.LMBatches(prompts, completions, 5, 6, 256, seed=0)
  assert issubclass(lm.BatchSizeError, ValueError)
  with pytest.raises(ValueError, match="at least 1"):
    lm.LMBatches(prompts, completions, 0, 6, 256, seed=0)
  with pytest.raises(ValueError, match="4 prompts but 3 completions"):
    lm.LMBatches(prompts, completions[:3], 2, 6, 256, seed=0)


# -----------------------------------------------------------------------------
# padded_eval_batches and prompt_batch.
# -----------------------------------------------------------------------------


def test_padded_eval_batches_mask_the_padding():
  prompts, completions = _examples(5)
  batches = lm.padded_eval_batches(prompts, completions, 2, 6, 256)
  assert [_rows(b) for b in batches] == [[0, 1], [2, 3], [4, 4]]
  whole = lm.make_lm_batch(prompts, completions, 6, pad_id=256)
  np.testing.assert_array_equal(batches[2]["loss_mask"][0],
                                whole["loss_mask"][4])
  assert not batches[2]["loss_mask"][1].any()
  total = sum(float(b["loss_mask"].sum()) for b in batches)
  assert total == float(whole["loss_mask"].sum())


def test_padded_eval_batches_size_at_most_the_examples():
  prompts, completions = _examples(3)
  (batch,) = lm.padded_eval_batches(prompts, completions, 8, 6, 256)
  chex.assert_shape(batch["tokens"], (3, 6))
  assert batch["loss_mask"].all(axis=1).tolist() == [False] * 3  # prompt
  assert batch["loss_mask"].any(axis=1).tolist() == [True] * 3
  with pytest.raises(ValueError, match="needs examples"):
    lm.padded_eval_batches([], [], 8, 6, 256)


def test_prompt_batch():
  tokens, prompt_len = lm.prompt_batch([[1, 2, 3], [4]], 2, 0)
  np.testing.assert_array_equal(tokens, [[1, 2, 3, 0, 0], [4, 0, 0, 0, 0]])
  np.testing.assert_array_equal(prompt_len, [3, 1])
  assert tokens.dtype == prompt_len.dtype == np.int32
  with pytest.raises(ValueError, match="at least one prompt"):
    lm.prompt_batch([], 2, 0)
