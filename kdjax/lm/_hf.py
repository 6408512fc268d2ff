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
checkpoint's frequencies (:func:`rope_inverse_frequencies`).

Errors name the problem: a missing file, a tensor missing from the files or
not expected by the config, a shape that contradicts ``config.json`` (with the
keys that imply it), a config feature Tunix's model cannot run, a tokenizer
with more tokens than the model's vocabulary (:func:`check_tokenizer_fits`),
and a teacher and student with different tokenizers
(:func:`check_same_tokenizer`, which points to cross-tokenizer distillation,
``kdjax.lm.make_uld_loss``).
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import json
import math
import os
import warnings
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"

#: kdjax family name -> (``model_type`` written, ``architectures`` written).
HF_FAMILIES = {
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "llama3": ("llama", "LlamaForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
}
_MODEL_TYPES = {"qwen3": "qwen3", "llama": "llama3", "gemma3_text": "gemma3",
                "gemma3": "gemma3"}
_ARCHITECTURES = {"Qwen3ForCausalLM": "qwen3", "LlamaForCausalLM": "llama3",
                  "Gemma3ForCausalLM": "gemma3",
                  "Gemma3ForConditionalGeneration": "gemma3"}
# Tunix's Llama3 / Qwen3 attention: apply_rope(x, pos, head_dim=...) with the
# default rope_theta of tunix.models.{llama3,qwen3}.model.apply_rope.
_TUNIX_DEFAULT_THETA = 1_000_000.0
# Tunix's Gemma3 RMSNorm hard-codes this epsilon.
_GEMMA3_NORM_EPS = 1e-6
_GEMMA3_PATTERN = 6  # five sliding-window layers, then one global layer

Tokenizer = Any  # tokenizers.Tokenizer


class HFCheckpointError(ValueError):
  """A Hugging Face checkpoint that cannot become (or come from) the model."""


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
  tokenizer: Optional[Tokenizer]
  hf_config: dict
  path: str = ""


# --------------------------------------------------------------------------
# Families and configs
# --------------------------------------------------------------------------


def _tunix_modules(family: str):
  """``(model module, params module, model class)`` of a family."""
  if family == "qwen3":
    from tunix.models.qwen3 import model as model_lib  # pylint: disable=g-import-not-at-top
    from tunix.models.qwen3 import params as params_lib  # pylint: disable=g-import-not-at-top
    return model_lib, params_lib, model_lib.Qwen3
  if family == "llama3":
    from tunix.models.llama3 import model as model_lib  # pylint: disable=g-import-not-at-top
    from tunix.models.llama3 import params as params_lib  # pylint: disable=g-import-not-at-top
    return model_lib, params_lib, model_lib.Llama3
  if family == "gemma3":
    from tunix.models.gemma3 import model as model_lib  # pylint: disable=g-import-not-at-top
    from tunix.models.gemma3 import params_safetensors as params_lib  # pylint: disable=g-import-not-at-top
    return model_lib, params_lib, model_lib.Gemma3
  raise HFCheckpointError(
      f"unknown model family {family!r}; expected one of {sorted(HF_FAMILIES)}")


def family_from_hf_config(hf_config: Mapping[str, Any]) -> str:
  """The kdjax family of a ``config.json``: from ``model_type``, else
  ``architectures``.

  Raises:
    HFCheckpointError: neither names Qwen3, Llama or Gemma 3.
  """
  model_type = hf_config.get("model_type")
  if model_type in _MODEL_TYPES:
    return _MODEL_TYPES[model_type]
  for arch in hf_config.get("architectures") or ():
    if arch in _ARCHITECTURES:
      return _ARCHITECTURES[arch]
  raise HFCheckpointError(
      f"config.json has model_type={model_type!r} and architectures="
      f"{hf_config.get('architectures')!r}; supported: model_type in "
      f"{sorted(_MODEL_TYPES)} or architectures in {sorted(_ARCHITECTURES)} "
      "(Tunix's Qwen3, Llama 3 and Gemma 3)")


def _text_config(hf_config: Mapping[str, Any]) -> dict:
  """The language model's config (Gemma 3's multimodal file nests it)."""
  if hf_config.get("model_type") == "gemma3" and "text_config" in hf_config:
    return dict(hf_config["text_config"])
  return dict(hf_config)


def _require(cfg: Mapping[str, Any], key: str):
  if cfg.get(key) is None:
    raise HFCheckpointError(f"config.json lacks {key!r}")
  return cfg[key]


def _rope_of(cfg: Mapping[str, Any], layer_type: Optional[str] = None
             ) -> tuple[float, Optional[dict]]:
  """``(rope_theta, scaling or None)`` in either ``config.json`` style.

  transformers 4 writes ``rope_theta`` and ``rope_scaling``; transformers 5
  writes ``rope_parameters`` (for Gemma 3 one dict per layer type).
  """
  params = cfg.get("rope_parameters")
  if isinstance(params, Mapping) and layer_type in params:
    params = params[layer_type]
  if isinstance(params, Mapping) and "rope_theta" in params:
    theta = float(params["rope_theta"])
    scaling = {k: v for k, v in params.items() if k != "rope_theta"}
  else:
    if layer_type == "sliding_attention":
      theta = float(cfg.get("rope_local_base_freq", 10_000.0))
      return theta, None
    theta = float(_require(cfg, "rope_theta"))
    scaling = cfg.get("rope_scaling")
  if scaling:
    scaling = dict(scaling)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    scaling["rope_type"] = kind
    scaling.pop("type", None)
    if kind == "default":
      scaling = None
  return theta, scaling or None


def rope_inverse_frequencies(head_dim: int, theta: float,
                             scaling: Optional[Mapping[str, Any]] = None
                             ) -> np.ndarray:
  """RoPE's inverse frequencies ``[head_dim // 2]`` as Hugging Face computes them.

  ``inv_freq[i] = theta ** (-2 i / head_dim)``; ``scaling`` (``rope_scaling``
  or ``rope_parameters`` without ``rope_theta``) is ``None``/``"default"``,
  ``"linear"`` (divide by ``factor``) or ``"llama3"`` (Llama 3.1: wavelengths
  above ``original_max_position_embeddings / low_freq_factor`` divided by
  ``factor``, below ``.../ high_freq_factor`` kept, smoothly interpolated in
  between; transformers' ``_compute_llama3_parameters``).

  Raises:
    HFCheckpointError: another ``rope_type`` (yarn, dynamic, longrope, ...).
  """
  inv = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
  kind = (scaling or {}).get("rope_type", "default")
  if kind == "default":
    return inv
  if kind == "linear":
    return inv / float(scaling["factor"])
  if kind == "llama3":
    factor = float(scaling["factor"])
    low = float(scaling.get("low_freq_factor", 1.0))
    high = float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old_len / low, inv / factor, inv)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return np.where(medium, smoothed, scaled)
  raise HFCheckpointError(
      f"rope_type {kind!r} is not supported (Tunix's models rotate with "
      "default, linear or llama3 RoPE frequencies)")


