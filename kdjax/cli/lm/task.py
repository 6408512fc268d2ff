"""``kdjax lm train-teacher | distill | eval | generate``.

A training command reads top to bottom, one phase per function, and hands
the loop to the trainer the image commands share (:mod:`kdjax.cli.trainer`:
restore, loop, evaluate, save, progress, metrics, signals)::

  lm_data          corpus (local files) -> tokenizer -> windows of seq_len + 1
                   ids -> resumable shuffled batches (kdjax.lm.make_lm_batch)
  load_teacher     lm distill: the teacher run's model and variables (its
                   tokenizer must be the student's)
  build_lm         the student (or teacher) model: kdjax.lm.DecoderLM or a
                   Tunix Qwen3 / Llama 3 / Gemma 3 (kdjax.cli.lm.models)
  build_objective  the loss terms of distill.objective (kdjax.lm's token KD,
                   lean KD, GKD, sequence KD, or the student's cross-entropy),
                   its hyper-parameters checked on an example batch, the
                   optimizer, the state and the jitted step
  LMEvaluator      held-out perplexity (and the teacher's, and the
                   teacher-student divergence)
  _trainer.run     restore, loop, evaluate, save

``lm eval`` writes eval.json; ``lm generate`` prints sampled continuations.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp

from kdjax.cli import runs
from kdjax import lm

from kdjax.cli.config import lm as _lm_config
from kdjax.cli.lm import data as _lm_data
from kdjax.cli.lm import models as _lm_models
from kdjax.cli import trainer as _trainer
from kdjax.cli import errors
from kdjax.cli.config.base import ConfigError
from kdjax.cli.trainer import Objective

SAMPLES_FILE = "samples.json"


# -----------------------------------------------------------------------------
# Phases.
# -----------------------------------------------------------------------------


@dataclasses.dataclass
class LMData:
  """The corpus split by file, the tokenizer, the train / held-out
  sequences and the resumable training batches."""
  corpus: dict
  tokenizer: "lm.Tokenizer"
  train: tuple
  held_out: tuple
  batches: Optional["lm.LMBatches"]


def lm_data(config: Mapping[str, Any], tokenizer=None, *, train: bool = True,
            out: Callable[[str], None] = print) -> LMData:
  """The data phase (``tokenizer``: a run's own; default: the experiment's)."""
  d = config["data"]
  corpus = _lm_data.read_corpus(d)
  if tokenizer is None:
    tokenizer = _lm_data.build_tokenizer(config, corpus, out)
  held_out = lm.token_windows(corpus["eval"], tokenizer, d["seq_len"],
                              d["prompt_len"], d["max_eval_sequences"])
  if not held_out[0]:
    raise errors.MissingDataError(
        f"the held-out files ({len(corpus['eval'])}) hold no sequence of "
        f"{d['seq_len'] + 1} tokens; add files or lower data.seq_len.")
  train_seqs, batches = ((), None)
  if train:
    train_seqs = lm.token_windows(corpus["train"], tokenizer, d["seq_len"],
                                  d["prompt_len"], d["max_train_sequences"])
    batches = _lm_data.train_batches(*train_seqs, d["batch_size"],
                                     d["seq_len"], tokenizer.pad_id,
                                     config["seed"])
  return LMData(corpus=corpus, tokenizer=tokenizer, train=train_seqs,
                held_out=held_out, batches=batches)


@dataclasses.dataclass
class LMTeacher:
  """A trained teacher: its run, model and variables."""
  path: str
  model: _lm_models.LMModel
  variables: Any


def check_teacher_tokenizer(teacher_tok, student_tok, teacher_path: str
                            ) -> None:
  """:func:`kdjax.lm.check_same_tokenizer`, as a ConfigError naming the
  config keys (and pointing to ULD)."""
  try:
    lm.check_same_tokenizer(teacher_tok, student_tok)
  except lm.TokenizerMismatchError:
    raise ConfigError(
        f"the teacher at {teacher_path} uses another tokenizer "
        f"({teacher_tok.kind}, {teacher_tok.vocab_size} ids) than this run "
        f"({student_tok.kind}, {student_tok.vocab_size} ids): token-level "
        "distillation needs one vocabulary. Use the teacher's tokenizer "
        f"(tokenizer.kind: file, tokenizer.path: {teacher_path}), or distil "
        "across tokenizers with Universal Logit Distillation "
        "(kdjax.lm.make_uld_loss, Python API).") from None


def check_teacher_exists(config: Mapping[str, Any]) -> None:
  """A MissingRunError when the configured teacher is not on disk (checked
  before any data is read)."""
  hf = config["teacher"]["hf_path"]
  if hf:
    if not os.path.exists(os.path.join(hf, "config.json")):
      raise errors.MissingRunError(
          f"config key 'teacher.hf_path': no Hugging Face checkpoint at {hf} "
          "(no config.json).")
    return
  path = _lm_config.teacher_run_dir(config)
  if not os.path.exists(os.path.join(path, runs.RUN_META)):
    raise errors.MissingRunError(
        f"no teacher run at {path}: train one with `kdjax lm train-teacher "
        "--config ...` (same config), or set teacher.run_dir.")


def load_teacher(config: Mapping[str, Any], tokenizer) -> LMTeacher:
  """The Hugging Face teacher of ``teacher.hf_path``, or the teacher run of
  ``teacher.run_dir`` (a MissingRunError if absent)."""
  hf = config["teacher"]["hf_path"]
  if hf:
    model = _lm_models.model_of(config, "teacher", tokenizer.vocab_size)
    ck = _lm_models.load_hf(hf)
    if ck.tokenizer is not None:
      check_teacher_tokenizer(_lm_data.tokenizer_of_file(
          hf, config["tokenizer"]), tokenizer, hf)
    return LMTeacher(path=os.path.abspath(hf), model=model,
                     variables=model.variables)
  check_teacher_exists(config)
  path = _lm_config.teacher_run_dir(config)
  run = _lm_models.read_lm_run(path)
  teacher_tok = _lm_data.tokenizer_of_run(path, run.meta,
                                          run.config["tokenizer"])
  check_teacher_tokenizer(teacher_tok, tokenizer, path)
  model = run.model(tokenizer.vocab_size)
  return LMTeacher(path=os.path.abspath(path), model=model,
                   variables=run.restore(model))


def _sampling_fields(tokenizer) -> dict:
  """The tokenizer's fields of :class:`kdjax.lm.SamplingConfig` (PAD and a
  BOS other than EOS are never sampled)."""
  return dict(vocab_size=tokenizer.vocab_size,
              suppress_ids=tuple(sorted({tokenizer.pad_id, tokenizer.bos_id}
                                        - {tokenizer.eos_id})),
              eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id)


def sampling_config(tokenizer, *, temperature: float, top_k=None, top_p=None):
  return lm.SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p,
                           **_sampling_fields(tokenizer))


def objective_spec(config: Mapping[str, Any], objective: str
                   ) -> "lm.LMObjectiveSpec":
  """``objective`` from :data:`kdjax.lm.LM_OBJECTIVES` with the config's
  ``distill`` values of its hyper-parameters."""
  d = config["distill"]
  return lm.get_lm_objective(
      objective, **{k: d[k] for k in lm.LM_OBJECTIVES[objective].hparams})


def build_objective(config: Mapping[str, Any], objective: str,
                    student: "lm.LMModel",
                    teacher: Optional[LMTeacher], data: LMData, total: int,
                    lr: Optional[float]) -> Objective:
  """The objective phase: loss, optimizer, state and jitted step."""
  from kdjax import train as ktrain  # pylint: disable=g-import-not-at-top
  tok = data.tokenizer
  vocab = tok.vocab_size
  spec = objective_spec(config, objective)
  loss_fn = lm.build_lm_loss(spec, vocab)
  s_apply = student.lean_apply if spec.lean else student.apply
  t_apply = None
  if teacher is not None and spec.needs_teacher:
    t_apply = teacher.model.lean_apply if spec.lean else teacher.model.apply
  example = data.batches.batch_at(0)
  t_vars = teacher.variables if teacher is not None else None

  def loss_on(s_vars, batch):
    s_out = s_apply(s_vars, batch)
    t_out = None if t_apply is None else t_apply(t_vars, batch)
    return loss_fn(s_out, t_out, batch)

  _trainer.check_objective(
      lambda: jax.eval_shape(loss_on, student.variables, example), objective)

  tc = config["train"]
  optimizer, schedule = _trainer.build_optimizer(config["optimizer"], total, lr)
  policy = _trainer.build_policy(tc["precision"])
  key = jax.random.PRNGKey(config["seed"])
  state = ktrain.create_state(student.variables, optimizer,
                              rng=jax.random.fold_in(key, 1), policy=policy)
  step = lm.build_lm_objective_step(
      spec, student.apply, None if teacher is None else teacher.model.apply,
      optimizer, loss_fn=loss_fn, vocab_size=vocab,
      student_lean_apply=student.lean_apply,
      teacher_lean_apply=None if teacher is None else teacher.model.lean_apply,
      student_rollout=student.rollout,
      teacher_rollout=None if teacher is None else teacher.model.rollout,
      sampling_fields=_sampling_fields(tok),
      accumulation_steps=tc["accumulation_steps"], policy=policy,
      checks=tc["checks"])
  return Objective(loss_fn=loss_fn, state=state,
                   train_step=_trainer.finalize(step, checks=tc["checks"]),
                   schedule=schedule, policy=policy)


class LMEvaluator:
  """``evaluate(state or variables)``: held-out token cross-entropy and
  perplexity ``exp(mean CE)`` over the loss-mask tokens; with a teacher, its
  perplexity and the teacher-student divergence (``eval.divergence``,
  temperature 1, mean over the same tokens)."""

  def __init__(self, config: Mapping[str, Any], student: _lm_models.LMModel,
               teacher: Optional[LMTeacher], data: LMData):
    d = config["data"]
    tok = data.tokenizer
    self.batches = lm.padded_eval_batches(*data.held_out, d["eval_batch_size"],
                                         d["seq_len"], tok.pad_id)
    self.num_sequences = len(data.held_out[0])
    self._teacher_vars = None if teacher is None else teacher.variables
    self.divergence = config["eval"]["divergence"]
    vocab = tok.vocab_size
    t_apply = None if teacher is None else teacher.model.apply

    def nll_sum(logits, batch):
      logp = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32)[..., :vocab])
      nll = -jnp.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
      return jnp.sum(nll * batch["loss_mask"])

    def sums(s_vars, t_vars, batch):
      s_logits = student.apply(s_vars, batch).logits
      out = {"nll": nll_sum(s_logits, batch),
             "tokens": jnp.sum(batch["loss_mask"])}
      if t_apply is not None:
        t_logits = t_apply(t_vars, batch).logits
        out["teacher_nll"] = nll_sum(t_logits, batch)
        out["divergence"] = lm.token_divergence_sums(
            jnp.asarray(s_logits, jnp.float32), jnp.asarray(t_logits,
                                                            jnp.float32),
            batch["loss_mask"], vocab_size=vocab,
            divergence=self.divergence)[0]
      return out

    self._sums = jax.jit(sums)

  def __call__(self, state_or_variables) -> dict:
    variables = (state_or_variables.student_variables()
                 if hasattr(state_or_variables, "student_variables")
                 else state_or_variables)
    total = None
    for batch in self.batches:
      s = self._sums(variables, self._teacher_vars, batch)
      total = s if total is None else jax.tree.map(jnp.add, total, s)
    total = {k: float(v) for k, v in jax.device_get(total).items()}
    n = max(total["tokens"], 1.0)
    report = {"loss": total["nll"] / n,
              "perplexity": math.exp(min(total["nll"] / n, 700.0))}
    if "teacher_nll" in total:
      report["teacher_perplexity"] = math.exp(min(total["teacher_nll"] / n,
                                                  700.0))
      report[f"teacher_{self.divergence}"] = total["divergence"] / n
    report["tokens"] = total["tokens"]
    return report


# -----------------------------------------------------------------------------
# The training commands.
# -----------------------------------------------------------------------------


def train(config: dict, *, command: str, side: str, run_dir: str,
          objective: str, teacher_needed: bool, steps: int,
          lr: Optional[float], out: Callable[[str], None] = print) -> int:
  """Trains ``config[side]`` with ``objective``; resumes from ``run_dir``."""
  if teacher_needed:
    check_teacher_exists(config)
  data = lm_data(config, out=out)
  _trainer.check_run_kind(run_dir, side, command)
  teacher = load_teacher(config, data.tokenizer) if teacher_needed else None
  d = config["data"]
  student = _lm_models.model_of(config, side, data.tokenizer.vocab_size)
  obj = build_objective(config, objective, student, teacher, data, steps, lr)
  meta = {"command": command, "model": side, "method": objective,
          "family": config[side]["family"], "size": config[side]["size"],
          "teacher_run": (None if teacher is None or config["teacher"][
              "hf_path"] else teacher.path),
          "teacher_hf": config["teacher"]["hf_path"] if teacher else None,
          "tokenizer": data.tokenizer.kind,
          "tokenizer_fingerprint": data.tokenizer.fingerprint,
          "vocab_size": data.tokenizer.vocab_size,
          "corpus": _lm_data.corpus_fingerprint(data.corpus),
          "num_train_sequences": len(data.train[0]),
          "num_eval_sequences": len(data.held_out[0]),
          "batch_size": d["batch_size"], "seq_len": d["seq_len"],
          "steps": steps}
  _lm_models.write_lm_run(run_dir, config, meta)
  data.tokenizer.save(run_dir)
  evaluate = LMEvaluator(config, student, teacher, data)
  ckpt = _trainer.open_checkpointer(
      run_dir, config, teacher=None if teacher is None else teacher.variables)
  epochs = steps / data.batches.steps_per_epoch
  describe = (
      f"[{command}] {side} {student.description} "
      f"({_lm_models.param_count(student.variables):,} params), objective "
      f"{objective}" + (f", teacher {teacher.path}" if teacher else "")
      + f"; {steps} steps of {d['batch_size']} x {d['seq_len']} tokens "
      f"({epochs:.2f} epochs of {len(data.train[0])} sequences from "
      f"{len(data.corpus['train'])} files); run dir {run_dir}")
  job = _trainer.Job(
      command=command, run_dir=run_dir, model=side, method=objective,
      state=obj.state, train_step=obj.train_step,
      teacher_variables=None if teacher is None else teacher.variables,
      batches=data.batches, total=steps, batch_size=d["batch_size"],
      schedule=obj.schedule, evaluate=evaluate, train_config=config["train"],
      describe=describe,
      eval_description=(f"{evaluate.num_sequences} held-out sequences of "
                        f"{len(data.corpus['eval'])} files"))
  status = _trainer.run(job, ckpt, out)
  if status == 0 and side == "student" and config["distill"]["hf_out"]:
    with errors.during_run():
      write_hf(config, run_dir, student, data.tokenizer, out)
  return status


def train_teacher(config: dict, out: Callable[[str], None] = print) -> int:
  t = config["teacher"]
  return train(config, command="lm train-teacher", side="teacher",
               run_dir=_lm_config.teacher_run_dir(config), objective="ce",
               teacher_needed=False,
               steps=t["steps"] or config["train"]["steps"], lr=t["lr"],
               out=out)


def distill(config: dict, out: Callable[[str], None] = print) -> int:
  objective = config["distill"]["objective"]
  check_hf_out(config, _lm_config.distill_run_dir(config))
  return train(config, command="lm distill", side="student",
               run_dir=_lm_config.distill_run_dir(config), objective=objective,
               teacher_needed=lm.LM_OBJECTIVES[objective].needs_teacher,
               steps=config["train"]["steps"], lr=None, out=out)


HF_EXPORT_FILE = "hf_export.json"


def check_hf_out(config: Mapping[str, Any], run_dir: str) -> None:
  """A ConfigError, before anything runs, when ``distill.hf_out`` would
  overwrite a Hugging Face directory this run did not write: one holding a
  ``config.json`` that is not this run's earlier export (recorded in
  ``<run_dir>/hf_export.json``), unless ``distill.hf_overwrite``. (The
  teacher's own directory is refused by the config's validation.)"""
  d = config["distill"]
  path = d["hf_out"]
  if not path or d["hf_overwrite"]:
    return
  if not os.path.exists(os.path.join(path, "config.json")):
    return
  record = os.path.join(run_dir, HF_EXPORT_FILE)
  if os.path.exists(record):
    try:
      with open(record) as f:
        if _lm_config.same_path(json.load(f)["path"], path):
          return
    except (OSError, ValueError, KeyError, TypeError):
      pass
  raise ConfigError(
      f"config key 'distill.hf_out': {path} already holds a config.json that "
      f"this run ({run_dir}) did not write; choose another directory, or set "
      "distill.hf_overwrite=true to replace its config.json and "
      "model.safetensors.")


def _param_dtype(model) -> Optional[str]:
  """The dtype of a Tunix model's floating-point parameters (None if mixed)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  dtypes = {str(x.dtype) for x in jax.tree.leaves(nnx.state(model, nnx.Param))
            if jnp.issubdtype(x.dtype, jnp.floating)}
  return dtypes.pop() if len(dtypes) == 1 else None


