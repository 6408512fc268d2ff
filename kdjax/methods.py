"""A registry of distillation methods with their papers' default hyper-parameters.

``get_method(name, **overrides)`` returns a :class:`MethodSpec` (the paper, the
default hyper-parameters with any overrides, the features the method reads,
how it is trained) and ``build_loss(spec, ...)`` the
:class:`kdjax.losses.ComposedLoss` to pass to :func:`kdjax.train.make_train_step`::

  spec = kdjax.methods.get_method("kd", temperature=2.0)
  loss_fn = kdjax.methods.build_loss(spec)
  step = kdjax.train.make_train_step(student_apply, teacher_apply, loss_fn,
                                     optimizer, **spec.train_step_kwargs())

Defaults are the ones of the papers' CIFAR-100 / RepDistiller settings (Tian
et al. 2020's benchmark code, ``scripts/run_cifar_distill.sh``): there every
feature method keeps the cross-entropy at weight 1 and adds its own term with
weight ``beta`` (``-a 0 -b beta``), while KD uses ``0.1 CE + 0.9 KD`` at
``T = 4``. Step-based schedules (DKD's warm-up, the mean teacher's ramp-up)
are given in steps: set them from your epoch length.

Feature names default to those of :class:`kdjax.models.CNN` (``"block_0"``,
``"block_1"``, ..., ``"penultimate"``); capture them with the adapters'
``feature_names=`` (``spec.feature_names()`` lists what a method reads).

Each method's ``recipe`` says how to train it:

* ``"distill"``: :func:`kdjax.train.make_train_step` with one teacher.
* ``"student_only"``: no teacher (``teacher_apply=None``).
* ``"ensemble"``: several teachers through
  :func:`kdjax.models.ensemble_apply` (one jitted step runs them all).
* ``"mean_teacher"``: the student's EMA is the teacher
  (:func:`kdjax.train.mean_teacher_step`, or ``make_train_step`` with
  ``**spec.train_step_kwargs()``; create the state with ``ema=True``).
* ``"born_again"``: generations of the same architecture
  (:func:`kdjax.train.born_again`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional

import chex

from kdjax import losses
from kdjax.losses import Term
from kdjax.losses import TermInputs

RECIPES = ("distill", "student_only", "ensemble", "mean_teacher", "born_again")


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """A distillation method: its paper, hyper-parameters and how to build it.

  Attributes:
    name: the registry key.
    title: a one-line description.
    paper: the reference (authors, title, venue, year).
    url: the paper's address.
    api: the kdjax functions that implement it (for the README table).
    hparams: the hyper-parameters (paper defaults updated by overrides).
    defaults_source: where the defaults come from.
    recipe: how to train it (see the module docstring).
    needs_index: the batch must hold ``"index"``, each example's dataset
      index (CRD's memory bank).
    build: ``build(hparams, context) -> list of Term``; ``context`` holds
      ``num_data`` and ``dataset_labels``.
  """
  name: str
  title: str
  paper: str
  url: str
  api: str
  hparams: Mapping[str, Any]
  defaults_source: str
  recipe: str
  build: Callable[[Mapping[str, Any], Mapping[str, Any]], list] = dataclasses.field(
      repr=False, compare=False)
  needs_index: bool = False

  @property
  def needs_teacher(self) -> bool:
    """Whether a separate teacher model must be supplied."""
    return self.recipe in ("distill", "ensemble")

  def feature_names(self) -> dict:
    """``{"student": (...), "teacher": (...)}`` features the method reads."""
    h = self.hparams
    student, teacher = [], []
    if "pairs" in h:
      for s, t in h["pairs"]:
        student.append(s)
        teacher.append(t)
    if "student_feature" in h:
      student.append(h["student_feature"])
      teacher.append(h["teacher_feature"])
    return {"student": tuple(dict.fromkeys(student)),
            "teacher": tuple(dict.fromkeys(teacher))}

  def train_step_kwargs(self) -> dict:
    """Extra keyword arguments of :func:`kdjax.train.make_train_step`."""
    if self.recipe == "mean_teacher":
      from kdjax import train  # pylint: disable=g-import-not-at-top
      decay = train.mean_teacher_decay(self.hparams["ema_decay"])
      return {"ema_decay": decay, "teacher_is_ema": True}
    return {}

  def override(self, **overrides) -> "MethodSpec":
    """A copy with some hyper-parameters changed (unknown names raise)."""
    _check_overrides(self.name, self.hparams, overrides)
    return dataclasses.replace(self, hparams={**self.hparams, **overrides})


def _check_overrides(name: str, hparams: Mapping[str, Any],
                     overrides: Mapping[str, Any]) -> None:
  unknown = sorted(set(overrides) - set(hparams))
  if unknown:
    raise ValueError(
        f"method {name!r} has no hyper-parameter(s) {unknown}; its "
        f"hyper-parameters are {sorted(hparams)}.")


# -----------------------------------------------------------------------------
# Term builders.
# -----------------------------------------------------------------------------


def _ce(h) -> list:
  w = h.get("ce_weight", 0.0)
  if not callable(w) and w == 0:
    return []
  return [Term("ce", losses.label_term(
      label_smoothing=h.get("label_smoothing", 0.0)), w, needs_teacher=False)]


def _logit(term_name: str, loss_fn, weight_key: str, **fixed):
  def build(h, ctx):
    del ctx
    kwargs = {k: h[v] for k, v in fixed.items()}
    return _ce(h) + [Term(term_name, losses.logit_term(loss_fn, **kwargs),
                          h[weight_key])]
  return build


def _build_ce(h, ctx):
  del ctx
  return [Term("ce", losses.label_term(label_smoothing=h["label_smoothing"]),
               1.0, needs_teacher=False)]


def _build_dkd(h, ctx):
  del ctx
  weight = h["dkd_weight"]
  if h["warmup_steps"]:
    # mdistiller: loss_dkd * min(epoch / warmup, 1).
    import optax  # pylint: disable=g-import-not-at-top
    weight = optax.linear_schedule(0.0, h["dkd_weight"], h["warmup_steps"])
  return _ce(h) + [Term("dkd", losses.dkd_term(alpha=h["alpha"],
                                               beta=h["beta"]), weight)]


def _build_dist(h, ctx):
  del ctx
  return _ce(h) + [Term("dist", losses.dist_term(beta=h["beta"],
                                                 gamma=h["gamma"]),
                        h["dist_weight"])]


def _build_fitnets(h, ctx):
  del ctx
  return _ce(h) + [losses.fitnets_term("hint", h["student_feature"],
                                       h["teacher_feature"], h["hint_weight"])]


def _build_at(h, ctx):
  del ctx
  return _ce(h) + [losses.attention_transfer_term("at", h["pairs"],
                                                  h["at_weight"], p=h["p"])]


def _relational(term_name: str, loss_key: str, weight_key: str):
  def build(h, ctx):
    del ctx
    return _ce(h) + [losses.relational_term(
        term_name, loss_key, student_feature=h["student_feature"],
        teacher_feature=h["teacher_feature"], weight=h[weight_key])]
  return build


def _build_rkd(h, ctx):
  del ctx
  kw = dict(student_feature=h["student_feature"],
            teacher_feature=h["teacher_feature"])
  return _ce(h) + [
      losses.relational_term("rkd_distance", "rkd_distance",
                             weight=h["distance_weight"], **kw),
      losses.relational_term("rkd_angle", "rkd_angle",
                             weight=h["angle_weight"], **kw)]


@functools.cache
def _linear_embed_class() -> type:
  """RepDistiller's ``LinearEmbed`` (a linen module, defined on first use:
  reading the registry, e.g. to validate a config, imports no Flax)."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top

  class LinearEmbed(nn.Module):
    """Flatten and a linear map to ``features``."""
    features: int = 128

    @nn.compact
    def __call__(self, x):
      x = losses.to_float32(x).reshape(x.shape[0], -1)
      return nn.Dense(self.features, name="linear")(x)

  return LinearEmbed


