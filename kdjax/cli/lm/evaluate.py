"""``kdjax lm eval`` and ``kdjax lm generate``: a trained run read back.

:class:`LMEvaluator` is the held-out evaluation a training run calls every
``train.eval_every`` steps and at its end; :func:`evaluate_run` (a run
directory, writes ``eval.json``) and :func:`evaluate_hf` (a Hugging Face
directory, e.g. a ``distill.hf_out`` export; writes nothing) use it from the
command line; :func:`generate_run` samples continuations of prompts
(``samples.json``).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import lm
from kdjax.cli import errors
from kdjax.cli import runs
from kdjax.cli.config import lm as _lm_config
from kdjax.cli.config.base import ConfigError
from kdjax.cli.lm import data as _lm_data
from kdjax.cli.lm import models as _lm_models

SAMPLES_FILE = "samples.json"


class LMEvaluator:
  """``evaluate(state or variables)``: held-out token cross-entropy and
  perplexity ``exp(mean CE)`` over the loss-mask tokens; with a teacher, its
  perplexity and the teacher-student divergence (``eval.divergence``,
  temperature 1, mean over the same tokens)."""

  def __init__(self, config: Mapping[str, Any], student: "lm.LMModel",
               teacher: Optional[_lm_models.LMTeacher],
               data: _lm_data.LMData):
    d = config["data"]
    tok = data.tokenizer
    self.batches = lm.padded_eval_batches(*data.held_out,
                                          d["eval_batch_size"], d["seq_len"],
                                          tok.pad_id)
    self.num_sequences = len(data.held_out[0])
    self._teacher_vars = None if teacher is None else teacher.variables
    self.divergence = config["eval"]["divergence"]
    vocab = tok.vocab_size
    t_apply = None if teacher is None else teacher.model.apply

    def nll_rows(logits, batch):
      logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32)[..., :vocab])
      nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
      return jnp.sum(nll * batch["loss_mask"], axis=-1)

    def divergence_rows(s_logits, t_logits, mask):
      def one(s, t, m):
        return lm.token_divergence_sums(
            s[None], t[None], m[None], vocab_size=vocab,
            divergence=self.divergence)[0]
      return jax.vmap(one)(jnp.asarray(s_logits, jnp.float32),
                           jnp.asarray(t_logits, jnp.float32), mask)

    def rows(s_vars, t_vars, batch):
      """Per-sequence sums over the loss-mask tokens."""
      s_logits = student.apply(s_vars, batch).logits
      out = {"nll": nll_rows(s_logits, batch),
             "tokens": jnp.sum(batch["loss_mask"], axis=-1)}
      if t_apply is not None:
        t_logits = t_apply(t_vars, batch).logits
        out["teacher_nll"] = nll_rows(t_logits, batch)
        out["divergence"] = divergence_rows(s_logits, t_logits,
                                            batch["loss_mask"])
      return out

    self._rows = jax.jit(rows)

  def sequence_sums(self, state_or_variables) -> dict:
    """Per held-out sequence (in order): ``{"nll", "tokens"[,
    "teacher_nll", "divergence"]}`` float64 arrays of sums over its
    loss-mask tokens."""
    variables = (state_or_variables.student_variables()
                 if hasattr(state_or_variables, "student_variables")
                 else state_or_variables)
    parts = [jax.device_get(self._rows(variables, self._teacher_vars, batch))
             for batch in self.batches]
    return {k: np.concatenate([np.asarray(p[k], np.float64) for p in parts]
                              )[:self.num_sequences] for k in parts[0]}

  def report(self, sums: Mapping[str, Any]) -> dict:
    """Loss, perplexity (and the teacher's, and the divergence) of summed
    ``sums`` (all sequences, or a subset's)."""
    total = {k: float(np.sum(v)) for k, v in sums.items()}
    n = max(total["tokens"], 1.0)
    report = {"loss": total["nll"] / n,
              "perplexity": math.exp(min(total["nll"] / n, 700.0))}
    if "teacher_nll" in total:
      report["teacher_perplexity"] = math.exp(min(total["teacher_nll"] / n,
                                                  700.0))
      report[f"teacher_{self.divergence}"] = total["divergence"] / n
    report["tokens"] = total["tokens"]
    return report

  def __call__(self, state_or_variables) -> dict:
    return self.report(self.sequence_sums(state_or_variables))


def per_file(sums: Mapping[str, Any], paths: Sequence[str]) -> dict:
  """``{file: {sum name: float}}``: the held-out sequences' sums by file
  (e.g. for a confidence interval over held-out modules)."""
  out: dict = {}
  for i, path in enumerate(paths):
    entry = out.setdefault(path, {k: 0.0 for k in sums})
    for k, v in sums.items():
      entry[k] += float(v[i])
  return out


def _run_and_model(run_dir: str, overrides: Sequence[str]):
  run = _lm_models.read_lm_run(run_dir)
  if overrides:
    run.config = _lm_config.load_config(
        [os.path.join(run_dir, runs.CONFIG_FILE)], overrides)
  tokenizer = _lm_data.tokenizer_of_run(run_dir, run.meta,
                                        run.config["tokenizer"])
  model = run.model(tokenizer.vocab_size)
  return run, tokenizer, model, run.restore(model)


def _evaluate(config: Mapping[str, Any], model: "lm.LMModel", variables,
              teacher: Optional[_lm_models.LMTeacher],
              data: _lm_data.LMData) -> tuple[dict, str]:
  """``(fields, words)``: ``model``'s held-out evaluation as eval.json's
  fields (per-file sums for records) and as the words of the closing
  line."""
  t0 = time.perf_counter()
  evaluator = LMEvaluator(config, model, teacher, data)
  sums = evaluator.sequence_sums(variables)
  report = evaluator.report(sums)
  fields = {"model": model.description,
            "params": _lm_models.param_count(variables),
            "teacher": None if teacher is None else teacher.path,
            "held_out_files": len(data.corpus["files"]["eval"]),
            "held_out_sequences": len(data.held_out[0]),
            "eval_s": time.perf_counter() - t0, **report}
  if data.held_out_paths is not None:
    fields["per_file"] = per_file(sums, data.held_out_paths)
  div = config["eval"]["divergence"]
  words = (f"held-out perplexity {report['perplexity']:.3f} over "
           f"{int(report['tokens'])} tokens"
           + (f"; teacher perplexity {report['teacher_perplexity']:.3f}, "
              f"teacher-student {div} {report['teacher_' + div]:.4f}"
              if teacher is not None else ""))
  return fields, words


def evaluate_run(run_dir: str, teacher_dir: Optional[str] = None, *,
                 use_teacher: bool = True, overrides: Sequence[str] = (),
                 out: Callable[[str], None] = print) -> dict:
  """Held-out perplexity of a run (and its teacher's, and their divergence);
  writes eval.json into the run directory."""
  run, tokenizer, model, variables = _run_and_model(run_dir, overrides)
  teacher = None
  if use_teacher and teacher_dir is None and run.meta.get("teacher_hf"):
    _lm_data.check_teacher_tokenizer(run.config, tokenizer)
    teacher = _lm_models.load_teacher(run.config, tokenizer.vocab_size)
  elif use_teacher:
    teacher_dir = teacher_dir or run.meta.get("teacher_run")
    if teacher_dir:
      _lm_data.check_run_teacher_tokenizer(teacher_dir, tokenizer)
      teacher = _lm_models.load_run_teacher(teacher_dir, tokenizer.vocab_size)
  data = _lm_data.load_data(run.config, tokenizer, train=False, out=out)
  with errors.during_run():
    fields, words = _evaluate(run.config, model, variables, teacher, data)
    result = {"run": os.path.abspath(run_dir), "step": run.latest_step(),
              **fields}
    runs.write_json(os.path.join(run_dir, runs.EVAL_FILE), result)
  out(f"[lm eval] {run_dir} (step {result['step']}, {model.description}): "
      f"{words}; {os.path.join(run_dir, runs.EVAL_FILE)}")
  return result


def evaluate_hf(hf_dir: str, config_paths: Sequence[str] = (), *,
                overrides: Sequence[str] = (), use_teacher: bool = True,
                out: Callable[[str], None] = print) -> dict:
  """Held-out perplexity of the Hugging Face checkpoint in ``hf_dir`` (e.g.
  a ``distill.hf_out`` export) on the held-out files of the config, with its
  own tokenizer.json; with ``teacher.hf_path`` set (and ``use_teacher``),
  also the teacher's perplexity and the teacher-student divergence. Prints
  one line and returns the result; writes no file (the directory stays a
  plain Hugging Face checkpoint)."""
  config = _lm_config.load_config(config_paths, overrides)
  teacher_hf = config["teacher"]["hf_path"] if use_teacher else None
  own = {**config, "teacher": {**config["teacher"], "hf_path": hf_dir}}
  _lm_data.check_teacher_exists(own)
  data = _lm_data.load_data(own, train=False, out=out)
  model = _lm_models.model_of(own, "teacher", data.tokenizer.vocab_size)
  teacher = None
  if teacher_hf:
    if runs.same_path(teacher_hf, hf_dir):
      raise ConfigError(f"--hf {hf_dir} is teacher.hf_path itself; unset "
                        "teacher.hf_path or pass --no-teacher.")
    _lm_data.check_teacher_exists(config)
    _lm_data.check_teacher_tokenizer(config, data.tokenizer)
    teacher = _lm_models.load_teacher(config, data.tokenizer.vocab_size)
  with errors.during_run():
    fields, words = _evaluate(config, model, model.variables, teacher, data)
  result = {"hf": os.path.abspath(hf_dir), **fields}
  out(f"[lm eval] {hf_dir} ({model.description}): {words}")
  return result


def generate_run(run_dir: str, prompts: Sequence[str] = (), *,
                 overrides: Sequence[str] = (),
                 out: Callable[[str], None] = print) -> list[dict]:
  """Samples continuations of ``prompts`` (default: ``generate.prompts``,
  else held-out prompts); prints them and writes samples.json."""
  run, tokenizer, model, variables = _run_and_model(run_dir, overrides)
  g = run.config["generate"]
  texts = list(prompts) or list(g["prompts"])
  if texts:
    prompt_ids = [[tokenizer.bos_id] + tokenizer.encode(t) for t in texts]
  else:
    data = _lm_data.load_data(run.config, tokenizer, train=False, out=out)
    prompt_ids = [list(p) for p in data.held_out[0][:g["num_prompts"]]]
    texts = [tokenizer.decode(p) for p in prompt_ids]
  buf, prompt_len = lm.prompt_batch(prompt_ids, g["max_new_tokens"],
                                    tokenizer.pad_id)
  if model.max_len is not None and buf.shape[1] - 1 > model.max_len:
    raise ConfigError(
        f"a prompt of {int(prompt_len.max())} tokens plus "
        f"generate.max_new_tokens ({g['max_new_tokens']}) exceeds the model's "
        f"max_len ({model.max_len}).")
  sampling = _lm_data.sampling_config(tokenizer, temperature=g["temperature"],
                                      top_k=g["top_k"], top_p=g["top_p"])
  with errors.during_run():
    gen = jax.jit(lambda v, t, p, k: model.generate(v, t, p, k, sampling))
    result = gen(variables, buf, prompt_len,
                 jax.random.PRNGKey(run.config["seed"]))
    tokens, lengths = jax.device_get(result)
  samples = []
  for i, text in enumerate(texts):
    # The buffer fits the longest prompt plus max_new_tokens: a shorter
    # prompt's row has room for more, which is not asked for.
    end = min(int(lengths[i]), int(prompt_len[i]) + g["max_new_tokens"])
    cont = tokenizer.decode(tokens[i, prompt_len[i]:end])
    samples.append({"prompt": text, "continuation": cont,
                    "new_tokens": end - int(prompt_len[i])})
    out(f"--- prompt {i}: {text!r}\n{cont}")
  runs.write_json(os.path.join(run_dir, SAMPLES_FILE), {
      "step": run.latest_step(), "sampling": {
          k: g[k] for k in ("temperature", "top_k", "top_p", "max_new_tokens")},
      "samples": samples})
  return samples
