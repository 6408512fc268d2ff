"""``kdjax lm plan``: the distill step's memory per device, before a run.

The step ``kdjax lm distill`` would run (its objective, loss, optimizer and
precision, :mod:`kdjax.cli.lm.task`'s builders) is compiled for a mesh of
``--devices`` simulated CPU devices on abstract variables (``jax.eval_shape``
/ ``nnx.eval_shape``: no weight is allocated, an 8B teacher costs nothing)
and :func:`kdjax.parallel.plan_train_step_memory` reads its memory per
device: teacher parameters, student parameters, optimizer state, batch and
XLA's temporaries, against ``--device-memory-gib``.

Sharding: the student's parameters and optimizer state are split over the
``fsdp`` axis (FSDP, all-gathered in the step), or replicated on a mesh of
``data`` alone; the teacher is split over every axis of the mesh; the batch
over ``data`` x ``fsdp``.

The simulated devices need ``XLA_FLAGS=--xla_force_host_platform_device_count
=N`` before JAX starts its backend: the command sets it when JAX is not yet
imported (the command line), else runs the plan in a fresh interpreter
(``python -m kdjax.cli.lm.plan``, the request as JSON on stdin).

The temporaries are XLA:CPU's: an estimate of a GPU's (fusion, scheduling
and attention kernels differ), to be checked against a measurement.
This module imports no JAX at import time.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from typing import Any, Callable, Mapping, Optional

from kdjax.cli import errors

AXES = ("data", "fsdp")
_COUNT_FLAG = "--xla_force_host_platform_device_count"


def parse_mesh(text: Optional[str], devices: int) -> dict:
  """``"data=2,fsdp=4"`` -> ``{"data": 2, "fsdp": 4}`` (default: ``fsdp=N``).

  Raises:
    UsageError: an unknown axis, a bad size, or sizes whose product is not
      ``devices`` (the message names the number to change).
  """
  if devices < 1:
    raise errors.UsageError(f"--devices must be at least 1, got {devices}.")
  if not text:
    return {"fsdp": devices}
  axes: dict = {}
  for part in text.split(","):
    name, _, size = part.strip().partition("=")
    name = name.strip()
    if name not in AXES:
      raise errors.UsageError(
          f"--mesh {text}: unknown axis {name!r}; axes: {', '.join(AXES)} "
          "(e.g. --mesh data=2,fsdp=4).")
    if name in axes:
      raise errors.UsageError(f"--mesh {text}: axis {name!r} given twice.")
    try:
      axes[name] = int(size)
    except ValueError:
      axes[name] = 0
    if axes[name] < 1:
      raise errors.UsageError(f"--mesh {text}: the size of {name!r} must be "
                              f"an int >= 1, got {size!r}.")
  product = math.prod(axes.values())
  if product != devices:
    last = list(axes)[-1]
    others = product // axes[last]
    hint = (f"set {last}={devices // others}" if devices % others == 0
            else f"change the sizes")
    raise errors.UsageError(
        f"--mesh {text} has {product} devices but --devices is {devices}: "
        f"{hint} or --devices {product}.")
  return axes


def plan_vocab(config: Mapping[str, Any]) -> int:
  """The vocabulary the step's logits would have, without the corpus: 259
  (bytes), ``tokenizer.vocab_size`` (a BPE to train), or the tokenizer.json's
  (file)."""
  tok = config["tokenizer"]
  if tok["kind"] == "bytes":
    return 259
  if tok["kind"] == "file":
    from kdjax.cli.lm import data as _lm_data  # pylint: disable=g-import-not-at-top
    return _lm_data.tokenizer_of_file(tok["path"], tok).vocab_size
  return int(tok["vocab_size"])


def _check_request(config: Mapping[str, Any], axes: Mapping[str, int]) -> None:
  if config["teacher"]["hf_path"] or config["student"]["init"] != "scratch":
    raise errors.UsageError(
        "kdjax lm plan builds the models of teacher/student family, size and "
        "kwargs; a Hugging Face teacher (teacher.hf_path) is not planned yet: "
        "give its architecture instead (e.g. teacher.family: qwen3, "
        "teacher.size: qwen3_8b) and --set teacher.hf_path=null "
        "student.init=scratch.")
  batch = config["data"]["batch_size"]
  shards = math.prod(axes.values())
  if batch % shards:
    raise errors.UsageError(
        f"config key 'data.batch_size' ({batch}) is not divisible by the "
        f"{shards} batch shards of mesh {dict(axes)} (data x fsdp); use a "
        f"multiple of {shards}.")


def _xla_flags(devices: int, flags: str) -> str:
  flags = re.sub(rf"{_COUNT_FLAG}=\S+", "", flags)
  return f"{_COUNT_FLAG}={devices} {flags}".strip()


def run(config: Mapping[str, Any], *, devices: int,
        axes: Mapping[str, int], device_memory_gib: Optional[float],
        out: Callable[[str], None] = print) -> int:
  """Plans the distill step of ``config`` on ``devices`` simulated devices;
  prints the table. Returns the exit status."""
  _check_request(config, axes)
  request = {"config": config, "devices": devices, "axes": dict(axes),
             "device_memory_gib": device_memory_gib}
  if "jax" not in sys.modules:
    os.environ["XLA_FLAGS"] = _xla_flags(devices,
                                         os.environ.get("XLA_FLAGS", ""))
    os.environ["JAX_PLATFORMS"] = "cpu"
    plan_in_process(request, out)
    return 0
  # JAX's backend may have started: a fresh interpreter with the flag.
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=_xla_flags(devices, os.environ.get("XLA_FLAGS", "")))
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
      os.path.abspath(__file__)))))
  env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
  proc = subprocess.run([sys.executable, "-m", "kdjax.cli.lm.plan"],
                        input=json.dumps(request), text=True,
                        capture_output=True, env=env, check=False)
  for line in proc.stdout.splitlines():
    out(line)
  if proc.stderr:
    print(proc.stderr, end="", file=sys.stderr)
  return proc.returncode


def plan_in_process(request: Mapping[str, Any],
                    out: Callable[[str], None] = print):
  """Compiles and prints the plan in this process (its JAX must have the
  request's devices); returns the :class:`kdjax.parallel.MemoryPlan`."""
  import jax  # pylint: disable=g-import-not-at-top
  from kdjax import lm  # pylint: disable=g-import-not-at-top
  from kdjax import parallel  # pylint: disable=g-import-not-at-top
  from kdjax import train as ktrain  # pylint: disable=g-import-not-at-top
  from kdjax.cli import trainer as _trainer  # pylint: disable=g-import-not-at-top
  from kdjax.cli.lm import models as _lm_models  # pylint: disable=g-import-not-at-top
  from kdjax.cli.lm import task as _lm_task  # pylint: disable=g-import-not-at-top

  config, devices = request["config"], int(request["devices"])
  axes = {k: int(v) for k, v in request["axes"].items()}
  if jax.device_count() < devices:
    raise errors.RunError(
        f"JAX has {jax.device_count()} devices, the plan needs {devices}: "
        f"XLA_FLAGS must hold {_COUNT_FLAG}={devices} before JAX starts.")
  t0 = time.perf_counter()
  vocab = plan_vocab(config)
  objective = config["distill"]["objective"]
  spec = _lm_task.objective_spec(config, objective)
  student = _lm_models.model_of(config, "student", vocab, abstract=True)
  teacher = (_lm_models.model_of(config, "teacher", vocab, abstract=True)
             if spec.needs_teacher else None)
  d, tc = config["data"], config["train"]
  loss_fn = lm.build_lm_loss(spec, vocab)
  optimizer, _ = _trainer.build_optimizer(config["optimizer"],
                                          tc["steps"], None)
  policy = _trainer.build_policy(tc["precision"])
  state = jax.eval_shape(
      lambda v: ktrain.create_state(v, optimizer, rng=jax.random.PRNGKey(0),
                                    policy=policy), student.variables)
  example = lm.make_lm_batch([[1]], [[2]], d["seq_len"], pad_id=0)
  batch = {k: jax.ShapeDtypeStruct((d["batch_size"],) + v.shape[1:], v.dtype)
           for k, v in example.items()}

  mesh = parallel.make_mesh(axes)
  if "fsdp" in axes:
    rules = parallel.ShardingRules.fsdp(
        data_axis="data" if "data" in axes else None,
        teacher_axis=tuple(axes))
  else:
    rules = parallel.ShardingRules(batch_axes=("data",), student_axis=None,
                                   teacher_axis=("data",))
  gather = (parallel.fsdp_gather_fn(mesh)
            if rules.student_axis is not None and spec.rollout is None
            else None)
  step = lm.build_lm_objective_step(
      spec, student.apply, None if teacher is None else teacher.apply,
      optimizer, loss_fn=loss_fn, vocab_size=vocab,
      student_lean_apply=student.lean_apply,
      teacher_lean_apply=None if teacher is None else teacher.lean_apply,
      student_rollout=student.rollout,
      teacher_rollout=None if teacher is None else teacher.rollout,
      sampling_fields=dict(vocab_size=vocab, pad_id=0),
      accumulation_steps=tc["accumulation_steps"], policy=policy,
      gather_fn=gather)
  t_vars = None if teacher is None else teacher.variables
  plan = parallel.plan_train_step_memory(
      step, state, t_vars, batch, mesh=mesh,
      state_shardings=parallel.state_sharding(state, mesh, rules),
      teacher_shardings=(None if t_vars is None else
                         parallel.teacher_sharding(t_vars, mesh, rules)),
      batch_sharding=parallel.batch_sharding(mesh, rules),
      device_memory_gib=request["device_memory_gib"])
  seconds = time.perf_counter() - t0
  out(f"[lm plan] objective {objective}; student {student.description}, "
      f"{_lm_models.param_count(student.variables):,} params"
      + (f"; teacher {teacher.description}, "
         f"{_lm_models.param_count(teacher.variables):,} params"
         if teacher is not None else "")
      + f"; batch {d['batch_size']} x {d['seq_len']} tokens, precision "
      f"{tc['precision']}, accumulation {tc['accumulation_steps']}; student "
      + ("FSDP over 'fsdp'" if rules.student_axis else "replicated")
      + f", teacher split over {' x '.join(axes)}"
      + ("" if gather or rules.student_axis is None else
         " (a rollout step: XLA places the student's parameters)")
      + f"; compiled in {seconds:.1f} s")
  out(plan.table())
  return plan


def _child() -> int:
  """``python -m kdjax.cli.lm.plan``: the request (JSON) from stdin."""
  request = json.load(sys.stdin)
  try:
    plan_in_process(request)
  except Exception as e:  # pylint: disable=broad-except
    from kdjax.cli import failures  # pylint: disable=g-import-not-at-top
    status = failures.report_error("lm plan", e)
    if status is None:
      raise
    return status
  return 0


if __name__ == "__main__":
  sys.exit(_child())
