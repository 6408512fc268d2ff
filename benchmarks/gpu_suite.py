"""One accelerator benchmark suite for kdjax (issue #25, item 6), in <= 8 minutes.

Run on whatever JAX finds (GPU or TPU; CPU with ``--cpu-size``), it measures,
in this order (the numbers are the issue's):

1. ``matmul_peak``: the bf16 matmul peak of device 0, *measured*: the best of
   10 timed ``n x n @ n x n`` bfloat16 matmuls
   (``bench_lm_step.measured_matmul_peak``; n = 8192).
2. ``lm_step``: the token-KD train step at the issue's size (teacher 24 x
   1024, student 12 x 768, vocab 32000, sequence 1024, batch 16, bfloat16
   compute with float32 master weights via ``kdjax.train.Policy.bf16()``,
   AdamW, forward KL on every token): kdjax's step vs the same step
   hand-written with flax + optax (``bench_lm_step.compare_lm_steps``):
   ms/step (median over interleaved rounds, after warm-up), tokens/s, MFU
   (matmul FLOPs per step, counted as in ``bench_lm_step.py``, / time /
   the peak of section 1) and the compiled step's
   ``memory_analysis().temp_size_in_bytes``.
6. ``memory``: the kdjax step of section 2, its compiled
   ``memory_analysis()`` (argument + output + temp - alias, the donated
   buffers) vs device 0's ``memory_stats()`` read before its first call and
   after its warm-up (``peak_bytes_in_use`` is the process's high-water mark:
   it also holds what was live before; "n/a" where the backend has no memory
   stats, e.g. CPU). No time of its own: the reads happen in section 2.
5. ``loop``: the library loop ``kdjax.train.fit`` vs a bare Python loop,
   both calling the same jitted ``kdjax.train.make_train_step`` of the MLP
   pair of ``bench_steps.py`` (784-1200-1200-10 teacher, 784-800-800-10
   student) at batch 128: ms/step and samples/s (median over interleaved
   rounds of ``--loop-steps`` steps each; ``fit`` logs once per round).
4. ``sharded``: the kdjax step of section 2 built with
   ``kdjax.parallel.make_sharded_train_step`` over a data-parallel mesh of
   every local device (``make_mesh({"data": n})``,
   ``ShardingRules.data_parallel()``; one device: the 1-device mesh); the
   global batch is section 2's, rounded up to a multiple of the device
   count. MFU against n x the peak of section 1; temp bytes per device.
3. ``large_vocab``: the step of section 2 at vocab 128256
   (``bench_large_vocab.step_table``): plain (full ``[B, T, V]`` logits),
   hand-written, and lean (``kdjax.lm.lean_token_kd_term``, fused, from
   hidden states; ``choose_chunk_size`` chunks).

Sections run in the order above (the cheap and the most asked-for first).
The global time budget ``--budget-s`` (default 450 s) is checked before each
section: a section that would start after it, or with less time left than
its reserve (the least a section needs at the issue's size), is skipped and
says so. At ``budget + --grace-s`` a section still running is interrupted (at
its next Python instruction: a compile is not cut short) and reported as
failed. Each section is wrapped: one that fails (e.g. out of memory) is
reported with its error, and the rest still run. Only measured numbers are
printed (ratios of measured numbers included); nothing is estimated except
the compiler's own ``memory_analysis()``, which is labelled as such.

Writes, after every section (so a killed run keeps what it had), to
``--out DIR``: ``gpu_suite.json`` (every section: ``status`` ``ok`` /
``failed`` / ``skipped`` with ``reason``, its table and raw data),
``gpu_suite.md`` (the tables) and ``gpu_suite.log`` (everything printed).

Usage::

  python benchmarks/gpu_suite.py --out $OUT                 # on a GPU/TPU
  python benchmarks/gpu_suite.py --cpu-size --out /tmp/gs   # tiny, on CPU
  python benchmarks/gpu_suite.py --out $OUT --sections matmul_peak,lm_step

Nothing here imports tensorflow-datasets or grain (``tests/benchmarks``
checks it with both blocked).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import signal
import sys
import time
import traceback
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import optax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from kdjax import lm  # noqa: E402
from kdjax import losses  # noqa: E402
from kdjax import parallel  # noqa: E402
from kdjax import train  # noqa: E402

import bench_large_vocab  # noqa: E402
import bench_lm_step  # noqa: E402
import bench_steps  # noqa: E402

MIB = 2**20
JSON_NAME, MD_NAME, LOG_NAME = "gpu_suite.json", "gpu_suite.md", "gpu_suite.log"


@dataclasses.dataclass(frozen=True)
class Sizes:
  """The shapes and step counts of one run."""
  name: str
  teacher: dict
  student: dict
  vocab: int
  large_vocab: int
  seq: int
  batch: int
  matmul_n: int
  lean_chunk: Optional[int]
  loop_model: str
  loop_batch: int
  steps: int
  repeats: int
  loop_steps: int
  reserve_scale: float


ISSUE_SIZE = Sizes(
    name="issue (GPU) size", teacher=bench_lm_step.GPU_TEACHER,
    student=bench_lm_step.GPU_STUDENT, vocab=32000, large_vocab=128256,
    seq=1024, batch=16, matmul_n=8192, lean_chunk=None, loop_model="mlp",
    loop_batch=128, steps=5, repeats=5, loop_steps=20, reserve_scale=1.0)
CPU_SIZE = Sizes(
    name="CPU size (tiny)", teacher=dict(num_layers=1, num_heads=2, d_model=64),
    student=dict(num_layers=1, num_heads=2, d_model=32), vocab=512,
    large_vocab=1024, seq=32, batch=4, matmul_n=256, lean_chunk=32,
    loop_model="mlp", loop_batch=128, steps=2, repeats=3, loop_steps=4,
    reserve_scale=0.02)


class BudgetExceeded(Exception):
  """Raised (by SIGALRM) in a section still running at budget + grace."""


@dataclasses.dataclass
class Section:
  key: str
  title: str
  run: Callable[["Context"], dict]
  reserve_s: float  # the least it needs at the issue's size


@dataclasses.dataclass
class Context:
  """What sections share: the sizes, the measured peak, section 2's result."""
  sizes: Sizes
  peak: Optional[float] = None
  lm_result: Optional[dict] = None
  lm_batch: Optional[int] = None


