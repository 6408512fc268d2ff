"""Large-vocabulary LM distillation: memory-lean (chunked) losses vs full logits.

Two sections, one table each per vocabulary (32000 and 128256):

1. **Train step.** The token-KD step of ``bench_lm_step.py`` (teacher 24 x
   1024, student 12 x 768, sequence 1024, batch 16 = 16384 tokens, bfloat16
   compute via ``kdjax.train.Policy.bf16()``, float32 master weights, AdamW,
   forward KL ``T^2 mean_t KL(p_t || q_t)`` over every token) with

   * ``plain``: ``kdjax.lm.token_kd_term`` on full ``[B, T, V]`` logits;
   * ``hand-written``: the same step written with flax + optax (full logits);
   * ``lean fused``: ``kdjax.lm.lean_token_kd_term(implementation="fused")``
     with apply functions from ``make_lm_apply(..., compute_logits=False)``
     (hidden states + unembedding, logits formed chunk by chunk, the gradient
     computed in the forward pass);
   * ``lean checkpointed``: the same with ``implementation="checkpointed"``
     (``jax.checkpoint`` per chunk, chunk logits recomputed in the backward);
   Under ``Policy.bf16()`` the lean features (hidden states, unembedding)
   reach the loss in bfloat16 (``Policy.cast_output`` keeps them in the
   compute dtype), so its four ``[C, D] x [D, V]`` matmuls run in bfloat16
   with float32 accumulation, like the plain step's.

   All kdjax variants share one ``DistillState`` (same pytree), so only two
   optimizer states are alive at a time.

2. **Loss only.** ``value_and_grad`` of ``kdjax.losses.divergence_from_hidden``
   (forward KL) w.r.t. the student's ``(hidden, kernel, bias)`` for
   ``implementation="plain"`` / ``"checkpointed"`` / ``"fused"`` at several
   chunk sizes (and the ``choose_chunk_size`` default), in bfloat16 and float32
   inputs: the design choice in isolation. 16384 tokens, ``D_s = 768``,
   ``D_t = 1024`` (``--small``: 1024 tokens, ``D = 64``).

Each row reports ms (median over interleaved rounds: every round times
``--steps`` consecutive calls of every variant, in a rotated order, with one
``block_until_ready`` at the end; metrics stay on the device), the compiled
function's ``memory_analysis().temp_size_in_bytes``, and the ratios vs plain:
``mem`` = plain temp / variant temp (how many times less), ``time`` = variant
ms / plain ms. Targets (the GPU size, vocab 128256, lean fused vs plain):
>= 3x less temp memory at <= 1.10x the time. A variant that fails to run (out
of memory) is reported as such; its temp bytes still come from the compiler.

Usage::

  python benchmarks/bench_large_vocab.py              # GPU sizes
  python benchmarks/bench_large_vocab.py --small      # CPU sizes (a few minutes)
  python benchmarks/bench_large_vocab.py --small --section loss
  python benchmarks/bench_lm_step.py --large_vocab    # LM step table, then these

``--small``: student 1 x 64, teacher 2 x 128, 4 x 256 = 1024 tokens (the
logits dominate memory), lean chunks of 256 tokens; loss-only 1024 tokens,
``D = 64`` (the chunk sizes are capped at the token count). The script prints the JAX backend; a CPU number is a CPU number,
not a GPU one.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kdjax import lm  # noqa: E402
from kdjax import losses  # noqa: E402
from kdjax import train  # noqa: E402

import bench_lm_step  # noqa: E402

VOCABS = (32000, 128256)
TARGET_VOCAB = 128256
TARGET_MEMORY_RATIO = 3.0
TARGET_TIME_RATIO = 1.10
MIB = 2**20


def _first_line(error: BaseException) -> str:
  text = f"{type(error).__name__}: {error}".strip().splitlines()
  return text[0][:100] if text else type(error).__name__


def _ratio_columns(temp: Optional[int], ms: Optional[float],
                   plain_temp: Optional[int], plain_ms: Optional[float]) -> str:
  mem = (f"{plain_temp / temp:>7.2f}x" if temp and plain_temp else f"{'n/a':>8}")
  tim = (f"{ms / plain_ms:>7.3f}x" if ms and plain_ms else f"{'n/a':>8}")
  return f"{mem}{tim}"


def _target_line(name: str, temp: dict, ms: dict, backend: str) -> str:
  plain_temp, plain_ms = temp.get("plain"), ms.get("plain")
  if not (temp.get(name) and plain_temp):
    return f"target ({name} vs plain): n/a"
  mem = plain_temp / temp[name]
  parts = [f"{mem:.2f}x less temp memory (target >= {TARGET_MEMORY_RATIO:.0f}x: "
           f"{'met' if mem >= TARGET_MEMORY_RATIO else 'NOT met'})"]
  if ms.get(name) and plain_ms:
    ratio = ms[name] / plain_ms
    parts.append(f"{ratio:.3f}x the time (target <= {TARGET_TIME_RATIO:.2f}x: "
                 f"{'met' if ratio <= TARGET_TIME_RATIO else 'NOT met'})")
  else:
    parts.append("time ratio n/a (a variant did not run)")
  note = "" if backend != "cpu" else " [CPU run: the targets are for the GPU size]"
  return f"target ({name} vs plain): " + "; ".join(parts) + note


# -----------------------------------------------------------------------------
# Section 1: the train step.
# -----------------------------------------------------------------------------


STEP_VARIANTS = ("plain", "hand-written", "lean fused", "lean checkpointed")


def step_table(vocab: int, t_shape: dict, s_shape: dict, batch_size: int,
               seq: int, chunk_size: Optional[int], steps: int,
               repeats: int, variants=STEP_VARIANTS) -> dict:
  """One vocabulary's train-step table (the ``variants`` interleaved).

  Prints the table and returns ``{"vocab", "chunk", "tokens_per_step",
  "ms": {variant: median ms/step}, "temp": {variant: temp bytes},
  "loss": {variant: loss at init}, "failed": {variant: reason}}``.
  """
  backend = jax.default_backend()
  tokens_per_step = batch_size * seq
  optimizer = optax.adamw(1e-4, weight_decay=0.01)
  temperature = 1.0
  t_cfg = lm.TransformerConfig(vocab_size=vocab, max_len=seq, **t_shape)
  s_cfg = lm.TransformerConfig(vocab_size=vocab, max_len=seq, **s_shape)
  chunk = chunk_size or losses.choose_chunk_size(tokens_per_step, vocab)
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, (batch_size, seq)).astype(np.int32)
  batch = {"tokens": jnp.asarray(tokens),
           "targets": jnp.asarray(np.roll(tokens, -1, 1)),
           "loss_mask": jnp.ones((batch_size, seq), jnp.float32)}
  teacher = lm.init_lm(t_cfg, jax.random.key(1), seq_len=seq)
  student0 = lm.init_lm(s_cfg, jax.random.key(0), seq_len=seq)

  def fresh_state():
    return train.create_state(jax.tree.map(jnp.copy, student0), optimizer,
                              rng=jax.random.key(2))

  def kd_step(term, lean: bool, policy):
    s_apply = lm.make_lm_apply(s_cfg, compute_logits=not lean)
    t_apply = lm.make_lm_apply(t_cfg, compute_logits=not lean)
    loss_fn = losses.compose([losses.Term("kd", term)],
                             temperature=temperature)
    return lm.make_lm_train_step(s_apply, t_apply, loss_fn, optimizer,
                                 policy=policy)

  lean_term = lambda impl: lm.lean_token_kd_term(
      "kl", implementation=impl, chunk_size=chunk)
  kd_builders = {
      "plain": lambda: kd_step(lm.token_kd_term("kl"), False,
                               train.Policy.bf16()),
      "lean fused": lambda: kd_step(lean_term("fused"), True,
                                    train.Policy.bf16()),
      "lean checkpointed": lambda: kd_step(lean_term("checkpointed"), True,
                                           train.Policy.bf16()),
  }
  kd_variants = {name: build() for name, build in kd_builders.items()
                 if name in variants}
  hand_jit = jax.jit(
      bench_lm_step.make_hand_written_step(
          lm.make_lm_apply(s_cfg).module, lm.make_lm_apply(t_cfg).module,
          optimizer, temperature), donate_argnums=(0, 1))

  # Compile once (the compiled executables are what is timed).
  state = fresh_state()
  compiled, temp, failed, loss0 = {}, {}, {}, {}
  for name, step in kd_variants.items():
    try:
      compiled[name] = step.lower(state, teacher, batch).compile()
      temp[name] = compiled[name].memory_analysis().temp_size_in_bytes
    except Exception as e:  # pylint: disable=broad-except
      failed[name] = "compile: " + _first_line(e)
  hand_params = hand_opt = None
  if "hand-written" in variants:
    hand_params = jax.tree.map(jnp.copy, student0)
    hand_opt = optimizer.init(hand_params)
    try:
      compiled["hand-written"] = hand_jit.lower(hand_params, hand_opt,
                                                teacher, batch).compile()
      temp["hand-written"] = (compiled["hand-written"].memory_analysis()
                              .temp_size_in_bytes)
    except Exception as e:  # pylint: disable=broad-except
      failed["hand-written"] = "compile: " + _first_line(e)

  # First call of each from the same initial state: its loss (a check that
  # every variant computes the same thing) and the warm-up.
  for name in list(compiled):
    try:
      if name == "hand-written":
        p, o, loss0[name] = compiled[name](jax.tree.map(jnp.copy, student0),
                                           optimizer.init(student0), teacher,
                                           batch)
        jax.block_until_ready(loss0[name])
        del p, o
      else:
        out, m = compiled[name](fresh_state(), teacher, batch)
        loss0[name] = m["loss"]
        jax.block_until_ready(loss0[name])
        del out
    except Exception as e:  # pylint: disable=broad-except
      failed[name] = "run: " + _first_line(e)
      compiled.pop(name)
      loss0.pop(name, None)

  holder = {"kd": state, "hand": (hand_params, hand_opt)}

  def make_runner(name):
    if name == "hand-written":
      def run_hand():
        p, o = holder["hand"]
        p, o, loss = compiled[name](p, o, teacher, batch)
        holder["hand"] = (p, o)
        return loss
      return run_hand

    def run_kd():
      holder["kd"], m = compiled[name](holder["kd"], teacher, batch)
      return m["loss"]
    return run_kd

  runners = {name: make_runner(name) for name in compiled}
  for fn in runners.values():  # second warm-up, on the shared states
    jax.block_until_ready(fn())
  ms = bench_lm_step.interleaved_ms(runners, steps, repeats) if runners else {}

  print(f"\nvocab {vocab}: lean chunk {chunk} tokens "
        f"({-(-tokens_per_step // chunk)} chunks)"
        + ("" if chunk_size else " [choose_chunk_size default]"))
  print(f"{'variant':<22}{'ms/step':>10}{'tokens/s':>11}{'temp MiB':>11}"
        f"{'mem':>8}{'time':>8}{'loss@init':>11}")
  order = [name for name in STEP_VARIANTS if name in variants]
  for name in order:
    t = temp.get(name)
    t_str = f"{t / MIB:>11.1f}" if t is not None else f"{'n/a':>11}"
    if name in ms:
      line = (f"{name:<22}{ms[name]:>10.1f}"
              f"{tokens_per_step / ms[name] * 1e3:>11.0f}{t_str}"
              f"{_ratio_columns(t, ms[name], temp.get('plain'), ms.get('plain'))}"
              f"{float(loss0[name]):>11.5f}")
    else:
      line = (f"{name:<22}{'-':>10}{'-':>11}{t_str}"
              f"{_ratio_columns(t, None, temp.get('plain'), None)}"
              f"{'-':>11}  {failed.get(name, '')}")
    print(line)
  print("(mem = plain temp / variant temp; time = variant ms / plain ms)")
  if vocab == TARGET_VOCAB and "lean fused" in variants:
    print(_target_line("lean fused", temp, ms, backend))
  return {"vocab": vocab, "chunk": chunk, "tokens_per_step": tokens_per_step,
          "ms": ms, "temp": temp,
          "loss": {name: float(v) for name, v in loss0.items()},
          "failed": failed}


def step_section(small: bool, steps: int, repeats: int,
                 chunk_size: Optional[int], vocabs=VOCABS) -> None:
  """Times and measures the token-KD train step at each vocabulary."""
  if small:
    t_shape, s_shape = dict(num_layers=2, num_heads=4, d_model=128), dict(
        num_layers=1, num_heads=2, d_model=64)
    batch_size, seq = 4, 256
    chunk_size = chunk_size or 256
  else:
    t_shape, s_shape = dict(num_layers=24, num_heads=16, d_model=1024), dict(
        num_layers=12, num_heads=12, d_model=768)
    batch_size, seq = 16, 1024
  backend = jax.default_backend()
  tokens_per_step = batch_size * seq
  print(f"\n== train step: teacher {t_shape['num_layers']}x{t_shape['d_model']}, "
        f"student {s_shape['num_layers']}x{s_shape['d_model']}, seq {seq}, "
        f"batch {batch_size} ({tokens_per_step} tokens), bf16 compute, "
        f"AdamW, forward KL; backend {backend} ==")

  for vocab in vocabs:
    step_table(vocab, t_shape, s_shape, batch_size, seq, chunk_size, steps,
               repeats)


# -----------------------------------------------------------------------------
# Section 2: the loss alone.
# -----------------------------------------------------------------------------


def _loss_table(vocab: int, dtype_name: str, n: int, d_s: int, d_t: int,
                chunk_sizes, steps: int, repeats: int) -> None:
  """One (vocabulary, dtype) loss-only table."""
  dtype = jnp.dtype(dtype_name)
  keys = jax.random.split(jax.random.key(vocab), 6)
  h_s = jax.random.normal(keys[0], (n, d_s), jnp.float32).astype(dtype)
  w_s = (jax.random.normal(keys[1], (d_s, vocab), jnp.float32)
         / np.sqrt(d_s)).astype(dtype)
  b_s = (0.1 * jax.random.normal(keys[2], (vocab,))).astype(dtype)
  h_t = jax.random.normal(keys[3], (n, d_t), jnp.float32).astype(dtype)
  w_t = (2.0 * jax.random.normal(keys[4], (d_t, vocab), jnp.float32)
         / np.sqrt(d_t)).astype(dtype)
  b_t = (0.1 * jax.random.normal(keys[5], (vocab,))).astype(dtype)
  args = (h_s, w_s, b_s, h_t, w_t, b_t)
  default_chunk = losses.choose_chunk_size(n, vocab)
  configs = [("plain", None)]
  sizes = sorted({min(c, n) for c in chunk_sizes} | {default_chunk})
  for impl in ("checkpointed", "fused"):
    configs += [(impl, c) for c in sizes]

  def make(impl, chunk):
    def loss(h, w, b, ht, wt, bt):
      return losses.divergence_from_hidden(
          h, losses.Unembedding(w, b), ht, losses.Unembedding(wt, bt), 1.0,
          divergence="kl", chunk_size=chunk, implementation=impl)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))

  compiled, temp, failed, value = {}, {}, {}, {}
  for impl, chunk in configs:
    key = (impl, chunk)
    try:
      compiled[key] = make(impl, chunk).lower(*args).compile()
      temp[key] = compiled[key].memory_analysis().temp_size_in_bytes
      out = compiled[key](*args)  # warm-up
      jax.block_until_ready(out)
      value[key] = out[0]
      del out
    except Exception as e:  # pylint: disable=broad-except
      failed[key] = _first_line(e)
      compiled.pop(key, None)
  runners = {key: (lambda f=f: f(*args)) for key, f in compiled.items()}
  ms = bench_lm_step.interleaved_ms(runners, steps, repeats) if runners else {}
  plain = ("plain", None)
  print(f"\nvocab {vocab}, {dtype_name} inputs (choose_chunk_size default: "
        f"{default_chunk})")
  print(f"{'implementation':<16}{'chunk':>7}{'chunks':>8}{'temp MiB':>11}"
        f"{'mem':>8}{'ms':>10}{'time':>8}{'|dL| vs plain':>15}")
  for key in configs:
    impl, chunk = key
    c_str = "-" if chunk is None else (f"{chunk}*" if chunk == default_chunk
                                       else str(chunk))
    n_chunks = "-" if chunk is None else str(-(-n // chunk))
    t = temp.get(key)
    t_str = f"{t / MIB:>11.1f}" if t is not None else f"{'n/a':>11}"
    mem = (f"{temp[plain] / t:>7.2f}x" if t and temp.get(plain)
           else f"{'n/a':>8}")
    if key in ms:
      tim = (f"{ms[key] / ms[plain]:>7.3f}x" if plain in ms
             else f"{'n/a':>8}")
      diff = (f"{abs(float(value[key]) - float(value[plain])):>15.2e}"
              if plain in value else f"{'n/a':>15}")
      print(f"{impl:<16}{c_str:>7}{n_chunks:>8}{t_str}{mem}{ms[key]:>10.1f}"
            f"{tim}{diff}")
    else:
      print(f"{impl:<16}{c_str:>7}{n_chunks:>8}{t_str}{mem}{'-':>10}"
            f"{'-':>8}{'-':>15}  {failed.get(key, '')}")
  print("(* = choose_chunk_size default; mem = plain temp / temp; "
        "time = ms / plain ms)")


def loss_section(small: bool, steps: int, repeats: int,
                 vocabs=VOCABS, dtypes=("bfloat16", "float32"),
                 chunk_sizes=(128, 512, 2048)) -> None:
  """``value_and_grad`` of the hidden-state KL: plain vs checkpointed vs fused."""
  if small:
    n, d_s, d_t = 1024, 64, 64
  else:
    n, d_s, d_t = 16384, 768, 1024
  backend = jax.default_backend()
  print(f"\n== loss only: value_and_grad of divergence_from_hidden (KL) w.r.t. "
        f"(h_s, W_s, b_s); {n} tokens, D_s {d_s}, D_t {d_t}; backend "
        f"{backend} ==")
  for vocab in vocabs:
    for dtype_name in dtypes:
      _loss_table(vocab, dtype_name, n, d_s, d_t, chunk_sizes, steps,
                  repeats)


def run(small: bool, section: str = "all", steps: Optional[int] = None,
        repeats: Optional[int] = None, chunk_size: Optional[int] = None,
        vocabs=VOCABS) -> None:
  """Runs the selected sections (what ``bench_lm_step.py --large_vocab`` calls)."""
  backend = jax.default_backend()
  print(f"backend: {backend} ({jax.devices()[0].device_kind})")
  if backend == "cpu":
    print("NOTE: CPU run. These are CPU timings, not GPU numbers.")
  steps = steps or (1 if small else 5)
  repeats = repeats or (3 if small else 5)
  if section in ("all", "step"):
    step_section(small, steps, repeats, chunk_size, vocabs)
  if section in ("all", "loss"):
    loss_section(small, steps, repeats, vocabs)
  print(f"\n(backend: {backend})")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--small", action="store_true",
                      help="CPU sizes (student 1x64, teacher 2x128, 1024 "
                           "tokens; loss-only 1024 tokens, D=64).")
  parser.add_argument("--section", choices=("all", "step", "loss"),
                      default="all")
  parser.add_argument("--steps", type=int, default=None,
                      help="calls per variant per round (1 small, 5 GPU).")
  parser.add_argument("--repeats", type=int, default=None,
                      help="interleaved rounds (3 small, 5 GPU).")
  parser.add_argument("--chunk_size", type=int, default=None,
                      help="lean step chunk (tokens); default 256 with "
                           "--small, else choose_chunk_size.")
  parser.add_argument("--vocabs", type=int, nargs="+", default=list(VOCABS))
  args = parser.parse_args()
  run(args.small, args.section, args.steps, args.repeats, args.chunk_size,
      tuple(args.vocabs))


if __name__ == "__main__":
  main()
