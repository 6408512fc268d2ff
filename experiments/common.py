"""Shared helpers of the Fashion-MNIST experiments (``experiments/*.py``).

* data: the real Fashion-MNIST (Debian's IDX files), normalised, with the
  subsets of the main job (``fashion_mnist_kd.py``, whose loaders are reused);
* teachers trained once and saved in a work directory (``runs/experiments``
  by default), so that every script distils from the same teacher;
* one student run: :func:`make_student_step` (built once, reused across
  seeds: one compilation) and :func:`run_student`;
* mean ± std tables, JSON results and a matplotlib figure.

Every script takes ``--smoke`` (tiny sizes, a few seconds; writes under the
work directory, never over the committed results) and writes
``experiments/results/<name>.json`` and ``experiments/plots/<name>.png``
otherwise.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import platform
import shutil
import sys
import time
from typing import Any, Iterable, Optional, Sequence

import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from kdjax import cache
from kdjax import losses
from kdjax import models
from kdjax import train

EXPERIMENTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(EXPERIMENTS_DIR)
if EXPERIMENTS_DIR not in sys.path:
  sys.path.insert(0, EXPERIMENTS_DIR)

# The main job's data helpers (same normalisation, batching and evaluation).
from fashion_mnist_kd import epoch_batches  # noqa: E402  pylint: disable=g-import-not-at-top
from fashion_mnist_kd import eval_batches  # noqa: E402  pylint: disable=g-import-not-at-top
from fashion_mnist_kd import load  # noqa: E402  pylint: disable=g-import-not-at-top
from fashion_mnist_kd import make_optimizer  # noqa: E402  pylint: disable=g-import-not-at-top
from fashion_mnist_kd import param_count  # noqa: E402  pylint: disable=g-import-not-at-top

__all__ = ["epoch_batches", "eval_batches", "load", "make_optimizer",
           "param_count"]

DEFAULT_WORKDIR = os.path.join(REPO_ROOT, "runs", "experiments")
RESULTS_DIR = os.path.join(EXPERIMENTS_DIR, "results")
PLOTS_DIR = os.path.join(EXPERIMENTS_DIR, "plots")
SUBSET_SEED = 1234  # the main job's subset permutation

CE_ONLY = losses.compose(
    [losses.Term("ce", losses.label_term(), 1.0, needs_teacher=False)])


# -----------------------------------------------------------------------------
# Command line and data.
# -----------------------------------------------------------------------------


def base_parser(doc: str) -> argparse.ArgumentParser:
  """The options every experiment shares."""
  p = argparse.ArgumentParser(description=doc.splitlines()[0])
  p.add_argument("--smoke", action="store_true",
                 help="tiny sizes (seconds): the CI smoke test")
  p.add_argument("--data-dir", default=None,
                 help="Fashion-MNIST IDX files (default: "
                 "/usr/share/datasets/fashion-mnist)")
  p.add_argument("--workdir", default=None,
                 help=f"saved teachers and caches (default {DEFAULT_WORKDIR})")
  p.add_argument("--out-dir", default=None,
                 help="where the JSON and PNG go (default experiments/results "
                 "and experiments/plots; with --smoke, <workdir>/smoke)")
  p.add_argument("--seeds", type=int, nargs="+", default=None)
  p.add_argument("--teacher", choices=("artifact", "trained"), default=None,
                 help="artifact: the main job's committed 93.28%% teacher "
                 "(experiments/teacher, fingerprint-checked); trained: the old "
                 "3-epoch CNN (~91%%), trained once into --workdir "
                 "(default: the experiment's own)")
  p.add_argument("--teacher-epochs", type=int, default=None,
                 help="epochs of the trained teacher (--teacher trained)")
  p.add_argument("--batch-size", type=int, default=128)
  p.add_argument("--keep-caches", action="store_true",
                 help="keep the teacher caches in <workdir>/caches after the run")
  p.add_argument("--max-test", type=int, default=None,
                 help="evaluate on the first N test images (default all)")
  return p


def finish_args(args: argparse.Namespace, smoke: dict, real: dict) -> argparse.Namespace:
  """Fills every option left at ``None`` from the smoke or the real defaults."""
  defaults = smoke if args.smoke else real
  for key, value in defaults.items():
    if getattr(args, key, None) is None:
      setattr(args, key, value)
  if args.workdir is None:
    args.workdir = DEFAULT_WORKDIR
  return args


def execute(parser: argparse.ArgumentParser, argv, smoke: dict, real: dict,
            run) -> dict:
  """Parses ``argv``, then ``run(args, argv)`` with the smoke-mode compile
  settings, removing the run's teacher caches afterwards."""
  args = finish_args(parser.parse_args(argv), smoke, real)
  with fast_compiles(args.smoke):
    try:
      return run(args, argv)
    finally:
      remove_caches(args)


