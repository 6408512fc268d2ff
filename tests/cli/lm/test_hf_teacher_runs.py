"""``kdjax lm`` with Hugging Face teachers and their edge cases: a bfloat16 teacher (float32 student
master weights, export in the teacher's dtype), ``distill.hf_out`` that would
overwrite the teacher or a foreign directory, a truncated ``model.safetensors``
(exit 2, named), a teacher whose tensors contradict its ``config.json`` (exit
2), ``--set student.family=qwen3`` with lm_tiny.yaml and ``--set
student.kwargs={}``, the lm commands' ``--set`` help, ``kdjax lm eval --hf``.

The teacher directories are written as a user has them, with the helpers of
test_hub_checkpoint.py (hub-style config.json, Hugging Face tensor names,
a trained tokenizer.json).
"""

from __future__ import annotations

import json
import os
import re
import shutil

import jax
import numpy as np
import pytest

pytest.importorskip("tunix")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

# pylint: disable=g-import-not-at-top,wrong-import-position
import ml_dtypes
from safetensors.numpy import load_file

import test_hub_checkpoint as hf_e2e
from kdjax.cli.config import lm as _lm_config
from kdjax.cli.lm import data as _lm_data
from kdjax.cli.lm import models as _lm_models
from kdjax.cli.lm import export as _lm_export
from kdjax.cli import errors
from kdjax.cli.config.base import ConfigError

LM_TINY = hf_e2e.LM_TINY
run_main = hf_e2e.run_main


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("tok") / "tokenizer.json")
  hf_e2e.train_tokenizer(path, hf_e2e.TOKENIZER_IDS)
  return path


@pytest.fixture(scope="module")
def bf16_teacher(tmp_path_factory, tokenizer_json):
  """A Qwen3 checkpoint stored in bfloat16, as the hub's Qwen3 ship."""
  root = tmp_path_factory.mktemp("bf16")
  tensors = {k: v.astype(ml_dtypes.bfloat16)
             for k, v in hf_e2e.qwen3_tensors(0).items()}
  path = hf_e2e.write_checkpoint(
      root / "qwen3_bf16", hf_e2e.hub_qwen3_config(torch_dtype="bfloat16"),
      tensors, tokenizer_json)
  return root, path


@pytest.fixture(scope="module")
def f32_teacher(tmp_path_factory, tokenizer_json):
  root = tmp_path_factory.mktemp("f32")
  return root, hf_e2e.write_checkpoint(root / "qwen3", hf_e2e.hub_qwen3_config(),
                                       hf_e2e.qwen3_tensors(0), tokenizer_json)


def distill_args(out_dir, teacher_dir, *sets) -> list:
  return ["lm", "distill", "--config", LM_TINY, "--set",
          f"output_dir={out_dir}", f"teacher.hf_path={teacher_dir}",
          "student.init=teacher_layers", "data.max_eval_sequences=8", *sets]


def one_line(err: str) -> str:
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1, err
  return lines[0]


def files_of(path) -> dict:
  return {name: open(os.path.join(path, name), "rb").read()
          for name in sorted(os.listdir(path))}


# -----------------------------------------------------------------------------
# 1. A bfloat16 teacher: float32 student master weights, bfloat16 export.
# -----------------------------------------------------------------------------


