"""A byte-level tokenizer and language-model batches with a loss mask.

Batch layout (every key ``[B, L]`` unless noted), built by
:func:`make_lm_batch` from ``prompt + completion`` id sequences ``s`` (with
BOS first and, optionally, EOS last)::

  tokens[b, t]    = s[t]          (model input; PAD beyond the sequence)
  targets[b, t]   = s[t + 1]      (next token; PAD beyond the sequence)
  loss_mask[b, t] = 1.0  iff  len(prompt) <= t + 1 < len(s)
  prompt_len[b]   = len(prompt)   ([B] int32; the prompt includes BOS)

so the loss covers exactly the completion tokens (and the EOS): the prompt's
own tokens and the padding are excluded. ``loss_mask`` is float32 so that its
sum is the number of tokens the mean is taken over.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Optional, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
  """UTF-8 bytes as tokens ``0..255``, then PAD, BOS and EOS.

  ``vocab_size = 259``: ids ``0..255`` are bytes, ``pad_id = 256``,
  ``bos_id = 257``, ``eos_id = 258``. A model may have more embedding rows than
  this (a padded vocabulary, e.g. 264 = 8 * 33); see ``kdjax.lm.align_vocab``.
  """
  pad_id: int = 256
  bos_id: int = 257
  eos_id: int = 258
  name: str = "bytes-utf8"

  @property
  def vocab_size(self) -> int:
    return 259

  def encode(self, text: str, *, add_bos: bool = True,
             add_eos: bool = False) -> list[int]:
    """``text`` -> ids: ``[BOS] + utf8 bytes (+ [EOS])``."""
    ids = list(text.encode("utf-8"))
    if add_bos:
      ids = [self.bos_id] + ids
    if add_eos:
      ids = ids + [self.eos_id]
    return ids

  def decode(self, ids: Sequence[int]) -> str:
    """ids -> text; stops at the first EOS, skips PAD/BOS (invalid UTF-8 -> U+FFFD)."""
    out = bytearray()
    for i in np.asarray(ids).reshape(-1).tolist():
      if i == self.eos_id:
        break
      if 0 <= i < 256:
        out.append(i)
    return out.decode("utf-8", errors="replace")


def make_lm_batch(prompts: Sequence[Sequence[int]],
                  completions: Sequence[Sequence[int]],
                  seq_len: int,
                  *,
                  pad_id: int = 256) -> dict:
  """Right-padded next-token batch with a completion-only loss mask.

  Args:
    prompts: ``B`` id lists (BOS included when wanted); each non-empty.
    completions: ``B`` id lists (EOS included when wanted); may be empty.
    seq_len: ``L``; a sequence longer than ``L + 1`` ids is truncated.
    pad_id: the padding id.

  Returns:
    ``{"tokens", "targets": int32 [B, L], "loss_mask": float32 [B, L],
    "prompt_len": int32 [B]}`` (see the module docstring).
  """
  if len(prompts) != len(completions):
    raise ValueError(f"{len(prompts)} prompts but {len(completions)} "
                     "completions.")
  b = len(prompts)
  full = np.full((b, seq_len + 1), pad_id, np.int32)
  mask = np.zeros((b, seq_len), np.float32)
  prompt_len = np.zeros((b,), np.int32)
  for i, (p, c) in enumerate(zip(prompts, completions)):
    if len(p) < 1:
      raise ValueError(f"prompt {i} is empty; it needs at least BOS.")
    if len(p) > seq_len:
      raise ValueError(f"prompt {i} has {len(p)} ids, more than seq_len="
                       f"{seq_len}: no completion token would fit.")
    s = (list(p) + list(c))[:seq_len + 1]
    full[i, :len(s)] = s
    mask[i, len(p) - 1:len(s) - 1] = 1.0
    prompt_len[i] = len(p)
  return {"tokens": full[:, :-1], "targets": full[:, 1:], "loss_mask": mask,
          "prompt_len": prompt_len}


def text_examples(text: str, tokenizer: ByteTokenizer, *, seq_len: int,
                  prompt_bytes: int, stride: Optional[int] = None
                  ) -> tuple[list, list]:
  """Cuts ``text`` into ``(prompt, completion)`` id pairs of ``seq_len + 1`` ids.

  Window ``j`` is the bytes ``text[j*stride : j*stride + seq_len]``; its
  prompt is BOS plus the first ``prompt_bytes`` bytes, its completion the rest.
  """
  data = text.encode("utf-8")
  stride = stride or seq_len
  if prompt_bytes + 1 > seq_len:
    raise ValueError(f"prompt_bytes={prompt_bytes} leaves no completion in "
                     f"seq_len={seq_len}.")
  prompts, completions = [], []
  for start in range(0, max(len(data) - seq_len, 0) + 1, stride):
    chunk = list(data[start:start + seq_len])
    if len(chunk) < seq_len:
      break
    prompts.append([tokenizer.bos_id] + chunk[:prompt_bytes])
    completions.append(chunk[prompt_bytes:])
  return prompts, completions


def iterate_batches(prompts: Sequence, completions: Sequence, batch_size: int,
                    seq_len: int, *, pad_id: int = 256,
                    rng: Optional[np.random.Generator] = None,
                    drop_remainder: bool = True) -> Iterator[dict]:
  """Yields :func:`make_lm_batch` batches over the examples (shuffled with ``rng``)."""
  order = np.arange(len(prompts))
  if rng is not None:
    rng.shuffle(order)
  stop = len(order) - (len(order) % batch_size if drop_remainder else 0)
  for i in range(0, stop, batch_size):
    idx = order[i:i + batch_size]
    yield make_lm_batch([prompts[j] for j in idx],
                        [completions[j] for j in idx], seq_len, pad_id=pad_id)
