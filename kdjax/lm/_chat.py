"""Chat templates rendered as Hugging Face renders them, with assistant masks.

A chat template is a Jinja template of a conversation (``messages``, a list
of ``{"role", "content"}``); a checkpoint ships it in its
``tokenizer_config.json`` (``chat_template``: a string, or a list of
``{"name", "template"}``) or, since transformers 5, in
``chat_template.jinja`` (and ``additional_chat_templates/<name>.jinja``)
(:func:`load_chat_template`).

:func:`apply_chat_template` renders it in the environment of
``transformers.PreTrainedTokenizerBase.apply_chat_template`` (transformers
5.x, ``transformers/utils/chat_template_utils.py``): jinja2's
``ImmutableSandboxedEnvironment`` with ``trim_blocks``, ``lstrip_blocks``,
the ``loopcontrols`` extension, the ``raise_exception`` and ``strftime_now``
globals, a ``tojson`` filter that escapes no HTML
(``json.dumps(x, ensure_ascii=False, ...)``), the special tokens
(``bos_token``, ``eos_token``, ...) as variables, and the
``{% generation %}...{% endgeneration %}`` tag, which records the character
span ``[start, end)`` of what it renders. The text is tokenized without adding
special tokens and the assistant mask is::

  mask[t] = 1  iff  char_to_token(start) <= t <= char_to_token(end - 1)

for some recorded span, ``char_to_token(c)`` being the first token whose
offsets ``(a, b)`` have ``a <= c < b`` (transformers'
``return_assistant_tokens_mask=True``; a token straddling a span's edge is
in). With markers, the ids and mask equal transformers' (one difference: when
``char_to_token(end - 1)`` is token 0, transformers masks to the end of the
sequence, a falsy-zero slip; here only token 0).

Most released templates (Qwen3's, Llama 3's) have no ``{% generation %}``
tag. For them the spans come from prefixes (as TRL builds the completion mask
of a conversational prompt–completion pair): for each assistant message
``i``, the span runs from the end of the rendering of ``messages[:i]`` with
``add_generation_prompt=True`` to the end of the rendering of
``messages[:i + 1]``, so it covers what the model generates after the
assistant header: the content, the end-of-turn token and whatever the
template writes after it (e.g. Qwen's ``"\\n"`` after ``<|im_end|>``).
Both renderings must be prefixes of the conversation's rendering; a template
that rewrites earlier turns (Qwen3 drops the reasoning of turns before the
last user message) raises :class:`ChatTemplateError` naming the message. For a
template whose ``{% generation %}`` block covers exactly that, both ways give
the same mask; only the marker way is transformers'. With
``last_turn_only=True`` only the last assistant message is masked (and
rendered apart), which every template allows: one example a turn.

:func:`encode_prompt_completion` turns a plain prompt–completion pair into the
same :class:`ChatEncoding` (``[BOS] + prompt + completion + [EOS]``, the mask
over the completion and its EOS).

``jinja2`` (>= 3.1) is imported only by the functions that render.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import json
import os
import re
from typing import Any, Mapping, Optional, Sequence, Union

from kdjax.lm._records import Record
from kdjax.lm._tokenizer import Tokenizer, tokenizer_from_json

TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"
CHAT_TEMPLATE_DIR = "additional_chat_templates"
MASK_MODES = ("auto", "generation", "prefix")

# The special tokens of a tokenizer_config.json that transformers passes to
# templates (its special_tokens_map).
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token",
                      "pad_token", "cls_token", "mask_token")

_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
_SPANS_VARIABLE = "_kdjax_generation_spans"

Messages = Sequence[Mapping[str, Any]]


class ChatTemplateError(ValueError):
  """A chat template that cannot be found, loaded or rendered, or whose
  assistant spans cannot be told."""


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
  """A chat template and the special tokens it is rendered with.

  Attributes:
    source: the Jinja text.
    special_tokens: ``bos_token``, ``eos_token``, ... -> their strings (from
      ``tokenizer_config.json``), passed to the template as variables.
    origin: where it came from (a path), for messages.
  """
  source: str
  special_tokens: Mapping[str, str] = dataclasses.field(default_factory=dict)
  origin: str = "<string>"

  @property
  def has_generation_markers(self) -> bool:
    """Whether the template has a ``{% generation %}`` tag."""
    return bool(_GENERATION_TAG.search(self.source))


@dataclasses.dataclass(frozen=True)
class ChatEncoding:
  """A rendered, tokenized conversation and its assistant mask.

  Attributes:
    ids: the token ids of ``text`` (no special token added beyond what the
      template writes).
    assistant_mask: one 0/1 per id: 1 on the assistant's tokens (the loss
      tokens), as transformers' ``assistant_masks``.
    text: the rendered text.
    spans: the assistant ``(start, end)`` character spans of ``text``.
  """
  ids: list[int]
  assistant_mask: list[int]
  text: str
  spans: tuple[tuple[int, int], ...]

  def turns(self) -> list[tuple[list[int], list[int]]]:
    """``(prompt, completion)`` id lists, one for each run of 1s of the
    mask: ``completion = ids[a:b]`` (the run), ``prompt = ids[:a]``
    (everything before it, earlier assistant turns included), the examples
    of :class:`kdjax.lm.LMBatches` / :func:`kdjax.lm.make_lm_batch`."""
    out, t, n = [], 0, len(self.ids)
    while t < n:
      if self.assistant_mask[t]:
        start = t
        while t < n and self.assistant_mask[t]:
          t += 1
        out.append((self.ids[:start], self.ids[start:t]))
      else:
        t += 1
    return out


# -----------------------------------------------------------------------------
# Loading.
# -----------------------------------------------------------------------------


def _token_string(value: Any) -> Optional[str]:
  """A special token of a tokenizer_config.json: a string or an AddedToken
  dict ``{"content": ...}``."""
  if isinstance(value, str):
    return value
  if isinstance(value, dict) and isinstance(value.get("content"), str):
    return value["content"]
  return None


def _read(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


def _config_templates(config: Mapping[str, Any], path: str
                      ) -> dict[str, str]:
  value = config.get("chat_template")
  if value is None:
    return {}
  if isinstance(value, str):
    return {"default": value}
  if isinstance(value, list) and all(
      isinstance(t, dict) and isinstance(t.get("name"), str)
      and isinstance(t.get("template"), str) for t in value):
    return {t["name"]: t["template"] for t in value}
  raise ChatTemplateError(
      f"{path}: 'chat_template' is neither a string nor a list of "
      "{'name', 'template'} objects.")


def load_chat_template(path: Union[str, "os.PathLike[str]"], *,
                       name: Optional[str] = None) -> ChatTemplate:
  """The chat template of a Hugging Face directory or of a file.

  A directory's templates are, as transformers 5 reads them,
  ``tokenizer_config.json``'s ``chat_template`` (a string: ``"default"``; a
  list of ``{"name", "template"}``), overridden by ``chat_template.jinja``
  (``"default"``) and ``additional_chat_templates/<name>.jinja``. A file is a
  ``tokenizer_config.json`` (``.json``) or the template itself (any other
  extension, e.g. ``.jinja``). The special tokens (``bos_token``,
  ``eos_token``, ...) come from the ``tokenizer_config.json`` read (a file's
  directory's, for a template file).

  Args:
    path: a directory or a file.
    name: the template's name; None: ``"default"``.

  Returns:
    The :class:`ChatTemplate`.

  Raises:
    FileNotFoundError: nothing at ``path``.
    ChatTemplateError: no template (of that name) there, naming the ones
      there.
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"no chat template file or directory at {path}.")
  directory = path if os.path.isdir(path) else os.path.dirname(path)
  config_path = (path if path.endswith(".json") and os.path.isfile(path)
                 else os.path.join(directory, TOKENIZER_CONFIG_FILE))
  config: dict = {}
  if os.path.isfile(config_path):
    try:
      config = json.loads(_read(config_path))
    except json.JSONDecodeError as e:
      raise ChatTemplateError(f"{config_path} is not JSON: {e}") from None
  special = {k: s for k in SPECIAL_TOKEN_KEYS
             if (s := _token_string(config.get(k))) is not None}
  want = "default" if name is None else name
  if os.path.isfile(path) and not path.endswith(".json"):
    if name is not None:
      raise ChatTemplateError(f"{path} is one template; name={name!r} picks "
                              "among a directory's templates.")
    return ChatTemplate(_read(path), special, path)
  templates = {k: (v, config_path)
               for k, v in _config_templates(config, config_path).items()}
  if os.path.isdir(path):
    jinja = os.path.join(path, CHAT_TEMPLATE_FILE)
    if os.path.isfile(jinja):
      templates["default"] = (_read(jinja), jinja)
    extra = os.path.join(path, CHAT_TEMPLATE_DIR)
    if os.path.isdir(extra):
      for file in sorted(os.listdir(extra)):
        if file.endswith(".jinja"):
          full = os.path.join(extra, file)
          templates[file[:-len(".jinja")]] = (_read(full), full)
  if want not in templates:
    found = sorted(templates)
    raise ChatTemplateError(
        f"no chat template named {want!r} in {path}" + (
            f" (it has {found}; pick one with name=)" if found else
            f" (no 'chat_template' in {TOKENIZER_CONFIG_FILE}, no "
            f"{CHAT_TEMPLATE_FILE}); give the template file instead") + ".")
  source, origin = templates[want]
  return ChatTemplate(source, special, origin)


