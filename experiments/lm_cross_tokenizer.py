"""Cross-tokenizer distillation with Universal Logit Distillation (ULD).

A byte-level teacher (``kdjax.lm.ByteTokenizer``, 259 ids) and a student with
a different tokenizer (``kdjax.lm.PairTokenizer``, byte-pair merges learned
from the training text: 515 ids, about 2.3 bytes a token) on the same text:
token-level KD is undefined between them, ULD (Boizard et al. 2024) is not.

Corpus and windows as ``lm_distill.py`` (the Python standard library's own
sources, every 10th file held out; windows of 64 bytes whose first 16 are the
prompt; windows with non-ASCII bytes are dropped so that every window decodes
to the same text for both tokenizers). The teacher is trained once (seed
0) with next-token CE; for each seed the student is trained

1. ``student alone``: its own next-token CE;
2. ``CE + ULD``: ``kdjax.lm.make_uld_loss(uld_weight)``: CE plus the sorted-
   probability L1 distance to the teacher on the completion positions aligned
   in order (truncated to the shorter completion of each window).

Both tokenizers see different numbers of tokens, so the score is held-out
**bits per byte** of the completions: ``sum NLL / (completion bytes * ln 2)``;
the held-out ULD distance to the teacher is reported too.

Usage::

  python experiments/lm_cross_tokenizer.py                 # defaults
  python experiments/lm_cross_tokenizer.py --tiny --seeds 0
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kdjax import lm  # noqa: E402
from kdjax import losses  # noqa: E402
from kdjax import train  # noqa: E402
from lm_distill import stdlib_corpus  # noqa: E402
from lm_distill import train_loop  # noqa: E402

BYTES = lm.ByteTokenizer()


def ascii_windows(text: str, window: int, max_windows: int) -> list[str]:
  """Consecutive ``window``-character ASCII windows of ``text``."""
  out = []
  for start in range(0, len(text) - window + 1, window):
    chunk = text[start:start + window]
    if chunk.isascii():
      out.append(chunk)
      if len(out) >= max_windows:
        break
  return out


def encode_all(windows: list[str], prompt_chars: int, student_tok,
               seq_len: int) -> dict:
  """Both tokenizations of every window, as one big batch of arrays."""
  prompts = [w[:prompt_chars] for w in windows]
  completions = [w[prompt_chars:] for w in windows]
  batch = lm.make_cross_tokenizer_batch(prompts, completions, student_tok,
                                        BYTES, seq_len, add_eos=False)
  batch["completion_bytes"] = np.asarray([len(c) for c in completions],
                                         np.float32)
  return batch


def batches(data: dict, batch_size: int, rng: np.random.Generator):
  order = rng.permutation(len(data["tokens"]))
  for i in range(0, len(order) - batch_size + 1, batch_size):
    idx = order[i:i + batch_size]
    yield {k: v[idx] for k, v in data.items() if k != "completion_bytes"}


def make_eval(s_apply, t_apply, student_vocab: int):
  @jax.jit
  def sums(student_vars, teacher_vars, batch):
    s = s_apply(student_vars, batch).logits[..., :student_vocab]
    t = t_apply(teacher_vars, batch).logits[..., :BYTES.vocab_size]
    nll = losses.hard_label_cross_entropy(s, batch["targets"],
                                          mask=batch["loss_mask"],
                                          reduction="sum")
    t_nll = losses.hard_label_cross_entropy(
        t, batch["teacher_targets"], mask=batch["teacher_loss_mask"],
        reduction="sum")
    # ULD summed over the aligned positions (min of the two response lengths).
    aligned = jnp.sum(jnp.minimum(jnp.sum(batch["loss_mask"], -1),
                                  jnp.sum(batch["teacher_loss_mask"], -1)))
    uld = aligned * losses.uld_loss(s, batch["loss_mask"], t,
                                    batch["teacher_loss_mask"], average="token")
    return jnp.stack([nll, t_nll, uld, aligned])

  def evaluate(student_vars, teacher_vars, data, batch_size=64):
    total = np.zeros(4)
    n = len(data["tokens"])
    for i in range(0, n - batch_size + 1, batch_size):
      b = {k: v[i:i + batch_size] for k, v in data.items()
           if k != "completion_bytes"}
      total += np.asarray(sums(student_vars, teacher_vars, b))
    used = (n // batch_size) * batch_size
    n_bytes = float(np.sum(data["completion_bytes"][:used]))
    return {"bits_per_byte": total[0] / (n_bytes * math.log(2)),
            "teacher_bits_per_byte": total[1] / (n_bytes * math.log(2)),
            "uld_to_teacher": total[2] / total[3]}

  return evaluate


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tiny", action="store_true", help="smoke-test sizes")
  p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
  p.add_argument("--window", type=int, default=64)
  p.add_argument("--prompt_chars", type=int, default=16)
  p.add_argument("--batch_size", type=int, default=16)
  p.add_argument("--merges", type=int, default=256)
  p.add_argument("--tokenizer_chars", type=int, default=200_000)
  p.add_argument("--teacher_layers", type=int, default=3)
  p.add_argument("--teacher_width", type=int, default=128)
  p.add_argument("--student_layers", type=int, default=1)
  p.add_argument("--student_width", type=int, default=48)
  p.add_argument("--teacher_steps", type=int, default=4000)
  p.add_argument("--steps", type=int, default=2000)
  p.add_argument("--lr", type=float, default=3e-3)
  p.add_argument("--uld_weight", type=float, default=1.0)
  p.add_argument("--corpus_bytes", type=int, default=4_000_000)
  p.add_argument("--holdout_every", type=int, default=10)
  p.add_argument("--eval_windows", type=int, default=512)
  p.add_argument("--max_train_windows", type=int, default=60_000)
  p.add_argument("--json", type=str, default=None)
  args = p.parse_args(argv)
  if args.tiny:
    args.teacher_layers, args.teacher_width = 1, 32
    args.student_layers, args.student_width = 1, 16
    args.teacher_steps, args.steps, args.merges = 60, 40, 32
    args.corpus_bytes, args.eval_windows, args.tokenizer_chars = 200_000, 64, 20_000
    args.batch_size = 8
  print(f"backend: {jax.default_backend()}; args: {vars(args)}")

  train_text, held_text = stdlib_corpus(args.corpus_bytes, args.holdout_every)
  pair = lm.PairTokenizer.train(train_text[:args.tokenizer_chars], args.merges)
  seq = args.window  # the byte sequence is BOS + window bytes: window + 1 ids
  tr = encode_all(ascii_windows(train_text, args.window, args.max_train_windows),
                  args.prompt_chars, pair, seq)
  ho = encode_all(ascii_windows(held_text, args.window, args.eval_windows),
                  args.prompt_chars, pair, seq)
  bytes_per_token = float(np.sum(tr["completion_bytes"])
                          / np.sum(tr["loss_mask"]))
  print(f"{len(tr['tokens'])} train / {len(ho['tokens'])} held-out windows; "
        f"student vocabulary {pair.vocab_size} ({bytes_per_token:.2f} bytes "
        f"per completion token), teacher {BYTES.vocab_size}")

  t_cfg = lm.TransformerConfig(vocab_size=264, num_layers=args.teacher_layers,
                               num_heads=4, d_model=args.teacher_width,
                               max_len=seq)
  s_cfg = lm.TransformerConfig(vocab_size=pair.vocab_size + 5,
                               num_layers=args.student_layers, num_heads=4,
                               d_model=args.student_width, max_len=seq)
  t_apply = lm.make_teacher_lm_apply(t_cfg)
  s_apply = lm.make_lm_apply(s_cfg)
  schedule = lambda steps: optax.warmup_cosine_decay_schedule(
      0.0, args.lr, min(50, steps // 10 + 1), steps)

  # The teacher: byte-level, trained once on the teacher's own tokens.
  t0 = time.time()
  t_opt = optax.adamw(schedule(args.teacher_steps), 0.01)
  t_ce = losses.compose([losses.Term("ce", lm.token_ce_term(
      vocab_size=BYTES.vocab_size, label_key="teacher_targets",
      mask_key="teacher_loss_mask"), needs_teacher=False)])
  t_step = lm.make_lm_train_step(t_apply, None, t_ce, t_opt,
                                 mask_key="teacher_loss_mask")
  t_state = train.create_state(lm.init_lm(t_cfg, jax.random.key(1000)), t_opt,
                               rng=jax.random.key(0))
  t_rng = np.random.default_rng(1000)
  t_state = train_loop(t_step, t_state, None,
                       lambda: batches(tr, args.batch_size, t_rng),
                       args.teacher_steps)
  teacher = t_state.student_variables()
  teacher_seconds = time.time() - t0

  evaluate = make_eval(s_apply, t_apply, pair.vocab_size)
  opt = optax.adamw(schedule(args.steps), 0.01)
  runs = {
      "student alone": losses.compose([losses.Term(
          "ce", lm.token_ce_term(vocab_size=pair.vocab_size),
          needs_teacher=False)]),
      "CE + ULD": lm.make_uld_loss(args.uld_weight,
                                   student_vocab_size=pair.vocab_size,
                                   teacher_vocab_size=BYTES.vocab_size),
  }
  results = {}
  for seed in args.seeds:
    s_init = lm.init_lm(s_cfg, jax.random.key(2000 + seed))
    results[seed] = {}
    for name, loss_fn in runs.items():
      t1 = time.time()
      step = lm.make_lm_train_step(s_apply, t_apply, loss_fn, opt)
      state = train.create_state(jax.tree.map(jnp.copy, s_init), opt,
                                 rng=jax.random.key(seed))
      rng = np.random.default_rng(seed)
      state = train_loop(step, state, teacher,
                         lambda rng=rng: batches(tr, args.batch_size, rng),
                         args.steps)
      results[seed][name] = {**evaluate(state.student_variables(), teacher,
                                        ho), "seconds": time.time() - t1}
    print(f"seed {seed}: {json.dumps(results[seed])}")

  teacher_bpb = results[args.seeds[0]]["student alone"]["teacher_bits_per_byte"]
  print(f"\nteacher (bytes, {t_cfg.num_layers}x{t_cfg.d_model}): "
        f"{teacher_bpb:.4f} bits/byte ({teacher_seconds:.0f} s)")
  sd = lambda v: statistics.stdev(v) if len(v) > 1 else 0.0
  print(f"{'student (pairs)':<18}{'bits/byte':>20}{'ULD to teacher':>22}")
  for name in runs:
    bpb = [r[name]["bits_per_byte"] for r in results.values()]
    uld = [r[name]["uld_to_teacher"] for r in results.values()]
    print(f"{name:<18}{statistics.mean(bpb):>12.4f} +- {sd(bpb):<6.4f}"
          f"{statistics.mean(uld):>14.4f} +- {sd(uld):.4f}")
  print(f"(seeds {args.seeds}; backend {jax.default_backend()})")
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"args": vars(args), "teacher_bits_per_byte": teacher_bpb,
                 "teacher_seconds": teacher_seconds,
                 "bytes_per_student_token": bytes_per_token,
                 "results": results}, f, indent=2)


if __name__ == "__main__":
  main()
