"""Load / export times of a full-size Hugging Face checkpoint (random weights).

Writes a random ``model.safetensors`` with the real ``config.json`` of
Qwen3-0.6B or Llama-3.2-1B (optionally fewer layers) in bfloat16 with
``safetensors.numpy``, then times ``kdjax.lm.load_hf_checkpoint`` (Tunix's
loader after kdjax's checks), one jitted forward pass, ``save_hf_checkpoint``
and the reload, checks that the exported tensors equal the written ones bit
for bit and that the reloaded model's logits equal the first's, and prints
the process's peak resident memory after each step (the checkpoint is
written by a child process, so the numbers are the loading process's own)::

  python benchmarks/bench_hf_checkpoint.py --family qwen3
  python benchmarks/bench_hf_checkpoint.py --family llama3 --layers 4
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

CONFIGS = {
    # huggingface.co/Qwen/Qwen3-0.6B/blob/main/config.json
    "qwen3": {
        "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3",
        "vocab_size": 151936, "hidden_size": 1024, "intermediate_size": 3072,
        "num_hidden_layers": 28, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 128, "hidden_act": "silu",
        "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000, "rope_scaling": None,
        "tie_word_embeddings": True, "attention_bias": False,
        "use_sliding_window": False, "sliding_window": None,
        "bos_token_id": 151643, "eos_token_id": 151645,
        "torch_dtype": "bfloat16"},
    # huggingface.co/meta-llama/Llama-3.2-1B/blob/main/config.json
    "llama3": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32,
        "num_key_value_heads": 8, "head_dim": 64, "hidden_act": "silu",
        "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0,
                         "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192,
                         "rope_type": "llama3"},
        "tie_word_embeddings": True, "attention_bias": False,
        "mlp_bias": False, "bos_token_id": 128000, "eos_token_id": 128001,
        "torch_dtype": "bfloat16"},
}


def random_checkpoint(path, family, cfg, seed=0):
  """Random bfloat16 tensors under the names config.json implies."""
  import ml_dtypes
  from safetensors.numpy import save_file
  from kdjax.lm import _hf_config
  from kdjax.lm import _hf_tensors
  _, config = _hf_config.tunix_config_from_hf(cfg)
  rng = np.random.default_rng(seed)
  tensors = {}
  for name, (shape, _) in _hf_tensors._expected_tensors(family,
                                                        config).items():
    if len(shape) == 1:
      value = 1.0 + 0.1 * rng.standard_normal(shape, np.float32)
    else:
      value = rng.standard_normal(shape, np.float32) / np.sqrt(shape[-1])
    tensors[name] = value.astype(ml_dtypes.bfloat16)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as f:
    json.dump(cfg, f)
  save_file(tensors, os.path.join(path, "model.safetensors"),
            metadata={"format": "pt"})
  return tensors


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--family", choices=sorted(CONFIGS), default="qwen3")
  parser.add_argument("--layers", type=int, default=None,
                      help="num_hidden_layers (default: the model's)")
  parser.add_argument("--seq", type=int, default=64)
  parser.add_argument("--write-to", default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  cfg = dict(CONFIGS[args.family])
  if args.layers:
    cfg["num_hidden_layers"] = args.layers
  if args.write_to:  # the child process
    written = random_checkpoint(args.write_to, args.family, cfg)
    print(sum(v.size for v in written.values()))
    return
  import jax
  import jax.numpy as jnp
  from flax import nnx
  from safetensors.numpy import load_file
  from kdjax import lm

  tmp = tempfile.mkdtemp(prefix="kdjax_hf_bench_")
  src, dst = os.path.join(tmp, "src"), os.path.join(tmp, "dst")
  t = time.perf_counter()
  child = subprocess.run(
      [sys.executable, __file__, "--family", args.family, "--layers",
       str(cfg["num_hidden_layers"]), "--write-to", src],
      check=True, capture_output=True, text=True)
  n_params = int(child.stdout.split()[-1])
  size = os.path.getsize(os.path.join(src, "model.safetensors"))
  print(f"{args.family}: {cfg['num_hidden_layers']} layers, "
        f"{n_params / 1e6:.0f}M params, {size / 2**30:.2f} GiB bf16; written "
        f"in {time.perf_counter() - t:.1f} s (child process)")

  def timed(label, fn):
    t = time.perf_counter()
    out = fn()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    print(f"  {label}: {time.perf_counter() - t:.2f} s (peak RSS so far "
          f"{peak:.2f} GiB)")
    return out

  ckpt = timed("load_hf_checkpoint", lambda: lm.load_hf_checkpoint(src))
  tokens = jnp.asarray(np.random.default_rng(1).integers(
      0, cfg["vocab_size"], (1, args.seq)), jnp.int32)

  @jax.jit
  def forward(state, tokens, graphdef=nnx.graphdef(ckpt.model)):
    positions = jnp.arange(tokens.shape[1])[None]
    mask = jnp.tril(jnp.ones((tokens.shape[1],) * 2, bool))[None]
    return nnx.merge(graphdef, state)(tokens, positions, None, mask)[0]

  state = nnx.state(ckpt.model)
  first = timed(f"first forward [1, {args.seq}] (compile + run)",
                lambda: np.asarray(forward(state, tokens)))
  timed("second forward", lambda: np.asarray(forward(state, tokens)))
  timed("save_hf_checkpoint", lambda: lm.save_hf_checkpoint(
      dst, ckpt.family, ckpt.model, hf_config=ckpt.hf_config))
  again = timed("reload", lambda: lm.load_hf_checkpoint(dst))
  a, b = (load_file(os.path.join(d, "model.safetensors")) for d in (src, dst))
  same = sorted(a) == sorted(b) and all(
      np.array_equal(a[k].view(np.uint16), b[k].view(np.uint16)) for k in a)
  print(f"  exported tensors equal the written ones bit for bit: {same}")
  logits = np.asarray(forward(nnx.state(again.model), tokens))
  print(f"  reloaded logits equal: {np.array_equal(logits, first)}")


if __name__ == "__main__":
  main()
