"""``kdjax lm``'s data: a text corpus from local files, a tokenizer, batches.

Corpus
------
``data.corpus: stdlib`` reads the Python standard library's own ``.py``
sources (``sysconfig.get_paths()["stdlib"]``, ``site-packages`` and tests
excluded), ``files`` the files and directories of ``data.paths``. Files are
taken in sorted path order (the first ``data.max_files``, each cut to
``data.max_file_bytes``), so the corpus is the same on every run of one
Python installation. The held-out split is by file: every
``data.eval_every``-th file.

Tokenizer
---------
``bpe``: a byte-level BPE (``tokenizers``) trained on the training files
only, with the special tokens ``<pad>``, ``<bos>``, ``<eos>`` (ids 0, 1, 2),
saved once as ``<output_dir>/tokenizer.json`` and shared by every run of the
experiment (teacher and students must tokenize alike); ``file``: a local
``tokenizer.json``; ``bytes``: :class:`kdjax.lm.ByteTokenizer`.

Sequences and batches
---------------------
Each file is tokenized as ``[BOS] + ids + [EOS]``, the files of a split are
concatenated and cut into windows of ``seq_len + 1`` ids (stride
``seq_len``); window ``w`` is the example ``(prompt = w[:prompt_len],
completion = w[prompt_len:])`` of :func:`kdjax.lm.make_lm_batch`, so the
loss covers the completion tokens. :class:`LMBatches` shuffles the training
examples per epoch from ``(seed, epoch)`` and is resumable (its position is
saved with every checkpoint).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import sysconfig
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from kdjax.cli import errors
from kdjax.cli.config.base import ConfigError

_SPECIALS = ("<pad>", "<bos>", "<eos>")
_PAD_CANDIDATES = ("<pad>", "[PAD]", "<|endoftext|>", "</s>", "<eos>")
_BOS_CANDIDATES = ("<bos>", "<s>", "[CLS]", "<|begin_of_text|>",
                   "<|endoftext|>", "</s>", "<eos>")
_EOS_CANDIDATES = ("<eos>", "</s>", "<|endoftext|>", "<|end_of_text|>",
                   "<|im_end|>", "[SEP]")


# -----------------------------------------------------------------------------
# The corpus.
# -----------------------------------------------------------------------------


def _walk(root: str, pattern: str) -> list[str]:
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames
                         if d not in ("site-packages", "dist-packages",
                                      "__pycache__", "test", "tests",
                                      "idlelib", "lib2to3"))
    out.extend(os.path.join(dirpath, f) for f in filenames
               if fnmatch.fnmatch(f, pattern))
  return out


def corpus_files(data: Mapping[str, Any]) -> list[str]:
  """The corpus's files, sorted (the first ``data.max_files``)."""
  if data["corpus"] == "stdlib":
    roots = [sysconfig.get_paths()["stdlib"]]
  else:
    roots = list(data["paths"])
  files = []
  for root in roots:
    if os.path.isdir(root):
      files.extend(_walk(root, data["pattern"]))
    elif os.path.isfile(root):
      files.append(root)
    else:
      raise errors.MissingDataError(
          f"config key 'data.paths': {root} is neither a file nor a "
          "directory.")
  files = sorted(set(files))
  if data["max_files"]:
    files = files[:data["max_files"]]
  if len(files) < 2:
    raise errors.MissingDataError(
        f"the corpus has {len(files)} file(s) (data.corpus "
        f"{data['corpus']}, pattern {data['pattern']!r}); it needs at least 2 "
        "(one held out).")
  return files


def read_corpus(data: Mapping[str, Any]) -> dict:
  """``{"train": [texts], "eval": [texts], "files": {...}}`` split by file."""
  files = corpus_files(data)
  texts = {"train": [], "eval": []}
  names = {"train": [], "eval": []}
  for i, path in enumerate(files):
    with open(path, "rb") as f:
      raw = f.read(data["max_file_bytes"] or -1)
    held_out = i % data["eval_every"] == data["eval_every"] - 1
    split = "eval" if held_out else "train"
    texts[split].append(raw.decode("utf-8", errors="replace"))
    names[split].append(path)
  return {**texts, "files": names}


