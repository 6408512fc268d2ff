"""``kdjax lm`` on prompt–completion and chat files (data.format jsonl /
parquet): the loss covers the completion (assistant) tokens only, bad rows
are named by file and line, skipped rows are counted."""

from __future__ import annotations

import contextlib
import io
import json
import os

import numpy as np
import pytest

from kdjax import lm
from kdjax.cli import errors
from kdjax.cli.config import lm as _lm_config
from kdjax.cli.lm import data as _lm_data
from kdjax.cli.main import main

tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
LM_TINY = os.path.join(REPO_ROOT, "experiments", "configs", "lm_tiny.yaml")

CHATML = (
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m.role + '\\n' }}"
    "{%- if m.role == 'assistant' %}{% generation %}"
    "{{- m.content + '<|im_end|>' }}{% endgeneration %}"
    "{%- else %}{{- m.content + '<|im_end|>' }}{%- endif %}"
    "{{- '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}")


def _pairs(n):
  return [{"prompt": f"def add_{i}(x):\n    \"\"\"Return x plus {i}.\"\"\"\n",
           "completion": f"    return x + {i}\n"} for i in range(n)]


def _write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return str(path)


def _config(root, *sets):
  return _lm_config.load_config([LM_TINY], [
      f"output_dir={root}", "data.corpus=files", *sets])


def _quiet(_):
  pass


def test_prompt_completion_rows_train_on_the_completion(tmp_path):
  path = _write_jsonl(tmp_path / "d.jsonl", _pairs(40))
  config = _config(tmp_path / "run", "data.format=jsonl",
                   f"data.paths=[{path}]", "data.eval_every=5")
  data = _lm_data.load_data(config, out=_quiet)
  assert len(data.train[0]) == 32 and len(data.held_out[0]) == 8
  tok = data.tokenizer
  # Every row's loss covers exactly its completion and EOS.
  completions = {tuple(tok.encode(r["completion"]) + [tok.eos_id])
                 for r in _pairs(40)}
  batch = data.batches.batch_at(0)
  for targets, mask in zip(batch["targets"], batch["loss_mask"]):
    assert tuple(int(t) for t in targets[mask > 0]) in completions
  # Held out: every 5th row, never trained on.
  assert tok.decode(list(data.held_out[1][0])).strip() == "return x + 4"


def test_parquet_and_eval_paths(tmp_path):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  rows = _pairs(12)
  pq.write_table(pa.Table.from_pylist(rows[:10]), tmp_path / "train.parquet")
  held = _write_jsonl(tmp_path / "held.jsonl", rows[10:])
  config = _config(tmp_path / "run", "data.format=auto",
                   f"data.paths=[{tmp_path / 'train.parquet'}]",
                   f"data.eval_paths=[{held}]", "data.batch_size=4")
  data = _lm_data.load_data(config, out=_quiet)
  assert len(data.train[0]) == 10 and len(data.held_out[0]) == 2
  assert data.corpus["files"]["eval"] == [held]


def _chat_dir(tmp_path):
  texts = ["What is two plus three? It is five. Name a prime: seven."] * 8
  tok = tokenizers.Tokenizer.from_str(lm.train_bpe(texts, 300))
  tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
  d = tmp_path / "hf_tok"
  d.mkdir()
  (d / "tokenizer.json").write_text(tok.to_str())
  (d / "tokenizer_config.json").write_text(json.dumps({
      "chat_template": CHATML, "eos_token": "<|im_end|>"}))
  return str(d)


def test_chat_rows_train_on_the_assistant_turns(tmp_path):
  tok_dir = _chat_dir(tmp_path)
  chats = [{"messages": [
      {"role": "system", "content": "Answer briefly."},
      {"role": "user", "content": f"What is {i} plus three?"},
      {"role": "assistant", "content": f"It is {i + 3}."},
      {"role": "user", "content": "Name a prime."},
      {"role": "assistant", "content": "seven"}]} for i in range(10)]
  path = _write_jsonl(tmp_path / "chat.jsonl", chats)
  config = _config(tmp_path / "run", "data.format=jsonl",
                   f"data.paths=[{path}]", "data.seq_len=256",
                   "tokenizer.kind=file", f"tokenizer.path={tok_dir}",
                   "tokenizer.eos_token=<|im_end|>", "data.batch_size=4")
  data = _lm_data.load_data(config, out=_quiet)
  # Two examples per conversation (one per assistant turn), in order.
  assert len(data.train[0]) == 18 and len(data.held_out[0]) == 2
  tok = data.tokenizer
  texts = [tok.decode(list(c)) for c in data.train[1][:2]]
  assert texts[0].startswith("It is 3.") and texts[1].startswith("seven")
  # The loss tokens decode to assistant text only.
  batch = data.batches.batch_at(0)
  for targets, mask in zip(batch["targets"], batch["loss_mask"]):
    said = tok.decode([int(t) for t in targets[mask > 0]])
    assert said.startswith(("It is", "seven")) and "user" not in said