def test_bf16_teacher_trains_a_float32_student_and_exports_bf16(bf16_teacher):
  root, teacher_dir = bf16_teacher
  out_dir, student_dir = root / "runs", root / "student_hf"
  # A small learning rate: Adam moves each weight by about 1e-4 a step,
  # below bfloat16's spacing (2^-8 relative) and far above float32's.
  args = distill_args(out_dir, teacher_dir, f"distill.hf_out={student_dir}",
                      "train.steps=3", "optimizer.lr=1e-4",
                      "optimizer.warmup_steps=0")
  rc, out, err = run_main(args)
  assert rc == 0, out + err
  run_dir = str(out_dir / "student_token_kd")
  run = _lm_models.read_lm_run(run_dir)
  tok = _lm_data.tokenizer_of_run(run_dir, run.meta, run.config["tokenizer"])
  model = run.model(tok.vocab_size)  # the student as initialised
  trained = run.restore(model)
  initial = jax.tree.leaves(model.variables)
  assert {str(x.dtype) for x in initial} == {"float32"}
  unchanged = [
      (jax.tree_util.keystr(path), float(np.mean(np.asarray(a) == np.asarray(b))))
      for (path, a), b in zip(
          jax.tree_util.tree_leaves_with_path(model.variables),
          jax.tree.leaves(trained))
      if np.any(np.asarray(a) == np.asarray(b))]
  assert not unchanged, unchanged  # every weight of every tensor moved

  # The export is in the teacher's dtype (bfloat16), and says so.
  assert "(bfloat16)" in out, out
  with open(os.path.join(student_dir, "config.json")) as f:
    assert json.load(f)["torch_dtype"] == "bfloat16"
  exported = load_file(os.path.join(student_dir, "model.safetensors"))
  assert {str(v.dtype) for v in exported.values()} == {"bfloat16"}
  # The trained float32 weights, rounded once.
  # The teacher itself stays bfloat16 (frozen).
  assert _lm_models.param_dtype(_lm_models.load_hf(teacher_dir).model) == (
      "bfloat16")
  emb = np.asarray(jax.tree.leaves(trained["params"]["embedder"])[0])
  np.testing.assert_array_equal(
      exported["model.embed_tokens.weight"].astype(np.float32),
      emb.astype(ml_dtypes.bfloat16).astype(np.float32))

  # The same command again re-exports into the run's own hf_out directory.
  rc, out, err = run_main(args)
  assert rc == 0 and "already trained" in out, out + err

  # The run records its export (what lets it write there again).
  with open(os.path.join(run_dir, _lm_export.HF_EXPORT_FILE)) as f:
    assert json.load(f) == {"path": os.path.abspath(student_dir),
                            "dtype": "bfloat16"}

  # kdjax lm eval --hf: the exported directory on the same held-out
  # sequences scores what the run's float32 weights scored, up to bfloat16
  # rounding, against the same teacher.
  with open(os.path.join(run_dir, "summary.json")) as f:
    run_eval = json.load(f)["eval"]
  rc, out, err = run_main([
      "lm", "eval", "--hf", student_dir, "--config", LM_TINY, "--set",
      f"output_dir={out_dir}", f"teacher.hf_path={teacher_dir}",
      "data.max_eval_sequences=8"])
  assert rc == 0, out + err
  assert f"[lm eval] {student_dir}" in out and "teacher perplexity" in out
  assert not os.path.exists(os.path.join(student_dir, "eval.json"))
  got = float(re.search(r"held-out perplexity ([0-9.]+)", out).group(1))
  np.testing.assert_allclose(got, run_eval["perplexity"], rtol=0.02)


# -----------------------------------------------------------------------------
# 1b. The export carries the teacher's tokenizer and generation files.
# -----------------------------------------------------------------------------

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|endoftext|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>"
    "assistant\n{% endif %}")


def test_export_serves_the_teachers_tokenizer(f32_teacher):
  transformers = pytest.importorskip("transformers")
  root, f32 = f32_teacher
  teacher_dir = str(root / "qwen3_served")
  shutil.copytree(f32, teacher_dir)
  files = {
      "tokenizer_config.json": {
          "tokenizer_class": "Qwen2Tokenizer", "bos_token": None,
          "eos_token": "<|endoftext|>", "pad_token": "<pad>",
          "model_max_length": 131072, "errors": "replace",
          "clean_up_tokenization_spaces": False},
      "special_tokens_map.json": {"eos_token": "<|endoftext|>",
                                  "pad_token": "<pad>"},
      "generation_config.json": {
          "bos_token_id": 0, "eos_token_id": [0, 1], "pad_token_id": 1,
          "do_sample": True, "temperature": 0.7,
          "transformers_version": "4.51.0"}}
  for name, data in files.items():
    with open(os.path.join(teacher_dir, name), "w") as f:
      json.dump(data, f)
  with open(os.path.join(teacher_dir, "chat_template.jinja"), "w") as f:
    f.write(CHAT_TEMPLATE)
  student_dir = root / "served_student"
  rc, out, err = run_main(distill_args(
      root / "runs_served", teacher_dir, f"distill.hf_out={student_dir}",
      "train.steps=1"))
  assert rc == 0, out + err

  want = transformers.AutoTokenizer.from_pretrained(teacher_dir)
  got = transformers.AutoTokenizer.from_pretrained(student_dir)
  assert type(got) is type(want)
  texts = ["def f(x):\n    return x  # héllo", "a  b\tc<|endoftext|>"]
  assert got(texts)["input_ids"] == want(texts)["input_ids"]
  for name in ("bos_token", "eos_token", "pad_token", "chat_template"):
    assert getattr(got, name) == getattr(want, name), name
  messages = [{"role": "user", "content": "hi"}]
  assert got.apply_chat_template(messages, add_generation_prompt=True) == (
      want.apply_chat_template(messages, add_generation_prompt=True))
  assert want.model_max_length == 131072
  assert got.model_max_length == hf_e2e.hub_qwen3_config()[
      "max_position_embeddings"]
  for name in ("chat_template.jinja", "special_tokens_map.json",
               "tokenizer.json"):
    with open(os.path.join(student_dir, name)) as a, open(
        os.path.join(teacher_dir, name)) as b:
      assert a.read() == b.read(), name
  gen = transformers.GenerationConfig.from_pretrained(student_dir)
  assert (gen.eos_token_id, gen.pad_token_id, gen.temperature) == ([0, 1], 1,
                                                                   0.7)
  with open(os.path.join(student_dir, "config.json")) as f:
    cfg = json.load(f)
  assert cfg["dtype"] == cfg["torch_dtype"] == "float32"
  assert (cfg["eos_token_id"], cfg["pad_token_id"]) == (0, 1)