def prepare(args: argparse.Namespace, timer, **teacher_kw) -> tuple[dict, dict]:
  """Loads the data, prints the run header and gets (trains or loads) the
  shared teacher, timed as ``"teacher"``; returns ``(data, teacher)``.

  With ``args.teacher == "artifact"`` (and not ``--smoke``) the teacher is
  the main job's committed artifact (``experiments/teacher``, 93.28%),
  verified by its fingerprint; otherwise the 3-epoch CNN of ``get_teacher``.
  """
  data = load_data(args)
  run_header(args, data)
  with timer("teacher"):
    if getattr(args, "teacher", "trained") == "artifact" and not args.smoke:
      teacher = artifact_teacher(data, **teacher_kw)
    else:
      teacher = get_teacher(data, args.workdir, **teacher_kw,
                            **teacher_args(args))
  print(f"teacher: {teacher['name']}, {teacher['params']:,} params, test "
        f"accuracy {100 * teacher['accuracy']:.2f}%"
        + (" (loaded)" if teacher.get("loaded") else ""), flush=True)
  return data, teacher


def output_paths(args: argparse.Namespace, name: str) -> tuple[str, str]:
  """``(json path, png path)`` of the experiment ``name``."""
  if args.out_dir is not None:
    results = plots = args.out_dir
  elif args.smoke:
    results = plots = os.path.join(args.workdir, "smoke")
  else:
    results, plots = RESULTS_DIR, PLOTS_DIR
  os.makedirs(results, exist_ok=True)
  os.makedirs(plots, exist_ok=True)
  return os.path.join(results, f"{name}.json"), os.path.join(plots, f"{name}.png")


def load_data(args: argparse.Namespace) -> dict:
  """``{"train": (x [N,28,28,1] f32, y [N] i32), "test": ...}``; test cut to ``max_test``."""
  data = load(args.data_dir)
  if args.max_test:
    x, y = data["test"]
    data["test"] = (x[:args.max_test], y[:args.max_test])
  return data


