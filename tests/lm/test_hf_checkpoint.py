"""Hugging Face checkpoints in and out of Tunix's Qwen3 / Llama 3 / Gemma 3.

Each test writes its own tiny random checkpoint in the real Hugging Face
tensor naming and layout with ``safetensors.numpy`` (no torch) and a
tokenizer trained here with ``tokenizers``; the loaded model's logits are
checked against an independent NumPy forward pass over the same file
(RMSNorm, RoPE with the config's frequencies, GQA, SwiGLU / GeGLU, q/k norms,
Gemma's sqrt(d) embedding scale, (1 + w) norms, sliding windows, tied
embeddings).
"""

import json
import math
import os
import socket
import warnings

import numpy as np
import pytest

pytest.importorskip("tunix")
pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")

from flax import nnx
import jax
import jax.numpy as jnp
from safetensors.numpy import load_file
from safetensors.numpy import save_file
import tokenizers

from kdjax import lm
from kdjax.lm import _tokenizer

TEXT = """Knowledge distillation trains a small student to match a large
teacher. The student sees the teacher's probabilities over the vocabulary at
every position, not only the next token of the text, and so learns from the
teacher's view of which tokens are likely. A smaller model of the same family
starts from the teacher with every other layer, as DistilBERT did, and keeps
the embeddings, the norms and the unembedding. Checkpoints are read from and
written to local directories in the format other tools serve."""

# Tiny configs with the keys real config.json files have. Qwen3 and Gemma 3
# in transformers 5's style (rope_parameters), Llama in transformers 4's
# (rope_theta, rope_scaling with Llama 3.1's frequency scaling).
CONFIGS = {
    "qwen3": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "vocab_size": 128, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu",
        "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "tie_word_embeddings": True, "attention_bias": False,
        "use_sliding_window": False, "sliding_window": None,
        "layer_types": ["full_attention"] * 2, "bos_token_id": 1,
        "eos_token_id": 2, "dtype": "float32",
    },
    "llama3": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": 130, "hidden_size": 48, "intermediate_size": 96,
        "num_hidden_layers": 4, "num_attention_heads": 4,
        "num_key_value_heads": 2, "hidden_act": "silu",
        "max_position_embeddings": 256, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                         "original_max_position_embeddings": 64},
        "tie_word_embeddings": False, "attention_bias": False,
        "mlp_bias": False, "pretraining_tp": 1, "bos_token_id": 1,
        "eos_token_id": 2, "torch_dtype": "float32",
    },
    "gemma3": {
        "architectures": ["Gemma3ForCausalLM"], "model_type": "gemma3_text",
        "vocab_size": 144, "hidden_size": 32, "intermediate_size": 64,
        "num_hidden_layers": 6, "num_attention_heads": 4,
        "num_key_value_heads": 1, "head_dim": 16,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 256, "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "sliding_attention": {"rope_type": "default",
                                  "rope_theta": 10000.0},
            "full_attention": {"rope_type": "linear", "factor": 2.0,
                               "rope_theta": 1000000.0}},
        "query_pre_attn_scalar": 16, "sliding_window": 4,
        "layer_types": ["sliding_attention"] * 5 + ["full_attention"],
        "final_logit_softcapping": None, "attn_logit_softcapping": None,
        "tie_word_embeddings": True, "attention_bias": False,
        "pad_token_id": 0, "bos_token_id": 2, "eos_token_id": 1,
        "torch_dtype": "float32",
    },
}
FAMILIES = tuple(CONFIGS)


def _head_dim(cfg):
  return cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]