# -----------------------------------------------------------------------------
# Rendering.
# -----------------------------------------------------------------------------


def _jinja():
  try:
    import jinja2  # pylint: disable=g-import-not-at-top
    import jinja2.ext  # pylint: disable=g-import-not-at-top
    import jinja2.sandbox  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("chat templates need jinja2 >= 3.1: pip install "
                      "'kdjax[tunix]' (or pip install jinja2).",
                      name="jinja2") from e
  return jinja2


@functools.lru_cache(maxsize=None)
def _environment():
  """transformers' chat-template environment (see the module docstring)."""
  jinja2 = _jinja()

  class GenerationSpans(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body and, when
    the render has a span list (the ``_kdjax_generation_spans`` variable),
    records the body's ``[start, end)`` in the text yielded so far."""
    tags = {"generation"}

    def parse(self, parser):
      lineno = next(parser.stream).lineno
      body = parser.parse_statements(("name:endgeneration",),
                                     drop_needle=True)
      return jinja2.nodes.CallBlock(
          self.call_method("_generation", [jinja2.nodes.ContextReference()]),
          [], [], body).set_lineno(lineno)

    def _generation(self, context, caller):
      text = caller()
      tracker = context.get(_SPANS_VARIABLE)
      if tracker is not None:
        blocks, spans = tracker
        start = sum(len(b) for b in blocks)
        spans.append((start, start + len(text)))
      return text

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None,
             sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                      separators=separators, sort_keys=sort_keys)

  def strftime_now(format):  # pylint: disable=redefined-builtin
    return datetime.datetime.now().strftime(format)

  env = jinja2.sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True,
      extensions=[GenerationSpans, jinja2.ext.loopcontrols])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = strftime_now
  return env


