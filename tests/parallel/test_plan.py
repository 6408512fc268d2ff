"""kdjax.parallel.plan_train_step_memory: a step's memory per device, compiled
on abstract inputs for 8 simulated CPU devices (in a subprocess)."""

from __future__ import annotations

import json
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))

_CODE = f"""
import json, sys
sys.path.insert(0, {HERE!r})
import jax
import _parallel_common as common
from kdjax import parallel, train

sa, student_vars, ta, teacher_vars, loss_fn, opt = common.setup()
state = jax.eval_shape(
    lambda: train.create_state(student_vars(), opt, rng=jax.random.key(0)))
teacher = jax.eval_shape(lambda: teacher_vars)
batch = jax.eval_shape(common.data)
out = {{"devices": jax.device_count()}}
for name, axes, rules in [
    ("fsdp", {{"fsdp": 8}}, parallel.ShardingRules.fsdp(
        data_axis=None, min_shard_size=1)),
    ("replicated", {{"data": 8}}, parallel.ShardingRules.data_parallel())]:
  mesh = parallel.make_mesh(axes)
  gather = (parallel.fsdp_gather_fn(mesh) if rules.student_axis else None)
  step = train.build_step(sa, ta, loss_fn, opt, gather_fn=gather)
  plan = parallel.plan_train_step_memory(
      step, state, teacher, batch, mesh=mesh,
      state_shardings=parallel.state_sharding(state, mesh, rules),
      teacher_shardings=parallel.teacher_sharding(teacher, mesh, rules),
      batch_sharding=parallel.batch_sharding(mesh, rules),
      device_memory_gib=1.0)
  out[name] = {{k: getattr(plan, k) for k in (
      "devices", "teacher_params", "student_params", "optimizer_state",
      "batch", "argument_bytes", "temp_bytes", "total_bytes")}}
  out[name]["fits"] = plan.fits
  out[name]["table"] = plan.table("tiny MLP")
out["student_total"] = parallel.sharded_bytes(state.params, None)
out["opt_total"] = parallel.sharded_bytes(state.opt_state, None)
out["teacher_total"] = parallel.sharded_bytes(teacher, None)
out["batch_total"] = parallel.sharded_bytes(batch, None)
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def plans(subprocess_runner):
  stdout = subprocess_runner(_CODE, devices=8, timeout=300)
  line = [l for l in stdout.splitlines() if l.startswith("RESULT ")][-1]
  return json.loads(line[len("RESULT "):])


def test_fsdp_splits_parameters_and_optimizer_state(plans):
  fsdp = plans["fsdp"]
  assert plans["devices"] == 8 and fsdp["devices"] == 8
  # Every leaf of the tiny MLP divides by 8: exactly an eighth per device.
  assert fsdp["student_params"] * 8 == plans["student_total"]
  assert fsdp["optimizer_state"] * 8 == plans["opt_total"]
  assert fsdp["teacher_params"] * 8 == plans["teacher_total"]
  assert fsdp["batch"] * 8 == plans["batch_total"]


def test_replicated_holds_everything(plans):
  rep = plans["replicated"]
  assert rep["student_params"] == plans["student_total"]
  assert rep["optimizer_state"] == plans["opt_total"]
  assert rep["teacher_params"] == plans["teacher_total"]
  assert rep["batch"] * 8 == plans["batch_total"]
  # XLA's arguments cover the state, teacher and batch shards.
  assert rep["argument_bytes"] >= (rep["student_params"]
                                   + rep["optimizer_state"]
                                   + rep["teacher_params"] + rep["batch"])
  assert plans["fsdp"]["argument_bytes"] < rep["argument_bytes"]


def test_temporaries_and_table(plans):
  for name in ("fsdp", "replicated"):
    p = plans[name]
    assert p["temp_bytes"] > 0
    assert p["total_bytes"] >= p["argument_bytes"]
    assert p["fits"] is True
    table = p["table"]
    for row in ("teacher parameters", "student parameters", "optimizer state",
                "activations/temporaries (XLA)", "total", "device memory",
                "fits:", "estimate", "GPU"):
      assert row in table, table
  assert "per device of 8 (mesh fsdp=8)" in plans["fsdp"]["table"]
