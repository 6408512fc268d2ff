"""Hugging Face ``config.json`` <-> Tunix ``ModelConfig``, and RoPE as the
checkpoint defines it (part of :mod:`kdjax.lm._hf`).

:func:`tunix_config_from_hf` translates a ``config.json`` (transformers 4's
keys or 5's ``rope_parameters``) into the Tunix ``ModelConfig`` of its family
and raises, naming the key, on a feature Tunix's model cannot run;
:func:`hf_config_from_model` goes back. Tunix 0.1.7's ``Llama3`` and
``Qwen3`` attention calls ``apply_rope`` without the config's ``rope_theta``
(always 1e6) and has no Llama 3.1 frequency scaling, so a model whose
checkpoint's RoPE differs from that gets attention layers (a subclass of
Tunix's, :func:`set_rope`) that rotate with :func:`rope_inverse_frequencies`:
while such a layer traces, ``apply_rope`` of that family's Tunix module
(wrapped once, unchanged for every other caller) reads the layer's
frequencies from a context variable.
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import math
from typing import Any, Mapping, Optional

import numpy as np

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
GEMMA3_PATTERN = 6  # five sliding-window layers, then one global layer


class HFCheckpointError(ValueError):
  """A Hugging Face checkpoint that cannot become (or come from) the model."""



# --------------------------------------------------------------------------
# Families and configs
# --------------------------------------------------------------------------


def tunix_modules(family: str):
  """``(model module, params module, model class)`` of a family."""
  if family == "qwen3":
    from tunix.models.qwen3 import model as model_lib
    from tunix.models.qwen3 import params as params_lib
    return model_lib, params_lib, model_lib.Qwen3
  if family == "llama3":
    from tunix.models.llama3 import model as model_lib
    from tunix.models.llama3 import params as params_lib
    return model_lib, params_lib, model_lib.Llama3
  if family == "gemma3":
    from tunix.models.gemma3 import model as model_lib
    from tunix.models.gemma3 import params_safetensors as params_lib
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


def _rope_of(cfg: Mapping[str, Any], layer_type: Optional[str] = None, *,
             default_theta: float = 10_000.0
             ) -> tuple[float, Optional[dict]]:
  """``(rope_theta, scaling or None)`` in either ``config.json`` style.

  transformers 4 writes ``rope_theta`` and ``rope_scaling``; transformers 5
  writes ``rope_parameters`` (for Gemma 3 one dict per layer type). A file
  with neither gets transformers' config-class default (``default_theta``).
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
    theta = float(cfg.get("rope_theta", default_theta))
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
  """RoPE's inverse frequencies ``[head_dim // 2]``, as Hugging Face's.

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
class RopeSpec:
  """RoPE of a Llama 3 / Qwen3 checkpoint: theta, scaling, frequencies."""
  theta: float
  scaling: Optional[tuple]  # sorted items of the scaling dict
  inv_freq: tuple

  @property
  def scaling_dict(self) -> Optional[dict]:
    return dict(self.scaling) if self.scaling else None

  def is_tunix_default(self) -> bool:
    return self.scaling is None and self.theta == _TUNIX_DEFAULT_THETA


def make_rope(head_dim, theta, scaling) -> RopeSpec:
  inv = rope_inverse_frequencies(head_dim, theta, scaling)
  items = tuple(sorted((k, _freeze(v)) for k, v in scaling.items())) \
      if scaling else None
  return RopeSpec(float(theta), items, tuple(float(v) for v in inv))


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
  config, _ = tunix_config(family, hf_config, dtype)
  return family, config


def resolve_dtype(dtype, cfg):
  import jax.numpy as jnp
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


def tunix_config(family: str, hf_config: Mapping[str, Any], dtype
                  ) -> tuple[Any, Optional[RopeSpec]]:
  """Tunix ModelConfig and (Llama / Qwen) RoPE of a config.json."""
  model_lib, _, _ = tunix_modules(family)
  cfg = _text_config(hf_config)
  dtype = resolve_dtype(dtype, cfg)
  d = int(_require(cfg, "hidden_size"))
  heads = int(_require(cfg, "num_attention_heads"))
  kv_heads = int(cfg.get("num_key_value_heads") or heads)
  # transformers' config-class defaults: Qwen3 128, Gemma 3 256, Llama d / n.
  head_dim = int(cfg.get("head_dim") or {"qwen3": 128, "gemma3": 256}.get(
      family, d // heads))
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
          f"config.json sets hidden_act={act!r}; Tunix's {family} MLP is "
          "SwiGLU (silu)")
    _check_false(cfg, "mlp_bias", "Tunix's MLP has no biases")
    theta, scaling = _rope_of(cfg)
    rope = make_rope(head_dim, theta, scaling)
    # transformers' LlamaConfig / Qwen3Config default: untied.
    tied = bool(cfg.get("tie_word_embeddings", False))
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
      None, GEMMA3_PATTERN):
    raise HFCheckpointError(
        f"config.json sets sliding_window_pattern="
        f"{cfg['sliding_window_pattern']}; Tunix's Gemma 3 has one global "
        f"layer in {GEMMA3_PATTERN}")
  if layer_types is not None and list(layer_types) != expected:
    raise HFCheckpointError(
        f"config.json's layer_types {list(layer_types)} differ from Tunix's "
        f"Gemma 3 pattern (one full_attention layer in {GEMMA3_PATTERN}): "
        f"{expected}")
  local_theta, local_scaling = _rope_of(cfg, "sliding_attention")
  global_theta, global_scaling = _rope_of(cfg, "full_attention",
                                         default_theta=1_000_000.0)
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
  scalar = cfg.get("query_pre_attn_scalar", 256)  # Gemma3TextConfig's default
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
  window = cfg.get("sliding_window", 4096)  # Gemma3TextConfig's default
  return model_lib.ModelConfig(
      num_embed=int(_require(cfg, "vocab_size")),
      sliding_window_size=int(window) if window is not None else None,
      local_base_frequency=local_theta, global_base_frequency=global_theta,
      global_scale_factor=factor, query_pre_attn_norm=qnorm,
      param_dtype=dtype, **common), None


def _gemma3_layer_types(n: int) -> list:
  return ["full_attention" if (i + 1) % GEMMA3_PATTERN == 0
          else "sliding_attention" for i in range(n)]


def vocab_size_of(family: str, config) -> int:
  return config.num_embed if family == "gemma3" else config.vocab_size


def tied(family: str, config) -> bool:
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
  import jax.numpy as jnp
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

  apply_rope._kdjax_hf_rope = True
  model_lib.apply_rope = apply_rope


@functools.lru_cache(maxsize=None)
def _rope_attention_class(family: str):
  """Tunix's attention class of ``family`` rotating with its ``hf_rope``."""
  model_lib, _, _ = tunix_modules(family)
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