def write_hf(config, run_dir: str, student: _lm_models.LMModel, tokenizer,
             out) -> None:
  """Writes the trained student as a Hugging Face directory (distill.hf_out)."""
  try:
    from kdjax.lm import save_hf_checkpoint  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.MissingDependencyError(
        "distill.hf_out needs kdjax.lm.save_hf_checkpoint (safetensors)."
    ) from e
  from kdjax.lm import rebuild_model  # pylint: disable=g-import-not-at-top
  from tokenizers import Tokenizer  # pylint: disable=g-import-not-at-top
  run = _lm_models.read_lm_run(run_dir)
  variables = run.restore(student)
  model = rebuild_model(student.tunix_model,
                        student.to_nnx(variables)["params"])
  path = config["distill"]["hf_out"]
  hf = config["teacher"]["hf_path"]
  hf_config = None
  dtype = config["distill"]["hf_dtype"]
  if hf:
    ck = _lm_models.load_hf(hf)
    if ck.family == student.family:
      hf_config = ck.hf_config
    if dtype is None:  # a bfloat16 teacher gives a bfloat16 student
      dtype = _param_dtype(ck.model)
  # Recorded first: an export cut short may be retried by the same command.
  runs.write_json(os.path.join(run_dir, HF_EXPORT_FILE),
                  {"path": os.path.abspath(path), "dtype": dtype}, indent=None)
  save_hf_checkpoint(
      path, student.family, model, hf_config=hf_config, dtype=dtype,
      tokenizer=(None if tokenizer.json_text is None
                 else Tokenizer.from_str(tokenizer.json_text)))
  out(f"[lm distill] wrote the student as a Hugging Face checkpoint"
      f"{'' if dtype is None else f' ({dtype})'}: {path}")