@functools.lru_cache(maxsize=64)
def _compile(source: str):
  jinja2 = _jinja()
  try:
    return _environment().from_string(source)
  except jinja2.TemplateSyntaxError as e:
    raise ChatTemplateError(f"the chat template does not parse: {e.message} "
                            f"(template line {e.lineno}).") from None


@functools.lru_cache(maxsize=64)
def _variables(source: str) -> frozenset:
  _compile(source)  # a syntax error as ChatTemplateError
  import jinja2.meta  # pylint: disable=g-import-not-at-top
  env = _environment()
  return frozenset(jinja2.meta.find_undeclared_variables(env.parse(source)))


def _render(template: ChatTemplate, messages: Messages,
            add_generation_prompt: bool, variables: Mapping[str, Any]
            ) -> tuple[str, list[tuple[int, int]]]:
  """The text and the ``{% generation %}`` spans."""
  jinja2 = _jinja()
  compiled = _compile(template.source)
  blocks: list[str] = []
  spans: list[tuple[int, int]] = []
  context = {"tools": None, "documents": None, **variables,
             "messages": [dict(m) for m in messages],
             "add_generation_prompt": add_generation_prompt,
             _SPANS_VARIABLE: (blocks, spans)}
  try:
    for block in compiled.generate(**context):
      blocks.append(block)
  except jinja2.TemplateError as e:
    raise ChatTemplateError(f"the chat template of {template.origin} "
                            f"failed: {e}") from e
  return "".join(blocks), spans