def _build_cc(h, ctx):
  """CC as RepDistiller runs it: learned linear embeddings, then its CC loss."""
  del ctx
  import jax  # pylint: disable=g-import-not-at-top
  s_name, t_name, dim = h["student_feature"], h["teacher_feature"], h["feat_dim"]
  embed = _linear_embed_class()(dim)

  def init_params(rng, student_out, teacher_out, batch):
    del batch
    k_s, k_t = jax.random.split(rng)
    s = losses.get_feature(student_out, s_name, "student")
    t = losses.get_feature(teacher_out, t_name, "teacher")
    return {"student": embed.init(k_s, s[:1])["params"],
            "teacher": embed.init(k_t, t[:1])["params"]}

  def fn(inputs: TermInputs):
    s = embed.apply({"params": inputs.params["student"]},
                    losses.get_feature(inputs.student, s_name, "student"))
    t = embed.apply({"params": inputs.params["teacher"]},
                    losses.get_feature(inputs.teacher, t_name, "teacher"))
    return losses.correlation_congruence_loss(s, t, kernel=h["kernel"])

  return _ce(h) + [Term("cc", fn, h["cc_weight"], init_params=init_params)]


def _build_crd(h, ctx):
  num_data = ctx.get("num_data")
  if num_data is None:
    raise ValueError(
        "CRD keeps a memory bank of one embedding per training example: "
        "build_loss(spec, num_data=N) needs the training-set size, and every "
        "batch needs batch['index'] (the examples' dataset indices).")
  return _ce(h) + [losses.crd_term(
      "crd", num_data=num_data, student_feature=h["student_feature"],
      teacher_feature=h["teacher_feature"], weight=h["crd_weight"],
      feat_dim=h["feat_dim"], nce_k=h["nce_k"], nce_t=h["nce_t"],
      nce_m=h["nce_m"], dataset_labels=ctx.get("dataset_labels"))]


