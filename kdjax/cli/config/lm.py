"""The config of ``kdjax lm``: schema, loading, validation and run paths.

``kdjax lm train-teacher | distill | eval | generate`` read a YAML file of the
keys of :data:`LM_SCHEMA` (any key may be left out) and ``--set KEY=VALUE``
overrides, checked as the image commands' configs are
(:mod:`kdjax.cli.config.base`: unknown keys, types, choices; ConfigError,
exit status 2). ``kdjax lm config --schema`` prints the schema. Standard
library and PyYAML only: the config is read before JAX is imported.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from kdjax.cli import runs
from kdjax.cli.config import base as _config_base
from kdjax.cli.config import sections as _sections
from kdjax.cli.config.base import ConfigError
from kdjax.cli.config.base import Field

FAMILIES = ("kdjax", "qwen3", "llama3", "gemma3")
OBJECTIVES = ("ce", "token_kd", "lean_kd", "gkd", "seq_kd")
DIVERGENCES = ("kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd")

# kdjax.lm.DecoderLM sizes (TransformerConfig fields); model.kwargs override.
KDJAX_SIZES = {
    "tiny": dict(num_layers=1, num_heads=2, d_model=32),
    "small": dict(num_layers=2, num_heads=4, d_model=64),
    "base": dict(num_layers=4, num_heads=4, d_model=128),
    "medium": dict(num_layers=6, num_heads=8, d_model=256),
}


def _model_section(size: str, doc: str) -> dict:
  return {
      "family": Field("kdjax", "str", f"{doc} family: kdjax "
                      "(kdjax.lm.DecoderLM), or Tunix's qwen3, llama3, gemma3 "
                      "(Flax NNX; needs the [tunix] extra)", choices=FAMILIES),
      "size": Field(size, "str", "kdjax: tiny, small, base or medium; tunix "
                    "families: tiny (2 layers, width 32) or a Tunix "
                    "ModelConfig preset, e.g. qwen3_0p6b"),
      "kwargs": Field({}, "dict", "fields laid over the size's config, e.g. "
                      "{num_layers: 3} (kdjax: TransformerConfig; tunix: the "
                      "family's ModelConfig); vocab_size: the model's "
                      "embedding rows (default: the tokenizer's vocabulary)"),
  }


LM_SCHEMA: dict = {
    "output_dir": Field("runs/lm", "str", "experiment directory: holds the "
                        "tokenizer, the teacher run and one directory per "
                        "distill run"),
    "seed": Field(0, "int", "seed of the initialisation, data order and "
                  "sampling", minimum=0),
    "data": {
        "corpus": Field("stdlib_functions", "str", "stdlib: the Python standard "
                        "library's own .py sources as text (sysconfig's "
                        "stdlib path; sorted, deterministic); "
                        "stdlib_functions: its documented functions as "
                        "instructions, prompt = signature + docstring, "
                        "completion = body, held-out modules never trained "
                        "on (kdjax.lm.stdlib_function_records); files: "
                        "data.paths in data.format",
                        choices=("stdlib", "stdlib_functions", "files")),
        "paths": Field([], "strs", "corpus: files: files or directories "
                       "(text: searched recursively for data.pattern; "
                       "jsonl/parquet: for their extensions)"),
        "format": Field("text", "str", "corpus: files: text: plain text cut "
                        "into windows of seq_len + 1 tokens (the first "
                        "prompt_len are the prompt); jsonl, parquet: rows of "
                        "prompt/completion strings or chat messages (role, "
                        "content), one example each (a conversation: one per "
                        "assistant turn, rendered with the chat template), "
                        "the loss on the completion (assistant) tokens only; "
                        "auto: jsonl or parquet by each file's extension",
                        choices=("text", "jsonl", "parquet", "auto")),
        "eval_paths": Field([], "strs", "format jsonl/parquet: the held-out "
                            "files (default: every eval_every-th row of "
                            "data.paths)"),
        "prompt_field": Field("prompt", "str", "format jsonl/parquet: the "
                              "prompt's field"),
        "completion_field": Field("completion", "str", "format jsonl/parquet:"
                                  " the completion's field"),
        "messages_field": Field("messages", "str", "format jsonl/parquet: the "
                                "conversation's field (a list of {role, "
                                "content})"),
        "on_error": Field("fail", "str", "a malformed row, a missing field, "
                          "an empty completion, a prompt longer than seq_len:"
                          " fail (naming file and line) or skip (counted and "
                          "reported; corpus stdlib_functions always skips "
                          "what does not fit)", choices=("fail", "skip")),
        "truncate": Field(True, "bool", "records: cut a completion that runs "
                          "past seq_len (counted and reported); false: such a "
                          "row is an error (data.on_error: fail or skip)"),
        "chat_template": Field(None, "str", "conversations: the chat template"
                               " (a .jinja file, a tokenizer_config.json or a "
                               "Hugging Face directory); default: the "
                               "tokenizer's directory (tokenizer.path or "
                               "teacher.hf_path)", nullable=True),
        "last_turn_only": Field(False, "bool", "conversations: one example "
                                "each, its last assistant turn (needed for "
                                "templates that rewrite earlier turns, as "
                                "Qwen3's drops earlier reasoning)"),
        "pack": Field(False, "bool", "pack several examples into each row "
                      "of seq_len tokens (segment ids and per-example "
                      "positions: attention never crosses examples; for "
                      "records, whose examples are short); data.batch_size "
                      "then counts rows; not with distill.objective gkd or "
                      "seq_kd, which generate from one prompt a row"),
        "cache_dir": Field(None, "str", "tokenize the training sequences "
                           "once into <cache_dir>/train (kdjax.lm token "
                           "cache: int32 .npy shards, memory-mapped while "
                           "training) and reuse it while the tokenizer, the "
                           "training data and these data keys are unchanged; "
                           "a cache of other inputs is refused",
                           nullable=True),
        "cache_rebuild": Field(False, "bool", "rebuild data.cache_dir when "
                               "its inputs changed (instead of refusing)"),
        "pattern": Field("*.py", "str", "file-name pattern of the files read "
                         "from a directory"),
        "max_files": Field(400, "int", "read only the first N files (in "
                           "sorted path order; stdlib_functions: the first N "
                           "modules of each split)", nullable=True,
                           minimum=1),
        "max_file_bytes": Field(65536, "int", "read only the first N bytes "
                                "of each file", nullable=True, minimum=1),
        "eval_every": Field(10, "int", "held-out split: every N-th file "
                            "(sorted order) of a text corpus, every N-th row "
                            "of jsonl/parquet without eval_paths", minimum=2),
        "seq_len": Field(256, "int", "tokens per training sequence (a "
                         "row)", minimum=2),
        "prompt_len": Field(16, "int", "format text: the first tokens of each "
                            "window are its prompt (no loss on them; GKD and "
                            "sequence KD continue them); records have their "
                            "own prompts", minimum=1),
        "batch_size": Field(16, "int", "sequences per step", minimum=1),
        "eval_batch_size": Field(32, "int", "sequences per eval batch",
                                 minimum=1),
        "max_train_sequences": Field(None, "int", "use only the first N "
                                     "training sequences", nullable=True,
                                     minimum=1),
        "max_eval_sequences": Field(256, "int", "use only the first N "
                                    "held-out sequences", nullable=True,
                                    minimum=1),
    },
    "tokenizer": {
        "kind": Field("bpe", "str", "bpe: a byte-level BPE trained with "
                      "`tokenizers` on the training files (saved as "
                      "<output_dir>/tokenizer.json, shared by teacher and "
                      "students); file: a local tokenizer.json (path); bytes: "
                      "kdjax.lm.ByteTokenizer (259 ids)",
                      choices=("bpe", "file", "bytes")),
        "vocab_size": Field(512, "int", "bpe: vocabulary size (special "
                            "tokens included)", minimum=260),
        "path": Field(None, "str", "file: the tokenizer.json (e.g. of a "
                      "Hugging Face checkpoint directory)", nullable=True),
        "pad_token": Field(None, "str", "file: the padding token (default: "
                           "the first of <pad>, <|endoftext|>, </s>, <eos>)",
                           nullable=True),
        "bos_token": Field(None, "str", "file: the beginning-of-sequence "
                           "token (default: <bos>, <s>, <|endoftext|>, ...)",
                           nullable=True),
        "eos_token": Field(None, "str", "file: the end-of-sequence token "
                           "(default: <eos>, </s>, <|endoftext|>, ...)",
                           nullable=True),
    },
    "teacher": {
        **_model_section("small", "teacher"),
        "run_dir": Field(None, "str", "the teacher run (lm train-teacher "
                         "writes it, lm distill reads it); default "
                         "<output_dir>/teacher", nullable=True),
        "hf_path": Field(None, "str", "lm distill: the teacher is this local "
                         "Hugging Face checkpoint directory (config.json, "
                         "*.safetensors, tokenizer.json of a Qwen3, Llama 3 "
                         "or Gemma 3; read offline) instead of a teacher run; "
                         "its tokenizer.json is the run's tokenizer (family, "
                         "size and kwargs are the checkpoint's)",
                         nullable=True),
        "steps": Field(None, "int", "lm train-teacher: optimizer steps "
                       "(default train.steps)", nullable=True, minimum=1),
        "lr": Field(None, "float", "lm train-teacher: peak learning rate "
                    "(default optimizer.lr)", nullable=True, minimum=0.0),
    },
    "student": {
        **_model_section("tiny", "student"),
        "init": Field("scratch", "str", "scratch: random initialisation; "
                      "teacher_layers: a copy of the Hugging Face teacher "
                      "(teacher.hf_path) with only the layers keep_layers, "
                      "as DistilBERT (same family; size and kwargs unused)",
                      choices=("scratch", "teacher_layers")),
        "keep_layers": Field([], "ints", "init: teacher_layers: the teacher "
                             "layers kept, increasing (empty: every other "
                             "layer, 0, 2, 4, ...)", minimum=0),
        "dtype": Field("float32", "str", "init: teacher_layers: the "
                       "student's parameter dtype; float32 keeps float32 "
                       "master weights for a bfloat16 teacher (whose small "
                       "updates would round away in bfloat16); null: the "
                       "teacher's. The teacher stays in its own dtype",
                       nullable=True,
                       choices=("float32", "bfloat16", "float16")),
    },
    "optimizer": _sections.with_defaults(_sections.OPTIMIZER, lr=3e-3,
                                weight_decay=0.01, warmup_steps=10,
                                grad_clip=1.0),
    "train": {
        "steps": Field(200, "int", "optimizer steps", minimum=1),
        **{k: v for k, v in _sections.with_defaults(
            _sections.TRAIN, log_every=10).items()
           if k not in ("steps", "epochs")},
    },
    "distill": {
        "objective": Field("token_kd", "str", "ce: the student alone; "
                           "token_kd: token-level KD on the corpus "
                           "(kdjax.lm.token_kd_term); lean_kd: the same from "
                           "hidden states, never forming [B, T, V] logits "
                           "(lean_token_kd_term); gkd: on-policy GKD "
                           "(make_gkd_train_step, the student samples with "
                           "probability lmbda); seq_kd: sequence-level KD, "
                           "cross-entropy on the teacher's greedy "
                           "continuations (make_sequence_kd_step)",
                           choices=OBJECTIVES),
        "divergence": Field("kl", "str", "the token divergence (token_kd, "
                            "lean_kd, gkd)", choices=DIVERGENCES),
        "temperature": Field(1.0, "float", "the divergence's temperature",
                             minimum=1e-12),
        "beta": Field(0.5, "float", "jsd: the teacher's mixture weight, in "
                      "[0, 1]"),
        "alpha": Field(0.1, "float", "skew_kl / skew_reverse_kl: the skew, "
                       "in [0, 1]"),
        "kd_weight": Field(1.0, "float", "weight of the divergence term",
                           minimum=0.0),
        "ce_weight": Field(0.0, "float", "weight of the student's next-token "
                           "cross-entropy on the corpus, added to the "
                           "divergence (token_kd, lean_kd, gkd)", minimum=0.0),
        "lmbda": Field(0.5, "float", "gkd: probability that a step trains on "
                       "the student's own samples"),
        "sample_temperature": Field(1.0, "float", "gkd: the student's "
                                    "sampling temperature", minimum=0.0),
        "run_name": Field(None, "str", "the run's directory under "
                          "output_dir (default student_<objective>)",
                          nullable=True),
        "hf_out": Field(None, "str", "write the distilled student (families "
                        "qwen3, llama3, gemma3) as a Hugging Face safetensors "
                        "directory here (not the teacher's; an existing "
                        "directory with a config.json only if this run "
                        "wrote it, or with distill.hf_overwrite)",
                        nullable=True),
        "hf_dtype": Field(None, "str", "the dtype of the exported tensors; "
                          "default the Hugging Face teacher's (bfloat16 for "
                          "a bfloat16 teacher), else the student's",
                          nullable=True,
                          choices=("float32", "bfloat16", "float16")),
        "hf_overwrite": Field(False, "bool", "let distill.hf_out replace the "
                              "config.json and model.safetensors of a "
                              "directory this run did not write"),
    },
    "checkpoint": _sections.with_defaults(_sections.CHECKPOINT,
                                          save_every=100),
    "eval": {
        "divergence": Field("kl", "str", "the teacher-student divergence "
                            "reported by lm eval (temperature 1, mean over "
                            "held-out tokens)", choices=DIVERGENCES),
    },
    "generate": {
        "prompts": Field([], "strs", "prompts to continue (default: the "
                         "prompts of the first held-out sequences)"),
        "num_prompts": Field(3, "int", "held-out prompts used when prompts "
                             "is empty", minimum=1),
        "max_new_tokens": Field(32, "int", "tokens sampled per prompt",
                                minimum=1),
        "temperature": Field(0.8, "float", "sampling temperature (0: greedy)",
                             minimum=0.0),
        "top_k": Field(40, "int", "sample among the k most likely tokens",
                       nullable=True, minimum=1),
        "top_p": Field(None, "float", "nucleus mass in (0, 1]",
                       nullable=True, minimum=1e-12),
    },
}


def default_config() -> dict:
  """The LM configuration with every default."""
  return _config_base.defaults(LM_SCHEMA)


def describe_schema() -> str:
  """:data:`LM_SCHEMA` as commented YAML."""
  return _config_base.describe_schema(LM_SCHEMA)


def load_config(paths: Sequence[str] = (),
                overrides: Sequence[str] = ()) -> dict:
  """Defaults, updated by each YAML file in ``paths``, then by ``overrides``;
  validated (ConfigError naming the key)."""
  config = default_config()
  for path in paths:
    data = _config_base.read_yaml(path)
    try:
      _config_base.merge("", LM_SCHEMA, config, data)
    except ConfigError as e:
      raise ConfigError(f"{path}: {e}") from None
  for text in overrides:
    parts, value = _config_base.parse_override(text)
    if (len(parts) == 2 and parts[0] in ("teacher", "student")
        and parts[1] == "kwargs" and (value is None
                                      or isinstance(value, Mapping))):
      # --set student.kwargs={...} (or null) replaces the mapping;
      # --set student.kwargs.KEY=VALUE sets one key of it.
      config[parts[0]]["kwargs"] = {}
      if value is None:
        continue
    _config_base.apply_override(config, text, LM_SCHEMA)
  return validate(config)


def validate(config: dict) -> dict:
  """Types and choices of every key, then the keys that depend on each other."""
  _config_base.validate_fields("", LM_SCHEMA, config)
  data, tok, d = config["data"], config["tokenizer"], config["distill"]
  text_windows = data["corpus"] == "stdlib" or (
      data["corpus"] == "files" and data["format"] == "text")
  if text_windows and data["prompt_len"] >= data["seq_len"]:
    raise ConfigError(
        f"config key 'data.prompt_len' ({data['prompt_len']}) must be smaller "
        f"than 'data.seq_len' ({data['seq_len']}): no token would be "
        "trained on.")
  if data["corpus"] == "files" and not data["paths"]:
    raise ConfigError("config key 'data.paths' must list files or "
                      "directories for data.corpus: files.")
  if data["eval_paths"] and not (data["corpus"] == "files"
                                 and data["format"] != "text"):
    raise ConfigError("config key 'data.eval_paths' is for data.corpus: "
                      "files with data.format jsonl, parquet or auto; a text "
                      "corpus holds out every data.eval_every-th file.")
  if tok["kind"] == "file" and not tok["path"]:
    raise ConfigError("config key 'tokenizer.path' must name a "
                      "tokenizer.json for tokenizer.kind: file.")
  for key in ("beta", "alpha", "lmbda"):
    if not 0.0 <= d[key] <= 1.0:
      raise ConfigError(f"config key 'distill.{key}' must lie in [0, 1], got "
                        f"{d[key]!r}.")
  k = config["train"]["accumulation_steps"]
  if data["batch_size"] % k:
    raise ConfigError(
        f"config key 'data.batch_size' ({data['batch_size']}) must be "
        f"divisible by 'train.accumulation_steps' ({k}).")
  for side in ("teacher", "student"):
    m = config[side]
    if m["family"] == "kdjax":
      if m["size"] not in KDJAX_SIZES:
        raise ConfigError(
            f"config key '{side}.size' ({m['size']!r}) must be one of "
            f"{', '.join(KDJAX_SIZES)} for family kdjax"
            f"{_config_base._suggest(m['size'], KDJAX_SIZES)}.")
  if config["student"]["init"] == "teacher_layers" and not config[
      "teacher"]["hf_path"]:
    raise ConfigError("config key 'student.init: teacher_layers' needs a "
                      "Hugging Face teacher (teacher.hf_path).")
  if (d["hf_out"] and config["student"]["family"] == "kdjax"
      and config["student"]["init"] == "scratch"):
    raise ConfigError("config key 'distill.hf_out' needs a student of family "
                      "qwen3, llama3 or gemma3 (Hugging Face has no kdjax "
                      "DecoderLM format).")
  hf = config["teacher"]["hf_path"]
  if d["hf_out"] and hf and runs.same_path(d["hf_out"], hf):
    raise ConfigError(
        f"config key 'distill.hf_out' ({d['hf_out']}) is the teacher's own "
        f"directory (teacher.hf_path: {hf}); the export would overwrite the "
        "teacher: choose another directory.")
  return config


def teacher_run_dir(config: Mapping[str, Any]) -> str:
  """``teacher.run_dir`` or ``<output_dir>/teacher``."""
  return config["teacher"]["run_dir"] or os.path.join(config["output_dir"],
                                                      "teacher")


def distill_run_dir(config: Mapping[str, Any]) -> str:
  """``<output_dir>/<distill.run_name>`` (default ``student_<objective>``)."""
  d = config["distill"]
  return os.path.join(config["output_dir"],
                      d["run_name"] or f"student_{d['objective']}")