def subset(data: dict, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The main job's subset of ``size`` training examples: ``(x, y, indices)``.

  The same permutation (seed 1234, sorted) as ``fashion_mnist_kd.py``; the
  whole set when ``size`` is 0 or at least its size.
  """
  x, y = data["train"]
  if not size or size >= len(y):
    return x, y, np.arange(len(y))
  idx = np.sort(np.random.default_rng(SUBSET_SEED).permutation(len(y))[:size])
  return x[idx], y[idx], idx


# -----------------------------------------------------------------------------
# Teachers, saved once in the work directory.
# -----------------------------------------------------------------------------


def make_model(arch: str, sizes: Sequence[int], dense: int = 0, num_classes: int = 10):
  """``("cnn", channels, dense)`` -> ``models.CNN``; ``("mlp", hidden)`` -> ``models.MLP``."""
  if arch == "cnn":
    return models.CNN(channels=tuple(sizes), dense=dense, num_classes=num_classes)
  if arch == "mlp":
    return models.MLP(hidden=tuple(sizes), num_classes=num_classes)
  raise ValueError(f"unknown architecture {arch!r}; expected 'cnn' or 'mlp'.")


def describe(arch: str, sizes: Sequence[int], dense: int = 0) -> str:
  if arch == "cnn":
    return f"CNN conv {'-'.join(map(str, sizes))} dense {dense}"
  return "MLP 784-" + "-".join(map(str, sizes)) + "-10"


def get_teacher(data: dict, workdir: str, *, arch: str = "cnn",
                sizes: Sequence[int] = (32, 64), dense: int = 256,
                epochs: int = 3, seed: int = 0, lr: float = 2e-3,
                batch_size: int = 128, feature_names: Sequence[str] = (),
                max_train: int = 0) -> dict:
  """A teacher trained on the training set (hard labels), saved and reused.

  The file ``<workdir>/teachers/<arch>_<sizes>_d<dense>_e<epochs>_s<seed>_n<N>.msgpack``
  (``flax.serialization``) holds its variables and a ``.json`` beside it its
  test accuracy; a second call with the same configuration loads them (the
  default teacher is the main job's: CNN conv 32-64, dense 256, 3 epochs,
  Adam-W 2e-3 cosine, seed 0).

  Returns:
    ``{"module", "apply", "variables", "accuracy", "params", "name",
    "train_time_s", "loaded"}``; ``apply`` captures ``feature_names``.
  """
  module = make_model(arch, sizes, dense)
  apply = models.from_linen(module, feature_names=tuple(feature_names),
                            train_kwarg="train")
  x, y = data["train"]
  if max_train:
    x, y = x[:max_train], y[:max_train]
  tag = (f"{arch}_{'-'.join(map(str, sizes))}_d{dense}_e{epochs}_s{seed}"
         f"_n{len(y)}")
  path = os.path.join(workdir, "teachers", tag)
  template = module.init(jax.random.PRNGKey(seed), x[:2])
  name = describe(arch, sizes, dense)
  if os.path.exists(path + ".msgpack") and os.path.exists(path + ".json"):
    with open(path + ".msgpack", "rb") as f:
      variables = flax.serialization.from_bytes(template, f.read())
    with open(path + ".json") as f:
      meta = json.load(f)
    return {"module": module, "apply": apply, "variables": variables,
            "accuracy": meta["accuracy"], "params": param_count(variables),
            "name": name, "train_time_s": meta["train_time_s"],
            "epochs": epochs, "loaded": True}
  tick = time.perf_counter()
  plain = models.from_linen(module, train_kwarg="train")
  optimizer = make_optimizer(lr, epochs * (len(y) // batch_size))
  state = train.create_state(template, optimizer, rng=jax.random.PRNGKey(seed))
  step = train.make_train_step(plain, None, CE_ONLY, optimizer)
  rng = np.random.default_rng(seed)
  for _ in range(epochs):
    state, _ = train.fit(step, state, None,
                         epoch_batches(x, y, batch_size, rng), log_every=200)
  variables = state.student_variables()
  elapsed = time.perf_counter() - tick
  accuracy = evaluate_accuracy(plain, variables, data)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".msgpack", "wb") as f:
    f.write(flax.serialization.to_bytes(variables))
  with open(path + ".json", "w") as f:
    json.dump({"name": name, "accuracy": accuracy, "train_time_s": elapsed,
               "epochs": epochs, "seed": seed, "lr": lr,
               "train_examples": len(y)}, f, indent=1)
  print(f"teacher {name} (seed {seed}, {epochs} epochs): test accuracy "
        f"{100 * accuracy:.2f}% ({elapsed:.0f} s; saved to {path}.msgpack)",
        flush=True)
  return {"module": module, "apply": apply, "variables": variables,
          "accuracy": accuracy, "params": param_count(variables), "name": name,
          "train_time_s": elapsed, "epochs": epochs, "loaded": False}


def artifact_teacher(data: dict, *, feature_names: Sequence[str] = ()) -> dict:
  """The main job's teacher artifact (``fashion_mnist_teacher.load_teacher``:
  recipe and fingerprint verified), in ``get_teacher``'s format; ``apply``
  captures ``feature_names``. The recorded test accuracy is checked against
  a fresh evaluation on ``data["test"]`` when the whole test set is used."""
  import fashion_mnist_teacher  # pylint: disable=g-import-not-at-top
  loaded = fashion_mnist_teacher.load_teacher()
  module, meta = loaded["module"], loaded["meta"]
  apply = models.from_linen(module, feature_names=tuple(feature_names),
                            train_kwarg="train")
  accuracy = evaluate_accuracy(loaded["apply"], loaded["variables"], data)
  if len(data["test"][1]) == 10000 and abs(accuracy - meta["test_accuracy"]) > 1e-4:
    raise RuntimeError(f"the teacher artifact evaluates to {accuracy:.4f}, but "
                       f"teacher.json records {meta['test_accuracy']:.4f}")
  recipe = meta["recipe"]
  return {"module": module, "apply": apply, "variables": loaded["variables"],
          "accuracy": accuracy, "params": meta["params"], "name": meta["name"],
          "train_time_s": meta["train_time_s"], "epochs": recipe["epochs"],
          "loaded": True}


def teacher_args(args: argparse.Namespace) -> dict:
  """The shared teacher's configuration (tiny under ``--smoke``)."""
  if args.smoke:
    return {"arch": "cnn", "sizes": (4, 8), "dense": 16,
            "epochs": args.teacher_epochs, "max_train": 1024}
  return {"arch": "cnn", "sizes": (32, 64), "dense": 256,
          "epochs": args.teacher_epochs}


