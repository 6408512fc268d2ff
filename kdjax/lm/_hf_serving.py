"""The tokenizer and generation files of an exported Hugging Face directory.

:func:`kdjax.lm.save_hf_checkpoint` writes ``config.json`` and
``model.safetensors``; what a serving tool (``transformers.AutoTokenizer``,
``GenerationConfig``, vLLM, ...) reads beside them is written here, from one of
two sources:

* **A source directory** (``tokenizer_files_from``: the teacher's Hugging Face
  directory, whose tokenizer the student shares). Each of
  :data:`CARRIED_FILES` it holds is carried, with these rules:

  - ``tokenizer.json``: written from the ``tokenizer`` argument when one is
    given, which must then have the source's vocabulary and pipeline
    (:class:`kdjax.lm.TokenizerMismatchError` otherwise); else copied.
  - ``tokenizer_config.json``: copied with ``auto_map`` (remote code that is
    not carried), ``processor_class`` (a multimodal teacher's processor; the
    student is a text model), ``name_or_path`` and ``_name_or_path`` (the
    source's path) removed, and ``model_max_length`` lowered to the student's
    ``config.json`` ``max_position_embeddings`` when it is larger (and not
    transformers' "no limit" sentinel, ``>= 1e29``). Everything else (the
    tokenizer class, special tokens, ``added_tokens_decoder``, an inline
    ``chat_template``) is kept, so ``AutoTokenizer`` builds the same tokenizer
    from the export as from the source.
  - ``generation_config.json``: copied without ``transformers_version``; an
    id among ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id`` that it
    lacks is taken from ``config.json``, and one that ``config.json`` lacks is
    taken from it (so the two agree; where both have one they are kept as the
    source has them: a generation config may stop on more ids than
    ``config.json`` names, as Qwen 3's and Llama 3 Instruct's do). Every token
    id of either file must be below the student's ``vocab_size``
    (:class:`kdjax.lm.HFCheckpointError` otherwise).
  - ``special_tokens_map.json``, ``chat_template.jinja``,
    ``chat_template.json``, ``additional_chat_templates/`` (the whole folder),
    ``tokenizer.model`` (SentencePiece), ``added_tokens.json``,
    ``vocab.json``, ``merges.txt``: copied byte for byte.

  A ``tokenizer_config.json`` or ``generation_config.json`` the source lacks
  is written as in the second case. Other files of the source (weights,
  ``config.json``, a processor's ``preprocessor_config.json``, remote code)
  are not carried.

* **No source directory** (a kdjax-trained tokenizer, or a bare
  ``tokenizers.Tokenizer``): ``generation_config.json`` holds
  ``config.json``'s ``bos_token_id`` / ``eos_token_id`` / ``pad_token_id``;
  ``tokenizer_config.json`` is ``{"tokenizer_class":
  "PreTrainedTokenizerFast", "bos_token", "eos_token", "pad_token",
  "model_max_length", "clean_up_tokenization_spaces": false}``: the special
  tokens are the strings of those ids (the first of a list) in
  ``tokenizer.json``, ``model_max_length`` is ``config.json``'s
  ``max_position_embeddings``; so ``AutoTokenizer.from_pretrained`` encodes
  with ``tokenizer.json`` exactly as kdjax does (no family tokenizer class
  that re-splits text) and names the same special tokens.

``config.json``'s token ids, given a :class:`kdjax.lm.Tokenizer` (whose
``bos_id`` / ``eos_id`` / ``pad_id`` the student was trained and generates
with): when no source file names special tokens (no source, or one without
``generation_config.json`` and ``tokenizer_config.json``) the tokenizer's ids
replace ``hf_config``'s; otherwise they only fill the ids that
``config.json`` and the source's generation config both lack
(:func:`fill_config_ids`).

Each of ``tokenizer.json``, :data:`CARRIED_FILES` and
``additional_chat_templates/`` that is already in the export directory but not
written this time is removed, so that an export over an earlier one never
mixes two tokenizers' files.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping, MutableMapping, Optional, Sequence

from kdjax.lm._hf_config import HFCheckpointError

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
CHAT_TEMPLATES_DIR = "additional_chat_templates"
# Copied byte for byte when the source has them.
VERBATIM_FILES = ("special_tokens_map.json", "chat_template.jinja",
                  "chat_template.json", "tokenizer.model", "added_tokens.json",
                  "vocab.json", "merges.txt")
CARRIED_FILES = (TOKENIZER_CONFIG, GENERATION_CONFIG) + VERBATIM_FILES
SPECIAL_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")
# transformers' VERY_LARGE_INTEGER (int(1e30)): "no limit".
_NO_LIMIT = int(1e29)
_DROPPED_TOKENIZER_KEYS = ("auto_map", "processor_class", "name_or_path",
                           "_name_or_path")


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding="utf-8") as f:
      data = json.load(f)
  except ValueError as e:
    raise HFCheckpointError(f"{path} is not JSON: {e}") from None
  if not isinstance(data, dict):
    raise HFCheckpointError(f"{path} is not a JSON object")
  return data


def _write_json(path: str, data: Mapping[str, Any]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2, sort_keys=True, ensure_ascii=False)
    f.write("\n")


def _ids(value: Any) -> list:
  if value is None:
    return []
  return list(value) if isinstance(value, (list, tuple)) else [value]


def _check_ids(cfg: Mapping[str, Any], vocab_size: int, name: str) -> None:
  for key in SPECIAL_ID_KEYS + ("decoder_start_token_id",):
    for i in _ids(cfg.get(key)):
      if not isinstance(i, int) or not 0 <= i < vocab_size:
        raise HFCheckpointError(
            f"{name}: {key}={cfg[key]!r} is not a token id of the student "
            f"(vocab_size {vocab_size})")


def fill_config_ids(cfg: MutableMapping[str, Any], *,
                    source_dir: Optional[str] = None,
                    special_ids: Optional[Mapping[str, int]] = None) -> None:
  """Sets ``cfg``'s (a ``config.json`` dict's) ``bos_token_id`` /
  ``eos_token_id`` / ``pad_token_id``.

  Without a ``generation_config.json`` or ``tokenizer_config.json`` in
  ``source_dir`` (which name the special tokens a serving tool uses),
  ``special_ids`` (a kdjax tokenizer's, those the student was trained and
  generates with) replace ``cfg``'s. Otherwise the ids ``cfg`` lacks are
  taken from the source's generation config, then from ``special_ids``;
  those it has are kept.
  """
  gen = None
  decided = False
  if source_dir is not None:
    file = os.path.join(source_dir, GENERATION_CONFIG)
    if os.path.isfile(file):
      gen = _read_json(file)
    decided = gen is not None or os.path.isfile(
        os.path.join(source_dir, TOKENIZER_CONFIG))
  if not decided and special_ids is not None:
    cfg.update(special_ids)
    return
  for key in SPECIAL_ID_KEYS:
    if cfg.get(key) is None:
      value = (gen or {}).get(key)
      if value is None and special_ids is not None:
        value = special_ids.get(key)
      if value is not None:
        cfg[key] = value


def _generation_config(cfg: Mapping[str, Any],
                       source_dir: Optional[str]) -> Optional[dict]:
  gen = {}
  if source_dir is not None:
    file = os.path.join(source_dir, GENERATION_CONFIG)
    if os.path.isfile(file):
      gen = _read_json(file)
      gen.pop("transformers_version", None)
  for key in SPECIAL_ID_KEYS:
    if gen.get(key) is None and cfg.get(key) is not None:
      gen[key] = cfg[key]
  return gen or None


def _token(tokenizer: Any, i: Any) -> Optional[str]:
  ids = _ids(i)
  return None if not ids else tokenizer.id_to_token(ids[0])


def _minimal_tokenizer_config(tokenizer: Any, cfg: Mapping[str, Any]) -> dict:
  out = {"tokenizer_class": "PreTrainedTokenizerFast",
         "clean_up_tokenization_spaces": False}
  for key in SPECIAL_ID_KEYS:
    token = _token(tokenizer, cfg.get(key))
    if token is not None:
      out[key[:-len("_id")]] = token
  if cfg.get("max_position_embeddings"):
    out["model_max_length"] = int(cfg["max_position_embeddings"])
  return out


def _carried_tokenizer_config(source: dict, cfg: Mapping[str, Any]) -> dict:
  out = {k: v for k, v in source.items() if k not in _DROPPED_TOKENIZER_KEYS}
  limit = out.get("model_max_length")
  context = cfg.get("max_position_embeddings")
  if (isinstance(limit, (int, float)) and context and limit < _NO_LIMIT
      and limit > context):
    out["model_max_length"] = int(context)
  return out


class ServingFiles:
  """The files :func:`plan_serving_files` checked, written by :meth:`write`."""

  def __init__(self, tokenizer: Any, tokenizer_source: Optional[str],
               generation: Optional[dict], tokenizer_config: Optional[dict],
               source_dir: Optional[str]):
    self.tokenizer = tokenizer
    self.tokenizer_source = tokenizer_source  # copied byte for byte
    self.generation = generation
    self.tokenizer_config = tokenizer_config
    self.source_dir = source_dir

  def write(self, path: str) -> list:
    """Writes the files in ``path`` (an existing directory), removes the
    tokenizer files of an earlier export not written now, and returns the
    names written, sorted."""
    written = []
    if self.tokenizer_source is not None:
      shutil.copyfile(self.tokenizer_source, os.path.join(path, TOKENIZER_JSON))
      written.append(TOKENIZER_JSON)
    elif self.tokenizer is not None:
      self.tokenizer.save(os.path.join(path, TOKENIZER_JSON))
      written.append(TOKENIZER_JSON)
    if self.generation is not None:
      _write_json(os.path.join(path, GENERATION_CONFIG), self.generation)
      written.append(GENERATION_CONFIG)
    if self.tokenizer_config is not None:
      _write_json(os.path.join(path, TOKENIZER_CONFIG), self.tokenizer_config)
      written.append(TOKENIZER_CONFIG)
    source = self.source_dir
    if source is not None:
      for name in VERBATIM_FILES:
        file = os.path.join(source, name)
        if os.path.isfile(file):
          shutil.copyfile(file, os.path.join(path, name))
          written.append(name)
    templates = os.path.join(path, CHAT_TEMPLATES_DIR)
    if os.path.isdir(templates) and not os.path.islink(templates):
      shutil.rmtree(templates)
    elif os.path.lexists(templates):
      os.remove(templates)
    if source is not None and os.path.isdir(
        os.path.join(source, CHAT_TEMPLATES_DIR)):
      shutil.copytree(os.path.join(source, CHAT_TEMPLATES_DIR), templates)
      written.append(CHAT_TEMPLATES_DIR)
    for name in (TOKENIZER_JSON,) + CARRIED_FILES:  # an earlier export's
      file = os.path.join(path, name)
      if name not in written and os.path.isfile(file):
        os.remove(file)
    return sorted(written)


def plan_serving_files(cfg: Mapping[str, Any], *, tokenizer: Any = None,
                       source_dir: Optional[str] = None) -> ServingFiles:
  """The export's tokenizer and generation files (module docstring), checked
  before anything is written.

  Args:
    cfg: the student's ``config.json`` dict (``vocab_size``, token ids,
      ``max_position_embeddings``).
    tokenizer: the ``tokenizers.Tokenizer`` to write as ``tokenizer.json``
      (None: the source's is copied, if any).
    source_dir: the directory whose files are carried, or None.

  Returns:
    The files, to :meth:`ServingFiles.write`.

  Raises:
    HFCheckpointError: a tokenizer larger than the student's vocabulary; a
      token id of the generation config or ``config.json`` outside it; a
      source file that is not JSON.
    TokenizerMismatchError: ``tokenizer`` differs from the source's
      ``tokenizer.json``.
  """
  # pylint: disable=g-import-not-at-top
  from kdjax.lm._tokenizer import check_tokenizer_fits
  from kdjax.lm._tokenizer import load_hf_tokenizer
  from kdjax.lm._tokenizer import _check_same_hf
  # pylint: enable=g-import-not-at-top
  vocab_size = int(cfg["vocab_size"])
  copy_from = None
  if source_dir is not None and os.path.isfile(
      os.path.join(source_dir, TOKENIZER_JSON)):
    source_tokenizer = load_hf_tokenizer(source_dir)
    if tokenizer is not None:
      _check_same_hf(source_tokenizer, tokenizer)
    else:
      tokenizer = source_tokenizer
      copy_from = os.path.join(source_dir, TOKENIZER_JSON)
  if tokenizer is not None:
    check_tokenizer_fits(tokenizer, vocab_size)
  _check_ids(cfg, vocab_size, "config.json")
  gen = _generation_config(cfg, source_dir)
  if gen is not None:
    _check_ids(gen, vocab_size, GENERATION_CONFIG)
  source_file = (None if source_dir is None
                 else os.path.join(source_dir, TOKENIZER_CONFIG))
  tok_cfg = None
  if source_file is not None and os.path.isfile(source_file):
    tok_cfg = _carried_tokenizer_config(_read_json(source_file), cfg)
  elif tokenizer is not None:
    tok_cfg = _minimal_tokenizer_config(tokenizer, cfg)
  return ServingFiles(tokenizer, copy_from, gen, tok_cfg, source_dir)


def special_ids_of(tokenizer: Any) -> Optional[dict]:
  """``{"bos_token_id", "eos_token_id", "pad_token_id"}`` of a
  :class:`kdjax.lm.Tokenizer` (None for anything else)."""
  if all(hasattr(tokenizer, a) for a in ("bos_id", "eos_id", "pad_id",
                                         "json_text")):
    return {"bos_token_id": int(tokenizer.bos_id),
            "eos_token_id": int(tokenizer.eos_id),
            "pad_token_id": int(tokenizer.pad_id)}
  return None


__all__: Sequence[str] = ("CARRIED_FILES", "plan_serving_files")
