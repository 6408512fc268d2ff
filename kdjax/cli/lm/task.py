"""``kdjax lm train-teacher`` and ``kdjax lm distill``.

:func:`train` reads top to bottom, one phase a line, each phase in the module
that owns it, and hands the loop to the trainer the image commands share
(:mod:`kdjax.cli.trainer`: restore, loop, evaluate, save, progress, metrics,
signals)::

  checks           the run directory holds no other model's run; the teacher
                   is on disk (before any data is read)
  data.load_data   corpus (text windows of seq_len + 1 ids, or one example per
                   record / assistant turn) -> tokenizer -> (token cache) ->
                   resumable shuffled batches (kdjax.lm.LMBatches, packed)
  models           the teacher (a Hugging Face checkpoint or a teacher run;
                   its tokenizer must be the student's) and the student:
                   kdjax.lm.DecoderLM or a Tunix Qwen3 / Llama 3 / Gemma 3
  build_objective  the loss of distill.objective from kdjax.lm's registry
                   (token KD, lean KD, GKD, sequence KD, or cross-entropy),
                   its hyper-parameters checked on an example batch, the
                   optimizer, the state and the jitted step
  evaluate         held-out perplexity (and the teacher's, and the
                   teacher-student divergence): evaluate.LMEvaluator
  trainer.run      restore, loop, evaluate, save
  export           distill.hf_out: the student as a Hugging Face directory

The run directories are resolved once, from the config, by the two commands.
``lm eval`` and ``lm generate`` are in :mod:`kdjax.cli.lm.evaluate`.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import jax

from kdjax import lm
from kdjax.cli import errors
from kdjax.cli import trainer as _trainer
from kdjax.cli.config import lm as _lm_config
from kdjax.cli.lm import data as _lm_data
from kdjax.cli.lm import evaluate as _lm_evaluate
from kdjax.cli.lm import export as _lm_export
from kdjax.cli.lm import models as _lm_models
from kdjax.cli.config.base import ConfigError
from kdjax.cli.trainer import Objective


# -----------------------------------------------------------------------------
# Phases.
# -----------------------------------------------------------------------------


def objective_spec(config: Mapping[str, Any], objective: str
                   ) -> "lm.LMObjectiveSpec":
  """``objective`` from :data:`kdjax.lm.LM_OBJECTIVES` with the config's
  ``distill`` values of its hyper-parameters."""
  d = config["distill"]
  return lm.get_lm_objective(
      objective, **{k: d[k] for k in lm.LM_OBJECTIVES[objective].hparams})


def build_objective(config: Mapping[str, Any], objective: str,
                    student: "lm.LMModel",
                    teacher: Optional[_lm_models.LMTeacher],
                    data: _lm_data.LMData, total: int,
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
      sampling_fields=_lm_data.sampling_fields(tok),
      accumulation_steps=tc["accumulation_steps"], policy=policy,
      checks=tc["checks"])
  return Objective(loss_fn=loss_fn, state=state,
                   train_step=_trainer.finalize(step, checks=tc["checks"]),
                   schedule=schedule, policy=policy)


# -----------------------------------------------------------------------------
# The training commands.
# -----------------------------------------------------------------------------


def run_meta(config: Mapping[str, Any], *, command: str, side: str,
             objective: str, teacher: Optional[_lm_models.LMTeacher],
             data: _lm_data.LMData, steps: int) -> dict:
  """run.json of a training run (what ``lm eval`` and ``report`` read)."""
  d = config["data"]
  hf = config["teacher"]["hf_path"]
  return {"command": command, "model": side, "method": objective,
          "family": config[side]["family"], "size": config[side]["size"],
          "teacher_run": None if teacher is None or hf else teacher.path,
          "teacher_hf": hf if teacher else None,
          "tokenizer": data.tokenizer.kind,
          "tokenizer_fingerprint": data.tokenizer.fingerprint,
          "vocab_size": data.tokenizer.vocab_size,
          "corpus": data.data_fingerprint,
          "num_train_sequences": len(data.train[0]),
          "num_eval_sequences": len(data.held_out[0]),
          "batch_size": d["batch_size"], "seq_len": d["seq_len"],
          "packed": d["pack"],
          "packing_efficiency": data.packing_efficiency, "steps": steps}


def train(config: dict, *, command: str, side: str, run_dir: str,
          teacher_dir: Optional[str], objective: str, teacher_needed: bool,
          steps: int, lr: Optional[float],
          out: Callable[[str], None] = print) -> int:
  """Trains ``config[side]`` with ``objective`` in ``run_dir`` (resuming
  it), distilling from the teacher of ``teacher.hf_path`` or the teacher run
  in ``teacher_dir`` when ``teacher_needed``."""
  if config["data"]["pack"] and lm.LM_OBJECTIVES[objective].rollout:
    raise ConfigError(
        f"config key 'data.pack' is not for objective {objective} (it "
        "generates from each row's prompt); set data.pack=false.")
  _trainer.check_run_kind(run_dir, side, command)
  data = _lm_data.load_data(config, teacher=teacher_needed,
                            teacher_dir=teacher_dir, out=out)
  teacher = (_lm_models.load_teacher(config, data.tokenizer.vocab_size,
                                     teacher_dir) if teacher_needed else None)
  student = _lm_models.model_of(config, side, data.tokenizer.vocab_size)
  obj = build_objective(config, objective, student, teacher, data, steps, lr)
  evaluate = _lm_evaluate.LMEvaluator(config, student, teacher, data)
  _lm_models.write_lm_run(run_dir, config, run_meta(
      config, command=command, side=side, objective=objective,
      teacher=teacher, data=data, steps=steps))
  data.tokenizer.save(run_dir)
  d = config["data"]
  epochs = steps / data.batches.steps_per_epoch
  describe = (
      f"[{command}] {side} {student.description} "
      f"({_lm_models.param_count(student.variables):,} params), objective "
      f"{objective}" + (f", teacher {teacher.path}" if teacher else "")
      + f"; {steps} steps of {d['batch_size']} x {d['seq_len']} tokens "
      f"({epochs:.2f} epochs of {len(data.train[0])} sequences from "
      + (f"{len(data.corpus['files']['train'])} files"
         if data.corpus["train_read"] else "the token cache")
      + f"); run dir {run_dir}")
  teacher_variables = None if teacher is None else teacher.variables
  job = _trainer.Job(
      command=command, run_dir=run_dir, model=side, method=objective,
      state=obj.state, train_step=obj.train_step,
      teacher_variables=teacher_variables, batches=data.batches, total=steps,
      batch_size=d["batch_size"], schedule=obj.schedule, evaluate=evaluate,
      train_config=config["train"], describe=describe,
      eval_description=(f"{evaluate.num_sequences} held-out sequences of "
                        f"{len(data.corpus['files']['eval'])} files"))
  ckpt = _trainer.open_checkpointer(run_dir, config, teacher=teacher_variables)
  status = _trainer.run(job, ckpt, out)
  if status == 0 and side == "student" and config["distill"]["hf_out"]:
    with errors.during_run():
      _lm_export.write_hf(config, run_dir, student, data.tokenizer, out)
  return status


def train_teacher(config: dict, out: Callable[[str], None] = print) -> int:
  """``kdjax lm train-teacher``: the teacher trained on the corpus."""
  t = config["teacher"]
  return train(config, command="lm train-teacher", side="teacher",
               run_dir=_lm_config.teacher_run_dir(config), teacher_dir=None,
               objective="ce", teacher_needed=False,
               steps=t["steps"] or config["train"]["steps"], lr=t["lr"],
               out=out)


def distill(config: dict, out: Callable[[str], None] = print) -> int:
  """``kdjax lm distill``: the student trained with ``distill.objective``."""
  objective = config["distill"]["objective"]
  run_dir = _lm_config.distill_run_dir(config)
  teacher_dir = _lm_config.teacher_run_dir(config)
  _lm_export.check_hf_out(config, run_dir)
  return train(config, command="lm distill", side="student", run_dir=run_dir,
               teacher_dir=teacher_dir, objective=objective,
               teacher_needed=lm.LM_OBJECTIVES[objective].needs_teacher,
               steps=config["train"]["steps"], lr=None, out=out)
