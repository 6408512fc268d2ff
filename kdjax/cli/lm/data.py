"""``kdjax lm``'s data phase: the corpus, the tokenizer, the teacher's
tokenizer, the sequences and the batches (:func:`load_data`).

Corpus (``data.corpus``, ``data.format``)
-----------------------------------------
* ``stdlib_functions`` (the default): the Python standard library's
  documented functions as prompt-completion records
  (:func:`kdjax.lm.stdlib_function_records`): train modules for training,
  validation modules held out, split by a hash of the module name.
* ``stdlib`` / ``files`` with ``format: text``: the standard library's own
  ``.py`` sources or ``data.paths``, in sorted path order (the first
  ``data.max_files``, each cut to ``data.max_file_bytes``); every
  ``data.eval_every``-th file is held out. Each file is tokenized as
  ``[BOS] + ids + [EOS]``, a split's files are concatenated and cut into
  windows of ``seq_len + 1`` ids whose first ``prompt_len`` are the prompt.
* ``files`` with ``format: jsonl / parquet / auto``: prompt-completion or chat
  rows (:func:`kdjax.lm.read_records`); held out ``data.eval_paths``, or
  every ``data.eval_every``-th line (Parquet row) of each file. One example
  per record, per assistant turn of a conversation (rendered with the chat
  template, :func:`kdjax.lm.record_examples`); the loss covers the
  completion (assistant) tokens only.

Tokenizer
---------
``bpe``: a byte-level BPE (``tokenizers``) trained on the training data only,
with the special tokens ``<pad>``, ``<bos>``, ``<eos>`` (ids 0, 1, 2), saved
once as ``<output_dir>/tokenizer.json`` and shared by every run of the
experiment (teacher and students must tokenize alike); ``file``: a local
``tokenizer.json``; ``bytes``: :class:`kdjax.lm.ByteTokenizer`. The teacher's
tokenizer must be the run's (checked here, with the teacher's files).

Sequences and batches
---------------------
:class:`kdjax.lm.LMBatches` shuffles the training sequences per epoch from
``(seed, epoch)`` (packed into rows with ``data.pack``) and is resumable
(its position is saved with every checkpoint). With ``data.cache_dir`` the
training sequences go through a token cache (:func:`kdjax.lm.write_token_cache`,
memory-mapped), reused without reading the training data while its inputs
are unchanged.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import os
import sysconfig
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

from kdjax.cli import errors
from kdjax.cli import runs
from kdjax.cli.config.base import ConfigError

if TYPE_CHECKING:
  from kdjax import lm


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


def read_corpus(data: Mapping[str, Any], *, with_train: bool = True) -> dict:
  """``{"train": [texts], "eval": [texts], "files": {...}, "train_read":
  bool}`` split by file (records: :func:`read_record_corpus`). Without
  ``with_train``, the training split is not read where the held-out split can
  be read apart (its texts and records are then empty; ``files`` still lists
  the training files where that needs no reading)."""
  if is_records(data):
    return read_record_corpus(data, with_train=with_train)
  files = corpus_files(data)
  texts = {"train": [], "eval": []}
  names = {"train": [], "eval": []}
  for i, path in enumerate(files):
    held_out = i % data["eval_every"] == data["eval_every"] - 1
    split = "eval" if held_out else "train"
    names[split].append(path)
    if split == "train" and not with_train:
      continue
    with open(path, "rb") as f:
      raw = f.read(data["max_file_bytes"] or -1)
    texts[split].append(raw.decode("utf-8", errors="replace"))
  return {**texts, "files": names, "train_read": with_train}


def is_records(data: Mapping[str, Any]) -> bool:
  """Whether the corpus is records (one example each), not text windows."""
  return data["corpus"] == "stdlib_functions" or (
      data["corpus"] == "files" and data["format"] != "text")


def _read_record_files(paths, data: Mapping[str, Any], key: str):
  from kdjax import lm  # pylint: disable=g-import-not-at-top
  try:
    return lm.read_records(
        list(paths), format=data["format"],
        prompt_field=data["prompt_field"],
        completion_field=data["completion_field"],
        messages_field=data["messages_field"], on_error=data["on_error"])
  except lm.RecordError as e:
    raise errors.BadRowError(f"{e} (config key 'data.on_error')") from None
  except FileNotFoundError as e:
    raise errors.MissingDataError(f"config key {key!r}: {e}") from None
  except ValueError as e:
    raise ConfigError(f"config key 'data.format': {e}") from None


def _row_number(record) -> int:
  """A record's 1-based place in its file: its JSONL line, its Parquet row
  + 1."""
  return record.line if record.unit == "line" else record.line + 1


def read_record_corpus(data: Mapping[str, Any], *, with_train: bool = True
                       ) -> dict:
  """The record corpus: ``{"records": {"train": [...], "eval": [...]},
  "train"/"eval": their texts, "files": {...}, "skipped": [lines]}``.

  ``stdlib_functions``: the train and validation modules of
  :func:`kdjax.lm.stdlib_function_records` (the first ``data.max_files``
  modules); files: the rows of ``data.paths``, held out ``data.eval_paths``
  or every ``data.eval_every``-th row.
  """
  from kdjax import lm  # pylint: disable=g-import-not-at-top
  skipped = []
  # The held-out split is read apart from the training split unless it is
  # every eval_every-th row of the same files.
  train_read = with_train or (data["corpus"] == "files"
                              and not data["eval_paths"])
  if data["corpus"] == "stdlib_functions":
    splits = ("train", "validation") if train_read else ("validation",)
    sets = {split: lm.stdlib_function_records(split, max_modules=data[
        "max_files"]) for split in splits}
    train = list(sets["train"]) if train_read else []
    held = list(sets["validation"])
    for split, rs in sets.items():
      if rs.num_skipped:
        skipped.append(f"stdlib {split}: {rs.skipped_summary()}")
  else:
    rows = (_read_record_files(data["paths"], data, "data.paths")
            if train_read else None)
    if rows is not None and rows.num_skipped:
      skipped.append(f"data.paths: {rows.skipped_summary()}")
    if data["eval_paths"]:
      held_rows = _read_record_files(data["eval_paths"], data,
                                     "data.eval_paths")
      if held_rows.num_skipped:
        skipped.append(f"data.eval_paths: {held_rows.skipped_summary()}")
      train, held = list(rows or ()), list(held_rows)
    else:
      # By each row's own place in its file (every k-th line, or Parquet
      # row), so that fixing or skipping a row, or adding a file, moves no
      # other row between the splits.
      k = data["eval_every"]
      held_out = [_row_number(r) % k == 0 for r in rows]
      train = [r for r, h in zip(rows, held_out) if not h]
      held = [r for r, h in zip(rows, held_out) if h]
  for split, records in (("training", train), ("held-out", held)):
    if not records and (split == "held-out" or train_read):
      where = ("data.corpus stdlib_functions (raise data.max_files)"
               if data["corpus"] == "stdlib_functions" else
               f"data.paths {list(data['paths'])}: add rows, give "
               "data.eval_paths, or " + ("lower" if split == "held-out"
                                         else "raise") + " data.eval_every")
      raise errors.MissingDataError(f"the {split} split has no record ({where}).")
  files = {split: sorted({r.path for r in records})
           for split, records in (("train", train), ("eval", held))}
  return {"train": lm.record_texts(train), "eval": lm.record_texts(held),
          "files": files, "records": {"train": train, "eval": held},
          "skipped": skipped, "train_read": train_read}


def source_fingerprint(data: Mapping[str, Any]) -> dict:
  """What the training data is read from, without reading it: the files the
  readers read, in their order, with their sizes and modification times (for
  ``stdlib_functions``: this Python's standard library, by version and
  path), and the keys that split them. A token cache of the same sources is
  reused without reading them."""
  import sys  # pylint: disable=g-import-not-at-top
  from kdjax import lm  # pylint: disable=g-import-not-at-top
  if data["corpus"] == "stdlib_functions":
    files = []
  elif not is_records(data):
    files = corpus_files(data)
  else:
    try:
      files = [f for f, _ in lm.record_files(list(data["paths"]),
                                             format=data["format"])]
      files += [f for f, _ in lm.record_files(list(data["eval_paths"]),
                                              format=data["format"])]
    except (OSError, ValueError):
      files = []  # the read reports it
  h = hashlib.sha256()
  for path in files:
    st = os.stat(path)
    h.update(f"{path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
  keys = ("corpus", "format", "paths", "eval_paths", "pattern", "max_files",
          "max_file_bytes", "eval_every")
  return {"python": sys.version, "stdlib": sysconfig.get_paths()["stdlib"],
          "files": h.hexdigest()[:16], **{k: data[k] for k in keys}}


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


# Beside the shared BPE: the data keys that chose its training split.
BPE_DATA_FILE = "tokenizer_data.json"


def _split_keys(data: Mapping[str, Any]) -> dict:
  """The data keys that decide which texts are training data."""
  keys = ("corpus", "format", "paths", "eval_paths", "pattern", "max_files",
          "max_file_bytes", "eval_every", "prompt_field", "completion_field",
          "messages_field")
  return {k: data[k] for k in keys}


def bpe_path(config: Mapping[str, Any]) -> str:
  """Where the shared BPE tokenizer lives: ``<output_dir>/tokenizer.json``."""
  return os.path.join(config["output_dir"], "tokenizer.json")


def build_tokenizer(config: Mapping[str, Any], corpus: Optional[Mapping] = None,
                    out=print):
  """The experiment's :class:`kdjax.lm.Tokenizer` (a BPE is trained once, on
  the training files, and saved as ``<output_dir>/tokenizer.json``)."""
  from kdjax import lm  # pylint: disable=g-import-not-at-top
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
  path = bpe_path(config)
  stamp_path = os.path.join(os.path.dirname(path) or ".", BPE_DATA_FILE)
  stamp = _split_keys(config["data"])
  if os.path.exists(path):
    if not os.path.exists(stamp_path):
      out(f"[lm] {path} has no record of the data it was trained on (made "
          "before kdjax kept one); if data.corpus or the split changed since, "
          "use a new output_dir: held-out data must not reach the tokenizer.")
    else:
      import json  # pylint: disable=g-import-not-at-top
      with open(stamp_path) as f:
        trained_on = json.load(f)
      if trained_on != stamp:
        changed = sorted(k for k in set(stamp) | set(trained_on)
                         if stamp.get(k) != trained_on.get(k))
        raise ConfigError(
            f"the BPE tokenizer {path} was trained on other data than this "
            f"config's (data keys {', '.join(changed)} differ), so it may have "
            "seen this config's held-out data; use a new output_dir (or "
            "delete the tokenizer and the runs made with it).")
    return tokenizer_of_file(path, tc, kind="bpe")
  if corpus is None:
    corpus = read_corpus(config["data"])
  tokenizer = _library_tokenizer(
      lambda **specials: lm.tokenizer_from_json(
          lm.train_bpe(corpus["train"], tc["vocab_size"]), name=path,
          kind="bpe", **specials), tc, path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  runs.write_json(stamp_path, stamp)
  tokenizer.save(os.path.dirname(path) or ".")
  out(f"[lm] trained a byte-level BPE tokenizer ({tc['vocab_size']} ids) "
      f"on the training data ({len(corpus['files']['train'])} files): {path}")
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


def sampling_fields(tokenizer: "lm.Tokenizer") -> dict:
  """The tokenizer's fields of :class:`kdjax.lm.SamplingConfig` (PAD and a
  BOS other than EOS are never sampled)."""
  return dict(vocab_size=tokenizer.vocab_size,
              suppress_ids=tuple(sorted({tokenizer.pad_id, tokenizer.bos_id}
                                        - {tokenizer.eos_id})),
              eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)


def sampling_config(tokenizer: "lm.Tokenizer", *, temperature: float,
                    top_k: Optional[int] = None,
                    top_p: Optional[float] = None) -> "lm.SamplingConfig":
  """The :class:`kdjax.lm.SamplingConfig` of ``lm generate``."""
  from kdjax import lm  # pylint: disable=g-import-not-at-top
  return lm.SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p,
                           **sampling_fields(tokenizer))


# -----------------------------------------------------------------------------
# The teacher's files and tokenizer.
# -----------------------------------------------------------------------------


def _check_same_tokenizer(teacher_tok: "lm.Tokenizer",
                          student_tok: "lm.Tokenizer",
                          teacher_path: str) -> None:
  """:func:`kdjax.lm.check_same_tokenizer`, as a ConfigError naming the
  config keys (and pointing to ULD)."""
  from kdjax import lm  # pylint: disable=g-import-not-at-top
  try:
    lm.check_same_tokenizer(teacher_tok, student_tok)
  except lm.TokenizerMismatchError:
    raise ConfigError(
        f"the teacher at {teacher_path} uses another tokenizer "
        f"({teacher_tok.kind}, {teacher_tok.vocab_size} ids) than this run "
        f"({student_tok.kind}, {student_tok.vocab_size} ids): token-level "
        "distillation needs one vocabulary. Use the teacher's tokenizer "
        f"(tokenizer.kind: file, tokenizer.path: {teacher_path}), or distil "
        "across tokenizers with Universal Logit Distillation "
        "(kdjax.lm.make_uld_loss, Python API).") from None


def check_teacher_exists(config: Mapping[str, Any],
                         run_dir: Optional[str] = None) -> None:
  """A MissingRunError when the configured teacher (``teacher.hf_path``, else
  the run in ``run_dir``) is not on disk (checked before any data is read)."""
  hf = config["teacher"]["hf_path"]
  if hf:
    if not os.path.exists(os.path.join(hf, "config.json")):
      raise errors.MissingRunError(
          f"config key 'teacher.hf_path': no Hugging Face checkpoint at {hf} "
          "(no config.json).")
    return
  if not os.path.exists(os.path.join(run_dir, runs.RUN_META)):
    raise errors.MissingRunError(
        f"no teacher run at {run_dir}: train one with `kdjax lm train-teacher "
        "--config ...` (same config), or set teacher.run_dir.")




def run_tokenizer(run_dir: str) -> "lm.Tokenizer":
  """The tokenizer a run in ``run_dir`` was trained with (its run.json and
  config.yaml read as they are)."""
  from kdjax.cli.config import base as _config_base  # pylint: disable=g-import-not-at-top
  from kdjax.cli.config import lm as _lm_config  # pylint: disable=g-import-not-at-top
  meta = runs.read_meta(run_dir, written_by=runs.LM_WRITERS)
  config = _config_base.load_saved(os.path.join(run_dir, runs.CONFIG_FILE),
                                   _lm_config.LM_SCHEMA)
  return tokenizer_of_run(run_dir, meta, config["tokenizer"])


def check_teacher_tokenizer(config: Mapping[str, Any],
                            tokenizer: "lm.Tokenizer",
                            run_dir: Optional[str] = None) -> None:
  """A ConfigError unless the teacher (``teacher.hf_path``'s tokenizer.json,
  if it has one, else the teacher run in ``run_dir``) tokenizes as
  ``tokenizer``: token-level distillation needs one vocabulary."""
  from kdjax import lm  # pylint: disable=g-import-not-at-top
  hf = config["teacher"]["hf_path"]
  if hf:
    if os.path.exists(os.path.join(hf, lm.TOKENIZER_FILE)):
      _check_same_tokenizer(tokenizer_of_file(hf, config["tokenizer"]),
                            tokenizer, hf)
    return
  check_run_teacher_tokenizer(run_dir, tokenizer)


def check_run_teacher_tokenizer(run_dir: str, tokenizer: "lm.Tokenizer"
                                ) -> None:
  """A ConfigError unless the teacher run in ``run_dir`` tokenizes as
  ``tokenizer``."""
  _check_same_tokenizer(run_tokenizer(run_dir), tokenizer, run_dir)


# -----------------------------------------------------------------------------
# Batches (kdjax.lm's, with the config keys named in errors).
# -----------------------------------------------------------------------------


def train_batches(prompts, completions, batch_size: int, seq_len: int,
                  pad_id: int, seed: int, *, pack: bool = False):
  """:class:`kdjax.lm.LMBatches` of the training sequences (``pack``: packed
  into rows)."""
  from kdjax import lm  # pylint: disable=g-import-not-at-top
  try:
    return lm.LMBatches(prompts, completions, batch_size, seq_len, pad_id,
                        seed, pack=pack)
  except lm.BatchSizeError as e:
    raise errors.BatchSizeError(f"config key 'data.batch_size': {e}") from None


def packed_rows_efficiency(batches: "lm.LMBatches", prompt_lens,
                           completion_lens, seq_len: int) -> Optional[float]:
  """The fraction of the packed rows' slots that hold tokens (None when the
  batches are not packed)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  if batches.packed_rows is None:
    return None
  used = np.minimum(np.asarray(prompt_lens) + np.asarray(completion_lens),
                    seq_len + 1) - 1
  return float(used.sum()) / (len(batches.packed_rows) * seq_len)


