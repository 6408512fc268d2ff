"""kdjax's token KD step vs Tunix's own distillation trainer, same Qwen3 pair.

Teacher and student are Tunix ``Qwen3`` models (``kdjax.lm.init_tunix_model``,
random init) of the same vocabulary; the batches are kdjax LM batches
(right-padded, completion-only ``loss_mask``) and the same batches, as
``tunix.sft.peft_trainer.TrainingInput`` (``input_tokens [B, L + 1]``,
``input_mask``), feed Tunix's ``DistillationTrainer`` with its
``LogitStrategy`` (temperature 2, alpha 0.5, SGD).

Three steps are timed, with the loss in Tunix's convention (``alpha * T^2 *
mean_{b,t} KL + (1 - alpha) * mean_{b,t} CE`` over all ``B x L`` positions,
the CE with masked labels; :func:`aligned_kdjax_loss`; the parity test checks
the values agree):

* ``tunix``: what ``DistillationTrainer.train`` does per batch:
  ``_prepare_inputs`` (the teacher's forward pass, its own ``nnx.jit``; the
  positions and attention mask computed eagerly by the input function) then
  the jitted ``train_step`` (student forward, loss, grad, optimizer update).
  Tunix's loop adds metric buffering and a progress bar, not timed here.
* ``kdjax plain``: ``kdjax.lm.make_lm_train_step`` with full logits, the
  teacher inside the one jitted step.
* ``kdjax lean``: the same with ``make_tunix_lm_apply(compute_logits=False)``
  and ``lean_token_kd_term`` / ``lean_token_ce_term``: logits formed in
  chunks of tokens, never ``[B, T, V]``.

Step time: median over ``--steps`` steps after ``--warmup`` ones, each ended
with ``block_until_ready``, the three steps interleaved round by round (load
changes hit all three alike). Every step runs as the compiled executable of
its jitted function (``.lower(...).compile()``, whose ``memory_analysis`` is
reported; calling the jitted function afterwards would compile again):
kdjax's steps directly, Tunix's through its trainer (``_prepare_inputs``
then ``train_step``) with the executables of its two ``nnx.jit`` functions
put in their place (nnx's per-call graph handling still runs, as in its
loop). Memory: the compiled steps'
``memory_analysis().temp_size_in_bytes``; for Tunix the train step's, plus
the teacher forward's (a separate program), and the teacher logits ``[B, L,
V]`` float32 that stay alive between the two as an *argument* of the train
step (not counted in its temporaries): "peak" = max(teacher temp, train temp
+ teacher logits).

Usage::

  python benchmarks/bench_tunix.py            # CPU sizes: V = 1024, 32768, 151936
  python benchmarks/bench_tunix.py --smoke    # seconds (the test runs it)
  python benchmarks/bench_tunix.py --gpu      # larger models for a GPU

Runs on any JAX backend; imports no tfds/grain.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kdjax import lm  # noqa: E402
from kdjax import losses  # noqa: E402
from kdjax import train  # noqa: E402

PAD_ID = 0
TEMPERATURE = 2.0
ALPHA = 0.5


@dataclasses.dataclass(frozen=True)
class Size:
  name: str
  vocab: int
  batch: int
  seq: int
  student_layers: int
  student_dim: int
  teacher_layers: int
  teacher_dim: int
  chunk: int = 64


SMOKE = (Size("smoke", vocab=512, batch=2, seq=16, student_layers=1,
              student_dim=32, teacher_layers=1, teacher_dim=48, chunk=16),)
CPU = (
    Size("small", vocab=1024, batch=8, seq=64, student_layers=2,
         student_dim=64, teacher_layers=4, teacher_dim=128),
    Size("V=32k", vocab=32768, batch=4, seq=64, student_layers=1,
         student_dim=32, teacher_layers=2, teacher_dim=64),
    Size("V=152k", vocab=151936, batch=4, seq=64, student_layers=1,
         student_dim=32, teacher_layers=2, teacher_dim=64),
)
GPU = (
    Size("small", vocab=1024, batch=16, seq=256, student_layers=4,
         student_dim=256, teacher_layers=8, teacher_dim=512, chunk=512),
    Size("V=152k", vocab=151936, batch=8, seq=512, student_layers=4,
         student_dim=256, teacher_layers=8, teacher_dim=512, chunk=512),
)


def _qwen3(size: Size, layers: int, dim: int, seed: int):
  heads = max(2, dim // 16)
  config = lm.tunix_model_config(
      "qwen3", vocab_size=size.vocab, num_layers=layers, embed_dim=dim,
      hidden_dim=2 * dim, num_heads=heads, num_kv_heads=heads // 2,
      head_dim=dim // heads)
  return lm.init_tunix_model("qwen3", config, seed)


def make_pair(size: Size, seed: int = 0):
  """``(teacher, student)``: Tunix Qwen3 models, the student smaller."""
  return (_qwen3(size, size.teacher_layers, size.teacher_dim, seed + 1),
          _qwen3(size, size.student_layers, size.student_dim, seed + 2))


def make_batches(size: Size, n: int, seed: int = 0) -> list:
  """``n`` right-padded kdjax LM batches (random ids in ``[3, V)``, PAD = 0)."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    lengths = rng.integers(size.seq // 2, size.seq + 1, size.batch)
    prompts = [list(rng.integers(3, size.vocab, rng.integers(1, size.seq // 4)))
               for _ in range(size.batch)]
    completions = [list(rng.integers(3, size.vocab, max(n - len(p) + 1, 1)))
                   for n, p in zip(lengths, prompts)]
    batch = lm.make_lm_batch(prompts, completions, size.seq, pad_id=PAD_ID)
    out.append({k: jnp.asarray(v) for k, v in batch.items()})
  return out


def with_pad_mask(batch: dict) -> dict:
  """The kdjax batch plus ``input_mask = tokens != PAD``: Tunix's positions and
  attention mask (so that the unmasked KL at padded positions matches too)."""
  return dict(batch, input_mask=(batch["tokens"] != PAD_ID).astype(jnp.int32))


def to_tunix_input(batch: dict):
  """A kdjax batch as Tunix's ``TrainingInput``: ``input_tokens = tokens +
  last target`` ``[B, L + 1]``, ``input_mask[:, 1:] = loss_mask``."""
  from tunix.sft import peft_trainer
  tokens = jnp.concatenate([batch["tokens"], batch["targets"][:, -1:]], axis=1)
  mask = batch["loss_mask"]
  mask = jnp.concatenate([jnp.zeros_like(mask[:, :1]), mask], axis=1)
  return peft_trainer.TrainingInput(input_tokens=tokens, input_mask=mask)


def _tunix_model_input(x):
  from tunix.generate import utils as tunix_utils
  pad_mask = x.input_tokens != PAD_ID
  return {"input_tokens": x.input_tokens, "input_mask": x.input_mask,
          "positions": tunix_utils.build_positions_from_mask(pad_mask),
          "attention_mask": tunix_utils.make_causal_attn_mask(
              pad_mask, x.input_tokens.shape[1])}


def _tunix_forward(model, input_tokens, input_mask, positions, attention_mask):
  del input_mask
  logits, _ = model(input_tokens, positions, None, attention_mask)
  return logits[:, :-1]  # position t predicts input_tokens[t + 1]


class TunixStep:
  """One step of Tunix's ``DistillationTrainer`` (``LogitStrategy``) on a kdjax batch.

  ``__call__(batch) -> (loss, aux)`` runs ``_prepare_inputs`` (the teacher's
  jitted forward) and the trainer's jitted ``train_step``, which updates the
  student (an ``nnx.Module``) in place.
  """

  def __init__(self, student, teacher, optimizer,
               temperature: float = TEMPERATURE, alpha: float = ALPHA):
    from tunix.distillation import distillation_trainer
    from tunix.distillation.strategies import logit
    vocab = lm.tunix_vocab_rows(lm.tunix_family(student), student.config)

    def labels_fn(input_tokens, input_mask, **unused):
      del unused
      return (jax.nn.one_hot(input_tokens[:, 1:], vocab)
              * input_mask[:, 1:, None].astype(jnp.float32))

    strategy = logit.LogitStrategy(_tunix_forward, _tunix_forward, labels_fn,
                                   temperature=temperature, alpha=alpha)
    self.trainer = distillation_trainer.DistillationTrainer(
        student, teacher, strategy, optimizer,
        distillation_trainer.TrainingConfig(eval_every_n_steps=10**9,
                                            max_steps=10**9,
                                            pbar_description=None),
    ).with_gen_model_input_fn(_tunix_model_input)
    self.train_step, _ = self.trainer.jit_train_and_eval_step()

  def prepare(self, batch: dict):
    return self.trainer._prepare_inputs(to_tunix_input(batch))  # pylint: disable=protected-access

  def __call__(self, batch: dict):
    loss, aux, _ = self.train_step(self.prepare(batch))
    return loss, aux

  def compile(self, batch: dict) -> dict:
    """Compiles Tunix's two jitted functions for ``batch``'s shapes and puts the
    executables where the trainer calls them (so that timing does not compile
    a second time); returns their memory: the temporary bytes of the train
    step and of the teacher forward, and the bytes of the teacher output that
    passes from one to the other (an argument of the train step)."""
    import functools
    strategy = self.trainer.strategy
    inputs = _tunix_model_input(to_tunix_input(batch))
    teacher = strategy._teacher_forward_fn.lower(  # pylint: disable=protected-access
        self.trainer.teacher_model, **inputs).compile()
    strategy._teacher_forward_fn = teacher  # pylint: disable=protected-access
    example = self.prepare(batch)
    step = self.train_step  # functools.partial(nnx.jit(...), model, optimizer)
    compiled = step.func.lower(*step.args, example).compile()
    self.train_step = functools.partial(compiled, *step.args)
    teacher_out = int(np.prod(example.teacher_output.shape)) * \
        example.teacher_output.dtype.itemsize
    train_temp = compiled.memory_analysis().temp_size_in_bytes
    teacher_temp = teacher.memory_analysis().temp_size_in_bytes
    return {"train_temp": train_temp, "teacher_temp": teacher_temp,
            "teacher_output": teacher_out,
            "peak": max(teacher_temp, train_temp + teacher_out)}


def _mean_over_positions_ce(lean: bool, chunk: int):
  """kdjax's CE term times ``N / (B L)``: Tunix's mean over all positions."""
  base = (lm.lean_token_ce_term(chunk_size=chunk) if lean
          else lm.token_ce_term())

  def term(inputs):
    mask = inputs.batch[lm.MASK_KEY]
    return base(inputs) * jnp.sum(mask) / mask.size

  return term


def aligned_kdjax_loss(*, lean: bool = False, chunk: int = 16,
                       temperature: float = TEMPERATURE, alpha: float = ALPHA):
  """kdjax's loss in Tunix's ``LogitStrategy`` convention: ``alpha * T^2 *
  KL`` averaged over every position (``mask_key=None``) ``+ (1 - alpha) *
  CE`` averaged over all positions with masked labels."""
  kd = (lm.lean_token_kd_term("kl", mask_key=None, chunk_size=chunk) if lean
        else lm.token_kd_term("kl", mask_key=None))
  return losses.compose([
      losses.Term("kd", kd, weight=alpha),
      losses.Term("ce", _mean_over_positions_ce(lean, chunk),
                  weight=1.0 - alpha, needs_teacher=False)],
      temperature=temperature)


def kdjax_loss(*, temperature: float = TEMPERATURE, alpha: float = ALPHA):
  """kdjax's own convention: both terms averaged over the ``loss_mask`` tokens."""
  return losses.compose([
      losses.Term("kd", lm.token_kd_term("kl"), weight=alpha),
      losses.Term("ce", lm.token_ce_term(), weight=1.0 - alpha,
                  needs_teacher=False)], temperature=temperature)


def bench_size(size: Size, *, steps: int, warmup: int, lr: float = 0.1
               ) -> list[dict]:
  teacher, student = make_pair(size)
  batches = [with_pad_mask(b) for b in make_batches(size, 4)]
  opt = optax.sgd(lr)
  runners, temps = {}, {}
  for lean in (False, True):
    name = "kdjax lean" if lean else "kdjax plain"
    s_apply, s_vars = lm.make_tunix_lm_apply(student, compute_logits=not lean)
    t_apply, t_vars = lm.make_tunix_lm_apply(teacher, compute_logits=not lean)
    step = lm.make_lm_train_step(s_apply, t_apply,
                                 aligned_kdjax_loss(lean=lean,
                                                    chunk=size.chunk), opt)
    state = train.create_state(s_vars, opt, rng=jax.random.key(0))
    # The jitted step's executable: its memory analysis, and what is timed
    # (a plain call after .lower().compile() would compile a second time).
    step = step.lower(state, t_vars, batches[0]).compile()
    temps[name] = step.memory_analysis().temp_size_in_bytes
    holder = {"state": state}

    def run(batch, step=step, holder=holder, t_vars=t_vars):
      holder["state"], metrics = step(holder["state"], t_vars, batch)
      return metrics["loss"]

    runners[name] = run
  tunix = TunixStep(student, teacher, optax.sgd(lr))
  tunix_mem = tunix.compile(batches[0])
  temps["tunix"] = tunix_mem["peak"]
  runners["tunix"] = lambda batch: tunix(batch)[0]
  times = {name: [] for name in runners}
  order = ("tunix", "kdjax plain", "kdjax lean")
  for i in range(warmup + steps):
    for name in order:
      batch = batches[i % len(batches)]
      start = time.perf_counter()
      jax.block_until_ready(runners[name](batch))
      if i >= warmup:
        times[name].append(time.perf_counter() - start)
  rows = []
  for name in order:
    rows.append({"size": size.name, "vocab": size.vocab, "step": name,
                 "ms": 1e3 * statistics.median(times[name]),
                 "temp_bytes": temps[name],
                 "detail": tunix_mem if name == "tunix" else None})
  return rows


class _IdTokenizer:
  """Token ids as text (``"5 17 3"``) for Tunix's string-in sampler."""

  def __init__(self, bos_id=None, eos_id=1, pad_id=PAD_ID):
    self._bos, self._eos, self._pad = bos_id, eos_id, pad_id

  def encode(self, text, **unused):
    del unused
    return [int(t) for t in text.split()]

  def decode(self, ids, **unused):
    del unused
    return " ".join(str(int(i)) for i in ids)

  def bos_id(self):
    return self._bos

  def eos_id(self):
    return self._eos

  def pad_id(self):
    return self._pad


def bench_samplers(*, vocab=1024, layers=2, dim=64, batch=8, prompt=16,
                   new=48, repeats=5) -> list[dict]:
  """Tokens/s of greedy generation from one Tunix Qwen3: kdjax's KV-cache
  sampler (``kdjax.lm.tunix_generate``, one jitted program) vs Tunix's
  ``tunix.generate.sampler.Sampler`` (jitted prefill + decode loop, driven
  from the host with strings). ``batch x new`` tokens a call; median of
  ``repeats`` calls after a warm-up call. EOS is never produced (Tunix:
  ``forbidden_tokens``; kdjax: ``eos_id=None``)."""
  from tunix.generate import sampler as tunix_sampler
  size = Size("sampler", vocab=vocab, batch=batch, seq=prompt + new,
              student_layers=layers, student_dim=dim, teacher_layers=layers,
              teacher_dim=dim)
  model = _qwen3(size, layers, dim, seed=0)
  apply, variables = lm.make_tunix_lm_apply(model)
  rng = np.random.default_rng(0)
  prompts = rng.integers(3, vocab, (batch, prompt)).astype(np.int32)
  buf = jnp.zeros((batch, prompt + new), jnp.int32).at[:, :prompt].set(prompts)
  plen = jnp.full((batch,), prompt, jnp.int32)
  config = lm.SamplingConfig(temperature=0.0, prefill_length=prompt)
  generate = jax.jit(lambda v, b, k: lm.tunix_generate(apply, v, b, plen, k,
                                                       config).tokens)
  tunix = tunix_sampler.Sampler(
      model, _IdTokenizer(eos_id=1),
      tunix_sampler.CacheConfig(cache_size=prompt + new,
                                num_layers=model.config.num_layers,
                                num_kv_heads=model.config.num_kv_heads,
                                head_dim=model.config.head_dim))
  texts = [" ".join(map(str, p)) for p in prompts]

  def run_tunix():
    return tunix(texts, max_generation_steps=new, max_prompt_length=prompt,
                 forbidden_tokens=[1], echo=False)

  def run_kdjax():
    return np.asarray(generate(variables, buf, jax.random.key(0)))

  kd_tokens = run_kdjax()[:, prompt:]
  tunix_tokens = np.asarray([o for o in run_tunix().tokens])
  agree = float(np.mean(kd_tokens == tunix_tokens[:, :new]))
  times = {"kdjax KV-cache sampler": [], "tunix Sampler": []}
  for _ in range(repeats):
    for name, fn in (("kdjax KV-cache sampler", run_kdjax),
                     ("tunix Sampler", run_tunix)):
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  rows = [{"sampler": name, "tokens_per_s": batch * new / statistics.median(t),
           "ms": 1e3 * statistics.median(t), "agree": agree}
          for name, t in times.items()]
  print(f"\ngreedy generation, Qwen3 {layers} x {dim}, V={vocab}, batch "
        f"{batch}, prompt {prompt}, {new} new tokens (median of {repeats}); "
        f"greedy tokens identical: {100 * agree:.1f}%")
  for r in rows:
    print(f"  {r['sampler']:24s} {r['ms']:8.1f} ms/call "
          f"{r['tokens_per_s']:9.0f} tokens/s")
  return rows


def print_table(rows: Sequence[dict]) -> None:
  print(f"{'size':8s} {'V':>7s} {'step':12s} {'ms/step':>9s} {'vs tunix':>8s} "
        f"{'temp MiB':>9s} {'vs tunix':>8s}")
  for r in rows:
    base = next(x for x in rows if x["size"] == r["size"]
                and x["step"] == "tunix")
    print(f"{r['size']:8s} {r['vocab']:7d} {r['step']:12s} {r['ms']:9.1f} "
          f"{r['ms'] / base['ms']:8.2f} {r['temp_bytes'] / 2**20:9.1f} "
          f"{r['temp_bytes'] / base['temp_bytes']:8.3f}")
  for r in rows:
    if r["detail"]:
      d = r["detail"]
      print(f"  tunix {r['size']}: train step temp "
            f"{d['train_temp'] / 2**20:.1f} MiB + teacher logits "
            f"{d['teacher_output'] / 2**20:.1f} MiB; teacher forward temp "
            f"{d['teacher_temp'] / 2**20:.1f} MiB")


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--smoke", action="store_true",
                      help="one tiny size, 2 steps (seconds)")
  parser.add_argument("--gpu", action="store_true", help="the GPU sizes")
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--only", default=None,
                      help="run only the size of this name")
  parser.add_argument("--sampler", action="store_true",
                      help="also time kdjax's KV-cache sampler vs Tunix's "
                      "Sampler (default on without --smoke)")
  args = parser.parse_args(argv)
  sizes = SMOKE if args.smoke else GPU if args.gpu else CPU
  if args.only:
    sizes = tuple(s for s in sizes if s.name == args.only)
  steps = args.steps or (2 if args.smoke else 10)
  warmup = 1 if args.smoke else args.warmup
  print(f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}); "
        f"{steps} timed steps after {warmup} warm-up, median")
  rows = []
  for size in sizes:
    rows += bench_size(size, steps=steps, warmup=warmup)
  print_table(rows)
  if args.sampler or not args.smoke:
    bench_samplers()
  return rows


if __name__ == "__main__":
  main()
