"""The public resumable loop (kdjax.train.run_loop) and fit.

* In process: the metrics window across a crash and a resume (records and
  final state equal an uninterrupted run's), a window saved on another
  ``log_every`` grid is dropped, the checkpoint gets the eval report of its
  step, the options are checked.
* In a subprocess, a user's script (public API only, like the README's
  "Resuming a run"): SIGKILLed after a checkpoint, or stopped by SIGTERM,
  then run again; its logged records and final parameters, optimizer state
  and RNG are bit-identical to an uninterrupted run's.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import checkpoint
from kdjax import train

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


# -----------------------------------------------------------------------------
# In process: a toy linear student.
# -----------------------------------------------------------------------------


def _setup(num=48, batch=8):
  rng = np.random.default_rng(0)
  data = {"x": rng.normal(size=(num, 3)).astype(np.float32),
          "y": rng.normal(size=(num,)).astype(np.float32)}
  optimizer = optax.adam(1e-2)
  state = train.create_state({"params": {"w": jnp.zeros((3,))}}, optimizer,
                             rng=jax.random.key(0))

  @jax.jit
  def step(state, teacher_variables, batch):
    del teacher_variables

    def loss_fn(params):
      err = batch["x"] @ params["w"] - batch["y"]
      return jnp.mean(err ** 2), jnp.mean(jnp.abs(err))

    (loss, mae), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    trainable = state.trainable
    updates, opt_state = optimizer.update({**trainable, "student": grads},
                                          state.opt_state, trainable)
    params = optax.apply_updates(trainable, updates)["student"]
    state = state.replace(params=params, opt_state=opt_state,
                          step=state.step + 1)
    return state, {"loss": loss, "mae": mae}

  def batches():
    return checkpoint.ArrayBatchIterator(data, batch, seed=1)

  def evaluate(state):
    return {"w0": float(state.params["w"][0])}

  return state, step, batches, evaluate


class Crash(Exception):
  """Stands for a SIGKILL: the run stops without saving."""


def _crashing(step, at_call: int):
  calls = []

  def crashing_step(state, teacher_variables, batch):
    calls.append(1)
    if len(calls) == at_call:
      raise Crash()
    return step(state, teacher_variables, batch)

  return crashing_step


def _same_leaves(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_resume_inside_a_window_logs_the_straight_records(tmp_path):
  state, step, batches, evaluate = _setup()
  options = train.LoopOptions(num_steps=10, log_every=4, eval_every=5)
  with checkpoint.DistillCheckpointer(tmp_path / "straight",
                                      save_every=3) as ckpt:
    straight = train.run_loop(step, state, None, batches(), options,
                              checkpointer=ckpt, evaluate=evaluate)
  assert [s for s, _ in straight.history] == [4, 8, 10]
  assert [s for s, _ in straight.evals] == [5, 10]
  assert straight.status == "finished" and straight.steps_run == 10

  # Crashes in the 8th step: the newest checkpoint is step 6, inside the
  # window 5..8; the resumed run completes that window from the saved sums.
  logged = []
  with checkpoint.DistillCheckpointer(tmp_path / "crashed",
                                      save_every=3) as ckpt:
    with pytest.raises(Crash):
      train.run_loop(_crashing(step, 8), state, None, batches(), options,
                     checkpointer=ckpt, on_log=lambda s, r: logged.append(
                         (s, r)))
  with checkpoint.DistillCheckpointer(tmp_path / "crashed",
                                      save_every=3) as ckpt:
    resumed = train.run_loop(step, state, None, batches(), options,
                             checkpointer=ckpt, evaluate=evaluate,
                             on_log=lambda s, r: logged.append((s, r)))
  assert resumed.start_step == 6 and resumed.steps_run == 4
  assert logged == straight.history  # floats compared exactly
  assert resumed.evals == [(10, straight.evals[-1][1])]
  _same_leaves(resumed.state, straight.state)
  # Run again once finished: nothing to do, no eval, no record.
  with checkpoint.DistillCheckpointer(tmp_path / "crashed") as ckpt:
    again = train.run_loop(step, state, None, batches(), options,
                           checkpointer=ckpt, evaluate=evaluate)
  assert (again.steps_run, again.history, again.evals) == (0, [], [])


def test_a_window_saved_on_another_log_grid_is_dropped(tmp_path):
  state, step, batches, _ = _setup()
  with checkpoint.DistillCheckpointer(tmp_path, save_every=3) as ckpt:
    with pytest.raises(Crash):
      train.run_loop(_crashing(step, 8), state, None, batches(),
                     train.LoopOptions(num_steps=10, log_every=4),
                     checkpointer=ckpt)
  with checkpoint.DistillCheckpointer(tmp_path, save_every=3) as ckpt:
    start = train.resume(ckpt, state, batches())
    assert start.step == 6 and start.window.steps == 2  # steps 5 and 6
    result = train.run_loop(step, start, None, batches(),
                            train.LoopOptions(num_steps=10, log_every=5),
                            checkpointer=ckpt)
  # log_every=5: 6 is one step into the window 6..10, not two: the saved
  # sums belong to no window of this grid; the first record is the mean of
  # the steps 7..10 (all it has).
  assert [s for s, _ in result.history] == [10]


def test_metrics_window_round_trips_bit_exactly():
  window = train.MetricsWindow()
  for v in (0.1, 0.2, 1e-8):
    window.add({"loss": jnp.float32(v), "n": jnp.int32(2)})
  back = train.MetricsWindow.from_json(json.loads(json.dumps(
      window.to_json())))
  assert back.steps == 3 and back.local_steps == 0
  assert back.means() == window.means()
  assert jax.device_get(back.sums["n"]).dtype == np.int32
  assert train.MetricsWindow.from_json(None).steps == 0


def test_saved_steps_carry_the_eval_report_of_their_step(tmp_path):
  state, step, batches, evaluate = _setup()
  with checkpoint.DistillCheckpointer(tmp_path, save_every=4, keep_last=1,
                                      best_metric="w0") as ckpt:
    result = train.run_loop(step, state, None, batches(),
                            train.LoopOptions(num_steps=10, eval_every=4),
                            checkpointer=ckpt, evaluate=evaluate)
    ckpt.wait_until_finished()
    # Ranked by the reports of steps 4 and 8 and the final one (10).
    assert ckpt.all_steps() == sorted({ckpt.best_step(), 10})
    assert ckpt.manager.metrics(10) == {"w0": result.evals[-1][1]["w0"]}
  assert [s for s, _ in result.evals] == [4, 8, 10]


def test_fit_is_the_plain_loop():
  state, step, batches, _ = _setup()
  fitted, history = train.fit(step, state, None,
                              [next(batches()) for _ in range(5)],
                              log_every=2)
  assert [s for s, _ in history] == [2, 4, 5] and int(fitted.step) == 5
  with pytest.raises(ValueError, match="log_every must be >= 1"):
    train.fit(step, fitted, None, [], log_every=0)


def test_fit_counts_its_windows_from_where_it_starts():
  # Called once per epoch (the experiments do), each call logs its own
  # windows: 7 steps with log_every 5 log at 5 and 7, then at 12 and 14 (not
  # on the absolute grid 10, 14 that a resumed run needs).
  state, step, batches, _ = _setup()
  it = batches()
  state, first = train.fit(step, state, None, [next(it) for _ in range(7)],
                           log_every=5)
  state, second = train.fit(step, state, None, [next(it) for _ in range(7)],
                            log_every=5)
  assert [s for s, _ in first] == [5, 7] and [s for s, _ in second] == [12, 14]
  with pytest.raises(ValueError, match="log_from_start"):
    train.run_loop(step, state, None, [], train.LoopOptions(
        log_from_start=True), checkpointer=object())


def test_a_checkpointed_loop_needs_a_resumable_iterator(tmp_path):
  state, step, _, _ = _setup()
  with checkpoint.DistillCheckpointer(tmp_path) as ckpt:
    with pytest.raises(TypeError, match="get_state/set_state"):
      train.run_loop(step, state, None, [], checkpointer=ckpt)
  with pytest.raises(ValueError, match="eval_every"):
    train.LoopOptions(eval_every=-1)


# -----------------------------------------------------------------------------
# In a subprocess: a user's script, killed or stopped, and run again.
# -----------------------------------------------------------------------------

SCRIPT = textwrap.dedent('''
    """A user's training script: trains, resumes from its checkpoints."""
    import json, os, sys, time
    import jax, numpy as np, optax
    from kdjax import checkpoint, losses, models, train

    workdir, log_path, out_path, pause = sys.argv[1:5]
    rng = np.random.default_rng(0)
    data = {"image": rng.normal(size=(96, 12)).astype(np.float32),
            "label": rng.integers(0, 4, size=(96,)).astype(np.int32)}
    teacher = models.MLP(hidden=(16,), num_classes=4)
    student = models.MLP(hidden=(8,), num_classes=4, dropout_rate=0.1)
    teacher_apply = models.from_linen(teacher)
    student_apply = models.from_linen(student, train_kwarg="train")
    teacher_vars = teacher.init(jax.random.PRNGKey(1), data["image"][:1])
    objective = losses.compose(
        [losses.Term("ce", losses.label_term(), 0.5, needs_teacher=False),
         losses.Term("kd", losses.logit_term(losses.kl_divergence), 1.0)],
        temperature=2.0)
    optimizer = optax.adam(optax.cosine_decay_schedule(1e-2, 16))
    step = train.make_train_step(student_apply, teacher_apply, objective,
                                 optimizer)
    eval_step = train.make_eval_step(student_apply, teacher_apply)
    test_batches = [{k: v[:32] for k, v in data.items()}]

    def slow_step(state, teacher_variables, batch):
      time.sleep(float(pause))   # time for the test to kill it mid-run
      return step(state, teacher_variables, batch)

    def evaluate(state):
      return train.evaluate(eval_step, state.student_variables(),
                            teacher_vars, test_batches)

    state = train.create_state(
        student.init(jax.random.PRNGKey(2), data["image"][:1]), optimizer,
        rng=jax.random.PRNGKey(3))
    batches = checkpoint.ArrayBatchIterator(data, 16, seed=0)
    with checkpoint.DistillCheckpointer(workdir, save_every=4, keep_last=2,
                                        teacher=teacher_vars) as ckpt:
      start = train.resume(ckpt, state, batches)
      # The records after the checkpoint are logged again: drop them.
      kept = []
      if os.path.exists(log_path):
        with open(log_path) as f:
          kept = [l for l in f if json.loads(l)["step"] <= start.step]
      with open(log_path, "w") as log:
        log.writelines(kept)

        def write(split):
          def hook(step, record):
            log.write(json.dumps({"step": step, "split": split, **{
                k: float(v).hex() for k, v in record.items()}}) + "\\n")
            log.flush()
            print(f"LOGGED {split} {step}", flush=True)
          return hook

        result = train.run_loop(
            slow_step, start, teacher_vars, batches,
            train.LoopOptions(num_steps=16, log_every=3, eval_every=6),
            checkpointer=ckpt, evaluate=evaluate, on_log=write("train"),
            on_eval=write("eval"))
    leaves = {jax.tree_util.keystr(path): np.asarray(jax.device_get(
                  jax.random.key_data(x) if jax.dtypes.issubdtype(
                      x.dtype, jax.dtypes.prng_key) else x))
              for path, x in jax.tree_util.tree_flatten_with_path(
                  result.state)[0]}
    np.savez(out_path, **leaves)
    print(f"STATUS {result.status} {result.start_step} {result.step}",
          flush=True)
