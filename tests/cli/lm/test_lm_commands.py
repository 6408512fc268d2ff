"""``kdjax lm``: train-teacher, distill (token KD, GKD), eval, generate, resume,
bad configs; and a Hugging Face Qwen3 teacher distilled into a layer-dropped
student written back in HF format.

Every run uses experiments/configs/lm_tiny.yaml (24 standard-library files, a
300-id BPE, 1-layer models, 12 steps) in a temporary directory, in process
(``kdjax.cli.main.main``).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import signal
import threading

import jax
import numpy as np
import pytest

from kdjax.checkpoint import DistillCheckpointer
from kdjax.cli.lm import data as _lm_data
from kdjax.cli.lm import models as _lm_models
from kdjax.cli import errors
from kdjax.cli.main import main

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
LM_TINY = os.path.join(REPO_ROOT, "experiments", "configs", "lm_tiny.yaml")
WALL_CLOCK = ("time", "samples_per_s")


def run_main(args) -> tuple[int, str, str]:
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    rc = main([str(a) for a in args])
  return rc, out.getvalue(), err.getvalue()


def lm_args(command, root, *sets) -> list:
  return ["lm", command, "--config", LM_TINY, "--set", f"output_dir={root}",
          *sets]


def records(run_dir) -> list[dict]:
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [{k: v for k, v in json.loads(line).items() if k not in WALL_CLOCK}
            for line in f if line.strip()]


def restored(run_dir):
  run = _lm_models.read_lm_run(str(run_dir))
  tok = _lm_data.tokenizer_of_run(str(run_dir), run.meta,
                                  run.config["tokenizer"])
  model = run.model(tok.vocab_size)
  return model, run.restore(model)


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
  """A persistent compilation cache for this module: runs of one config (a
  run and its resumption, a run and ``lm eval``) compile each step once."""
  names = ("jax_compilation_cache_dir",
           "jax_persistent_cache_min_compile_time_secs",
           "jax_persistent_cache_min_entry_size_bytes")
  # JAX decides once per process whether the cache is used: reset that
  # decision on entry and on exit (a private function; without it the
  # tests only run slower).
  reset = getattr(importlib.import_module("jax._src.compilation_cache"),
                  "reset_cache", lambda: None)
  saved = {n: getattr(jax.config, n) for n in names}
  jax.config.update(names[0], str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update(names[1], 0.0)
  jax.config.update(names[2], 0)
  reset()
  yield
  for name, value in saved.items():
    jax.config.update(name, value)
  reset()


@pytest.fixture(scope="module")
def flow(tmp_path_factory):
  """A trained teacher (and the experiment's tokenizer) under ``root``."""
  root = tmp_path_factory.mktemp("lm")
  rc, out, err = run_main(lm_args("train-teacher", root))
  assert rc == 0, out + err
  assert "trained a byte-level BPE tokenizer (300 ids)" in out
  return root


def test_train_teacher_writes_a_run(flow):
  teacher = flow / "teacher"
  meta = json.loads((teacher / "run.json").read_text())
  assert meta["kind"] == "lm" and meta["model"] == "teacher"
  assert meta["tokenizer"] == "bpe" and meta["vocab_size"] == 300
  assert (teacher / "tokenizer.json").exists()
  assert (flow / "tokenizer.json").read_text() == (
      teacher / "tokenizer.json").read_text()
  recs = records(teacher)
  assert [(r["step"], r["split"]) for r in recs] == [
      (4, "train"), (8, "train"), (12, "train"), (12, "eval")]
  # The teacher learns: its loss falls from log(300) (a uniform guess).
  assert recs[-2]["loss"] < recs[0]["loss"] < np.log(300) + 0.5
  summary = json.loads((teacher / "summary.json").read_text())
  assert summary["eval"]["perplexity"] == pytest.approx(
      np.exp(summary["eval"]["loss"]))


@pytest.fixture(scope="module")
def token_kd_run(flow):
  rc, out, err = run_main(lm_args("distill", flow, "distill.divergence=jsd"))
  assert rc == 0, out + err
  return flow / "student_token_kd"


def test_distill_token_kd_eval_and_generate(flow, token_kd_run):
  run = token_kd_run
  summary = json.loads((run / "summary.json").read_text())
  assert summary["method"] == "token_kd"
  assert {"perplexity", "teacher_perplexity", "teacher_kl"} <= set(
      summary["eval"])
  rc, out, err = run_main(["lm", "eval", run])
  assert rc == 0, out + err
  result = json.loads((run / "eval.json").read_text())
  # eval restores the final checkpoint: the training run's own final eval.
  assert result["perplexity"] == pytest.approx(summary["eval"]["perplexity"],
                                               rel=1e-5)
  assert result["teacher"] == str(flow / "teacher")
  rc, out, err = run_main(["lm", "generate", run, "--set",
                           "generate.max_new_tokens=6"])
  assert rc == 0, out + err
  samples = json.loads((run / "samples.json").read_text())["samples"]
  # lm_tiny.yaml: generate.num_prompts = 2 held-out prompts.
  assert len(samples) == 2 and out.count("--- prompt") == 2
  assert all(s["prompt"] and "continuation" in s for s in samples), samples
  # Prompts of different lengths: each gets at most max_new_tokens.
  rc, out, err = run_main(["lm", "generate", run, "--prompt", "def f(",
                           "--prompt", "import os\nimport sys\n\ndef main(",
                           "--set", "generate.max_new_tokens=3",
                           "generate.temperature=1.0"])
  assert rc == 0, out + err
  samples = json.loads((run / "samples.json").read_text())["samples"]
  assert len(samples) == 2
  assert all(0 < s["new_tokens"] <= 3 for s in samples), samples


def test_lean_kd_is_token_kd_without_logits(flow, token_kd_run):
  """The memory-lean objective (hidden states + unembedding) trains exactly
  as token KD does on full logits (same divergence, data, init)."""
  rc, out, err = run_main(lm_args("distill", flow, "distill.divergence=jsd",
                                  "distill.objective=lean_kd"))
  assert rc == 0, out + err
  want = [r for r in records(token_kd_run) if r["split"] == "train"]
  got = [r for r in records(flow / "student_lean_kd") if r["split"] == "train"]
  assert [r["step"] for r in got] == [r["step"] for r in want]
  for a, b in zip(got, want):
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-6)