def _run(args):
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    rc = main([str(a) for a in args])
  return rc, out.getvalue(), err.getvalue()


def test_bad_rows_are_named_or_counted(tmp_path):
  path = tmp_path / "d.jsonl"
  rows = [json.dumps(r) for r in _pairs(20)]
  rows[6] = '{"prompt": "x", "completion": ""}'
  rows[11] = "{not json"
  path.write_text("\n".join(rows) + "\n")
  args = ["lm", "train-teacher", "--config", LM_TINY, "--set",
          f"output_dir={tmp_path / 'run'}", "data.corpus=files",
          "data.format=jsonl", f"data.paths=[{path}]", "train.steps=1"]
  rc, _, err = _run(args)
  assert rc == errors.EXIT_USAGE
  assert f"{path}, line 7" in err and "data.on_error" in err
  assert not os.path.exists(tmp_path / "run" / "teacher" / "run.json")
  config = _config(tmp_path / "run", "data.format=jsonl",
                   f"data.paths=[{path}]", "data.on_error=skip")
  lines = []
  data = _lm_data.load_data(config, out=lines.append)
  assert len(data.train[0]) + len(data.held_out[0]) == 18
  # Held out: every 6th line (lm_tiny's eval_every) of the file, whichever
  # rows were skipped (line 12, bad JSON, is gone; no other row moves).
  assert [r.line for r in data.corpus["records"]["eval"]] == [6, 18]
  assert any("skipped 2 rows: 1 bad JSON, 1 empty completion" in line
             for line in lines)


def test_a_prompt_longer_than_seq_len_names_the_key(tmp_path):
  rows = _pairs(20)
  rows[3] = {"prompt": "word " * 200, "completion": "x"}
  path = _write_jsonl(tmp_path / "d.jsonl", rows)
  config = _config(tmp_path / "run", "data.format=jsonl",
                   f"data.paths=[{path}]")
  with pytest.raises(errors.BadRowError, match=r"line 4.*data.seq_len"):
    _lm_data.load_data(config, out=_quiet)
  lines = []
  data = _lm_data.load_data(
      {**config, "data": {**config["data"], "on_error": "skip"}},
      out=lines.append)
  assert len(data.train[0]) + len(data.held_out[0]) == 19
  assert any("1 prompt longer than seq_len" in line for line in lines)


def test_conversations_without_a_template_name_the_key(tmp_path):
  path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
      {"role": "user", "content": "hi"},
      {"role": "assistant", "content": "hello"}]}] * 4)
  config = _config(tmp_path / "run", "data.format=jsonl",
                   f"data.paths=[{path}]", "data.eval_every=2")
  with pytest.raises(errors.UsageError, match="data.chat_template"):
    _lm_data.load_data(config, out=_quiet)