_BUILT_CACHES: list = []


def build_cache(workdir: str, name: str, teacher: dict, arrays: dict,
                **kwargs) -> cache.TeacherCache:
  """``kdjax.cache.build_teacher_cache`` into ``<workdir>/caches/<name>`` (rebuilt).

  A cache also stores the examples (60,000 images: 188 MB); ``remove_caches``
  deletes the ones built by this process once the script is done.
  """
  path = os.path.join(workdir, "caches", name)
  _BUILT_CACHES.append(path)
  return cache.build_teacher_cache(
      path, teacher["apply"], teacher["variables"], arrays, batch_size=1000,
      overwrite=True, **kwargs)


def remove_caches(args: argparse.Namespace) -> None:
  """Deletes the caches built so far (unless ``--keep-caches``)."""
  if getattr(args, "keep_caches", False):
    return
  while _BUILT_CACHES:
    shutil.rmtree(_BUILT_CACHES.pop(), ignore_errors=True)


# -----------------------------------------------------------------------------
# Students.
# -----------------------------------------------------------------------------


def evaluate_accuracy(apply, variables, data: dict) -> float:
  """Top-1 test accuracy (a fraction)."""
  report = train.evaluate(train.make_eval_step(apply), variables, None,
                          eval_batches(*data["test"]))
  return report["student_accuracy"]


def evaluate_student(student_apply, variables, data: dict, teacher: Optional[dict] = None) -> dict:
  """``{"accuracy", "agreement"}`` (agreement with ``teacher`` on the test set, when given)."""
  t_apply = None if teacher is None else teacher["apply"]
  t_vars = None if teacher is None else teacher["variables"]
  report = train.evaluate(train.make_eval_step(student_apply, t_apply),
                          variables, t_vars, eval_batches(*data["test"]))
  out = {"accuracy": report["student_accuracy"]}
  if teacher is not None:
    out["agreement"] = report["agreement"]
  return out


def strip_teacher(batches: Iterable[dict]) -> Iterable[dict]:
  """Cache batches without their cached teacher outputs (for an online teacher)."""
  for b in batches:
    yield {k: v for k, v in b.items() if k != "teacher"}


