"""Prompt–completion and chat datasets as people have them: JSONL and Parquet.

:func:`read_records` reads files (or directories of them) whose rows are one
of

* a prompt–completion pair: ``{"prompt": str, "completion": str}``;
* a conversation: ``{"messages": [{"role": ..., "content": str}, ...]}``
  with roles ``system``, ``user``, ``assistant``, ``tool`` (the layout of
  Hugging Face chat datasets and of OpenAI fine-tuning files).

The field names are arguments (``prompt_field``, ``completion_field``,
``messages_field``). A row with the messages field is a conversation; any
other row a prompt–completion pair.

Formats: ``jsonl`` (one JSON object a line; ``.jsonl``, ``.ndjson``; blank
lines are not rows), ``parquet`` (``.parquet``, read with ``pyarrow``,
imported only then), or a directory holding them (recursively, in sorted
order of their relative paths). The records come in a deterministic order:
the paths as given, each directory's files sorted, the rows of a file in
file order. Each :class:`Record` remembers where it came from (file and
1-based line for JSONL, 0-based row for Parquet).

A bad row (invalid JSON, a missing field, a value of the wrong type, an
unknown role, an empty completion, a conversation without an assistant turn)
raises :class:`RecordError`, naming the file, the line (or row), the field and
the reason; with ``on_error="skip"`` the row is skipped and counted by reason
in :attr:`RecordSet.skipped` (``RecordSet.skipped_summary()`` reads "skipped
3 rows: 2 empty completion, 1 bad JSON"), never dropped silently.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from typing import Any, Iterator, Mapping, Optional, Sequence, Union

ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("auto", "jsonl", "parquet")
ON_ERROR = ("fail", "skip")
_EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".parquet": "parquet"}

# The reasons a row is rejected, as RecordError.reason and RecordSet.skipped
# keys, with their words in messages.
REASONS = {
    "bad_json": "bad JSON",
    "unreadable_file": "unreadable file",
    "missing_field": "missing field",
    "wrong_type": "wrong type",
    "unknown_role": "unknown role",
    "empty_completion": "empty completion",
    "no_assistant": "no assistant turn",
}

PathLike = Union[str, "os.PathLike[str]"]


class RecordError(ValueError):
  """A row of a dataset file that is not a record.

  Attributes:
    path: the file.
    line: the 1-based line (JSONL) or the 0-based row (Parquet).
    unit: ``"line"`` or ``"row"`` (``"file"`` for a Parquet file that cannot
      be read at all, whatever ``on_error`` says).
    field: the field concerned (e.g. ``"completion"``,
      ``"messages[2].role"``), or None (the whole row).
    reason: one of :data:`REASONS` (``"bad_json"``: invalid JSON or a line
      that is not UTF-8; ``"unreadable_file"``, ``"missing_field"``,
      ``"wrong_type"``, ``"unknown_role"``, ``"empty_completion"``,
      ``"no_assistant"``).
  """

  def __init__(self, message: str, *, path: str, line: int, unit: str,
               field: Optional[str], reason: str):
    super().__init__(message)
    self.path, self.line, self.unit = path, line, unit
    self.field, self.reason = field, reason


@dataclasses.dataclass(frozen=True)
class Record:
  """One row: a prompt–completion pair or a conversation.

  Attributes:
    prompt: the prompt (None for a conversation).
    completion: the completion (None for a conversation).
    messages: the conversation, a tuple of message dicts with ``"role"`` and
      ``"content"`` (and any other keys the row had, e.g. ``tool_calls``);
      None for a prompt–completion pair.
    path: the file it came from.
    line: its 1-based line (JSONL) or 0-based row (Parquet).
    unit: ``"line"`` or ``"row"``.
  """
  prompt: Optional[str]
  completion: Optional[str]
  messages: Optional[tuple[dict, ...]]
  path: str
  line: int
  unit: str = "line"

  @property
  def is_chat(self) -> bool:
    """Whether the record is a conversation."""
    return self.messages is not None

  @property
  def where(self) -> str:
    """``"<path>, line <n>"`` (or ``row``), for messages."""
    return f"{self.path}, {self.unit} {self.line}"


@dataclasses.dataclass(frozen=True)
class RecordSet(Sequence[Record]):
  """The records read, in order, and the rows skipped (a sequence of
  :class:`Record`).

  Attributes:
    records: the records.
    skipped: reason -> number of rows skipped for it (empty unless
      ``on_error="skip"``); the reasons are :data:`REASONS`' keys.
    first_skipped: reason -> the message of the first row skipped for it
      (file, line and field), for a report.
    files: the files read, in order.
  """
  records: tuple[Record, ...]
  skipped: Mapping[str, int]
  first_skipped: Mapping[str, str]
  files: tuple[str, ...]

  def __len__(self) -> int:
    return len(self.records)

  def __getitem__(self, i):  # type: ignore[override]
    return self.records[i]

  def __iter__(self) -> Iterator[Record]:
    return iter(self.records)

  @property
  def num_skipped(self) -> int:
    """The number of rows skipped."""
    return sum(self.skipped.values())

  def skipped_summary(self) -> str:
    """``"skipped 3 rows: 2 empty completion, 1 bad JSON"`` (most frequent
    reason first), or ``"skipped 0 rows"``."""
    return _skipped_summary(self.skipped)


def _skipped_summary(skipped: Mapping[str, int]) -> str:
  n = sum(skipped.values())
  if not n:
    return "skipped 0 rows"
  parts = [f"{count} {REASONS.get(reason, reason)}" for reason, count in
           sorted(skipped.items(), key=lambda kv: (-kv[1], kv[0]))]
  return f"skipped {n} row{'s' if n != 1 else ''}: " + ", ".join(parts)


# -----------------------------------------------------------------------------
# Files.
# -----------------------------------------------------------------------------


def _format_of(path: str, fmt: str) -> Optional[str]:
  ext = os.path.splitext(path)[1].lower()
  found = _EXTENSIONS.get(ext)
  if fmt == "auto":
    return found
  return fmt if found in (None, fmt) else None


def _files(paths: Union[PathLike, Sequence[PathLike]], fmt: str
           ) -> list[tuple[str, str]]:
  """``[(file, format)]``: the paths in order, each directory's data files
  in sorted order of their relative paths."""
  if isinstance(paths, (str, os.PathLike)):
    paths = [paths]
  out = []
  for path in paths:
    path = os.fspath(path)
    if os.path.isdir(path):
      found = []
      for root, _, names in os.walk(path):
        for name in names:
          full = os.path.join(root, name)
          if os.path.splitext(name)[1].lower() in _EXTENSIONS:
            file_fmt = _format_of(full, fmt)
            if file_fmt is not None:
              found.append((os.path.relpath(full, path), full, file_fmt))
      if not found:
        raise FileNotFoundError(
            f"no {'data' if fmt == 'auto' else fmt} files in {path} "
            f"(looked for {', '.join(sorted(_EXTENSIONS))}, recursively).")
      out.extend((full, f) for _, full, f in sorted(found))
    elif os.path.exists(path):
      file_fmt = _format_of(path, fmt) if fmt == "auto" else fmt
      if file_fmt is None:
        raise ValueError(
            f"cannot tell the format of {path} from its extension; name it "
            f"with format= one of {FORMATS[1:]} (or rename the file to "
            f"{' / '.join(sorted(_EXTENSIONS))}).")
      out.append((path, file_fmt))
    else:
      raise FileNotFoundError(f"no dataset file or directory at {path}.")
  return out


def record_files(paths: Union[PathLike, Sequence[PathLike]], *,
                 format: str = "auto",  # pylint: disable=redefined-builtin
                 ) -> list[tuple[str, str]]:
  """The ``(file, format)`` pairs :func:`read_records` reads, in its order,
  without reading them (e.g. to fingerprint a dataset by its files' sizes and
  modification times).

  Raises:
    FileNotFoundError, ValueError: as :func:`read_records`.
  """
  if format not in FORMATS:
    raise ValueError(f"format={format!r}: use one of {FORMATS}.")
  return _files(paths, format)


def _jsonl_rows(path: str) -> Iterator[tuple[int, Any, Optional[str]]]:
  """``(line, row or None, error or None)`` of a JSONL file (blank lines
  skipped)."""
  with open(path, "rb") as f:
    for number, raw in enumerate(f, start=1):
      try:
        text = raw.decode("utf-8-sig" if number == 1 else "utf-8")
      except UnicodeDecodeError as e:
        yield number, None, f"not UTF-8 ({e.reason} at byte {e.start})"
        continue
      if not text.strip():
        continue
      try:
        yield number, json.loads(text), None
      except json.JSONDecodeError as e:
        yield number, None, f"invalid JSON ({e.msg} at column {e.colno})"


def _parquet_rows(path: str) -> Iterator[tuple[int, Any, Optional[str]]]:
  try:
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow.",
                      name="pyarrow") from e
  try:
    table = pq.read_table(path)
  except Exception as e:  # pylint: disable=broad-except
    # pyarrow's errors (ArrowInvalid, OSError) do not name the file.
    raise RecordError(
        f"{path}: not a readable Parquet file ({type(e).__name__}: {e}).",
        path=path, line=0, unit="file", field=None,
        reason="unreadable_file") from None
  for index, row in enumerate(table.to_pylist()):
    yield index, row, None


# -----------------------------------------------------------------------------
# Rows.
# -----------------------------------------------------------------------------


class _Bad(Exception):
  def __init__(self, reason: str, field: Optional[str], detail: str):
    super().__init__(detail)
    self.reason, self.field, self.detail = reason, field, detail


def _drop_nulls(value: Any) -> Any:
  """A Parquet struct has every key of its column; the rows that lack one
  read None, which a template would see as defined."""
  if isinstance(value, dict):
    return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
  if isinstance(value, list):
    return [_drop_nulls(v) for v in value]
  return value


def _string(row: Mapping[str, Any], field: str) -> str:
  value = row.get(field)
  if value is None:
    raise _Bad("missing_field", field, f"no {field!r} field")
  if not isinstance(value, str):
    raise _Bad("wrong_type", field, f"{field!r} is a "
               f"{type(value).__name__}, not a string")
  return value


def _messages(row: Mapping[str, Any], field: str, parquet: bool
              ) -> tuple[dict, ...]:
  value = row[field]
  if not isinstance(value, (list, tuple)):
    raise _Bad("wrong_type", field, f"{field!r} is a {type(value).__name__}, "
               "not a list of messages")
  messages = []
  has_assistant = False
  for i, message in enumerate(value):
    name = f"{field}[{i}]"
    if parquet:
      message = _drop_nulls(message)
    if not isinstance(message, dict):
      raise _Bad("wrong_type", name, f"{name} is a "
                 f"{type(message).__name__}, not an object")
    role = message.get("role")
    if role is None:
      raise _Bad("missing_field", f"{name}.role", f"{name} has no 'role'")
    if not isinstance(role, str):
      raise _Bad("wrong_type", f"{name}.role", f"{name}.role is a "
                 f"{type(role).__name__}, not a string")
    if role not in ROLES:
      raise _Bad("unknown_role", f"{name}.role",
                 f"{name}.role is {role!r}, not one of {ROLES}")
    if message.get("content") is None and not (
        role == "assistant" and message.get("tool_calls")):
      raise _Bad("missing_field", f"{name}.content",
                 f"{name} has no 'content'")
    if "content" in message and not isinstance(message["content"], str):
      raise _Bad("wrong_type", f"{name}.content", f"{name}.content is a "
                 f"{type(message['content']).__name__}, not a string")
    if role == "assistant":
      has_assistant = True
      if not message.get("content") and not message.get("tool_calls"):
        raise _Bad("empty_completion", f"{name}.content",
                   f"{name} is an empty assistant turn")
    messages.append(dict(message))
  if not has_assistant:
    raise _Bad("no_assistant", field,
               f"the conversation in {field!r} has no assistant turn")
  return tuple(messages)


def _record(row: Any, *, path: str, line: int, unit: str, prompt_field: str,
            completion_field: str, messages_field: str) -> Record:
  if not isinstance(row, dict):
    raise _Bad("wrong_type", None, f"the row is a {type(row).__name__}, not "
               "an object")
  parquet = unit == "row"
  if row.get(messages_field) is not None:
    return Record(None, None, _messages(row, messages_field, parquet), path,
                  line, unit)
  if row.get(prompt_field) is None and row.get(completion_field) is None:
    raise _Bad("missing_field", f"{prompt_field}/{completion_field}",
               f"neither {messages_field!r} nor {prompt_field!r} and "
               f"{completion_field!r} (fields: {sorted(row)}; rename with "
               "prompt_field=, completion_field=, messages_field=)")
  prompt = _string(row, prompt_field)
  completion = _string(row, completion_field)
  if not completion:
    raise _Bad("empty_completion", completion_field,
               f"{completion_field!r} is empty")
  return Record(prompt, completion, None, path, line, unit)


def read_records(paths: Union[PathLike, Sequence[PathLike]], *,
                 format: str = "auto",  # pylint: disable=redefined-builtin
                 prompt_field: str = "prompt",
                 completion_field: str = "completion",
                 messages_field: str = "messages",
                 on_error: str = "fail") -> RecordSet:
  """The prompt–completion pairs and conversations of dataset files.

  Args:
    paths: a file or a directory, or a sequence of them (read in the order
      given; a directory's ``.jsonl``/``.ndjson``/``.parquet`` files
      recursively, sorted by relative path).
    format: ``"auto"`` (by extension), ``"jsonl"`` or ``"parquet"`` (for a
      directory: only that format's files).
    prompt_field: the prompt's field.
    completion_field: the completion's field.
    messages_field: the conversation's field (a list of ``{"role",
      "content"}``).
    on_error: ``"fail"``: raise :class:`RecordError` at the first bad row;
      ``"skip"``: skip bad rows, counted by reason in
      :attr:`RecordSet.skipped`.

  Returns:
    A :class:`RecordSet`: the records in order, the counts of skipped rows.

  Raises:
    RecordError: a bad row (``on_error="fail"``), naming the file, the line
      (or Parquet row), the field and the reason.
    FileNotFoundError: a path that does not exist, or a directory without
      data files.
    ValueError: ``format`` or ``on_error`` unknown, or a file whose format
      its extension does not tell (with ``format="auto"``).
    ImportError: a Parquet file without ``pyarrow``.
  """
  stream = iter_records(paths, format=format, prompt_field=prompt_field,
                        completion_field=completion_field,
                        messages_field=messages_field, on_error=on_error)
  records = tuple(stream)
  return RecordSet(records, dict(stream.skipped), dict(stream.first_skipped),
                   stream.files)


class RecordStream:
  """The records of dataset files, read one row at a time as it is iterated
  (for data larger than memory; :func:`iter_records`).

  Attributes:
    files: the files, in the order they are read.
    skipped: reason -> rows skipped so far (``on_error="skip"``).
    first_skipped: reason -> the first such row's message.
  """

  def __init__(self, files: Sequence[tuple[str, str]], *, prompt_field: str,
               completion_field: str, messages_field: str, on_error: str):
    self._files = list(files)
    self.files = tuple(path for path, _ in self._files)
    self._fields = dict(prompt_field=prompt_field,
                        completion_field=completion_field,
                        messages_field=messages_field)
    self._on_error = on_error
    self.skipped: collections.Counter = collections.Counter()
    self.first_skipped: dict[str, str] = {}

  def __iter__(self) -> Iterator[Record]:
    for path, fmt in self._files:
      unit = "line" if fmt == "jsonl" else "row"
      rows = _jsonl_rows(path) if fmt == "jsonl" else _parquet_rows(path)
      for line, row, bad_json in rows:
        try:
          if bad_json is not None:
            raise _Bad("bad_json", None, bad_json)
          record = _record(row, path=path, line=line, unit=unit,
                           **self._fields)
        except _Bad as bad:
          field = "" if bad.field is None else f", field {bad.field!r}"
          message = (f"{path}, {unit} {line}{field}: {bad.detail} "
                     f"[{REASONS[bad.reason]}]")
          if self._on_error == "fail":
            raise RecordError(
                message + "; fix the row, or pass on_error='skip' to skip "
                "and count such rows.", path=path, line=line, unit=unit,
                field=bad.field, reason=bad.reason) from None
          self.skipped[bad.reason] += 1
          self.first_skipped.setdefault(bad.reason, message)
          continue
        yield record

  def skipped_summary(self) -> str:
    """The rows skipped so far, as :meth:`RecordSet.skipped_summary`."""
    return _skipped_summary(self.skipped)


def iter_records(paths: Union[PathLike, Sequence[PathLike]], *,
                 format: str = "auto",  # pylint: disable=redefined-builtin
                 prompt_field: str = "prompt",
                 completion_field: str = "completion",
                 messages_field: str = "messages",
                 on_error: str = "fail") -> RecordStream:
  """:func:`read_records` as a stream: the files are listed (and a bad path
  or format raised) now, the rows read one at a time as the returned
  :class:`RecordStream` is iterated (a JSONL line at a time; a Parquet file
  at a time), its ``skipped`` counts growing as it goes."""
  if format not in FORMATS:
    raise ValueError(f"format={format!r}: use one of {FORMATS}.")
  if on_error not in ON_ERROR:
    raise ValueError(f"on_error={on_error!r}: use one of {ON_ERROR}.")
  return RecordStream(_files(paths, format), prompt_field=prompt_field,
                      completion_field=completion_field,
                      messages_field=messages_field, on_error=on_error)
