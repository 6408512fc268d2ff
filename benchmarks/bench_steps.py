"""Throughput of the kdjax distillation step vs hand-written JAX steps.

For each model pair (an MLP 784-1200-1200-10 teacher / 784-800-800-10 student,
and a small CNN pair) at batch 128, on synthetic 28x28 inputs, it times:

* ``kdjax``        : ``kdjax.train.make_train_step`` (teacher online);
* ``hand-written`` : an equivalent ``jax.jit`` step written directly with
  linen ``apply``, optax and the same loss
  (``0.1 * CE + 0.9 * T^2 KL(p_teacher || q_student)``, ``T = 4``), state
  donated;
* ``student only`` : a plain hand-written student step (CE, no teacher);
* ``kdjax cached`` : ``kdjax.cache.make_cached_train_step`` on batches of a
  full-logit teacher cache (no teacher forward), and ``kdjax cached top-5``
  with a top-5 cache and ``kdjax.cache.top_k_term``.

Timing: every variant is compiled and warmed up first; then ``--repeats``
rounds, each timing ``--steps`` consecutive steps of every variant (in a
rotated order, so that variants are interleaved and share slow phases of a
busy machine), ending with ``block_until_ready``; the table reports the
median samples/s over rounds. Peak memory is the compiled step's
``memory_analysis()``: arguments + outputs + temporaries - aliased (donated)
buffers.

Usage::

  python benchmarks/bench_steps.py                  # full run
  python benchmarks/bench_steps.py --repeats 3 --steps 5 --models mlp  # quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kdjax import cache as kd_cache  # noqa: E402
from kdjax import losses  # noqa: E402
from kdjax import models  # noqa: E402
from kdjax import train  # noqa: E402

TEMPERATURE = 4.0
CE_WEIGHT, KD_WEIGHT = 0.1, 0.9
NUM_BATCHES = 4  # distinct device-resident batches, cycled


def model_pair(name: str):
  if name == "mlp":
    return (models.MLP(hidden=(1200, 1200), num_classes=10),
            models.MLP(hidden=(800, 800), num_classes=10))
  if name == "cnn":
    return (models.CNN(channels=(32, 64), dense=256, num_classes=10),
            models.CNN(channels=(16, 32), dense=128, num_classes=10))
  raise ValueError(f"unknown model {name!r}; expected 'mlp' or 'cnn'.")


def hand_written_steps(teacher, student, optimizer):
  """The reference steps, written without kdjax."""

  def kd_loss(s_logits, t_logits, labels):
    ce = optax.softmax_cross_entropy_with_integer_labels(s_logits,
                                                         labels).mean()
    log_q = jax.nn.log_softmax(s_logits / TEMPERATURE)
    log_p = jax.nn.log_softmax(t_logits / TEMPERATURE)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1).mean()
    return CE_WEIGHT * ce + KD_WEIGHT * TEMPERATURE**2 * kl

  def distill_step(params, opt_state, teacher_params, image, label):
    t_logits = jax.lax.stop_gradient(
        teacher.apply({"params": teacher_params}, image))

    def objective(p):
      return kd_loss(student.apply({"params": p}, image), t_logits, label)

    loss, grads = jax.value_and_grad(objective)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  def student_step(params, opt_state, image, label):

    def objective(p):
      logits = student.apply({"params": p}, image)
      return optax.softmax_cross_entropy_with_integer_labels(logits,
                                                             label).mean()

    loss, grads = jax.value_and_grad(objective)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return (jax.jit(distill_step, donate_argnums=(0, 1)),
          jax.jit(student_step, donate_argnums=(0, 1)))


def peak_bytes(jitted, *args) -> int:
  """arguments + outputs + temporaries - aliased, from the compiled step."""
  stats = jitted.lower(*args).compile().memory_analysis()
  if stats is None:
    return -1
  return (stats.argument_size_in_bytes + stats.output_size_in_bytes
          + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


class Variant:
  """A step plus its mutable state; ``run(n)`` does n steps and blocks."""

  def __init__(self, name, step_fn, state, batches, memory):
    self.name, self.step_fn, self.state = name, step_fn, state
    self.batches, self.memory, self.i = batches, memory, 0
    self.samples_per_s = []

  def run(self, n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
      self.state = self.step_fn(self.state, self.batches[self.i % len(
          self.batches)])
      self.i += 1
    jax.block_until_ready(self.state)
    return time.perf_counter() - start


def kd_loss_fn():
  """``0.1 * CE + 0.9 * T^2 KL(p_teacher || q_student)``, ``T = 4`` (kdjax)."""
  return losses.compose(
      [losses.Term("ce", losses.label_term(), CE_WEIGHT, needs_teacher=False),
       losses.Term("kd", losses.logit_term(losses.kl_divergence), KD_WEIGHT)],
      temperature=TEMPERATURE)


def image_setup(name: str, batch_size: int) -> dict:
  """Models, variables, data and the kdjax online-teacher step of one pair.

  Returns ``{"teacher", "student", "teacher_vars", "init_student", "data",
  "batches" (NUM_BATCHES device-resident), "optimizer", "loss_fn",
  "s_apply", "t_apply", "kd_step" (``kdjax.train.make_train_step``)}``.
  """
  teacher, student = model_pair(name)
  rng = np.random.default_rng(0)
  n = batch_size * NUM_BATCHES
  data = {"image": rng.uniform(size=(n, 28, 28, 1)).astype(np.float32),
          "label": rng.integers(0, 10, size=(n,)).astype(np.int32)}
  if name == "mlp":
    data["image"] = data["image"].reshape(n, 784)
  example = data["image"][:1]
  teacher_vars = jax.jit(teacher.init)(jax.random.key(1), example)
  init_student = lambda: jax.jit(student.init)(jax.random.key(2), example)
  optimizer = optax.adam(1e-3)
  host_batches = [{k: v[i * batch_size:(i + 1) * batch_size]
                   for k, v in data.items()} for i in range(NUM_BATCHES)]
  loss_fn = kd_loss_fn()
  s_apply, t_apply = models.from_linen(student), models.from_linen(teacher)
  return {"teacher": teacher, "student": student,
          "teacher_vars": teacher_vars, "init_student": init_student,
          "data": data, "batches": [jax.device_put(b) for b in host_batches],
          "optimizer": optimizer, "loss_fn": loss_fn, "s_apply": s_apply,
          "t_apply": t_apply,
          "kd_step": train.make_train_step(s_apply, t_apply, loss_fn,
                                           optimizer)}


def build_variants(name: str, batch_size: int, cache_dir: str) -> list:
  setup = image_setup(name, batch_size)
  teacher, student = setup["teacher"], setup["student"]
  teacher_vars, init_student = setup["teacher_vars"], setup["init_student"]
  data, batches, optimizer = setup["data"], setup["batches"], setup["optimizer"]
  loss_fn, s_apply, t_apply = setup["loss_fn"], setup["s_apply"], setup["t_apply"]
  variants = []

  # kdjax, online teacher.
  kd_step = setup["kd_step"]
  kd_state = train.create_state(init_student(), optimizer,
                                rng=jax.random.key(0))
  mem = peak_bytes(kd_step, kd_state, teacher_vars, batches[0])
  variants.append(Variant(
      "kdjax", lambda s, b: kd_step(s, teacher_vars, b)[0], kd_state, batches,
      mem))

  # Hand-written distillation step and plain student step.
  hand_distill, hand_student = hand_written_steps(teacher, student, optimizer)
  params = init_student()["params"]
  hand_state = (params, optimizer.init(params))
  t_params = teacher_vars["params"]
  mem = peak_bytes(hand_distill, *hand_state, t_params, batches[0]["image"],
                   batches[0]["label"])
  variants.append(Variant(
      "hand-written",
      lambda s, b: hand_distill(s[0], s[1], t_params, b["image"],
                                b["label"])[:2], hand_state, batches, mem))
  params = init_student()["params"]
  stud_state = (params, optimizer.init(params))
  mem = peak_bytes(hand_student, *stud_state, batches[0]["image"],
                   batches[0]["label"])
  variants.append(Variant(
      "student only",
      lambda s, b: hand_student(s[0], s[1], b["image"], b["label"])[:2],
      stud_state, batches, mem))

  # Offline cache: full logits (same loss), and top-5 with top_k_term.
  for label, k, cached_loss in [
      ("kdjax cached", None, loss_fn),
      ("kdjax cached top-5", 5, losses.compose(
          [losses.Term("ce", losses.label_term(), CE_WEIGHT,
                       needs_teacher=False),
           losses.Term("kd", kd_cache.top_k_term(), KD_WEIGHT)],
          temperature=TEMPERATURE))]:
    path = os.path.join(cache_dir, f"{name}-{k}")
    tc = kd_cache.build_teacher_cache(path, t_apply, teacher_vars, data, k=k,
                                      temperature=TEMPERATURE,
                                      batch_size=batch_size, overwrite=True)
    cached_batches = [jax.device_put(b) for b in tc.batches(batch_size)]
    c_step = kd_cache.make_cached_train_step(s_apply, tc, cached_loss,
                                             optimizer)
    c_state = train.create_state(init_student(), optimizer,
                                 rng=jax.random.key(0))
    mem = peak_bytes(c_step, c_state, None, cached_batches[0])
    variants.append(Variant(
        label, lambda s, b, c_step=c_step: c_step(s, None, b)[0], c_state,
        cached_batches, mem))
  return variants


def benchmark(name: str, batch_size: int, steps: int, repeats: int,
              warmup: int, cache_dir: str) -> list:
  variants = build_variants(name, batch_size, cache_dir)
  for v in variants:
    v.run(warmup)
  for r in range(repeats):
    order = variants[r % len(variants):] + variants[:r % len(variants)]
    for v in order:
      v.samples_per_s.append(steps * batch_size / v.run(steps))
  return variants


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--models", default="mlp,cnn")
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--steps", type=int, default=20,
                      help="steps per timed block")
  parser.add_argument("--repeats", type=int, default=7,
                      help="timed rounds (median reported)")
  parser.add_argument("--warmup", type=int, default=3)
  args = parser.parse_args(argv)
  print(f"jax {jax.__version__}, backend {jax.default_backend()}, "
        f"devices {jax.devices()}, batch {args.batch_size}, "
        f"{args.repeats} rounds x {args.steps} steps (median)")
  header = (f"{'model':5s} {'variant':20s} {'samples/s':>10s} {'min':>9s} "
            f"{'max':>9s} {'vs hand':>8s} {'peak MiB':>9s}")
  with tempfile.TemporaryDirectory() as cache_dir:
    rows = []
    for name in args.models.split(","):
      variants = benchmark(name, args.batch_size, args.steps, args.repeats,
                           args.warmup, cache_dir)
      medians = {v.name: statistics.median(v.samples_per_s) for v in variants}
      for v in variants:
        rows.append(
            f"{name:5s} {v.name:20s} {medians[v.name]:10.0f} "
            f"{min(v.samples_per_s):9.0f} {max(v.samples_per_s):9.0f} "
            f"{medians[v.name] / medians['hand-written']:8.3f} "
            f"{v.memory / 2**20:9.1f}")
      rows.append(
          f"{name:5s} kdjax / hand-written = "
          f"{medians['kdjax'] / medians['hand-written']:.3f} (target >= 0.97); "
          f"cached / online = {medians['kdjax cached'] / medians['kdjax']:.2f}x"
          " (target >= 1.5x for the MLP)")
    print(header)
    print("\n".join(rows))


if __name__ == "__main__":
  main()