def _mib(n: Optional[float]) -> Optional[float]:
  return None if n is None else round(n / MIB, 1)


def _fmt(value: Any) -> str:
  if value is None:
    return "n/a"
  if isinstance(value, float):
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
  return str(value)


def _mfu(flops: float, ms: Optional[float], peak: Optional[float]) -> Optional[str]:
  if not (ms and peak):
    return None
  return f"{100 * flops / (ms / 1e3) / peak:.1f}%"


def _first_line(error: BaseException) -> str:
  text = f"{type(error).__name__}: {error}".strip().splitlines()
  return text[0][:300] if text else type(error).__name__


def _kd_configs(sizes: Sizes, vocab: int) -> tuple:
  return bench_lm_step.lm_configs(sizes.teacher, sizes.student, vocab,
                                  sizes.seq)


# -----------------------------------------------------------------------------
# The sections.
# -----------------------------------------------------------------------------


def section_matmul_peak(ctx: Context) -> dict:
  n = ctx.sizes.matmul_n
  ctx.peak = bench_lm_step.measured_matmul_peak(n)
  return {"columns": ["matmul", "dtype", "TFLOP/s (best of 10)"],
          "rows": [[f"{n}x{n} @ {n}x{n}", "bfloat16",
                    round(ctx.peak / 1e12, 4)]],
          "data": {"n": n, "flops_per_s": ctx.peak}}


