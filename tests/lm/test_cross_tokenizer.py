"""Cross-tokenizer distillation (kdjax.lm._cross_tokenizer): ULD for LMs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import losses
from kdjax import lm
from kdjax import train
from kdjax.lm import _cross_tokenizer as ct
from kdjax.models import ModelOutput

TEXT = ("the cat sat on the mat. the dog sat on the log. "
        "a cat and a dog met on the mat and the log. ") * 3
BYTES = lm.ByteTokenizer()
PAIRS = ct.PairTokenizer.train(TEXT, 24)


def np_softmax(z, temperature=1.0):
  z = z.astype(np.float64) / temperature
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def np_uld(zs, ms, zt, mt, temperature=1.0):
  """Independent ULD: per row, response positions in order, truncated to
  the shorter, sorted probabilities zero-padded, L1; mean per row, then over
  rows."""
  per_row = []
  for b in range(zs.shape[0]):
    s_pos, t_pos = np.nonzero(ms[b] > 0)[0], np.nonzero(mt[b] > 0)[0]
    n = min(len(s_pos), len(t_pos))
    if n == 0:
      continue
    a = -np.sort(-np_softmax(zs[b, s_pos[:n]], temperature), -1)
    c = -np.sort(-np_softmax(zt[b, t_pos[:n]], temperature), -1)
    v = max(a.shape[-1], c.shape[-1])
    a = np.pad(a, ((0, 0), (0, v - a.shape[-1])))
    c = np.pad(c, ((0, 0), (0, v - c.shape[-1])))
    per_row.append(np.abs(a - c).sum(-1).mean())
  return np.mean(per_row)


# ----------------------------------------------------------------------------
# PairTokenizer.
# ----------------------------------------------------------------------------


def test_pair_tokenizer_round_trip_and_vocabulary():
  assert len(PAIRS.merges) == 24
  assert PAIRS.vocab_size == 259 + 24 != BYTES.vocab_size
  # Hand-computed: "ab" (3 times) beats "ba" (twice); then the merged pair.
  tiny = ct.PairTokenizer.train("abababcc", 5)
  assert tiny.merges == ((97, 98), (259, 259))
  assert tiny.encode("abab", add_bos=False) == [260]
  assert tiny.encode("ababab", add_bos=False) == [260, 259]
  assert tiny.encode("cab", add_bos=False) == [99, 259]
  assert tiny.decode([260, 259, 99]) == "ababab" + "c"
  for text in ["the cat sat on the mat.", "", "x", "unseen wörds ✓ 123",
               "the the the"]:
    ids = PAIRS.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == PAIRS.bos_id and ids[-1] == PAIRS.eos_id
    assert all(0 <= i < PAIRS.vocab_size for i in ids)
    assert PAIRS.decode(ids) == text
    assert PAIRS.decode(PAIRS.encode(text, add_bos=False)) == text
  in_domain = "the cat sat on the mat."
  assert len(PAIRS.encode(in_domain)) < len(BYTES.encode(in_domain)) - 5
  # Deterministic training; early stop when no pair repeats.
  assert ct.PairTokenizer.train(TEXT, 24) == PAIRS
  assert ct.PairTokenizer.train("abcd", 10).merges == ()
  with pytest.raises(ValueError, match="num_merges"):
    ct.PairTokenizer.train(TEXT, -1)


# ----------------------------------------------------------------------------
# Batches and the term.
# ----------------------------------------------------------------------------

PROMPTS = ["the cat", "a dog", "the mat and", "on"]
COMPLETIONS = [" sat on the mat.", " met the cat", " the log.", " the"]


def test_cross_tokenizer_batch_layout():
  batch = ct.make_cross_tokenizer_batch(PROMPTS, COMPLETIONS, PAIRS, BYTES,
                                        seq_len=16, teacher_seq_len=24)
  student = lm.make_lm_batch(
      [PAIRS.encode(p) for p in PROMPTS],
      [PAIRS.encode(c, add_bos=False, add_eos=True) for c in COMPLETIONS], 16,
      pad_id=PAIRS.pad_id)
  for key, value in student.items():
    np.testing.assert_array_equal(batch[key], value)
  assert batch["teacher_tokens"].shape == (4, 24)
  # Teacher response length = completion bytes + EOS (all fit in 24).
  np.testing.assert_array_equal(batch["teacher_loss_mask"].sum(-1),
                                [len(c.encode()) + 1 for c in COMPLETIONS])
  np.testing.assert_array_equal(
      batch["loss_mask"].sum(-1),
      [len(PAIRS.encode(c, add_bos=False)) + 1 for c in COMPLETIONS])
  assert (batch["loss_mask"].sum(-1) < batch["teacher_loss_mask"].sum(-1)).any()
  # The teacher's tokens decode to the same texts.
  for i in range(4):
    text = PROMPTS[i] + COMPLETIONS[i]
    assert BYTES.decode(batch["teacher_tokens"][i]) == text
  with pytest.raises(ValueError, match="completions"):
    ct.make_cross_tokenizer_batch(PROMPTS, COMPLETIONS[:2], PAIRS, BYTES, 16)


def term_inputs(zs, zt, batch, temperature=1.0):
  return losses.TermInputs(
      student=ModelOutput(logits=jnp.asarray(zs)),
      teacher=ModelOutput(logits=jnp.asarray(zt)),
      batch={k: jnp.asarray(v) for k, v in batch.items()},
      temperature=jnp.asarray(temperature, jnp.float32), step=jnp.asarray(0))


def test_uld_term_matches_numpy_and_slices_padding_rows():
  batch = ct.make_cross_tokenizer_batch(PROMPTS, COMPLETIONS, PAIRS, BYTES,
                                        seq_len=12, teacher_seq_len=20)
  rng = np.random.default_rng(0)
  vs, vt = PAIRS.vocab_size, BYTES.vocab_size
  zs = (3 * rng.normal(size=(4, 12, vs + 5))).astype(np.float32)
  zt = (3 * rng.normal(size=(4, 20, vt + 3))).astype(np.float32)
  zs[..., vs:] = 20.0  # padding rows: huge logits that must be ignored
  zt[..., vt:] = 20.0
  term = ct.uld_term(student_vocab_size=vs, teacher_vocab_size=vt)
  ref = np_uld(zs[..., :vs], batch["loss_mask"], zt[..., :vt],
               batch["teacher_loss_mask"], 2.0)
  got = term(term_inputs(zs, zt, batch, temperature=2.0))
  np.testing.assert_allclose(got, ref, rtol=1e-5)
  jitted = jax.jit(lambda a, b, c: term(term_inputs(a, b, c, 2.0)))
  np.testing.assert_allclose(jitted(zs, zt, batch), ref, rtol=1e-5)
  # A fixed temperature overrides the composed one.
  fixed = ct.uld_term(temperature=0.5, student_vocab_size=vs,
                      teacher_vocab_size=vt)
  np.testing.assert_allclose(
      fixed(term_inputs(zs, zt, batch, 2.0)),
      np_uld(zs[..., :vs], batch["loss_mask"], zt[..., :vt],
             batch["teacher_loss_mask"], 0.5), rtol=1e-5)
  # Without slicing, the padding rows change the value (the check can fail).
  unsliced = ct.uld_term()(term_inputs(zs, zt, batch, 2.0))
  assert abs(float(unsliced) - ref) > 1e-2
  with pytest.raises(ValueError, match="fewer than"):
    ct.uld_term(student_vocab_size=vs + 10)(term_inputs(zs, zt, batch))
  with pytest.raises(KeyError, match="teacher_loss_mask"):
    ct.uld_term()(term_inputs(zs, zt, {"loss_mask": batch["loss_mask"]}))


def test_make_uld_loss_is_ce_plus_weighted_uld():
  batch = ct.make_cross_tokenizer_batch(PROMPTS, COMPLETIONS, PAIRS, BYTES,
                                        seq_len=12, teacher_seq_len=20)
  rng = np.random.default_rng(1)
  zs = rng.normal(size=(4, 12, PAIRS.vocab_size)).astype(np.float32)
  zt = rng.normal(size=(4, 20, BYTES.vocab_size)).astype(np.float32)
  loss = ct.make_uld_loss(0.25, temperature=1.5)
  total, aux = loss(ModelOutput(logits=jnp.asarray(zs)),
                    ModelOutput(logits=jnp.asarray(zt)),
                    {k: jnp.asarray(v) for k, v in batch.items()})
  m = batch["loss_mask"]
  nll = -np.log(np.take_along_axis(np_softmax(zs), batch["targets"][..., None],
                                   -1)[..., 0])
  ce = (nll * m).sum() / m.sum()
  uld = np_uld(zs, m, zt, batch["teacher_loss_mask"], 1.5)
  np.testing.assert_allclose(aux.terms["ce"], ce, rtol=1e-5)
  np.testing.assert_allclose(aux.terms["uld"], uld, rtol=1e-5)
  np.testing.assert_allclose(total, ce + 0.25 * uld, rtol=1e-5)


# ----------------------------------------------------------------------------
# End to end: byte-level teacher, byte-pair student, different vocabularies.
# ----------------------------------------------------------------------------


def train_uld(uld_weight, steps=30):
  """Trains a byte-pair student on a byte-level teacher; returns metrics."""
  s_cfg = lm.TransformerConfig(vocab_size=PAIRS.vocab_size + 5, num_layers=1,
                               num_heads=2, d_model=16, max_len=16)
  t_cfg = lm.TransformerConfig(vocab_size=BYTES.vocab_size, num_layers=1,
                               num_heads=2, d_model=16, max_len=24)
  assert s_cfg.vocab_size != t_cfg.vocab_size
  teacher = lm.init_lm(t_cfg, jax.random.key(1))
  # A confident (not one-hot) teacher: scaled unembedding.
  teacher["params"]["unembed"]["kernel"] = (
      10.0 * teacher["params"]["unembed"]["kernel"])
  s_apply = lm.make_lm_apply(s_cfg)
  t_apply = ct.make_teacher_lm_apply(t_cfg)
  batch = ct.make_cross_tokenizer_batch(PROMPTS, COMPLETIONS, PAIRS, BYTES,
                                        seq_len=14, teacher_seq_len=22)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  # The student's 5 padding rows are sliced off before sorting.
  loss = ct.make_uld_loss(uld_weight, student_vocab_size=PAIRS.vocab_size,
                          teacher_vocab_size=BYTES.vocab_size)
  opt = optax.adam(3e-2)
  step = lm.make_lm_train_step(s_apply, t_apply, loss, opt)
  state = train.create_state(lm.init_lm(s_cfg, jax.random.key(0)), opt,
                             rng=jax.random.key(2))
  history = []
  for _ in range(steps):
    state, metrics = step(state, teacher, batch)
    history.append({k: float(metrics[k]) for k in ("loss", "ce", "uld")})
  return history


def test_train_student_with_other_tokenizer_uld_falls():
  with_uld, ce_only = train_uld(1.0), train_uld(0.0)
  first, last = with_uld[0], with_uld[-1]
  assert all(np.isfinite(h["loss"]) for h in with_uld)
  np.testing.assert_allclose(first["loss"], first["ce"] + first["uld"],
                             rtol=1e-5)
  assert last["uld"] < 0.35 * first["uld"], (first, last)
  assert last["ce"] < 0.25 * first["ce"], (first, last)
  # The ULD term, not CE alone, brings the sorted distributions together:
  # a CE-only student ends far more peaked than the teacher.
  assert (ce_only[0]["ce"], ce_only[0]["uld"]) == (first["ce"], first["uld"])
  assert last["uld"] < 0.75 * ce_only[-1]["uld"], (last, ce_only[-1])
