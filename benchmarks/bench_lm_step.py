"""Token-level LM distillation step: kdjax vs the same step hand-written with flax + optax.

Both steps run the same ``kdjax.lm.DecoderLM`` teacher and student, bfloat16
compute with float32 master weights (``kdjax.train.Policy.bf16()`` for kdjax,
explicit casts in the hand-written step), AdamW, and the forward KL
``T^2 * mean_t KL(p_t || q_t)`` over every token (temperature 1). Also timed:
the student's own train step (next-token CE, no teacher) and the teacher's
forward pass, so that ``kdjax / (student step + teacher forward)`` can be read.

Reports ms/step (median over interleaved rounds), tokens/s, model FLOP
utilisation against a *measured* bf16 matmul peak of this device (FLOPs =
tokens x (3 x student forward + teacher forward) matmul FLOPs; attention
counted as a full, not causal-halved, ``T x T`` product) and the compiled
step's ``memory_analysis()`` temporary bytes.

Usage::

  python benchmarks/bench_lm_step.py              # the issue's GPU size
  python benchmarks/bench_lm_step.py --small      # CPU-sized smoke run
  python benchmarks/bench_lm_step.py --large_vocab  # + bench_large_vocab.py

``--large_vocab`` then runs, in the same process, the sections of
``benchmarks/bench_large_vocab.py`` (the same step at vocab 32000 and 128256:
full logits vs the memory-lean ``kdjax.lm.lean_token_kd_term``, fused and
checkpointed; and a loss-only table); with ``--small`` their CPU sizes.

The GPU size is teacher 24 x 1024, student 12 x 768, vocab 32000, sequence
1024, batch 16. The script prints the JAX backend; a CPU number is a CPU
number, not a GPU one.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
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


def cast(tree, dtype):
  return jax.tree.map(
      lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x,
      tree)


def measured_matmul_peak(n: int, dtype=jnp.bfloat16, repeats: int = 10) -> float:
  """FLOP/s of an ``n x n @ n x n`` matmul in ``dtype`` (best of ``repeats``)."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  f(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best


def interleaved_ms(variants: dict, steps: int, repeats: int) -> dict:
  """Median ms per call over ``repeats`` rotated rounds of ``steps`` calls each.

  ``variants`` maps names to zero-argument callables returning a device value;
  each round times every variant in a rotated order with one
  ``block_until_ready`` at the end of its ``steps`` calls (no per-step sync).
  """
  times = {name: [] for name in variants}
  names = list(variants)
  for r in range(repeats):
    order = names[r % len(names):] + names[:r % len(names)]
    for name in order:
      t0 = time.perf_counter()
      for _ in range(steps):
        out = variants[name]()
      jax.block_until_ready(out)
      times[name].append((time.perf_counter() - t0) / steps)
  return {name: 1e3 * statistics.median(v) for name, v in times.items()}


def make_hand_written_step(s_module, t_module, optimizer, temperature=1.0):
  """The token-KD step written directly with flax + optax (full logits).

  ``step(params, opt_state, teacher_params, batch) -> (params, opt_state,
  loss)``: bfloat16 compute (explicit casts of float32 master weights),
  ``T^2 * mean_t KL(p_t || q_t)`` over ``batch["loss_mask"]``, AdamW update.
  Not jitted.
  """

  def hand_loss(params, teacher_params, batch):
    t_logits = t_module.apply(cast(teacher_params, jnp.bfloat16),
                              batch["tokens"])
    t_logits = jax.lax.stop_gradient(t_logits.astype(jnp.float32))
    s_logits = s_module.apply(cast(params, jnp.bfloat16), batch["tokens"])
    s_logits = s_logits.astype(jnp.float32)
    log_p = jax.nn.log_softmax(t_logits / temperature, -1)
    log_q = jax.nn.log_softmax(s_logits / temperature, -1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), -1)
    mask = batch["loss_mask"]
    return temperature**2 * jnp.sum(kl * mask) / jnp.sum(mask)

  def hand_step(params, opt_state, teacher_params, batch):
    loss, grads = jax.value_and_grad(hand_loss)(params, teacher_params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return hand_step


# The GPU size and the CPU-sized ``--small`` one.
GPU_TEACHER = dict(num_layers=24, num_heads=16, d_model=1024)
GPU_STUDENT = dict(num_layers=12, num_heads=12, d_model=768)
SMALL_TEACHER = dict(num_layers=4, num_heads=4, d_model=256)
SMALL_STUDENT = dict(num_layers=2, num_heads=4, d_model=128)


def lm_configs(t_shape: dict, s_shape: dict, vocab: int, seq: int) -> tuple:
  """``(teacher, student)`` ``kdjax.lm.TransformerConfig`` s of the given shapes."""
  return (lm.TransformerConfig(vocab_size=vocab, max_len=seq, **t_shape),
          lm.TransformerConfig(vocab_size=vocab, max_len=seq, **s_shape))


def make_lm_batch(vocab: int, batch_size: int, seq: int) -> dict:
  """A random token batch: ``tokens``, next-token ``targets``, all-ones mask."""
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, vocab, (batch_size, seq)).astype(np.int32)
  return {"tokens": jnp.asarray(tokens),
          "targets": jnp.asarray(np.roll(tokens, -1, 1)),
          "loss_mask": jnp.ones((batch_size, seq), jnp.float32)}


