"""Packing short examples into long rows (kdjax/lm/_packing.py), and the models
that attend within a packed row's segments only."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import losses
from kdjax import lm
from kdjax import train
from kdjax.losses import TermInputs

V = 40
L = 16


def _examples(seed=0, n=7, vocab=V, max_len=L + 1):
  """``n`` examples of 2 .. max_len ids, prompts of 1 .. 4 ids."""
  rng = np.random.default_rng(seed)
  prompts, completions = [], []
  for _ in range(n):
    total = int(rng.integers(2, max_len + 1))
    p = int(rng.integers(1, min(4, total - 1) + 1))
    ids = [int(x) for x in rng.integers(1, vocab, total)]
    prompts.append(ids[:p])
    completions.append(ids[p:])
  return prompts, completions


def _slots(p, c, seq_len=L):
  return min(len(p) + len(c), seq_len + 1) - 1


def _naive_ffd(sizes, seq_len):
  """First-fit decreasing, quadratic, as the textbook states it."""
  order = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
  rows, free = [], []
  for i in order:
    if sizes[i] == 0:
      continue
    for r, f in enumerate(free):
      if f >= sizes[i]:
        rows[r].append(i)
        free[r] -= sizes[i]
        break
    else:
      rows.append([i])
      free.append(seq_len - sizes[i])
  return [tuple(sorted(r)) for r in rows]


# -----------------------------------------------------------------------------
# The packing algorithm and the batch layout.
# -----------------------------------------------------------------------------


def test_first_fit_decreasing_on_a_known_case():
  # Slots 5, 4, 3, 3, 2, 2, 1 (prompt of one id + completion) in rows of 8:
  # 5 -> r0 (3 free), 4 -> r1 (4), 3 -> r0 (0), 3 -> r1 (1), 2 -> r2 (6),
  # 2 -> r2 (4), 1 -> r1 (0).
  sizes = [5, 4, 3, 3, 2, 2, 1]
  prompts = [[1]] * len(sizes)
  completions = [[2] * s for s in sizes]
  assert lm.pack_examples(prompts, completions, 8) == [(0, 2), (1, 3, 6),
                                                       (4, 5)]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_packing_is_first_fit_decreasing_deterministic_and_complete(seed):
  prompts, completions = _examples(seed, n=60)
  prompts.append([3])        # one id: nothing to predict, in no row
  completions.append([])
  rows = lm.pack_examples(prompts, completions, L)
  assert rows == lm.pack_examples(prompts, completions, L)
  sizes = [_slots(p, c) for p, c in zip(prompts, completions)]
  assert rows == _naive_ffd(sizes, L)
  placed = sorted(i for row in rows for i in row)
  assert placed == [i for i, s in enumerate(sizes) if s > 0]  # each once
  assert all(sum(sizes[i] for i in row) <= L for row in rows)
  assert len(rows) < len(placed)                              # it packs


def test_packed_batch_layout_matches_the_unpacked_examples():
  prompts, completions = _examples(3, n=9)
  rows = lm.pack_examples(prompts, completions, L)
  batch = lm.make_packed_batch(prompts, completions, rows, L, pad_id=0)
  assert set(batch) == {"tokens", "targets", "loss_mask", "segment_ids",
                        "positions"}
  assert batch["tokens"].shape == (len(rows), L)
  used = 0
  for r, row in enumerate(rows):
    offset = 0
    for k, i in enumerate(row, start=1):
      n = _slots(prompts[i], completions[i])
      alone = lm.make_lm_batch([prompts[i]], [completions[i]], L, pad_id=0)
      span = slice(offset, offset + n)
      # The whole example, contiguous in its row (never split), with its own
      # next-token targets and loss mask: at the segment's last slot the
      # target is the example's last id, not the next segment's first token.
      np.testing.assert_array_equal(batch["tokens"][r, span],
                                    alone["tokens"][0, :n])
      np.testing.assert_array_equal(batch["targets"][r, span],
                                    alone["targets"][0, :n])
      np.testing.assert_array_equal(batch["loss_mask"][r, span],
                                    alone["loss_mask"][0, :n])
      assert alone["loss_mask"][0, n:].sum() == 0
      np.testing.assert_array_equal(batch["segment_ids"][r, span], k)
      np.testing.assert_array_equal(batch["positions"][r, span],
                                    np.arange(n))
      offset += n
    assert (batch["segment_ids"][r, offset:] == 0).all()
    assert (batch["loss_mask"][r, offset:] == 0).all()
    assert (batch["tokens"][r, offset:] == 0).all()
    used += offset
  assert lm.packing_efficiency(batch) == pytest.approx(used / (len(rows) * L))
  assert lm.packing_efficiency(batch["segment_ids"]) == lm.packing_efficiency(
      batch)
  np.testing.assert_array_equal(lm.segment_positions(batch["segment_ids"]),
                                batch["positions"])
  # The loss tokens of the packed batch are those of the unpacked one.
  unpacked = lm.make_lm_batch(prompts, completions, L, pad_id=0)
  assert batch["loss_mask"].sum() == unpacked["loss_mask"].sum()


def test_loss_mask_never_covers_a_cross_segment_target():
  prompts, completions = _examples(4, n=12)
  rows = lm.pack_examples(prompts, completions, L)
  batch = lm.make_packed_batch(prompts, completions, rows, L, pad_id=0)
  seqs = [list(p) + list(c) for p, c in zip(prompts, completions)]
  for r, row in enumerate(rows):
    for t in np.flatnonzero(batch["loss_mask"][r]):
      seg = batch["segment_ids"][r, t]
      assert seg != 0
      s = seqs[row[seg - 1]]
      pos = batch["positions"][r, t]
      assert batch["targets"][r, t] == s[pos + 1]   # its own next token


def test_packing_refuses_invalid_examples_and_overfull_rows():
  with pytest.raises(ValueError, match="more than seq_len"):
    lm.pack_examples([[1] * 9], [[2]], 8)
  with pytest.raises(ValueError, match="empty"):
    lm.pack_examples([[]], [[2]], 8)
  with pytest.raises(ValueError, match="prompts but"):
    lm.pack_examples([[1]], [], 8)
  prompts, completions = [[1, 2, 3]] * 3, [[4, 5, 6]] * 3  # 5 slots each
  with pytest.raises(ValueError, match="more than seq_len=8 slots"):
    lm.make_packed_batch(prompts, completions, [(0, 1)], 8)
  with pytest.raises(ValueError, match="nothing to predict"):
    lm.make_packed_batch([[1]], [[]], [(0,)], 8)


def test_truncation_as_make_lm_batch():
  p, c = [1, 2], list(range(3, 40))
  rows = lm.pack_examples([p], [c], 8)
  batch = lm.make_packed_batch([p], [c], rows, 8, pad_id=0)
  alone = lm.make_lm_batch([p], [c], 8, pad_id=0)
  for key in ("tokens", "targets", "loss_mask"):
    np.testing.assert_array_equal(batch[key], alone[key])
  assert lm.packing_efficiency(batch) == 1.0


def test_attention_mask_is_block_diagonal_causal():
  segments = jnp.asarray([[1, 1, 2, 2, 2, 0]])
  mask = np.asarray(lm.packed_attention_mask(segments))[0]
  expected = np.array([[1, 0, 0, 0, 0, 0],
                       [1, 1, 0, 0, 0, 0],
                       [0, 0, 1, 0, 0, 0],
                       [0, 0, 1, 1, 0, 0],
                       [0, 0, 1, 1, 1, 0],
                       [0, 0, 0, 0, 0, 1]], bool)   # padding: itself only
  np.testing.assert_array_equal(mask, expected)


# -----------------------------------------------------------------------------
# LMBatches(pack=True).
# -----------------------------------------------------------------------------


def test_lm_batches_pack_is_resumable_and_covers_the_rows():
  prompts, completions = _examples(5, n=30)
  batches = lm.LMBatches(prompts, completions, 2, L, 0, seed=3, pack=True)
  rows = batches.packed_rows
  assert rows == lm.pack_examples(prompts, completions, L)
  assert batches.steps_per_epoch == len(rows) // 2
  first = [next(batches) for _ in range(batches.steps_per_epoch + 1)]
  for step, batch in enumerate(first):
    chex.assert_trees_all_equal(batch, batches.batch_at(step))
    assert lm.is_packed(batch) and "prompt_len" not in batch
  state = batches.get_state()
  after = next(batches)
  resumed = lm.LMBatches(prompts, completions, 2, L, 0, seed=3, pack=True)
  resumed.set_state(state)
  chex.assert_trees_all_equal(next(resumed), after)
  # An epoch's batches are distinct rows of the packing.
  seen = [tuple(b["tokens"][i]) for b in first[:batches.steps_per_epoch]
          for i in range(2)]
  assert len(set(seen)) == len(seen)
  with pytest.raises(lm.BatchSizeError, match="rows"):
    lm.LMBatches(prompts, completions, len(rows) + 1, L, 0, 0, pack=True)


# -----------------------------------------------------------------------------
# kdjax's DecoderLM: each packed example has its logits alone.
# -----------------------------------------------------------------------------

CFG = lm.TransformerConfig(vocab_size=V, num_layers=2, num_heads=2, d_model=16,
                           max_len=32)
T_CFG = lm.TransformerConfig(vocab_size=V, num_layers=1, num_heads=2,
                             d_model=16, max_len=32)


def _packed(seed=6, n=6):
  prompts, completions = _examples(seed, n=n)
  rows = lm.pack_examples(prompts, completions, L)
  assert any(len(r) > 1 for r in rows)
  batch = lm.make_packed_batch(prompts, completions, rows, L, pad_id=0)
  return prompts, completions, rows, {k: jnp.asarray(v)
                                      for k, v in batch.items()}


def _assert_segments_equal_alone(packed_out, alone_fn, prompts, completions,
                                 rows, batch, atol=1e-5):
  """Every example's slots of ``packed_out [B, L, ...]`` equal ``alone_fn``
  of its unpacked batch (first ``n`` slots)."""
  for r, row in enumerate(rows):
    offset = 0
    for i in row:
      n = _slots(prompts[i], completions[i])
      alone = {k: jnp.asarray(v) for k, v in lm.make_lm_batch(
          [prompts[i]], [completions[i]], L, pad_id=0).items()}
      chex.assert_trees_all_close(packed_out[r, offset:offset + n],
                                  alone_fn(alone)[0, :n], atol=atol, rtol=0)
      offset += n
  assert np.isfinite(np.asarray(packed_out)).all()


def test_decoder_lm_packed_logits_and_hidden_equal_each_example_alone():
  apply = lm.make_lm_apply(CFG, return_hidden=True)
  lean = lm.make_lm_apply(CFG, compute_logits=False)
  variables = lm.init_lm(CFG, jax.random.key(0))
  prompts, completions, rows, batch = _packed()
  run = jax.jit(apply)
  out = run(variables, batch)
  lean_out = jax.jit(lean)(variables, batch)
  assert lean_out.logits is None
  chex.assert_trees_all_close(lean_out.features["hidden"],
                              out.features["hidden"], atol=1e-6, rtol=0)
  _assert_segments_equal_alone(out.logits, lambda b: run(variables, b).logits,
                               prompts, completions, rows, batch)
  _assert_segments_equal_alone(
      lean_out.features["hidden"],
      lambda b: run(variables, b).features["hidden"],
      prompts, completions, rows, batch)
  # Positions default to restarting in each segment.
  no_pos = {k: v for k, v in batch.items() if k != "positions"}
  chex.assert_trees_all_close(run(variables, no_pos).logits, out.logits,
                              atol=0, rtol=0)
  # Without the segments the rows attend across examples: different logits.
  plain = {k: v for k, v in batch.items()
           if k not in ("positions", "segment_ids")}
  assert not np.allclose(run(variables, plain).logits, out.logits, atol=1e-3)
  with pytest.raises(ValueError, match="positions without segment_ids|no 'segment_ids'"):
    apply(variables, {**plain, "positions": batch["positions"]})


def test_a_teacher_reading_its_own_tokens_reads_its_own_segments():
  apply = lm.make_lm_apply(CFG)
  teacher_apply = lm.make_teacher_lm_apply(CFG)   # input_key "teacher_tokens"
  variables = lm.init_lm(CFG, jax.random.key(0))
  _, _, _, batch = _packed()
  packed = apply(variables, batch).logits
  plain = apply(variables, {"tokens": batch["tokens"]}).logits
  # The student's segments are not the teacher's: ignored.
  chex.assert_trees_all_close(
      teacher_apply(variables, {"teacher_tokens": batch["tokens"],
                                "segment_ids": batch["segment_ids"],
                                "positions": batch["positions"]}).logits,
      plain, atol=0, rtol=0)
  chex.assert_trees_all_close(
      teacher_apply(variables, {"teacher_tokens": batch["tokens"],
                                "teacher_segment_ids": batch["segment_ids"],
                                "teacher_positions": batch["positions"]}
                    ).logits, packed, atol=0, rtol=0)


def _kd_term_value(term, s_out, t_out, batch):
  return term(TermInputs(student=s_out, teacher=t_out, batch=batch,
                         temperature=jnp.float32(2.0), step=jnp.int32(0)))


def test_token_kd_over_a_packed_batch_is_the_token_weighted_unpacked_mean():
  s_apply, t_apply = lm.make_lm_apply(CFG), lm.make_lm_apply(T_CFG)
  s_lean = lm.make_lm_apply(CFG, compute_logits=False)
  t_lean = lm.make_lm_apply(T_CFG, compute_logits=False)
  s_vars = lm.init_lm(CFG, jax.random.key(1))
  t_vars = lm.init_lm(T_CFG, jax.random.key(2))
  prompts, completions, _, packed = _packed(seed=7, n=8)
  unpacked = {k: jnp.asarray(v) for k, v in
              lm.make_lm_batch(prompts, completions, L, pad_id=0).items()}
  term = lm.token_kd_term("kl", vocab_size=V)
  lean_term = lm.lean_token_kd_term("kl", vocab_size=V, chunk_size=8)
  ce = lm.token_ce_term(vocab_size=V)

  @jax.jit
  def values(batch):
    s, t = s_apply(s_vars, batch), t_apply(t_vars, batch)
    ls, lt = s_lean(s_vars, batch), t_lean(t_vars, batch)
    return (_kd_term_value(term, s, t, batch),
            _kd_term_value(lean_term, ls, lt, batch),
            _kd_term_value(ce, s, None, batch))

  got, want = values(packed), values(unpacked)
  assert float(want[0]) > 1e-4
  chex.assert_trees_all_close(got, want, atol=1e-6, rtol=1e-5)


def test_rollout_steps_refuse_packed_batches():
  apply, t_apply = lm.make_lm_apply(CFG), lm.make_lm_apply(T_CFG)
  opt = optax.sgd(0.1)
  loss = losses.compose([losses.Term("kd", lm.token_kd_term("kl",
                                                            vocab_size=V))])
  sampling = lm.SamplingConfig(temperature=1.0, vocab_size=V, eos_id=1,
                               pad_id=0)
  state = train.create_state(lm.init_lm(CFG, jax.random.key(0)), opt,
                             rng=jax.random.key(3))
  teacher = lm.init_lm(T_CFG, jax.random.key(1))
  _, _, _, batch = _packed()
  gkd = lm.make_gkd_train_step(apply, t_apply, loss, opt, lmbda=0.0,
                               sampling=sampling, jit=False)
  seq = lm.make_sequence_kd_step(apply, t_apply, loss, opt,
                                 sampling=sampling, jit=False)
  with pytest.raises(ValueError, match="GKD step.*packed"):
    gkd(state, teacher, batch)
  with pytest.raises(ValueError, match="sequence-KD step.*packed"):
    seq(state, teacher, batch)
  with pytest.raises(ValueError, match="rollout.*packed"):
    lm.make_rollout_fn(apply.module, sampling)(teacher, batch,
                                               jax.random.key(0))


# -----------------------------------------------------------------------------
# Tunix Qwen3 / Llama 3 / Gemma 3.
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("family,layers", [("qwen3", 2), ("llama3", 2),
                                           ("gemma3", 6)])
def test_tunix_packed_logits_equal_each_example_alone(family, layers):
  # Gemma 3: five local layers with a sliding window of 4 (< the examples)
  # and one global layer.
  pytest.importorskip("tunix")
  config = lm.tunix_model_config(family, "tiny", num_layers=layers)
  model = lm.init_tunix_model(family, config, 0)
  vocab = 300
  apply, variables = lm.make_tunix_lm_apply(model, vocab_size=vocab)
  lean, _ = lm.make_tunix_lm_apply(model, compute_logits=False,
                                   vocab_size=vocab)
  prompts, completions = _examples(8, n=6, vocab=vocab)
  rows = lm.pack_examples(prompts, completions, L)
  assert any(len(r) > 1 for r in rows)
  batch = {k: jnp.asarray(v) for k, v in lm.make_packed_batch(
      prompts, completions, rows, L, pad_id=0).items()}
  run = jax.jit(apply)
  out = run(variables, batch)
  _assert_segments_equal_alone(out.logits, lambda b: run(variables, b).logits,
                               prompts, completions, rows, batch)
  hidden = jax.jit(lean)(variables, batch).features["hidden"]
  kernel, _ = lm.tunix_unembedding(variables)
  chex.assert_trees_all_close(hidden @ kernel[:, :vocab], out.logits,
                              atol=1e-5, rtol=0)
  plain = {k: v for k, v in batch.items()
           if k not in ("positions", "segment_ids")}
  assert not np.allclose(run(variables, plain).logits, out.logits, atol=1e-3)
  with pytest.raises(ValueError, match="input_mask"):
    apply(variables, {**batch, "input_mask": jnp.ones_like(batch["tokens"])})
