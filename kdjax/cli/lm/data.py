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
import os
import sysconfig
from typing import Any, Mapping, Optional

from kdjax.cli import errors
from kdjax.cli.config.base import ConfigError


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
# Tokenizers (kdjax.lm's, with the config keys named in errors).
# -----------------------------------------------------------------------------


def _library_tokenizer(build, tok_config: Mapping[str, Any], path: str):
  """``build(**special_tokens)`` with kdjax.lm's errors as the CLI's."""
  from kdjax import lm  # pylint: disable=g-import-not-at-top
  try:
    return build(eos_token=tok_config.get("eos_token"),
                 bos_token=tok_config.get("bos_token"),
                 pad_token=tok_config.get("pad_token"))
  except lm.SpecialTokenError as e:
    if e.token is None:
      raise ConfigError(f"{e.source} has no end-of-sequence token; name it "
                        f"with tokenizer.{e.argument}.") from None
    raise ConfigError(f"config key 'tokenizer.{e.argument}': {e.token!r} is "
                      f"not a token of {e.source}.") from None
  except lm.TokenizerError as e:
    raise ConfigError(str(e)) from None
  except FileNotFoundError:
    raise errors.MissingDataError(f"config key 'tokenizer.path': no "
                                  f"tokenizer file at {path}.") from None
  except ImportError as e:
    raise errors.MissingDependencyError(
        f"{e} Or set tokenizer.kind: bytes.") from e


def tokenizer_of_file(path: str, tok_config: Mapping[str, Any],
                      kind: str = "file"):
  """The :class:`kdjax.lm.Tokenizer` of a tokenizer.json (or a directory
  holding one)."""
  from kdjax import lm  # pylint: disable=g-import-not-at-top
  return _library_tokenizer(
      lambda **specials: lm.load_tokenizer(path, kind=kind, **specials),
      tok_config, path)


def build_tokenizer(config: Mapping[str, Any], corpus: Optional[Mapping] = None,
                    out=print):
  """The experiment's :class:`kdjax.lm.Tokenizer` (a BPE is trained once, on
  the training files, and saved as ``<output_dir>/tokenizer.json``)."""
  from kdjax import lm  # pylint: disable=g-import-not-at-top
  from kdjax.cli.config import lm as _lm_config  # pylint: disable=g-import-not-at-top
  tc = config["tokenizer"]
  hf = config["teacher"]["hf_path"]
  if hf and tc["kind"] != "file":
    # A Hugging Face teacher comes with its tokenizer: the run's.
    if not os.path.exists(os.path.join(hf, lm.TOKENIZER_FILE)):
      raise errors.MissingDataError(
          f"the Hugging Face teacher at {hf} has no tokenizer.json; give one "
          "with tokenizer.kind: file and tokenizer.path.")
    return tokenizer_of_file(hf, tc)
  if tc["kind"] == "bytes":
    return lm.byte_tokenizer()
  if tc["kind"] == "file":
    return tokenizer_of_file(tc["path"], tc)
  path = _lm_config.tokenizer_path(config)
  if os.path.exists(path):
    return tokenizer_of_file(path, tc, kind="bpe")
  if corpus is None:
    corpus = read_corpus(config["data"])
  tokenizer = _library_tokenizer(
      lambda **specials: lm.tokenizer_from_json(
          lm.train_bpe(corpus["train"], tc["vocab_size"]), name=path,
          kind="bpe", **specials), tc, path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tokenizer.save(os.path.dirname(path) or ".")
  out(f"[lm] trained a byte-level BPE tokenizer ({tc['vocab_size']} ids) "
      f"on {len(corpus['train'])} training files: {path}")
  return tokenizer


def tokenizer_of_run(run_dir: str, meta: Mapping[str, Any],
                     tok_config: Mapping[str, Any]):
  """The :class:`kdjax.lm.Tokenizer` a run was trained with (its own
  tokenizer.json)."""
  from kdjax import lm  # pylint: disable=g-import-not-at-top
  if meta.get("tokenizer") == "bytes":
    return lm.byte_tokenizer()
  path = os.path.join(run_dir, lm.TOKENIZER_FILE)
  if not os.path.exists(path):
    raise errors.MissingRunError(f"the run at {run_dir} has no "
                                 "tokenizer.json.")
  return tokenizer_of_file(path, tok_config, kind=meta.get("tokenizer", "file"))


# -----------------------------------------------------------------------------
# Batches (kdjax.lm's, with the config keys named in errors).
# -----------------------------------------------------------------------------


def train_batches(prompts, completions, batch_size: int, seq_len: int,
                  pad_id: int, seed: int):
  """:class:`kdjax.lm.LMBatches` of the training windows."""
  from kdjax import lm  # pylint: disable=g-import-not-at-top
  try:
    return lm.LMBatches(prompts, completions, batch_size, seq_len, pad_id,
                        seed)
  except lm.BatchSizeError:
    raise errors.BatchSizeError(
        f"config key 'data.batch_size' ({batch_size}) exceeds the "
        f"{len(prompts)} training sequences; lower it or add text.") from None