def test_sequence_kd_trains_on_the_teachers_continuations(flow):
  rc, out, err = run_main(lm_args("distill", flow, "distill.objective=seq_kd",
                                  "train.steps=2", "train.log_every=1"))
  assert rc == 0, out + err
  recs = [r for r in records(flow / "student_seq_kd") if r["split"] == "train"]
  # The loss covers the teacher's greedy continuations (up to EOS): at most
  # the completion positions of the batch (8 x (32 - 8 + 1)).
  assert len(recs) == 2 and all(0 < r["tokens"] <= 8 * 25 for r in recs)
  assert all(np.isfinite(r["ce"]) for r in recs)


@pytest.fixture(scope="module")
def gkd_reference(flow):
  sets = ("distill.objective=gkd", "distill.lmbda=0.5",
          "distill.run_name=gkd_straight")
  rc, out, err = run_main(lm_args("distill", flow, *sets))
  assert rc == 0, out + err
  return flow / "gkd_straight"


def test_gkd_trains_on_the_students_samples(gkd_reference):
  recs = [r for r in records(gkd_reference) if r["split"] == "train"]
  on_policy = [r["on_policy"] for r in recs]
  # lmbda = 0.5: some windows hold on-policy steps, not all steps are.
  assert 0.0 < sum(on_policy) / len(on_policy) < 1.0, on_policy


@pytest.mark.skipif(threading.current_thread() is not threading.main_thread(),
                    reason="signal handlers need the main thread")