def section_lm_step(ctx: Context) -> dict:
  s = ctx.sizes
  t_cfg, s_cfg = _kd_configs(s, s.vocab)
  r = bench_lm_step.compare_lm_steps(t_cfg, s_cfg, s.batch, s.seq, s.steps,
                                     s.repeats, parts=False)
  ctx.lm_result, ctx.lm_batch = r, s.batch
  rows = []
  for name in ("kdjax", "hand-written"):
    ms, mem = r["ms"][name], r["memory"][name]
    rows.append([name, round(ms, 3),
                 round(r["tokens_per_step"] / ms * 1e3),
                 _mfu(r["flops_per_step"], ms, ctx.peak),
                 _mib(mem["temp"]) if mem else None,
                 round(r["loss"][name], 6)])
  notes = [f"teacher {t_cfg.num_layers}x{t_cfg.d_model}, student "
           f"{s_cfg.num_layers}x{s_cfg.d_model}, vocab {s.vocab}, seq "
           f"{s.seq}, batch {s.batch}; bf16 compute (Policy.bf16()), f32 "
           f"master weights, AdamW, forward KL on every token; median of "
           f"{s.repeats} rounds x {s.steps} steps",
           f"kdjax / hand-written: "
           f"{r['ms']['kdjax'] / r['ms']['hand-written']:.3f}x (time)"]
  if ctx.peak is None:
    notes.append("MFU n/a: section 1 (the measured peak) did not run")
  return {"columns": ["variant", "ms/step", "tokens/s", "MFU", "temp MiB",
                      "loss@init"],
          "rows": rows, "notes": notes,
          "data": {"ms": r["ms"], "memory": r["memory"],
                   "tokens_per_step": r["tokens_per_step"],
                   "flops_per_step": r["flops_per_step"], "loss": r["loss"]}}


def section_memory(ctx: Context) -> dict:
  r = ctx.lm_result
  if r is None:
    raise RuntimeError("section 2 (lm_step), whose kdjax step this measures, "
                       "produced no result")
  mem = r["memory"]["kdjax"]
  before = r["device_memory"]["before_kdjax"]
  after = r["device_memory"]["after_kdjax"]
  estimate = (None if mem is None else
              mem["argument"] + mem["output"] + mem["temp"] - mem["alias"])
  peak = after["peak_bytes_in_use"] if after else None
  rows = [["kdjax LM step (section 2)",
           *(_mib(mem[k]) if mem else None
             for k in ("argument", "output", "temp", "alias")),
           _mib(estimate),
           _mib(before["bytes_in_use"]) if before else None,
           _mib(before["peak_bytes_in_use"]) if before else None,
           _mib(peak),
           (f"{peak / estimate:.3f}" if peak and estimate else None)]]
  notes = ["estimate = argument + output + temp - alias (donated) bytes of "
           "the compiled step (memory_analysis(), the compiler's figure); "
           "measured = device 0's memory_stats(): bytes_in_use before the "
           "step's first call, peak_bytes_in_use (the process's high-water "
           "mark) before it and after two calls"]
  if after is None:
    notes.append("measured: n/a (this backend's memory_stats() has no "
                 "peak_bytes_in_use)")
  return {"columns": ["step", "arg MiB", "out MiB", "temp MiB", "alias MiB",
                      "estimate MiB", "in use before MiB",
                      "peak before MiB", "peak after MiB",
                      "peak / estimate"],
          "rows": rows, "notes": notes,
          "data": {"memory_analysis": mem, "estimate_bytes": estimate,
                   "device_before": before, "device_after": after}}