''')


def _env():
  env = dict(os.environ)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = REPO_ROOT + os.pathsep + env.get("PYTHONPATH", "")
  return env


def _start(root, name: str, pause: float) -> subprocess.Popen:
  script = root / "user_script.py"
  if not script.exists():
    script.write_text(SCRIPT)
  return subprocess.Popen(
      [sys.executable, str(script), str(root / name),
       str(root / f"{name}.jsonl"), str(root / f"{name}.npz"), str(pause)],
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
      env=_env())


def _finish(proc: subprocess.Popen) -> str:
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  return out


def _wait_for(proc: subprocess.Popen, line: str) -> None:
  """Reads ``proc``'s output until ``line``."""
  seen = []
  for text in proc.stdout:
    seen.append(text)
    if text.strip() == line:
      return
  proc.wait()
  raise AssertionError(f"the script ended before {line!r}:\n" + "".join(seen))


def _records(root, name):
  with open(root / f"{name}.jsonl") as f:
    return [json.loads(line) for line in f]


def _leaves(root, name):
  with np.load(root / f"{name}.npz") as z:
    return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
  root = tmp_path_factory.mktemp("user_script")
  out = _finish(_start(root, "straight", 0.0))
  assert "STATUS finished 0 16" in out, out
  records = _records(root, "straight")
  assert [(r["step"], r["split"]) for r in records] == [
      (3, "train"), (6, "train"), (6, "eval"), (9, "train"), (12, "train"),
      (12, "eval"), (15, "train"), (16, "train"), (16, "eval")]
  return root, records, _leaves(root, "straight")


def _assert_same_run(root, name, straight):
  _, records, leaves = straight
  assert _records(root, name) == records
  mine = _leaves(root, name)
  assert sorted(mine) == sorted(leaves)
  assert any("opt_state" in k for k in mine) and any("rng" in k for k in mine)
  for k in leaves:
    np.testing.assert_array_equal(mine[k], leaves[k], err_msg=k)


def test_user_script_killed_after_a_checkpoint_resumes_exactly(straight):
  root = straight[0]
  proc = _start(root, "killed", 0.25)
  # Kill it once the step-8 checkpoint (inside the window 7..9) committed.
  deadline = time.time() + 300
  while not os.path.isdir(root / "killed" / "8"):
    assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  out = _finish(_start(root, "killed", 0.0))
  start = int(out.split("STATUS finished ")[1].split()[0])
  assert 8 <= start < 16, out
  _assert_same_run(root, "killed", straight)


def test_user_script_stopped_by_sigterm_resumes_exactly(straight):
  root = straight[0]
  proc = _start(root, "stopped", 0.25)
  _wait_for(proc, "LOGGED train 6")
  proc.send_signal(signal.SIGTERM)
  out = _finish(proc)
  status, start, stop = out.split("STATUS ")[1].split()
  assert (status, start) == ("stopped", "0") and 6 <= int(stop) < 16, out
  # The stop saved its step (with the open window), and logged no partial
  # window.
  assert os.path.isdir(root / "stopped" / stop)
  assert max(r["step"] for r in _records(root, "stopped")) <= int(stop)
  out = _finish(_start(root, "stopped", 0.0))
  assert f"STATUS finished {stop} 16" in out, out
  _assert_same_run(root, "stopped", straight)


def test_batches_running_out_end_the_loop_with_a_record_eval_and_save(
    tmp_path):
  state, step, _, evaluate = _setup()
  rng = np.random.default_rng(2)
  data = {"x": rng.normal(size=(40, 3)).astype(np.float32),
          "y": rng.normal(size=(40,)).astype(np.float32)}
  batches = checkpoint.ArrayBatchIterator(data, 8, num_epochs=1)  # 5 steps
  with checkpoint.DistillCheckpointer(tmp_path, save_every=4) as ckpt:
    result = train.run_loop(step, state, None, batches,
                            train.LoopOptions(log_every=4, eval_every=4),
                            checkpointer=ckpt, evaluate=evaluate)
  assert (result.status, result.step) == ("finished", 5)
  assert [s for s, _ in result.history] == [4, 5]
  assert [s for s, _ in result.evals] == [4, 5]
  with checkpoint.DistillCheckpointer(tmp_path) as ckpt:
    assert ckpt.all_steps() == [4, 5]


def test_stop_request_flags_the_first_signal_and_aborts_on_a_second_sigint():
  previous = signal.getsignal(signal.SIGTERM)
  with train.StopRequest() as stop:
    assert not stop.requested
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.01)
    assert stop.signum == signal.SIGTERM
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(0.01)
  assert signal.getsignal(signal.SIGTERM) is previous


def test_throughput_hooks_and_progress_bar(capsys):
  state, step, batches, evaluate = _setup()
  logged, evaluated = [], []
  result = train.run_loop(
      step, state, None, batches(),
      train.LoopOptions(num_steps=6, log_every=3, eval_every=3, batch_size=8,
                        progress=True, description="toy"),
      evaluate=evaluate, on_log=[lambda s, r: logged.append(s)] * 2,
      on_eval=lambda s, r: evaluated.append(s))
  assert logged == [3, 3, 6, 6] and evaluated == [3, 6]
  assert all(r["samples_per_s"] > 0 for _, r in result.history)
  assert result.first_step_s > 0 and result.wall_s >= result.first_step_s
  assert "toy" in capsys.readouterr().err