# -----------------------------------------------------------------------------
# The data phase.
# -----------------------------------------------------------------------------


@dataclasses.dataclass
class LMData:
  """The corpus split by file, the tokenizer, the train / held-out
  sequences and the resumable training batches."""
  corpus: dict
  tokenizer: "lm.Tokenizer"
  train: tuple
  held_out: tuple
  batches: Optional["lm.LMBatches"]
  packing_efficiency: Optional[float] = None
  held_out_paths: Optional[tuple] = None  # records: each held-out example's file
  data_fingerprint: Optional[str] = None  # of the training data (run.json)


def chat_template(config: Mapping[str, Any]) -> "lm.ChatTemplate":
  """The chat template of the conversations: ``data.chat_template``, else
  the tokenizer's directory (``teacher.hf_path``, or ``tokenizer.path`` of
  ``tokenizer.kind: file``)."""
  from kdjax import lm  # pylint: disable=g-import-not-at-top
  d, tc = config["data"], config["tokenizer"]
  source = d["chat_template"] or config["teacher"]["hf_path"] or (
      tc["path"] if tc["kind"] == "file" else None)
  if source is None:
    raise ConfigError(
        "config key 'data.chat_template': the data holds conversations; give "
        "their chat template (a .jinja file, a tokenizer_config.json or a "
        "Hugging Face directory), or use the tokenizer of a Hugging Face "
        "directory (tokenizer.kind: file).")
  if os.path.isfile(source) and source.endswith(lm.TOKENIZER_FILE):
    source = os.path.dirname(source) or "."
  try:
    return lm.load_chat_template(source)
  except (OSError, lm.ChatTemplateError) as e:
    raise ConfigError(f"config key 'data.chat_template': {e}") from None