def test_distill_and_eval_on_records(tmp_path):
  """Teacher and token-KD student end to end on prompt–completion rows: the
  student's held-out loss is over completion tokens only, and `kdjax lm
  eval`'s per-file sums add up to its totals (what a confidence interval
  over held-out files resamples)."""
  rows = _pairs(30)
  train = _write_jsonl(tmp_path / "train.jsonl", rows[:20])
  held = [_write_jsonl(tmp_path / f"held_{i}.jsonl",
                       rows[20 + 5 * i:25 + 5 * i]) for i in range(2)]
  sets = [f"output_dir={tmp_path / 'run'}", "data.corpus=files",
          "data.format=jsonl", f"data.paths=[{train}]",
          f"data.eval_paths=[{held[0]}, {held[1]}]", "train.steps=2"]
  for command in ("train-teacher", "distill"):
    rc, out, err = _run(["lm", command, "--config", LM_TINY, "--set", *sets])
    assert rc == 0, err
  student = tmp_path / "run" / "student_token_kd"
  with open(student / "summary.json") as f:
    summary = json.load(f)
  tok = lm.load_tokenizer(str(tmp_path / "run"))
  n_tokens = sum(len(tok.encode(r["completion"])) + 1 for r in rows[20:])
  assert summary["eval"]["tokens"] == n_tokens
  assert np.isfinite(summary["eval"]["teacher_kl"])
  rc, _, err = _run(["lm", "eval", str(student)])
  assert rc == 0, err
  with open(student / "eval.json") as f:
    result = json.load(f)
  assert sorted(result["per_file"]) == sorted(held)
  sums = {k: sum(v[k] for v in result["per_file"].values())
          for k in ("nll", "tokens", "divergence")}
  assert sums["tokens"] == result["tokens"] == n_tokens
  np.testing.assert_allclose(sums["nll"] / sums["tokens"], result["loss"],
                             rtol=1e-6)
  np.testing.assert_allclose(sums["divergence"] / sums["tokens"],
                             result["teacher_kl"], rtol=1e-5)


def test_the_stdlib_instruction_set(tmp_path):
  """data.corpus stdlib_functions: held-out modules are never trained on (nor
  is the tokenizer trained on them); what does not fit is counted."""
  config = _lm_config.load_config([LM_TINY], [
      f"output_dir={tmp_path}", "data.corpus=stdlib_functions",
      "data.max_files=30", "data.seq_len=128", "tokenizer.kind=bytes"])
  lines = []
  data = _lm_data.load_data(config, out=lines.append)
  files = data.corpus["files"]
  assert files["train"] and files["eval"]
  assert not set(files["train"]) & set(files["eval"])
  records = data.corpus["records"]
  for split, name in (("train", "train"), ("eval", "validation")):
    modules = {lm.stdlib_module_split(_module_of(r.path)) for r in
               records[split]}
    assert modules == {name}
  tok = data.tokenizer
  prompt = tok.decode(list(data.train[0][0]))
  assert prompt.lstrip().startswith(("def ", "async def ", "@", "# class"))
  assert any("prompt longer than seq_len" in line for line in lines)


def _module_of(path):
  import sysconfig  # pylint: disable=g-import-not-at-top
  rel = os.path.relpath(path, sysconfig.get_paths()["stdlib"])
  rel = rel[:-len(".py")]
  if rel.endswith("__init__"):
    rel = os.path.dirname(rel)
  return rel.replace(os.sep, ".")


def test_packed_rows(tmp_path):
  """data.pack: several examples a row, each row's loss tokens the
  completions of its examples; the efficiency is printed and recorded; GKD
  refuses it."""
  path = _write_jsonl(tmp_path / "d.jsonl", _pairs(40))
  sets = ["data.format=jsonl", f"data.paths=[{path}]", "data.seq_len=64",
          "data.batch_size=2", "data.eval_every=10"]
  lines = []
  data = _lm_data.load_data(_config(tmp_path / "run", *sets, "data.pack=true"),
                            out=lines.append)
  plain = _lm_data.load_data(_config(tmp_path / "run", *sets), out=_quiet)
  eff = data.packing_efficiency
  assert 0.5 < eff <= 1.0 and plain.packing_efficiency is None
  assert any(f"packing efficiency {eff:.3f}" in line for line in lines)
  assert data.batches.steps_per_epoch < plain.batches.steps_per_epoch
  batch = data.batches.batch_at(0)
  assert "segment_ids" in batch and batch["tokens"].shape == (2, 64)
  assert int(batch["segment_ids"].max()) > 1  # several examples in a row
  # The packed rows' loss tokens are exactly the examples' completions.
  tok = data.tokenizer
  completions = {tuple(tok.encode(r["completion"]) + [tok.eos_id])
                 for r in _pairs(40)}
  for targets, mask, seg in zip(batch["targets"], batch["loss_mask"],
                                batch["segment_ids"]):
    for s in set(int(x) for x in seg) - {0}:
      got = tuple(int(t) for t in targets[(seg == s) & (mask > 0)])
      assert got in completions
  rc, _, err = _run(["lm", "distill", "--config", LM_TINY, "--set",
                     f"output_dir={tmp_path / 'run'}", "data.corpus=files",
                     *sets, "data.pack=true", "distill.objective=gkd"])
  assert rc == errors.EXIT_USAGE and "data.pack" in err, err


