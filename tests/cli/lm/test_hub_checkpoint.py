"""``kdjax lm`` end to end on a Hugging Face checkpoint written as a user has one.

The teacher directory is built here without kdjax: a hub-style Qwen3
``config.json`` (the keys of ``Qwen/Qwen3-0.6B``'s, written as a plain dict),
``model.safetensors`` in Hugging Face's tensor names and ``torch.nn.Linear``
layouts (``safetensors.numpy``, an untied ``lm_head``, ``rope_theta`` 1e4 rather
than Tunix's built-in 1e6) and a byte-level BPE ``tokenizer.json`` trained with
``tokenizers`` (300 ids, below the 320 embedding rows). One ``kdjax lm distill``
command distils it into its every-other-layer student and writes that back as a
Hugging Face directory; the test then checks it as another tool would: the
tensor names, the config (and ``transformers.AutoConfig`` where installed),
``kdjax.lm.load_hf_checkpoint``, and a NumPy Qwen3 forward written from the
Hugging Face modelling code (RMSNorm, q/k norms, rotate-half RoPE, grouped
query attention, SwiGLU), whose greedy continuation is the one
``kdjax lm generate`` prints. Bad teacher directories exit with the README's
status and one line on stderr.
"""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import shutil
import sysconfig

import numpy as np
import pytest

pytest.importorskip("tunix")
pytest.importorskip("safetensors")
pytest.importorskip("tokenizers")

# pylint: disable=g-import-not-at-top,wrong-import-position
from safetensors.numpy import load_file
from safetensors.numpy import save_file

from kdjax.cli import errors
from kdjax.cli.main import main

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))
LM_TINY = os.path.join(REPO_ROOT, "experiments", "configs", "lm_tiny.yaml")

# The teacher: Qwen3 of 4 layers, width 32, 4 query / 2 key-value heads of 8.
VOCAB, WIDTH, LAYERS, HEADS, KV_HEADS, HEAD_DIM, HIDDEN = 320, 32, 4, 4, 2, 8, 64
TOKENIZER_IDS = 300
ROPE_THETA = 10_000.0
EPS = 1e-6


def run_main(args) -> tuple[int, str, str]:
  out, err = io.StringIO(), io.StringIO()
  with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
    rc = main([str(a) for a in args])
  return rc, out.getvalue(), err.getvalue()


def train_tokenizer(path: str, vocab_size: int) -> None:
  """A byte-level BPE (GPT-2 / Qwen style) on some standard-library text."""
  from tokenizers import decoders, models, pre_tokenizers, trainers, Tokenizer
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<pad>"],
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"],
                                        "*.py")))[:20]
  texts = [open(f, encoding="utf-8", errors="replace").read(4096)
           for f in files]
  tok.train_from_iterator(texts, trainer)
  tok.save(path)


def hub_qwen3_config(**overrides) -> dict:
  """A config.json with the keys of the hub's Qwen3 checkpoints."""
  cfg = {
      "architectures": ["Qwen3ForCausalLM"], "attention_bias": False,
      "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 0,
      "head_dim": HEAD_DIM, "hidden_act": "silu", "hidden_size": WIDTH,
      "initializer_range": 0.02, "intermediate_size": HIDDEN,
      "max_position_embeddings": 512, "max_window_layers": LAYERS,
      "model_type": "qwen3", "num_attention_heads": HEADS,
      "num_hidden_layers": LAYERS, "num_key_value_heads": KV_HEADS,
      "rms_norm_eps": EPS, "rope_scaling": None, "rope_theta": ROPE_THETA,
      "sliding_window": None, "tie_word_embeddings": False,
      "torch_dtype": "float32", "transformers_version": "4.51.0",
      "use_cache": True, "use_sliding_window": False, "vocab_size": VOCAB}
  cfg.update(overrides)
  return cfg


