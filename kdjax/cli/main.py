"""The ``kdjax`` command line.

::

  kdjax train-teacher --config C.yaml [--set KEY=VALUE ...]  # -> <output_dir>/teacher
  kdjax cache-teacher --config C.yaml [--set ...]            # -> <output_dir>/teacher_cache
  kdjax distill       --config C.yaml [--set ...]            # -> <output_dir>/student_<method>
  kdjax eval RUN_DIR [--teacher TEACHER_RUN] [--set eval.latency_runs=50]
  kdjax export RUN_DIR OUT [--overwrite] [--format all|orbax|jax] [--quantize int8|int4]
  kdjax report RUN_DIR [RUN_DIR ...] --out DIR [--labels A B ...]
  kdjax config [--config C.yaml] [--set ...] [--schema]

Training commands resume from their run directory's newest checkpoint: after
an interrupt, run the same command again. Exit status: 0 on success, 2 for a
usage or config error (printed without a traceback), 1 for a missing or
mismatched run, checkpoint, cache or dataset or a value kdjax rejects (one
line; ``KDJAX_TRACEBACK=1`` shows the traceback), 130/143 after
SIGINT/SIGTERM (a checkpoint is saved first).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Optional, Sequence

from kdjax.cli import config as cfg
from kdjax.cli.config import ConfigError


def _add_config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
  p.add_argument("--config", "-c", action="append", default=[],
                 required=required, metavar="PATH",
                 help="YAML config file (repeat to merge several, in order)")
  _add_set(p)


def _add_set(p: argparse.ArgumentParser) -> None:
  p.add_argument("--set", "-s", nargs="+", action="extend", default=[],
                 metavar="KEY=VALUE",
                 help="override config keys, e.g. --set distill.method=dkd "
                      "optimizer.lr=1e-3 (values read as YAML)")


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="kdjax", description="Knowledge distillation runs with kdjax: "
      "train a teacher, cache its outputs, distill a student, evaluate, "
      "export and plot.",
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog="Config keys: `kdjax config --schema`. Exit status 2: usage or "
      "config error; 1: missing/mismatched run, checkpoint, cache or data.")
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
  return parser


# -----------------------------------------------------------------------------
# Commands.
# -----------------------------------------------------------------------------


def cmd_config(args) -> int:
  if args.schema:
    print(cfg.describe_schema())
    return 0
  print(cfg.dump(cfg.load_config(args.config, args.set)), end="")
  return 0


def cmd_train_teacher(args) -> int:
  from kdjax import methods  # pylint: disable=g-import-not-at-top
  from kdjax.cli import _train  # pylint: disable=g-import-not-at-top
  config = cfg.load_config(args.config, args.set)
  t = config["teacher"]
  return _train.train(
      config, command="train-teacher", run_dir=cfg.teacher_run_dir(config),
      model_key="teacher", spec=methods.get_method("ce"), teacher=None,
      steps=t["steps"] or config["train"]["steps"],
      epochs=t["epochs"] if t["epochs"] is not None
      else config["train"]["epochs"], lr=t["lr"])


def cmd_distill(args) -> int:
  from kdjax.cli import _data  # pylint: disable=g-import-not-at-top
  from kdjax.cli import _train  # pylint: disable=g-import-not-at-top
  config = cfg.load_config(args.config, args.set)
  spec = cfg.method_spec(config)
  source = _data.build_source(config["data"], "train")
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
  from kdjax import cache as kcache  # pylint: disable=g-import-not-at-top
  from kdjax.cli import _data  # pylint: disable=g-import-not-at-top
  from kdjax.cli import _train  # pylint: disable=g-import-not-at-top
  config = cfg.load_config(args.config, args.set)
  spec = cfg.method_spec(config)
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
  from kdjax.cli import _eval  # pylint: disable=g-import-not-at-top
  from kdjax.cli import _models  # pylint: disable=g-import-not-at-top
  run = _models.read_run(args.run_dir)
  if args.set:
    # Overrides apply to the run's own config (eval.*, data.max_eval_examples).
    run.config = cfg.load_config([os.path.join(run.path, _models.CONFIG_FILE)],
                                 args.set)
  teacher = None
  teacher_dir = args.teacher
  if teacher_dir is None and not args.no_teacher:
    default = run.meta.get("teacher_run")
    if default and _models.is_run_dir(default):
      teacher_dir = default
  if teacher_dir is not None and not args.no_teacher:
    teacher = _models.read_run(teacher_dir)
  _eval.evaluate_run(run, teacher)
  return 0


def cmd_export(args) -> int:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from kdjax import checkpoint as kckpt  # pylint: disable=g-import-not-at-top
  from kdjax import train as ktrain  # pylint: disable=g-import-not-at-top
  from kdjax.cli import _models  # pylint: disable=g-import-not-at-top
  quant = None
  if args.quantize != "none":
    from kdjax import compress  # pylint: disable=g-import-not-at-top
    quant = compress.QuantConfig.parse(args.quantize)  # ValueError: exit 1
  run = _models.read_run(args.run_dir)
  step = run.latest_step()
  if step is None:
    raise FileNotFoundError(
        f"the run at {run.path} has no student checkpoint to export (nothing "
        f"in {run.checkpoint_dir}); train it first (`kdjax distill`).")
  if os.path.exists(args.out) and not args.overwrite:
    raise FileExistsError(f"{args.out} exists; pass --overwrite to replace it.")
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


def cmd_report(args) -> int:
  from kdjax.cli import _report  # pylint: disable=g-import-not-at-top
  _report.write_report(args.run_dirs, args.out, args.labels)
  return 0


# -----------------------------------------------------------------------------
# Entry point.
# -----------------------------------------------------------------------------


def _user_errors() -> tuple:
  """Exceptions reported as one line (exit 1): a missing or mismatched
  run, checkpoint, cache or dataset, or a missing optional package
  (matplotlib for ``kdjax report``)."""
  from kdjax.cache import CacheMismatchError  # pylint: disable=g-import-not-at-top
  from kdjax.checkpoint import CheckpointError  # pylint: disable=g-import-not-at-top
  from kdjax.data import DataError  # pylint: disable=g-import-not-at-top
  return (FileNotFoundError, FileExistsError, NotADirectoryError,
          ImportError, CacheMismatchError, CheckpointError, DataError)


def main(argv: Optional[Sequence[str]] = None) -> int:
  """Runs the ``kdjax`` command line; returns the exit status."""
  parser = build_parser()
  try:
    args = parser.parse_args(argv)
  except SystemExit as e:  # --help, or a usage error (already printed)
    return e.code if isinstance(e.code, int) else 2
  try:
    return int(args.func(args) or 0)
  except ConfigError as e:
    print(f"kdjax {args.command}: config error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"kdjax {args.command}: aborted.", file=sys.stderr)
    return 130
  except BrokenPipeError:  # `kdjax eval RUN | head`
    sys.stdout = open(os.devnull, "w")  # pylint: disable=consider-using-with
    return 141
  except Exception as e:  # pylint: disable=broad-except
    if isinstance(e, _user_errors()):
      print(f"kdjax {args.command}: error: {e}", file=sys.stderr)
      return 1
    if (isinstance(e, (ValueError, TypeError, KeyError, FloatingPointError))
        and not os.environ.get("KDJAX_TRACEBACK")):
      # kdjax's own checks (a hyper-parameter out of range, a shape): one
      # line; KDJAX_TRACEBACK=1 shows where.
      text = " ".join(str(e).split("\n-----")[0].split())
      print(f"kdjax {args.command}: error: {type(e).__name__}: {text} "
            "(set KDJAX_TRACEBACK=1 for the traceback)", file=sys.stderr)
      return 1
    raise


if __name__ == "__main__":
  sys.exit(main())
