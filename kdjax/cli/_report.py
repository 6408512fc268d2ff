"""``kdjax report``: learning curves and reliability diagrams as PNG files.

* ``loss.png``: the training loss (each run's objective) of every run
  against the step, and beside it the hard-label cross-entropy term where
  the runs log one (comparable across methods);
* ``accuracy.png``: the evaluation accuracy of every run against the step
  (runs evaluated only at the end show one point);
* ``reliability.png``: per run with an ``eval.json``, the reliability
  diagram (accuracy per confidence bin against the diagonal, the student's
  bars and the teacher's outline), with the ECE in the title;
* ``summary.md``: a table of each run's final numbers (also printed).

matplotlib is imported inside :func:`write_report` (``pip install
"kdjax[plots]"``), through its object-oriented API only (no pyplot state, no
display needed).
"""

from __future__ import annotations

import json
import os
from typing import Callable, Optional, Sequence

from kdjax.cli import _eval
from kdjax.cli import _logging
from kdjax.cli import _train


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


def write_report(run_dirs: Sequence[str], out_dir: str,
                 labels: Optional[Sequence[str]] = None,
                 out: Callable[[str], None] = print) -> list[str]:
  """Writes the plots and summary of ``run_dirs`` into ``out_dir``; returns
  the paths written."""
  try:
    from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("kdjax report draws with matplotlib: pip install "
                      "'kdjax[plots]' (or matplotlib).") from e
  if labels and len(labels) != len(run_dirs):
    raise ValueError(f"--labels gives {len(labels)} names for "
                     f"{len(run_dirs)} runs.")
  runs = []
  for i, path in enumerate(run_dirs):
    if not os.path.isdir(path):
      raise FileNotFoundError(f"no run directory {path}.")
    records = _logging.read_metrics(path)
    if not records and not os.path.exists(os.path.join(path,
                                                        _eval.EVAL_FILE)):
      raise FileNotFoundError(f"{path} has neither {_logging.METRICS_FILE} "
                              f"nor {_eval.EVAL_FILE}: not a kdjax run.")
    runs.append({
        "path": path,
        "label": labels[i] if labels else os.path.basename(
            os.path.normpath(path)),
        "records": records,
        "meta": _load_json(os.path.join(path, "run.json")) or {},
        "summary": _load_json(os.path.join(path, _train.SUMMARY_FILE)),
        "eval": _load_json(os.path.join(path, _eval.EVAL_FILE))})
  os.makedirs(out_dir, exist_ok=True)
  written = []

  def curves(ax, key: str, split: str, ylabel: str) -> None:
    plotted = False
    for run in runs:
      steps, values = _series(run["records"], split, key)
      if steps:
        ax.plot(steps, values, marker="o" if len(steps) < 30 else None,
                markersize=3, label=run["label"])
        plotted = True
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} vs step")
    ax.grid(alpha=0.3)
    if plotted:
      ax.legend()

  # The objectives of different methods differ; their hard-label term ("ce",
  # logged unweighted) compares across runs.
  has_ce = any(_series(r["records"], "train", "ce")[0] for r in runs)
  fig = Figure(figsize=(6.4 * (2 if has_ce else 1), 4.2), dpi=110)
  curves(fig.add_subplot(1, 2 if has_ce else 1, 1), "loss", "train",
         "training loss (objective)")
  if has_ce:
    curves(fig.add_subplot(1, 2, 2), "ce", "train", "hard-label cross-entropy")
  fig.tight_layout()
  path = os.path.join(out_dir, "loss.png")
  fig.savefig(path)
  written.append(path)

  fig = Figure(figsize=(6.4, 4.2), dpi=110)
  curves(fig.add_subplot(), "accuracy", "eval", "evaluation accuracy")
  fig.tight_layout()
  path = os.path.join(out_dir, "accuracy.png")
  fig.savefig(path)
  written.append(path)

  evaluated = [r for r in runs if r["eval"]]
  if evaluated:
    fig = Figure(figsize=(4.2 * len(evaluated), 4.2), dpi=110)
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
    path = os.path.join(out_dir, "reliability.png")
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