def qwen3_tensors(seed: int, vocab: int = VOCAB) -> dict:
  """Random weights under Hugging Face's Qwen3 names, ``[out, in]`` linears."""
  rng = np.random.default_rng(seed)

  def w(*shape):
    return (0.1 * rng.standard_normal(shape)).astype(np.float32)

  def norm(n):
    return (1.0 + 0.05 * rng.standard_normal(n)).astype(np.float32)

  t = {"model.embed_tokens.weight": w(vocab, WIDTH),
       "model.norm.weight": norm(WIDTH), "lm_head.weight": w(vocab, WIDTH)}
  for i in range(LAYERS):
    p = f"model.layers.{i}."
    t.update({
        p + "input_layernorm.weight": norm(WIDTH),
        p + "post_attention_layernorm.weight": norm(WIDTH),
        p + "self_attn.q_proj.weight": w(HEADS * HEAD_DIM, WIDTH),
        p + "self_attn.k_proj.weight": w(KV_HEADS * HEAD_DIM, WIDTH),
        p + "self_attn.v_proj.weight": w(KV_HEADS * HEAD_DIM, WIDTH),
        p + "self_attn.o_proj.weight": w(WIDTH, HEADS * HEAD_DIM),
        p + "self_attn.q_norm.weight": norm(HEAD_DIM),
        p + "self_attn.k_norm.weight": norm(HEAD_DIM),
        p + "mlp.gate_proj.weight": w(HIDDEN, WIDTH),
        p + "mlp.up_proj.weight": w(HIDDEN, WIDTH),
        p + "mlp.down_proj.weight": w(WIDTH, HIDDEN)})
  return t


def write_checkpoint(path, config: dict, tensors: dict, tokenizer_json) -> str:
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f, indent=2)
  save_file(tensors, os.path.join(path, "model.safetensors"),
            metadata={"format": "pt"})
  shutil.copy(tokenizer_json, os.path.join(path, "tokenizer.json"))
  return str(path)