class StudentRunner:
  """One student configuration, compiled once and run for several seeds.

  ``teacher_apply`` is an online teacher (``teacher_variables`` its
  variables), a cache's apply function (``teacher_variables=None``), or
  ``None`` (a student alone; ``ema=True`` for the mean teacher, whose teacher
  is the student's EMA). Batches come from ``teacher_cache.batches(...)``
  (its examples and, for a cached teacher, its outputs); with an online
  teacher the cached outputs are dropped, so that online and offline runs see
  the same batches in the same order.
  """

  def __init__(self, student_module, student_apply, loss_fn, teacher_cache,
               *, epochs: int, batch_size: int, lr: float,
               teacher_apply=None, teacher_variables=None, online: bool = False,
               ema: bool = False, step_kwargs: Optional[dict] = None):
    self.module, self.apply, self.loss_fn = student_module, student_apply, loss_fn
    self.cache, self.epochs, self.batch_size = teacher_cache, epochs, batch_size
    self.teacher_apply, self.teacher_variables = teacher_apply, teacher_variables
    self.online, self.ema = online, ema
    self.steps = epochs * (teacher_cache.num_examples // batch_size)
    self.optimizer = make_optimizer(lr, self.steps)
    self.step = train.make_train_step(student_apply, teacher_apply, loss_fn,
                                      self.optimizer, **(step_kwargs or {}))

  def batches(self, seed: int, epoch: int):
    b = self.cache.batches(self.batch_size, shuffle=True, seed=seed, epoch=epoch)
    return strip_teacher(b) if self.online else b

  def init_variables(self, seed: int, example: np.ndarray):
    return self.module.init(jax.random.PRNGKey(100 + seed), example[:2])

  def run(self, seed: int, init_variables=None) -> tuple[Any, float]:
    """Trains from ``init_variables`` (default: seed ``100 + seed``); ``(variables, seconds)``."""
    tick = time.perf_counter()
    state, _ = self.initial_state(seed, init_variables)
    self.epoch_times = []
    for epoch in range(self.epochs):
      start = time.perf_counter()
      state, _ = train.fit(self.step, state, self.teacher_variables,
                           self.batches(seed, epoch), log_every=500)
      jax.block_until_ready(state.params)
      self.epoch_times.append(time.perf_counter() - start)
    trained = state.student_variables()
    return trained, time.perf_counter() - tick

  def initial_state(self, seed: int, init_variables=None):
    """``(state, first batch)`` at the start of seed ``seed``'s run."""
    first = next(iter(self.batches(seed, 0)))
    if init_variables is None:
      init_variables = self.init_variables(seed, first["image"])
    variables = jax.tree.map(jnp.copy, init_variables)  # the step donates
    s_out = self.apply(variables, first)
    if self.ema:
      t_out = self.apply(variables, first)
    elif self.teacher_apply is None:
      t_out = None
    else:
      t_out = train.teacher_forward(self.teacher_apply, self.teacher_variables,
                                    first)
    key = jax.random.PRNGKey(seed)
    k_params, k_state, k_run = jax.random.split(key, 3)
    state = train.create_state(
        variables, self.optimizer, rng=k_run,
        loss_params=self.loss_fn.init_params(k_params, s_out, t_out, first),
        loss_state=self.loss_fn.init_state(k_state, s_out, t_out, first),
        ema=self.ema)
    return state, first


def kd_loss(temperature: float, kd_weight: float) -> losses.ComposedLoss:
  """``(1 - w) CE + w T^2 KL(p_t || p_s)`` at ``T`` (Hinton et al. 2015)."""
  return losses.compose(
      [losses.Term("ce", losses.label_term(), 1.0 - kd_weight,
                   needs_teacher=False),
       losses.Term("kd", losses.logit_term(losses.kl_divergence), kd_weight)],
      temperature=temperature)


# -----------------------------------------------------------------------------
# Tables, JSON, plots.
# -----------------------------------------------------------------------------


def stats(values: Sequence[float]) -> dict:
  """``{"mean", "std", "n", "values"}`` in percent (std with ddof 1; 0 for one value)."""
  v = 100 * np.asarray(values, np.float64)
  return {"mean": float(v.mean()),
          "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
          "n": int(len(v)), "values": [float(x) for x in v]}


def fmt(values: Sequence[float], signed: bool = False) -> str:
  """``"mean ± std"`` in percent points (``mean`` alone for one value)."""
  s = stats(values)
  mean = f"{s['mean']:+.2f}" if signed else f"{s['mean']:.2f}"
  return mean if s["n"] == 1 else f"{mean} ± {s['std']:.2f}"


def beyond_spread(base: Sequence[float], other: Sequence[float]) -> bool:
  """Whether ``other`` beats ``base`` by more than the larger seed std (plus the gain's std).

  The criterion used in the tables: ``mean(other - base) > std(other - base)``
  over paired seeds, and ``mean(other) - mean(base)`` larger than both
  groups' standard deviations.
  """
  b, o = 100 * np.asarray(base), 100 * np.asarray(other)
  if len(b) < 2:
    return bool(o.mean() > b.mean())
  gain = o - b
  return bool(gain.mean() > gain.std(ddof=1)
              and o.mean() - b.mean() > max(b.std(ddof=1), o.std(ddof=1)))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
  widths = [max(len(str(h)), *(len(str(r[i])) for r in rows))
            for i, h in enumerate(headers)]
  line = lambda cells: "| " + " | ".join(
      str(c).ljust(w) for c, w in zip(cells, widths)) + " |"
  return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths)
                    + "|"] + [line(r) for r in rows])


