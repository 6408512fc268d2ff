"""Hugging Face checkpoints of Tunix's Qwen3, Llama 3 and Gemma 3 models.

A local Hugging Face directory (``config.json``, ``*.safetensors``,
``tokenizer.json``) becomes a Tunix NNX model (:func:`load_hf_checkpoint`),
entirely offline: the files are read from disk, nothing calls
``huggingface_hub``. A smaller student starts from the teacher with layers
dropped (:func:`student_from_teacher`, DistilBERT's initialisation, Sanh et al.
2019, arXiv 1910.01108: embeddings, norms, unembedding and every other layer
copied). A model is written back as a Hugging Face directory
(:func:`save_hf_checkpoint`): ``config.json``, ``model.safetensors`` with the
Hugging Face tensor names and layouts (``torch.nn.Linear`` weights as
``[out_features, in_features]``) and ``tokenizer.json``, which
:func:`load_hf_checkpoint` (and ``transformers``) read again.

Tunix 0.1.7 supplies the models, its name mappings
(``tunix.models.<family>.params*._get_key_and_transform_mapping``) and its
safetensors loader (``tunix.models.safetensors_loader``); this module adds
what they lack: the ``config.json`` -> ``ModelConfig`` translation, checks that
the tensors match the config before anything is loaded (Tunix skips an
unmapped tensor with a log line and leaves a missing one unset), the export,
and RoPE as the config defines it: Tunix's ``Llama3`` and ``Qwen3`` attention
calls ``apply_rope`` without the config's ``rope_theta`` (always 1e6) and has
no Llama 3 frequency scaling, so a model loaded here whose RoPE differs from
that gets attention layers (a subclass of Tunix's) that rotate with the
checkpoint's frequencies (:mod:`kdjax.lm._hf_config`). Tensor names and
layouts: :mod:`kdjax.lm._hf_tensors`.

Errors name the problem: a missing file, a tensor missing from the files or
not expected by the config, a shape that contradicts ``config.json`` (with the
keys that imply it), a config feature Tunix's model cannot run, a tokenizer
with more tokens than the model's vocabulary (:func:`check_tokenizer_fits`),
and (in :mod:`kdjax.lm._tokenizer`) a teacher and student with different
tokenizers (``kdjax.lm.check_same_tokenizer``, which points to cross-tokenizer
distillation, ``kdjax.lm.make_uld_loss``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

from kdjax.lm._hf_config import family_from_hf_config
from kdjax.lm._hf_config import GEMMA3_PATTERN
from kdjax.lm._hf_config import hf_config_from_model
from kdjax.lm._hf_config import HF_FAMILIES
from kdjax.lm._hf_config import HFCheckpointError
from kdjax.lm._hf_config import model_rope
from kdjax.lm._hf_config import resolve_dtype
from kdjax.lm._hf_config import RopeSpec
from kdjax.lm._hf_config import set_rope
from kdjax.lm._hf_config import tied
from kdjax.lm._hf_config import tunix_config
from kdjax.lm._hf_config import tunix_modules
from kdjax.lm._hf_config import vocab_size_of
from kdjax.lm._hf_tensors import check_tensors_match_config
from kdjax.lm._hf_tensors import hf_state_dict
from kdjax.lm._hf_tensors import read_headers
from kdjax.lm._tokenizer import check_tokenizer_fits
from kdjax.lm._tokenizer import load_hf_tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"

HFTokenizer = Any  # tokenizers.Tokenizer (kdjax.lm.Tokenizer is kdjax's)


@dataclasses.dataclass
class HFCheckpoint:
  """A Hugging Face checkpoint loaded as a Tunix NNX model.

  Attributes:
    family: ``"qwen3"``, ``"llama3"`` or ``"gemma3"``.
    config: the Tunix ``ModelConfig`` of ``model``.
    model: the ``nnx.Module`` (``Qwen3``, ``Llama3`` or ``Gemma3``).
    tokenizer: ``tokenizers.Tokenizer`` read from ``tokenizer.json``, or
      ``None`` when the directory has none.
    hf_config: the ``config.json`` dict as read (for a multimodal Gemma 3, the
      whole file; its text part is ``hf_config["text_config"]``).
    path: the directory it was read from.
  """
  family: str
  config: Any
  model: Any
  tokenizer: Optional[HFTokenizer]
  hf_config: dict
  path: str = ""


# --------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------


def _read_config(path: str) -> dict:
  if not os.path.isdir(path):
    raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
  file = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(file):
    raise FileNotFoundError(
        f"{CONFIG_FILE} is missing from the checkpoint directory {path!r}")
  with open(file, encoding="utf-8") as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise HFCheckpointError(f"{file} is not valid JSON: {e}") from e


def _safetensors_files(path: str) -> list:
  """The ``*.safetensors`` files Tunix's loader reads (every one in ``path``);
  those listed by ``model.safetensors.index.json`` must all be there."""
  index = os.path.join(path, INDEX_FILE)
  if os.path.isfile(index):
    with open(index, encoding="utf-8") as f:
      listed = sorted(set(json.load(f).get("weight_map", {}).values()))
    absent = [name for name in listed
              if not os.path.isfile(os.path.join(path, name))]
    if absent:
      raise FileNotFoundError(
          f"{INDEX_FILE} in {path!r} lists {absent}, which are missing")
  files = sorted(name for name in os.listdir(path)
                 if name.endswith(".safetensors"))
  if not files:
    raise FileNotFoundError(
        f"no *.safetensors file (e.g. {WEIGHTS_FILE}) in the checkpoint "
        f"directory {path!r}")
  return [os.path.join(path, name) for name in files]


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def _abstract_model(family: str, config, rope: Optional[RopeSpec]):
  from flax import nnx
  _, _, cls = tunix_modules(family)

  def build(config, rngs):
    model = cls(config, rngs=rngs)
    set_rope(family, model, rope)
    return model

  return build, nnx.eval_shape(lambda: build(config, nnx.Rngs(params=0)))


def _check_tied_head(family, config, found, prefix):
  """A tied model's file may carry ``lm_head.weight``; only as a copy."""
  head = next((name for name in ("lm_head.weight", prefix + "lm_head.weight")
               if name in found), None)
  if head is None or not tied(family, config):
    return
  from safetensors import safe_open
  tensors = {}
  for name in (head, prefix + "model.embed_tokens.weight"):
    if name not in found:
      return
    with safe_open(found[name][2], framework="numpy") as f:
      tensors[name] = f.get_tensor(name)
  head, emb = tensors.values()
  if head.shape != emb.shape or not np.array_equal(head, emb):
    raise HFCheckpointError(
        "config.json ties the unembedding to the embedding (tie_word_"
        "embeddings) but lm_head.weight differs from model.embed_tokens."
        "weight; set tie_word_embeddings=false (Llama / Qwen3) or drop "
        "lm_head.weight")