def _variables_for(template: ChatTemplate, bos_token: Optional[str],
                   eos_token: Optional[str],
                   template_kwargs: Optional[Mapping[str, Any]]) -> dict:
  variables: dict[str, Any] = dict(template.special_tokens)
  if bos_token is not None:
    variables["bos_token"] = bos_token
  if eos_token is not None:
    variables["eos_token"] = eos_token
  variables.update(template_kwargs or {})
  used = _variables(template.source)
  for key in ("bos_token", "eos_token"):
    if key in used and key not in variables:
      raise ChatTemplateError(
          f"the chat template of {template.origin} uses {key}, which no "
          f"{TOKENIZER_CONFIG_FILE} gives; pass {key}= (e.g. "
          f"{'<|begin_of_text|>' if key == 'bos_token' else '<|eot_id|>'!r}"
          ").")
  return variables


def _prefix_spans(template: ChatTemplate, messages: Messages, text: str,
                  variables: Mapping[str, Any], last_turn_only: bool
                  ) -> list[tuple[int, int]]:
  """The assistant spans of a template without markers (module docstring)."""
  spans = []
  turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
  for i in turns[-1:] if last_turn_only else turns:
    before, _ = _render(template, messages[:i], True, variables)
    through, _ = _render(template, messages[:i + 1], False, variables)
    if not (through.startswith(before) and text.startswith(through)):
      raise ChatTemplateError(
          f"cannot tell the span of assistant message {i} with the chat "
          f"template of {template.origin}: rendering messages[:{i}] (with "
          f"the generation prompt) and messages[:{i + 1}] does not give "
          "prefixes of the conversation's rendering (the template rewrites "
          "earlier turns, e.g. drops their reasoning). Add {% generation %}"
          " ... {% endgeneration %} around the assistant's output in the "
          "template, or mask the last assistant turn only "
          "(last_turn_only=True), one example a turn: messages[:j + 1] for "
          "each assistant message j.")
    spans.append((len(before), len(through)))
  return spans


def _ids_and_offsets(tokenizer: Any, text: str
                     ) -> tuple[list[int], list[tuple[int, int]]]:
  if isinstance(tokenizer, Tokenizer):
    return tokenizer.encode_with_offsets(text)
  encoding = tokenizer.encode(text, add_special_tokens=False)
  return list(encoding.ids), [tuple(o) for o in encoding.offsets]


def _mask(n: int, offsets: Sequence[tuple[int, int]],
          spans: Sequence[tuple[int, int]], length: int) -> list[int]:
  """transformers' assistant mask (module docstring)."""
  char_to_token = [-1] * (length + 1)
  for t in range(n - 1, -1, -1):  # the first token containing a character
    a, b = offsets[t]
    for c in range(max(a, 0), min(b, length)):
      char_to_token[c] = t
  mask = [0] * n
  for start, end in spans:
    first = char_to_token[start] if 0 <= start < length else -1
    if first < 0:
      break  # as transformers: a span starting past the text ends the marks
    last = char_to_token[end - 1] if 0 <= end - 1 < length else -1
    for t in range(first, last + 1 if last >= 0 else n):
      mask[t] = 1
  return mask


