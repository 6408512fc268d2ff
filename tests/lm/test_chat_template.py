"""Chat templates and assistant masks (kdjax/lm/_chat.py).

The ids and masks are checked against transformers'
``apply_chat_template(..., return_assistant_tokens_mask=True)`` on a small
BPE trained here (offline), saved as a Hugging Face directory.
"""

from __future__ import annotations

import json
import os

import chex
import numpy as np
import pytest

from kdjax import lm

tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

SPECIALS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>",
            "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]

# Qwen3-style (ChatML): <|im_start|>role\n...<|im_end|>\n; tool results as a
# user turn in <tool_response>; the {% generation %} block covers what the
# model writes after the header (content, <|im_end|> and the newline), and
# a loop with {% break %} (loopcontrols) finds the last user turn.
QWEN_TEMPLATE = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}"
    "{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}{%- if m.role == 'tool' %}{%- break %}"
    "{%- endif %}{%- endfor %}\n"
    "{%- for message in messages %}\n"
    "  {%- if message.role == 'tool' %}\n"
    "    {{- '<|im_start|>user\\n<tool_response>\\n' + message.content"
    " + '\\n</tool_response><|im_end|>\\n' }}\n"
    "  {%- elif message.role == 'assistant' %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "    {%- generation %}"
    "{{- message.content + '<|im_end|>\\n' }}"
    "{%- endgeneration %}\n"
    "  {%- else %}\n"
    "    {{- '<|im_start|>' + message.role + '\\n' + message.content"
    " + '<|im_end|>\\n' }}\n"
    "  {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "  {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n")

# Llama-3-style: bos_token, <|start_header_id|>role<|end_header_id|>\n\n
# ...<|eot_id|>, contents trimmed, a tool result that is not a string as
# tojson (no HTML escaping), roles checked with raise_exception, the date
# from strftime_now unless given.
LLAMA_TEMPLATE = (
    "{{- bos_token }}\n"
    "{%- if date_string is not defined %}"
    "{%- set date_string = strftime_now('%d %b %Y') %}{%- endif %}\n"
    "{%- if messages[0].role == 'system' %}\n"
    "  {%- set system = messages[0].content | trim %}\n"
    "  {%- set messages = messages[1:] %}\n"
    "{%- else %}\n"
    "  {%- set system = '' %}\n"
    "{%- endif %}\n"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' }}\n"
    "{{- 'Today Date: ' + date_string + '\\n\\n' + system + '<|eot_id|>' }}\n"
    "{%- for message in messages %}\n"
    "  {%- if message.role not in ['user', 'assistant', 'tool'] %}\n"
    "    {{- raise_exception('unexpected role ' + message.role) }}\n"
    "  {%- endif %}\n"
    "  {%- if message.role == 'tool' %}\n"
    "    {{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' }}\n"
    "    {%- if message.content is mapping %}"
    "{{- message.content | tojson }}"
    "{%- else %}{{- message.content }}{%- endif %}\n"
    "    {{- '<|eot_id|>' }}\n"
    "  {%- elif message.role == 'assistant' %}\n"
    "    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "    {%- generation %}"
    "{{- message.content | trim + '<|eot_id|>' }}"
    "{%- endgeneration %}\n"
    "  {%- else %}\n"
    "    {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n'"
    " + message.content | trim + '<|eot_id|>' }}\n"
    "  {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "  {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}\n"
    "{%- endif %}\n")

TEMPLATES = {"qwen": QWEN_TEMPLATE, "llama": LLAMA_TEMPLATE}
SPECIAL_TOKENS = {
    "qwen": {"eos_token": "<|im_end|>", "pad_token": "<pad>"},
    "llama": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>",
              "pad_token": "<pad>"},
}
DATE = {"date_string": "26 Jul 2024"}