# -----------------------------------------------------------------------------
# 2. distill.hf_out must not overwrite the teacher or a foreign directory.
# -----------------------------------------------------------------------------


def test_hf_out_equal_to_the_teacher_is_a_config_error(f32_teacher):
  root, teacher_dir = f32_teacher
  before = files_of(teacher_dir)
  link = root / "teacher_link"
  if not link.exists():
    os.symlink(teacher_dir, link)
  for hf_out in (teacher_dir, teacher_dir + "/", str(link)):
    rc, out, err = run_main(distill_args(root / "runs", teacher_dir,
                                         f"distill.hf_out={hf_out}",
                                         "distill.hf_overwrite=true"))
    line = one_line(err)
    assert rc == errors.EXIT_USAGE, out + err
    assert "config error" in line and "teacher's own directory" in line, line
  assert files_of(teacher_dir) == before


def test_hf_out_holding_a_foreign_checkpoint_is_refused(f32_teacher,
                                                        tokenizer_json):
  root, teacher_dir = f32_teacher
  other = hf_e2e.write_checkpoint(root / "someone_elses",
                                  hf_e2e.hub_qwen3_config(),
                                  hf_e2e.qwen3_tensors(5), tokenizer_json)
  before = files_of(other)
  rc, out, err = run_main(distill_args(root / "runs", teacher_dir,
                                       f"distill.hf_out={other}"))
  line = one_line(err)
  assert rc == errors.EXIT_USAGE, out + err
  assert "already holds a config.json" in line, line
  assert "distill.hf_overwrite=true" in line, line
  assert files_of(other) == before
  assert not os.path.exists(root / "runs" / "student_token_kd")

  # The check itself: this run's own earlier export passes, so does
  # distill.hf_overwrite, and so does an empty or new directory.
  config = _lm_config.load_config([LM_TINY], [
      f"teacher.hf_path={teacher_dir}", "student.init=teacher_layers",
      f"distill.hf_out={other}"])
  run_dir = str(root / "a_run")
  with pytest.raises(ConfigError, match="did not write"):
    _lm_export.check_hf_out(config, run_dir)
  os.makedirs(run_dir)
  with open(os.path.join(run_dir, _lm_export.HF_EXPORT_FILE), "w") as f:
    json.dump({"path": str(root / "elsewhere")}, f)
  with pytest.raises(ConfigError, match="did not write"):
    _lm_export.check_hf_out(config, run_dir)
  with open(os.path.join(run_dir, _lm_export.HF_EXPORT_FILE), "w") as f:
    json.dump({"path": other + "/."}, f)
  _lm_export.check_hf_out(config, run_dir)
  config["distill"]["hf_overwrite"] = True
  _lm_export.check_hf_out(config, str(root / "another_run"))
  config["distill"].update(hf_overwrite=False, hf_out=str(root / "new_dir"))
  _lm_export.check_hf_out(config, str(root / "another_run"))


# -----------------------------------------------------------------------------
# 3. A truncated model.safetensors; tensors that contradict config.json.
# -----------------------------------------------------------------------------


def _truncate(src, dst, keep_fraction=0.5):
  shutil.copytree(src, dst)
  file = os.path.join(dst, "model.safetensors")
  size = os.path.getsize(file)
  with open(file, "r+b") as f:
    f.truncate(int(size * keep_fraction))
  return str(dst), file, size


def test_read_headers_names_a_truncated_file(f32_teacher, tmp_path):
  from kdjax.lm._hf_config import HFCheckpointError
  from kdjax.lm._hf_tensors import read_headers
  _, teacher_dir = f32_teacher
  whole = os.path.join(teacher_dir, "model.safetensors")
  assert len(read_headers([whole])) == len(hf_e2e.qwen3_tensors(0))
  _, file, size = _truncate(teacher_dir, tmp_path / "half")
  with pytest.raises(HFCheckpointError, match="is truncated") as e:
    read_headers([file])
  assert file in str(e.value) and str(size) in str(e.value)
  # Cut inside the header.
  with open(file, "r+b") as f:
    f.truncate(20)
  with pytest.raises(HFCheckpointError, match="is truncated"):
    read_headers([file])


def test_truncated_teacher_exits_2_naming_the_file(f32_teacher):
  root, teacher_dir = f32_teacher
  broken, file, _ = _truncate(teacher_dir, root / "truncated")
  rc, out, err = run_main(distill_args(root / "runs_t", broken))
  line = one_line(err)
  assert rc == errors.EXIT_USAGE, out + err
  assert line.startswith("kdjax lm distill: config error:"), line
  assert "teacher.hf_path" in line and file in line and "truncated" in line


