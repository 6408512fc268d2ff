"""``kdjax report``: learning curves and reliability diagrams as PNG files.

Every run given that has no ``eval.json`` is evaluated first, as ``kdjax eval
RUN`` would (against the teacher run it was distilled from, when that is
still there); a run that cannot be evaluated (no checkpoint, data or teacher
missing) is reported with a message saying how to evaluate it, and the report
goes on without its eval. Then:

* ``loss.png``: the training objective (``loss``) of every run against the
  step, and one panel per loss term the runs log (``ce``, ``kd``, ``dkd``,
  ``hint``, ...: every key with a ``weight/<term>`` beside it in
  ``metrics.jsonl``), unweighted, so that a term compares across methods;
* ``accuracy.png``: the evaluation accuracy of every run against the step
  (runs evaluated only at the end show one point), and each teacher's
  accuracy as a dashed horizontal line (from ``eval.json``, else from the
  training-time evals);
* ``reliability.png``: per run with an ``eval.json``, the reliability
  diagram (accuracy per confidence bin against the diagonal, the student's
  bars and the teacher's outline), with the ECE in the title;
* ``summary.md``: a table of each run's final numbers (also printed).

matplotlib is imported inside the figure functions (``pip install
"kdjax[plots]"``), through its object-oriented API only (no pyplot state, no
display needed).
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional, Sequence

from kdjax.cli.runs import EVAL_FILE, RUN_META, SUMMARY_FILE, is_run_dir
from kdjax.cli.image import evaluate as _eval
from kdjax.cli import metrics_log as _logging
from kdjax.cli.image import models as _models
from kdjax.cli import errors


def _load_json(path: str) -> Optional[dict]:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _series(records, split: str, key: str) -> tuple[list, list]:
  points = [(r["step"], r[key]) for r in records
            if r.get("split") == split and isinstance(r.get(key), (int, float))]
  points.sort()
  return [p[0] for p in points], [p[1] for p in points]


def summary_table(runs: Sequence[dict]) -> str:
  """A markdown table of the runs' final numbers."""
  lines = ["| run | method | steps | train loss | accuracy | teacher acc. | "
           "agreement | ECE | params | latency b=1 (ms) |",
           "|---|---|---|---|---|---|---|---|---|---|"]

  def num(v, fmt="{:.4f}"):
    return "-" if v is None else fmt.format(v)

  for run in runs:
    summary = run["summary"] or {}
    ev = run["eval"] or {}
    final = summary.get("eval", {})
    student = ev.get("student", {})
    latency = student.get("latency_ms", {})
    lines.append("| " + " | ".join([
        run["label"], str(run["meta"].get("method", "-")),
        str(summary.get("step", "-")),
        num(summary.get("train", {}).get("loss")),
        num(student.get("accuracy", final.get("accuracy"))),
        num(ev.get("teacher", {}).get("accuracy",
                                       final.get("teacher_accuracy"))),
        num(ev.get("agreement", final.get("agreement"))),
        num(student.get("ece")),
        num(student.get("params"), "{:,}"),
        num(latency.get("1"), "{:.3f}")]) + " |")
  return "\n".join(lines)


def _reliability(ax, model: dict, label: str, filled: bool) -> None:
  rel = model["reliability"]
  width = rel["bin_upper"][0] - rel["bin_lower"][0]
  centers = [lo + width / 2 for lo in rel["bin_lower"]]
  acc = [a if a is not None else 0.0 for a in rel["accuracy"]]
  if filled:
    ax.bar(centers, acc, width=width, alpha=0.7, edgecolor="black",
           linewidth=0.5, label=f"{label} (ECE {model['ece']:.3f})")
  else:
    ax.bar(centers, acc, width=width, fill=False, edgecolor="tab:red",
           linewidth=1.0, label=f"{label} (ECE {model['ece']:.3f})")


def _import_figure():
  try:
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise errors.MissingDependencyError(
        "kdjax report draws with matplotlib: pip install 'kdjax[plots]' (or "
        "matplotlib).") from e
  return Figure