CONVERSATIONS = {
    "single": [{"role": "user", "content": "What is 2 + 3?"},
               {"role": "assistant", "content": "2 + 3 = 5."}],
    "system_multi_turn": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a prime."},
        {"role": "assistant", "content": "Seven."},
        {"role": "user", "content": "Another, héllo 🌍?"},
        {"role": "assistant", "content": "  Eleven, naïvely 🌍.  "}],
    "tool": [
        {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": "Calling add(2, 3)."},
        {"role": "tool", "content": "5"},
        {"role": "assistant", "content": "It is 5."}],
    # A span that starts inside a character split over byte tokens (the
    # crab is not in the BPE's texts): the first token holding it is in.
    "split_character": [
        {"role": "user", "content": "Draw a crab."},
        {"role": "assistant", "content": "🦀 is a crab."}],
    "ends_with_user": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Count to three."}],
}
CASES = [(t, c, g) for t in TEMPLATES for c in CONVERSATIONS
         for g in (False, True)]

TEXTS = ["What is two plus three? It is five. Name a prime: seven, eleven.",
         "def add(a, b):\n    return a + b\n", "héllo wörld 🌍 naïve"] * 4


@pytest.fixture(scope="module")
def tokenizer_json():
  tok = tokenizers.Tokenizer.from_str(lm.train_bpe(TEXTS, 400))
  tok.add_special_tokens(SPECIALS)
  return tok.to_str()


@pytest.fixture(scope="module")
def hf_dirs(tokenizer_json, tmp_path_factory):
  """A Hugging Face directory a template (tokenizer.json and a
  tokenizer_config.json holding the chat template)."""
  dirs = {}
  for name, template in TEMPLATES.items():
    d = tmp_path_factory.mktemp(name)
    (d / "tokenizer.json").write_text(tokenizer_json)
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": template, **SPECIAL_TOKENS[name]}))
    dirs[name] = str(d)
  return dirs


@pytest.fixture(scope="module")
def hf_tokenizers(hf_dirs):
  transformers = pytest.importorskip("transformers")
  return {name: transformers.AutoTokenizer.from_pretrained(d)
          for name, d in hf_dirs.items()}


@pytest.fixture(scope="module")
def kd_tokenizer(hf_dirs):
  return lm.load_tokenizer(hf_dirs["qwen"], eos_token="<|im_end|>")


def _without_markers(template: str) -> str:
  return (template.replace("{%- generation %}", "")
          .replace("{%- endgeneration %}", ""))


# -----------------------------------------------------------------------------
# Against transformers.
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("template,conversation,gen_prompt", CASES)
def test_ids_and_mask_equal_transformers(hf_dirs, hf_tokenizers, kd_tokenizer,
                                         template, conversation, gen_prompt):
  messages = CONVERSATIONS[conversation]
  hf = hf_tokenizers[template]
  want = hf.apply_chat_template(
      messages, tokenize=True, return_dict=True,
      return_assistant_tokens_mask=True, add_generation_prompt=gen_prompt,
      **DATE)
  want_text = hf.apply_chat_template(
      messages, tokenize=False, add_generation_prompt=gen_prompt, **DATE)
  chat_template = lm.load_chat_template(hf_dirs[template])
  got = lm.apply_chat_template(kd_tokenizer, messages, chat_template,
                               add_generation_prompt=gen_prompt,
                               template_kwargs=DATE)
  assert got.text == want_text
  assert got.ids == list(want["input_ids"])
  assert got.assistant_mask == list(want["assistant_masks"])
  # A real test: the conversations with an assistant turn mark something,
  # and never the whole sequence.
  assert 0 < sum(got.assistant_mask) < len(got.ids)
  # A raw tokenizers.Tokenizer gives the same.
  raw = tokenizers.Tokenizer.from_file(
      os.path.join(hf_dirs[template], "tokenizer.json"))
  again = lm.apply_chat_template(raw, messages, chat_template,
                                 add_generation_prompt=gen_prompt,
                                 template_kwargs=DATE)
  chex.assert_trees_all_equal(
      (again.ids, again.assistant_mask), (got.ids, got.assistant_mask))


def test_mask_marks_the_assistant_text(kd_tokenizer):
  messages = CONVERSATIONS["system_multi_turn"]
  got = lm.apply_chat_template(kd_tokenizer, messages, LLAMA_TEMPLATE,
                               bos_token="<|begin_of_text|>",
                               template_kwargs=DATE)
  assert [got.text[a:b] for a, b in got.spans] == [
      "Seven.<|eot_id|>", "Eleven, naïvely 🌍.<|eot_id|>"]
  turns = got.turns()
  assert len(turns) == 2
  for prompt, completion in turns:
    assert prompt + completion == got.ids[:len(prompt) + len(completion)]
    assert completion[-1] == kd_tokenizer.encode("<|eot_id|>")[0]
  # The decoded completion tokens are the span's text.
  raw = tokenizers.Tokenizer.from_str(kd_tokenizer.json_text)
  assert [raw.decode(c, skip_special_tokens=False) for _, c in turns] == [
      got.text[a:b] for a, b in got.spans]