def token_examples(config: Mapping[str, Any], records, tokenizer,
                   template) -> "lm.TokenExamples":
  """:func:`kdjax.lm.record_examples` of ``records``, its errors naming the
  config keys."""
  from kdjax import lm  # pylint: disable=g-import-not-at-top
  d = config["data"]
  # The built-in set is taken as it is: what does not fit is counted.
  on_error = "skip" if d["corpus"] == "stdlib_functions" else d["on_error"]
  try:
    return lm.record_examples(records, tokenizer, d["seq_len"],
                              template=template,
                              last_turn_only=d["last_turn_only"],
                              on_error=on_error, truncate=d["truncate"])
  except lm.ExampleError as e:
    keys = {"template_error": ("data.chat_template", "data.last_turn_only"),
            "completion_too_long": ("data.seq_len", "data.truncate"),
            "no_loss_token": ()}.get(e.reason, ("data.seq_len",))
    raise errors.BadRowError(
        f"{e} (config keys " + ", ".join(
            repr(k) for k in (*keys, "data.on_error")) + ")") from None


def _template_of(config: Mapping[str, Any], corpus: Mapping[str, Any],
                 tokenizer) -> Optional["lm.ChatTemplate"]:
  """The chat template when the records hold conversations (its special
  tokens checked against the tokenizer), else None."""
  from kdjax import lm  # pylint: disable=g-import-not-at-top
  records = corpus["records"]
  if not any(r.is_chat for split in records.values() for r in split):
    return None
  template = chat_template(config)
  try:
    lm.check_chat_template_tokens(template, tokenizer)
  except lm.ChatTemplateError as e:
    raise ConfigError(f"{e} (config keys 'tokenizer.kind', "
                      "'tokenizer.path', 'data.chat_template')") from None
  return template


