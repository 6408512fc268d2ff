"""kdjax.lm: language-model distillation.

A small decoder-only transformer with a KV cache (``DecoderLM``), a byte-level
tokenizer and masked next-token batches, token-level distillation terms for
``kdjax.losses.compose`` (every divergence, top-k teachers, padded
vocabularies), jitted generation (temperature, top-k, top-p), sequence-level
KD (Kim & Rush 2016) and on-policy distillation (GKD, Agarwal et al. 2024);
cross-tokenizer distillation (Universal Logit Distillation, ``make_uld_loss``);
memory-lean terms for large vocabularies (``lean_token_kd_term``, from hidden
states, never forming ``[B, T, V]`` logits).
"""

from kdjax.lm._cross_tokenizer import TEACHER_PREFIX
from kdjax.lm._cross_tokenizer import PairTokenizer
from kdjax.lm._cross_tokenizer import make_cross_tokenizer_batch
from kdjax.lm._cross_tokenizer import make_teacher_lm_apply
from kdjax.lm._cross_tokenizer import make_uld_loss
from kdjax.lm._cross_tokenizer import uld_term
from kdjax.lm._data import ByteTokenizer
from kdjax.lm._data import iterate_batches
from kdjax.lm._data import make_lm_batch
from kdjax.lm._data import text_examples
from kdjax.lm._distill import MASK_KEY
from kdjax.lm._distill import TARGET_KEY
from kdjax.lm._distill import align_vocab
from kdjax.lm._distill import build_lm_step_fn
from kdjax.lm._distill import check_vocabularies
from kdjax.lm._distill import make_lm_train_step
from kdjax.lm._distill import token_ce_term
from kdjax.lm._distill import token_divergence_sums
from kdjax.lm._distill import token_kd_term
from kdjax.lm._generate import GenerationOutput
from kdjax.lm._generate import SamplingConfig
from kdjax.lm._generate import batch_from_generation
from kdjax.lm._generate import generate
from kdjax.lm._generate import make_rollout_fn
from kdjax.lm._generate import sample_logits
from kdjax.lm._lean import lean_token_ce_term
from kdjax.lm._lean import lean_token_kd_term
from kdjax.lm._model import DecoderLM
from kdjax.lm._model import TransformerConfig
from kdjax.lm._model import init_cache
from kdjax.lm._model import init_lm
from kdjax.lm._model import make_lm_apply
from kdjax.lm._model import unembedding
from kdjax.lm._onpolicy import make_gkd_train_step
from kdjax.lm._onpolicy import make_sequence_kd_step