def set_rope(family: str, model, rope: Optional[RopeSpec]) -> None:
  """Give every attention layer of a Llama3/Qwen3 ``model`` the RoPE ``rope``
  (left as Tunix's when ``rope`` is Tunix's own: theta 1e6, no scaling)."""
  if family == "gemma3" or rope is None or rope.is_tunix_default():
    return
  cls = _rope_attention_class(family)
  for layer in model.layers:
    layer.attn.__class__ = cls
    layer.attn.hf_rope = rope


def model_rope(family: str, model) -> Optional[RopeSpec]:
  """The RoPE a Llama3 / Qwen3 ``model`` computes with (``None`` for Gemma 3,
  whose config carries its frequencies)."""
  if family == "gemma3":
    return None
  ropes = {getattr(layer.attn, "hf_rope", None) for layer in model.layers}
  if len(ropes) > 1:
    raise HFCheckpointError("the model's attention layers use different RoPE")
  rope = ropes.pop() if ropes else None
  if rope is None:
    rope = make_rope(model.config.head_dim, _TUNIX_DEFAULT_THETA, None)
  return rope


def _write_rope(cfg: dict, rope: RopeSpec, v5_style: bool) -> None:
  for key in ("rope_theta", "rope_scaling", "rope_parameters"):
    cfg.pop(key, None)
  if v5_style:
    cfg["rope_parameters"] = dict(rope.scaling_dict or {"rope_type": "default"},
                                  rope_theta=rope.theta)
  else:
    cfg["rope_theta"] = rope.theta
    cfg["rope_scaling"] = rope.scaling_dict


def hf_config_from_model(family: str, model,
                         hf_config: Optional[Mapping[str, Any]] = None, *,
                         dtype: Any = None) -> dict:
  """The ``config.json`` dict of a Tunix model.

  Starts from ``hf_config`` (e.g. the teacher's; for a multimodal Gemma 3
  its ``text_config``) and sets every key the weights define from the model:
  sizes, layer count, heads, vocabulary, tying, norm epsilon, RoPE (the
  frequencies the model computes with), Gemma 3's layer types, window and
  query scaling; ``model_type`` / ``architectures`` of the text model.
  ``dtype`` (the tensors' dtype) is written under both ``torch_dtype``
  (transformers 4) and ``dtype`` (transformers 5); None keeps
  ``hf_config``'s.
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
      vocab_size=vocab_size_of(family, config), hidden_size=config.embed_dim,
      intermediate_size=config.hidden_dim,
      num_hidden_layers=config.num_layers,
      num_attention_heads=config.num_heads,
      num_key_value_heads=config.num_kv_heads, head_dim=config.head_dim,
      tie_word_embeddings=tied(family, config), attention_bias=False)
  if dtype is not None:  # transformers 4 reads torch_dtype, 5 dtype
    cfg["torch_dtype"] = cfg["dtype"] = str(dtype)
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
  model_lib, _, _ = tunix_modules(family)
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
               sliding_window_pattern=GEMMA3_PATTERN)
  return cfg