def _build_ensemble(h, ctx):
  del ctx
  return _ce(h) + [losses.multi_teacher_term(
      "multi_teacher", mode=h["mode"], weights=h["weights"],
      weight=h["kd_weight"], weight_temperature=h["weight_temperature"])]


def _build_mean_teacher(h, ctx):
  del ctx
  from kdjax import train  # pylint: disable=g-import-not-at-top
  loss = train.mean_teacher_loss(consistency=h["consistency"],
                                 consistency_weight=h["consistency_weight"],
                                 rampup_steps=h["rampup_steps"],
                                 ce_weight=h["ce_weight"])
  return list(loss.terms)


def _build_born_again(h, ctx):
  del ctx
  return _ce(h) + [Term("kd", losses.logit_term(losses.kl_divergence),
                        h["kd_weight"])]


# -----------------------------------------------------------------------------
# The table.
# -----------------------------------------------------------------------------

_REPDISTILLER = ("RepDistiller (Tian et al. 2020) scripts/run_cifar_distill.sh: "
                 "CE weight 1 (-r 1), method weight -b")


def _spec(name, title, paper, url, api, hparams, source, recipe, build,
          needs_index=False) -> MethodSpec:
  return MethodSpec(name=name, title=title, paper=paper, url=url, api=api,
                    hparams=dict(hparams), defaults_source=source,
                    recipe=recipe, build=build, needs_index=needs_index)


