"""Tokenizers for LM distillation (kdjax/lm/_tokenizer.py)."""

from __future__ import annotations

import hashlib
import json
import os
import sys

import pytest

from kdjax import lm

tokenizers = pytest.importorskip("tokenizers")

TEXTS = ["def add(a, b):\n    return a + b\n",
         "def sub(a, b):\n    return a - b\n",
         "class Point:\n    x = 0\n    y = 0\n"] * 3


@pytest.fixture(scope="module")
def bpe_json():
  return lm.train_bpe(TEXTS, 300)


@pytest.fixture(scope="module")
def bpe(bpe_json):
  return lm.tokenizer_from_json(bpe_json, name="trained", kind="bpe")


def _gpt2_style_json():
  """A BPE whose only special token is ``<|endoftext|>``."""
  from tokenizers import decoders, models, pre_tokenizers, trainers
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(TEXTS, trainers.BpeTrainer(
      vocab_size=280, special_tokens=["<|endoftext|>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  return tok.to_str()


# -----------------------------------------------------------------------------
# Bytes.
# -----------------------------------------------------------------------------


def test_byte_tokenizer_wraps_byte_tokenizer():
  tok = lm.byte_tokenizer()
  bt = lm.ByteTokenizer()
  assert (tok.kind, tok.vocab_size) == ("bytes", 259)
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (256, 257, 258)
  assert tok.encode("hé") == list("hé".encode("utf-8"))  # no BOS
  assert tok.encode("hé") == bt.encode("hé", add_bos=False)
  ids = [257, 257] + tok.encode("héllo") + [256, 258] + tok.encode("tail")
  assert tok.decode(ids) == "héllo"
  assert tok.fingerprint == "bytes:259"
  assert tok.json_text is None


def test_byte_tokenizer_saves_nothing(tmp_path):
  assert lm.byte_tokenizer().save(str(tmp_path)) is None
  assert not os.listdir(tmp_path)


# -----------------------------------------------------------------------------
# tokenizer.json tokenizers.
# -----------------------------------------------------------------------------


def test_train_bpe_specials_and_round_trip(bpe):
  assert (bpe.pad_id, bpe.bos_id, bpe.eos_id) == (0, 1, 2)
  assert bpe.kind == "bpe"
  assert 260 <= bpe.vocab_size <= 300
  text = "def mul(a, b):\n    return a * b  # ünïcode ✓\n"
  ids = bpe.encode(text)
  assert not {0, 1, 2} & set(ids)  # no special token added
  assert bpe.decode(ids) == text
  assert bpe.decode([1] + ids + [2] + bpe.encode("after EOS")) == text
  assert bpe.decode([1] + ids[:3] + [0, 0] + ids[3:]) == text  # PAD skipped


def test_trained_bpe_merges(bpe):
  # A trained vocabulary: fewer ids than bytes for the training text.
  assert len(bpe.encode(TEXTS[0])) < len(TEXTS[0].encode("utf-8"))


def test_fingerprint_is_the_vocabulary_and_special_ids(bpe, bpe_json):
  raw = tokenizers.Tokenizer.from_str(bpe_json)
  vocab = sorted(raw.get_vocab(with_added_tokens=True).items())
  digest = hashlib.sha256(json.dumps([vocab, 0, 1, 2]).encode()).hexdigest()
  assert bpe.fingerprint == digest[:16]  # saved by runs: keep the formula
  again = lm.tokenizer_from_json(bpe_json, name="again", kind="file")
  assert again.fingerprint == bpe.fingerprint
  other_pad = lm.tokenizer_from_json(bpe_json, name="x", pad_token="<eos>")
  assert other_pad.pad_id == 2
  assert other_pad.fingerprint != bpe.fingerprint
  smaller = lm.tokenizer_from_json(lm.train_bpe(TEXTS, 270), name="small")
  assert smaller.fingerprint != bpe.fingerprint


def test_gpt2_style_specials_fall_back_to_eos():
  tok = lm.tokenizer_from_json(_gpt2_style_json(), name="gpt2")
  assert tok.pad_id == tok.bos_id == tok.eos_id == 0
  ids = tok.encode("return a")
  assert tok.decode([0, 0] + ids + [0] + tok.encode("b")) == "return a"


def test_named_special_tokens(bpe_json):
  tok = lm.tokenizer_from_json(bpe_json, name="t", eos_token="<pad>",
                               bos_token="<eos>", pad_token="<bos>")
  assert (tok.pad_id, tok.bos_id, tok.eos_id) == (1, 2, 0)


def test_save_and_load(bpe, tmp_path):
  path = bpe.save(str(tmp_path))
  assert path == os.path.join(str(tmp_path), "tokenizer.json")
  assert os.listdir(tmp_path) == ["tokenizer.json"]  # no .tmp left
  with open(path) as f:
    assert f.read() == bpe.json_text
  for where in (tmp_path, path):
    loaded = lm.load_tokenizer(where, kind="bpe")
    assert loaded.fingerprint == bpe.fingerprint
    assert loaded.kind == "bpe"
    assert loaded.encode("x = 0") == bpe.encode("x = 0")


def test_load_tokenizer_missing(tmp_path):
  with pytest.raises(FileNotFoundError,
                     match=r"no tokenizer file at .*tokenizer\.json"):
    lm.load_tokenizer(tmp_path)


# -----------------------------------------------------------------------------
# Errors.
# -----------------------------------------------------------------------------


def test_not_a_tokenizer_json(tmp_path):
  path = tmp_path / "tokenizer.json"
  path.write_text('{"model": 3}')
  with pytest.raises(lm.TokenizerError,
                     match=r"tokenizer\.json is not a tokenizers "
                     r"tokenizer\.json"):
    lm.load_tokenizer(path)
  assert issubclass(lm.TokenizerError, ValueError)


@pytest.mark.parametrize("argument", ["eos_token", "bos_token", "pad_token"])
def test_unknown_special_token_names_argument_and_file(bpe, tmp_path,
                                                       argument):
  path = bpe.save(str(tmp_path))
  with pytest.raises(lm.SpecialTokenError) as info:
    lm.load_tokenizer(path, **{argument: "<nope>"})
  e = info.value
  assert (e.argument, e.token, e.source) == (argument, "<nope>", path)
  assert f"{argument}='<nope>'" in str(e) and path in str(e)
  assert isinstance(e, lm.TokenizerError)


def test_no_end_of_sequence_token():
  from tokenizers import models
  tok = tokenizers.Tokenizer(models.WordLevel({"a": 0, "b": 1},
                                              unk_token="a"))
  with pytest.raises(lm.SpecialTokenError,
                     match=r"no end-of-sequence token .* eos_token") as info:
    lm.tokenizer_from_json(tok.to_str(), name="words")
  assert (info.value.argument, info.value.token) == ("eos_token", None)


def test_missing_tokenizers_package_says_how_to_install(monkeypatch,
                                                        bpe_json):
  monkeypatch.setitem(sys.modules, "tokenizers", None)  # import fails
  with pytest.raises(ImportError, match=r"pip install 'kdjax\[tunix\]'") as e:
    lm.tokenizer_from_json(bpe_json, name="t")
  assert e.value.name == "tokenizers"
  with pytest.raises(ImportError, match="train_bpe needs the `tokenizers`"):
    lm.train_bpe(TEXTS, 300)


# -----------------------------------------------------------------------------
# check_same_tokenizer: library and raw tokenizers.
# -----------------------------------------------------------------------------


def test_same_tokenizer_passes(bpe, bpe_json):
  lm.check_same_tokenizer(bpe, lm.tokenizer_from_json(bpe_json, name="b"))
  lm.check_same_tokenizer(lm.byte_tokenizer(), lm.byte_tokenizer())
  raw = tokenizers.Tokenizer.from_str(bpe_json)
  lm.check_same_tokenizer(bpe, raw)
  lm.check_same_tokenizer(raw, bpe)


def _mismatch(teacher, student, match):
  with pytest.raises(lm.TokenizerMismatchError, match=match) as info:
    lm.check_same_tokenizer(teacher, student)
  assert "kdjax.lm.make_uld_loss" in str(info.value)
  assert isinstance(info.value, lm.HFCheckpointError)  # as before
  assert isinstance(info.value, lm.TokenizerError)


def test_different_library_tokenizers(bpe, bpe_json):
  _mismatch(lm.byte_tokenizer(), bpe,
            r"the teacher's \(bytes, 259 ids\) is not the student's "
            r"\(bpe, \d+ ids\)")
  smaller = lm.tokenizer_from_json(lm.train_bpe(TEXTS, 270), name="s")
  _mismatch(bpe, smaller, r"different tokenizers: .* only in the teacher's")
  other_pad = lm.tokenizer_from_json(bpe_json, name="p", pad_token="<eos>")
  _mismatch(bpe, other_pad, r"special \(PAD, BOS, EOS\) ids differ")


def test_library_against_raw_tokenizers(bpe, bpe_json):
  smaller = tokenizers.Tokenizer.from_str(lm.train_bpe(TEXTS, 270))
  _mismatch(bpe, smaller, r"only in the teacher's")
  _mismatch(smaller, bpe, r"only in the student's")
  _mismatch(lm.byte_tokenizer(), smaller, r"\(bytes, 259 ids\) is not")
  lowered = tokenizers.Tokenizer.from_str(bpe_json)
  lowered.normalizer = tokenizers.normalizers.Lowercase()
  _mismatch(bpe, lowered, r"differ in their normalizer")