def corpus_fingerprint(corpus: Mapping[str, Any]) -> str:
  """A digest of the training texts (names the data of a run)."""
  h = hashlib.sha256()
  for text in corpus["train"]:
    h.update(text.encode("utf-8", errors="replace"))
    h.update(b"\0")
  return h.hexdigest()[:16]


# -----------------------------------------------------------------------------
# Tokenizers.
# -----------------------------------------------------------------------------


class Tokenizer:
  """A tokenizer with ``encode(text) -> ids`` (no special tokens), ``decode``,
  ``vocab_size`` and the ``pad_id``, ``bos_id``, ``eos_id`` of its specials."""

  def __init__(self, kind: str, vocab_size: int, pad_id: int, bos_id: int,
               eos_id: int, encode_fn, decode_fn, json_text: Optional[str],
               vocab_digest: Optional[str] = None):
    self.kind, self.vocab_size = kind, vocab_size
    self._digest = vocab_digest
    self.pad_id, self.bos_id, self.eos_id = pad_id, bos_id, eos_id
    self._encode, self._decode = encode_fn, decode_fn
    self.json_text = json_text

  def encode(self, text: str) -> list[int]:
    return list(self._encode(text))

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    while ids and ids[0] == self.bos_id:  # BOS may be EOS (GPT-2 style)
      ids = ids[1:]
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    ids = [i for i in ids if i not in (self.pad_id, self.bos_id)]
    return self._decode(ids)

  @property
  def fingerprint(self) -> str:
    """Identifies the vocabulary (teacher and student must share it): a
    digest of its ``token -> id`` map and special ids."""
    if self._digest is None:
      return f"{self.kind}:{self.vocab_size}"
    return self._digest

  def save(self, run_dir: str) -> None:
    """Writes tokenizer.json (not for bytes) into ``run_dir``."""
    if self.json_text is not None:
      _write(os.path.join(run_dir, "tokenizer.json"), self.json_text)


def _write(path: str, text: str) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def byte_tokenizer() -> Tokenizer:
  from kdjax.lm import ByteTokenizer  # pylint: disable=g-import-not-at-top
  bt = ByteTokenizer()
  return Tokenizer("bytes", bt.vocab_size, bt.pad_id, bt.bos_id, bt.eos_id,
                   lambda text: bt.encode(text, add_bos=False),
                   bt.decode, None)


def _special_id(tok, configured: Optional[str], candidates: Sequence[str],
                what: str, path: str) -> Optional[int]:
  if configured is not None:
    i = tok.token_to_id(configured)
    if i is None:
      raise ConfigError(f"config key 'tokenizer.{what}_token': {configured!r} "
                        f"is not a token of {path}.")
    return i
  for name in candidates:
    i = tok.token_to_id(name)
    if i is not None:
      return i
  return None


def hf_tokenizer(json_text: str, path: str, tok_config: Mapping[str, Any],
                 kind: str) -> Tokenizer:
  """A ``tokenizers`` tokenizer from its JSON (``path`` names it in errors)."""
  try:
    # pylint: disable-next=g-import-not-at-top
    from tokenizers import Tokenizer as HFTokenizer
  except ImportError as e:
    raise errors.MissingDependencyError(
        "tokenizer.kind bpe/file needs the `tokenizers` package: pip install "
        "'kdjax[tunix]' (or tokenizers), or set tokenizer.kind: bytes.") from e
  try:
    tok = HFTokenizer.from_str(json_text)
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(f"{path} is not a tokenizers tokenizer.json: "
                      f"{' '.join(str(e).split())}") from None
  eos = _special_id(tok, tok_config.get("eos_token"), _EOS_CANDIDATES, "eos",
                    path)
  if eos is None:
    raise ConfigError(f"{path} has no end-of-sequence token among "
                      f"{_EOS_CANDIDATES}; name it with tokenizer.eos_token.")
  bos = _special_id(tok, tok_config.get("bos_token"), _BOS_CANDIDATES, "bos",
                    path)
  pad = _special_id(tok, tok_config.get("pad_token"), _PAD_CANDIDATES, "pad",
                    path)
  pad = eos if pad is None else pad
  bos = eos if bos is None else bos
  vocab = sorted(tok.get_vocab(with_added_tokens=True).items())
  digest = hashlib.sha256(json.dumps([vocab, pad, bos, eos]).encode())
  return Tokenizer(
      kind, tok.get_vocab_size(with_added_tokens=True), pad, bos, eos,
      lambda text: tok.encode(text, add_special_tokens=False).ids,
      lambda ids: tok.decode(ids, skip_special_tokens=False), json_text,
      digest.hexdigest()[:16])