METHODS: dict = {s.name: s for s in [
    _spec("ce", "student trained alone on the labels (baseline)",
          "-", "", "kdjax.losses.label_term",
          {"label_smoothing": 0.0}, "-", "student_only", _build_ce),
    _spec("kd", "soft-target KD: T^2 KL(p_t || p_s) at temperature T",
          "Hinton, Vinyals & Dean, Distilling the Knowledge in a Neural "
          "Network, 2015", "https://arxiv.org/abs/1503.02531",
          "kdjax.losses.kl_divergence",
          {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9},
          "RepDistiller: -r 0.1 -a 0.9, kd_T 4", "distill",
          _logit("kd", losses.kl_divergence, "kd_weight")),
    _spec("dkd", "decoupled KD: alpha TCKD + beta NCKD, linear warm-up",
          "Zhao et al., Decoupled Knowledge Distillation, CVPR 2022",
          "https://arxiv.org/abs/2203.08679", "kdjax.losses.dkd",
          {"temperature": 4.0, "ce_weight": 1.0, "dkd_weight": 1.0,
           "alpha": 1.0, "beta": 8.0, "warmup_steps": 15640},
          "mdistiller CIFAR-100: CE 1, alpha 1, beta 8, T 4, warm-up 20 "
          "epochs (= 20 x 782 steps at batch 64)", "distill", _build_dkd),
    _spec("dist", "DIST: inter- and intra-class Pearson correlation",
          "Huang et al., Knowledge Distillation from A Stronger Teacher, "
          "NeurIPS 2022", "https://arxiv.org/abs/2205.10536",
          "kdjax.losses.dist",
          {"temperature": 1.0, "ce_weight": 1.0, "dist_weight": 1.0,
           "beta": 1.0, "gamma": 1.0},
          "paper (ImageNet): CE 1, beta = gamma = 1, tau = 1", "distill",
          _build_dist),
    _spec("logit_mse", "regression on the teacher's logits (MSE)",
          "Ba & Caruana, Do Deep Nets Really Need to be Deep?, NeurIPS 2014",
          "https://arxiv.org/abs/1312.6184", "kdjax.losses.logit_mse",
          {"ce_weight": 0.0, "mse_weight": 1.0},
          "paper: logit regression alone", "distill",
          _logit("logit_mse", losses.logit_mse, "mse_weight")),
    _spec("reverse_kl", "reverse KL T^2 KL(p_s || p_t) (mode-seeking)",
          "Gu et al., MiniLLM: Knowledge Distillation of Large Language "
          "Models, ICLR 2024", "https://arxiv.org/abs/2306.08543",
          "kdjax.losses.reverse_kl_divergence",
          {"temperature": 1.0, "ce_weight": 0.0, "kd_weight": 1.0},
          "paper: reverse KL alone, T = 1", "distill",
          _logit("reverse_kl", losses.reverse_kl_divergence, "kd_weight")),
    _spec("jsd", "generalised Jensen-Shannon divergence (beta mixture)",
          "Agarwal et al., On-Policy Distillation of Language Models (GKD), "
          "ICLR 2024", "https://arxiv.org/abs/2306.13649",
          "kdjax.losses.jensen_shannon_divergence",
          {"temperature": 1.0, "ce_weight": 0.0, "kd_weight": 1.0,
           "beta": 0.5},
          "paper: JSD(beta = 0.5) alone, T = 1", "distill",
          _logit("jsd", losses.jensen_shannon_divergence, "kd_weight",
                 beta="beta")),
    _spec("skew_kl", "skew KL: KL(p_t || alpha p_t + (1 - alpha) p_s)",
          "Ko et al., DistiLLM: Towards Streamlined Distillation for Large "
          "Language Models, ICML 2024", "https://arxiv.org/abs/2402.03898",
          "kdjax.losses.skew_kl_divergence",
          {"temperature": 1.0, "ce_weight": 0.0, "kd_weight": 1.0,
           "alpha": 0.1},
          "paper: alpha = 0.1", "distill",
          _logit("skew_kl", losses.skew_kl_divergence, "kd_weight",
                 alpha="alpha")),
    _spec("skew_reverse_kl", "skew reverse KL: KL(p_s || alpha p_s + (1 - alpha) p_t)",
          "Ko et al., DistiLLM, ICML 2024", "https://arxiv.org/abs/2402.03898",
          "kdjax.losses.skew_reverse_kl_divergence",
          {"temperature": 1.0, "ce_weight": 0.0, "kd_weight": 1.0,
           "alpha": 0.1},
          "paper: alpha = 0.1", "distill",
          _logit("skew_reverse_kl", losses.skew_reverse_kl_divergence,
                 "kd_weight", alpha="alpha")),
    _spec("tvd", "total variation distance between the distributions",
          "Wen et al., f-Divergence Minimization for Sequence-Level Knowledge "
          "Distillation, ACL 2023", "https://arxiv.org/abs/2307.15190",
          "kdjax.losses.total_variation_distance",
          {"temperature": 1.0, "ce_weight": 0.0, "kd_weight": 1.0},
          "paper: TVD alone, T = 1", "distill",
          _logit("tvd", losses.total_variation_distance, "kd_weight")),
    _spec("fitnets", "hint: MSE between a connector(student feature) and a "
          "teacher feature", "Romero et al., FitNets: Hints for Thin Deep "
          "Nets, ICLR 2015", "https://arxiv.org/abs/1412.6550",
          "kdjax.losses.fitnets_term",
          {"ce_weight": 1.0, "hint_weight": 100.0,
           "student_feature": "block_1", "teacher_feature": "block_1"},
          _REPDISTILLER + " 100 (hint_layer 2: a middle block)", "distill",
          _build_fitnets),
    _spec("at", "attention transfer: normalised channel-pooled |F|^p maps",
          "Zagoruyko & Komodakis, Paying More Attention to Attention, ICLR "
          "2017", "https://arxiv.org/abs/1612.03928",
          "kdjax.losses.attention_transfer_term",
          {"ce_weight": 1.0, "at_weight": 1000.0, "p": 2,
           "pairs": (("block_0", "block_0"), ("block_1", "block_1"))},
          _REPDISTILLER + " 1000, summed over the intermediate blocks",
          "distill", _build_at),
    _spec("sp", "similarity-preserving: batch Gram matrices",
          "Tung & Mori, Similarity-Preserving Knowledge Distillation, ICCV "
          "2019", "https://arxiv.org/abs/1907.09682",
          "kdjax.losses.similarity_preserving_loss",
          {"ce_weight": 1.0, "sp_weight": 3000.0,
           "student_feature": "block_1", "teacher_feature": "block_1"},
          _REPDISTILLER + " 3000, on the last block (feat[-2])", "distill",
          _relational("sp", "sp", "sp_weight")),
    _spec("rkd", "relational KD: distance- and angle-wise relations",
          "Park et al., Relational Knowledge Distillation, CVPR 2019",
          "https://arxiv.org/abs/1904.05068",
          "kdjax.losses.rkd_distance_loss, kdjax.losses.rkd_angle_loss",
          {"ce_weight": 1.0, "distance_weight": 25.0, "angle_weight": 50.0,
           "student_feature": "penultimate",
           "teacher_feature": "penultimate"},
          _REPDISTILLER + " 1 on RKDLoss(w_d=25, w_a=50)", "distill",
          _build_rkd),
    _spec("pkt", "probabilistic KT: KL between cosine-similarity "
          "conditionals", "Passalis & Tefas, Learning Deep Representations "
          "with Probabilistic Knowledge Transfer, ECCV 2018",
          "https://arxiv.org/abs/1803.10837", "kdjax.losses.pkt_loss",
          {"ce_weight": 1.0, "pkt_weight": 30000.0,
           "student_feature": "penultimate",
           "teacher_feature": "penultimate"},
          _REPDISTILLER + " 30000", "distill",
          _relational("pkt", "pkt", "pkt_weight")),
    _spec("cc", "correlation congruence on learned linear embeddings",
          "Peng et al., Correlation Congruence for Knowledge Distillation, "
          "ICCV 2019", "https://arxiv.org/abs/1904.01802",
          "kdjax.losses.correlation_congruence_loss",
          {"ce_weight": 1.0, "cc_weight": 0.02, "feat_dim": 128,
           "kernel": "repdistiller", "student_feature": "penultimate",
           "teacher_feature": "penultimate"},
          _REPDISTILLER + " 0.02, LinearEmbed(128) on both sides", "distill",
          _build_cc),
    _spec("crd", "contrastive representation distillation (NCE, memory "
          "bank)", "Tian, Krishnan & Isola, Contrastive Representation "
          "Distillation, ICLR 2020", "https://arxiv.org/abs/1910.10699",
          "kdjax.losses.crd_term",
          {"ce_weight": 1.0, "crd_weight": 0.8, "feat_dim": 128,
           "nce_k": 16384, "nce_t": 0.07, "nce_m": 0.5,
           "student_feature": "penultimate",
           "teacher_feature": "penultimate"},
          _REPDISTILLER + " 0.8; feat_dim 128, nce_k 16384, nce_t 0.07, "
          "nce_m 0.5", "distill", _build_crd, needs_index=True),
    _spec("ensemble", "multi-teacher KD on the teachers' averaged "
          "distribution", "Hinton et al. 2015 (ensembles); You et al., "
          "Learning from Multiple Teacher Networks, KDD 2017",
          "https://dl.acm.org/doi/10.1145/3097983.3098135",
          "kdjax.losses.multi_teacher_kl, kdjax.models.ensemble_apply",
          {"temperature": 4.0, "ce_weight": 0.1, "kd_weight": 0.9,
           "mode": "mean_probs", "weights": None, "weight_temperature": 1.0},
          "KD's RepDistiller weights and T, on the mean of the teachers' "
          "probabilities", "ensemble", _build_ensemble),
    _spec("mean_teacher", "self-distillation from the student's EMA",
          "Tarvainen & Valpola, Mean teachers are better role models, "
          "NeurIPS 2017", "https://arxiv.org/abs/1703.01780",
          "kdjax.train.mean_teacher_step",
          {"ce_weight": 1.0, "consistency": "mse",
           "consistency_weight": 100.0, "rampup_steps": 2000,
           "ema_decay": 0.999},
          "reference code (CuriousAI/mean-teacher, CIFAR-10): softmax MSE, "
          "consistency 100 with a 5-epoch sigmoid ramp-up, EMA "
          "min(1 - 1/(t + 1), decay)", "mean_teacher", _build_mean_teacher),
    _spec("born_again", "generations of one architecture, each the teacher "
          "of the next", "Furlanello et al., Born-Again Neural Networks, "
          "ICML 2018", "https://arxiv.org/abs/1805.04770",
          "kdjax.train.born_again",
          {"temperature": 1.0, "ce_weight": 0.0, "kd_weight": 1.0,
           "generations": 3},
          "paper: match the previous generation's outputs (T = 1)",
          "born_again", _build_born_again),
]}