def load_hf_checkpoint(path: str, *, dtype: Any = None,
                       require_tokenizer: bool = False) -> HFCheckpoint:
  """Load a local Hugging Face checkpoint directory as a Tunix NNX model.

  Reads ``config.json`` (family from ``model_type`` / ``architectures``:
  ``qwen3``, ``llama``, ``gemma3_text`` or ``gemma3``), checks every tensor
  name and shape of the ``*.safetensors`` files against it, loads them with
  Tunix's safetensors loader and name mapping, and reads ``tokenizer.json``
  when present. Nothing is downloaded.

  Args:
    path: the directory.
    dtype: parameter dtype (``float32``, ``bfloat16``, ``float16``); default
      the tensors' own.
    require_tokenizer: raise when ``tokenizer.json`` is missing (else the
      checkpoint's ``tokenizer`` is ``None``).

  Returns:
    The :class:`HFCheckpoint`.

  Raises:
    FileNotFoundError: the directory, ``config.json``, the safetensors files
      or (``require_tokenizer``) ``tokenizer.json`` is missing, named.
    HFCheckpointError: an unsupported family or config feature, tensors that
      contradict the config, or a tokenizer larger than the vocabulary.
  """
  from tunix.models import safetensors_loader
  import jax
  path = os.fspath(path)
  hf_config = _read_config(path)
  files = _safetensors_files(path)
  family = family_from_hf_config(hf_config)
  found = read_headers(files)
  if dtype is None:  # the model computes in its tensors' dtype
    stored = {meta[1] for meta in found.values()}
    dtype = ({"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
             .get(stored.pop()) if len(stored) == 1 else None)
    load_dtype = None
  else:
    load_dtype = resolve_dtype(dtype, {})
  config, rope = tunix_config(family, hf_config, dtype)
  multimodal = hf_config.get("model_type") == "gemma3" \
      and "text_config" in hf_config
  prefix = ""
  if multimodal:
    if any(name.startswith("model.language_model.") for name in found):
      raise HFCheckpointError(
          "this multimodal Gemma 3 file names its tensors "
          "model.language_model.* (transformers >= 4.52); Tunix 0.1.7's "
          "mapping reads language_model.model.* (or a text-only "
          "Gemma3ForCausalLM checkpoint)")
    prefix = "language_model."
  check_tensors_match_config(family, config, found, prefix=prefix,
                             multimodal=multimodal)
  _check_tied_head(family, config, found, prefix)
  tokenizer = None
  if require_tokenizer or os.path.isfile(os.path.join(path, TOKENIZER_FILE)):
    tokenizer = load_hf_tokenizer(path)
    check_tokenizer_fits(tokenizer, vocab_size_of(family, config),
                         what=f"the model (config.json vocab_size)")

  _, params_lib, _ = tunix_modules(family)
  build, _ = _abstract_model(family, config, rope)
  by_file = {}
  for name, (_, dt, file) in found.items():
    by_file.setdefault(file, set()).add(dt)
  # Tunix's "optimized" reader assumes one dtype per file; else "original".
  mode = "optimized" if all(len(d) == 1 for d in by_file.values()) \
      else "original"
  preprocess = (params_lib._make_preprocess_fn(config)
                if family == "gemma3" else None)
  model = safetensors_loader.load_and_create_model(
      file_dir=path, model_class=build, config=config,
      key_mapping=params_lib._get_key_and_transform_mapping,
      preprocess_fn=preprocess, dtype=load_dtype, mode=mode)
  from flax import nnx
  unset = [jax.tree_util.keystr(p) for p, leaf in
           jax.tree_util.tree_leaves_with_path(nnx.state(model))
           if not isinstance(leaf, jax.Array)]
  if unset:
    raise HFCheckpointError(
        f"the safetensors files set no value for {unset[:8]}")
  return HFCheckpoint(family=family, config=config, model=model,
                      tokenizer=tokenizer, hf_config=hf_config, path=path)

# --------------------------------------------------------------------------
# Students from teachers
# --------------------------------------------------------------------------


def model_family(model) -> str:
  """The family of a Tunix model instance."""
  for family in HF_FAMILIES:
    if isinstance(model, tunix_modules(family)[2]):
      return family
  raise HFCheckpointError(
      f"{type(model).__name__} is not a Tunix Qwen3, Llama3 or Gemma3 model")


def _keep_list(keep_layers, n: int) -> list:
  if isinstance(keep_layers, str):
    if keep_layers != "every_other":
      raise HFCheckpointError(
          f"keep_layers={keep_layers!r}; use 'every_other' or a list of "
          "layer indices")
    return list(range(0, n, 2))
  keep = [int(i) for i in keep_layers]
  if not keep:
    raise HFCheckpointError("keep_layers is empty")
  bad = [i for i in keep if not 0 <= i < n]
  if bad:
    raise HFCheckpointError(
        f"keep_layers {bad} out of range for a teacher with {n} layers")
  if sorted(set(keep)) != keep:
    raise HFCheckpointError(
        f"keep_layers {keep} must be strictly increasing (each layer once, "
        "in the teacher's order)")
  return keep


def student_from_teacher(
    teacher: HFCheckpoint, family: Optional[str] = None, *,
    keep_layers: Union[str, Sequence[int]] = "every_other",
    dtype: Any = None) -> Any:
  """A student of the teacher's family with some of its layers (DistilBERT).

  The student has the teacher's config except ``num_layers =
  len(keep_layers)``; its embedding, final norm and unembedding are copies
  of the teacher's, and its layer ``j`` is a copy of teacher layer
  ``keep_layers[j]`` (Sanh et al. 2019 took one layer in two). The arrays are
  copied, so donating the student's buffers in a train step leaves the
  teacher intact. A Gemma 3 layer's attention type (sliding window or
  global) follows its position in Tunix's pattern, so a copied layer may
  change type; a warning says which.

  Args:
    teacher: an :class:`HFCheckpoint` or a Tunix model.
    family: its family (default: the checkpoint's / the model's class).
    keep_layers: ``"every_other"`` (``0, 2, 4, ...``) or increasing indices.
    dtype: the student's parameter (and, where the family's config has one,
      computation) dtype: ``"float32"`` keeps float32 master weights for a
      ``bfloat16`` teacher, whose small updates would otherwise round away;
      default the teacher's.

  Returns:
    The student ``nnx.Module`` (its Tunix config is ``student.config``).
  """
  import jax
  import jax.numpy as jnp
  from flax import nnx
  model = teacher.model if isinstance(teacher, HFCheckpoint) else teacher
  actual = model_family(model)
  if family is None:
    family = teacher.family if isinstance(teacher, HFCheckpoint) else actual
  if family != actual:
    raise HFCheckpointError(
        f"family={family!r} but the teacher is a {actual} model")
  config = model.config
  keep = _keep_list(keep_layers, config.num_layers)
  student_config = dataclasses.replace(config, num_layers=len(keep))
  if dtype is not None:
    dtype = resolve_dtype(dtype, {})
    names = {f.name for f in dataclasses.fields(student_config)}
    student_config = dataclasses.replace(
        student_config, **{k: dtype for k in ("dtype", "param_dtype")
                           if k in names})
  _, abstract = _abstract_model(family, student_config,
                                model_rope(family, model))
  graphdef, abstract_state = nnx.split(abstract)
  teacher_state = nnx.state(model).to_pure_dict()
  student_state = {k: v for k, v in teacher_state.items() if k != "layers"}
  student_state["layers"] = {j: teacher_state["layers"][i]
                             for j, i in enumerate(keep)}
  def copy(x):
    x = jnp.asarray(x)
    cast = dtype is not None and jnp.issubdtype(x.dtype, jnp.floating)
    return jnp.array(x, dtype=dtype if cast else x.dtype, copy=True)

  student_state = jax.tree.map(copy, student_state)
  abstract_dict = abstract_state.to_pure_dict()
  if (jax.tree.structure(abstract_dict) != jax.tree.structure(student_state)):
    raise HFCheckpointError(
        "the teacher's state does not fit a student of its own config")
  abstract_state.replace_by_pure_dict(student_state)
  if family == "gemma3":
    changed = [(j, i) for j, i in enumerate(keep)
               if model.layers[i].attn.attn_type
               != abstract.layers[j].attn.attn_type]
    if changed:
      warnings.warn(
          f"student layers {[j for j, _ in changed]} (copies of teacher "
          f"layers {[i for _, i in changed]}) change attention type (sliding "
          "window <-> global): Tunix's Gemma 3 sets it by position, one "
          f"global layer in {GEMMA3_PATTERN}", stacklevel=2)
  return nnx.merge(graphdef, abstract_state)

# --------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------

def save_hf_checkpoint(path: str, family: str, model: Any, *,
                       hf_config: Optional[Mapping[str, Any]] = None,
                       tokenizer: Any = None,
                       dtype: Any = None,
                       tokenizer_files_from: Optional[str] = None) -> str:
  """Write ``model`` as a Hugging Face directory that loads again.

  Writes ``config.json`` (:func:`hf_config_from_model`; the dtype under both
  ``torch_dtype`` and transformers 5's ``dtype``), ``model.safetensors``
  (:func:`hf_state_dict`, metadata ``format: pt`` as transformers expects)
  and, given a tokenizer or ``tokenizer_files_from``, the files a serving
  tool reads beside them: ``tokenizer.json``, ``tokenizer_config.json``,
  ``generation_config.json`` and those the source directory has
  (``special_tokens_map.json``, ``chat_template.jinja``,
  ``additional_chat_templates/``, ``tokenizer.model``, ...), each with the
  rules of :mod:`kdjax.lm._hf_serving`: carried from ``tokenizer_files_from``
  (the teacher's directory), else written so that
  ``transformers.AutoTokenizer.from_pretrained(path)`` encodes as
  ``tokenizer`` does and names kdjax's special tokens. Files of those names
  in ``path`` are replaced (and, when tokenizer files are written, such files
  this export does not write are removed); others are left alone.

  Args:
    path: the directory (created).
    family: the model's family.
    model: a Tunix Qwen3 / Llama3 / Gemma3 model.
    hf_config: a ``config.json`` to start from (the teacher's keeps its
      token ids, context length, ...).
    tokenizer: a :class:`kdjax.lm.Tokenizer` (its ``bos_id`` / ``eos_id`` /
      ``pad_id`` fill ``config.json``'s token ids it lacks and name the
      special tokens of a ``tokenizer_config.json`` written without a
      source; a ``"bytes"`` one has no ``tokenizer.json`` to write) or a
      ``tokenizers.Tokenizer``; its ids must fit the vocabulary. None with
      ``tokenizer_files_from``: the source's ``tokenizer.json``.
    dtype: cast the tensors (e.g. ``"bfloat16"``); default their own.
    tokenizer_files_from: a Hugging Face directory (the teacher's) whose
      tokenizer and generation files are carried; its ``tokenizer.json``
      must be ``tokenizer``'s when both are given.

  Returns:
    ``path``.

  Raises:
    HFCheckpointError: ``family`` is not the model's; a tokenizer larger than
      the vocabulary; a token id of ``config.json`` or the generation config
      outside it; ``tokenizer_files_from`` is not a directory.
    TokenizerMismatchError: ``tokenizer`` is not the source's tokenizer.
  """
  from safetensors.numpy import save_file
  from kdjax.lm import _hf_serving  # pylint: disable=g-import-not-at-top
  actual = model_family(model)
  if family != actual:
    raise HFCheckpointError(f"family={family!r} but the model is {actual}")
  if tokenizer_files_from is not None:
    tokenizer_files_from = os.fspath(tokenizer_files_from)
    if not os.path.isdir(tokenizer_files_from):
      raise HFCheckpointError(
          f"tokenizer_files_from={tokenizer_files_from!r} is not a directory")
  special_ids = _hf_serving.special_ids_of(tokenizer)
  if special_ids is not None:  # a kdjax.lm.Tokenizer
    text = tokenizer.json_text
    if text is None and tokenizer_files_from is not None:
      # Bytes have no tokenizer.json to compare with the source's.
      raise HFCheckpointError(
          f"a {tokenizer.kind} tokenizer cannot be checked against the "
          f"tokenizer files of {tokenizer_files_from!r}: pass the source's "
          "tokenizer, or no tokenizer_files_from")
    tokenizer = None if text is None else _tokenizer_from_str(text)
  tensors = hf_state_dict(family, model)
  if dtype is not None:
    dtype = resolve_dtype(dtype, {})
    tensors = {k: v.astype(dtype) for k, v in tensors.items()}
  dtypes = {str(v.dtype) for v in tensors.values()}
  cfg = hf_config_from_model(family, model, hf_config,
                             dtype=dtypes.pop() if len(dtypes) == 1 else None)
  serving = (tokenizer is not None or special_ids is not None
             or tokenizer_files_from is not None)
  files = None
  if serving:  # checked before anything is written
    _hf_serving.fill_config_ids(cfg, source_dir=tokenizer_files_from,
                                special_ids=special_ids)
    files = _hf_serving.plan_serving_files(
        cfg, tokenizer=tokenizer, source_dir=tokenizer_files_from)
  os.makedirs(path, exist_ok=True)
  save_file(tensors, os.path.join(path, WEIGHTS_FILE),
            metadata={"format": "pt"})
  index = os.path.join(path, INDEX_FILE)
  if os.path.exists(index):
    os.remove(index)  # a stale shard index would name other files
  with open(os.path.join(path, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(cfg, f, indent=2, sort_keys=True)
    f.write("\n")
  if files is not None:
    files.write(os.fspath(path))
  return path


def _tokenizer_from_str(json_text: str) -> HFTokenizer:
  """``tokenizers.Tokenizer`` of a ``tokenizer.json`` text."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  return tokenizers.Tokenizer.from_str(json_text)