def _split_sequences(config: Mapping[str, Any], corpus: Mapping[str, Any],
                     tokenizer, split: str, template,
                     out: Callable[[str], None]) -> tuple[tuple, tuple, tuple]:
  """``(prompts, completions, files)`` of one split (``"train"``/``"eval"``):
  text windows, or one example per record (per assistant turn); the first
  ``max_train_sequences`` / ``max_eval_sequences``."""
  from kdjax import lm  # pylint: disable=g-import-not-at-top
  d = config["data"]
  cap = d["max_eval_sequences" if split == "eval" else "max_train_sequences"]
  if "records" not in corpus:
    prompts, completions = lm.token_windows(
        corpus[split], tokenizer, d["seq_len"], d["prompt_len"], cap)
    return prompts, completions, ()
  records = corpus["records"][split]
  ex = token_examples(config, records, tokenizer, template)
  out(f"[lm] {'held-out' if split == 'eval' else 'training'} data: "
      f"{len(records)} records -> {ex.summary()}"
      + (f"; using the first {cap}" if cap and len(ex) > cap else ""))
  return ex.prompts[:cap], ex.completions[:cap], ex.paths[:cap]


def _cache_fingerprint(config: Mapping[str, Any], tokenizer) -> dict:
  """What a token cache of the training sequences is made from: the
  tokenizer, the sources (:func:`source_fingerprint`, nothing read), the
  chat template and the data keys that shape the sequences."""
  import json  # pylint: disable=g-import-not-at-top
  from kdjax import __version__  # pylint: disable=g-import-not-at-top
  d = config["data"]
  try:
    template = chat_template(config) if is_records(d) else None
  except ConfigError:  # no template: conversations would be refused
    template = None

  def digest(text: Optional[str]) -> Optional[str]:
    return None if text is None else hashlib.sha256(
        text.encode()).hexdigest()[:16]

  keys = ("seq_len", "prompt_len", "max_train_sequences", "last_turn_only",
          "on_error", "truncate", "prompt_field", "completion_field",
          "messages_field")
  return {"tokenizer": tokenizer.fingerprint,
          # The whole tokenizer.json: the fingerprint above covers the
          # vocabulary and special ids, not the normalizer/pre-tokenizer.
          "tokenizer_json": digest(tokenizer.json_text),
          "sources": source_fingerprint(d),
          "chat_template": None if template is None else digest(json.dumps(
              [template.source, dict(template.special_tokens)])),
          # The code that makes the examples (splits, skip rules, masks).
          "kdjax": __version__,
          **{k: d[k] for k in keys}}