def qwen3_logits(t: dict, cfg: dict, tokens) -> np.ndarray:
  """``[T, V]`` logits of Hugging Face's Qwen3ForCausalLM, in float64 NumPy.

  Follows transformers' modeling_qwen3: RMSNorm ``x / sqrt(mean(x^2) + eps)
  * w``; per-head q/k RMSNorm before RoPE; RoPE with ``rotate_half`` and
  ``inv_freq = theta^(-2i/d)``; key/value heads repeated to the query heads;
  causal softmax attention scaled by ``head_dim^-1/2``; SwiGLU MLP.
  """
  t = {k: v.astype(np.float64) for k, v in t.items()}
  heads, kv, hd = (cfg["num_attention_heads"], cfg["num_key_value_heads"],
                   cfg["head_dim"])
  eps = cfg["rms_norm_eps"]
  n = len(tokens)

  def rms(x, weight):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * weight

  inv = cfg["rope_theta"] ** (-np.arange(0, hd, 2) / hd)
  angles = np.arange(n)[:, None] * inv[None]
  cos = np.cos(np.concatenate([angles, angles], -1))[:, None]
  sin = np.sin(np.concatenate([angles, angles], -1))[:, None]

  def rope(q):
    rotated = np.concatenate([-q[..., hd // 2:], q[..., :hd // 2]], -1)
    return q * cos + rotated * sin

  x = t["model.embed_tokens.weight"][np.asarray(tokens)]
  causal = np.tril(np.ones((n, n), bool))[None]
  for i in range(cfg["num_hidden_layers"]):
    p = f"model.layers.{i}."
    h = rms(x, t[p + "input_layernorm.weight"])
    q = (h @ t[p + "self_attn.q_proj.weight"].T).reshape(n, heads, hd)
    k = (h @ t[p + "self_attn.k_proj.weight"].T).reshape(n, kv, hd)
    v = (h @ t[p + "self_attn.v_proj.weight"].T).reshape(n, kv, hd)
    q = rope(rms(q, t[p + "self_attn.q_norm.weight"]))
    k = rope(rms(k, t[p + "self_attn.k_norm.weight"]))
    k, v = np.repeat(k, heads // kv, 1), np.repeat(v, heads // kv, 1)
    s = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd)
    s = np.where(causal, s, -np.inf)
    a = np.exp(s - s.max(-1, keepdims=True))
    a /= a.sum(-1, keepdims=True)
    o = np.einsum("hts,shd->thd", a, v).reshape(n, heads * hd)
    x = x + o @ t[p + "self_attn.o_proj.weight"].T
    h = rms(x, t[p + "post_attention_layernorm.weight"])
    g = h @ t[p + "mlp.gate_proj.weight"].T
    u = h @ t[p + "mlp.up_proj.weight"].T
    x = x + (g / (1.0 + np.exp(-g)) * u) @ t[p + "mlp.down_proj.weight"].T
  x = rms(x, t["model.norm.weight"])
  head = t.get("lm_head.weight", t["model.embed_tokens.weight"])
  return x @ head.T


def greedy(t: dict, cfg: dict, prompt: list, steps: int, vocab: int,
           eos: int, suppressed: tuple) -> tuple[list, bool]:
  """Greedy continuation (ids) and whether every argmax was clear-cut
  (top-2 margin > 1e-3, so float32 and float64 must agree)."""
  ids, clear = list(prompt), True
  for _ in range(steps):
    logits = qwen3_logits(t, cfg, ids)[-1, :vocab].copy()
    logits[list(suppressed)] = -np.inf
    top2 = np.sort(logits)[-2:]
    clear &= bool(top2[1] - top2[0] > 1e-3)
    nxt = int(np.argmax(logits))
    ids.append(nxt)
    if nxt == eos:
      break
  return ids[len(prompt):], clear


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf_user")
  tok = str(root / "tokenizer.json")
  train_tokenizer(tok, TOKENIZER_IDS)
  cfg = hub_qwen3_config()
  path = write_checkpoint(root / "qwen3_teacher", cfg, qwen3_tensors(0), tok)
  return root, path, cfg


def test_loaded_teacher_is_hugging_faces_qwen3(teacher):
  """kdjax reads the user's files as transformers' Qwen3 computes them
  (rope_theta 1e4, untied head, 320 rows sliced to the tokenizer's 300)."""
  from kdjax.lm import load_hf_checkpoint, make_tunix_lm_apply
  _, path, cfg = teacher
  ck = load_hf_checkpoint(path, require_tokenizer=True)
  assert ck.family == "qwen3" and ck.config.num_layers == LAYERS
  assert ck.tokenizer.get_vocab_size() == TOKENIZER_IDS
  apply, variables = make_tunix_lm_apply(ck.model, vocab_size=TOKENIZER_IDS)
  tokens = np.array([[0, 5, 17, 42, 99, 250, 3, 7]], np.int32)
  got = np.asarray(apply(variables, {"tokens": tokens}).logits)[0]
  want = qwen3_logits(load_file(os.path.join(path, "model.safetensors")), cfg,
                      tokens[0])[:, :TOKENIZER_IDS]
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_one_distill_command_gives_a_hugging_face_student(teacher):
  root, teacher_dir, teacher_cfg = teacher
  out_dir, student_dir = root / "runs", root / "qwen3_student"
  rc, out, err = run_main([
      "lm", "distill", "--config", LM_TINY, "--set", f"output_dir={out_dir}",
      f"teacher.hf_path={teacher_dir}", "student.init=teacher_layers",
      f"distill.hf_out={student_dir}", "train.steps=4", "train.log_every=2",
      "data.max_eval_sequences=16"])
  assert rc == 0, out + err
  run_dir = out_dir / "student_token_kd"
  assert "layers every_other" in out and str(student_dir) in out, out

  # The directory another tool serves: config.json, model.safetensors, the
  # teacher's tokenizer.json and (the teacher has none) a tokenizer and a
  # generation config naming the run's special tokens.
  assert sorted(os.listdir(student_dir)) == [
      "config.json", "generation_config.json", "model.safetensors",
      "tokenizer.json", "tokenizer_config.json"]
  assert (student_dir / "tokenizer.json").read_text() == open(
      os.path.join(teacher_dir, "tokenizer.json")).read()
  assert json.loads((student_dir / "tokenizer_config.json").read_text()) == {
      "tokenizer_class": "PreTrainedTokenizerFast",
      "bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>",
      "pad_token": "<pad>", "clean_up_tokenization_spaces": False,
      "model_max_length": teacher_cfg["max_position_embeddings"]}
  assert json.loads((student_dir / "generation_config.json").read_text()) == {
      "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
  cfg = json.loads((student_dir / "config.json").read_text())
  assert cfg["pad_token_id"] == 1 and cfg["dtype"] == "float32"
  assert cfg["num_hidden_layers"] == 2
  for key in ("model_type", "architectures", "hidden_size", "head_dim",
              "intermediate_size", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "rms_norm_eps",
              "tie_word_embeddings", "bos_token_id", "eos_token_id",
              "max_position_embeddings"):
    assert cfg[key] == teacher_cfg[key], key
  rope = cfg.get("rope_theta", (cfg.get("rope_parameters") or {}).get(
      "rope_theta"))
  assert rope == ROPE_THETA, cfg

  # Hugging Face names and layouts; student layer j is teacher layer 2j,
  # moved a little by 4 steps of training.
  student = load_file(str(student_dir / "model.safetensors"))
  taught = load_file(os.path.join(teacher_dir, "model.safetensors"))
  renamed = {k.replace("layers.1.", "layers.2."): k for k in student}
  assert sorted(renamed) == sorted(k for k in taught if not any(
      f"layers.{i}." in k for i in (1, 3)))
  moved = []
  for teacher_name, name in renamed.items():
    assert student[name].shape == taught[teacher_name].shape, name
    assert student[name].dtype == np.float32, name
    moved.append(float(np.abs(student[name] - taught[teacher_name]).max()))
  assert 0.0 < max(moved) < 0.05, moved
  q1 = student["model.layers.1.self_attn.q_proj.weight"]
  assert (np.abs(q1 - taught["model.layers.2.self_attn.q_proj.weight"]).max()
          < np.abs(q1 - taught["model.layers.1.self_attn.q_proj.weight"]).max())

  try:
    import transformers
  except ImportError:
    transformers = None
  if transformers is not None:
    auto = transformers.AutoConfig.from_pretrained(str(student_dir))
    assert auto.model_type == "qwen3" and auto.num_hidden_layers == 2
    assert auto.vocab_size == VOCAB and not auto.tie_word_embeddings

  # It loads again, and computes what Hugging Face's Qwen3 computes from its
  # tensors.
  from kdjax.lm import load_hf_checkpoint, make_tunix_lm_apply
  ck = load_hf_checkpoint(str(student_dir), require_tokenizer=True)
  assert ck.family == "qwen3" and ck.config.num_layers == 2
  apply, variables = make_tunix_lm_apply(ck.model, vocab_size=TOKENIZER_IDS)
  tokens = np.array([[0, 11, 200, 4, 31, 77]], np.int32)
  np.testing.assert_allclose(
      np.asarray(apply(variables, {"tokens": tokens}).logits)[0],
      qwen3_logits(student, cfg, tokens[0])[:, :TOKENIZER_IDS],
      rtol=1e-4, atol=1e-4)

  # lm eval and lm generate on the run.
  rc, out, err = run_main(["lm", "eval", run_dir])
  assert rc == 0, out + err
  result = json.loads((run_dir / "eval.json").read_text())
  assert result["teacher"] == os.path.abspath(teacher_dir)
  assert 1.0 < result["perplexity"] < 2 * TOKENIZER_IDS, result
  assert np.isfinite(result["teacher_kl"]) and result["teacher_kl"] >= 0.0

  rc, out, err = run_main(["lm", "generate", run_dir, "--prompt", "def main(",
                           "--set", "generate.temperature=0",
                           "generate.max_new_tokens=6"])
  assert rc == 0, out + err
  sample = json.loads((run_dir / "samples.json").read_text())["samples"][0]
  assert sample["prompt"] == "def main("
  # The exported student's greedy continuation, computed from the Hugging
  # Face tensors alone: <|endoftext|> (id 0) is BOS and EOS, <pad> (1) is
  # never sampled.
  prompt = [0] + ck.tokenizer.encode("def main(", add_special_tokens=False).ids
  ids, clear = greedy(student, cfg, prompt, 6, TOKENIZER_IDS, eos=0,
                      suppressed=(1,))
  if clear:
    ids = ids[:ids.index(0)] if 0 in ids else ids
    assert sample["continuation"] == ck.tokenizer.decode(
        ids, skip_special_tokens=False), (sample, ids)


def _broken(teacher, name: str, edit) -> str:
  root, path, _ = teacher
  broken = str(root / name)
  if not os.path.exists(broken):
    shutil.copytree(path, broken)
    edit(broken)
  return broken


def _set_config(**changes):
  def edit(path):
    with open(os.path.join(path, "config.json")) as f:
      cfg = json.load(f)
    cfg.update(changes)
    with open(os.path.join(path, "config.json"), "w") as f:
      json.dump(cfg, f)
  return edit


def _tokenizer_of(path_of_json):
  def edit(path):
    shutil.copy(path_of_json, os.path.join(path, "tokenizer.json"))
  return edit


def _other_tokenizer(path):
  train_tokenizer(os.path.join(path, "other.json"), TOKENIZER_IDS - 20)


def _vocab_below_tokenizer(path):
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hub_qwen3_config(vocab_size=256), f)
  save_file(qwen3_tensors(1, vocab=256),
            os.path.join(path, "model.safetensors"), metadata={"format": "pt"})


def run_distill(broken: str, out_dir, *sets) -> tuple[int, str]:
  rc, out, err = run_main([
      "lm", "distill", "--config", LM_TINY, "--set", f"output_dir={out_dir}",
      f"teacher.hf_path={broken}", "student.init=teacher_layers", *sets])
  lines = [line for line in err.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("kdjax lm distill:"), (
      out + err)
  return rc, lines[0]


@pytest.mark.parametrize("name, edit, sets, status, pieces", [
    # README, exit statuses: a Hugging Face teacher found bad before the run
    # starts (here: tensors that contradict its config.json) is 2.
    ("wide_config", _set_config(hidden_size=48), (), errors.EXIT_USAGE,
     ("does not match its config.json", "model.embed_tokens.weight",
      "hidden_size")),
    ("no_weights", lambda p: os.remove(os.path.join(p, "model.safetensors")),
     (), errors.EXIT_USAGE, ("no *.safetensors file",)),
    ("no_tokenizer", lambda p: os.remove(os.path.join(p, "tokenizer.json")),
     (), errors.EXIT_USAGE, ("has no tokenizer.json", "tokenizer.path")),
    ("other_tokenizer", _other_tokenizer, ("tokenizer.kind=file", "tokenizer.path={dir}/other.json"),
     errors.EXIT_USAGE, ("another tokenizer", "Universal Logit Distillation")),
])
def test_bad_teacher_directory(teacher, tmp_path, name, edit, sets, status,
                               pieces):
  broken = _broken(teacher, name, edit)
  rc, line = run_distill(broken, tmp_path,
                         *(s.format(dir=broken) for s in sets))
  assert rc == status, line
  for piece in pieces:
    assert piece in line, line


def test_tokenizer_larger_than_the_checkpoints_vocabulary_exits_2(teacher,
                                                                 tmp_path):
  broken = _broken(teacher, "vocab_256", _vocab_below_tokenizer)
  rc, line = run_distill(broken, tmp_path)
  assert "300 token ids" in line and "vocabulary of 256" in line, line
  assert rc == errors.EXIT_USAGE, line