def section_loop(ctx: Context) -> dict:
  s = ctx.sizes
  setup = bench_steps.image_setup(s.loop_model, s.loop_batch)
  step, tv, batches = setup["kd_step"], setup["teacher_vars"], setup["batches"]
  n = s.loop_steps

  def fresh():
    return train.create_state(setup["init_student"](), setup["optimizer"],
                              rng=jax.random.key(0))

  holder = {"fit": fresh(), "bare": fresh()}
  for key in holder:  # compile (once: the same jitted step) + warm up
    for i in range(2):
      holder[key], m = step(holder[key], tv, batches[i % len(batches)])
    jax.block_until_ready(m)

  def run_fit():
    stream = (batches[i % len(batches)] for i in range(n))
    holder["fit"], _ = train.fit(step, holder["fit"], tv, stream,
                                 log_every=n)
    return holder["fit"]

  def run_bare():
    state = holder["bare"]
    for i in range(n):
      state, _ = step(state, tv, batches[i % len(batches)])
    holder["bare"] = state
    return state

  per_round = bench_lm_step.interleaved_ms(
      {"kdjax.train.fit": run_fit, "bare Python loop": run_bare}, 1,
      s.repeats + 2)
  ms = {k: v / n for k, v in per_round.items()}
  rows = [[name, round(ms[name], 4), round(s.loop_batch / ms[name] * 1e3)]
          for name in ms]
  notes = [f"{s.loop_model} pair of bench_steps.py, batch {s.loop_batch}, "
           f"kdjax.train.make_train_step (teacher online); median of "
           f"{s.repeats + 2} interleaved rounds of {n} steps; fit(log_every="
           f"{n}): one metrics fetch per round",
           f"fit / bare: {ms['kdjax.train.fit'] / ms['bare Python loop']:.3f}x"
           " (time)"]
  return {"columns": ["loop", "ms/step", "samples/s"], "rows": rows,
          "notes": notes, "data": {"ms": ms, "steps_per_round": n,
                                   "batch": s.loop_batch}}


