"""A student export that serving tools read as they read the teacher.

``kdjax.lm.save_hf_checkpoint(..., tokenizer_files_from=teacher_dir)`` carries
the teacher's tokenizer and generation files; with a tokenizer of kdjax's own
(no teacher directory) it writes a ``tokenizer_config.json`` and
``generation_config.json`` naming kdjax's special tokens. Checked here with
transformers itself (``AutoTokenizer``, ``GenerationConfig``, no torch), on a
Qwen 3-style and a Llama 3-style teacher directory written in this file (a
byte-level BPE ``tokenizer.json`` trained offline with ``tokenizers``, the
hub's tokenizer_config.json keys, chat templates inline and as
``chat_template.jinja`` / ``additional_chat_templates/``, a sampling
``generation_config.json``), and on a BPE trained by ``kdjax.lm.train_bpe``.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig

import pytest

pytest.importorskip("tunix")
pytest.importorskip("tokenizers")
pytest.importorskip("safetensors")
transformers = pytest.importorskip("transformers")

# pylint: disable=g-import-not-at-top,wrong-import-position
from tokenizers import decoders, models, pre_tokenizers, processors
from tokenizers import trainers, Tokenizer

from kdjax import lm
import test_hf_checkpoint as hf_ck

VOCAB = 320  # embedding rows; the tokenizers below have 300 ids
TEXTS = ("def f(x):\n    return x + 1  # comment",
         "Knowledge distillation: the student   learns, from the teacher!",
         "héllo wörld — ünïcode 🙂 and tabs\tand\nnewlines\n\n",
         "<|im_start|>user\nhi<|im_end|>")
MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is distillation?"},
            {"role": "assistant", "content": "A student learns from a teacher."},
            {"role": "user", "content": "Why?"}]

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>"
    "assistant\n{% endif %}")
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
    "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant"
    "<|end_header_id|>\n\n{% endif %}")
LLAMA_TOOL_TEMPLATE = "{{ bos_token }}TOOLS{% for m in messages %}{{ m['content'] }}{% endfor %}"


def _corpus():
  files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"],
                                        "*.py")))[:20]
  return [open(f, encoding="utf-8", errors="replace").read(4096)
          for f in files]


def train_byte_bpe(specials) -> Tokenizer:
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
      vocab_size=300, special_tokens=specials, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tok


def _dump(path, data):
  with open(path, "w", encoding="utf-8") as f:
    json.dump(data, f, indent=2)


def _added_tokens_decoder(specials):
  return {str(i): {"content": t, "lstrip": False, "normalized": False,
                   "rstrip": False, "single_word": False, "special": True}
          for i, t in enumerate(specials)}


def qwen3_teacher(root) -> str:
  """Qwen 3's files: Qwen2Tokenizer with vocab.json / merges.txt, the chat
  template inline in tokenizer_config.json, no BOS token, a sampling
  generation_config.json stopping on two ids."""
  cfg = dict(hf_ck.CONFIGS["qwen3"], vocab_size=VOCAB, bos_token_id=0,
             eos_token_id=2)
  path = hf_ck.write_checkpoint(root / "qwen3_teacher", "qwen3", cfg)
  tok = train_byte_bpe(QWEN_SPECIALS)
  tok.save(os.path.join(path, "tokenizer.json"))
  tok.model.save(path)  # vocab.json, merges.txt
  _dump(os.path.join(path, "tokenizer_config.json"), {
      "added_tokens_decoder": _added_tokens_decoder(QWEN_SPECIALS),
      "bos_token": None, "chat_template": QWEN_TEMPLATE,
      "clean_up_tokenization_spaces": False, "eos_token": "<|im_end|>",
      "errors": "replace", "model_max_length": 131072,
      "pad_token": "<|endoftext|>", "split_special_tokens": False,
      "tokenizer_class": "Qwen2Tokenizer", "unk_token": None})
  _dump(os.path.join(path, "special_tokens_map.json"), {
      "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
      "eos_token": {"content": "<|im_end|>", "lstrip": False,
                    "normalized": False, "rstrip": False,
                    "single_word": False},
      "pad_token": {"content": "<|endoftext|>", "lstrip": False,
                    "normalized": False, "rstrip": False,
                    "single_word": False}})
  _dump(os.path.join(path, "generation_config.json"), {
      "bos_token_id": 0, "do_sample": True, "eos_token_id": [2, 0],
      "pad_token_id": 0, "temperature": 0.6, "top_k": 20, "top_p": 0.95,
      "transformers_version": "4.51.0"})
  return path


def llama3_teacher(root) -> str:
  """Llama 3 Instruct's files: PreTrainedTokenizerFast whose post-processor
  adds BOS, no pad token, chat_template.jinja and a second template in
  additional_chat_templates/."""
  cfg = dict(hf_ck.CONFIGS["llama3"], vocab_size=VOCAB, bos_token_id=0,
             eos_token_id=4)
  path = hf_ck.write_checkpoint(root / "llama3_teacher", "llama3", cfg)
  tok = train_byte_bpe(LLAMA_SPECIALS)
  tok.post_processor = processors.TemplateProcessing(
      single="<|begin_of_text|> $A",
      pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
      special_tokens=[("<|begin_of_text|>", 0)])
  tok.save(os.path.join(path, "tokenizer.json"))
  _dump(os.path.join(path, "tokenizer_config.json"), {
      "added_tokens_decoder": _added_tokens_decoder(LLAMA_SPECIALS),
      "bos_token": "<|begin_of_text|>", "clean_up_tokenization_spaces": True,
      "eos_token": "<|eot_id|>",
      "model_input_names": ["input_ids", "attention_mask"],
      "model_max_length": 131072,
      "tokenizer_class": "PreTrainedTokenizerFast"})
  _dump(os.path.join(path, "special_tokens_map.json"), {
      "bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"})
  with open(os.path.join(path, "chat_template.jinja"), "w") as f:
    f.write(LLAMA_TEMPLATE)
  os.makedirs(os.path.join(path, "additional_chat_templates"))
  with open(os.path.join(path, "additional_chat_templates", "tool_use.jinja"),
            "w") as f:
    f.write(LLAMA_TOOL_TEMPLATE)
  _dump(os.path.join(path, "generation_config.json"), {
      "bos_token_id": 0, "do_sample": True, "eos_token_id": [1, 4],
      "temperature": 0.6, "top_p": 0.9, "transformers_version": "4.45.0"})
  return path


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
  root = tmp_path_factory.mktemp("teachers")
  return {"qwen3": qwen3_teacher(root), "llama3": llama3_teacher(root)}


def auto_tokenizer(path):
  return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


def read_json(path, name):
  with open(os.path.join(path, name), encoding="utf-8") as f:
    return json.load(f)


def export_student(family, teacher_dir, out, **kwargs):
  teacher = lm.load_hf_checkpoint(teacher_dir)
  student = lm.student_from_teacher(teacher, keep_layers="every_other")
  return lm.save_hf_checkpoint(out, family, student,
                               hf_config=teacher.hf_config,
                               tokenizer_files_from=teacher_dir, **kwargs)


@pytest.mark.parametrize("family", ["qwen3", "llama3"])
def test_export_tokenizes_as_the_teacher(family, teachers, tmp_path):
  teacher_dir = teachers[family]
  # The Llama export is given the tokenizer too (it must be the teacher's).
  kwargs = ({"tokenizer": lm.load_hf_tokenizer(teacher_dir)}
            if family == "llama3" else {})
  out = export_student(family, teacher_dir, tmp_path / "student", **kwargs)
  want, got = auto_tokenizer(teacher_dir), auto_tokenizer(out)

  assert type(got) is type(want)
  for text in TEXTS:
    for special in (True, False):
      assert (got(text, add_special_tokens=special)["input_ids"]
              == want(text, add_special_tokens=special)["input_ids"]), text
  for name in ("bos_token", "eos_token", "pad_token", "bos_token_id",
               "eos_token_id", "pad_token_id", "all_special_tokens"):
    assert getattr(got, name) == getattr(want, name), name
  assert want.eos_token is not None
  assert got.chat_template == want.chat_template and got.chat_template
  for generation_prompt in (True, False):
    for tokenize in (True, False):
      assert got.apply_chat_template(
          MESSAGES, tokenize=tokenize, add_generation_prompt=generation_prompt
      ) == want.apply_chat_template(
          MESSAGES, tokenize=tokenize, add_generation_prompt=generation_prompt)
  # The student's context (config.json's max_position_embeddings) bounds
  # model_max_length.
  assert want.model_max_length == 131072 and got.model_max_length == 256

  # Files carried byte for byte; tokenizer_config.json with the rules.
  names = {"qwen3": ["merges.txt", "special_tokens_map.json", "vocab.json"],
           "llama3": ["chat_template.jinja", "special_tokens_map.json",
                      os.path.join("additional_chat_templates",
                                   "tool_use.jinja")]}[family]
  for name in names + ["tokenizer.json"]:
    with open(os.path.join(out, name), "rb") as a, open(
        os.path.join(teacher_dir, name), "rb") as b:
      assert a.read() == b.read(), name
  source = read_json(teacher_dir, "tokenizer_config.json")
  assert read_json(out, "tokenizer_config.json") == dict(
      source, model_max_length=256)

  cfg = read_json(out, "config.json")
  assert cfg["dtype"] == cfg["torch_dtype"] == "float32"
  assert cfg["num_hidden_layers"] == hf_ck.CONFIGS[family][
      "num_hidden_layers"] // 2
  gen = transformers.GenerationConfig.from_pretrained(out,
                                                      local_files_only=True)
  teacher_gen = read_json(teacher_dir, "generation_config.json")
  for key in ("bos_token_id", "eos_token_id", "pad_token_id", "do_sample",
              "temperature", "top_p"):
    assert getattr(gen, key) == teacher_gen.get(key), key
  saved_gen = read_json(out, "generation_config.json")
  assert "transformers_version" not in saved_gen
  assert cfg["eos_token_id"] in saved_gen["eos_token_id"]
  if family == "llama3":  # neither file names a pad token
    assert "pad_token_id" not in cfg and "pad_token_id" not in saved_gen
  else:  # config.json's missing pad id comes from the generation config
    assert cfg["pad_token_id"] == saved_gen["pad_token_id"] == 0
  assert transformers.AutoConfig.from_pretrained(
      out, local_files_only=True).num_hidden_layers == cfg["num_hidden_layers"]


def kdjax_bpe():
  return lm.tokenizer_from_json(lm.train_bpe(_corpus(), 300), name="bpe",
                                kind="bpe")


def tiny_qwen3(tmp_path, **config):
  cfg = dict(hf_ck.CONFIGS["qwen3"], vocab_size=VOCAB, **config)
  for key in ("bos_token_id", "eos_token_id"):
    cfg.pop(key)
  return lm.load_hf_checkpoint(
      hf_ck.write_checkpoint(tmp_path / "model", "qwen3", cfg)).model


def test_kdjax_bpe_export_gives_kdjax_ids_and_special_tokens(tmp_path):
  tok = kdjax_bpe()
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
  out = lm.save_hf_checkpoint(tmp_path / "out", "qwen3", tiny_qwen3(tmp_path),
                              tokenizer=tok)
  assert sorted(os.listdir(out)) == [
      "config.json", "generation_config.json", "model.safetensors",
      "tokenizer.json", "tokenizer_config.json"]
  got = auto_tokenizer(out)
  assert isinstance(got, transformers.PreTrainedTokenizerFast)
  for text in TEXTS:
    for special in (True, False):
      assert got(text, add_special_tokens=special)["input_ids"] == tok.encode(
          text), text
  assert (got.pad_token, got.bos_token, got.eos_token) == (
      "<pad>", "<bos>", "<eos>")
  assert (got.pad_token_id, got.bos_token_id, got.eos_token_id) == (0, 1, 2)
  ids = tok.encode(TEXTS[2])
  assert got.decode(ids) == tok.decode(ids) == TEXTS[2]
  cfg = read_json(out, "config.json")
  assert got.model_max_length == cfg["max_position_embeddings"]
  assert (cfg["pad_token_id"], cfg["bos_token_id"], cfg["eos_token_id"]) == (
      0, 1, 2)
  assert cfg["dtype"] == cfg["torch_dtype"] == "float32"
  gen = transformers.GenerationConfig.from_pretrained(out,
                                                      local_files_only=True)
  assert (gen.pad_token_id, gen.bos_token_id, gen.eos_token_id) == (0, 1, 2)


def test_export_over_an_earlier_one_leaves_no_stale_files(teachers, tmp_path):
  out = export_student("llama3", teachers["llama3"], tmp_path / "out")
  assert os.path.isdir(os.path.join(out, "additional_chat_templates"))
  again = lm.load_hf_checkpoint(out)
  lm.save_hf_checkpoint(out, "llama3", again.model, hf_config=again.hf_config,
                        tokenizer=kdjax_bpe())
  assert sorted(os.listdir(out)) == [
      "config.json", "generation_config.json", "model.safetensors",
      "tokenizer.json", "tokenizer_config.json"]
  got = auto_tokenizer(out)
  assert got.chat_template is None and got.eos_token == "<eos>"
  # kdjax's ids replace hf_config's (bos 0, eos 4), in config.json and the
  # generation config alike.
  cfg, gen = read_json(out, "config.json"), read_json(
      out, "generation_config.json")
  assert read_json(teachers["llama3"], "config.json")["eos_token_id"] == 4
  assert (cfg["pad_token_id"], cfg["bos_token_id"], cfg["eos_token_id"]) == (
      0, 1, 2)
  assert gen == {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}


def test_another_tokenizer_than_the_sources_is_refused(teachers, tmp_path):
  teacher = lm.load_hf_checkpoint(teachers["qwen3"])
  out = tmp_path / "out"
  with pytest.raises(lm.TokenizerMismatchError):
    lm.save_hf_checkpoint(out, "qwen3", teacher.model,
                          hf_config=teacher.hf_config,
                          tokenizer=lm.load_hf_tokenizer(teachers["llama3"]),
                          tokenizer_files_from=teachers["qwen3"])
  assert not os.path.exists(out)  # refused before anything is written


def test_generation_ids_outside_the_vocabulary_are_refused(teachers,
                                                           tmp_path):
  teacher_dir = tmp_path / "teacher"
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.copytree(teachers["qwen3"], teacher_dir)
  gen = read_json(teacher_dir, "generation_config.json")
  _dump(teacher_dir / "generation_config.json", dict(gen, eos_token_id=[2,
                                                                        VOCAB]))
  with pytest.raises(lm.HFCheckpointError, match="eos_token_id"):
    export_student("qwen3", str(teacher_dir), tmp_path / "out")
  assert not os.path.exists(tmp_path / "out")


def test_a_bytes_tokenizer_is_not_exported_with_a_teachers_files(tmp_path):
  """Bytes have no tokenizer.json to check against the teacher's files."""
  model = tiny_qwen3(tmp_path)
  teacher = tmp_path / "teacher"
  teacher.mkdir()
  with pytest.raises(lm.HFCheckpointError, match="bytes tokenizer"):
    lm.save_hf_checkpoint(str(tmp_path / "out"), "qwen3", model,
                          tokenizer=lm.byte_tokenizer(),
                          tokenizer_files_from=str(teacher))
