"""kdjax.lm: language-model distillation.

A small decoder-only transformer with a KV cache (``DecoderLM``), a byte-level
tokenizer and masked next-token batches, token-level distillation terms for
``kdjax.losses.compose`` (every divergence, top-k teachers, padded
vocabularies), jitted generation (temperature, top-k, top-p), sequence-level
KD (Kim & Rush 2016) and on-policy distillation (GKD, Agarwal et al. 2024);
cross-tokenizer distillation (Universal Logit Distillation, ``make_uld_loss``);
memory-lean terms for large vocabularies (``lean_token_kd_term``, from hidden
states, never forming ``[B, T, V]`` logits); Tunix's Qwen3 / Llama 3 / Gemma 3
NNX models as teachers and students (``make_tunix_lm_apply``; needs the
``.[tunix]`` extra, imported only when used); their local Hugging Face
checkpoints in and out (``load_hf_checkpoint``, ``student_from_teacher``,
``save_hf_checkpoint``); a registry of the LM objectives picked by name
(``get_lm_objective``, ``build_lm_loss``, ``build_lm_objective_step``).
The pieces of a training run outside the command line: tokenizers (``Tokenizer``: bytes, a ``tokenizer.json``, a BPE trained by
``train_bpe``; ``check_same_tokenizer``), prompt–completion and chat datasets
in JSONL or Parquet (``read_records``), a built-in one of the standard
library's documented functions, signature and docstring to body, split by
module (``stdlib_function_records``), and chat templates rendered as Hugging
Face renders them, with assistant masks (``load_chat_template``,
``apply_chat_template``, ``encode_prompt_completion``), token windows of texts and resumable
shuffled batches (``token_windows``, ``LMBatches``), packing of short examples
into long rows with block-diagonal attention (``pack_examples``,
``make_packed_batch``), a token cache on disk for data larger than memory,
memory-mapped and batched in place of the lists (``write_token_cache``,
``open_token_cache``, ``TokenCache``), and a model bundled with
its apply, lean-apply and generation functions (``LMModel``:
``decoder_lm_model``, ``tunix_lm_model``; ``NNXParams``).
"""

from typing import TYPE_CHECKING

from kdjax import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, {
    "._batches": ("BatchSizeError", "LMBatches", "padded_eval_batches",
        "prompt_batch", "token_windows"),
    "._chat": ("ChatEncoding", "ChatTemplate", "ChatTemplateError",
        "apply_chat_template", "check_chat_template_tokens",
        "encode_prompt_completion", "encode_record",
        "load_chat_template"),
    "._bundle": ("LMModel", "NNXParams", "VocabularySizeError",
        "decoder_lm_model", "tunix_lm_model"),
    "._cross_tokenizer": ("TEACHER_PREFIX", "PairTokenizer",
        "make_cross_tokenizer_batch", "make_teacher_lm_apply", "make_uld_loss",
        "uld_term"),
    "._examples": ("EXAMPLE_REASONS", "ExampleError", "ExampleStream",
        "TokenExample", "TokenExamples", "iter_record_examples",
        "record_examples", "record_texts"),
    "._data": ("ByteTokenizer", "iterate_batches", "make_lm_batch",
        "text_examples"),
    "._distill": ("MASK_KEY", "TARGET_KEY", "align_vocab", "build_lm_step_fn",
        "check_vocabularies", "lm_step_options", "make_lm_train_step",
        "token_ce_term", "token_divergence_sums", "token_kd_term"),
    "._generate": ("GenerationOutput", "SamplingConfig",
        "batch_from_generation", "generate", "make_rollout_fn",
        "sample_logits"),
    "._hf": ("HFCheckpoint", "load_hf_checkpoint", "save_hf_checkpoint",
        "student_from_teacher"),
    "._hf_config": ("HFCheckpointError", "tunix_config_from_hf"),
    "._lean": ("lean_token_ce_term", "lean_token_kd_term"),
    "._model": ("DecoderLM", "TransformerConfig", "init_cache", "init_lm",
        "make_lm_apply", "unembedding"),
    "._objectives": ("LM_OBJECTIVES", "LMObjectiveSpec", "build_lm_loss",
        "build_lm_objective_step", "get_lm_objective", "lm_objectives_table"),
    "._onpolicy": ("make_gkd_train_step", "make_sequence_kd_step"),
    "._packing": ("POSITIONS_KEY", "SEGMENT_IDS_KEY", "check_unpacked",
        "is_packed", "make_packed_batch", "pack_examples", "pack_lengths",
        "packed_attention_mask", "packing_efficiency", "segment_positions"),
    "._records": ("Record", "RecordError", "RecordSet", "RecordStream",
        "iter_records", "read_records", "record_files"),
    "._stdlib_functions": ("StdlibFunctionSummary", "stdlib_function_records",
        "stdlib_function_summary", "stdlib_module_split", "stdlib_modules"),
    "._token_cache": ("TokenCache", "TokenCacheError",
        "TokenCacheMismatchError", "open_token_cache",
        "token_cache_fingerprint", "write_token_cache"),
    "._tokenizer": ("TOKENIZER_FILE", "check_tokenizer_fits",
        "load_hf_tokenizer", "SpecialTokenError", "Tokenizer", "TokenizerError",
        "TokenizerMismatchError", "byte_tokenizer", "check_same_tokenizer",
        "load_tokenizer", "tokenizer_from_json", "train_bpe"),
    "._tunix": ("FAMILIES", "TUNIX_FAMILIES", "init_tunix_cache",
        "init_tunix_model", "make_tunix_lm_apply", "make_tunix_rollout_fn",
        "rebuild_model", "tunix_family", "tunix_generate", "tunix_model_config",
        "tunix_presets", "tunix_unembedding", "tunix_vocab_rows"),
})

