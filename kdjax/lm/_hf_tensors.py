"""Hugging Face tensor names and layouts of Tunix's models (part of
:mod:`kdjax.lm._hf`).

:func:`check_tensors_match_config` compares the safetensors headers with the
tensors a ``config.json`` implies, before anything is loaded;
:func:`hf_state_dict` turns a Tunix model's parameters into Hugging Face
tensors (``torch.nn.Linear`` weights ``[out_features, in_features]``).
Loading goes the other way through Tunix's own name mapping
(``tunix.models.<family>.params*._get_key_and_transform_mapping``).
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any, Mapping, Sequence

import numpy as np

from kdjax.lm._hf_config import HFCheckpointError
from kdjax.lm._hf_config import tied
from kdjax.lm._hf_config import vocab_size_of

def read_headers(files: Sequence[str]) -> dict:
  """HF tensor name -> ``(shape, dtype string, file)``, from the headers.

  A safetensors file is an 8-byte little-endian header size ``n``, ``n``
  bytes of JSON header, then the tensors' bytes at the header's
  ``data_offsets`` (relative to byte ``8 + n``); a file shorter than ``8 + n
  + max(end offset)`` is truncated (e.g. an interrupted download).

  Raises:
    HFCheckpointError: a file that is not safetensors, or truncated (named,
      with its size and the size its header implies); a tensor in two files.
  """
  found = {}
  for file in files:
    file_size = os.path.getsize(file)
    with open(file, "rb") as f:
      try:
        (size,) = struct.unpack("<Q", f.read(8))
        if 8 + size > file_size:
          raise HFCheckpointError(
              f"{file} is truncated: {file_size} bytes, but its header alone "
              f"should take {8 + size}; download or copy it again")
        header = json.loads(f.read(size).decode("utf-8"))
      except (struct.error, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise HFCheckpointError(
            f"{file} is not a safetensors file ({e})") from e
    if not isinstance(header, dict):
      raise HFCheckpointError(f"{file} is not a safetensors file (its header "
                              "is not a JSON object)")
    ends = [int(meta["data_offsets"][1]) for name, meta in header.items()
            if name != "__metadata__" and isinstance(meta, dict)
            and len(meta.get("data_offsets") or ()) == 2]
    if ends and 8 + size + max(ends) > file_size:
      raise HFCheckpointError(
          f"{file} is truncated: {file_size} bytes, but its header places "
          f"tensor data up to byte {8 + size + max(ends)}; download or copy "
          "it again")
    for name, meta in header.items():
      if name == "__metadata__":
        continue
      if name in found:
        raise HFCheckpointError(
            f"tensor {name} is in both {os.path.basename(found[name][2])} and "
            f"{os.path.basename(file)}")
      found[name] = (tuple(meta["shape"]), meta["dtype"], file)
  return found


# --------------------------------------------------------------------------
# Expected tensors
# --------------------------------------------------------------------------


def _expected_tensors(family: str, config) -> dict:
  """HF tensor name -> (shape, the config keys that imply it)."""
  d, f, h = config.embed_dim, config.hidden_dim, config.head_dim
  n, k = config.num_heads, config.num_kv_heads
  v = vocab_size_of(family, config)
  out = {"model.embed_tokens.weight": ((v, d), "vocab_size, hidden_size"),
         "model.norm.weight": ((d,), "hidden_size")}
  if not tied(family, config):
    out["lm_head.weight"] = ((v, d), "vocab_size, hidden_size")
  q_shape = "num_attention_heads * head_dim"
  kv_shape = "num_key_value_heads * head_dim"
  names = {
      "self_attn.q_proj.weight": ((n * h, d), f"{q_shape}, hidden_size"),
      "self_attn.k_proj.weight": ((k * h, d), f"{kv_shape}, hidden_size"),
      "self_attn.v_proj.weight": ((k * h, d), f"{kv_shape}, hidden_size"),
      "self_attn.o_proj.weight": ((d, n * h), f"hidden_size, {q_shape}"),
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
  if tied(family, config):
    expected.pop("lm_head.weight", None)
  heads = ("lm_head.weight", prefix + "lm_head.weight")
  present = {name: meta for name, meta in found.items()
             if not _ignorable(name, multimodal)
             and not (name in heads and tied(family, config))}
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
  import jax
  from flax import nnx
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
    if not tied(family, config):
      out["lm_head.weight"] = lin(state["lm_head"]["w"])
  return out