@dataclasses.dataclass(frozen=True)
class _Rope:
  """RoPE of a Llama 3 / Qwen3 checkpoint: theta, scaling, frequencies."""
  theta: float
  scaling: Optional[tuple]  # sorted items of the scaling dict
  inv_freq: tuple

  @property
  def scaling_dict(self) -> Optional[dict]:
    return dict(self.scaling) if self.scaling else None

  def is_tunix_default(self) -> bool:
    return self.scaling is None and self.theta == _TUNIX_DEFAULT_THETA


def _make_rope(head_dim, theta, scaling) -> _Rope:
  inv = rope_inverse_frequencies(head_dim, theta, scaling)
  items = tuple(sorted((k, _freeze(v)) for k, v in scaling.items())) \
      if scaling else None
  return _Rope(float(theta), items, tuple(float(v) for v in inv))


def _freeze(v):
  return tuple(v) if isinstance(v, list) else v


def tunix_config_from_hf(hf_config: Mapping[str, Any], *,
                         dtype: Any = None) -> tuple[str, Any]:
  """``(family, Tunix ModelConfig)`` for a ``config.json`` dict.

  Args:
    hf_config: the parsed ``config.json``.
    dtype: parameter (and for Qwen3 computation) dtype of the config; default
      the file's ``torch_dtype`` / ``dtype``, else float32.

  Raises:
    HFCheckpointError: a missing key, or a feature the Tunix model cannot run
      (attention or MLP biases, sliding windows in Qwen3, logit soft-capping,
      another activation, an unsupported RoPE type, ...), named.
  """
  family = family_from_hf_config(hf_config)
  config, _ = _tunix_config(family, hf_config, dtype)
  return family, config


def _resolve_dtype(dtype, cfg):
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  if dtype is None:
    dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
  try:
    dtype = jnp.dtype(dtype)
  except TypeError as e:
    raise HFCheckpointError(f"unknown dtype {dtype!r}") from e
  if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16),
                   jnp.dtype(jnp.float16)):
    raise HFCheckpointError(
        f"dtype {dtype} is not supported; use float32, bfloat16 or float16")
  return dtype


def _check_false(cfg, key, why):
  if cfg.get(key):
    raise HFCheckpointError(f"config.json sets {key}={cfg[key]!r}: {why}")