def test_tojson_does_not_escape_html(kd_tokenizer):
  messages = [{"role": "user", "content": "Compare."},
              {"role": "tool", "content": {"out": "<b>1 < 2 & é</b>"}},
              {"role": "assistant", "content": "Yes."}]
  got = lm.apply_chat_template(kd_tokenizer, messages, LLAMA_TEMPLATE,
                               bos_token="<|begin_of_text|>",
                               template_kwargs=DATE)
  assert '{"out": "<b>1 < 2 & é</b>"}' in got.text


def test_strftime_now(kd_tokenizer):
  import datetime  # pylint: disable=g-import-not-at-top
  messages = CONVERSATIONS["single"]
  got = lm.apply_chat_template(kd_tokenizer, messages, LLAMA_TEMPLATE,
                               bos_token="<|begin_of_text|>")
  assert "Today Date: " in got.text
  assert datetime.datetime.now().strftime("%Y") in got.text


# -----------------------------------------------------------------------------
# Templates without {% generation %}: the prefix spans.
# -----------------------------------------------------------------------------


@pytest.mark.parametrize("template,conversation,gen_prompt", CASES)
def test_prefix_spans_equal_marker_spans(hf_dirs, kd_tokenizer, template,
                                         conversation, gen_prompt):
  messages = CONVERSATIONS[conversation]
  chat_template = lm.load_chat_template(hf_dirs[template])
  with_markers = lm.apply_chat_template(
      kd_tokenizer, messages, chat_template,
      add_generation_prompt=gen_prompt, template_kwargs=DATE)
  plain = lm.ChatTemplate(_without_markers(chat_template.source),
                          chat_template.special_tokens)
  assert not plain.has_generation_markers
  assert chat_template.has_generation_markers
  fallback = lm.apply_chat_template(
      kd_tokenizer, messages, plain, add_generation_prompt=gen_prompt,
      template_kwargs=DATE)  # mask="auto" -> prefix
  assert fallback.text == with_markers.text
  assert fallback.spans == with_markers.spans
  assert fallback.assistant_mask == with_markers.assistant_mask
  last = lm.apply_chat_template(
      kd_tokenizer, messages, plain, add_generation_prompt=gen_prompt,
      template_kwargs=DATE, last_turn_only=True)
  last_marked = lm.apply_chat_template(
      kd_tokenizer, messages, chat_template, add_generation_prompt=gen_prompt,
      template_kwargs=DATE, last_turn_only=True)
  assert last.spans == last_marked.spans == with_markers.spans[-1:]
  assert last.assistant_mask == last_marked.assistant_mask
  assert sum(last.assistant_mask) == len(with_markers.turns()[-1][1])
  prefix_on_markers = lm.apply_chat_template(
      kd_tokenizer, messages, chat_template,
      add_generation_prompt=gen_prompt, template_kwargs=DATE, mask="prefix")
  assert prefix_on_markers.assistant_mask == with_markers.assistant_mask


def test_prefix_spans_include_what_follows_the_end_token(kd_tokenizer):
  # Markers around content + <|im_end|> only: the newline after it is
  # outside; the prefix spans take it (it is written after the turn).
  template = QWEN_TEMPLATE.replace(
      "{{- message.content + '<|im_end|>\\n' }}{%- endgeneration %}",
      "{{- message.content + '<|im_end|>' }}{%- endgeneration %}"
      "{{- '\\n' }}")
  messages = CONVERSATIONS["single"]
  marked = lm.apply_chat_template(kd_tokenizer, messages, template)
  prefix = lm.apply_chat_template(kd_tokenizer, messages, template,
                                  mask="prefix")
  (a, b), = marked.spans
  assert marked.text[a:b] == "2 + 3 = 5.<|im_end|>"
  assert prefix.spans == ((a, b + 1),)