def test_a_tokenizer_without_the_templates_tokens_is_refused(tmp_path):
  """A chat template whose turn markers the tokenizer would cut into pieces
  (a BPE trained on plain text) exits 2 naming the tokens and keys."""
  tok_dir = _chat_dir(tmp_path)
  path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": [
      {"role": "user", "content": "hi"},
      {"role": "assistant", "content": "hello"}]}] * 4)
  config = _config(tmp_path / "run", "data.format=jsonl",
                   f"data.paths=[{path}]", "data.eval_every=2",
                   "tokenizer.kind=bytes", f"data.chat_template={tok_dir}")
  with pytest.raises(errors.UsageError,
                     match=r"'<\|im_end\|>' \(\d+ ids\).*tokenizer.kind"):
    _lm_data.load_data(config, out=_quiet)


def test_token_cache_is_written_once_and_reused(tmp_path):
  """data.cache_dir: the training sequences are tokenized once, read back
  memory-mapped with the same batches (the training file is not read again:
  the held-out rows are their own file); other inputs are refused."""
  path = _write_jsonl(tmp_path / "d.jsonl", _pairs(40)[:36])
  held = _write_jsonl(tmp_path / "held.jsonl", _pairs(40)[36:])
  sets = ["data.format=jsonl", f"data.paths=[{path}]",
          f"data.eval_paths=[{held}]", f"data.cache_dir={tmp_path / 'cache'}"]
  lines = []
  first = _lm_data.load_data(_config(tmp_path / "run", *sets),
                             out=lines.append)
  again_lines = []
  again = _lm_data.load_data(_config(tmp_path / "run", *sets),
                             out=again_lines.append)
  plain = _lm_data.load_data(_config(tmp_path / "run", *sets[:3]),
                             out=_quiet)
  assert any("(written)" in line for line in lines)
  assert any("(reused; the training data not read)" in line
             for line in again_lines)
  assert not any("training data:" in line for line in again_lines)
  assert again.corpus["records"]["train"] == [] and not again.corpus[
      "train_read"]
  assert again.data_fingerprint == first.data_fingerprint
  for step in (0, 3, 7):  # across an epoch boundary (36 sequences / 8)
    a, b = again.batches.batch_at(step), plain.batches.batch_at(step)
    for key in b:
      np.testing.assert_array_equal(a[key], b[key])
  assert len(first.train[0]) == len(plain.train[0]) == 36
  with pytest.raises(errors.UsageError, match="data.cache_dir"):
    _lm_data.load_data(_config(tmp_path / "run", *sets, "data.seq_len=48"),
                       out=_quiet)
  rebuilt = _lm_data.load_data(_config(tmp_path / "run", *sets,
                                       "data.seq_len=48",
                                       "data.cache_rebuild=true"), out=_quiet)
  assert len(rebuilt.train[0]) == 36


def test_the_cache_fingerprint_follows_what_is_read(tmp_path):
  """The sources' fingerprint changes with the paths' order (it moves rows
  between the splits) and a data file's contents, not with other files."""
  (tmp_path / "data").mkdir()
  a = _write_jsonl(tmp_path / "data" / "a.jsonl", _pairs(6))
  b = _write_jsonl(tmp_path / "data" / "b.jsonl", _pairs(9))
  base = _lm_config.load_config([LM_TINY], [
      "data.corpus=files", "data.format=jsonl", f"data.paths=[{a}, {b}]"])
  swapped = {**base, "data": {**base["data"], "paths": [b, a]}}
  as_dir = {**base, "data": {**base["data"], "paths": [str(tmp_path / "data")]}}
  fp = _lm_data.source_fingerprint
  assert fp(base["data"]) != fp(swapped["data"])
  before = fp(as_dir["data"])
  (tmp_path / "data" / "notes.txt").write_text("not data")
  assert fp(as_dir["data"]) == before
  _write_jsonl(tmp_path / "data" / "b.jsonl", _pairs(10))
  assert fp(as_dir["data"]) != before