# -----------------------------------------------------------------------------
# eval and generate.
# -----------------------------------------------------------------------------


def _run_and_model(run_dir: str, overrides: Sequence[str]):
  run = _lm_models.read_lm_run(run_dir)
  if overrides:
    run.config = _lm_config.load_config(
        [os.path.join(run_dir, runs.CONFIG_FILE)], overrides)
  tokenizer = _lm_data.tokenizer_of_run(run_dir, run.meta,
                                        run.config["tokenizer"])
  model = run.model(tokenizer.vocab_size)
  return run, tokenizer, model, run.restore(model)


def evaluate_run(run_dir: str, teacher_dir: Optional[str] = None, *,
                 use_teacher: bool = True, overrides: Sequence[str] = (),
                 out: Callable[[str], None] = print) -> dict:
  """Held-out perplexity of a run (and its teacher's, and their divergence);
  writes eval.json into the run directory."""
  run, tokenizer, model, variables = _run_and_model(run_dir, overrides)
  teacher = None
  if use_teacher and teacher_dir is None and run.meta.get("teacher_hf"):
    teacher = load_teacher(run.config, tokenizer)
  elif use_teacher:
    teacher_dir = teacher_dir or run.meta.get("teacher_run")
    if teacher_dir:
      t_run = _lm_models.read_lm_run(teacher_dir)
      t_tok = _lm_data.tokenizer_of_run(teacher_dir, t_run.meta,
                                        t_run.config["tokenizer"])
      check_teacher_tokenizer(t_tok, tokenizer, teacher_dir)
      t_model = t_run.model(tokenizer.vocab_size)
      teacher = LMTeacher(path=os.path.abspath(teacher_dir), model=t_model,
                          variables=t_run.restore(t_model))
  data = lm_data(run.config, tokenizer, train=False, out=out)
  with errors.during_run():
    t0 = time.perf_counter()
    report = LMEvaluator(run.config, model, teacher, data)(variables)
    result = {"run": os.path.abspath(run_dir), "step": run.latest_step(),
              "model": model.description,
              "params": _lm_models.param_count(variables),
              "teacher": None if teacher is None else teacher.path,
              "held_out_files": len(data.corpus["eval"]),
              "held_out_sequences": len(data.held_out[0]),
              "eval_s": time.perf_counter() - t0, **report}
    runs.write_json(os.path.join(run_dir, runs.EVAL_FILE), result)
  out(f"[lm eval] {run_dir} (step {result['step']}, {model.description}): "
      f"held-out perplexity {report['perplexity']:.3f} over "
      f"{int(report['tokens'])} tokens"
      + (f"; teacher perplexity {report['teacher_perplexity']:.3f}, "
         f"teacher-student {run.config['eval']['divergence']} "
         f"{report['teacher_' + run.config['eval']['divergence']]:.4f}"
         if teacher is not None else "")
      + f"; {os.path.join(run_dir, runs.EVAL_FILE)}")
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
  check_teacher_exists(own)
  data = lm_data(own, train=False, out=out)
  model = _lm_models.model_of(own, "teacher", data.tokenizer.vocab_size)
  teacher = None
  if teacher_hf:
    if _lm_config.same_path(teacher_hf, hf_dir):
      raise ConfigError(f"--hf {hf_dir} is teacher.hf_path itself; unset "
                        "teacher.hf_path or pass --no-teacher.")
    check_teacher_exists(config)
    teacher = load_teacher(config, data.tokenizer)
  with errors.during_run():
    t0 = time.perf_counter()
    report = LMEvaluator(config, model, teacher, data)(model.variables)
  result = {"hf": os.path.abspath(hf_dir), "model": model.description,
            "params": _lm_models.param_count(model.variables),
            "teacher": None if teacher is None else teacher.path,
            "held_out_files": len(data.corpus["eval"]),
            "held_out_sequences": len(data.held_out[0]),
            "eval_s": time.perf_counter() - t0, **report}
  div = config["eval"]["divergence"]
  out(f"[lm eval] {hf_dir} ({model.description}): held-out perplexity "
      f"{report['perplexity']:.3f} over {int(report['tokens'])} tokens"
      + (f"; teacher perplexity {report['teacher_perplexity']:.3f}, "
         f"teacher-student {div} {report['teacher_' + div]:.4f}"
         if teacher is not None else ""))
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
    data = lm_data(run.config, tokenizer, train=False, out=out)
    prompt_ids = [list(p) for p in data.held_out[0][:g["num_prompts"]]]
    texts = [tokenizer.decode(p) for p in prompt_ids]
  buf, prompt_len = lm.prompt_batch(prompt_ids, g["max_new_tokens"],
                                               tokenizer.pad_id)
  if model.max_len is not None and buf.shape[1] - 1 > model.max_len:
    raise ConfigError(
        f"a prompt of {int(prompt_len.max())} tokens plus "
        f"generate.max_new_tokens ({g['max_new_tokens']}) exceeds the model's "
        f"max_len ({model.max_len}).")
  sampling = sampling_config(tokenizer, temperature=g["temperature"],
                             top_k=g["top_k"], top_p=g["top_p"])
  with errors.during_run():
    gen = jax.jit(lambda v, t, p, k: model.generate(v, t, p, k, sampling))
    result = gen(variables, buf, prompt_len,
                 jax.random.PRNGKey(run.config["seed"]))
    tokens, lengths = jax.device_get(result)
  samples = []
  for i, text in enumerate(texts):
    cont = tokenizer.decode(tokens[i, prompt_len[i]:lengths[i]])
    samples.append({"prompt": text, "continuation": cont})
    out(f"--- prompt {i}: {text!r}\n{cont}")
  runs.write_json(os.path.join(run_dir, SAMPLES_FILE), {
      "step": run.latest_step(), "sampling": {
          k: g[k] for k in ("temperature", "top_k", "top_p", "max_new_tokens")},
      "samples": samples})
  return samples
