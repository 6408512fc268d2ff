"""Tokenizers for LM distillation: bytes, a ``tokenizer.json``, a trained BPE.

:class:`Tokenizer` is one interface over two kinds of tokenizer:

* :func:`byte_tokenizer`: :class:`kdjax.lm.ByteTokenizer` (UTF-8 bytes, 259
  ids, nothing to save);
* :func:`tokenizer_from_json` / :func:`load_tokenizer`: a Hugging Face
  ``tokenizers`` tokenizer from its JSON (e.g. a checkpoint's
  ``tokenizer.json``), or one trained on texts by :func:`train_bpe` (a
  byte-level BPE with the specials ``<pad>``, ``<bos>``, ``<eos>`` as ids 0,
  1, 2).

``encode`` adds no special token (the caller places BOS/EOS, see
:func:`kdjax.lm.token_windows`); ``decode`` drops leading BOS, stops at the
first EOS and skips PAD/BOS. The special ids of a ``tokenizer.json`` are the
named tokens (``eos_token``, ``bos_token``, ``pad_token``) or, unnamed, the
first of the usual names present (``<eos>``, ``</s>``, ``<|endoftext|>``, ...);
a tokenizer without a BOS or PAD uses its EOS for them (GPT-2 style).

Teacher and student must tokenize alike for token-level distillation:
:func:`check_same_tokenizer` compares two tokenizers (this module's, or raw
``tokenizers.Tokenizer`` objects) and raises :class:`TokenizerMismatchError`,
which points to cross-tokenizer distillation (``kdjax.lm.make_uld_loss``).

``tokenizers`` is an optional dependency (``pip install 'kdjax[tunix]'``),
imported only by the functions that need it.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Callable, Optional, Sequence, Union

import numpy as np

from kdjax.lm._data import ByteTokenizer
from kdjax.lm._hf_config import HFCheckpointError

TOKENIZER_FILE = "tokenizer.json"
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")  # ids 0, 1, 2 of train_bpe

_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|endoftext|>", "</s>", "<eos>")
_BOS_CANDIDATES = ("<bos>", "<s>", "[CLS]", "<|begin_of_text|>",
                   "<|endoftext|>", "</s>", "<eos>")
_EOS_CANDIDATES = ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>",
                   "<|im_end|>", "[SEP]")

_PIP_HINT = "pip install 'kdjax[tunix]' (or pip install tokenizers)"
_ULD_HINT = ("Token-level distillation compares teacher and student "
             "probabilities id by id and needs one tokenizer. For a teacher "
             "and a student with different tokenizers use cross-tokenizer "
             "distillation: kdjax.lm.make_uld_loss (Universal Logit "
             "Distillation, Boizard et al. 2024), with batches from "
             "kdjax.lm.make_cross_tokenizer_batch.")


class TokenizerError(ValueError):
  """A tokenizer that cannot be used: not a ``tokenizer.json``, or a special
  token that it lacks."""


class SpecialTokenError(TokenizerError):
  """A special token that a ``tokenizer.json`` lacks.

  Attributes:
    argument: the keyword argument concerned: ``"eos_token"``,
      ``"bos_token"`` or ``"pad_token"``.
    token: the token named by that argument; None when the argument was not
      given and none of the usual names is a token (only for EOS, which has
      no fallback).
    source: the name of the tokenizer (e.g. its file).
  """

  def __init__(self, message: str, *, argument: str, token: Optional[str],
               source: str):
    super().__init__(message)
    self.argument, self.token, self.source = argument, token, source


class TokenizerMismatchError(TokenizerError, HFCheckpointError):
  """Teacher and student tokenize differently (token-level distillation
  needs one tokenizer); the message points to ``kdjax.lm.make_uld_loss``.

  A :class:`TokenizerError` and, as :func:`check_same_tokenizer` raised
  before, a :class:`kdjax.lm.HFCheckpointError` (both ValueErrors).
  """


def _missing_tokenizers(what: str) -> ImportError:
  return ImportError(f"{what} needs the `tokenizers` package: {_PIP_HINT}.",
                     name="tokenizers")


def _hf_tokenizer_class():
  try:
    from tokenizers import Tokenizer as HFTokenizer  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise _missing_tokenizers("a tokenizer.json tokenizer") from e
  return HFTokenizer


# -----------------------------------------------------------------------------
# The tokenizer.
# -----------------------------------------------------------------------------


class Tokenizer:
  """A tokenizer for LM distillation (see the module docstring).

  Build one with :func:`byte_tokenizer`, :func:`tokenizer_from_json` or
  :func:`load_tokenizer`.

  Attributes:
    kind: ``"bytes"``, ``"bpe"`` (trained by :func:`train_bpe`) or
      ``"file"`` (any other ``tokenizer.json``): a label, saved with runs.
    vocab_size: the number of ids (added tokens included).
    pad_id: the padding id.
    bos_id: the beginning-of-sequence id (may equal ``eos_id``).
    eos_id: the end-of-sequence id.
    json_text: the ``tokenizer.json`` text, or None (bytes).
  """

  def __init__(self, *, kind: str, vocab_size: int, pad_id: int, bos_id: int,
               eos_id: int, encode: Callable[[str], Sequence[int]],
               decode: Callable[[list[int]], str],
               json_text: Optional[str] = None,
               fingerprint: Optional[str] = None,
               encode_offsets: Optional[Callable[[str], tuple[
                   Sequence[int], Sequence[tuple[int, int]]]]] = None):
    """A tokenizer from its functions.

    Args:
      kind: see the class docstring.
      vocab_size: the number of ids.
      pad_id: the padding id.
      bos_id: the beginning-of-sequence id.
      eos_id: the end-of-sequence id.
      encode: ``text -> ids`` without special tokens.
      decode: ``ids -> text`` (given ids without BOS, EOS and PAD).
      json_text: the ``tokenizer.json`` text that :meth:`save` writes.
      fingerprint: a digest identifying the vocabulary; default
        ``"<kind>:<vocab_size>"``.
      encode_offsets: ``text -> (ids, offsets)`` as ``encode``, with each
        id's ``(start, end)`` character span in ``text``; None: not
        available (:meth:`encode_with_offsets` raises).
    """
    self.kind, self.vocab_size = kind, vocab_size
    self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
    self._encode, self._decode = encode, decode
    self.json_text = json_text
    self._fingerprint = fingerprint
    self._encode_offsets = encode_offsets

  def __repr__(self) -> str:
    return (f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, "
            f"pad_id={self.pad_id}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id})")

  def encode(self, text: str) -> list[int]:
    """``text`` -> ids, without special tokens."""
    return list(self._encode(text))

  def encode_with_offsets(self, text: str
                          ) -> tuple[list[int], list[tuple[int, int]]]:
    """``(ids, offsets)``: :meth:`encode`'s ids and each one's ``(start,
    end)`` character span in ``text`` (as ``tokenizers``' ``Encoding.offsets``;
    for bytes, the character each byte belongs to).

    Raises:
      TypeError: a tokenizer built without ``encode_offsets``.
    """
    if self._encode_offsets is None:
      raise TypeError(f"{self!r} has no character offsets (it was built "
                      "without encode_offsets).")
    ids, offsets = self._encode_offsets(text)
    return list(ids), [(int(a), int(b)) for a, b in offsets]

  def decode(self, ids: Sequence[int]) -> str:
    """ids -> text: leading BOS dropped, cut at the first EOS, PAD and BOS
    skipped (``ids`` may be any array-like; it is flattened)."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    while ids and ids[0] == self.bos_id:  # BOS may be EOS (GPT-2 style)
      ids = ids[1:]
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    ids = [i for i in ids if i not in (self.pad_id, self.bos_id)]
    return self._decode(ids)

  @property
  def fingerprint(self) -> str:
    """Identifies the vocabulary (teacher and student must share it).

    For a ``tokenizer.json``, a digest of its ``token -> id`` map (added
    tokens included) and its PAD, BOS and EOS ids; for bytes,
    ``"bytes:259"``. It does not cover the normalizer or pre-tokenizer.
    """
    if self._fingerprint is None:
      return f"{self.kind}:{self.vocab_size}"
    return self._fingerprint

  def save(self, directory: str) -> Optional[str]:
    """Writes ``<directory>/tokenizer.json`` atomically (a ``.tmp`` file,
    then a rename).

    Args:
      directory: an existing directory.

    Returns:
      The path written, or None for a tokenizer without JSON (bytes), which
      writes nothing.
    """
    if self.json_text is None:
      return None
    path = os.path.join(directory, TOKENIZER_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      f.write(self.json_text)
    os.replace(tmp, path)
    return path


def byte_tokenizer() -> Tokenizer:
  """:class:`kdjax.lm.ByteTokenizer` as a :class:`Tokenizer` (kind
  ``"bytes"``, 259 ids, nothing to save)."""
  bt = ByteTokenizer()
  return Tokenizer(kind="bytes", vocab_size=bt.vocab_size, pad_id=bt.pad_id,
                   bos_id=bt.bos_id, eos_id=bt.eos_id,
                   encode=lambda text: bt.encode(text, add_bos=False),
                   decode=bt.decode, encode_offsets=_byte_offsets)


def _byte_offsets(text: str) -> tuple[list[int], list[tuple[int, int]]]:
  """UTF-8 bytes and, for each, the span of the character it encodes."""
  ids, offsets = [], []
  for i, char in enumerate(text):
    data = char.encode("utf-8")
    ids.extend(data)
    offsets.extend([(i, i + 1)] * len(data))
  return ids, offsets


def _special_id(tok, token: Optional[str], candidates: Sequence[str],
                argument: str, name: str) -> Optional[int]:
  if token is not None:
    i = tok.token_to_id(token)
    if i is None:
      raise SpecialTokenError(
          f"{argument}={token!r} is not a token of {name}.",
          argument=argument, token=token, source=name)
    return i
  for candidate in candidates:
    i = tok.token_to_id(candidate)
    if i is not None:
      return i
  return None


def tokenizer_from_json(json_text: str, *, name: str, kind: str = "file",
                        eos_token: Optional[str] = None,
                        bos_token: Optional[str] = None,
                        pad_token: Optional[str] = None) -> Tokenizer:
  """A :class:`Tokenizer` from the text of a ``tokenizers`` tokenizer.json.

  Args:
    json_text: the JSON (``tokenizers.Tokenizer.to_str()``, a file's text).
    name: names the tokenizer in errors (e.g. its path).
    kind: the :attr:`Tokenizer.kind` label (``"file"`` or ``"bpe"``).
    eos_token: the end-of-sequence token; default: the first of ``<eos>``,
      ``</s>``, ``<|endoftext|>``, ``<|end_of_text|>``, ``<|im_end|>``,
      ``[SEP]`` that is a token.
    bos_token: the beginning-of-sequence token; default: the first of the
      usual names present (``<bos>``, ``<s>``, ...), else EOS.
    pad_token: the padding token; default: the first of the usual names
      present (``<pad>``, ``[PAD]``, ...), else EOS.

  Returns:
    The tokenizer, with ``json_text`` kept (for :meth:`Tokenizer.save`) and a
    fingerprint of its vocabulary and special ids.

  Raises:
    ImportError: ``tokenizers`` is not installed (with the pip command).
    TokenizerError: ``json_text`` is not a tokenizer.json.
    SpecialTokenError: a named special token is not a token of it, or it has
      no end-of-sequence token among the usual names (``argument`` says
      which keyword argument to set).
  """
  hf_class = _hf_tokenizer_class()
  try:
    tok = hf_class.from_str(json_text)
  except Exception as e:  # pylint: disable=broad-except
    raise TokenizerError(f"{name} is not a tokenizers tokenizer.json: "
                         f"{' '.join(str(e).split())}") from None
  eos = _special_id(tok, eos_token, _EOS_CANDIDATES, "eos_token", name)
  if eos is None:
    raise SpecialTokenError(
        f"{name} has no end-of-sequence token among {_EOS_CANDIDATES}; name "
        "it with eos_token.", argument="eos_token", token=None, source=name)
  bos = _special_id(tok, bos_token, _BOS_CANDIDATES, "bos_token", name)
  pad = _special_id(tok, pad_token, _PAD_CANDIDATES, "pad_token", name)
  pad = eos if pad is None else pad
  bos = eos if bos is None else bos
  vocab = sorted(tok.get_vocab(with_added_tokens=True).items())
  digest = hashlib.sha256(json.dumps([vocab, pad, bos, eos]).encode())

  def encode_offsets(text):
    encoding = tok.encode(text, add_special_tokens=False)
    return encoding.ids, encoding.offsets

  return Tokenizer(
      kind=kind, vocab_size=tok.get_vocab_size(with_added_tokens=True),
      pad_id=pad, bos_id=bos, eos_id=eos,
      encode=lambda text: tok.encode(text, add_special_tokens=False).ids,
      decode=lambda ids: tok.decode(ids, skip_special_tokens=False),
      json_text=json_text, fingerprint=digest.hexdigest()[:16],
      encode_offsets=encode_offsets)


def load_tokenizer(path: Union[str, os.PathLike], *, kind: str = "file",
                   eos_token: Optional[str] = None,
                   bos_token: Optional[str] = None,
                   pad_token: Optional[str] = None) -> Tokenizer:
  """:func:`tokenizer_from_json` of a ``tokenizer.json`` file.

  Args:
    path: the file, or a directory holding ``tokenizer.json`` (e.g. a Hugging
      Face checkpoint or a run directory).
    kind: as for :func:`tokenizer_from_json`.
    eos_token: as for :func:`tokenizer_from_json`.
    bos_token: as for :func:`tokenizer_from_json`.
    pad_token: as for :func:`tokenizer_from_json`.

  Returns:
    The tokenizer, named by its file in errors.

  Raises:
    FileNotFoundError: no tokenizer file at ``path``.
    ImportError, TokenizerError, SpecialTokenError: as for
      :func:`tokenizer_from_json`.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    path = os.path.join(path, TOKENIZER_FILE)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no tokenizer file at {path}.")
  with open(path) as f:
    text = f.read()
  return tokenizer_from_json(text, name=path, kind=kind, eos_token=eos_token,
                             bos_token=bos_token, pad_token=pad_token)


def train_bpe(texts: Sequence[str], vocab_size: int) -> str:
  """A byte-level BPE trained on ``texts``, as tokenizer.json text.

  Its special tokens are ``<pad>``, ``<bos>``, ``<eos>`` (ids 0, 1, 2); the
  256 byte symbols are always in its alphabet, so any text encodes.

  Args:
    texts: the training texts.
    vocab_size: the vocabulary size to reach (fewer ids when the texts have
      too few merges).

  Returns:
    The JSON, for :func:`tokenizer_from_json` (``kind="bpe"``).

  Raises:
    ImportError: ``tokenizers`` is not installed (with the pip command).
  """
  try:
    # pylint: disable=g-import-not-at-top
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    # pylint: enable=g-import-not-at-top
  except ImportError as e:
    raise _missing_tokenizers("train_bpe") from e
  tok = HFTokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False)
  tok.train_from_iterator(list(texts), trainer)
  return tok.to_str()


# -----------------------------------------------------------------------------
# Teacher and student share one tokenizer.
# -----------------------------------------------------------------------------


def _tokenizer_parts(tokenizer: Any) -> dict:
  spec = json.loads(tokenizer.to_str())
  return {key: spec.get(key) for key in
          ("normalizer", "pre_tokenizer", "model", "added_tokens")}


def _check_same_hf(teacher: Any, student: Any) -> None:
  """Two ``tokenizers.Tokenizer``: same vocabulary and pipeline."""
  tv = teacher.get_vocab(with_added_tokens=True)
  sv = student.get_vocab(with_added_tokens=True)
  if tv != sv:
    only_t = sorted(set(tv) - set(sv))
    only_s = sorted(set(sv) - set(tv))
    moved = sorted(t for t in set(tv) & set(sv) if tv[t] != sv[t])
    parts = [f"the teacher's tokenizer has {len(tv)} tokens, the student's "
             f"{len(sv)}"]
    if only_t:
      parts.append(f"{len(only_t)} only in the teacher's (e.g. {only_t[0]!r})")
    if only_s:
      parts.append(f"{len(only_s)} only in the student's (e.g. {only_s[0]!r})")
    if moved:
      parts.append(f"{len(moved)} with different ids (e.g. {moved[0]!r}: "
                   f"{tv[moved[0]]} vs {sv[moved[0]]})")
    raise TokenizerMismatchError(
        "teacher and student have different tokenizers: " + ", ".join(parts)
        + ". " + _ULD_HINT)
  tp, sp = _tokenizer_parts(teacher), _tokenizer_parts(student)
  for key in tp:
    if tp[key] != sp[key]:
      raise TokenizerMismatchError(
          f"teacher and student tokenizers share a vocabulary but differ in "
          f"their {key.replace('_', '-')}, so they split texts differently. "
          + _ULD_HINT)


def _describe(tokenizer: Any) -> str:
  if isinstance(tokenizer, Tokenizer):
    return f"{tokenizer.kind}, {tokenizer.vocab_size} ids"
  return (f"tokenizer.json, "
          f"{tokenizer.get_vocab_size(with_added_tokens=True)} ids")


def _as_hf(tokenizer: Any) -> Optional[Any]:
  """The ``tokenizers.Tokenizer`` of either kind (None for bytes)."""
  if not isinstance(tokenizer, Tokenizer):
    return tokenizer
  if tokenizer.json_text is None:
    return None
  return _hf_tokenizer_class().from_str(tokenizer.json_text)


def check_same_tokenizer(teacher_tokenizer: Any,
                         student_tokenizer: Any) -> None:
  """Raise unless teacher and student split every text into the same ids.

  Each argument is a :class:`Tokenizer` or a raw ``tokenizers.Tokenizer``.

  * Two :class:`Tokenizer`: their :attr:`Tokenizer.fingerprint` (the
    vocabulary and the PAD, BOS and EOS ids) must be equal.
  * Otherwise: the vocabularies (token -> id, added tokens included) and the
    tokenization pipeline (normalizer, pre-tokenizer, model: BPE merges,
    unigram scores, ...) must be equal; padding, truncation and
    post-processing settings may differ. A byte tokenizer matches no
    ``tokenizers.Tokenizer``.

  Token-level KD compares the two distributions id by id, so it needs one
  tokenizer.

  Args:
    teacher_tokenizer: the teacher's tokenizer.
    student_tokenizer: the student's tokenizer.

  Raises:
    TokenizerMismatchError: naming the first difference, and pointing to
      cross-tokenizer distillation (``kdjax.lm.make_uld_loss``).
  """
  if (isinstance(teacher_tokenizer, Tokenizer)
      and isinstance(student_tokenizer, Tokenizer)):
    if teacher_tokenizer.fingerprint == student_tokenizer.fingerprint:
      return
    teacher, student = (_as_hf(teacher_tokenizer),
                        _as_hf(student_tokenizer))
    if teacher is not None and student is not None:
      _check_same_hf(teacher, student)  # names the vocabulary's difference
  else:
    teacher, student = (_as_hf(teacher_tokenizer),
                        _as_hf(student_tokenizer))
    if teacher is not None and student is not None:
      _check_same_hf(teacher, student)
      return
  # Bytes against a tokenizer.json, or the same vocabulary with other
  # special ids.
  raise TokenizerMismatchError(
      f"teacher and student have different tokenizers: the teacher's "
      f"({_describe(teacher_tokenizer)}) is not the student's "
      f"({_describe(student_tokenizer)})"
      + ("" if teacher is None or student is None else
         ", their special (PAD, BOS, EOS) ids differ")
      + ". " + _ULD_HINT)


# -----------------------------------------------------------------------------
# Hugging Face tokenizer files.
# -----------------------------------------------------------------------------


def load_hf_tokenizer(path: str) -> Any:
  """``tokenizers.Tokenizer`` from ``path/tokenizer.json`` (or a file path).

  Raises:
    FileNotFoundError: no ``tokenizer.json`` (a SentencePiece
      ``tokenizer.model`` alone is said so).
  """
  import tokenizers
  file = path if os.path.isfile(path) else os.path.join(path, TOKENIZER_FILE)
  if not os.path.isfile(file):
    hint = ""
    if os.path.isfile(os.path.join(path, "tokenizer.model")):
      hint = (" (there is a SentencePiece tokenizer.model: convert it with "
              "transformers' AutoTokenizer(...).save_pretrained)")
    raise FileNotFoundError(
        f"{TOKENIZER_FILE} is missing from {path!r}{hint}")
  return tokenizers.Tokenizer.from_file(file)


def tokenizer_vocab_size(tokenizer: Any) -> int:
  """Number of ids a ``tokenizers.Tokenizer`` can emit (added tokens too):
  one more than its largest id."""
  vocab = tokenizer.get_vocab(with_added_tokens=True)
  return max(vocab.values()) + 1 if vocab else 0


def check_tokenizer_fits(tokenizer: Any, vocab_size: int, *,
                         what: str = "the model") -> None:
  """Raise if ``tokenizer`` emits ids ``>= vocab_size``.

  A model's vocabulary may be larger than its tokenizer's (padded for
  efficient matrix shapes; kdjax slices the padding off); smaller cannot work.

  Raises:
    HFCheckpointError: naming both sizes.
  """
  size = tokenizer_vocab_size(tokenizer)
  if size > vocab_size:
    raise HFCheckpointError(
        f"the tokenizer has {size} token ids (largest id {size - 1}) but "
        f"{what} has a vocabulary of {vocab_size}: ids {vocab_size}.."
        f"{size - 1} have no embedding. Use the tokenizer the model was "
        "trained with, or a model with vocab_size >= the tokenizer's")