# Marker tokens a template writes literally: ChatML / Llama 3 style
# ``<|...|>`` and Gemma style ``<start_of_turn>`` / ``<end_of_turn>``.
_MARKER_TOKEN = re.compile(r"<\|[A-Za-z0-9_]{1,40}\|>|<(?:start|end)_of_turn>")


def check_chat_template_tokens(template: ChatTemplate, tokenizer: Any) -> None:
  """Raise unless ``tokenizer`` holds the special tokens ``template`` writes.

  A template's special tokens (its ``bos_token``, ``eos_token``, ... and the
  markers it writes literally, such as ``<|im_start|>`` or
  ``<start_of_turn>``) must each be one token of the tokenizer; a tokenizer
  without them (e.g. a BPE trained on plain text) would cut every turn
  marker into pieces and train the model on the wrong format.

  Args:
    template: the chat template.
    tokenizer: a :class:`kdjax.lm.Tokenizer` or a ``tokenizers.Tokenizer``.

  Raises:
    ChatTemplateError: naming the tokens that are not one token each.
  """
  tokens = set(_MARKER_TOKEN.findall(template.source))
  tokens.update(v for k, v in template.special_tokens.items()
                if k in ("bos_token", "eos_token") and v)
  missing = []
  for token in sorted(tokens):
    if isinstance(tokenizer, Tokenizer):
      ids = tokenizer.encode(token)
    else:
      ids = tokenizer.encode(token, add_special_tokens=False).ids
    if len(ids) != 1:
      missing.append(f"{token!r} ({len(ids)} ids)")
  if missing:
    raise ChatTemplateError(
        f"the chat template of {template.origin} writes special tokens the "
        f"tokenizer does not have as single tokens: {', '.join(missing)}; use "
        "the tokenizer of the template's model.")


def apply_chat_template(tokenizer: Any, messages: Messages,
                        template: Union[ChatTemplate, str], *,
                        add_generation_prompt: bool = False,
                        bos_token: Optional[str] = None,
                        eos_token: Optional[str] = None,
                        mask: str = "auto",
                        last_turn_only: bool = False,
                        template_kwargs: Optional[Mapping[str, Any]] = None
                        ) -> ChatEncoding:
  """A conversation rendered, tokenized and masked (see the module docstring).

  Args:
    tokenizer: a :class:`kdjax.lm.Tokenizer` (one of a ``tokenizer.json``, or
      bytes) or a ``tokenizers.Tokenizer``.
    messages: the conversation: ``{"role", "content", ...}`` dicts.
    template: a :class:`ChatTemplate` (:func:`load_chat_template`) or the
      Jinja text.
    add_generation_prompt: append the assistant header (for generation).
    bos_token: the template's ``bos_token``; default: the template's
      ``tokenizer_config.json``'s.
    eos_token: the template's ``eos_token``; likewise.
    mask: ``"auto"`` (the ``{% generation %}`` spans when the template has
      the tag, else the prefix spans), ``"generation"`` (the tag's spans;
      a template without it raises) or ``"prefix"`` (the prefix spans).
    last_turn_only: mask only the last assistant message (with the prefix
      spans: the only one rendered apart, so templates that rewrite earlier
      turns, as Qwen3's, work; one example a turn is then
      ``messages[:j + 1]`` for each assistant message ``j``) or, with the
      tag, only its last span.
    template_kwargs: more template variables (e.g. ``enable_thinking``).

  Returns:
    A :class:`ChatEncoding`: ids, assistant mask, text, character spans.

  Raises:
    ChatTemplateError: a template that does not parse, raises
      (``raise_exception``), uses ``bos_token``/``eos_token`` unset, lacks
      the tag with ``mask="generation"``, or rewrites earlier turns with the
      prefix spans.
    ValueError: ``mask`` unknown.
    ImportError: no jinja2.
  """
  if mask not in MASK_MODES:
    raise ValueError(f"mask={mask!r}: use one of {MASK_MODES}.")
  if isinstance(template, str):
    template = ChatTemplate(template)
  variables = _variables_for(template, bos_token, eos_token, template_kwargs)
  text, spans = _render(template, messages, add_generation_prompt, variables)
  markers = template.has_generation_markers
  if mask == "generation" and not markers:
    raise ChatTemplateError(
        f"the chat template of {template.origin} has no {{% generation %}} "
        "tag; use mask='prefix' (or 'auto').")
  if mask == "prefix" or (mask == "auto" and not markers):
    spans = _prefix_spans(template, messages, text, variables,
                          last_turn_only)
  elif last_turn_only:
    spans = spans[-1:]
  ids, offsets = _ids_and_offsets(tokenizer, text)
  return ChatEncoding(ids, _mask(len(ids), offsets, spans, len(text)), text,
                      tuple(spans))