def random_tensors(family, cfg, seed=0):
  """HF-named float32 tensors of a tiny random checkpoint."""
  rng = np.random.default_rng(seed)
  d, f = cfg["hidden_size"], cfg["intermediate_size"]
  n, k = cfg["num_attention_heads"], cfg["num_key_value_heads"]
  h, v = _head_dim(cfg), cfg["vocab_size"]
  gemma = family == "gemma3"

  def lin(out_dim, in_dim):  # torch.nn.Linear: [out, in]
    return (rng.standard_normal((out_dim, in_dim)) /
            math.sqrt(in_dim)).astype(np.float32)

  def norm(dim):  # Gemma stores w of x * (1 + w); the others w of x * w
    w = 0.2 * rng.standard_normal(dim)
    return (w if gemma else 1.0 + w).astype(np.float32)

  t = {"model.embed_tokens.weight":
       (rng.standard_normal((v, d)) * (0.3 if gemma else 1.0)
        ).astype(np.float32),
       "model.norm.weight": norm(d)}
  if not cfg["tie_word_embeddings"]:
    t["lm_head.weight"] = lin(v, d)
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    t[p + "self_attn.q_proj.weight"] = lin(n * h, d)
    t[p + "self_attn.k_proj.weight"] = lin(k * h, d)
    t[p + "self_attn.v_proj.weight"] = lin(k * h, d)
    t[p + "self_attn.o_proj.weight"] = lin(d, n * h)
    t[p + "mlp.gate_proj.weight"] = lin(f, d)
    t[p + "mlp.up_proj.weight"] = lin(f, d)
    t[p + "mlp.down_proj.weight"] = lin(d, f)
    t[p + "input_layernorm.weight"] = norm(d)
    t[p + "post_attention_layernorm.weight"] = norm(d)
    if family != "llama3":
      t[p + "self_attn.q_norm.weight"] = norm(h)
      t[p + "self_attn.k_norm.weight"] = norm(h)
    if gemma:
      t[p + "pre_feedforward_layernorm.weight"] = norm(d)
      t[p + "post_feedforward_layernorm.weight"] = norm(d)
  return t


def train_tokenizer(vocab_size):
  tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size,
      special_tokens=["<pad>", "<bos>", "<eos>", "<unk>"])
  tok.train_from_iterator(TEXT.splitlines(), trainer)
  return tok


def write_checkpoint(path, family, cfg=None, tensors=None, tokenizer=None):
  cfg = dict(CONFIGS[family] if cfg is None else cfg)
  tensors = random_tensors(family, cfg) if tensors is None else tensors
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
    json.dump(cfg, f)
  save_file(tensors, os.path.join(path, "model.safetensors"),
            metadata={"format": "pt"})
  if tokenizer is not None:
    tokenizer.save(os.path.join(path, "tokenizer.json"))
  return str(path)


# ------------------------------ NumPy reference ---------------------------


def reference_inv_freq(family, cfg, layer_type):
  """RoPE inverse frequencies, written out from the config (float64)."""
  h = _head_dim(cfg)
  params = cfg.get("rope_parameters")
  if params is None:
    params = dict(cfg.get("rope_scaling") or {}, rope_theta=cfg["rope_theta"])
  elif family == "gemma3":
    params = params[layer_type]
  inv = params["rope_theta"] ** (-np.arange(0, h, 2) / h)
  kind = params.get("rope_type", "default")
  if kind == "linear":
    inv = inv / params["factor"]
  elif kind == "llama3":
    factor = params["factor"]
    lo, hi = params["low_freq_factor"], params["high_freq_factor"]
    old = params["original_max_position_embeddings"]
    out = []
    for f in inv:
      wavelen = 2 * math.pi / f
      if wavelen < old / hi:
        out.append(f)
      elif wavelen > old / lo:
        out.append(f / factor)
      else:
        s = (old / wavelen - lo) / (hi - lo)
        out.append((1 - s) * f / factor + s * f)
    inv = np.array(out)
  return inv