# CPU features that select XLA:CPU's kernels: YNNPACK picks its dot kernels
# from these at run time (BUILD_NOTES.md, "Reproducibility").
_KERNEL_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw",
                 "avx512_bf16", "avx512_vnni", "avx512_fp16", "amx_tile")


def host_info() -> dict:
  """Where a result was computed: the CPU (model, family/model numbers,
  kernel-selecting features, cache sizes), the core count, jax/jaxlib and
  XLA_FLAGS. Results are bit-reproducible only between equal entries."""
  cpu = {}
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in ("model name", "cpu family", "model", "flags") and key not in cpu:
          cpu[key] = value
        if not line.strip() and cpu:
          break
  except OSError:
    pass
  caches = {}
  for index in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
    try:
      with open(os.path.join(index, "level")) as f:
        level = f.read().strip()
      with open(os.path.join(index, "type")) as f:
        kind = f.read().strip()
      with open(os.path.join(index, "size")) as f:
        caches[f"L{level} {kind}"] = f.read().strip()
    except OSError:
      continue
  flags = set(cpu.get("flags", "").split())
  return {"cpu": cpu.get("model name", platform.processor()),
          "cpu_family": cpu.get("cpu family"), "cpu_model": cpu.get("model"),
          "kernel_flags": [f for f in _KERNEL_FLAGS if f in flags],
          "caches_per_core": caches, "cpu_count": os.cpu_count(),
          "jax": jax.__version__, "jaxlib": jax.lib.__version__ if hasattr(
              jax.lib, "__version__") else None,
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "commit": _git_commit()}


def _git_commit() -> Optional[str]:
  """The checkout's commit (``+`` if it has uncommitted changes), or None."""
  import subprocess  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                          capture_output=True, text=True, timeout=10)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "kdjax",
                            "experiments"], cwd=root, capture_output=True,
                           text=True, timeout=10)
  except (OSError, subprocess.SubprocessError):
    return None
  if head.returncode:
    return None
  return head.stdout.strip() + ("+" if dirty.stdout.strip() else "")


def write_json(path: str, payload: dict) -> None:
  payload = {**payload, "host": payload.get("host") or host_info()}
  with open(path, "w") as f:
    json.dump(payload, f, indent=1, default=_json_default)
  print(f"results: {path}", flush=True)


