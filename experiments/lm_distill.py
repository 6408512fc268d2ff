"""Language-model distillation on the Python standard library's own sources.

Corpus: the ``.py`` files of the running interpreter's standard library
directory (always present, nothing downloaded), sorted by name; files are
split into train and held-out sets (every ``--holdout_every``-th file is
held out), read as UTF-8 bytes and cut into windows of ``seq_len + 1`` byte
tokens (BOS + bytes) whose first ``prompt_bytes`` bytes are a prompt (not
trained on, not scored).

Runs, for each seed:

1. ``teacher``: a larger byte-level ``DecoderLM`` trained with next-token CE;
2. ``student alone``: the small model trained with CE;
3. ``token KD``: the small model trained with forward KL to the teacher over
   the completion tokens (``kdjax.lm.token_kd_term("kl")``);
4. ``on-policy GKD``: ``kdjax.lm.make_gkd_train_step`` with ``lmbda`` (the
   student generates continuations with probability lambda) and the
   generalised JSD (``beta``).

Reports held-out perplexity ``exp(mean NLL over completion tokens)`` and the
teacher-student forward KL ``mean_t KL(p_teacher || q_student)`` (T = 1) on
the held-out windows, mean and spread over seeds.

Usage::

  python experiments/lm_distill.py                     # small default size
  python experiments/lm_distill.py --tiny --seeds 0    # a smoke run
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kdjax import lm  # noqa: E402
from kdjax import losses  # noqa: E402
from kdjax import train  # noqa: E402

TOK = lm.ByteTokenizer()


def stdlib_corpus(max_bytes: int, holdout_every: int) -> tuple[str, str]:
  """(train text, held-out text) from the stdlib's top-level ``.py`` files."""
  files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))
  if not files:
    raise FileNotFoundError("no standard-library sources found next to os.py")
  train_parts, held_parts, size = [], [], 0
  for i, path in enumerate(files):
    with open(path, encoding="utf-8", errors="replace") as f:
      text = f.read()
    (held_parts if i % holdout_every == 0 else train_parts).append(text)
    size += len(text)
    if size >= max_bytes:
      break
  return "\n".join(train_parts), "\n".join(held_parts)


def make_eval(s_apply, t_apply):
  @jax.jit
  def sums(student_vars, teacher_vars, batch):
    s = s_apply(student_vars, batch).logits[..., :TOK.vocab_size]
    t = t_apply(teacher_vars, batch).logits[..., :TOK.vocab_size]
    mask = batch["loss_mask"]
    nll = losses.hard_label_cross_entropy(s, batch["targets"], mask=mask,
                                          reduction="sum")
    kl = losses.kl_divergence(s, t, mask=mask, reduction="sum",
                              scale_by_temperature=False)
    return nll, kl, jnp.sum(mask)

  def evaluate(student_vars, teacher_vars, batches):
    total = np.zeros(3)
    for b in batches:
      total += np.asarray(jax.device_get(sums(student_vars, teacher_vars, b)))
    return {"ppl": float(np.exp(total[0] / total[2])),
            "kl_to_teacher": float(total[1] / total[2])}

  return evaluate


def train_loop(step, state, teacher_vars, batches_fn, steps):
  it = batches_fn()
  for _ in range(steps):
    try:
      batch = next(it)
    except StopIteration:
      it = batches_fn()
      batch = next(it)
    state, metrics = step(state, teacher_vars, batch)
  jax.block_until_ready(metrics["loss"])
  return state


