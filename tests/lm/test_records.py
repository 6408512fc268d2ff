"""Prompt–completion and chat datasets (kdjax/lm/_records.py)."""

from __future__ import annotations

import json
import os

import pytest

from kdjax import lm

PAIRS = [{"prompt": "What is 2 + 3?", "completion": " 5."},
         {"prompt": "Capital of France?", "completion": " Paris."}]
CHATS = [{"messages": [
    {"role": "system", "content": "Be terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "tool", "content": "42"},
    {"role": "assistant", "content": "It is 42."}]}]


def _jsonl(path, rows, raw_lines=()):
  lines = [json.dumps(r) for r in rows] + list(raw_lines)
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return path


def _parquet(path, rows):
  pa = pytest.importorskip("pyarrow")
  pq = pytest.importorskip("pyarrow.parquet")
  pq.write_table(pa.Table.from_pylist(rows), path)
  return path


def _as_rows(records):
  return [({"messages": list(r.messages)} if r.is_chat else
           {"prompt": r.prompt, "completion": r.completion})
          for r in records]


def test_jsonl_round_trip(tmp_path):
  path = _jsonl(tmp_path / "d.jsonl", PAIRS + CHATS)
  got = lm.read_records(path)
  assert _as_rows(got) == PAIRS + CHATS
  assert [r.is_chat for r in got] == [False, False, True]
  assert [(r.path, r.line, r.unit) for r in got] == [
      (str(path), 1, "line"), (str(path), 2, "line"), (str(path), 3, "line")]
  assert got[2].where == f"{path}, line 3"
  assert got.skipped == {} and got.skipped_summary() == "skipped 0 rows"
  assert got.files == (str(path),)


def test_blank_lines_are_not_rows_and_lines_count_them(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text("\n" + json.dumps(PAIRS[0]) + "\n\n  \n"
                  + json.dumps(PAIRS[1]) + "\n\n")
  got = lm.read_records(path)
  assert _as_rows(got) == PAIRS
  assert [r.line for r in got] == [2, 5]


def test_parquet_round_trip(tmp_path):
  chat_with_tools = {"messages": [
      {"role": "user", "content": "Add 2 and 3."},
      {"role": "assistant", "content": "5", "name": "calc"}]}
  _parquet(tmp_path / "pairs.parquet", PAIRS)
  _parquet(tmp_path / "chats.parquet", CHATS + [chat_with_tools])
  pairs = lm.read_records(tmp_path / "pairs.parquet")
  assert _as_rows(pairs) == PAIRS
  assert [(r.line, r.unit) for r in pairs] == [(0, "row"), (1, "row")]
  chats = lm.read_records(tmp_path / "chats.parquet")
  # Parquet gives every struct all the keys of its column; the rows that
  # lack one read null, dropped (a template would see it as defined).
  assert _as_rows(chats) == CHATS + [chat_with_tools]
  assert "name" not in chats[0].messages[0]


def test_directory_is_sorted_and_recursive(tmp_path):
  (tmp_path / "b").mkdir()
  (tmp_path / "a" / "z").mkdir(parents=True)
  _jsonl(tmp_path / "b" / "1.jsonl", [PAIRS[1]])
  _jsonl(tmp_path / "a" / "z" / "2.ndjson", CHATS)
  _jsonl(tmp_path / "a" / "1.jsonl", [PAIRS[0]])
  _parquet(tmp_path / "c.parquet", PAIRS)
  (tmp_path / "README.md").write_text("not data")
  got = lm.read_records(tmp_path)
  assert [os.path.relpath(f, tmp_path) for f in got.files] == [
      os.path.join("a", "1.jsonl"), os.path.join("a", "z", "2.ndjson"),
      os.path.join("b", "1.jsonl"), "c.parquet"]
  assert _as_rows(got) == [PAIRS[0]] + CHATS + [PAIRS[1]] + PAIRS
  # format= keeps one format's files; a list is read in the order given.
  assert len(lm.read_records(tmp_path, format="parquet")) == 2
  both = lm.read_records([tmp_path / "c.parquet", tmp_path / "b"])
  assert _as_rows(both) == PAIRS + [PAIRS[1]]


def test_field_renames(tmp_path):
  path = _jsonl(tmp_path / "d.jsonl", [
      {"question": "Q?", "answer": "A."},
      {"conversation": CHATS[0]["messages"]}])
  got = lm.read_records(path, prompt_field="question",
                        completion_field="answer",
                        messages_field="conversation")
  assert (got[0].prompt, got[0].completion) == ("Q?", "A.")
  assert got[1].messages == tuple(CHATS[0]["messages"])
  with pytest.raises(lm.RecordError, match="completion_field="):
    lm.read_records(path)


def test_explicit_format_reads_any_extension(tmp_path):
  path = _jsonl(tmp_path / "data.txt", PAIRS)
  with pytest.raises(ValueError, match="format="):
    lm.read_records(path)
  assert _as_rows(lm.read_records(path, format="jsonl")) == PAIRS


BAD_ROWS = [  # (raw line, reason, field named)
    ('{"prompt": "x", "completion": ', "bad_json", None),
    (json.dumps({"prompt": "x"}), "missing_field", "completion"),
    (json.dumps({"text": "x"}), "missing_field", "prompt/completion"),
    (json.dumps({"prompt": "x", "completion": 3}), "wrong_type",
     "completion"),
    (json.dumps([1, 2]), "wrong_type", None),
    (json.dumps({"prompt": "x", "completion": ""}), "empty_completion",
     "completion"),
    (json.dumps({"messages": "hi"}), "wrong_type", "messages"),
    (json.dumps({"messages": [{"role": "narrator", "content": "x"}]}),
     "unknown_role", "messages[0].role"),
    (json.dumps({"messages": [{"content": "x"}]}), "missing_field",
     "messages[0].role"),
    (json.dumps({"messages": [{"role": "user"}]}), "missing_field",
     "messages[0].content"),
    (json.dumps({"messages": [{"role": "user", "content": ["x"]}]}),
     "wrong_type", "messages[0].content"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}),
     "no_assistant", "messages"),
    (json.dumps({"messages": [{"role": "user", "content": "x"},
                              {"role": "assistant", "content": ""}]}),
     "empty_completion", "messages[1].content"),
]