def test_resume_after_sigterm_gives_the_same_run(flow, gkd_reference,
                                                 monkeypatch):
  sets = ("distill.objective=gkd", "distill.lmbda=0.5",
          "distill.run_name=gkd_resumed")
  original = DistillCheckpointer.save

  def save(self, state, *, step=None, **kwargs):
    result = original(self, state, step=step, **kwargs)
    if step == 7 and not kwargs.get("force"):
      os.kill(os.getpid(), signal.SIGTERM)
    return result

  monkeypatch.setattr(DistillCheckpointer, "save", save)
  rc, out, err = run_main(lm_args("distill", flow, *sets))
  assert rc == errors.EXIT_SIGTERM and "interrupted at step 7/12" in out, (
      out + err)
  monkeypatch.undo()
  rc, out, err = run_main(lm_args("distill", flow, *sets))
  assert rc == 0 and "from step 7" in out, out + err
  resumed = flow / "gkd_resumed"
  assert records(resumed) == records(gkd_reference)
  _, want = restored(gkd_reference)
  _, got = restored(resumed)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("sets, pieces", [
    (("distill.bogus=1",), ("config error", "unknown config key "
                            "'distill.bogus'")),
    (("distill.objective=gkd", "distill.beta=2"),
     ("config key 'distill.beta' must lie in [0, 1]",)),
    (("teacher.run_dir=/nonexistent/teacher",),
     ("no teacher run at /nonexistent/teacher", "kdjax lm train-teacher")),
    (("student.kwargs={vocab_size: 100}", "distill.run_name=small_vocab"),
     ("larger than the model's vocabulary",)),
    (("tokenizer.kind=bytes", "distill.run_name=bytes"),
     ("another tokenizer", "Universal Logit Distillation")),
    (("data.prompt_len=32",), ("'data.prompt_len' (32) must be smaller",)),
])
def test_bad_configs_exit_2(flow, sets, pieces):
  rc, out, err = run_main(lm_args("distill", flow, *sets))
  assert rc == errors.EXIT_USAGE, out + err
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("kdjax lm distill:"), err
  for piece in pieces:
    assert piece in lines[0], err


def test_eval_of_a_missing_or_other_run_exits_2(tmp_path, token_kd_run):
  rc, _, err = run_main(["lm", "eval", tmp_path])
  assert rc == errors.EXIT_USAGE and "not a kdjax run directory" in err
  rc, _, err = run_main(["eval", token_kd_run])
  assert rc == errors.EXIT_USAGE and "use `kdjax lm eval`" in err


def test_hf_teacher_to_hf_student(flow, tmp_path):
  """A local HF-format Qwen3 teacher (4 layers) distilled into every other
  layer with one command; the student comes back in HF format and loads."""
  pytest.importorskip("tunix")
  pytest.importorskip("safetensors")
  import tokenizers  # pylint: disable=g-import-not-at-top
  from kdjax.lm import _hf  # pylint: disable=g-import-not-at-top
  from kdjax.lm import _tunix  # pylint: disable=g-import-not-at-top
  tok_json = (flow / "tokenizer.json").read_text()
  config = _tunix.tunix_model_config("qwen3", "tiny", vocab_size=304,
                                     num_layers=4)
  teacher = _tunix.init_tunix_model("qwen3", config, seed=3)
  teacher_dir = tmp_path / "qwen3_teacher"
  _hf.save_hf_checkpoint(str(teacher_dir), "qwen3", teacher,
                         tokenizer=tokenizers.Tokenizer.from_str(tok_json))
  student_dir = tmp_path / "qwen3_student"
  rc, out, err = run_main(lm_args(
      "distill", tmp_path / "runs", f"teacher.hf_path={teacher_dir}",
      "student.init=teacher_layers", f"distill.hf_out={student_dir}",
      "train.steps=2", "data.seq_len=16", "data.prompt_len=4"))
  assert rc == 0, out + err
  assert "layers every_other" in out and "Hugging Face checkpoint" in out
  loaded = _hf.load_hf_checkpoint(str(student_dir))
  assert loaded.family == "qwen3" and loaded.config.num_layers == 2
  model, variables = restored(tmp_path / "runs" / "student_token_kd")
  apply, loaded_vars = _tunix.make_tunix_lm_apply(loaded.model,
                                                  vocab_size=300)
  batch = {"tokens": np.arange(12, dtype=np.int32).reshape(2, 6)}
  np.testing.assert_allclose(apply(loaded_vars, batch).logits,
                             model.apply(variables, batch).logits,
                             rtol=1e-5, atol=1e-5)
