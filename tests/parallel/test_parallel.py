"""Data-parallel, FSDP, pmap and multi-host steps agree with the single-device step.

The 8-device checks run in a subprocess with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (set before jax is
imported); the multi-host check runs two processes that meet through
jax.distributed on 127.0.0.1 with gloo CPU collectives.
"""

from __future__ import annotations

import functools
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
import _parallel_common as _common  # noqa: E402

from kdjax import parallel  # noqa: E402
from kdjax import train  # noqa: E402

TOL = 1e-5


def _env(**extra):
  env = dict(os.environ)
  env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
  env["JAX_PLATFORMS"] = "cpu"
  env.update(extra)
  return env


@pytest.fixture(scope="module")
def eight_devices():
  proc = subprocess.run(
      [sys.executable, os.path.join(HERE, "_devices_worker.py")],
      env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=8"),
      capture_output=True, text=True, timeout=300, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
  assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
  return json.loads(lines[-1][len("RESULT "):])


@functools.lru_cache(maxsize=None)
def _reference():
  """The single-device run, in this process."""
  sa, student_vars, ta, teacher_vars, loss_fn, opt = _common.setup()
  state = train.create_state(student_vars(), opt, rng=jax.random.key(0))
  step = train.make_train_step(sa, ta, loss_fn, opt)
  losses = []
  for _ in range(_common.NUM_STEPS):
    state, metrics = step(state, teacher_vars, _common.data())
    losses.append(float(metrics["loss"]))
  return _common.flat_params(state.params), np.array(losses)


@pytest.mark.parametrize("name", ["dp", "fsdp", "fsdp_only",
                                  "dp_teacher_sharded", "dp_accumulate"])
def test_sharded_step_matches_single_device(eight_devices, name):
  r = eight_devices[name]
  assert r["param_diff"] < TOL and r["loss_diff"] < TOL
  ref_params, ref_losses = _reference()
  np.testing.assert_allclose(eight_devices["ref_losses"], ref_losses,
                             rtol=1e-6)
  assert eight_devices["ref_devices"] == 1


def test_shardings_are_real(eight_devices):
  dp, fsdp = eight_devices["dp"], eight_devices["fsdp"]
  # Data parallel: params replicated on all 8 devices, batch split.
  assert dp["kernel_spec"] == "()" and dp["num_devices"] == 8
  assert dp["batch_spec"] == "('data',)"
  # FSDP: the [12, 64] kernel and its momentum split 4 ways over "fsdp";
  # each device holds a [12, 16] shard. Small biases stay replicated.
  assert fsdp["kernel_spec"] == "(None, 'fsdp')"
  assert fsdp["momentum_spec"] == "(None, 'fsdp')"
  assert fsdp["kernel_shard_shape"] == [12, 16]
  assert fsdp["bias_spec"] == "()"
  assert fsdp["batch_spec"] == "(('data', 'fsdp'),)"
  assert eight_devices["fsdp_only"]["kernel_shard_shape"] == [12, 8]
  # Teacher sharded independently of a replicated student.
  ts = eight_devices["dp_teacher_sharded"]
  assert ts["teacher_kernel_spec"] == "(None, 'data')"
  assert ts["kernel_spec"] == "()"


def test_pmap_step_matches(eight_devices):
  assert eight_devices["pmap"]["param_diff"] < TOL
  assert eight_devices["pmap"]["replica_shape"][0] == 8


def test_clear_errors(eight_devices):
  errors = eight_devices["errors"]
  assert "batch size 12" in errors["shard_batch"]
  assert "not divisible by 8" in errors["shard_batch"]
  assert "not divisible by 8" in errors["step"]
  assert "needs 16 devices but only 8" in errors["mesh"]
  assert "['fsdp']" in errors["axis"]
  assert "not divisible by the 8 devices" in errors["pmap"]


def test_mesh_errors_in_process():
  n = jax.device_count()
  with pytest.raises(ValueError, match=f"needs {n + 1} devices but only {n}"):
    parallel.make_mesh({"data": n + 1})
  with pytest.raises(ValueError, match="at most one mesh axis"):
    parallel.make_mesh({"data": -1, "fsdp": -1})
  mesh = parallel.make_mesh({"data": -1})
  assert dict(mesh.shape) == {"data": n}


def test_leaf_partition_spec_rule():
  mesh = parallel.make_mesh({"fsdp": 1})
  spec = parallel.leaf_partition_spec((3, 8, 4), "fsdp", mesh, 0)
  assert tuple(spec) == (None, "fsdp", None)  # largest divisible dimension
  assert tuple(parallel.leaf_partition_spec((8,), "fsdp", mesh, 100)) == ()
  assert tuple(parallel.leaf_partition_spec((8,), None, mesh, 0)) == ()


def test_process_slice():
  assert parallel.process_slice(10, process_index=1, process_count=3) == slice(
      3, 6)
  assert parallel.process_slice(
      10, process_index=0, process_count=3, drop_remainder=False) == slice(0, 4)
  assert parallel.process_slice(
      10, process_index=2, process_count=3, drop_remainder=False) == slice(7, 10)
  with pytest.raises(ValueError, match="process_index 3"):
    parallel.process_slice(10, process_index=3, process_count=3)


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_match_single_process(tmp_path):
  port = _free_port()
  worker = os.path.join(HERE, "_multihost_worker.py")
  procs = [subprocess.Popen(
      [sys.executable, worker, str(port), str(i), str(tmp_path / f"p{i}.npz")],
      env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outputs = []
  for p in procs:
    try:
      outputs.append(p.communicate(timeout=240)[0])
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail("multi-host workers timed out")
  for p, text in zip(procs, outputs):
    assert p.returncode == 0, text[-3000:]
  ref_params, ref_losses = _reference()
  for i in range(2):
    result = np.load(tmp_path / f"p{i}.npz")
    for mode in ("dp", "fsdp"):
      np.testing.assert_allclose(result[f"{mode}/losses"], ref_losses,
                                 atol=TOL)
      for key, value in ref_params.items():
        np.testing.assert_allclose(result[f"{mode}/{key}"], value, atol=TOL)


def test_sharded_step_one_device_options():
  """In-process (one device): NaN check and global_batch through the sharded step."""
  sa, student_vars, ta, teacher_vars, loss_fn, opt = _common.setup()
  mesh = parallel.make_mesh({"data": 1})
  rules = parallel.ShardingRules.data_parallel()
  state = train.create_state(student_vars(), opt, rng=jax.random.key(0))
  step = parallel.make_sharded_train_step(
      sa, ta, loss_fn, opt, mesh=mesh, state=state,
      teacher_variables=teacher_vars, rules=rules, check_teacher_finite=True,
      teacher_name="sharded-teacher")
  batch = parallel.global_batch(_common.data(), mesh, rules)
  assert batch["image"].shape == (_common.BATCH, _common.FEATURES)
  state = parallel.shard_state(state, mesh, rules)
  state, metrics = step(state, teacher_vars, batch)
  ref_params, ref_losses = _reference()
  np.testing.assert_allclose(float(metrics["loss"]), ref_losses[0], rtol=1e-6)
  bad = jax.tree.map(lambda x: x * np.nan, teacher_vars)
  with pytest.raises(FloatingPointError, match="sharded-teacher"):
    step(state, bad, batch)


PMAP_UNEVEN_MASK_CODE = r"""
import jax, jax.numpy as jnp, numpy as np, optax
from kdjax import losses, models, parallel, train

student, teacher = models.MLP(hidden=(8,), num_classes=5), models.MLP(hidden=(16,), num_classes=5)
sa, ta = models.from_linen(student), models.from_linen(teacher)
x = jnp.asarray(np.random.default_rng(0).standard_normal((8, 4)), jnp.float32)
s_vars = student.init(jax.random.key(0), x)
t_vars = teacher.init(jax.random.key(1), x)
# Device 0 holds 2 real examples, device 1 one, devices 2-3 none or all.
mask = jnp.asarray([1, 1, 1, 0, 0, 0, 1, 1], jnp.float32)
batch = {"image": x, "label": jnp.arange(8) % 5, "mask": mask}
loss_fn = losses.compose([losses.Term("kd", losses.logit_term(losses.kl_divergence))])
opt = optax.sgd(1.0)
state = train.create_state(s_vars, opt, rng=jax.random.key(0))
ref_state, ref_metrics = train.make_train_step(sa, ta, loss_fn, opt, donate=False)(state, t_vars, batch)
step = parallel.make_pmap_train_step(sa, ta, loss_fn, opt, donate=False)
p_state, p_metrics = step(parallel.replicate(state, 4), parallel.replicate(t_vars, 4),
                          parallel.split_batch(batch, 4))
p_state = parallel.unreplicate(p_state)
err = max(float(jnp.max(jnp.abs(a - b))) for a, b in
          zip(jax.tree.leaves(ref_state.params), jax.tree.leaves(p_state.params)))
assert err < 1e-5, err
np.testing.assert_allclose(p_metrics["loss"][0], ref_metrics["loss"], rtol=1e-5)
print("OK", err)
"""


def test_pmap_step_normalises_by_global_token_count():
  """Uneven masks across devices: the pmap update equals the full-batch one."""
  proc = subprocess.run(
      [sys.executable, "-c", PMAP_UNEVEN_MASK_CODE],
      env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"),
      capture_output=True, text=True, timeout=300, check=False)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