def train_bpe(texts: Sequence[str], vocab_size: int) -> str:
  """The JSON of a byte-level BPE trained on ``texts`` (specials 0, 1, 2)."""
  try:
    # pylint: disable=g-import-not-at-top
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    # pylint: enable=g-import-not-at-top
  except ImportError as e:
    raise errors.MissingDependencyError(
        "tokenizer.kind: bpe needs the `tokenizers` package: pip install "
        "'kdjax[tunix]' (or tokenizers), or set tokenizer.kind: bytes.") from e
  tok = HFTokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=list(_SPECIALS),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False)
  tok.train_from_iterator(list(texts), trainer)
  return tok.to_str()


def build_tokenizer(config: Mapping[str, Any], corpus: Optional[Mapping] = None,
                    out=print) -> Tokenizer:
  """The experiment's tokenizer (a BPE is trained once, on the training
  files, and saved as ``<output_dir>/tokenizer.json``)."""
  from kdjax.cli.config import lm as _lm_config  # pylint: disable=g-import-not-at-top
  tc = config["tokenizer"]
  hf = config["teacher"]["hf_path"]
  if hf and tc["kind"] != "file":
    # A Hugging Face teacher comes with its tokenizer: the run's.
    path = os.path.join(hf, "tokenizer.json")
    if not os.path.exists(path):
      raise errors.MissingDataError(
          f"the Hugging Face teacher at {hf} has no tokenizer.json; give one "
          "with tokenizer.kind: file and tokenizer.path.")
    with open(path) as f:
      return hf_tokenizer(f.read(), path, tc, "file")
  if tc["kind"] == "bytes":
    return byte_tokenizer()
  if tc["kind"] == "file":
    path = tc["path"]
    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.json")
    if not os.path.exists(path):
      raise errors.MissingDataError(f"config key 'tokenizer.path': no "
                                    f"tokenizer file at {path}.")
    with open(path) as f:
      return hf_tokenizer(f.read(), path, tc, "file")
  path = _lm_config.tokenizer_path(config)
  if not os.path.exists(path):
    if corpus is None:
      corpus = read_corpus(config["data"])
    text = train_bpe(corpus["train"], tc["vocab_size"])
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    _write(path, text)
    out(f"[lm] trained a byte-level BPE tokenizer ({tc['vocab_size']} ids) "
        f"on {len(corpus['train'])} training files: {path}")
  with open(path) as f:
    tok = hf_tokenizer(f.read(), path, tc, "bpe")
  return tok


def tokenizer_of_run(run_dir: str, meta: Mapping[str, Any],
                     tok_config: Mapping[str, Any]) -> Tokenizer:
  """The tokenizer a run was trained with (its own tokenizer.json)."""
  if meta.get("tokenizer") == "bytes":
    return byte_tokenizer()
  path = os.path.join(run_dir, "tokenizer.json")
  if not os.path.exists(path):
    raise errors.MissingRunError(f"the run at {run_dir} has no "
                                 "tokenizer.json.")
  with open(path) as f:
    return hf_tokenizer(f.read(), path, tok_config, meta.get("tokenizer",
                                                             "file"))


# -----------------------------------------------------------------------------
# Sequences and batches.
# -----------------------------------------------------------------------------