# -----------------------------------------------------------------------------
# 4. lm_tiny.yaml with another student family; --set of a whole kwargs.
# -----------------------------------------------------------------------------


def test_lm_tiny_takes_a_qwen3_student():
  config = _lm_config.load_config([LM_TINY], ["student.family=qwen3"])
  model = _lm_models.build_lm(config["student"], 300,
                              config["data"]["seq_len"], 0, "student")
  assert model.family == "qwen3" and model.rows == 300


def test_set_of_a_whole_kwargs_mapping_replaces_it():
  base = _lm_config.load_config([LM_TINY])["teacher"]["kwargs"]
  assert base == {"d_model": 48, "max_len": 64}
  for text, want in (("teacher.kwargs={}", {}),
                     ("teacher.kwargs=null", {}),
                     ("teacher.kwargs={num_layers: 2}", {"num_layers": 2}),
                     ("teacher.kwargs.num_layers=2", {**base,
                                                      "num_layers": 2})):
    got = _lm_config.load_config([LM_TINY], [text])["teacher"]["kwargs"]
    assert got == want, text
  config = _lm_config.load_config([LM_TINY], ["teacher.family=qwen3",
                                              "teacher.kwargs={}"])
  _lm_models.build_lm(config["teacher"], 300, 32, 0, "teacher")


# -----------------------------------------------------------------------------
# 5. Help text.
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["train-teacher", "distill", "eval",
                                     "generate", "config"])
def test_lm_set_help_names_an_lm_key(command):
  rc, out, _ = run_main(["lm", command, "--help"])
  assert rc == 0
  text = " ".join(out.split())
  assert "distill.objective=" in text and "distill.method" not in text, text


# -----------------------------------------------------------------------------
# kdjax lm eval --hf
# -----------------------------------------------------------------------------


def _hf_eval(hf_dir, *sets):
  rc, out, err = run_main(["lm", "eval", "--hf", hf_dir, "--config", LM_TINY,
                           "--set", "data.max_eval_sequences=8", *sets])
  return rc, out, err


def test_lm_eval_hf_compares_two_directories(f32_teacher, bf16_teacher,
                                             tmp_path):
  from kdjax.cli.lm import evaluate as t
  _, f32 = f32_teacher
  _, bf16 = bf16_teacher
  a = t.evaluate_hf(f32, [LM_TINY], overrides=[
      f"output_dir={tmp_path}", f"teacher.hf_path={bf16}",
      "data.max_eval_sequences=8"], out=lambda _: None)
  b = t.evaluate_hf(bf16, [LM_TINY], overrides=[
      f"output_dir={tmp_path}", f"teacher.hf_path={f32}",
      "data.max_eval_sequences=8"], out=lambda _: None)
  alone = t.evaluate_hf(f32, [LM_TINY], overrides=[
      f"output_dir={tmp_path}", f"teacher.hf_path={bf16}",
      "data.max_eval_sequences=8"], use_teacher=False, out=lambda _: None)
  assert a["hf"] == os.path.abspath(f32) and a["teacher"] == os.path.abspath(
      bf16) and alone["teacher"] is None
  # Each directory scores the same in either role; the same weights in
  # float32 and bfloat16 differ a little.
  assert a["perplexity"] == pytest.approx(b["teacher_perplexity"], rel=1e-5)
  assert b["perplexity"] == pytest.approx(a["teacher_perplexity"], rel=1e-5)
  assert alone["perplexity"] == pytest.approx(a["perplexity"], rel=1e-6)
  assert a["perplexity"] != b["perplexity"]
  assert 1.0 < a["perplexity"] < 2 * hf_e2e.TOKENIZER_IDS
  assert 0.0 < a["teacher_kl"] < 0.05, a
  assert a["tokens"] == alone["tokens"] > 0


@pytest.mark.parametrize("args, piece", [
    (["lm", "eval"], "give a run directory (RUN_DIR) or"),
    (["lm", "eval", "runs/x", "--hf", "y"], "not both"),
    (["lm", "eval", "runs/x", "--config", LM_TINY], "--config is for --hf"),
    (["lm", "eval", "--hf", "/nonexistent/hf"], "no config.json"),
])
def test_lm_eval_hf_usage_errors(args, piece):
  rc, out, err = run_main(args)
  assert rc == errors.EXIT_USAGE, out + err
  assert piece in one_line(err), err


def test_lm_eval_hf_of_the_teacher_itself(f32_teacher):
  _, f32 = f32_teacher
  rc, out, err = _hf_eval(f32, f"teacher.hf_path={f32}/")
  assert rc == errors.EXIT_USAGE and "is teacher.hf_path itself" in one_line(
      err), out + err