def test_a_bpe_trained_on_other_data_is_refused(tmp_path):
  """The shared BPE remembers the data keys of its training split: a config
  that splits other data refuses it (it may have seen the held-out rows)."""
  path = _write_jsonl(tmp_path / "d.jsonl", _pairs(40))
  sets = ["data.format=jsonl", f"data.paths=[{path}]"]
  _lm_data.load_data(_config(tmp_path / "run", *sets, "data.eval_every=5"),
                     out=_quiet)
  _lm_data.load_data(_config(tmp_path / "run", *sets, "data.eval_every=5"),
                     out=_quiet)  # the same split: reused
  with pytest.raises(errors.UsageError, match=r"data keys eval_every differ"):
    _lm_data.load_data(_config(tmp_path / "run", *sets, "data.eval_every=4"),
                       out=_quiet)


def test_the_first_cache_build_streams_the_training_rows(tmp_path):
  """With the held-out rows in their own files and a tokenizer that needs no
  training, the training rows are tokenized into the cache one at a time:
  never read into memory as a whole, the same batches as in memory."""
  rows = _pairs(44)
  rows[5] = {"prompt": "x", "completion": ""}  # skipped and counted
  path = _write_jsonl(tmp_path / "d.jsonl", rows[:40])
  held = _write_jsonl(tmp_path / "held.jsonl", rows[40:])
  sets = ["data.format=jsonl", f"data.paths=[{path}]",
          f"data.eval_paths=[{held}]", "tokenizer.kind=bytes",
          "data.on_error=skip", "data.seq_len=48"]
  lines = []
  data = _lm_data.load_data(
      _config(tmp_path / "run", *sets, f"data.cache_dir={tmp_path / 'c'}"),
      out=lines.append)
  plain = _lm_data.load_data(_config(tmp_path / "run", *sets), out=_quiet)
  assert not data.corpus["train_read"] and data.corpus["records"]["train"] == []
  assert any("streamed 39 examples from 1 files" in line
             and "1 empty completion" in line for line in lines), lines
  assert len(data.train[0]) == len(plain.train[0]) == 39
  for step in (0, 4, 9):
    a, b = data.batches.batch_at(step), plain.batches.batch_at(step)
    for key in b:
      np.testing.assert_array_equal(a[key], b[key])


def test_distill_on_a_chat_file_with_the_models_template_packed(tmp_path):
  """`kdjax lm distill` on a JSONL chat file, with the chat template of a
  Hugging Face tokenizer directory, packed: the held-out loss is over the
  assistant tokens only."""
  tok_dir = _chat_dir(tmp_path)
  chats = [{"messages": [
      {"role": "user", "content": f"What is {i} plus three?"},
      {"role": "assistant", "content": f"It is {i + 3}."}]} for i in range(24)]
  train = _write_jsonl(tmp_path / "chat.jsonl", chats[:20])
  held = _write_jsonl(tmp_path / "held.jsonl", chats[20:])
  sets = [f"output_dir={tmp_path / 'run'}", "data.corpus=files",
          "data.format=jsonl", f"data.paths=[{train}]",
          f"data.eval_paths=[{held}]", "data.seq_len=64", "data.pack=true",
          "data.batch_size=2", "tokenizer.kind=file",
          f"tokenizer.path={tok_dir}", "tokenizer.eos_token=<|im_end|>",
          "train.steps=2"]
  for command in ("train-teacher", "distill"):
    rc, out, err = _run(["lm", command, "--config", LM_TINY, "--set", *sets])
    assert rc == 0, err
    assert "packing efficiency" in out
  student = tmp_path / "run" / "student_token_kd"
  meta = json.loads((student / "run.json").read_text())
  assert meta["packed"] and 0 < meta["packing_efficiency"] <= 1
  tok = lm.load_tokenizer(tok_dir, eos_token="<|im_end|>")
  template = lm.load_chat_template(tok_dir)
  assistant = sum(sum(lm.apply_chat_template(tok, c["messages"], template)
                      .assistant_mask) for c in chats[20:])
  summary = json.loads((student / "summary.json").read_text())
  assert summary["eval"]["tokens"] == assistant