if TYPE_CHECKING:  # the lazy names above, for type checkers and IDEs
  from kdjax.lm._batches import (
      BatchSizeError, LMBatches, padded_eval_batches, prompt_batch,
      token_windows)
  from kdjax.lm._chat import (
      ChatEncoding, ChatTemplate, ChatTemplateError, apply_chat_template,
      check_chat_template_tokens,
      encode_prompt_completion, encode_record, load_chat_template)
  from kdjax.lm._examples import (
      EXAMPLE_REASONS, ExampleError, ExampleStream, TokenExample,
      TokenExamples, iter_record_examples, record_examples, record_texts)
  from kdjax.lm._bundle import (
      LMModel, NNXParams, VocabularySizeError, decoder_lm_model,
      tunix_lm_model)
  from kdjax.lm._cross_tokenizer import (
      TEACHER_PREFIX, PairTokenizer, make_cross_tokenizer_batch,
      make_teacher_lm_apply, make_uld_loss, uld_term)
  from kdjax.lm._data import (
      ByteTokenizer, iterate_batches, make_lm_batch, text_examples)
  from kdjax.lm._distill import (
      MASK_KEY, TARGET_KEY, align_vocab, build_lm_step_fn, check_vocabularies,
      lm_step_options, make_lm_train_step, token_ce_term, token_divergence_sums,
      token_kd_term)
  from kdjax.lm._generate import (
      GenerationOutput, SamplingConfig, batch_from_generation, generate,
      make_rollout_fn, sample_logits)
  from kdjax.lm._hf import (
      HFCheckpoint, load_hf_checkpoint, save_hf_checkpoint,
      student_from_teacher)
  from kdjax.lm._hf_config import HFCheckpointError, tunix_config_from_hf
  from kdjax.lm._lean import lean_token_ce_term, lean_token_kd_term
  from kdjax.lm._model import (
      DecoderLM, TransformerConfig, init_cache, init_lm, make_lm_apply,
      unembedding)
  from kdjax.lm._objectives import (
      LM_OBJECTIVES, LMObjectiveSpec, build_lm_loss, build_lm_objective_step,
      get_lm_objective, lm_objectives_table)
  from kdjax.lm._onpolicy import make_gkd_train_step, make_sequence_kd_step
  from kdjax.lm._packing import (
      POSITIONS_KEY, SEGMENT_IDS_KEY, check_unpacked, is_packed,
      make_packed_batch, pack_examples, pack_lengths, packed_attention_mask,
      packing_efficiency, segment_positions)
  from kdjax.lm._records import (
      Record, RecordError, RecordSet, RecordStream, iter_records,
      read_records, record_files)
  from kdjax.lm._stdlib_functions import (
      StdlibFunctionSummary, stdlib_function_records, stdlib_function_summary,
      stdlib_module_split, stdlib_modules)
  from kdjax.lm._token_cache import (
      TokenCache, TokenCacheError, TokenCacheMismatchError, open_token_cache,
      token_cache_fingerprint, write_token_cache)
  from kdjax.lm._tokenizer import (
      TOKENIZER_FILE, SpecialTokenError, Tokenizer, TokenizerError,
      TokenizerMismatchError, byte_tokenizer, check_same_tokenizer,
      check_tokenizer_fits, load_hf_tokenizer, load_tokenizer,
      tokenizer_from_json, train_bpe)
  from kdjax.lm._tunix import (
      FAMILIES, TUNIX_FAMILIES, init_tunix_cache, init_tunix_model,
      make_tunix_lm_apply, make_tunix_rollout_fn, rebuild_model, tunix_family,
      tunix_generate, tunix_model_config, tunix_presets, tunix_unembedding,
      tunix_vocab_rows)