def reference_logits(family, cfg, t, tokens, layers=None):
  """Logits ``[B, T, V]`` of the Hugging Face model, in float64 NumPy."""
  t = {k: np.asarray(v, np.float64) for k, v in t.items()}
  gemma = family == "gemma3"
  d, n = cfg["hidden_size"], cfg["num_attention_heads"]
  kv, h = cfg["num_key_value_heads"], _head_dim(cfg)
  eps = cfg["rms_norm_eps"]
  b, length = tokens.shape
  pos = np.arange(length)

  def rms(x, w):
    y = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return y * (1.0 + w) if gemma else y * w

  def rope(x, inv):  # rotate_half
    ang = pos[:, None] * inv[None, :]  # [T, H/2]
    cos, sin = np.cos(ang)[None, :, None], np.sin(ang)[None, :, None]
    x1, x2 = x[..., :h // 2], x[..., h // 2:]
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)

  def act(x):
    if gemma:  # gelu_pytorch_tanh
      return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) *
                                    (x + 0.044715 * x ** 3)))
    return x / (1 + np.exp(-x))  # silu

  emb = t["model.embed_tokens.weight"]
  x = emb[tokens]
  if gemma:
    x = x * math.sqrt(d)
  layers = range(cfg["num_hidden_layers"]) if layers is None else layers
  for j, i in enumerate(layers):
    p = f"model.layers.{i}."
    w = lambda name, p=p: t[p + name]
    layer_type = cfg["layer_types"][j] if gemma else "full_attention"
    hid = rms(x, w("input_layernorm.weight"))
    q = (hid @ w("self_attn.q_proj.weight").T).reshape(b, length, n, h)
    k = (hid @ w("self_attn.k_proj.weight").T).reshape(b, length, kv, h)
    v = (hid @ w("self_attn.v_proj.weight").T).reshape(b, length, kv, h)
    if family != "llama3":
      q = rms(q, w("self_attn.q_norm.weight"))
      k = rms(k, w("self_attn.k_norm.weight"))
    inv = reference_inv_freq(family, cfg, layer_type)
    q, k = rope(q, inv), rope(k, inv)
    k, v = np.repeat(k, n // kv, axis=2), np.repeat(v, n // kv, axis=2)
    scale = (cfg["query_pre_attn_scalar"] if gemma else h) ** -0.5
    s = np.einsum("btnh,bsnh->bnts", q, k) * scale
    allowed = pos[None, :] <= pos[:, None]
    if layer_type == "sliding_attention":
      allowed &= pos[:, None] - pos[None, :] < cfg["sliding_window"]
    s = np.where(allowed, s, -np.inf)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    o = np.einsum("bnts,bsnh->btnh", s, v).reshape(b, length, n * h)
    o = o @ w("self_attn.o_proj.weight").T
    if gemma:
      x = x + rms(o, w("post_attention_layernorm.weight"))
      hid = rms(x, w("pre_feedforward_layernorm.weight"))
    else:
      x = x + o
      hid = rms(x, w("post_attention_layernorm.weight"))
    m = (act(hid @ w("mlp.gate_proj.weight").T) *
         (hid @ w("mlp.up_proj.weight").T)) @ w("mlp.down_proj.weight").T
    x = x + (rms(m, w("post_feedforward_layernorm.weight")) if gemma else m)
  x = rms(x, t["model.norm.weight"])
  return x @ t.get("lm_head.weight", emb).T


_FORWARDS = {}


def tunix_logits(model, tokens):
  """The Tunix model's own ``model(tokens, positions, None, causal mask)``,
  jitted once per architecture (Qwen3's and Gemma 3's configs are not
  hashable, so the graph's repr is the cache key)."""
  graphdef, state = nnx.split(model)
  key = repr(graphdef)
  if key not in _FORWARDS:
    @jax.jit
    def forward(state, tokens):
      b, length = tokens.shape
      positions = jnp.broadcast_to(jnp.arange(length), (b, length))
      mask = jnp.broadcast_to(jnp.tril(jnp.ones((length, length), bool)),
                              (b, length, length))
      logits, _ = nnx.merge(graphdef, state)(tokens, positions, None, mask)
      return logits
    _FORWARDS[key] = forward
  return np.asarray(_FORWARDS[key](state, jnp.asarray(tokens)), np.float64)


# ------------------------------ fixtures ----------------------------------


@pytest.fixture(scope="module")
def tokenizer():
  return train_tokenizer(120)


@pytest.fixture(scope="module")
def batch(tokenizer):
  lines = ["the student learns from the teacher at every position",
           "every other layer keeps the norms and the unembedding"]
  ids = [tokenizer.encode(s).ids[:10] for s in lines]
  assert min(map(len, ids)) >= 10
  return np.array([row[:10] for row in ids], np.int32)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, tokenizer):
  root = tmp_path_factory.mktemp("hf")
  return {family: write_checkpoint(root / family, family, tokenizer=tokenizer)
          for family in FAMILIES}


@pytest.fixture(scope="module")
def loaded(checkpoints):
  cache = {}

  def get(family):
    if family not in cache:
      cache[family] = lm.load_hf_checkpoint(checkpoints[family])
    return cache[family]
  return get