def _cached_train_sequences(config: Mapping[str, Any],
                            corpus: Mapping[str, Any], tokenizer,
                            out: Callable[[str], None]):
  """``(cache, corpus)``: the training sequences through the token cache in
  ``data.cache_dir``, tokenized once and memory-mapped. A cache of the same
  inputs is reused without reading the training data (``corpus`` read
  without it); otherwise the training split is read, tokenized and written
  (a cache of other inputs is refused, or rebuilt with
  ``data.cache_rebuild``)."""
  from kdjax import lm  # pylint: disable=g-import-not-at-top
  d = config["data"]
  parts = _cache_fingerprint(config, tokenizer)
  path = os.path.join(d["cache_dir"], "train")
  streamed = not corpus["train_read"] and _streamable(d)
  if not corpus["train_read"]:
    try:
      cache = lm.open_token_cache(path, fingerprint=parts)
      out(f"[lm] token cache {path}: {len(cache)} training sequences, "
          f"{cache.num_tokens} tokens (reused; the training data not read)")
      return cache, corpus
    except lm.TokenCacheError:
      if not streamed:
        corpus = read_corpus(d)
  template = _template_of(config, corpus, tokenizer) if (
      "records" in corpus) else None

  def examples():
    if streamed:  # one record at a time: data larger than memory
      yield from _streamed_train_examples(config, tokenizer, template, out)
      return
    prompts, completions, _ = _split_sequences(config, corpus, tokenizer,
                                               "train", template, out)
    yield from zip(prompts, completions)

  rebuild = d["cache_rebuild"]
  try:
    cache = lm.write_token_cache(path, examples(), fingerprint=parts,
                                 on_mismatch="rebuild" if rebuild else "error")
  except lm.TokenCacheMismatchError as e:
    raise ConfigError(f"config key 'data.cache_dir': {e} (set "
                      "data.cache_rebuild=true to rebuild it)") from None
  except lm.TokenCacheError as e:  # a cache of these inputs, but damaged
    if not (rebuild and os.path.exists(os.path.join(path, "manifest.json"))):
      raise errors.RunError(
          f"the token cache in {path} cannot be read ({e}); delete the "
          "directory, or set data.cache_rebuild=true to rebuild it.") from None
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(path)
    cache = lm.write_token_cache(path, examples(), fingerprint=parts)
  out(f"[lm] token cache {path}: {len(cache)} training sequences, "
      f"{cache.num_tokens} tokens (written)")
  return cache, corpus