def step_flops(t_cfg, s_cfg, batch_size: int, seq: int) -> float:
  """Matmul FLOPs of one KD step: tokens x (3 x student fwd + teacher fwd)."""
  return batch_size * seq * (3 * s_cfg.matmul_flops_per_token(seq)
                             + t_cfg.matmul_flops_per_token(seq))


def memory_bytes(compiled) -> Optional[dict]:
  """A compiled function's ``memory_analysis()`` sizes in bytes (``None``: n/a)."""
  stats = compiled.memory_analysis()
  if stats is None:
    return None
  return {"argument": int(stats.argument_size_in_bytes),
          "output": int(stats.output_size_in_bytes),
          "temp": int(stats.temp_size_in_bytes),
          "alias": int(stats.alias_size_in_bytes)}


def device_memory() -> Optional[dict]:
  """``bytes_in_use`` / ``peak_bytes_in_use`` of device 0 (``None`` where n/a, e.g. CPU)."""
  stats = jax.devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return {"bytes_in_use": int(stats.get("bytes_in_use", -1)),
          "peak_bytes_in_use": int(stats["peak_bytes_in_use"])}


def compare_lm_steps(t_cfg, s_cfg, batch_size: int, seq: int, steps: int,
                     repeats: int, *, parts: bool = True) -> dict:
  """Times kdjax's token-KD step against the hand-written one (module docstring).

  The kdjax step is compiled and warmed up first, alone, with device 0's
  memory stats read before its first call and after its warm-up (so its peak
  is not hidden by the other variants'). ``parts``: also the student's own
  step and the teacher's forward pass.

  Returns:
    ``{"ms": {variant: median ms/step}, "memory": {variant: memory_bytes},
    "device_memory": {"before_kdjax", "after_kdjax"}: device_memory(),
    "tokens_per_step", "flops_per_step", "loss": {variant: first loss}}``.
  """
  batch = make_lm_batch(s_cfg.vocab_size, batch_size, seq)
  s_apply, t_apply = lm.make_lm_apply(s_cfg), lm.make_lm_apply(t_cfg)
  s_module, t_module = s_apply.module, t_apply.module
  teacher = lm.init_lm(t_cfg, jax.random.key(1), seq_len=seq)
  student0 = lm.init_lm(s_cfg, jax.random.key(0), seq_len=seq)
  optimizer = optax.adamw(1e-4, weight_decay=0.01)
  temperature = 1.0

  # kdjax: compiled (memory_analysis; the jit call reuses the executable),
  # then warmed up alone between two reads of the device's memory stats.
  loss_fn = losses.compose([losses.Term("kd", lm.token_kd_term("kl"))],
                           temperature=temperature)
  kd_step = lm.make_lm_train_step(s_apply, t_apply, loss_fn, optimizer,
                                  policy=train.Policy.bf16())
  holder = {"kd": train.create_state(jax.tree.map(jnp.copy, student0),
                                     optimizer, rng=jax.random.key(2))}
  memory = {"kdjax": memory_bytes(
      kd_step.lower(holder["kd"], teacher, batch).compile())}
  loss0 = {}

  def run_kdjax():
    holder["kd"], m = kd_step(holder["kd"], teacher, batch)
    return m["loss"]

  dev_before = device_memory()
  loss0["kdjax"] = float(run_kdjax())
  jax.block_until_ready(run_kdjax())
  dev_after = device_memory()

  # Hand-written flax + optax.
  hand_step = make_hand_written_step(s_module, t_module, optimizer,
                                     temperature)
  hand_jit = jax.jit(hand_step, donate_argnums=(0, 1))
  hand_params = jax.tree.map(jnp.copy, student0)
  holder["hand"] = (hand_params, optimizer.init(hand_params))
  memory["hand-written"] = memory_bytes(
      hand_jit.lower(*holder["hand"], teacher, batch).compile())

  def run_hand():
    p, o = holder["hand"]
    p, o, loss = hand_jit(p, o, teacher, batch)
    holder["hand"] = (p, o)
    return loss

  variants = {"kdjax": run_kdjax, "hand-written": run_hand}
  if parts:
    # Student's own train step (CE) and the teacher's forward pass.
    def student_loss(params, batch):
      logits = s_module.apply(cast(params, jnp.bfloat16), batch["tokens"])
      return losses.hard_label_cross_entropy(logits.astype(jnp.float32),
                                             batch["targets"],
                                             mask=batch["loss_mask"])

    def student_step(params, opt_state, batch):
      loss, grads = jax.value_and_grad(student_loss)(params, batch)
      updates, opt_state = optimizer.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, loss

    student_jit = jax.jit(student_step, donate_argnums=(0, 1))
    st_params = jax.tree.map(jnp.copy, student0)
    holder["student"] = (st_params, optimizer.init(st_params))
    teacher_fwd = jax.jit(lambda p, b: t_module.apply(
        cast(p, jnp.bfloat16), b["tokens"]))

    def run_student():
      p, o = holder["student"]
      p, o, loss = student_jit(p, o, batch)
      holder["student"] = (p, o)
      return loss

    variants["student step"] = run_student
    variants["teacher forward"] = lambda: teacher_fwd(teacher, batch)
  del student0
  for name, fn in variants.items():  # compile + warm up (kdjax: done)
    if name != "kdjax":
      out = fn()
      if name == "hand-written":
        loss0[name] = float(out)
      jax.block_until_ready(fn())
  ms = interleaved_ms(variants, steps, repeats)
  return {"ms": ms, "memory": memory,
          "device_memory": {"before_kdjax": dev_before,
                            "after_kdjax": dev_after},
          "tokens_per_step": batch_size * seq,
          "flops_per_step": step_flops(t_cfg, s_cfg, batch_size, seq),
          "loss": loss0}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--small", action="store_true",
                      help="CPU-sized models (teacher 4x256, student 2x128).")
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--repeats", type=int, default=None)
  parser.add_argument("--vocab", type=int, default=None,
                      help="override the vocabulary size of both models "
                           "(e.g. 32000 with --small: a logit-bound step).")
  parser.add_argument("--large_vocab", action="store_true",
                      help="then run benchmarks/bench_large_vocab.py's "
                           "sections (vocab 32000 and 128256: plain vs "
                           "memory-lean steps, loss-only table) in this "
                           "process.")
  args = parser.parse_args()
  if args.small:
    t_cfg, s_cfg = lm_configs(SMALL_TEACHER, SMALL_STUDENT,
                              args.vocab or 512, 128)
    batch_size, seq, matmul_n = 4, 128, 1024
    steps, repeats = args.steps or 3, args.repeats or 3
  else:
    t_cfg, s_cfg = lm_configs(GPU_TEACHER, GPU_STUDENT, args.vocab or 32000,
                              1024)
    batch_size, seq, matmul_n = 16, 1024, 8192
    steps, repeats = args.steps or 10, args.repeats or 5
  backend = jax.default_backend()
  print(f"backend: {backend} ({jax.devices()[0].device_kind}); "
        f"teacher {t_cfg.num_layers}x{t_cfg.d_model}, student "
        f"{s_cfg.num_layers}x{s_cfg.d_model}, vocab {s_cfg.vocab_size}, "
        f"seq {seq}, batch {batch_size}")
  if backend == "cpu":
    print("NOTE: CPU run. These are CPU timings, not GPU numbers.")

  result = compare_lm_steps(t_cfg, s_cfg, batch_size, seq, steps, repeats)
  ms, tokens_per_step = result["ms"], result["tokens_per_step"]
  peak = measured_matmul_peak(matmul_n)
  print(f"measured bf16 matmul peak ({matmul_n}^3): {peak / 1e12:.3f} TFLOP/s")
  print(f"{'variant':<18}{'ms/step':>10}{'tokens/s':>12}{'MFU':>8}"
        f"{'temp MiB':>11}")
  for name in ("kdjax", "hand-written"):
    mfu = result["flops_per_step"] / (ms[name] / 1e3) / peak
    temp = result["memory"][name]
    temp_str = (f"{temp['temp'] / 2**20:>11.1f}" if temp else f"{'n/a':>11}")
    print(f"{name:<18}{ms[name]:>10.2f}{tokens_per_step / ms[name] * 1e3:>12.0f}"
          f"{100 * mfu:>7.1f}%{temp_str}")
  for name in ("student step", "teacher forward"):
    print(f"{name:<18}{ms[name]:>10.2f}")
  print(f"kdjax / hand-written: {ms['kdjax'] / ms['hand-written']:.3f}x; "
        f"kdjax / (student step + teacher forward): "
        f"{ms['kdjax'] / (ms['student step'] + ms['teacher forward']):.3f}x")
  print(f"(backend: {backend})")
  if args.large_vocab:
    del result
    import bench_large_vocab  # pylint: disable=import-outside-toplevel
    bench_large_vocab.run(args.small, "all", args.steps, args.repeats)


if __name__ == "__main__":
  main()