@pytest.mark.parametrize("raw,reason,field", BAD_ROWS)
def test_each_error_names_file_line_and_field(tmp_path, raw, reason, field):
  path = _jsonl(tmp_path / "d.jsonl", PAIRS, raw_lines=[raw])
  with pytest.raises(lm.RecordError) as info:
    lm.read_records(path)
  err = info.value
  assert (err.path, err.line, err.unit) == (str(path), 3, "line")
  assert (err.reason, err.field) == (reason, field)
  assert f"{path}, line 3" in str(err)
  if field is not None:
    assert repr(field) in str(err)
  assert "on_error='skip'" in str(err)


def test_parquet_error_names_the_row(tmp_path):
  path = _parquet(tmp_path / "d.parquet", PAIRS + [
      {"prompt": "x", "completion": None}])
  with pytest.raises(lm.RecordError, match=r"d\.parquet, row 2, field "
                     r"'completion'") as info:
    lm.read_records(path)
  assert (info.value.line, info.value.unit) == (2, "row")


def test_skip_mode_counts_by_reason(tmp_path):
  raws = [BAD_ROWS[0][0], BAD_ROWS[5][0], BAD_ROWS[12][0], BAD_ROWS[7][0]]
  path = _jsonl(tmp_path / "d.jsonl", PAIRS, raw_lines=raws)
  got = lm.read_records(path, on_error="skip")
  assert _as_rows(got) == PAIRS
  assert got.skipped == {"bad_json": 1, "empty_completion": 2,
                         "unknown_role": 1}
  assert got.num_skipped == 4
  assert got.skipped_summary() == (
      "skipped 4 rows: 2 empty completion, 1 bad JSON, 1 unknown role")
  assert got.first_skipped["empty_completion"].startswith(
      f"{path}, line 4, field 'completion'")


def test_argument_errors(tmp_path):
  path = _jsonl(tmp_path / "d.jsonl", PAIRS)
  with pytest.raises(ValueError, match="format='csv'"):
    lm.read_records(path, format="csv")
  with pytest.raises(ValueError, match="on_error='ignore'"):
    lm.read_records(path, on_error="ignore")
  with pytest.raises(FileNotFoundError, match="no dataset file"):
    lm.read_records(tmp_path / "missing.jsonl")
  (tmp_path / "empty").mkdir()
  with pytest.raises(FileNotFoundError, match="no data files"):
    lm.read_records(tmp_path / "empty")


def test_undecodable_lines_and_unreadable_parquet_name_the_file(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_bytes(b'{"prompt": "a", "completion": "b"}\n'
                   b'{"prompt": "\xff", "completion": "b"}\n')
  with pytest.raises(lm.RecordError, match=r"d.jsonl, line 2.*not UTF-8"):
    lm.read_records(str(path))
  rs = lm.read_records(str(path), on_error="skip")
  assert len(rs) == 1 and rs.skipped == {"bad_json": 1}
  bad = tmp_path / "d.parquet"
  bad.write_bytes(b"not parquet")
  pytest.importorskip("pyarrow")
  with pytest.raises(lm.RecordError, match=r"d.parquet: not a readable"):
    lm.read_records(str(bad), on_error="skip")


def test_record_files_lists_what_read_records_reads(tmp_path):
  (tmp_path / "sub").mkdir()
  for name in ("b.jsonl", "a.jsonl", "sub/c.jsonl"):
    (tmp_path / name).write_text('{"prompt": "a", "completion": "b"}\n')
  (tmp_path / "notes.txt").write_text("not data")
  files = lm.record_files([str(tmp_path)])
  assert [os.path.relpath(f, tmp_path) for f, _ in files] == [
      "a.jsonl", "b.jsonl", os.path.join("sub", "c.jsonl")]
  assert [f for f, _ in files] == list(lm.read_records(str(tmp_path)).files)


def test_iter_records_reads_as_it_goes(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text('{"prompt": "a", "completion": "b"}\n{bad\n'
                  '{"prompt": "c", "completion": "d"}\n')
  stream = lm.iter_records(str(path))  # nothing read yet: no error
  it = iter(stream)
  assert next(it).prompt == "a"
  with pytest.raises(lm.RecordError, match="line 2"):
    next(it)
  skipping = lm.iter_records(str(path), on_error="skip")
  assert [r.prompt for r in skipping] == ["a", "c"]
  assert skipping.skipped == {"bad_json": 1}
  assert skipping.skipped_summary() == "skipped 1 row: 1 bad JSON"
  assert skipping.files == (str(path),)