def encode_prompt_completion(tokenizer: Any, prompt: str, completion: str,
                             *, add_bos: bool = True, add_eos: bool = True
                             ) -> ChatEncoding:
  """A prompt–completion pair as ids and a completion mask.

  ``ids = [BOS] + encode(prompt) + encode(completion) + [EOS]`` (prompt and
  completion tokenized apart, so the mask never splits a token),
  ``assistant_mask`` 1 on the completion and its EOS; its one
  :meth:`ChatEncoding.turns` is ``([BOS] + prompt, completion + [EOS])``, the
  example of :func:`kdjax.lm.make_lm_batch`. (For a chat model, render the
  pair as ``[{"role": "user", ...}, {"role": "assistant", ...}]`` with
  :func:`apply_chat_template` instead.)

  Args:
    tokenizer: a :class:`kdjax.lm.Tokenizer` or a ``tokenizers.Tokenizer``
      (its BOS and EOS found as :func:`kdjax.lm.tokenizer_from_json` finds
      them).
    prompt: the prompt.
    completion: the completion.
    add_bos: put the tokenizer's BOS first.
    add_eos: put its EOS last (in the mask).

  Returns:
    A :class:`ChatEncoding` (``text = prompt + completion``, one span).
  """
  if not isinstance(tokenizer, Tokenizer):
    tokenizer = tokenizer_from_json(tokenizer.to_str(), name="tokenizer")
  head = [tokenizer.bos_id] if add_bos else []
  prompt_ids = head + tokenizer.encode(prompt)
  completion_ids = tokenizer.encode(completion) + (
      [tokenizer.eos_id] if add_eos else [])
  return ChatEncoding(
      prompt_ids + completion_ids,
      [0] * len(prompt_ids) + [1] * len(completion_ids), prompt + completion,
      ((len(prompt), len(prompt) + len(completion)),))


def encode_record(tokenizer: Any, record: Record,
                  template: Union[ChatTemplate, str, None] = None,
                  **kwargs: Any) -> ChatEncoding:
  """A :class:`kdjax.lm.Record` as a :class:`ChatEncoding`: a conversation
  by :func:`apply_chat_template` (``template`` needed), a prompt–completion
  pair by :func:`encode_prompt_completion`; ``kwargs`` go to that function.

  Raises:
    ChatTemplateError: as :func:`apply_chat_template`, naming the record's
      file and line; a conversation without ``template``.
  """
  if not record.is_chat:
    return encode_prompt_completion(tokenizer, record.prompt or "",
                                    record.completion or "", **kwargs)
  if template is None:
    raise ChatTemplateError(f"{record.where} is a conversation: give a chat "
                            "template (kdjax.lm.load_chat_template).")
  try:
    return apply_chat_template(tokenizer, record.messages or (), template,
                               **kwargs)
  except ChatTemplateError as e:
    raise ChatTemplateError(f"{record.where}: {e}") from e