def sequences(texts: Sequence[str], tokenizer: Tokenizer, seq_len: int,
              prompt_len: int, limit: Optional[int] = None
              ) -> tuple[list, list]:
  """``(prompts, completions)``: windows of ``seq_len + 1`` ids of the
  concatenated ``[BOS] + file + [EOS]`` streams (stride ``seq_len``)."""
  stream: list[int] = []
  for text in texts:
    stream.append(tokenizer.bos_id)
    stream.extend(tokenizer.encode(text))
    stream.append(tokenizer.eos_id)
  prompts, completions = [], []
  for start in range(0, max(len(stream) - seq_len - 1, -1) + 1, seq_len):
    window = stream[start:start + seq_len + 1]
    if len(window) < seq_len + 1:
      break
    prompts.append(window[:prompt_len])
    completions.append(window[prompt_len:])
    if limit is not None and len(prompts) >= limit:
      break
  return prompts, completions


class LMBatches:
  """Endless shuffled batches of :func:`kdjax.lm.make_lm_batch`, resumable.

  Epoch ``e`` visits the examples in the order
  ``default_rng([seed, e]).permutation(n)``, ``n // batch_size`` batches (the
  remainder is dropped); ``get_state``/``set_state`` are the position.
  """

  def __init__(self, prompts, completions, batch_size: int, seq_len: int,
               pad_id: int, seed: int):
    if batch_size > len(prompts):
      raise errors.BatchSizeError(
          f"config key 'data.batch_size' ({batch_size}) exceeds the "
          f"{len(prompts)} training sequences; lower it or add text.")
    self._prompts, self._completions = prompts, completions
    self.batch_size, self._seq_len, self._pad = batch_size, seq_len, pad_id
    self._seed = seed
    self.steps_per_epoch = len(prompts) // batch_size
    self._epoch, self._index = 0, 0
    self._order = None

  def _batch(self, rows) -> dict:
    from kdjax.lm import make_lm_batch  # pylint: disable=g-import-not-at-top
    return make_lm_batch([self._prompts[i] for i in rows],
                         [self._completions[i] for i in rows], self._seq_len,
                         pad_id=self._pad)

  def _order_of(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self._seed, epoch]).permutation(
        len(self._prompts))

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    if self._order is None:
      self._order = self._order_of(self._epoch)
    i = self._index * self.batch_size
    batch = self._batch(self._order[i:i + self.batch_size])
    self._index += 1
    if self._index == self.steps_per_epoch:
      self._epoch, self._index, self._order = self._epoch + 1, 0, None
    return batch

  def batch_at(self, step: int) -> dict:
    """The batch of step ``step`` (the iterator does not move)."""
    epoch, index = divmod(step, self.steps_per_epoch)
    i = index * self.batch_size
    return self._batch(self._order_of(epoch)[i:i + self.batch_size])

  def get_state(self) -> dict:
    return {"epoch": self._epoch, "index": self._index}

  def set_state(self, state) -> None:
    self._epoch, self._index = int(state["epoch"]), int(state["index"])
    self._order = None


def eval_batches(prompts, completions, batch_size: int, seq_len: int,
                 pad_id: int) -> list[dict]:
  """The held-out sequences in order, as fixed-size batches; the last is
  padded with copies whose ``loss_mask`` is 0."""
  from kdjax.lm import make_lm_batch  # pylint: disable=g-import-not-at-top
  n = len(prompts)
  size = min(batch_size, n)
  out = []
  for i in range(0, n, size):
    rows = list(range(i, min(i + size, n)))
    real = len(rows)
    rows += [rows[-1]] * (size - real)
    batch = make_lm_batch([prompts[j] for j in rows],
                          [completions[j] for j in rows], seq_len,
                          pad_id=pad_id)
    batch["loss_mask"][real:] = 0.0
    out.append(batch)
  return out


def make_prompt_batch(prompt_ids: Sequence[Sequence[int]], max_new: int,
                      pad_id: int) -> tuple[np.ndarray, np.ndarray]:
  """``(tokens [B, S], prompt_len [B])``: a generation buffer of ``S = max
  prompt + max_new`` positions."""
  longest = max(len(p) for p in prompt_ids)
  buf = np.full((len(prompt_ids), longest + max_new), pad_id, np.int32)
  for i, p in enumerate(prompt_ids):
    buf[i, :len(p)] = p
  return buf, np.asarray([len(p) for p in prompt_ids], np.int32)