def run(args, seed: int) -> dict:
  t_cfg = lm.TransformerConfig(vocab_size=264, num_layers=args.teacher_layers,
                               num_heads=4, d_model=args.teacher_width,
                               max_len=args.seq_len)
  s_cfg = lm.TransformerConfig(vocab_size=264, num_layers=args.student_layers,
                               num_heads=4, d_model=args.student_width,
                               max_len=args.seq_len)
  train_text, held_text = stdlib_corpus(args.corpus_bytes, args.holdout_every)
  tr = lm.text_examples(train_text, TOK, seq_len=args.seq_len,
                        prompt_bytes=args.prompt_bytes)
  ho = lm.text_examples(held_text, TOK, seq_len=args.seq_len,
                        prompt_bytes=args.prompt_bytes)
  n_eval = min(len(ho[0]), args.eval_windows)
  held = list(lm.iterate_batches(ho[0][:n_eval], ho[1][:n_eval],
                                 args.batch_size, args.seq_len,
                                 pad_id=TOK.pad_id))
  shuffle = np.random.default_rng(seed)

  def batches():
    return lm.iterate_batches(*tr, args.batch_size, args.seq_len,
                              pad_id=TOK.pad_id, rng=shuffle)

  s_apply, t_apply = lm.make_lm_apply(s_cfg), lm.make_lm_apply(t_cfg)
  evaluate = make_eval(s_apply, t_apply)
  opt = optax.adamw(optax.warmup_cosine_decay_schedule(
      0.0, args.lr, min(50, args.steps // 10 + 1), args.steps), 0.01)
  ce = losses.compose([losses.Term(
      "ce", lm.token_ce_term(vocab_size=TOK.vocab_size), needs_teacher=False)])
  results = {"train_windows": len(tr[0]), "heldout_windows": n_eval}

  # 1. Teacher (CE). Its own "student" slot: train it with a None teacher.
  t0 = time.time()
  t_step = lm.make_lm_train_step(t_apply, None, ce, opt)
  t_state = train.create_state(
      lm.init_lm(t_cfg, jax.random.key(1000 + seed)), opt,
      rng=jax.random.key(seed))
  t_state = train_loop(t_step, t_state, None, batches, args.teacher_steps)
  teacher = t_state.student_variables()
  t_eval = make_eval(t_apply, t_apply)(teacher, teacher, held)
  results["teacher"] = {"ppl": t_eval["ppl"], "kl_to_teacher": 0.0,
                        "seconds": time.time() - t0}

  s_init = lm.init_lm(s_cfg, jax.random.key(2000 + seed))
  copy = lambda: jax.tree.map(jnp.copy, s_init)
  runs = {
      "student alone": lm.make_lm_train_step(s_apply, None, ce, opt),
      "token KD": lm.make_lm_train_step(
          s_apply, t_apply,
          losses.compose([losses.Term("kd", lm.token_kd_term(
              "kl", vocab_size=TOK.vocab_size))]), opt),
      "on-policy GKD": lm.make_gkd_train_step(
          s_apply, t_apply,
          losses.compose([losses.Term("gkd", lm.token_kd_term(
              "jsd", beta=args.beta, vocab_size=TOK.vocab_size))]), opt,
          lmbda=args.lmbda,
          sampling=lm.SamplingConfig(
              temperature=1.0, vocab_size=TOK.vocab_size, eos_id=TOK.eos_id,
              pad_id=TOK.pad_id, suppress_ids=(TOK.pad_id, TOK.bos_id),
              prefill_length=args.prompt_bytes + 1)),
  }
  for name, step in runs.items():
    t0 = time.time()
    state = train.create_state(copy(), opt, rng=jax.random.key(seed))
    teacher_vars = None if name == "student alone" else teacher
    state = train_loop(step, state, teacher_vars, batches, args.steps)
    results[name] = {**evaluate(state.student_variables(), teacher, held),
                     "seconds": time.time() - t0}
  return results


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tiny", action="store_true",
                 help="smoke-test sizes (minutes on a laptop CPU)")
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--seq_len", type=int, default=64)
  p.add_argument("--prompt_bytes", type=int, default=16)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--teacher_layers", type=int, default=3)
  p.add_argument("--teacher_width", type=int, default=128)
  p.add_argument("--student_layers", type=int, default=1)
  p.add_argument("--student_width", type=int, default=48)
  p.add_argument("--teacher_steps", type=int, default=4000)
  p.add_argument("--steps", type=int, default=2000)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--lmbda", type=float, default=0.5)
  p.add_argument("--beta", type=float, default=0.5)
  p.add_argument("--corpus_bytes", type=int, default=4_000_000)
  p.add_argument("--holdout_every", type=int, default=10)
  p.add_argument("--eval_windows", type=int, default=512)
  p.add_argument("--json", type=str, default=None, help="write results here")
  args = p.parse_args()
  if args.tiny:
    args.seq_len, args.prompt_bytes, args.batch_size = 48, 16, 8
    args.teacher_layers, args.teacher_width = 2, 64
    args.student_layers, args.student_width = 1, 32
    args.teacher_steps, args.steps = 150, 100
    args.corpus_bytes, args.eval_windows = 400_000, 64

  print(f"backend: {jax.default_backend()}; args: {vars(args)}")
  all_results = {}
  for seed in args.seeds:
    all_results[seed] = run(args, seed)
    print(f"seed {seed}: {json.dumps(all_results[seed], indent=None)}")
  names = ["teacher", "student alone", "token KD", "on-policy GKD"]
  print(f"\n{'run':<16}{'held-out ppl':>22}{'KL(teacher||student)':>26}")
  for name in names:
    ppl = [r[name]["ppl"] for r in all_results.values()]
    kl = [r[name]["kl_to_teacher"] for r in all_results.values()]
    sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
    print(f"{name:<16}{statistics.mean(ppl):>14.3f} +- {sd(ppl):<5.3f}"
          f"{statistics.mean(kl):>18.4f} +- {sd(kl):.4f}")
  print(f"(seeds {args.seeds}; backend {jax.default_backend()})")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "results": all_results}, f, indent=2)


if __name__ == "__main__":
  main()