# ------------------------------ loading -----------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_match_numpy_reference(family, checkpoints, batch,
                                      monkeypatch, loaded):
  def no_network(*args, **kwargs):
    raise AssertionError(f"network access during loading: {args}")
  monkeypatch.setattr(socket.socket, "connect", no_network)
  monkeypatch.setattr(socket, "create_connection", no_network)
  ckpt = loaded(family)
  assert ckpt.family == family
  assert ckpt.tokenizer is not None
  assert ckpt.tokenizer.get_vocab() == train_tokenizer(120).get_vocab()
  assert ckpt.config.num_layers == CONFIGS[family]["num_hidden_layers"]
  tensors = load_file(os.path.join(checkpoints[family], "model.safetensors"))
  want = reference_logits(family, CONFIGS[family], tensors, batch)
  got = tunix_logits(ckpt.model, batch)
  assert got.shape == (2, 10, CONFIGS[family]["vocab_size"])
  assert np.abs(want).max() > 1.0  # not a degenerate model
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)


def test_rope_differs_from_tunix_default(batch, loaded):
  """The test above can fail: Tunix's own Llama3 attention (RoPE theta 1e6
  whatever the config says, no Llama 3 scaling) gives other logits."""
  from tunix.models.llama3 import model as llama
  ckpt = loaded("llama3")
  assert type(ckpt.model.layers[0].attn) is not llama.Attention
  plain = nnx.eval_shape(lambda: llama.Llama3(ckpt.config, rngs=nnx.Rngs(0)))
  assert type(plain.layers[0].attn) is llama.Attention
  plain = nnx.merge(nnx.graphdef(plain), nnx.state(ckpt.model))
  diff = np.abs(tunix_logits(plain, batch) - tunix_logits(ckpt.model, batch))
  assert diff.max() > 1e-2


def test_kdjax_tunix_adapter_keeps_checkpoint_rope(checkpoints, batch, loaded):
  ckpt = loaded("llama3")
  apply, variables = lm.make_tunix_lm_apply(ckpt.model, vocab_size=120)
  logits = jax.jit(apply)(variables, {"tokens": jnp.asarray(batch)}).logits
  tensors = load_file(os.path.join(checkpoints["llama3"], "model.safetensors"))
  want = reference_logits("llama3", CONFIGS["llama3"], tensors, batch)
  np.testing.assert_allclose(np.asarray(logits, np.float64), want[..., :120],
                             atol=2e-4, rtol=2e-4)


def test_gemma3_transformers4_config_gives_same_model(tmp_path):
  cfg = dict(CONFIGS["gemma3"])
  del cfg["rope_parameters"], cfg["layer_types"]
  cfg.update(rope_theta=1e6, rope_local_base_freq=1e4,
             rope_scaling={"rope_type": "linear", "factor": 2.0},
             sliding_window_pattern=6)
  assert (lm.tunix_config_from_hf(cfg)[1]
          == lm.tunix_config_from_hf(CONFIGS["gemma3"])[1])


def test_bfloat16_load(checkpoints):
  ckpt = lm.load_hf_checkpoint(checkpoints["qwen3"], dtype="bfloat16")
  assert ckpt.config.dtype == jnp.bfloat16
  tensors = load_file(os.path.join(checkpoints["qwen3"], "model.safetensors"))
  got = np.asarray(ckpt.model.layers[1].mlp.down_proj.kernel[...])
  assert got.dtype == jnp.bfloat16
  np.testing.assert_array_equal(
      got, tensors["model.layers.1.mlp.down_proj.weight"].T.astype(
          jnp.bfloat16))