def section_sharded(ctx: Context) -> dict:
  s = ctx.sizes
  devices = jax.local_devices()
  n = len(devices)
  batch_size = -(-s.batch // n) * n
  t_cfg, s_cfg = _kd_configs(s, s.vocab)
  mesh = parallel.make_mesh({parallel.DATA: n}, devices=devices)
  rules = parallel.ShardingRules.data_parallel()
  s_apply, t_apply = lm.make_lm_apply(s_cfg), lm.make_lm_apply(t_cfg)
  teacher = lm.init_lm(t_cfg, jax.random.key(1), seq_len=s.seq)
  optimizer = optax.adamw(1e-4, weight_decay=0.01)
  loss_fn = losses.compose([losses.Term("kd", lm.token_kd_term("kl"))],
                           temperature=1.0)
  state = train.create_state(lm.init_lm(s_cfg, jax.random.key(0),
                                        seq_len=s.seq),
                             optimizer, rng=jax.random.key(2))
  step = parallel.make_sharded_train_step(
      s_apply, t_apply, loss_fn, optimizer,
      lm.lm_step_options(policy=train.Policy.bf16()), mesh=mesh, state=state,
      teacher_variables=teacher, rules=rules)
  holder = {"state": parallel.shard_state(state, mesh, rules)}
  del state
  teacher = parallel.shard_teacher(teacher, mesh, rules)
  batch = parallel.shard_batch(
      bench_lm_step.make_lm_batch(s.vocab, batch_size, s.seq), mesh, rules)
  mem = bench_lm_step.memory_bytes(
      step.lower(holder["state"], teacher, batch).compile())

  def run():
    holder["state"], m = step(holder["state"], teacher, batch)
    return m["loss"]

  loss0 = float(run())
  jax.block_until_ready(run())
  ms = bench_lm_step.interleaved_ms({"kdjax sharded": run}, s.steps,
                                    s.repeats)["kdjax sharded"]
  tokens = batch_size * s.seq
  flops = bench_lm_step.step_flops(t_cfg, s_cfg, batch_size, s.seq)
  rows = [[f"kdjax, data parallel x{n}", n, batch_size, round(ms, 3),
           round(tokens / ms * 1e3),
           _mfu(flops, ms, ctx.peak * n if ctx.peak else None),
           _mib(mem["temp"]) if mem else None, round(loss0, 6)]]
  notes = [f"mesh {dict(mesh.shape)} of {devices[0].device_kind}; "
           f"ShardingRules.data_parallel() (student and teacher replicated, "
           f"batch split); MFU against {n} x the measured peak; temp bytes "
           f"per device (memory_analysis of the sharded executable)"]
  single = ctx.lm_result["ms"]["kdjax"] if ctx.lm_result else None
  if single and batch_size == ctx.lm_batch:
    notes.append(f"sharded / section 2 kdjax (unsharded, same batch): "
                 f"{ms / single:.3f}x (time)")
  return {"columns": ["step", "devices", "global batch", "ms/step",
                      "tokens/s", "MFU", "temp MiB/device", "loss@init"],
          "rows": rows, "notes": notes,
          "data": {"devices": n, "global_batch": batch_size, "ms": ms,
                   "memory": mem, "tokens_per_step": tokens,
                   "flops_per_step": flops}}


def section_large_vocab(ctx: Context) -> dict:
  s = ctx.sizes
  variants = ("plain", "hand-written", "lean fused")
  r = bench_large_vocab.step_table(s.large_vocab, s.teacher, s.student,
                                   s.batch, s.seq, s.lean_chunk, s.steps,
                                   s.repeats, variants=variants)
  t_cfg, s_cfg = _kd_configs(s, s.large_vocab)
  flops = bench_lm_step.step_flops(t_cfg, s_cfg, s.batch, s.seq)
  rows = []
  for name in variants:
    ms, temp = r["ms"].get(name), r["temp"].get(name)
    rows.append([name, None if ms is None else round(ms, 3),
                 None if ms is None else round(r["tokens_per_step"] / ms * 1e3),
                 _mfu(flops, ms, ctx.peak), _mib(temp),
                 None if name not in r["loss"] else round(r["loss"][name], 6),
                 r["failed"].get(name, "")])
  notes = [f"vocab {s.large_vocab}; lean: lean_token_kd_term('kl', "
           f"implementation='fused', chunk_size={r['chunk']}) from hidden "
           f"states; else as section 2"]
  plain_t, lean_t = r["temp"].get("plain"), r["temp"].get("lean fused")
  if plain_t and lean_t:
    notes.append(f"plain temp / lean temp: {plain_t / lean_t:.2f}x")
  if r["ms"].get("plain") and r["ms"].get("lean fused"):
    notes.append(f"lean / plain: {r['ms']['lean fused'] / r['ms']['plain']:.3f}x"
                 " (time)")
  return {"columns": ["variant", "ms/step", "tokens/s", "MFU", "temp MiB",
                      "loss@init", "error"],
          "rows": rows, "notes": notes,
          "data": dict(r, flops_per_step=flops)}


SECTIONS = (
    Section("matmul_peak", "1. bf16 matmul peak (measured)",
            section_matmul_peak, 10),
    Section("lm_step", "2. LM token-KD step: kdjax vs hand-written",
            section_lm_step, 60),
    Section("memory", "6. memory: compiled estimate vs measured device peak",
            section_memory, 0),
    Section("loop", "5. library loop (kdjax.train.fit) vs bare loop",
            section_loop, 15),
    Section("sharded", "4. kdjax step sharded over every local device",
            section_sharded, 45),
    Section("large_vocab",
            "3. large vocabulary (128256 at the issue's size): plain vs lean",
            section_large_vocab, 90),
)


# -----------------------------------------------------------------------------
# Output.
# -----------------------------------------------------------------------------


class _Tee:
  """Writes to the console and the log file."""

  def __init__(self, stream, path: str):
    self.stream, self.file = stream, open(path, "w", encoding="utf-8")

  def write(self, text):
    self.stream.write(text)
    self.file.write(text)
    return len(text)

  def flush(self):
    self.stream.flush()
    self.file.flush()


def _table_lines(columns, rows) -> list:
  cells = [[_fmt(c) for c in row] for row in rows]
  widths = [max([len(str(h))] + [len(r[i]) for r in cells])
            for i, h in enumerate(columns)]
  line = lambda vals: "  ".join(
      (v.ljust(w) if i == 0 else v.rjust(w))
      for i, (v, w) in enumerate(zip(vals, widths)))
  return [line([str(c) for c in columns]), line(["-" * w for w in widths])] + [
      line(r) for r in cells]


def _print_section(title: str, result: dict) -> None:
  print(f"\n== {title} == [{result['status']}, {result.get('wall_s', 0):.1f} s]")
  if result["status"] != "ok":
    print(f"{result['status'].upper()}: {result['reason']}")
    return
  print("\n".join(_table_lines(result["columns"], result["rows"])))
  for note in result.get("notes", ()):
    print(f"  {note}")


def _markdown(report: dict) -> str:
  dev = report["device"]
  out = ["# kdjax GPU suite (issue #25, item 6)", "",
         f"- device: {dev['device_kind']} (backend {dev['backend']}, "
         f"{dev['local_device_count']} local device(s)); jax "
         f"{dev['jax_version']}",
         f"- sizes: {report['sizes']['name']}; budget {report['budget_s']} s; "
         f"elapsed {report['elapsed_s']:.1f} s"]
  if dev["backend"] == "cpu":
    out.append("- CPU run: these are CPU numbers, not GPU numbers.")
  for sec in SECTIONS:
    res = report["sections"].get(sec.key)
    if res is None:
      continue
    out += ["", f"## {sec.title}", ""]
    if res["status"] != "ok":
      out.append(f"**{res['status']}**: {res['reason']}")
      continue
    cols = res["columns"]
    out.append("| " + " | ".join(str(c) for c in cols) + " |")
    out.append("|" + "|".join("---" for _ in cols) + "|")
    for row in res["rows"]:
      out.append("| " + " | ".join(_fmt(c) for c in row) + " |")
    out += [""] + [f"- {n}" for n in res.get("notes", ())]
    out.append(f"- wall time of the section: {res['wall_s']:.1f} s")
  return "\n".join(out) + "\n"


def _write(report: dict, out_dir: str) -> None:
  with open(os.path.join(out_dir, JSON_NAME), "w", encoding="utf-8") as f:
    json.dump(report, f, indent=1, default=str)
  with open(os.path.join(out_dir, MD_NAME), "w", encoding="utf-8") as f:
    f.write(_markdown(report))


# -----------------------------------------------------------------------------
# The run.
# -----------------------------------------------------------------------------


def device_info() -> dict:
  dev = jax.devices()[0]
  return {"device_kind": dev.device_kind, "backend": jax.default_backend(),
          "platform": dev.platform, "jax_version": jax.__version__,
          "local_device_count": jax.local_device_count(),
          "device_count": jax.device_count()}


_RUNNING = {"section": False}


def _on_alarm(signum, frame):
  """Interrupts a running section at budget + grace (never the bookkeeping)."""
  del signum, frame
  if _RUNNING["section"]:
    raise BudgetExceeded("the time budget (plus grace) ran out while the "
                         "section was running")


def run_suite(args) -> dict:
  """Runs the selected sections within the budget; returns the report."""
  t0 = time.perf_counter()
  sizes = CPU_SIZE if args.cpu_size else ISSUE_SIZE
  if args.steps:
    sizes = dataclasses.replace(sizes, steps=args.steps)
  if args.repeats:
    sizes = dataclasses.replace(sizes, repeats=args.repeats)
  if args.loop_steps:
    sizes = dataclasses.replace(sizes, loop_steps=args.loop_steps)
  selected = ([k.strip() for k in args.sections.split(",")] if args.sections
              else [sec.key for sec in SECTIONS])
  unknown = set(selected) - {sec.key for sec in SECTIONS}
  if unknown:
    raise SystemExit(f"unknown --sections {sorted(unknown)}; choose from "
                     f"{[sec.key for sec in SECTIONS]}")
  dev = device_info()
  print(f"device: {dev['device_kind']} | backend: {dev['backend']} | "
        f"{dev['local_device_count']} local device(s) | jax "
        f"{dev['jax_version']}")
  print(f"sizes: {sizes.name}; budget {args.budget_s:.0f} s "
        f"(+{args.grace_s:.0f} s grace); output: {args.out}")
  if dev["backend"] == "cpu":
    print("NOTE: CPU run. These are CPU numbers, not GPU numbers.")
  report = {"device": dev, "sizes": dataclasses.asdict(sizes),
            "budget_s": args.budget_s, "argv": sys.argv[1:],
            "sections": {}, "elapsed_s": 0.0}
  ctx = Context(sizes)
  use_alarm = hasattr(signal, "SIGALRM")
  if use_alarm:
    signal.signal(signal.SIGALRM, _on_alarm)
    signal.setitimer(signal.ITIMER_REAL, args.budget_s + args.grace_s)
  try:
    for sec in SECTIONS:
      elapsed = time.perf_counter() - t0
      left = args.budget_s - elapsed
      reserve = sec.reserve_s * sizes.reserve_scale
      start = time.perf_counter()
      if sec.key not in selected:
        result = {"status": "skipped",
                  "reason": "not selected (--sections)"}
      elif left <= 0 or left < reserve:
        result = {"status": "skipped",
                  "reason": f"time budget: {elapsed:.0f} s elapsed of "
                            f"--budget-s {args.budget_s:.0f}; {max(left, 0):.0f}"
                            f" s left, the section reserves {reserve:.0f} s"}
      else:
        try:
          _RUNNING["section"] = True
          try:
            result = dict(sec.run(ctx), status="ok")
          finally:
            _RUNNING["section"] = False
        except BudgetExceeded as e:
          result = {"status": "failed", "reason": f"interrupted: {e}"}
        except Exception as e:  # pylint: disable=broad-except
          result = {"status": "failed", "reason": _first_line(e),
                    "traceback": traceback.format_exc()[-3000:]}
        gc.collect()
      result["wall_s"] = round(time.perf_counter() - start, 2)
      if result["status"] == "ok":
        result["device_memory_after"] = bench_lm_step.device_memory()
      report["sections"][sec.key] = result
      report["elapsed_s"] = round(time.perf_counter() - t0, 2)
      _print_section(sec.title, result)
      _write(report, args.out)
  finally:
    if use_alarm:
      signal.setitimer(signal.ITIMER_REAL, 0)
  statuses = {k: v["status"] for k, v in report["sections"].items()}
  print(f"\ndone in {report['elapsed_s']:.1f} s: {statuses}")
  print(f"wrote {os.path.join(args.out, JSON_NAME)}, {MD_NAME}, {LOG_NAME}")
  return report


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", required=True,
                      help="directory for gpu_suite.json/.md/.log (created).")
  parser.add_argument("--cpu-size", action="store_true",
                      help="tiny shapes (teacher 1x64, student 1x32, vocab "
                           "512 / 1024, seq 32, batch 4; matmul 256) that "
                           "run on CPU in seconds.")
  parser.add_argument("--budget-s", type=float, default=450.0,
                      help="no section starts after this many seconds "
                           "(default 450).")
  parser.add_argument("--grace-s", type=float, default=20.0,
                      help="a section still running at budget + grace is "
                           "interrupted (default 20).")
  parser.add_argument("--sections", default=None,
                      help="comma-separated subset of: "
                           + ",".join(sec.key for sec in SECTIONS))
  parser.add_argument("--steps", type=int, default=None,
                      help="timed steps per round (5 GPU, 2 CPU size).")
  parser.add_argument("--repeats", type=int, default=None,
                      help="interleaved rounds, median reported (5 GPU, 3 "
                           "CPU size).")
  parser.add_argument("--loop-steps", type=int, default=None,
                      help="steps per round of the loop section (20 GPU, 4 "
                           "CPU size).")
  args = parser.parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  tee = _Tee(sys.stdout, os.path.join(args.out, LOG_NAME))
  sys.stdout = tee
  try:
    run_suite(args)
  finally:
    sys.stdout = tee.stream
    tee.file.close()


if __name__ == "__main__":
  main()
