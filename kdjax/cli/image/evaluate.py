"""``kdjax eval``: accuracy, agreement, calibration, size and latency of a run.

For the run's model (and a teacher: ``--teacher TEACHER_RUN``, or the teacher
run the student was distilled from) over the evaluation split:

* top-1 accuracy and mean negative log-likelihood;
* top-1 agreement of student and teacher, and the mean
  ``KL(p_teacher || p_student)`` at T = 1;
* expected calibration error (``eval.ece_bins`` equal-width bins, Guo et al.
  2017; :mod:`kdjax.metrics`) and the reliability diagram's bins;
* trainable parameter counts;
* inference latency: the jitted forward pass at each of
  ``eval.latency_batch_sizes``, compiled and warmed up first, then the median
  of ``eval.latency_runs`` timed calls (each ``block_until_ready``).

Everything is printed and written to ``<run>/eval.json``.
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.cli import runs
from kdjax.cli.image import data as _data
from kdjax.cli.image import models as _models
from kdjax import metrics
from kdjax.cli import errors



def _model_sums(logits, labels, mask, num_bins: int) -> dict:
  logits = jnp.asarray(logits, jnp.float32)
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  nll = -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
  return {"correct": jnp.sum(mask * (jnp.argmax(logits, -1) == labels)),
          "nll": jnp.sum(mask * nll),
          "bins": metrics.calibration_sums(logits, labels,
                                               num_bins=num_bins, mask=mask)}


def make_eval_fn(student_apply, teacher_apply=None, *, num_bins: int = 15):
  """A jitted ``fn(student_vars, teacher_vars, batch) -> sums`` (add over batches)."""
  from kdjax.losses import kl_divergence  # pylint: disable=g-import-not-at-top

  def fn(student_vars, teacher_vars, batch):
    labels = batch["label"]
    mask = jnp.asarray(batch.get("mask", jnp.ones(labels.shape)), jnp.float32)
    s = student_apply(student_vars, batch, train=False).logits
    sums = {"count": jnp.sum(mask),
            "student": _model_sums(s, labels, mask, num_bins)}
    if teacher_apply is not None:
      t = teacher_apply(teacher_vars, batch, train=False).logits
      sums["teacher"] = _model_sums(t, labels, mask, num_bins)
      sums["agreement"] = jnp.sum(mask * (jnp.argmax(s, -1)
                                          == jnp.argmax(t, -1)))
      sums["kl"] = kl_divergence(jnp.asarray(s, jnp.float32),
                                 jnp.asarray(t, jnp.float32), 1.0, mask=mask,
                                 reduction="sum", scale_by_temperature=False)
    return sums

  return jax.jit(fn)


def measure_latency(apply, variables, image_shape: Sequence[int],
                    batch_sizes: Sequence[int], runs: int,
                    warmup: int = 3) -> dict:
  """Median wall time (ms) of the jitted forward pass per batch size.

  Each batch size is compiled and run ``warmup`` times first; then ``runs``
  calls are timed one by one, each ending with ``block_until_ready``.
  """
  forward = jax.jit(lambda v, x: apply(v, {"image": x}, train=False).logits)
  out = {}
  for b in batch_sizes:
    x = jnp.zeros((int(b), *image_shape), jnp.float32)
    for _ in range(warmup):
      forward(variables, x).block_until_ready()
    times = []
    for _ in range(runs):
      t0 = time.perf_counter()
      forward(variables, x).block_until_ready()
      times.append(time.perf_counter() - t0)
    out[str(int(b))] = 1e3 * statistics.median(times)
  return out


def _finish(sums: Mapping[str, Any], count: float) -> dict:
  bins = {k: np.asarray(v) for k, v in sums["bins"].items()}
  return {"accuracy": float(sums["correct"]) / count,
          "nll": float(sums["nll"]) / count,
          "ece": metrics.ece_from_sums(bins),
          "reliability": metrics.reliability_from_sums(bins)}


def evaluate_run(run: _models.Run, teacher: Optional[_models.Run], *,
                 out: Callable[[str], None] = print) -> dict:
  """Evaluates ``run`` (and ``teacher``); writes ``<run>/eval.json``.

  The run's own model is reported under ``"student"`` (also for a teacher
  run: ``result["model"]`` says which it is), the teacher under
  ``"teacher"``.

  Raises:
    kdjax.cli.errors.UsageError: the teacher has another number of classes.
    kdjax.cli.errors.MissingRunError: a run has no checkpoint yet.
  """
  if teacher is not None and teacher.num_classes != run.num_classes:
    raise errors.UsageError(
        f"the teacher run {teacher.path} has {teacher.num_classes} classes, "
        f"the run {run.path} {run.num_classes}: compare it with a teacher "
        "of the same data (--teacher TEACHER_RUN) or pass --no-teacher.")
  config = run.config
  ev = config["eval"]
  data = config["data"]
  source = _data.build_source(data, "eval")
  batches = _data.eval_batches(data, source)
  s_module = run.module()
  s_vars = run.restore_variables()
  s_apply = _models.make_apply(s_module)
  t_apply = t_vars = None
  if teacher is not None:
    t_apply = _models.make_apply(teacher.module())
    t_vars = teacher.restore_variables()
  fn = make_eval_fn(s_apply, t_apply, num_bins=ev["ece_bins"])
  totals = None
  for batch in batches:
    sums = fn(s_vars, t_vars, batch)
    totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
  totals = jax.device_get(totals)
  count = float(totals["count"])
  image_shape = run.image_shape
  result = {"run": os.path.abspath(run.path),
            "model": run.meta.get("model", "student"),
            "step": run.latest_step(),
            "teacher_run": None if teacher is None else os.path.abspath(
                teacher.path),
            "split": _data.split_name(data, "eval"), "count": int(count),
            "ece_bins": ev["ece_bins"],
            "student": {**_finish(totals["student"], count),
                        "params": _models.param_count(s_vars),
                        "latency_ms": measure_latency(
                            s_apply, s_vars, image_shape,
                            ev["latency_batch_sizes"], ev["latency_runs"])}}
  if teacher is not None:
    result["teacher"] = {**_finish(totals["teacher"], count),
                         "params": _models.param_count(t_vars),
                         "latency_ms": measure_latency(
                             t_apply, t_vars, image_shape,
                             ev["latency_batch_sizes"], ev["latency_runs"])}
    result["agreement"] = float(totals["agreement"]) / count
    result["mean_kl"] = float(totals["kl"]) / count
  result["device"] = str(jax.devices()[0].device_kind)
  path = os.path.join(run.path, runs.EVAL_FILE)
  runs.write_json(path, result)
  out(format_table(result))
  out(f"wrote {path}")
  return result


def default_teacher_dir(run: _models.Run) -> Optional[str]:
  """The teacher run ``run`` was distilled from, if still a run directory."""
  path = run.meta.get("teacher_run")
  return path if path and runs.is_run_dir(path) else None


def evaluate_run_dir(run_dir: str, *,
                     teacher_dir: Optional[str] = None,
                     no_teacher: bool = False,
                     overrides: Sequence[str] = (),
                     out: Callable[[str], None] = print) -> dict:
  """``kdjax eval RUN_DIR``: evaluates a run; writes its ``eval.json``.

  Args:
    run_dir: the run (``kdjax train-teacher`` or ``kdjax distill``).
    teacher_dir: the teacher run to compare with; default: the run's own
      teacher (:func:`default_teacher_dir`), if any.
    no_teacher: evaluate the run's model alone.
    overrides: ``key=value`` overrides of the run's own config (``eval.*``,
      ``data.max_eval_examples``).
    out: where the table is printed.

  Returns:
    The result written to ``<run_dir>/eval.json`` (see :func:`evaluate_run`).

  Raises:
    FileNotFoundError: ``run_dir`` (or ``teacher_dir``) is not a run, or has
      no checkpoint yet.
  """
  from kdjax.cli.config import image as cfg  # pylint: disable=g-import-not-at-top
  run = _models.read_run(run_dir)
  if overrides:
    run.config = cfg.load_config([os.path.join(run.path, runs.CONFIG_FILE)],
                                 list(overrides))
  teacher = None
  if not no_teacher:
    teacher_dir = teacher_dir or default_teacher_dir(run)
    if teacher_dir is not None:
      teacher = _models.read_run(teacher_dir)
  return evaluate_run(run, teacher, out=out)


def format_table(result: Mapping[str, Any]) -> str:
  """The eval results as an aligned text table."""
  cols = ["student"] + (["teacher"] if "teacher" in result else [])
  # A teacher run's own model is reported under "student" (the run's model).
  names = ["student" if result.get("model", "student") == "student"
           else result["model"] + " run"] + cols[1:]
  rows = [("accuracy", lambda m: f"{m['accuracy']:.4f}"),
          ("nll", lambda m: f"{m['nll']:.4f}"),
          (f"ece ({result['ece_bins']} bins)", lambda m: f"{m['ece']:.4f}"),
          ("parameters", lambda m: f"{m['params']:,}")]
  for b in result["student"]["latency_ms"]:
    rows.append((f"latency batch {b} (ms)",
                 lambda m, b=b: f"{m['latency_ms'][b]:.3f}"))
  width = max(len(r[0]) for r in rows) + 2
  lines = [f"eval of {result['run']} (step {result['step']}) on "
           f"{result['count']} {result['split']} examples",
           " " * width + "".join(f"{c:>14}" for c in names)]
  for name, fmt in rows:
    lines.append(f"{name:<{width}}" + "".join(f"{fmt(result[c]):>14}"
                                              for c in cols))
  if "agreement" in result:
    lines.append(f"{'top-1 agreement':<{width}}{result['agreement']:>14.4f}")
    lines.append(f"{'mean KL(t || s)':<{width}}{result['mean_kl']:>14.4f}")
  return "\n".join(lines)