def test_storage_variants(tmp_path):
  """bfloat16 files, mixed dtypes in one file, and a sharded checkpoint."""
  import ml_dtypes
  cfg = CONFIGS["llama3"]
  tensors = random_tensors("llama3", cfg)
  bf16 = {k: v.astype(ml_dtypes.bfloat16) for k, v in tensors.items()}
  mixed = {k: (v if "norm" in k else bf16[k]) for k, v in tensors.items()}
  shards = tmp_path / "sharded"
  write_checkpoint(shards, "llama3", tensors=tensors)
  os.remove(shards / "model.safetensors")
  names = sorted(tensors)
  weight_map = {}
  for i, part in enumerate((names[::2], names[1::2])):
    file = f"model-{i + 1:05d}-of-00002.safetensors"
    save_file({k: tensors[k] for k in part}, str(shards / file),
              metadata={"format": "pt"})
    weight_map.update({k: file for k in part})
  with open(shards / "model.safetensors.index.json", "w",
            encoding="utf-8") as f:
    json.dump({"weight_map": weight_map}, f)
  for name, variant, path in (
      ("bf16", bf16, write_checkpoint(tmp_path / "bf16", "llama3",
                                      tensors=bf16)),
      ("mixed", mixed, write_checkpoint(tmp_path / "mixed", "llama3",
                                        tensors=mixed)),
      ("sharded", tensors, str(shards))):
    model = lm.load_hf_checkpoint(path).model
    layer = model.layers[3]
    for got, hf in ((layer.mlp.down_proj.kernel[...],
                     "model.layers.3.mlp.down_proj.weight"),
                    (layer.input_layernorm.w[...],
                     "model.layers.3.input_layernorm.weight"),
                    (model.lm_head.w[...], "lm_head.weight")):
      got, want = np.asarray(got), variant[hf]
      assert got.dtype == want.dtype, (name, hf)
      np.testing.assert_array_equal(got, want.T if got.ndim == 2 else want,
                                    err_msg=f"{name} {hf}")


def test_multimodal_gemma3_text_part(tmp_path):
  text = dict(CONFIGS["gemma3"])
  cfg = {"model_type": "gemma3",
         "architectures": ["Gemma3ForConditionalGeneration"],
         "text_config": text, "vision_config": {"model_type": "siglip"}}
  tensors = {"language_model." + k: v
             for k, v in random_tensors("gemma3", text).items()}
  tensors["vision_tower.vision_model.post_layernorm.weight"] = np.ones(
      8, np.float32)
  ckpt = lm.load_hf_checkpoint(write_checkpoint(tmp_path, "gemma3", cfg,
                                                tensors))
  assert ckpt.family == "gemma3" and ckpt.config.num_layers == 6
  np.testing.assert_array_equal(
      np.asarray(ckpt.model.embedder.input_embedding[...]),
      tensors["language_model.model.embed_tokens.weight"])
  saved = lm.save_hf_checkpoint(tmp_path / "out", "gemma3", ckpt.model,
                                hf_config=ckpt.hf_config)
  with open(os.path.join(saved, "config.json"), encoding="utf-8") as f:
    assert json.load(f)["model_type"] == "gemma3_text"
  tensors["model.language_model.layers.0.mlp.up_proj.weight"] = np.ones(
      (64, 32), np.float32)
  with pytest.raises(ValueError, match=r"model\.language_model\.\*"):
    lm.load_hf_checkpoint(write_checkpoint(tmp_path / "new", "gemma3", cfg,
                                           tensors))


# ------------------------------ export ------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_save_round_trip(family, checkpoints, batch, tmp_path, loaded):
  ckpt = loaded(family)
  out = lm.save_hf_checkpoint(tmp_path / "out", family, ckpt.model,
                              hf_config=ckpt.hf_config,
                              tokenizer=ckpt.tokenizer)
  original = load_file(os.path.join(checkpoints[family], "model.safetensors"))
  saved = load_file(os.path.join(out, "model.safetensors"))
  assert sorted(saved) == sorted(original)
  for name, value in original.items():
    np.testing.assert_array_equal(saved[name], value, err_msg=name)
  with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
    cfg = json.load(f)
  for key, value in CONFIGS[family].items():
    if key not in ("dtype", "torch_dtype", "sliding_window", "head_dim"):
      assert cfg[key] == value, key
  again = lm.load_hf_checkpoint(out, require_tokenizer=True)
  assert again.tokenizer.to_str() == ckpt.tokenizer.to_str()
  np.testing.assert_array_equal(tunix_logits(again.model, batch),
                                tunix_logits(ckpt.model, batch))


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_config_reads_in_transformers(family, tmp_path, loaded):
  transformers = pytest.importorskip("transformers")
  ckpt = loaded(family)
  out = lm.save_hf_checkpoint(tmp_path / "out", family, ckpt.model,
                              hf_config=ckpt.hf_config)
  cfg = transformers.AutoConfig.from_pretrained(out, local_files_only=True)
  assert cfg.model_type == CONFIGS[family]["model_type"]
  assert cfg.num_hidden_layers == CONFIGS[family]["num_hidden_layers"]
  assert cfg.hidden_size == CONFIGS[family]["hidden_size"]