def _streamable(data: Mapping[str, Any]) -> bool:
  """Whether the training split can be tokenized into the cache one record at
  a time, never held in memory: rows of ``data.paths`` with the held-out
  rows in their own files (``data.eval_paths``)."""
  return (data["corpus"] == "files" and is_records(data)
          and bool(data["eval_paths"]))


def _streamed_train_examples(config: Mapping[str, Any], tokenizer, template,
                             out: Callable[[str], None]):
  """``(prompt, completion)`` of ``data.paths``' rows, read and tokenized one
  at a time (the first ``max_train_sequences``); the counts printed at the
  end."""
  import itertools  # pylint: disable=g-import-not-at-top
  from kdjax import lm  # pylint: disable=g-import-not-at-top
  d = config["data"]
  if template is None:
    try:  # conversations are known only as they come
      template = chat_template(config)
    except ConfigError:
      template = None
  try:
    records = lm.iter_records(
        list(d["paths"]), format=d["format"], prompt_field=d["prompt_field"],
        completion_field=d["completion_field"],
        messages_field=d["messages_field"], on_error=d["on_error"])
    stream = lm.iter_record_examples(
        records, tokenizer, d["seq_len"], template=template,
        last_turn_only=d["last_turn_only"], on_error=d["on_error"],
        truncate=d["truncate"])
    n = 0
    for example in itertools.islice(stream, d["max_train_sequences"]):
      n += 1
      yield example.prompt, example.completion
  except lm.RecordError as e:
    raise errors.BadRowError(f"{e} (config key 'data.on_error')") from None
  except lm.ExampleError as e:
    raise errors.BadRowError(f"{e} (config keys 'data.seq_len', "
                             "'data.chat_template', 'data.on_error')") from None
  out(f"[lm] training data: streamed {n} examples from {len(records.files)} "
      f"files ({stream.summary()}; {records.skipped_summary()})")


