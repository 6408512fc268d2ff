"""Cross-tokenizer LM distillation: Universal Logit Distillation glue.

A teacher and a student with different tokenizers see different token
sequences for one text. :func:`make_cross_tokenizer_batch` tokenizes each
``(prompt, completion)`` pair with both tokenizers into one batch dict: the
student's keys as :func:`kdjax.lm.make_lm_batch` builds them (``"tokens"``,
``"targets"``, ``"loss_mask"``, ``"prompt_len"``) and the teacher's under the
prefix ``"teacher_"`` (``"teacher_tokens"``, ``"teacher_targets"``,
``"teacher_loss_mask"``, ``"teacher_prompt_len"``). The teacher runs on its
own tokens with ``make_lm_apply(teacher_config, input_key="teacher_tokens")``
(:func:`make_teacher_lm_apply`).

:func:`uld_term` is the ULD term (Boizard et al. 2024, arXiv 2402.12030;
``kdjax.losses.uld_loss``) alone, as a ``kdjax.losses.Term`` function; the
paper's objective ``CE + lambda * ULD`` is the composition of
``kdjax.lm.token_ce_term()`` (weight 1, ``needs_teacher=False``) and
``uld_term()`` (weight ``lambda``), which :func:`make_uld_loss` builds. Both
parts are then reported separately in the step's metrics.

:class:`PairTokenizer` is a small byte-pair tokenizer (greedy BPE merges
learned from a text) so that tests and examples can build a teacher and a
student with genuinely different vocabularies from one text.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any, Callable, Optional, Sequence

import chex
import numpy as np

from kdjax import losses
from kdjax.losses import TermInputs
from kdjax.lm._data import make_lm_batch
from kdjax.lm._distill import MASK_KEY
from kdjax.lm._distill import TARGET_KEY
from kdjax.lm._distill import token_ce_term
from kdjax.lm._model import TransformerConfig
from kdjax.lm._model import make_lm_apply
from kdjax.models import ApplyFn

TEACHER_PREFIX = "teacher_"


@dataclasses.dataclass(frozen=True)
class PairTokenizer:
  """Byte-pair tokenizer: bytes ``0..255``, PAD, BOS, EOS, then merged pairs.

  ``vocab_size = 259 + len(merges)``: ids ``0..255`` are bytes, ``pad_id =
  256``, ``bos_id = 257``, ``eos_id = 258`` (as :class:`ByteTokenizer`), and
  merge ``r`` (a pair of ids ``(a, b)``) is id ``259 + r``. Encoding applies
  the merges by rank (lowest first), as BPE does; decoding expands ids back
  to bytes, so ``decode(encode(text)) == text`` for every text.
  Build one with :meth:`train`.
  """
  merges: tuple = ()
  pad_id: int = 256
  bos_id: int = 257
  eos_id: int = 258
  name: str = "byte-pair"

  FIRST_MERGE_ID = 259

  @property
  def vocab_size(self) -> int:
    return self.FIRST_MERGE_ID + len(self.merges)

  @classmethod
  def train(cls, text: str, num_merges: int) -> "PairTokenizer":
    """Greedy BPE: repeatedly merges the most frequent adjacent pair.

    Ties go to the smallest pair (deterministic); stops early when no pair
    occurs twice.
    """
    if not isinstance(num_merges, int) or num_merges < 0:
      raise ValueError(f"num_merges must be an int >= 0, got {num_merges!r}.")
    ids = list(text.encode("utf-8"))
    merges = []
    for rank in range(num_merges):
      counts = collections.Counter(zip(ids[:-1], ids[1:]))
      if not counts:
        break
      pair, count = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
      if count < 2:
        break
      merges.append(pair)
      ids = _merge(ids, pair, cls.FIRST_MERGE_ID + rank)
    return cls(merges=tuple(merges))

  @functools.cached_property
  def _ranks(self) -> dict:
    return {tuple(p): r for r, p in enumerate(self.merges)}

  @functools.cached_property
  def _bytes(self) -> list:
    table = [bytes([i]) for i in range(256)] + [b"", b"", b""]
    for a, b in self.merges:
      table.append(table[a] + table[b])
    return table

  def encode(self, text: str, *, add_bos: bool = True,
             add_eos: bool = False) -> list[int]:
    """``text`` -> ids: ``[BOS] + merged utf8 bytes (+ [EOS])``."""
    ids = list(text.encode("utf-8"))
    ranks = self._ranks
    while len(ids) > 1:
      best = min(zip(ids[:-1], ids[1:]),
                 key=lambda p: ranks.get(p, len(ranks)))
      if best not in ranks:
        break
      ids = _merge(ids, best, self.FIRST_MERGE_ID + ranks[best])
    if add_bos:
      ids = [self.bos_id] + ids
    if add_eos:
      ids = ids + [self.eos_id]
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    """ids -> text; stops at EOS, skips PAD/BOS (bad UTF-8: U+FFFD)."""
    table = self._bytes
    out = bytearray()
    for i in np.asarray(ids).reshape(-1).tolist():
      if i == self.eos_id:
        break
      if 0 <= i < len(table):
        out += table[i]
    return out.decode("utf-8", errors="replace")


def _merge(ids: list, pair: tuple, new_id: int) -> list:
  out, i = [], 0
  while i < len(ids):
    if i + 1 < len(ids) and ids[i] == pair[0] and ids[i + 1] == pair[1]:
      out.append(new_id)
      i += 2
    else:
      out.append(ids[i])
      i += 1
  return out


def _encode_pairs(tokenizer, prompts, completions, add_eos):
  p_ids = [tokenizer.encode(p, add_bos=True) for p in prompts]
  c_ids = [tokenizer.encode(c, add_bos=False, add_eos=add_eos)
           for c in completions]
  return p_ids, c_ids


def make_cross_tokenizer_batch(prompts: Sequence[str],
                               completions: Sequence[str],
                               student_tokenizer: Any,
                               teacher_tokenizer: Any,
                               seq_len: int,
                               *,
                               teacher_seq_len: Optional[int] = None,
                               add_eos: bool = True,
                               prefix: str = TEACHER_PREFIX) -> dict:
  """One batch holding both tokenizations of ``prompt + completion`` texts.

  Each text pair is encoded by each tokenizer (prompt with BOS, completion
  with EOS when ``add_eos``; merges never cross the prompt/completion
  boundary) and laid out by :func:`kdjax.lm.make_lm_batch` with that
  tokenizer's ``pad_id``.

  Args:
    prompts: ``B`` prompt strings.
    completions: ``B`` completion (response) strings.
    student_tokenizer: has ``encode(text, add_bos=, add_eos=)`` and ``pad_id``.
    teacher_tokenizer: likewise.
    seq_len: the student's ``L_s``.
    teacher_seq_len: the teacher's ``L_t`` (default ``seq_len``).
    add_eos: end each completion with EOS.
    prefix: prefix of the teacher's keys.

  Returns:
    ``{"tokens", "targets": int32 [B, L_s], "loss_mask": float32 [B, L_s],
    "prompt_len": [B], prefix + "tokens", prefix + "targets": [B, L_t],
    prefix + "loss_mask": [B, L_t], prefix + "prompt_len": [B]}``.
  """
  if len(prompts) != len(completions):
    raise ValueError(f"{len(prompts)} prompts but {len(completions)} "
                     "completions.")
  if not prefix:
    raise ValueError("prefix must be a non-empty string (the teacher's keys "
                     "would overwrite the student's).")
  batch = make_lm_batch(
      *_encode_pairs(student_tokenizer, prompts, completions, add_eos),
      seq_len, pad_id=student_tokenizer.pad_id)
  teacher = make_lm_batch(
      *_encode_pairs(teacher_tokenizer, prompts, completions, add_eos),
      seq_len if teacher_seq_len is None else teacher_seq_len,
      pad_id=teacher_tokenizer.pad_id)
  batch.update({prefix + k: v for k, v in teacher.items()})
  return batch


def make_teacher_lm_apply(config: TransformerConfig, *,
                          prefix: str = TEACHER_PREFIX,
                          return_hidden: bool = False) -> ApplyFn:
  """The teacher's apply, reading its own tokens ``batch[prefix + "tokens"]``.

  ``kdjax.lm.make_lm_apply(config, input_key=prefix + "tokens")``.
  """
  return make_lm_apply(config, input_key=prefix + "tokens",
                       return_hidden=return_hidden)


def uld_term(*,
             temperature: Optional[chex.Numeric] = None,
             teacher_temperature: Optional[chex.Numeric] = None,
             student_vocab_size: Optional[int] = None,
             teacher_vocab_size: Optional[int] = None,
             top_k: Optional[int] = None,
             average: str = "sequence",
             student_mask_key: str = MASK_KEY,
             teacher_mask_key: str = TEACHER_PREFIX + MASK_KEY
             ) -> Callable[[TermInputs], chex.Array]:
  r"""The ULD term alone, as a ``Term`` function (Boizard et al. 2024).

  ``term(inputs) = kdjax.losses.uld_loss(z_s[..., :V_s], m_s,
  z_t[..., :V_t], m_t, T)`` with ``z_s = inputs.student.logits [B, T_s,
  rows_s]``, ``z_t = inputs.teacher.logits [B, T_t, rows_t]``, ``m_s =
  batch[student_mask_key]``, ``m_t = batch[teacher_mask_key]``: the sorted-
  probability L1 distance over response positions aligned in order and
  truncated per sequence to the shorter response. It does not include the
  cross-entropy: compose it with ``kdjax.lm.token_ce_term()`` (or use
  :func:`make_uld_loss`), its ``Term`` weight being the paper's ``lambda``.

  Args:
    temperature: ``T``; ``None`` uses the composed loss's temperature
      (``inputs.temperature``, a constant or schedule). No ``T^2`` factor.
    teacher_temperature: the teacher's, if different (default ``T``).
    student_vocab_size: the student tokenizer's vocabulary size ``V_s``: logit
      rows beyond it (embedding padding) are sliced off before the softmax,
      which matters because ULD sorts over every row. ``None``: all rows.
    teacher_vocab_size: likewise ``V_t`` for the teacher.
    top_k: optional approximation (see
      ``kdjax.losses.sorted_probability_distance``).
    average: ``"sequence"`` (reference code) or ``"token"``. With gradient
      accumulation (``make_lm_train_step(accumulation_steps=n)``) the step
      weights micro-batches by their student ``loss_mask`` counts, while ULD
      averages over aligned positions or sequences: the accumulated ULD
      gradient then approximates the full-batch one (the CE part is exact).
    student_mask_key: batch key of the student's response mask ``[B, T_s]``.
    teacher_mask_key: batch key of the teacher's response mask ``[B, T_t]``.
  """
  losses.check_uld_options(top_k=top_k, average=average)

  def term(inputs: TermInputs) -> chex.Array:
    if inputs.teacher is None:
      raise ValueError("uld_term needs the teacher's output (got None).")
    for key in (student_mask_key, teacher_mask_key):
      if key not in inputs.batch:
        raise KeyError(f"the batch has no key {key!r} (a response mask); "
                       f"keys present: {sorted(inputs.batch)}.")
    s_logits = _slice_vocab(inputs.student.logits, student_vocab_size,
                            "student")
    t_logits = _slice_vocab(inputs.teacher.logits, teacher_vocab_size,
                            "teacher")
    t = inputs.temperature if temperature is None else temperature
    return losses.uld_loss(s_logits, inputs.batch[student_mask_key], t_logits,
                           inputs.batch[teacher_mask_key], t,
                           teacher_temperature=teacher_temperature,
                           top_k=top_k, average=average)

  return term


def _slice_vocab(logits, vocab_size, who):
  if vocab_size is None:
    return logits
  rows = logits.shape[-1]
  if rows < vocab_size:
    raise ValueError(
        f"the {who} has {rows} logit rows, fewer than its tokenizer's "
        f"vocabulary size {vocab_size}.")
  return logits if rows == vocab_size else logits[..., :vocab_size]


def make_uld_loss(uld_weight: losses.ScalarOrSchedule = 1.0,
                  *,
                  temperature: losses.ScalarOrSchedule = 1.0,
                  teacher_temperature: Optional[chex.Numeric] = None,
                  ce_weight: losses.ScalarOrSchedule = 1.0,
                  student_vocab_size: Optional[int] = None,
                  teacher_vocab_size: Optional[int] = None,
                  top_k: Optional[int] = None,
                  average: str = "sequence",
                  label_key: str = TARGET_KEY,
                  student_mask_key: str = MASK_KEY,
                  teacher_mask_key: str = TEACHER_PREFIX + MASK_KEY
                  ) -> losses.ComposedLoss:
  r"""The ULD objective ``ce_weight * CE + uld_weight * ULD``, composed.

  Terms ``"ce"`` (:func:`kdjax.lm.token_ce_term` on ``batch[label_key]``
  under ``batch[student_mask_key]``, temperature 1, ``needs_teacher=False``)
  and ``"uld"`` (:func:`uld_term` at the composed ``temperature``, a float or
  optax schedule). With ``ce_weight = 1`` this is Boizard et al. 2024's
  ``L_CE + lambda L_ULD``; pass the result to ``kdjax.lm.make_lm_train_step``
  with the teacher's apply from :func:`make_teacher_lm_apply`.
  """
  return losses.compose([
      losses.Term("ce", token_ce_term(vocab_size=student_vocab_size,
                                      label_key=label_key,
                                      mask_key=student_mask_key),
                  ce_weight, needs_teacher=False),
      losses.Term("uld", uld_term(teacher_temperature=teacher_temperature,
                                  student_vocab_size=student_vocab_size,
                                  teacher_vocab_size=teacher_vocab_size,
                                  top_k=top_k, average=average,
                                  student_mask_key=student_mask_key,
                                  teacher_mask_key=teacher_mask_key),
                  uld_weight),
  ], temperature=temperature)