def test_student_keeps_every_other_layer(checkpoints, batch, tmp_path, loaded):
  teacher = loaded("llama3")
  student = lm.student_from_teacher(teacher, keep_layers="every_other")
  assert student.config.num_layers == 2
  tensors = load_file(os.path.join(checkpoints["llama3"], "model.safetensors"))
  want = reference_logits("llama3", CONFIGS["llama3"], tensors, batch,
                          layers=[0, 2])
  np.testing.assert_allclose(tunix_logits(student, batch), want, atol=2e-4,
                             rtol=2e-4)
  # Copies, not the teacher's buffers.
  assert (student.layers[1].attn.q_proj.w[...] is not
          teacher.model.layers[2].attn.q_proj.w[...])
  out = lm.save_hf_checkpoint(tmp_path / "student", "llama3", student,
                              hf_config=teacher.hf_config,
                              tokenizer=teacher.tokenizer)
  with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
    assert json.load(f)["num_hidden_layers"] == 2
  saved = load_file(os.path.join(out, "model.safetensors"))
  np.testing.assert_array_equal(
      saved["model.layers.1.mlp.down_proj.weight"],
      tensors["model.layers.2.mlp.down_proj.weight"])
  again = lm.load_hf_checkpoint(out)
  np.testing.assert_allclose(tunix_logits(again.model, batch), want,
                             atol=2e-4, rtol=2e-4)


def test_student_layer_list_and_gemma_pattern(loaded):
  student = lm.student_from_teacher(loaded("qwen3"), "qwen3", keep_layers=[1])
  assert student.config.num_layers == 1
  np.testing.assert_array_equal(
      student.layers[0].mlp.up_proj.kernel[...],
      loaded("qwen3").model.layers[1].mlp.up_proj.kernel[...])
  with pytest.raises(ValueError, match="strictly increasing"):
    lm.student_from_teacher(loaded("qwen3"), keep_layers=[1, 0])
  with pytest.raises(ValueError, match="out of range"):
    lm.student_from_teacher(loaded("qwen3"), keep_layers=[0, 2])
  with pytest.raises(ValueError, match="is a qwen3 model"):
    lm.student_from_teacher(loaded("qwen3"), "llama3")
  gemma = loaded("gemma3")
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    lm.student_from_teacher(gemma)  # layers 0, 2, 4 stay sliding-window
  assert not [w for w in caught if "attention type" in str(w.message)]
  with pytest.warns(UserWarning, match=r"student layers \[1\].*teacher "
                    r"layers \[5\]"):
    lm.student_from_teacher(loaded("gemma3"), keep_layers=[0, 5])


# ------------------------------ errors ------------------------------------


def test_hidden_size_contradicts_tensors(tmp_path):
  cfg = dict(CONFIGS["llama3"], hidden_size=64)
  tensors = random_tensors("llama3", CONFIGS["llama3"])
  path = write_checkpoint(tmp_path, "llama3", cfg, tensors)
  with pytest.raises(ValueError, match=r"model\.embed_tokens\.weight has shape "
                     r"\(130, 48\) but config\.json implies \(130, 64\) "
                     r"\(vocab_size, hidden_size\)"):
    lm.load_hf_checkpoint(path)


def test_missing_and_extra_tensors_named(tmp_path):
  tensors = random_tensors("qwen3", CONFIGS["qwen3"])
  del tensors["model.layers.1.mlp.up_proj.weight"]
  path = write_checkpoint(tmp_path / "missing", "qwen3", tensors=tensors)
  with pytest.raises(ValueError, match=r"missing from the safetensors files: "
                     r"model\.layers\.1\.mlp\.up_proj\.weight"):
    lm.load_hf_checkpoint(path)
  tensors = random_tensors("qwen3", CONFIGS["qwen3"])
  tensors["model.layers.2.self_attn.q_proj.weight"] = np.zeros((64, 32),
                                                               np.float32)
  path = write_checkpoint(tmp_path / "extra", "qwen3", tensors=tensors)
  with pytest.raises(ValueError, match=r"does not describe: model\.layers\.2\."
                     r"self_attn\.q_proj\.weight \(config\.json has "
                     r"num_hidden_layers=2\)"):
    lm.load_hf_checkpoint(path)