def read_partial(path: str, signature: dict) -> dict:
  """``{(name, seed): record}`` from ``path`` (JSON lines of
  ``append_partial``) for the lines written with the same ``signature``."""
  found = {}
  if os.path.exists(path):
    key = json.dumps(signature, sort_keys=True, default=_json_default)
    with open(path) as f:
      for line in f:
        line = line.strip()
        if not line:
          continue
        entry = json.loads(line)
        if json.dumps(entry["signature"], sort_keys=True) == key:
          found[(entry["name"], entry["record"]["seed"])] = entry["record"]
  return found


def append_partial(path: str, signature: dict, name: str, record: dict) -> None:
  """Appends one finished run (one JSON line) to ``path``."""
  line = json.dumps({"signature": signature, "name": name, "record": record},
                    default=_json_default, sort_keys=True)
  with open(path, "a") as f:
    f.write(line + "\n")


def _json_default(x):
  if isinstance(x, (np.integer,)):
    return int(x)
  if isinstance(x, (np.floating,)):
    return float(x)
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


def pyplot():
  """matplotlib's pyplot with the non-interactive Agg backend (imported here only)."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def save_figure(fig, path: str) -> None:
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  pyplot().close(fig)
  print(f"plot: {path}", flush=True)


def errorbar(ax, x, runs: Sequence[Sequence[float]], label: str, **kw):
  """Plots mean ± std (percent) of each ``runs[i]`` at ``x[i]``."""
  s = [stats(r) for r in runs]
  ax.errorbar(x, [t["mean"] for t in s], yerr=[t["std"] for t in s],
              capsize=3, marker="o", label=label, **kw)


class fast_compiles:  # pylint: disable=invalid-name
  """``with fast_compiles(enabled):`` compiles with most XLA optimisations off.

  For ``--smoke`` runs, whose time is mostly compilation (as in
  ``tests/test_methods.py``); the previous setting is restored on exit, and
  JAX's in-memory caches are cleared: the flag is not part of JAX's cache
  keys, so without it an executable compiled unoptimised here (an eager op's,
  e.g. the ``truncated_normal`` of a flax ``init``) would be reused after the
  block, and the same init would then differ in the last bits from a fresh
  process's (the cause of ``test_resume_after_sigkill``'s rare failure, see
  BUILD_NOTES.md "The resume race").
  """

  def __init__(self, enabled: bool):
    self.enabled = enabled

  def __enter__(self):
    self.previous = jax.config.read("jax_disable_most_optimizations")
    if self.enabled:
      jax.config.update("jax_disable_most_optimizations", True)

  def __exit__(self, *exc):
    jax.config.update("jax_disable_most_optimizations", self.previous)
    if self.enabled:
      jax.clear_caches()


class Timer:
  """Named wall-clock phases: ``with timer("teacher"): ...``; ``timer.times``."""

  def __init__(self):
    self.times: dict = {}
    self._start = time.perf_counter()

  def __call__(self, name: str):
    timer = self

    class _Phase:
      def __enter__(self):
        self.tick = time.perf_counter()

      def __exit__(self, *exc):
        timer.times[name] = timer.times.get(name, 0.0) + time.perf_counter() - self.tick

    return _Phase()

  def total(self) -> float:
    return time.perf_counter() - self._start


def run_header(args: argparse.Namespace, data: dict) -> None:
  print(f"Fashion-MNIST: {len(data['train'][1])} train / {len(data['test'][1])} "
        f"test images; devices: {jax.devices()}; seeds {args.seeds}"
        + ("; SMOKE sizes" if args.smoke else ""), flush=True)


def command_line(name: str, argv: Optional[Sequence[str]]) -> str:
  argv = sys.argv[1:] if argv is None else list(argv)
  return " ".join(["python", f"experiments/{name}.py", *argv])
