"""Records as token examples (kdjax/lm/_examples.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kdjax import lm

tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("jinja2")

CHATML = (
    "{%- for m in messages %}"
    "{{- '<|im_start|>' + m.role + '\\n' }}"
    "{%- if m.role == 'assistant' %}{% generation %}"
    "{{- m.content + '<|im_end|>' }}{% endgeneration %}"
    "{%- else %}{{- m.content + '<|im_end|>' }}{%- endif %}"
    "{{- '\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}")


@pytest.fixture(scope="module")
def tokenizer():
  texts = ["What is two plus three? It is five. Name a prime: seven.",
           "def add(a, b):\n    return a + b\n"] * 4
  tok = tokenizers.Tokenizer.from_str(lm.train_bpe(texts, 300))
  tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
  return lm.tokenizer_from_json(tok.to_str(), name="t",
                                eos_token="<|im_end|>")


def _record(line, **fields):
  return lm.Record(prompt=fields.get("prompt"),
                   completion=fields.get("completion"),
                   messages=fields.get("messages"), path="d.jsonl", line=line)


def test_prompt_completion_examples(tokenizer):
  records = [_record(1, prompt="def add(a, b):", completion=" return a + b")]
  ex = lm.record_examples(records, tokenizer, seq_len=64)
  p = [tokenizer.bos_id] + tokenizer.encode("def add(a, b):")
  c = tokenizer.encode(" return a + b") + [tokenizer.eos_id]
  assert ex.prompts == (tuple(p),) and ex.completions == (tuple(c),)
  assert ex.sources == ("d.jsonl, line 1",) and ex.truncated == 0
  # The batch's loss covers exactly the completion and its EOS.
  batch = lm.make_lm_batch(ex.prompts, ex.completions, 64,
                           pad_id=tokenizer.pad_id)
  targets = batch["targets"][0][batch["loss_mask"][0] > 0]
  np.testing.assert_array_equal(targets, c)


def test_a_conversation_gives_one_example_per_assistant_turn(tokenizer):
  messages = ({"role": "user", "content": "What is two plus three?"},
              {"role": "assistant", "content": "five"},
              {"role": "user", "content": "Name a prime."},
              {"role": "assistant", "content": "seven"})
  ex = lm.record_examples([_record(3, messages=messages)], tokenizer,
                          seq_len=128, template=CHATML)
  enc = lm.apply_chat_template(tokenizer, messages, CHATML)
  assert len(ex) == 2
  for (p, c), (tp, tc) in zip(zip(ex.prompts, ex.completions), enc.turns()):
    assert list(p) == tp and list(c) == tc
  assert tokenizer.decode(list(ex.completions[1])).startswith("seven")
  # The second example's prompt holds the whole first exchange.
  assert len(ex.prompts[1]) > len(ex.prompts[0]) + len(ex.completions[0])
  last = lm.record_examples([_record(3, messages=messages)], tokenizer,
                            seq_len=128, template=CHATML, last_turn_only=True)
  assert len(last) == 1 and last.completions[0] == ex.completions[1]


def test_too_long_prompts_fail_or_are_counted(tokenizer):
  long = _record(7, prompt="What is two plus three? " * 20, completion="5")
  short = _record(8, prompt="a", completion="b")
  with pytest.raises(lm.ExampleError, match=r"d.jsonl, line 7.*seq_len \(16\)"):
    lm.record_examples([short, long], tokenizer, seq_len=16)
  ex = lm.record_examples([short, long], tokenizer, seq_len=16,
                          on_error="skip")
  assert len(ex) == 1 and ex.skipped == {"prompt_too_long": 1}
  assert "line 7" in ex.first_skipped["prompt_too_long"]
  assert "skipped 1: 1 prompt longer than seq_len" in ex.summary()


def test_cut_completions_and_late_turns_are_counted(tokenizer):
  cut = _record(1, prompt="a", completion="What is two plus three? " * 10)
  ex = lm.record_examples([cut], tokenizer, seq_len=8)
  assert ex.truncated == 1 and len(ex) == 1
  messages = ({"role": "user", "content": "hi"},
              {"role": "assistant", "content": "What is two plus three? " * 6},
              {"role": "user", "content": "again"},
              {"role": "assistant", "content": "five"})
  ex = lm.record_examples([_record(2, messages=messages)], tokenizer,
                          seq_len=24, template=CHATML)
  assert len(ex) == 1 and ex.skipped == {"late_turn": 1}


def test_conversations_need_a_template(tokenizer):
  rec = _record(4, messages=({"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "yo"}))
  with pytest.raises(lm.ExampleError, match="line 4.*chat template"):
    lm.record_examples([rec], tokenizer, seq_len=32)
  ex = lm.record_examples([rec], tokenizer, seq_len=32, on_error="skip")
  assert ex.skipped == {"template_error": 1} and len(ex) == 0


def test_from_files_to_batches(tokenizer, tmp_path):
  path = tmp_path / "d.jsonl"
  rows = [{"prompt": f"def f{i}(x):", "completion": f" return x + {i}"}
          for i in range(6)]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  ex = lm.record_examples(lm.read_records(str(path)), tokenizer, seq_len=32)
  batches = lm.LMBatches(ex.prompts, ex.completions, 3, 32,
                         tokenizer.pad_id, 0)
  batch = batches.batch_at(0)
  assert batch["tokens"].shape == (3, 32)
  # Each row's loss covers one whole example's completion.
  for row, plen in zip(batch["loss_mask"], batch["prompt_len"]):
    i = [len(p) for p in ex.prompts].index(int(plen))
    assert int(row.sum()) == len(ex.completions[i])
  assert lm.record_texts(lm.read_records(str(path)))[0] == (
      "def f0(x): return x + 0")


def test_no_truncation_makes_a_long_completion_an_error(tokenizer):
  cut = _record(5, prompt="a", completion="What is two plus three? " * 10)
  fits = _record(6, prompt="a", completion="b")
  with pytest.raises(lm.ExampleError, match="line 5.*seq_len"):
    lm.record_examples([fits, cut], tokenizer, seq_len=8, truncate=False)
  ex = lm.record_examples([fits, cut], tokenizer, seq_len=8, truncate=False,
                          on_error="skip")
  assert len(ex) == 1 and ex.skipped == {"completion_too_long": 1}
  assert ex.truncated == 0


def test_the_example_stream_equals_record_examples(tokenizer):
  records = [_record(i, prompt=f"def f{i}(x):", completion=" return x" * i)
             for i in range(1, 8)]
  whole = lm.record_examples(records, tokenizer, seq_len=16, on_error="skip")
  stream = lm.iter_record_examples(iter(records), tokenizer, seq_len=16,
                                   on_error="skip")
  got = list(stream)
  assert tuple(e.prompt for e in got) == whole.prompts
  assert tuple(e.completion for e in got) == whole.completions
  assert stream.truncated == whole.truncated > 0
  assert dict(stream.skipped) == dict(whole.skipped)
