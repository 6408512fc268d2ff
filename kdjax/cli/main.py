"""The ``kdjax`` command line.

::

  kdjax train-teacher --config C.yaml [--set KEY=VALUE ...]  # -> <output_dir>/teacher
  kdjax cache-teacher --config C.yaml [--set ...]            # -> <output_dir>/teacher_cache
  kdjax distill       --config C.yaml [--set ...]            # -> <output_dir>/student_<method>
  kdjax eval RUN_DIR [--teacher TEACHER_RUN] [--set eval.latency_runs=50]
  kdjax export RUN_DIR OUT [--overwrite] [--format all|orbax|jax] [--quantize int8|int4]
  kdjax report RUN_DIR [RUN_DIR ...] --out DIR [--labels A B ...]
  kdjax config [--config C.yaml] [--set ...] [--schema]

  kdjax lm train-teacher --config L.yaml [--set ...]   # -> <output_dir>/teacher
  kdjax lm distill       --config L.yaml [--set ...]   # -> <output_dir>/student_<objective>
  kdjax lm eval RUN_DIR [--teacher TEACHER_RUN]        # held-out perplexity -> eval.json
  kdjax lm eval --hf HF_DIR [--config L.yaml] [--set ...]  # of a Hugging Face directory
  kdjax lm generate RUN_DIR [--prompt TEXT ...]        # sampled continuations
  kdjax lm plan --config L.yaml [--devices N] [--mesh data=A,fsdp=B] [--device-memory-gib G]
  kdjax lm config [--config L.yaml] [--set ...] [--schema]

Training commands resume from their run directory's newest checkpoint: after
an interrupt, run the same command again.

Exit status (:mod:`kdjax.cli.errors`): 0 on success; 2 for what the user can
fix before the run starts (a bad argument, an unknown config key or method,
bad YAML, a missing config file, teacher run, teacher cache, run directory or
data directory, an impossible batch size, a missing optional package): one
line on stderr, no traceback; 1 for a failure during a run (a NaN, a corrupt
or mismatched checkpoint or cache, an unreadable data file, a value a loss
rejects: one line, ``KDJAX_TRACEBACK=1`` adds the traceback; anything
unexpected: its traceback); 130/143 after SIGINT/SIGTERM (a checkpoint is
saved first).

Start-up: ``kdjax --help`` and ``kdjax config`` import no JAX; each command
imports what it needs once its arguments and config have been read, so a
config error costs no JAX import either.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

from kdjax.cli.config import image as cfg
from kdjax.cli import errors
from kdjax.cli.failures import exit_status, report_error
from kdjax.cli import runs


class _Parser(argparse.ArgumentParser):
  """An ``ArgumentParser`` whose usage errors are one line (exit status 2)."""

  def error(self, message: str):
    self.exit(errors.EXIT_USAGE, f"{self.prog}: error: {message} (see "
              f"`{self.prog} --help`)\n")


_SET_EXAMPLE = "distill.method=dkd optimizer.lr=1e-3"
_LM_SET_EXAMPLE = "distill.objective=gkd optimizer.lr=1e-3"


def _add_config_args(p: argparse.ArgumentParser, required: bool = True,
                     example: str = _SET_EXAMPLE) -> None:
  p.add_argument("--config", "-c", action="append", default=[],
                 required=required, metavar="PATH",
                 help="YAML config file (repeat to merge several, in order)")
  _add_set(p, example)


def _add_set(p: argparse.ArgumentParser, example: str = _SET_EXAMPLE) -> None:
  p.add_argument("--set", "-s", nargs="+", action="extend", default=[],
                 metavar="KEY=VALUE",
                 help=f"override config keys, e.g. --set {example} (values "
                      "read as YAML)")


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(
      prog="kdjax", description="Knowledge distillation runs with kdjax: "
      "train a teacher, cache its outputs, distill a student, evaluate, "
      "export and plot.",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="Config keys: `kdjax config --schema`.\n"
      "Exit status: 2: a usage or config error, or a missing run, teacher,\n"
      "cache or data directory (fix it, then run again); 1: a failure during\n"
      "the run; 130/143: interrupted (a checkpoint was saved first).")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND")
  sub.required = True

  p = sub.add_parser("train-teacher", help="train the teacher model on the "
                     "labels (run dir: teacher.run_dir or <output_dir>/teacher)")
  _add_config_args(p)
  p.set_defaults(func=cmd_train_teacher)

  p = sub.add_parser("cache-teacher", help="run the trained teacher once over "
                     "the training set and store its outputs (cache.dir)")
  _add_config_args(p)
  p.set_defaults(func=cmd_cache_teacher)

  p = sub.add_parser("distill", help="train the student with distill.method "
                     "(ce: the student alone) from the teacher run or cache")
  _add_config_args(p)
  p.set_defaults(func=cmd_distill)

  p = sub.add_parser("eval", help="accuracy, agreement, ECE, parameters and "
                     "latency of a run (and its teacher); writes eval.json")
  p.add_argument("run_dir", metavar="RUN_DIR")
  p.add_argument("--teacher", metavar="TEACHER_RUN", default=None,
                 help="teacher run to compare with (default: the run's "
                      "teacher, if it was distilled from one)")
  p.add_argument("--no-teacher", action="store_true",
                 help="evaluate the run's model alone")
  _add_set(p)
  p.set_defaults(func=cmd_eval)

  p = sub.add_parser("export", help="write the run's student alone for "
                     "inference: its variables (orbax) and a serialized "
                     "jax.export artifact + .npz + a loader that needs jax, "
                     "not kdjax (OUT/inference)")
  p.add_argument("run_dir", metavar="RUN_DIR")
  p.add_argument("out", metavar="OUT")
  p.add_argument("--overwrite", action="store_true")
  p.add_argument("--format", choices=("all", "orbax", "jax"), default="all",
                 help="all (default): the orbax variables in OUT and the "
                      "jax.export artifact in OUT/inference; orbax: the "
                      "variables only; jax: the artifact only, in OUT")
  p.add_argument("--quantize", default="none", metavar="Q",
                 help="store the artifact's kernels quantised: none "
                      "(default), int8 (= w8a8: int8 per-channel weights and "
                      "int8 activations), int4 (= w4: int4 weights), w8, w4a8")
  p.add_argument("--platforms", nargs="+", default=["cpu", "cuda"],
                 help="lowering platforms of the artifact (default: cpu cuda)")
  p.set_defaults(func=cmd_export)

  p = sub.add_parser("report", help="PNG learning curves and reliability "
                     "diagrams of several runs, and a summary table")
  p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
  p.add_argument("--out", required=True, metavar="DIR")
  p.add_argument("--labels", nargs="+", default=None,
                 help="one legend label per run (default: directory names)")
  p.set_defaults(func=cmd_report)

  p = sub.add_parser("config", help="print the resolved config (or the "
                     "documented schema with --schema)")
  _add_config_args(p, required=False)
  p.add_argument("--schema", action="store_true",
                 help="every key with its default and meaning")
  p.set_defaults(func=cmd_config)

  _add_lm_parser(sub)
  return parser


def _add_lm_parser(sub) -> None:
  """``kdjax lm ...``: the language-model commands (their own config,
  ``kdjax lm config --schema``)."""
  lm = sub.add_parser(
      "lm", help="language models: train a teacher, distill a student "
      "(token KD, lean KD, GKD, sequence KD), evaluate, sample",
      description="Language-model distillation from a YAML config (`kdjax lm "
      "config --schema`): a corpus of local text files (default: the Python "
      "standard library's sources), a tokenizer trained locally or read from "
      "a tokenizer.json, kdjax's DecoderLM or Tunix's Qwen3 / Llama 3 / "
      "Gemma 3. Training commands resume from their run directory's newest "
      "checkpoint.")
  lsub = lm.add_subparsers(dest="lm_command", metavar="LM_COMMAND")
  lsub.required = True
  p = lsub.add_parser("train-teacher", help="train the teacher on the corpus "
                      "(run dir: teacher.run_dir or <output_dir>/teacher)")
  _add_config_args(p, example=_LM_SET_EXAMPLE)
  p.set_defaults(func=cmd_lm_train_teacher)
  p = lsub.add_parser("distill", help="train the student with "
                      "distill.objective from the teacher run (run dir: "
                      "<output_dir>/student_<objective>)")
  _add_config_args(p, example=_LM_SET_EXAMPLE)
  p.set_defaults(func=cmd_lm_distill)
  p = lsub.add_parser("eval", help="held-out perplexity of a run (and its "
                      "teacher's, and their divergence); writes eval.json. "
                      "With --hf: of a Hugging Face checkpoint directory "
                      "(e.g. a distill.hf_out export) on the held-out files "
                      "of --config, against its teacher.hf_path if set")
  p.add_argument("run_dir", metavar="RUN_DIR", nargs="?", default=None)
  p.add_argument("--hf", metavar="HF_DIR", default=None,
                 help="evaluate this Hugging Face directory (config.json, "
                      "*.safetensors, tokenizer.json) instead of a run")
  p.add_argument("--config", "-c", action="append", default=[],
                 metavar="PATH", help="--hf: the YAML config of the corpus "
                 "(and teacher.hf_path to compare with)")
  p.add_argument("--teacher", metavar="TEACHER_RUN", default=None,
                 help="teacher run to compare with (default: the run's "
                      "teacher)")
  p.add_argument("--no-teacher", action="store_true",
                 help="evaluate the run's model alone")
  _add_set(p, _LM_SET_EXAMPLE)
  p.set_defaults(func=cmd_lm_eval)
  p = lsub.add_parser("generate", help="print sampled continuations of "
                      "prompts (default: held-out prompts); writes "
                      "samples.json")
  p.add_argument("run_dir", metavar="RUN_DIR")
  p.add_argument("--prompt", "-p", action="append", default=[],
                 metavar="TEXT", help="a prompt (repeat for several)")
  _add_set(p, _LM_SET_EXAMPLE)
  p.set_defaults(func=cmd_lm_generate)
  p = lsub.add_parser(
      "plan", help="the memory per device of the lm distill step on a mesh: "
      "compiled on abstract shapes (no weights) for simulated CPU devices, "
      "an estimate to check on the GPU",
      description="Compiles the step `kdjax lm distill` would run "
      "(distill.objective, train.precision, data.batch_size x data.seq_len) "
      "for --devices simulated CPU devices, with abstract variables (no "
      "weight is allocated), and prints per device: teacher parameters, "
      "student parameters, optimizer state, batch, XLA's activations/"
      "temporaries and the total against --device-memory-gib. The student "
      "is FSDP-sharded over 'fsdp' (replicated on a mesh of 'data' alone), "
      "the teacher split over the whole mesh, the batch over data x fsdp. "
      "The temporaries are XLA:CPU's: an estimate (GPU fusion, scheduling "
      "and attention kernels differ) to check against a GPU measurement.")
  _add_config_args(p, example=_LM_SET_EXAMPLE)
  p.add_argument("--devices", type=int, default=8, metavar="N",
                 help="devices of the target mesh (default 8)")
  p.add_argument("--mesh", default=None, metavar="AXIS=SIZE,...",
                 help="mesh axes data and fsdp, their sizes multiplying to "
                      "--devices (default fsdp=N), e.g. data=2,fsdp=4")
  p.add_argument("--device-memory-gib", type=float, default=80.0,
                 metavar="G", help="memory of one device to compare with "
                 "(default 80)")
  p.set_defaults(func=cmd_lm_plan)
  p = lsub.add_parser("config", help="print the resolved LM config (or its "
                      "schema with --schema)")
  _add_config_args(p, required=False, example=_LM_SET_EXAMPLE)
  p.add_argument("--schema", action="store_true",
                 help="every key with its default and meaning")
  p.set_defaults(func=cmd_lm_config)


# -----------------------------------------------------------------------------
# Commands.
# -----------------------------------------------------------------------------


def _show_config(config_module, args) -> int:
  """``kdjax [lm] config``: the schema, or the resolved config of the files."""
  if args.schema:
    print(config_module.describe_schema())
  else:
    print(cfg.dump(config_module.load_config(args.config, args.set)), end="")
  return 0


def cmd_config(args) -> int:
  return _show_config(cfg, args)


def cmd_train_teacher(args) -> int:
  config = cfg.load_config(args.config, args.set)
  from kdjax import methods  # pylint: disable=g-import-not-at-top
  from kdjax.cli.image import task as _train  # pylint: disable=g-import-not-at-top
  t = config["teacher"]
  return _train.train(
      config, command="train-teacher", run_dir=cfg.teacher_run_dir(config),
      model_key="teacher", spec=methods.get_method("ce"), teacher=None,
      steps=t["steps"] or config["train"]["steps"],
      epochs=t["epochs"] if t["epochs"] is not None
      else config["train"]["epochs"], lr=t["lr"])


def cmd_distill(args) -> int:
  config = cfg.load_config(args.config, args.set)
  spec = cfg.method_spec(config)
  from kdjax.cli.image import data as _data  # pylint: disable=g-import-not-at-top
  source = _data.build_source(config["data"], "train")
  from kdjax.cli.image import task as _train  # pylint: disable=g-import-not-at-top
  teacher = None
  if spec.recipe == "distill":
    names = spec.feature_names()["teacher"]
    if config["distill"]["teacher"] == "cache":
      teacher = _train.load_cache_teacher(config, names, len(source))
    else:
      teacher = _train.load_online_teacher(config, names,
                                           _train.image_shape_of(source))
  return _train.train(
      config, command="distill", run_dir=cfg.distill_run_dir(config),
      model_key="student", spec=spec, teacher=teacher,
      steps=config["train"]["steps"], epochs=config["train"]["epochs"],
      lr=None, source=source)


def cmd_cache_teacher(args) -> int:
  config = cfg.load_config(args.config, args.set)
  spec = cfg.method_spec(config)
  from kdjax import cache as kcache  # pylint: disable=g-import-not-at-top
  from kdjax.cli.image import data as _data  # pylint: disable=g-import-not-at-top
  from kdjax.cli.image import task as _train  # pylint: disable=g-import-not-at-top
  c = config["cache"]
  if c["features"] is not None:
    names = tuple(n.strip() for n in c["features"].split(",") if n.strip())
  else:
    names = spec.feature_names()["teacher"]
  temperature = float(spec.hparams.get("temperature", 1.0))
  data = config["data"]
  source = _data.build_source(data, "train")
  teacher = _train.load_online_teacher(config, names,
                                       _train.image_shape_of(source))
  path = cfg.cache_dir(config)
  dataset = _data.dataset_name(data, "train")
  if os.path.exists(os.path.join(path, "manifest.json")):
    try:
      existing = kcache.open_teacher_cache(
          path, teacher_variables=teacher.variables,
          dataset_fingerprint=dataset, k=c["k"],
          temperature=temperature if c["k"] is not None else None)
      if set(names) <= set(existing.feature_names):
        print(f"[cache-teacher] {path} is up to date ({existing.num_examples} "
              f"examples, teacher {teacher.path}); nothing to do.")
        return 0
      print(f"[cache-teacher] {path} lacks features {sorted(set(names) - set(existing.feature_names))}; rebuilding.")
    except kcache.CacheMismatchError as e:
      print(f"[cache-teacher] rebuilding {path}: {e}")
  t0 = time.perf_counter()
  tc = kcache.build_teacher_cache(
      path, teacher.apply, teacher.variables,
      _data.ordered_batches(data, source, c["batch_size"]), k=c["k"],
      temperature=temperature, feature_names=names,
      batch_size=c["batch_size"], dataset_fingerprint=dataset,
      teacher_name=teacher.path, overwrite=True)
  size = sum(os.path.getsize(os.path.join(path, s["file"]))
             for s in tc.manifest["shards"])
  print(f"[cache-teacher] cached the teacher {teacher.path} over "
        f"{tc.num_examples} examples ({'full logits' if tc.k is None else f'top-{tc.k}'}"
        f"{', features ' + ', '.join(names) if names else ''}) in "
        f"{time.perf_counter() - t0:.1f} s: {path} ({size / 2**20:.1f} MiB)")
  return 0


def cmd_eval(args) -> int:
  runs.check_kind(args.run_dir, lm=False)
  if args.teacher is not None and not args.no_teacher:
    runs.check_kind(args.teacher, lm=False)
  from kdjax.cli.image import evaluate as _eval  # pylint: disable=g-import-not-at-top
  _eval.evaluate_run_dir(args.run_dir, teacher_dir=args.teacher,
                         no_teacher=args.no_teacher, overrides=args.set or ())
  return 0


def cmd_export(args) -> int:
  runs.check_kind(args.run_dir, lm=False)
  if os.path.exists(args.out) and not args.overwrite:
    raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it.")
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from kdjax import checkpoint as kckpt  # pylint: disable=g-import-not-at-top
  from kdjax import train as ktrain  # pylint: disable=g-import-not-at-top
  from kdjax.cli.image import models as _models  # pylint: disable=g-import-not-at-top
  quant = None
  if args.quantize != "none":
    from kdjax import compress  # pylint: disable=g-import-not-at-top
    try:
      quant = compress.QuantConfig.parse(args.quantize)
    except ValueError as e:
      raise errors.UsageError(f"--quantize {args.quantize}: {e}") from None
  run = _models.read_run(args.run_dir)
  step = run.latest_step()
  if step is None:
    raise errors.MissingRunError(
        f"the run at {run.path} has no student checkpoint to export (nothing "
        f"in {run.checkpoint_dir}); train it first (`kdjax distill`).")
  variables = run.restore_variables()
  what = (f"{run.meta.get('model', 'student')} of {run.path} at step {step} "
          f"({run.model_config['arch']}, "
          f"{_models.param_count(variables):,} params)")
  if args.format in ("all", "orbax"):
    params, rest = ktrain.split_variables(variables)
    # export_student reads the student's variables and step from a state; the
    # optimizer and loss parts are not needed (and never exported).
    state = ktrain.DistillState(step=jnp.asarray(step, jnp.int32),
                                params=params, model_state=rest,
                                loss_params={}, opt_state=(), loss_state={},
                                rng=jax.random.PRNGKey(0))
    path = kckpt.export_student(state, args.out, overwrite=args.overwrite)
    print(f"[export] {what} -> {path}")
  if args.format in ("all", "jax"):
    from kdjax import compress  # pylint: disable=g-import-not-at-top
    target = (os.path.join(args.out, "inference") if args.format == "all"
              else args.out)
    apply = _models.make_apply(run.module())
    compress.export_for_inference(
        apply, jax.device_get(variables), target,
        input_shape=run.image_shape, quantize=quant,
        platforms=tuple(args.platforms), overwrite=True,
        metadata={"run": os.path.abspath(run.path), "step": int(step),
                  "model": run.meta.get("model", "student"),
                  "arch": run.model_config["arch"],
                  "preprocessing": "image = (pixels / 255 - "
                  f"{run.config['data']['mean']}) / {run.config['data']['std']}"})
    print(f"[export] {what} as jax.export ("
          f"{quant.name if quant else 'float32'}, "
          f"{compress.directory_size(target) / 1024:.1f} KiB) -> {target}; "
          f"run: python {os.path.join(target, 'run_exported.py')}")
  return 0


def cmd_lm_config(args) -> int:
  from kdjax.cli.config import lm as _lm_config  # pylint: disable=g-import-not-at-top
  return _show_config(_lm_config, args)


def cmd_lm_train_teacher(args) -> int:
  from kdjax.cli.config import lm as _lm_config  # pylint: disable=g-import-not-at-top
  config = _lm_config.load_config(args.config, args.set)
  from kdjax.cli.lm import task as _lm_train  # pylint: disable=g-import-not-at-top
  return _lm_train.train_teacher(config)


def cmd_lm_distill(args) -> int:
  from kdjax.cli.config import lm as _lm_config  # pylint: disable=g-import-not-at-top
  config = _lm_config.load_config(args.config, args.set)
  from kdjax.cli.lm import task as _lm_train  # pylint: disable=g-import-not-at-top
  return _lm_train.distill(config)


def cmd_lm_plan(args) -> int:
  from kdjax.cli.config import lm as _lm_config  # pylint: disable=g-import-not-at-top
  from kdjax.cli.lm import plan as _lm_plan  # pylint: disable=g-import-not-at-top
  axes = _lm_plan.parse_mesh(args.mesh, args.devices)
  if args.device_memory_gib <= 0:
    raise errors.UsageError("--device-memory-gib must be positive, got "
                            f"{args.device_memory_gib}.")
  config = _lm_config.load_config(args.config, args.set)
  return _lm_plan.run(config, devices=args.devices, axes=axes,
                      device_memory_gib=args.device_memory_gib)


def cmd_lm_eval(args) -> int:
  if args.hf is not None:
    if args.run_dir is not None or args.teacher is not None:
      raise errors.UsageError("give RUN_DIR or --hf HF_DIR, not both (the "
                              "teacher of --hf is the config's "
                              "teacher.hf_path).")
    from kdjax.cli.lm import evaluate as _lm_evaluate  # pylint: disable=g-import-not-at-top
    _lm_evaluate.evaluate_hf(args.hf, args.config, overrides=args.set,
                          use_teacher=not args.no_teacher)
    return 0
  if args.run_dir is None:
    raise errors.UsageError("give a run directory (RUN_DIR) or a Hugging "
                            "Face directory (--hf HF_DIR).")
  if args.config:
    raise errors.UsageError("--config is for --hf; a run directory has its "
                            "own config.yaml (change keys with --set).")
  runs.check_kind(args.run_dir, lm=True)
  if args.teacher is not None and not args.no_teacher:
    runs.check_kind(args.teacher, lm=True)
  from kdjax.cli.lm import evaluate as _lm_evaluate  # pylint: disable=g-import-not-at-top
  _lm_evaluate.evaluate_run(args.run_dir, args.teacher,
                         use_teacher=not args.no_teacher, overrides=args.set)
  return 0


def cmd_lm_generate(args) -> int:
  runs.check_kind(args.run_dir, lm=True)
  from kdjax.cli.lm import evaluate as _lm_evaluate  # pylint: disable=g-import-not-at-top
  _lm_evaluate.generate_run(args.run_dir, args.prompt, overrides=args.set)
  return 0


def cmd_report(args) -> int:
  if args.labels and len(args.labels) != len(args.run_dirs):
    raise errors.UsageError(f"--labels gives {len(args.labels)} names for "
                            f"{len(args.run_dirs)} runs.")
  from kdjax.cli.image import report as _report  # pylint: disable=g-import-not-at-top
  _report.write_report(args.run_dirs, args.out, args.labels)
  return 0


# -----------------------------------------------------------------------------
# Entry point.
# -----------------------------------------------------------------------------

def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the ``kdjax`` command line; returns the exit status."""
  parser = build_parser()
  try:
    args = parser.parse_args(argv)
  except SystemExit as e:  # --help, or a usage error (already printed)
    return exit_status(e)
  command = args.command
  if command == "lm":
    command = f"lm {args.lm_command}"
  try:
    return int(args.func(args) or 0)
  except KeyboardInterrupt:
    print(f"kdjax {command}: aborted.", file=sys.stderr)
    return errors.EXIT_SIGINT
  except BrokenPipeError:  # `kdjax eval RUN | head`
    sys.stdout = open(os.devnull, "w")  # pylint: disable=consider-using-with
    return 141
  except Exception as e:  # pylint: disable=broad-except
    status = report_error(command, e)
    if status is None:
      raise
    return status


if __name__ == "__main__":
  sys.exit(main())