def get_method(name: str, **overrides: Any) -> MethodSpec:
  """The registered method ``name`` with hyper-parameter ``overrides``.

  Raises:
    ValueError: for an unknown method (listing the known ones) or an unknown
      hyper-parameter (listing the method's).
  """
  if name not in METHODS:
    raise ValueError(f"unknown distillation method {name!r}; known methods: "
                     f"{sorted(METHODS)}.")
  return METHODS[name].override(**overrides)


def build_loss(spec: MethodSpec | str,
               *,
               num_data: Optional[int] = None,
               dataset_labels: Optional[chex.Array] = None) -> losses.ComposedLoss:
  """The method's :class:`kdjax.losses.ComposedLoss`.

  Args:
    spec: a :class:`MethodSpec` (or a method name, with its defaults).
    num_data: the training-set size (needed by CRD's memory bank).
    dataset_labels: optional ``[num_data]`` classes (CRD draws its negatives
      from the other classes when given).

  Returns:
    The composed loss, with the method's temperature (1 when it has none).
  """
  if isinstance(spec, str):
    spec = get_method(spec)
  ctx = {"num_data": num_data, "dataset_labels": dataset_labels}
  terms = spec.build(spec.hparams, ctx)
  return losses.compose(terms,
                        temperature=spec.hparams.get("temperature", 1.0))


def methods_table() -> str:
  """A markdown table of the registry: method, paper, defaults, import."""

  def fmt(v):
    if isinstance(v, float):
      return f"{v:g}"
    if isinstance(v, tuple):
      return "/".join(fmt(x) for x in v)
    return str(v)

  rows = ["| Method | Paper | Defaults | Import |",
          "|---|---|---|---|"]
  for spec in METHODS.values():
    paper = f"[{spec.paper}]({spec.url})" if spec.url else spec.paper
    defaults = ", ".join(
        f"{k}=" + (",".join(f"{a}:{b}" for a, b in v) if k == "pairs"
                   else fmt(v)) for k, v in spec.hparams.items())
    api = ", ".join(f"`{a.strip()}`" for a in spec.api.split(","))
    rows.append(f"| `{spec.name}` | {paper} | {defaults} | {api} |")
  return "\n".join(rows)
