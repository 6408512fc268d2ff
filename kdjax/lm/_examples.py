"""Records as token examples: the ``(prompt, completion)`` id pairs of
:class:`kdjax.lm.LMBatches` and :func:`kdjax.lm.padded_eval_batches`.

:func:`record_examples` tokenizes :class:`kdjax.lm.Record` s (from
:func:`kdjax.lm.read_records` or :func:`kdjax.lm.stdlib_function_records`):

* a prompt–completion pair by :func:`kdjax.lm.encode_prompt_completion`:
  ``([BOS] + prompt, completion + [EOS])``;
* a conversation by :func:`kdjax.lm.apply_chat_template` with the model's
  chat template: one example per assistant turn, ``(everything before the
  turn, the turn's tokens)`` (:meth:`kdjax.lm.ChatEncoding.turns`), so the
  loss covers the assistant tokens only.

An example must fit ``seq_len`` (the length of a batch row): a prompt of more
than ``seq_len`` ids leaves no completion token to learn and is refused
(:class:`ExampleError`, naming the record's file and line, and the
``seq_len`` to raise) or, with ``on_error="skip"``, skipped and counted; a
completion that runs past ``seq_len + 1`` ids is cut there, as
:func:`kdjax.lm.make_lm_batch` cuts it, and counted in
:attr:`TokenExamples.truncated`. Nothing is dropped without a count.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import (Any, Iterable, Iterator, Mapping, NamedTuple, Optional,
                    Union)

from kdjax.lm._chat import ChatTemplate
from kdjax.lm._chat import ChatTemplateError
from kdjax.lm._chat import apply_chat_template
from kdjax.lm._chat import encode_prompt_completion
from kdjax.lm._records import ON_ERROR
from kdjax.lm._records import Record


# Why an example was skipped (TokenExamples.skipped keys), in words.
EXAMPLE_REASONS = {
    "prompt_too_long": "prompt longer than seq_len",
    "template_error": "chat template error",
    "no_loss_token": "no assistant token",
    "late_turn": "assistant turn starting past seq_len",
    "completion_too_long": "completion past seq_len",
}


def _skipped_words(skipped: Mapping[str, int]) -> str:
  """``"; skipped 2: 2 prompt longer than seq_len"`` (empty if none)."""
  n = sum(skipped.values())
  if not n:
    return ""
  return f"; skipped {n}: " + ", ".join(
      f"{count} {EXAMPLE_REASONS.get(reason, reason)}"
      for reason, count in sorted(skipped.items()))


class ExampleError(ValueError):
  """A record that cannot become an example (see :func:`record_examples`).

  Attributes:
    where: the record's ``"<file>, line <n>"``.
    reason: a key of :data:`EXAMPLE_REASONS`.
  """

  def __init__(self, message: str, *, where: str, reason: str):
    super().__init__(message)
    self.where = where
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class TokenExamples:
  """Tokenized examples and what was skipped or cut.

  Attributes:
    prompts: the prompt ids of each example (BOS, or the template's header,
      first).
    completions: the completion ids of each example (the loss tokens).
    sources: each example's record, as ``"<file>, line <n>"``.
    paths: each example's file.
    skipped: reason -> records skipped (``on_error="skip"``), and
      ``"late_turn"`` -> assistant turns of kept conversations that start
      past ``seq_len`` (always skipped: the record's earlier turns stay).
    first_skipped: reason -> the first such record's message.
    truncated: examples whose completion was cut at ``seq_len + 1`` ids.
  """
  prompts: tuple[tuple[int, ...], ...]
  completions: tuple[tuple[int, ...], ...]
  sources: tuple[str, ...]
  paths: tuple[str, ...]
  skipped: Mapping[str, int]
  first_skipped: Mapping[str, str]
  truncated: int

  def __len__(self) -> int:
    return len(self.prompts)

  @property
  def num_tokens(self) -> int:
    """Prompt and completion ids of every example (before truncation)."""
    return sum(len(p) + len(c) for p, c in zip(self.prompts,
                                               self.completions))

  def summary(self) -> str:
    """``"120 examples (3 truncated); skipped 2: 2 prompt longer than
    seq_len"``."""
    return (f"{len(self)} examples ({self.truncated} truncated)"
            + _skipped_words(self.skipped))


def record_texts(records: Iterable[Record]) -> list[str]:
  """The texts of records, e.g. to train a tokenizer on: ``prompt +
  completion`` of a pair, each message's content of a conversation."""
  texts = []
  for r in records:
    if r.is_chat:
      texts.extend(str(m.get("content") or "") for m in r.messages or ())
    else:
      texts.append((r.prompt or "") + (r.completion or ""))
  return texts


def record_examples(records: Iterable[Record], tokenizer: Any, seq_len: int,
                    *, template: Union[ChatTemplate, str, None] = None,
                    last_turn_only: bool = False,
                    template_kwargs: Optional[Mapping[str, Any]] = None,
                    on_error: str = "fail",
                    truncate: bool = True) -> TokenExamples:
  """The ``(prompt, completion)`` token examples of ``records``.

  Args:
    records: prompt–completion pairs and conversations.
    tokenizer: a :class:`kdjax.lm.Tokenizer` (or a ``tokenizers.Tokenizer``).
    seq_len: the batch rows' length ``L``: a prompt may have at most ``L``
      ids; prompt + completion is cut at ``L + 1``.
    template: the chat template (needed for conversations).
    last_turn_only: conversations give one example, their last assistant
      turn (see :func:`kdjax.lm.apply_chat_template`).
    template_kwargs: more template variables.
    on_error: ``"fail"`` (raise :class:`ExampleError`) or ``"skip"``
      (count in :attr:`TokenExamples.skipped`).
    truncate: cut a completion that runs past ``seq_len + 1`` ids (counted
      in :attr:`TokenExamples.truncated`); False: such a record is an error
      (``"completion_too_long"``, raised or skipped as ``on_error`` says).

  Returns:
    The :class:`TokenExamples`, in the order of the records (a conversation's
    turns in order).
  """
  stream = iter_record_examples(
      records, tokenizer, seq_len, template=template,
      last_turn_only=last_turn_only, template_kwargs=template_kwargs,
      on_error=on_error, truncate=truncate)
  prompts, completions, sources, paths = [], [], [], []
  for example in stream:
    prompts.append(example.prompt)
    completions.append(example.completion)
    sources.append(example.source)
    paths.append(example.path)
  return TokenExamples(tuple(prompts), tuple(completions), tuple(sources),
                       tuple(paths), dict(stream.skipped),
                       dict(stream.first_skipped), stream.truncated)


class TokenExample(NamedTuple):
  """One example of :class:`ExampleStream`."""
  prompt: tuple[int, ...]
  completion: tuple[int, ...]
  source: str  # "<file>, line <n>"
  path: str


class ExampleStream:
  """:func:`record_examples` one record at a time (for data larger than
  memory): iterating gives :class:`TokenExample` s; ``skipped``,
  ``first_skipped`` and ``truncated`` count as it goes."""

  def __init__(self, records: Iterable[Record], tokenizer: Any, seq_len: int,
               *, template: Union[ChatTemplate, str, None],
               last_turn_only: bool,
               template_kwargs: Optional[Mapping[str, Any]], on_error: str,
               truncate: bool):
    if on_error not in ON_ERROR:
      raise ValueError(f"on_error={on_error!r}: use one of {ON_ERROR}.")
    self._records, self._tokenizer, self._seq_len = records, tokenizer, seq_len
    self._template, self._last_turn_only = template, last_turn_only
    self._template_kwargs, self._on_error = template_kwargs, on_error
    self._truncate = truncate
    self.skipped: collections.Counter = collections.Counter()
    self.first_skipped: dict[str, str] = {}
    self.truncated = 0

  def _refuse(self, record: Record, reason: str, detail: str) -> None:
    message = f"{record.where}: {detail}"
    if self._on_error == "fail":
      raise ExampleError(message, where=record.where, reason=reason)
    self.skipped[reason] += 1
    self.first_skipped.setdefault(reason, message)

  def __iter__(self) -> Iterator[TokenExample]:
    seq_len, tokenizer, template = self._seq_len, self._tokenizer, self._template
    for record in self._records:
      try:
        if record.is_chat:
          if template is None:
            raise ChatTemplateError("a conversation needs a chat template.")
          encoding = apply_chat_template(
              tokenizer, record.messages or (), template,
              last_turn_only=self._last_turn_only,
              template_kwargs=self._template_kwargs)
        else:
          encoding = encode_prompt_completion(tokenizer, record.prompt or "",
                                              record.completion or "")
      except ChatTemplateError as e:
        self._refuse(record, "template_error", str(e))
        continue
      pairs = encoding.turns()
      if not pairs:
        self._refuse(record, "no_loss_token", "the rendered conversation has "
                     "no assistant token (is the assistant's content empty?).")
        continue
      if len(pairs[0][0]) > seq_len:
        self._refuse(record, "prompt_too_long",
                     f"its prompt has {len(pairs[0][0])} tokens, more than "
                     f"seq_len ({seq_len}): no completion token would fit; "
                     "raise seq_len or shorten the prompt.")
        continue
      if not self._truncate and any(len(p) <= seq_len < len(p) + len(c) - 1
                                    for p, c in pairs):
        self._refuse(record, "completion_too_long",
                     f"prompt and completion hold more than seq_len + 1 "
                     f"({seq_len + 1}) tokens; raise seq_len, or allow "
                     "truncation.")
        continue
      for prompt, completion in pairs:
        if len(prompt) > seq_len:  # the earlier turns of the record are kept
          self.skipped["late_turn"] += 1
          self.first_skipped.setdefault(
              "late_turn", f"{record.where}: an assistant turn starts at "
              f"token {len(prompt)}, past seq_len ({seq_len}).")
          continue
        self.truncated += len(prompt) + len(completion) > seq_len + 1
        yield TokenExample(tuple(prompt), tuple(completion), record.where,
                           record.path)

  def summary(self) -> str:
    """The counts so far, as :meth:`TokenExamples.summary` words them
    (without the number of examples)."""
    return f"{self.truncated} truncated" + _skipped_words(self.skipped)


def iter_record_examples(records: Iterable[Record], tokenizer: Any,
                         seq_len: int, *,
                         template: Union[ChatTemplate, str, None] = None,
                         last_turn_only: bool = False,
                         template_kwargs: Optional[Mapping[str, Any]] = None,
                         on_error: str = "fail",
                         truncate: bool = True) -> ExampleStream:
  """:func:`record_examples` as a stream (the same arguments): e.g.
  ``kdjax.lm.write_token_cache(dir, ((e.prompt, e.completion) for e in
  iter_record_examples(kdjax.lm.iter_records(paths), tok, L)), ...)``
  tokenizes files larger than memory into a cache one record at a time."""
  return ExampleStream(records, tokenizer, seq_len, template=template,
                       last_turn_only=last_turn_only,
                       template_kwargs=template_kwargs, on_error=on_error,
                       truncate=truncate)