def evaluate_missing(run_dirs: Sequence[str],
                     out: Callable[[str], None] = print) -> list[str]:
  """Runs ``kdjax eval`` on every run of ``run_dirs`` without an ``eval.json``.

  A run that cannot be evaluated is skipped with a message that says why and
  how to evaluate it. Returns the runs evaluated.
  """
  done = []
  for path in run_dirs:
    if os.path.exists(os.path.join(path, EVAL_FILE)):
      continue
    how = (f"evaluate it with `kdjax eval {path}` (`--teacher TEACHER_RUN` to "
           "compare it with a teacher) and run the report again")
    if not is_run_dir(path):
      out(f"[report] {path} has no {EVAL_FILE} and is not a run "
          f"directory (no {RUN_META}): its eval is left out of the "
          "report.")
      continue
    try:
      run = _models.read_run(path)
      if run.latest_step() is None:
        out(f"[report] {path} has no {EVAL_FILE} and no checkpoint to "
            f"evaluate (nothing in {run.checkpoint_dir}): its eval is left "
            "out; train it, then " + how + ".")
        continue
      teacher_dir = _eval.default_teacher_dir(run)
      if run.meta.get("teacher_run") and teacher_dir is None:
        out(f"[report] the teacher run {run.meta['teacher_run']} of {path} is "
            "gone: evaluating the run alone (`kdjax eval RUN --teacher "
            "TEACHER_RUN` compares it with another).")
      out(f"[report] {path} has no {EVAL_FILE}: evaluating it"
          + (f" against its teacher {teacher_dir}" if teacher_dir else "")
          + ".")
      _eval.evaluate_run_dir(path, teacher_dir=teacher_dir,
                             no_teacher=teacher_dir is None, out=out)
      done.append(path)
    except Exception as e:  # pylint: disable=broad-except
      text = " ".join(str(e).split())
      out(f"[report] could not evaluate {path} ({type(e).__name__}: {text}); "
          f"its eval is left out of the report: {how}.")
  return done


def load_runs(run_dirs: Sequence[str],
              labels: Optional[Sequence[str]] = None) -> list[dict]:
  """Reads each run's metrics, run.json, summary.json and eval.json."""
  if labels and len(labels) != len(run_dirs):
    raise errors.UsageError(f"--labels gives {len(labels)} names for "
                            f"{len(run_dirs)} runs.")
  runs = []
  for i, path in enumerate(run_dirs):
    if not os.path.isdir(path):
      raise errors.MissingRunError(f"no run directory {path}.")
    records = _logging.read_metrics(path)
    if not records and not os.path.exists(os.path.join(path,
                                                        EVAL_FILE)):
      raise errors.MissingRunError(
          f"{path} has neither {_logging.METRICS_FILE} nor "
          f"{EVAL_FILE}: not a kdjax run.")
    runs.append({
        "path": path,
        "label": labels[i] if labels else os.path.basename(
            os.path.normpath(path)),
        "records": records,
        "meta": _load_json(os.path.join(path, "run.json")) or {},
        "summary": _load_json(os.path.join(path, SUMMARY_FILE)),
        "eval": _load_json(os.path.join(path, EVAL_FILE))})
  return runs


def loss_terms(records) -> list[str]:
  """The loss terms a run logs, in order: the keys ``t`` of its training
  records that have a ``weight/t`` beside them (``kdjax.losses.compose``
  reports every term's unweighted value and its weight)."""
  names = {}
  for r in records:
    if r.get("split") != "train":
      continue
    for key in r:
      if key.startswith("weight/") and key[len("weight/"):] in r:
        names.setdefault(key[len("weight/"):], None)
  return list(names)


def loss_series(runs: Sequence[dict]) -> dict:
  """``{"loss" | term: {run label: (steps, values)}}``: what ``loss.png`` plots.

  ``"loss"`` (each run's objective) first, then every term any run logs
  (:func:`loss_terms`), the hard-label ``"ce"`` first among them.
  """
  terms = {}
  for run in runs:
    for name in loss_terms(run["records"]):
      terms.setdefault(name, None)
  names = ["loss"] + sorted(terms, key=lambda n: n != "ce")
  series = {}
  for name in names:
    per_run = {}
    for run in runs:
      steps, values = _series(run["records"], "train", name)
      if steps:
        per_run[run["label"]] = (steps, values)
    if per_run:
      series[name] = per_run
  return series


def teacher_accuracies(runs: Sequence[dict]) -> list[tuple[str, float]]:
  """``[(teacher name, accuracy)]`` of the runs' teachers, one per teacher.

  From a run's ``eval.json`` (the teacher's accuracy on the eval split), else
  from its last training-time eval that measured the teacher.
  """
  found = {}
  for run in runs:
    ev = run["eval"] or {}
    if "teacher" in ev:
      key = ev.get("teacher_run") or run["meta"].get("teacher_run") or "teacher"
      found.setdefault(key, float(ev["teacher"]["accuracy"]))
      continue
    points = [r for r in run["records"] if r.get("split") == "eval"
              and isinstance(r.get("teacher_accuracy"), (int, float))]
    if points:
      key = run["meta"].get("teacher_run") or "teacher"
      last = max(points, key=lambda r: r["step"])
      found.setdefault(key, float(last["teacher_accuracy"]))
  named = []
  for key, acc in found.items():
    name = os.path.basename(os.path.normpath(key)) if key != "teacher" else key
    named.append((name, acc))
  return named


def _colors(runs: Sequence[dict]) -> dict:
  """One colour per run, the same in every panel."""
  return {run["label"]: f"C{i % 10}" for i, run in enumerate(runs)}