def test_template_rewriting_earlier_turns_raises(kd_tokenizer):
  # Drops the content of assistant turns before the last user message (as
  # Qwen3 drops their reasoning): the prefixes are not prefixes.
  template = (
      "{%- set ns = namespace(last=0) %}"
      "{%- for m in messages %}{%- if m.role == 'user' %}"
      "{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}"
      "{%- for m in messages %}"
      "{{- '<|im_start|>' + m.role + '\\n' }}"
      "{%- if m.role == 'assistant' and loop.index0 < ns.last %}"
      "{{- '<|im_end|>\\n' }}"
      "{%- else %}{{- m.content + '<|im_end|>\\n' }}{%- endif %}"
      "{%- endfor %}"
      "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
      "{%- endif %}")
  with pytest.raises(lm.ChatTemplateError, match="assistant message 2"):
    lm.apply_chat_template(kd_tokenizer,
                           CONVERSATIONS["system_multi_turn"], template)
  # One example a turn: the last assistant message of each prefix.
  messages = CONVERSATIONS["system_multi_turn"]
  for j, want in ((2, "Seven.<|im_end|>\n"),
                  (4, "  Eleven, naïvely 🌍.  <|im_end|>\n")):
    enc = lm.apply_chat_template(kd_tokenizer, messages[:j + 1], template,
                                 last_turn_only=True)
    (a, b), = enc.spans
    assert enc.text[a:b] == want and b == len(enc.text)
    (prompt, completion), = enc.turns()
    assert prompt + completion == enc.ids
  with pytest.raises(lm.ChatTemplateError, match="no {% generation %} tag"):
    lm.apply_chat_template(kd_tokenizer, CONVERSATIONS["single"], template,
                           mask="generation")


# -----------------------------------------------------------------------------
# Loading and errors.
# -----------------------------------------------------------------------------


def test_load_chat_template_sources(tmp_path):
  d = tmp_path / "ckpt"
  d.mkdir()
  (d / "tokenizer_config.json").write_text(json.dumps({
      "bos_token": {"content": "<|begin_of_text|>", "lstrip": False},
      "eos_token": "<|eot_id|>", "pad_token": None,
      "chat_template": [{"name": "default", "template": "config default"},
                        {"name": "tool_use", "template": "config tools"}]}))
  t = lm.load_chat_template(d)
  assert (t.source, t.origin) == ("config default",
                                  str(d / "tokenizer_config.json"))
  assert dict(t.special_tokens) == {"bos_token": "<|begin_of_text|>",
                                    "eos_token": "<|eot_id|>"}
  assert lm.load_chat_template(d, name="tool_use").source == "config tools"
  # chat_template.jinja overrides the config's default (transformers 5).
  (d / "chat_template.jinja").write_text("jinja default")
  (d / "additional_chat_templates").mkdir()
  (d / "additional_chat_templates" / "rag.jinja").write_text("rag one")
  assert lm.load_chat_template(d).source == "jinja default"
  assert lm.load_chat_template(d, name="rag").source == "rag one"
  assert lm.load_chat_template(d, name="tool_use").source == "config tools"
  # A template file: its directory's config gives the special tokens.
  t = lm.load_chat_template(d / "chat_template.jinja")
  assert t.source == "jinja default"
  assert t.special_tokens["eos_token"] == "<|eot_id|>"
  # The config file itself.
  assert (lm.load_chat_template(d / "tokenizer_config.json").source
          == "config default")
  with pytest.raises(lm.ChatTemplateError, match=r"'nope'.*'rag'.*name="):
    lm.load_chat_template(d, name="nope")
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(lm.ChatTemplateError, match="no 'chat_template'"):
    lm.load_chat_template(empty)
  with pytest.raises(FileNotFoundError):
    lm.load_chat_template(tmp_path / "missing")