def test_tied_head_that_differs(tmp_path):
  tensors = random_tensors("qwen3", CONFIGS["qwen3"])
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1
  path = write_checkpoint(tmp_path, "qwen3", tensors=tensors)
  with pytest.raises(ValueError, match="lm_head.weight differs"):
    lm.load_hf_checkpoint(path)


def test_tokenizer_larger_than_vocabulary(tmp_path):
  big = train_tokenizer(200)
  assert _tokenizer.tokenizer_vocab_size(big) > CONFIGS["llama3"]["vocab_size"]
  path = write_checkpoint(tmp_path, "llama3", tokenizer=big)
  with pytest.raises(ValueError, match=r"tokenizer has \d+ token ids .* "
                     r"vocabulary of 130"):
    lm.load_hf_checkpoint(path)
  with pytest.raises(ValueError, match="vocabulary of 100"):
    lm.check_tokenizer_fits(big, 100)
  lm.check_tokenizer_fits(big, _tokenizer.tokenizer_vocab_size(big))


def test_different_tokenizers_point_to_uld(tokenizer):
  lm.check_same_tokenizer(tokenizer, train_tokenizer(120))
  with pytest.raises(ValueError, match=r"different tokenizers.*"
                     r"kdjax\.lm\.make_uld_loss"):
    lm.check_same_tokenizer(tokenizer, train_tokenizer(100))
  other = train_tokenizer(120)
  other.normalizer = tokenizers.normalizers.Lowercase()
  with pytest.raises(ValueError, match=r"differ in their normalizer.*"
                     r"make_uld_loss"):
    lm.check_same_tokenizer(tokenizer, other)
  assert hasattr(lm, "make_uld_loss")


def test_missing_files_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    lm.load_hf_checkpoint(tmp_path / "nowhere")
  path = write_checkpoint(tmp_path / "ckpt", "llama3")
  os.rename(os.path.join(path, "model.safetensors"),
            os.path.join(path, "weights.bin"))
  with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors file "
                     r"\(e\.g\. model\.safetensors\)"):
    lm.load_hf_checkpoint(path)
  os.remove(os.path.join(path, "config.json"))
  with pytest.raises(FileNotFoundError, match=r"config\.json is missing"):
    lm.load_hf_checkpoint(path)
  path = write_checkpoint(tmp_path / "notok", "llama3")
  with pytest.raises(FileNotFoundError, match=r"tokenizer\.json is missing"):
    lm.load_hf_checkpoint(path, require_tokenizer=True)
  with open(os.path.join(path, "model.safetensors.index.json"), "w",
            encoding="utf-8") as f:
    json.dump({"weight_map": {"a": "model-00002-of-00002.safetensors"}}, f)
  with pytest.raises(FileNotFoundError, match="model-00002-of-00002"):
    lm.load_hf_checkpoint(path)


def test_unsupported_configs_named():
  with pytest.raises(ValueError, match="model_type='mistral'"):
    lm.tunix_config_from_hf({"model_type": "mistral",
                             "architectures": ["MistralForCausalLM"]})
  with pytest.raises(ValueError, match="attention_bias=True"):
    lm.tunix_config_from_hf(dict(CONFIGS["llama3"], attention_bias=True))
  with pytest.raises(ValueError, match="rope_type 'yarn'"):
    lm.tunix_config_from_hf(dict(CONFIGS["llama3"], rope_scaling={
        "rope_type": "yarn", "factor": 4.0}))
  with pytest.raises(ValueError, match="final_logit_softcapping=30.0"):
    lm.tunix_config_from_hf(dict(CONFIGS["gemma3"],
                                 final_logit_softcapping=30.0))
  with pytest.raises(ValueError, match="lacks 'hidden_size'"):
    cfg = dict(CONFIGS["qwen3"])
    del cfg["hidden_size"]
    lm.tunix_config_from_hf(cfg)