def _curves(ax, per_run: dict, ylabel: str, colors: dict) -> None:
  for label, (steps, values) in per_run.items():
    ax.plot(steps, values, marker="o" if len(steps) < 30 else None,
            markersize=3, label=label, color=colors.get(label))
  ax.set_xlabel("step")
  ax.set_ylabel(ylabel)
  ax.set_title(f"{ylabel} vs step")
  ax.grid(alpha=0.3)


def loss_figure(runs: Sequence[dict]):
  """``loss.png``: the objective and one panel per loss term (a Figure)."""
  figure = _import_figure()
  series = loss_series(runs) or {"loss": {}}
  cols = min(3, len(series))
  rows = -(-len(series) // cols)
  fig = figure(figsize=(5.2 * cols, 3.8 * rows), dpi=110)
  for i, (name, per_run) in enumerate(series.items()):
    ax = fig.add_subplot(rows, cols, i + 1)
    _curves(ax, per_run, "training loss (objective)" if name == "loss"
            else f"{name} (unweighted)", _colors(runs))
    if per_run:
      ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


def accuracy_figure(runs: Sequence[dict]):
  """``accuracy.png``: eval accuracy per run, teachers as dashed lines."""
  figure = _import_figure()
  fig = figure(figsize=(6.4, 4.2), dpi=110)
  ax = fig.add_subplot()
  per_run = {}
  for run in runs:
    steps, values = _series(run["records"], "eval", "accuracy")
    if not steps and run["eval"]:  # evaluated only by `kdjax eval`
      steps = [run["eval"].get("step") or 0]
      values = [run["eval"]["student"]["accuracy"]]
    if steps:
      per_run[run["label"]] = (steps, values)
  _curves(ax, per_run, "evaluation accuracy", _colors(runs))
  teachers = teacher_accuracies(runs)
  for i, (name, acc) in enumerate(teachers):
    # Dashed grey lines (black for the first teacher): the runs' own colours
    # are solid.
    ax.axhline(acc, color="black" if i == 0 else f"0.{min(i, 6) + 2}",
               linestyle="--", linewidth=1.0,
               label=(f"teacher {name}" if len(teachers) > 1 else "teacher")
               + f" ({100 * acc:.2f}%)")
  if ax.get_lines():
    ax.legend(fontsize=8)
  fig.tight_layout()
  return fig


def reliability_figure(runs: Sequence[dict]):
  """``reliability.png`` of the runs with an ``eval.json`` (or ``None``)."""
  evaluated = [r for r in runs if r["eval"]]
  if not evaluated:
    return None
  figure = _import_figure()
  fig = figure(figsize=(4.2 * len(evaluated), 4.2), dpi=110)
  for i, run in enumerate(evaluated):
    ax = fig.add_subplot(1, len(evaluated), i + 1)
    ax.plot([0, 1], [0, 1], "k--", linewidth=0.8, label="perfect")
    _reliability(ax, run["eval"]["student"], "model", filled=True)
    if "teacher" in run["eval"]:
      _reliability(ax, run["eval"]["teacher"], "teacher", filled=False)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"{run['label']}: ECE "
                 f"{run['eval']['student']['ece']:.3f}")
    ax.legend(loc="upper left", fontsize=8)
  fig.tight_layout()
  return fig


def write_report(run_dirs: Sequence[str], out_dir: str,
                 labels: Optional[Sequence[str]] = None,
                 out: Callable[[str], None] = print,
                 evaluate: bool = True) -> list[str]:
  """Writes the plots and summary of ``run_dirs`` into ``out_dir``; returns
  the paths written.

  With ``evaluate`` (the default) every run without an ``eval.json`` is
  evaluated first (:func:`evaluate_missing`).
  """
  _import_figure()  # fail before any evaluation when matplotlib is missing
  if labels and len(labels) != len(run_dirs):
    raise errors.UsageError(f"--labels gives {len(labels)} names for "
                            f"{len(run_dirs)} runs.")
  for path in run_dirs:
    if not os.path.isdir(path):
      raise errors.MissingRunError(f"no run directory {path}.")
  if evaluate:
    evaluate_missing(run_dirs, out=out)
  runs = load_runs(run_dirs, labels)
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for name, fig in (("loss.png", loss_figure(runs)),
                    ("accuracy.png", accuracy_figure(runs)),
                    ("reliability.png", reliability_figure(runs))):
    if fig is not None:
      path = os.path.join(out_dir, name)
      fig.savefig(path)
      written.append(path)

  table = summary_table(runs)
  path = os.path.join(out_dir, "summary.md")
  with open(path, "w") as f:
    f.write(table + "\n")
  written.append(path)
  out(table)
  for p in written:
    out(f"wrote {p}")
  return written