def _tunix_config(family: str, hf_config: Mapping[str, Any], dtype
                  ) -> tuple[Any, Optional[_Rope]]:
  """Tunix ModelConfig and (Llama / Qwen) RoPE of a config.json."""
  model_lib, _, _ = _tunix_modules(family)
  cfg = _text_config(hf_config)
  dtype = _resolve_dtype(dtype, cfg)
  d = int(_require(cfg, "hidden_size"))
  heads = int(_require(cfg, "num_attention_heads"))
  kv_heads = int(cfg.get("num_key_value_heads") or heads)
  head_dim = int(cfg.get("head_dim") or d // heads)
  common = dict(
      num_layers=int(_require(cfg, "num_hidden_layers")),
      embed_dim=d, hidden_dim=int(_require(cfg, "intermediate_size")),
      num_heads=heads, head_dim=head_dim, num_kv_heads=kv_heads)
  if heads % kv_heads:
    raise HFCheckpointError(
        f"num_attention_heads={heads} is not a multiple of "
        f"num_key_value_heads={kv_heads}")
  _check_false(cfg, "attention_bias", "Tunix's attention has no biases")
  if family in ("qwen3", "llama3"):
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
      raise HFCheckpointError(
          f"config.json sets hidden_act={act!r}; Tunix's {family} MLP is SwiGLU "
          "(silu)")
    _check_false(cfg, "mlp_bias", "Tunix's MLP has no biases")
    theta, scaling = _rope_of(cfg)
    rope = _make_rope(head_dim, theta, scaling)
    tied = bool(cfg.get("tie_word_embeddings", family == "qwen3"))
    kw = dict(common, vocab_size=int(_require(cfg, "vocab_size")),
              rope_theta=theta, norm_eps=float(cfg.get("rms_norm_eps", 1e-6)))
    if family == "qwen3":
      if cfg.get("num_experts") or cfg.get("num_local_experts"):
        raise HFCheckpointError(
            "config.json describes a mixture of experts (num_experts); only "
            "dense Qwen3 checkpoints are supported")
      _check_false(cfg, "use_sliding_window",
                   "Tunix's Qwen3 attends over the whole sequence")
      return model_lib.ModelConfig(use_tied_embedding=tied, dtype=dtype,
                                   param_dtype=dtype, **kw), rope
    return model_lib.ModelConfig(weight_tying=tied, **kw), rope
  # gemma3
  act = cfg.get("hidden_activation", cfg.get("hidden_act", "gelu_pytorch_tanh"))
  if act not in ("gelu_pytorch_tanh", "gelu_new"):
    raise HFCheckpointError(
        f"config.json sets hidden_activation={act!r}; Tunix's Gemma 3 MLP is "
        "GeGLU with tanh-approximated GELU (gelu_pytorch_tanh)")
  for key in ("final_logit_softcapping", "attn_logit_softcapping"):
    if cfg.get(key) is not None:
      raise HFCheckpointError(
          f"config.json sets {key}={cfg[key]!r}; Tunix's Gemma 3 has no "
          "soft-capping")
  eps = float(cfg.get("rms_norm_eps", _GEMMA3_NORM_EPS))
  if eps != _GEMMA3_NORM_EPS:
    raise HFCheckpointError(
        f"config.json sets rms_norm_eps={eps}; Tunix's Gemma 3 RMSNorm uses "
        f"{_GEMMA3_NORM_EPS}")
  if cfg.get("tie_word_embeddings") is False:
    raise HFCheckpointError(
        "config.json sets tie_word_embeddings=false; Tunix's Gemma 3 always "
        "ties the unembedding to the embedding")
  n = common["num_layers"]
  expected = _gemma3_layer_types(n)
  layer_types = cfg.get("layer_types")
  if layer_types is None and cfg.get("sliding_window_pattern") not in (
      None, _GEMMA3_PATTERN):
    raise HFCheckpointError(
        f"config.json sets sliding_window_pattern="
        f"{cfg['sliding_window_pattern']}; Tunix's Gemma 3 has one global "
        f"layer in {_GEMMA3_PATTERN}")
  if layer_types is not None and list(layer_types) != expected:
    raise HFCheckpointError(
        f"config.json's layer_types {list(layer_types)} differ from Tunix's "
        f"Gemma 3 pattern (one full_attention layer in {_GEMMA3_PATTERN}): "
        f"{expected}")
  local_theta, local_scaling = _rope_of(cfg, "sliding_attention")
  global_theta, global_scaling = _rope_of(cfg, "full_attention")
  if local_scaling is not None:
    raise HFCheckpointError(
        f"RoPE scaling {local_scaling} on sliding-window layers is not "
        "supported by Tunix's Gemma 3")
  factor = 1.0
  if global_scaling is not None:
    if global_scaling["rope_type"] != "linear":
      raise HFCheckpointError(
          f"rope_type {global_scaling['rope_type']!r} is not supported by "
          "Tunix's Gemma 3 (linear only)")
    factor = float(global_scaling["factor"])
  scalar = cfg.get("query_pre_attn_scalar", head_dim)
  norm = model_lib.QueryPreAttentionNormalisation
  if scalar == head_dim:
    qnorm = norm.BY_ONE_OVER_SQRT_HEAD_DIM
  elif scalar == d // heads:
    qnorm = norm.BY_ONE_OVER_SQRT_EMBED_DIM_DIV_NUM_HEADS
  else:
    raise HFCheckpointError(
        f"config.json sets query_pre_attn_scalar={scalar}; Tunix's Gemma 3 "
        f"scales queries by head_dim={head_dim} or hidden_size / "
        f"num_attention_heads={d // heads} only")
  window = cfg.get("sliding_window")
  return model_lib.ModelConfig(
      num_embed=int(_require(cfg, "vocab_size")),
      sliding_window_size=int(window) if window is not None else None,
      local_base_frequency=local_theta, global_base_frequency=global_theta,
      global_scale_factor=factor, query_pre_attn_norm=qnorm,
      param_dtype=dtype, **common), None


def _gemma3_layer_types(n: int) -> list:
  return ["full_attention" if (i + 1) % _GEMMA3_PATTERN == 0
          else "sliding_attention" for i in range(n)]


def _vocab_size(family: str, config) -> int:
  return config.num_embed if family == "gemma3" else config.vocab_size


def _tied(family: str, config) -> bool:
  if family == "gemma3":
    return True
  return config.use_tied_embedding if family == "qwen3" else config.weight_tying


# --------------------------------------------------------------------------
# RoPE as the checkpoint defines it (Tunix's Llama3 / Qwen3 ignore it)
# --------------------------------------------------------------------------

_ROPE_INV_FREQ = contextvars.ContextVar("kdjax_hf_rope_inv_freq", default=None)


def _apply_rope_inv_freq(inputs, positions, inv_freq):
  """Tunix's rotate-half RoPE with given inverse frequencies.

  ``inputs [B, L, N, H]``, ``positions [B, L]``; the angle of pair ``i`` at
  position ``p`` is ``p * inv_freq[i]``; pairs are ``(x[i], x[i + H/2])``.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  inv = jnp.asarray(np.asarray(inv_freq, np.float32))
  angles = positions[..., None].astype(jnp.float32) * inv  # [B, L, H/2]
  sin = jnp.sin(angles)[..., None, :]
  cos = jnp.cos(angles)[..., None, :]
  first, second = jnp.split(inputs, 2, axis=-1)
  out = jnp.concatenate([first * cos - second * sin,
                         second * cos + first * sin], axis=-1)
  return out.astype(inputs.dtype)


def _install_rope_hook(model_lib) -> None:
  """Let ``model_lib.apply_rope`` honour the frequencies of the attention
  layer being traced (:class:`_ROPE_INV_FREQ`); unchanged when none is set."""
  orig = model_lib.apply_rope
  if getattr(orig, "_kdjax_hf_rope", False):
    return

  @functools.wraps(orig)
  def apply_rope(inputs, positions, *args, **kwargs):
    inv = _ROPE_INV_FREQ.get()
    if inv is None:
      return orig(inputs, positions, *args, **kwargs)
    return _apply_rope_inv_freq(inputs, positions, inv)

  apply_rope._kdjax_hf_rope = True  # pylint: disable=protected-access
  model_lib.apply_rope = apply_rope


@functools.lru_cache(maxsize=None)
def _rope_attention_class(family: str):
  """Tunix's attention class of ``family`` rotating with its ``hf_rope``."""
  model_lib, _, _ = _tunix_modules(family)
  _install_rope_hook(model_lib)
  base = model_lib.Attention

  class HFRopeAttention(base):
    """Tunix attention whose RoPE uses ``self.hf_rope.inv_freq``."""

    def block(self, *args, **kwargs):
      token = _ROPE_INV_FREQ.set(self.hf_rope.inv_freq)
      try:
        return super().block(*args, **kwargs)
      finally:
        _ROPE_INV_FREQ.reset(token)

  HFRopeAttention.__name__ = HFRopeAttention.__qualname__ = (
      f"{base.__name__}WithHFRope")
  return HFRopeAttention


def _set_rope(family: str, model, rope: Optional[_Rope]) -> None:
  """Give every attention layer of a Llama3/Qwen3 ``model`` the RoPE ``rope``
  (left as Tunix's when ``rope`` is Tunix's own: theta 1e6, no scaling)."""
  if family == "gemma3" or rope is None or rope.is_tunix_default():
    return
  cls = _rope_attention_class(family)
  for layer in model.layers:
    layer.attn.__class__ = cls
    layer.attn.hf_rope = rope


def model_rope(family: str, model) -> Optional[_Rope]:
  """The RoPE a Llama3 / Qwen3 ``model`` computes with (``None`` for Gemma 3,
  whose config carries its frequencies)."""
  if family == "gemma3":
    return None
  ropes = {getattr(layer.attn, "hf_rope", None) for layer in model.layers}
  if len(ropes) > 1:
    raise HFCheckpointError("the model's attention layers use different RoPE")
  rope = ropes.pop() if ropes else None
  if rope is None:
    rope = _make_rope(model.config.head_dim, _TUNIX_DEFAULT_THETA, None)
  return rope


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


def _read_headers(files: Sequence[str]) -> dict:
  """HF tensor name -> ``(shape, dtype string, file)`` from the files' headers."""
  import struct  # pylint: disable=g-import-not-at-top
  found = {}
  for file in files:
    with open(file, "rb") as f:
      try:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size).decode("utf-8"))
      except (struct.error, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFCheckpointError(
            f"{file} is not a safetensors file ({e})") from e
    for name, meta in header.items():
      if name == "__metadata__":
        continue
      if name in found:
        raise HFCheckpointError(
            f"tensor {name} is in both {os.path.basename(found[name][2])} and "
            f"{os.path.basename(file)}")
      found[name] = (tuple(meta["shape"]), meta["dtype"], file)
  return found


def load_hf_tokenizer(path: str) -> Tokenizer:
  """``tokenizers.Tokenizer`` from ``path/tokenizer.json`` (or a file path).

  Raises:
    FileNotFoundError: no ``tokenizer.json`` (a SentencePiece
      ``tokenizer.model`` alone is said so).
  """
  import tokenizers  # pylint: disable=g-import-not-at-top
  file = path if os.path.isfile(path) else os.path.join(path, TOKENIZER_FILE)
  if not os.path.isfile(file):
    hint = ""
    if os.path.isfile(os.path.join(path, "tokenizer.model")):
      hint = (" (there is a SentencePiece tokenizer.model: convert it with "
              "transformers' AutoTokenizer(...).save_pretrained)")
    raise FileNotFoundError(
        f"{TOKENIZER_FILE} is missing from {path!r}{hint}")
  return tokenizers.Tokenizer.from_file(file)


# --------------------------------------------------------------------------
# Expected tensors
# --------------------------------------------------------------------------


def _expected_tensors(family: str, config) -> dict:
  """HF tensor name -> (shape, the config keys that imply it)."""
  d, f, h = config.embed_dim, config.hidden_dim, config.head_dim
  n, k = config.num_heads, config.num_kv_heads
  v = _vocab_size(family, config)
  out = {"model.embed_tokens.weight": ((v, d), "vocab_size, hidden_size"),
         "model.norm.weight": ((d,), "hidden_size")}
  if not _tied(family, config):
    out["lm_head.weight"] = ((v, d), "vocab_size, hidden_size")
  names = {
      "self_attn.q_proj.weight": ((n * h, d),
                                  "num_attention_heads * head_dim, hidden_size"),
      "self_attn.k_proj.weight": ((k * h, d),
                                  "num_key_value_heads * head_dim, hidden_size"),
      "self_attn.v_proj.weight": ((k * h, d),
                                  "num_key_value_heads * head_dim, hidden_size"),
      "self_attn.o_proj.weight": ((d, n * h),
                                  "hidden_size, num_attention_heads * head_dim"),
      "mlp.gate_proj.weight": ((f, d), "intermediate_size, hidden_size"),
      "mlp.up_proj.weight": ((f, d), "intermediate_size, hidden_size"),
      "mlp.down_proj.weight": ((d, f), "hidden_size, intermediate_size"),
      "input_layernorm.weight": ((d,), "hidden_size"),
      "post_attention_layernorm.weight": ((d,), "hidden_size"),
  }
  if family in ("qwen3", "gemma3"):
    names["self_attn.q_norm.weight"] = ((h,), "head_dim")
    names["self_attn.k_norm.weight"] = ((h,), "head_dim")
  if family == "gemma3":
    names["pre_feedforward_layernorm.weight"] = ((d,), "hidden_size")
    names["post_feedforward_layernorm.weight"] = ((d,), "hidden_size")
  for i in range(config.num_layers):
    for name, spec in names.items():
      out[f"model.layers.{i}.{name}"] = spec
  return out


def _ignorable(name: str, multimodal: bool) -> bool:
  """Tensors that carry no weights of the language model."""
  if name.endswith("rotary_emb.inv_freq"):
    return True
  return multimodal and name.startswith(("vision_tower.",
                                         "multi_modal_projector."))


def _fmt(names, limit=8):
  names = sorted(names, key=_natural_key)
  more = f" and {len(names) - limit} more" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def _natural_key(name):
  return [int(p) if p.isdigit() else p for p in name.split(".")]


def check_tensors_match_config(family: str, config, found: Mapping[str, Any],
                               *, prefix: str = "",
                               multimodal: bool = False) -> None:
  """Raise if the checkpoint's tensors contradict its ``config.json``.

  Args:
    family: the model family.
    config: the Tunix ModelConfig built from ``config.json``.
    found: HF tensor name -> ``(shape, ...)`` (from the safetensors headers).
    prefix: prefix of the language model's names (``"language_model."`` in
      a multimodal Gemma 3 file).
    multimodal: ignore the vision tower's tensors.

  Raises:
    HFCheckpointError: naming the tensors missing from the files, those the
      config does not expect, and those of another shape (with the config
      keys that imply the expected one).
  """
  expected = {prefix + name: spec
              for name, spec in _expected_tensors(family, config).items()}
  if _tied(family, config):
    expected.pop("lm_head.weight", None)
  heads = ("lm_head.weight", prefix + "lm_head.weight")
  present = {name: meta for name, meta in found.items()
             if not _ignorable(name, multimodal)
             and not (name in heads and _tied(family, config))}
  problems = []
  wrong = [(name, tuple(present[name][0]), spec) for name, spec in
           expected.items() if name in present
           and tuple(present[name][0]) != spec[0]]
  if wrong:
    wrong.sort(key=lambda w: _natural_key(w[0]))
    details = "; ".join(
        f"{name} has shape {shape} but config.json implies {spec[0]} "
        f"({spec[1]})" for name, shape, spec in wrong[:4])
    more = f" (and {len(wrong) - 4} more)" if len(wrong) > 4 else ""
    problems.append(f"shapes contradict config.json: {details}{more}")
  missing = [name for name in expected if name not in present]
  if missing:
    problems.append(f"tensors missing from the safetensors files: "
                    f"{_fmt(missing)}")
  extra = [name for name in present if name not in expected]
  if extra:
    hint = ""
    if any(name.startswith(prefix + "model.layers.") for name in extra):
      hint = f" (config.json has num_hidden_layers={config.num_layers})"
    problems.append(f"tensors config.json does not describe: {_fmt(extra)}"
                    f"{hint}")
  if problems:
    raise HFCheckpointError(
        f"the {family} checkpoint does not match its config.json: "
        + "; ".join(problems))


# --------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------


def tokenizer_vocab_size(tokenizer: Tokenizer) -> int:
  """Number of ids a ``tokenizers.Tokenizer`` can emit (added tokens too):
  one more than its largest id."""
  vocab = tokenizer.get_vocab(with_added_tokens=True)
  return max(vocab.values()) + 1 if vocab else 0


def check_tokenizer_fits(tokenizer: Tokenizer, vocab_size: int, *,
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


def _tokenizer_parts(tokenizer: Tokenizer) -> dict:
  spec = json.loads(tokenizer.to_str())
  return {key: spec.get(key) for key in
          ("normalizer", "pre_tokenizer", "model", "added_tokens")}


def check_same_tokenizer(teacher_tokenizer: Tokenizer,
                         student_tokenizer: Tokenizer) -> None:
  """Raise unless teacher and student tokenize every text to the same ids.

  Compares the vocabularies (token -> id, added tokens included) and the
  tokenization pipeline (normalizer, pre-tokenizer, model: BPE merges,
  unigram scores, ...); padding, truncation and post-processing settings may
  differ. Token-level KD compares the two distributions id by id, so it needs
  one tokenizer.

  Raises:
    HFCheckpointError: naming the first difference, and pointing to
      cross-tokenizer distillation (``kdjax.lm.make_uld_loss``).
  """
  uld = ("Token-level distillation compares teacher and student "
         "probabilities id by id and needs one tokenizer. For a teacher and "
         "a student with different tokenizers use cross-tokenizer "
         "distillation: kdjax.lm.make_uld_loss (Universal Logit "
         "Distillation, Boizard et al. 2024), with batches from "
         "kdjax.lm.make_cross_tokenizer_batch.")
  tv = teacher_tokenizer.get_vocab(with_added_tokens=True)
  sv = student_tokenizer.get_vocab(with_added_tokens=True)
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
    raise HFCheckpointError(
        "teacher and student have different tokenizers: " + ", ".join(parts)
        + ". " + uld)
  tp, sp = (_tokenizer_parts(teacher_tokenizer),
            _tokenizer_parts(student_tokenizer))
  for key in tp:
    if tp[key] != sp[key]:
      raise HFCheckpointError(
          f"teacher and student tokenizers share a vocabulary but differ in "
          f"their {key.replace('_', '-')}, so they split texts differently. "
          + uld)


# --------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------


def _abstract_model(family: str, config, rope: Optional[_Rope]):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  _, _, cls = _tunix_modules(family)

  def build(config, rngs):
    model = cls(config, rngs=rngs)
    _set_rope(family, model, rope)
    return model

  return build, nnx.eval_shape(lambda: build(config, nnx.Rngs(params=0)))


def _check_tied_head(family, config, found, prefix):
  """A tied model's file may carry ``lm_head.weight``; only as a copy."""
  head = next((name for name in ("lm_head.weight", prefix + "lm_head.weight")
               if name in found), None)
  if head is None or not _tied(family, config):
    return
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
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
  from tunix.models import safetensors_loader  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  hf_config = _read_config(path)
  files = _safetensors_files(path)
  family = family_from_hf_config(hf_config)
  found = _read_headers(files)
  if dtype is None:  # the model computes in its tensors' dtype
    stored = {meta[1] for meta in found.values()}
    dtype = ({"F32": "float32", "BF16": "bfloat16", "F16": "float16"}
             .get(stored.pop()) if len(stored) == 1 else None)
    load_dtype = None
  else:
    load_dtype = _resolve_dtype(dtype, {})
  config, rope = _tunix_config(family, hf_config, dtype)
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
    check_tokenizer_fits(tokenizer, _vocab_size(family, config),
                         what=f"the model (config.json vocab_size)")

  _, params_lib, _ = _tunix_modules(family)
  build, _ = _abstract_model(family, config, rope)
  by_file = {}
  for name, (_, dt, file) in found.items():
    by_file.setdefault(file, set()).add(dt)
  # Tunix's "optimized" reader assumes one dtype per file; else "original".
  mode = "optimized" if all(len(d) == 1 for d in by_file.values()) \
      else "original"
  preprocess = (params_lib._make_preprocess_fn(config)  # pylint: disable=protected-access
                if family == "gemma3" else None)
  model = safetensors_loader.load_and_create_model(
      file_dir=path, model_class=build, config=config,
      key_mapping=params_lib._get_key_and_transform_mapping,  # pylint: disable=protected-access
      preprocess_fn=preprocess, dtype=load_dtype, mode=mode)
  from flax import nnx  # pylint: disable=g-import-not-at-top
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
    if isinstance(model, _tunix_modules(family)[2]):
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


def student_from_teacher(teacher, family: Optional[str] = None, *,
                         keep_layers: Union[str, Sequence[int]] = "every_other"):
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

  Returns:
    The student ``nnx.Module`` (its Tunix config is ``student.config``).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
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
  _, abstract = _abstract_model(family, student_config,
                                model_rope(family, model))
  graphdef, abstract_state = nnx.split(abstract)
  teacher_state = nnx.state(model).to_pure_dict()
  student_state = {k: v for k, v in teacher_state.items() if k != "layers"}
  student_state["layers"] = {j: teacher_state["layers"][i]
                             for j, i in enumerate(keep)}
  student_state = jax.tree.map(jnp.copy, student_state)
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
          f"global layer in {_GEMMA3_PATTERN}", stacklevel=2)
  return nnx.merge(graphdef, abstract_state)


# --------------------------------------------------------------------------
# Export
# --------------------------------------------------------------------------


def hf_state_dict(family: str, model) -> dict:
  """The model's parameters under their Hugging Face names and layouts.

  Returns ``name -> np.ndarray``: ``torch.nn.Linear`` weights
  ``[out_features, in_features]`` (``q_proj [heads * head_dim, hidden]``,
  ``o_proj [hidden, heads * head_dim]``, ``gate_proj [intermediate,
  hidden]``, ...), embeddings ``[vocab, hidden]``, norms ``[dim]`` (Gemma's
  stored as Hugging Face stores them, the ``w`` of ``x * (1 + w)``).
  """
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  state = jax.device_get(nnx.state(model, nnx.Param).to_pure_dict())
  config = model.config

  def lin(kernel):  # nnx.Linear kernel [in, out] -> torch [out, in]
    return np.ascontiguousarray(np.asarray(kernel).T)

  def heads_in(w):  # [D, N, H] -> [N * H, D]
    w = np.asarray(w)
    return np.ascontiguousarray(w.reshape(w.shape[0], -1).T)

  def heads_out(w):  # [N, H, D] -> [D, N * H]
    w = np.asarray(w)
    return np.ascontiguousarray(w.reshape(-1, w.shape[-1]).T)

  out = {"model.embed_tokens.weight":
         np.asarray(state["embedder"]["input_embedding"])}
  for i in range(config.num_layers):
    layer = state["layers"][i]
    attn, mlp = layer["attn"], layer["mlp"]
    p = f"model.layers.{i}."
    for name in ("gate_proj", "up_proj", "down_proj"):
      out[p + f"mlp.{name}.weight"] = lin(mlp[name]["kernel"])
    if family == "gemma3":
      if "qkv_einsum" in attn:
        q, k, v = np.asarray(attn["qkv_einsum"]["w"])
      else:
        q = np.asarray(attn["q_einsum"]["w"])
        k, v = np.asarray(attn["kv_einsum"]["w"])
      # [N, D, H] -> [D, N, H] -> [N * H, D]
      for name, w in (("q", q), ("k", k), ("v", v)):
        out[p + f"self_attn.{name}_proj.weight"] = heads_in(
            w.transpose(1, 0, 2))
      out[p + "self_attn.o_proj.weight"] = heads_out(
          attn["attn_vec_einsum"]["w"])
      out[p + "self_attn.q_norm.weight"] = np.asarray(
          attn["_query_norm"]["scale"])
      out[p + "self_attn.k_norm.weight"] = np.asarray(
          attn["_key_norm"]["scale"])
      for hf, tx in (("input_layernorm", "pre_attention_norm"),
                     ("post_attention_layernorm", "post_attention_norm"),
                     ("pre_feedforward_layernorm", "pre_ffw_norm"),
                     ("post_feedforward_layernorm", "post_ffw_norm")):
        out[p + f"{hf}.weight"] = np.asarray(layer[tx]["scale"])
    else:
      for name in ("q", "k", "v"):
        out[p + f"self_attn.{name}_proj.weight"] = heads_in(
            attn[f"{name}_proj"]["w"])
      out[p + "self_attn.o_proj.weight"] = heads_out(attn["o_proj"]["w"])
      if family == "qwen3":
        out[p + "self_attn.q_norm.weight"] = np.asarray(attn["q_norm"]["w"])
        out[p + "self_attn.k_norm.weight"] = np.asarray(attn["k_norm"]["w"])
      for name in ("input_layernorm", "post_attention_layernorm"):
        out[p + f"{name}.weight"] = np.asarray(layer[name]["w"])
  if family == "gemma3":
    out["model.norm.weight"] = np.asarray(state["final_norm"]["scale"])
  else:
    out["model.norm.weight"] = np.asarray(state["final_norm"]["w"])
    if not _tied(family, config):
      out["lm_head.weight"] = lin(state["lm_head"]["w"])
  return out


def _write_rope(cfg: dict, rope: _Rope, v5_style: bool) -> None:
  for key in ("rope_theta", "rope_scaling", "rope_parameters"):
    cfg.pop(key, None)
  if v5_style:
    cfg["rope_parameters"] = dict(rope.scaling_dict or {"rope_type": "default"},
                                  rope_theta=rope.theta)
  else:
    cfg["rope_theta"] = rope.theta
    cfg["rope_scaling"] = rope.scaling_dict


def hf_config_from_model(family: str, model, hf_config: Optional[Mapping[str, Any]]
                         = None, *, dtype: Any = None) -> dict:
  """The ``config.json`` dict of a Tunix model.

  Starts from ``hf_config`` (e.g. the teacher's; for a multimodal Gemma 3
  its ``text_config``) and sets every key the weights define from the model:
  sizes, layer count, heads, vocabulary, tying, norm epsilon, RoPE (the
  frequencies the model computes with), Gemma 3's layer types, window and
  query scaling; ``model_type`` / ``architectures`` of the text model.
  """
  config = model.config
  cfg = _text_config(hf_config or {})
  for key in ("_name_or_path", "transformers_version", "auto_map",
              "quantization_config"):
    cfg.pop(key, None)
  v5_style = "rope_parameters" in cfg
  model_type, arch = HF_FAMILIES[family]
  cfg.update(
      model_type=model_type, architectures=[arch],
      vocab_size=_vocab_size(family, config), hidden_size=config.embed_dim,
      intermediate_size=config.hidden_dim,
      num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads,
      num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
      tie_word_embeddings=_tied(family, config), attention_bias=False)
  if dtype is not None:
    cfg.pop("dtype", None)
    cfg["torch_dtype"] = str(dtype)
  if family in ("qwen3", "llama3"):
    cfg.update(hidden_act="silu", rms_norm_eps=float(config.norm_eps))
    cfg.setdefault("max_position_embeddings", 32768)
    if family == "llama3":
      cfg["mlp_bias"] = False
    else:
      cfg["use_sliding_window"] = False
      if "layer_types" in cfg:
        cfg["layer_types"] = ["full_attention"] * config.num_layers
      cfg.pop("max_window_layers", None)
    _write_rope(cfg, model_rope(family, model), v5_style)
    return cfg
  model_lib, _, _ = _tunix_modules(family)
  if config.local_scale_factor != 1.0:
    raise HFCheckpointError(
        f"local_scale_factor={config.local_scale_factor}: Hugging Face's "
        "Gemma 3 has no RoPE scaling on sliding-window layers")
  norm = model_lib.QueryPreAttentionNormalisation
  scalar = (config.head_dim if config.query_pre_attn_norm
            == norm.BY_ONE_OVER_SQRT_HEAD_DIM
            else config.embed_dim // config.num_heads)
  global_scaling = (None if config.global_scale_factor == 1.0 else
                    {"rope_type": "linear",
                     "factor": float(config.global_scale_factor)})
  cfg.update(hidden_activation="gelu_pytorch_tanh",
             rms_norm_eps=_GEMMA3_NORM_EPS, query_pre_attn_scalar=scalar,
             sliding_window=config.sliding_window_size,
             layer_types=_gemma3_layer_types(config.num_layers),
             final_logit_softcapping=None, attn_logit_softcapping=None)
  cfg.setdefault("max_position_embeddings", 131072)
  cfg.pop("sliding_window_pattern", None)
  for key in ("rope_theta", "rope_scaling", "rope_parameters",
              "rope_local_base_freq"):
    cfg.pop(key, None)
  if v5_style:
    cfg["rope_parameters"] = {
        "sliding_attention": {"rope_type": "default",
                              "rope_theta": float(config.local_base_frequency)},
        "full_attention": dict(global_scaling or {"rope_type": "default"},
                               rope_theta=float(config.global_base_frequency)),
    }
  else:
    cfg.update(rope_theta=float(config.global_base_frequency),
               rope_local_base_freq=float(config.local_base_frequency),
               rope_scaling=global_scaling,
               sliding_window_pattern=_GEMMA3_PATTERN)
  return cfg


def save_hf_checkpoint(path: str, family: str, model, *,
                       hf_config: Optional[Mapping[str, Any]] = None,
                       tokenizer: Optional[Tokenizer] = None,
                       dtype: Any = None) -> str:
  """Write ``model`` as a Hugging Face directory that loads again.

  Writes ``config.json`` (:func:`hf_config_from_model`),
  ``model.safetensors`` (:func:`hf_state_dict`, metadata ``format: pt`` as
  transformers expects) and, given one, ``tokenizer.json``. Files of those
  names in ``path`` are replaced; others are left alone.

  Args:
    path: the directory (created).
    family: the model's family.
    model: a Tunix Qwen3 / Llama3 / Gemma3 model.
    hf_config: a ``config.json`` to start from (the teacher's keeps its
      token ids, context length, ...).
    tokenizer: a ``tokenizers.Tokenizer``; its ids must fit the vocabulary.
    dtype: cast the tensors (e.g. ``"bfloat16"``); default their own.

  Returns:
    ``path``.
  """
  from safetensors.numpy import save_file  # pylint: disable=g-import-not-at-top
  actual = model_family(model)
  if family != actual:
    raise HFCheckpointError(f"family={family!r} but the model is {actual}")
  tensors = hf_state_dict(family, model)
  if dtype is not None:
    dtype = _resolve_dtype(dtype, {})
    tensors = {k: v.astype(dtype) for k, v in tensors.items()}
  dtypes = {str(v.dtype) for v in tensors.values()}
  cfg = hf_config_from_model(family, model, hf_config,
                             dtype=dtypes.pop() if len(dtypes) == 1 else None)
  if tokenizer is not None:
    check_tokenizer_fits(tokenizer, cfg["vocab_size"])
  os.makedirs(path, exist_ok=True)
  save_file(tensors, os.path.join(path, WEIGHTS_FILE),
            metadata={"format": "pt"})
  index = os.path.join(path, INDEX_FILE)
  if os.path.exists(index):
    os.remove(index)  # a stale shard index would name other files
  with open(os.path.join(path, CONFIG_FILE), "w", encoding="utf-8") as f:
    json.dump(cfg, f, indent=2, sort_keys=True)
    f.write("\n")
  if tokenizer is not None:
    tokenizer.save(os.path.join(path, TOKENIZER_FILE))
  return path