def _needs_training_texts(config: Mapping[str, Any]) -> bool:
  """Whether :func:`build_tokenizer` would train a BPE (on the training
  texts)."""
  tc = config["tokenizer"]
  hf = config["teacher"]["hf_path"]
  return (tc["kind"] == "bpe" and not hf
          and not os.path.exists(bpe_path(config)))


def load_data(config: Mapping[str, Any],
              tokenizer: Optional["lm.Tokenizer"] = None, *,
              train: bool = True, teacher: bool = False,
              teacher_dir: Optional[str] = None,
              out: Callable[[str], None] = print) -> LMData:
  """The data phase: corpus, tokenizer (``tokenizer``: a run's own; default:
  the experiment's, :func:`build_tokenizer`), held-out sequences and, with
  ``train``, the training sequences and batches: windows of a text corpus,
  one example per record (per assistant turn of a conversation) otherwise.
  With ``teacher``, the teacher (``teacher.hf_path``, else the run in
  ``teacher_dir``) must be on disk (checked before any file is read) and
  tokenize alike."""
  if teacher:
    check_teacher_exists(config, teacher_dir)
  d = config["data"]
  # With a token cache on disk, the training split is read only if the cache
  # turns out not to be of these inputs.
  cached = bool(train and d["cache_dir"] and (
      os.path.isdir(os.path.join(d["cache_dir"], "train")) or _streamable(d)))
  corpus = read_corpus(d, with_train=not cached)
  if tokenizer is None:
    if not corpus["train_read"] and _needs_training_texts(config):
      corpus = read_corpus(d)
    tokenizer = build_tokenizer(config, corpus, out)
  if teacher:
    check_teacher_tokenizer(config, tokenizer, teacher_dir)
  cache = None
  if train and d["cache_dir"]:
    cache, corpus = _cached_train_sequences(config, corpus, tokenizer, out)
  template = _template_of(config, corpus, tokenizer) if (
      "records" in corpus) else None
  *held_out, held_out_paths = _split_sequences(config, corpus, tokenizer,
                                               "eval", template, out)
  held_out = tuple(held_out)
  if not train:
    train_seqs = ()
  elif cache is not None:
    train_seqs = (cache.prompts, cache.completions)
    lengths = cache.lengths()
  else:
    train_seqs = _split_sequences(config, corpus, tokenizer, "train",
                                  template, out)[:2]
    lengths = tuple([len(x) for x in seqs] for seqs in train_seqs)
  for line in corpus.get("skipped", ()):
    out(f"[lm] {line}")
  if not held_out[0]:
    raise errors.MissingDataError(
        f"the held-out data ({len(corpus['files']['eval'])} files) gives no "
        "sequence: " + ("every record was skipped (raise data.seq_len, or see "
                        "the counts above)" if "records" in corpus else
                        f"no window of {d['seq_len'] + 1} tokens (add text or "
                        "lower data.seq_len)") + ".")
  batches, efficiency = None, None
  if train:
    source = (cache, None) if cache is not None else train_seqs
    batches = train_batches(*source, d["batch_size"], d["seq_len"],
                            tokenizer.pad_id, config["seed"], pack=d["pack"])
    efficiency = packed_rows_efficiency(batches, *lengths, d["seq_len"])
    if efficiency is not None:
      out(f"[lm] packed {len(train_seqs[0])} training sequences into "
          f"{len(batches.packed_rows)} rows of {d['seq_len']} tokens: "
          f"packing efficiency {efficiency:.3f} (non-pad fraction)")
  return LMData(corpus=corpus, tokenizer=tokenizer, train=train_seqs,
                held_out=held_out, batches=batches,
                packing_efficiency=efficiency,
                held_out_paths=held_out_paths or None,
                data_fingerprint=(cache.fingerprint if cache is not None
                                  else corpus_fingerprint(corpus)))