def test_template_errors(kd_tokenizer):
  messages = CONVERSATIONS["single"]
  with pytest.raises(lm.ChatTemplateError, match="bos_token="):
    lm.apply_chat_template(kd_tokenizer, messages, LLAMA_TEMPLATE,
                           template_kwargs=DATE)
  with pytest.raises(lm.ChatTemplateError, match="unexpected role narrator"):
    lm.apply_chat_template(
        kd_tokenizer, [{"role": "narrator", "content": "Once"}],
        LLAMA_TEMPLATE, bos_token="<|begin_of_text|>", template_kwargs=DATE)
  with pytest.raises(lm.ChatTemplateError, match="does not parse"):
    lm.apply_chat_template(kd_tokenizer, messages, "{% for %}")
  with pytest.raises(ValueError, match="mask='bogus'"):
    lm.apply_chat_template(kd_tokenizer, messages, QWEN_TEMPLATE,
                           mask="bogus")


def test_sandbox_blocks_unsafe_access(kd_tokenizer):
  # ImmutableSandboxedEnvironment: no dunder attributes, no mutation.
  for source in ("{{ messages.__class__.__mro__ }}",
                 "{{ messages.append(1) }}"):
    with pytest.raises(lm.ChatTemplateError, match="is unsafe"):
      lm.apply_chat_template(kd_tokenizer, CONVERSATIONS["single"], source)


# -----------------------------------------------------------------------------
# Prompt-completion pairs and records.
# -----------------------------------------------------------------------------


def test_encode_prompt_completion(kd_tokenizer):
  enc = lm.encode_prompt_completion(kd_tokenizer, "What is 2 + 3?", " Five.")
  p = kd_tokenizer.encode("What is 2 + 3?")
  c = kd_tokenizer.encode(" Five.")
  bos, eos = kd_tokenizer.bos_id, kd_tokenizer.eos_id
  assert enc.ids == [bos] + p + c + [eos]
  assert enc.assistant_mask == [0] * (1 + len(p)) + [1] * (len(c) + 1)
  assert enc.turns() == [([bos] + p, c + [eos])]
  bare = lm.encode_prompt_completion(kd_tokenizer, "What is 2 + 3?",
                                     " Five.", add_bos=False, add_eos=False)
  assert bare.ids == p + c and bare.turns() == [(p, c)]
  # Feeds make_lm_batch: the loss covers the completion and its EOS.
  (prompt, completion), = enc.turns()
  batch = lm.make_lm_batch([prompt], [completion], 32,
                           pad_id=kd_tokenizer.pad_id)
  targets = batch["targets"][0][batch["loss_mask"][0] > 0]
  np.testing.assert_array_equal(targets, c + [eos])


def test_encode_record(kd_tokenizer, tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text(
      json.dumps({"prompt": "Hi", "completion": " there"}) + "\n"
      + json.dumps({"messages": CONVERSATIONS["single"]}) + "\n")
  pair, chat = lm.read_records(path)
  assert lm.encode_record(kd_tokenizer, pair).turns() == [
      ([kd_tokenizer.bos_id] + kd_tokenizer.encode("Hi"),
       kd_tokenizer.encode(" there") + [kd_tokenizer.eos_id])]
  enc = lm.encode_record(kd_tokenizer, chat, QWEN_TEMPLATE)
  assert enc.text.endswith("2 + 3 = 5.<|im_end|>\n")
  with pytest.raises(lm.ChatTemplateError, match=r"d\.jsonl, line 2"):
    lm.encode_record(kd_tokenizer, chat)


def test_byte_tokenizer_offsets():
  tok = lm.byte_tokenizer()
  ids, offsets = tok.encode_with_offsets("aé🌍")
  assert ids == tok.encode("aé🌍")
  assert offsets == [(0, 1), (1, 2), (1, 2)] + [(2, 3)] * 4
  enc = lm.apply_chat_template(tok, CONVERSATIONS["single"], QWEN_TEMPLATE)
  text = "2 + 3 = 5.<|im_end|>\n"
  assert bytes(i for i, m in zip(enc.ids, enc.assistant_mask) if m).decode(
  ) == text


def test_check_chat_template_tokens(hf_dirs, kd_tokenizer):
  for name, d in hf_dirs.items():
    lm.check_chat_template_tokens(lm.load_chat_template(d), kd_tokenizer)
  plain = lm.tokenizer_from_json(lm.train_bpe(TEXTS, 300), name="plain")
  with pytest.raises(lm.ChatTemplateError, match=r"'<\|im_start\|>'"):
    lm.check_chat_template_tokens(lm.load_chat_template(hf_dirs["qwen"]),
                                  plain)
