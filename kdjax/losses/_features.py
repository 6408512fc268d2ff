"""Feature (hint) distillation: FitNets, attention transfer, feature MSE/cosine.

The losses here compare intermediate features of a student and a teacher:
``[B, D]`` embeddings or channels-last maps ``[B, H, W, C]`` (any rank
``[B, *spatial, C]`` works where noted). They compute in float32 whatever the
input dtype (bfloat16 included) and are jit/grad/vmap-safe.

Conventions
-----------
* The *per-example* loss is the mean over that example's elements; ``mask``
  (bool or float weights) has the shape of a leading prefix of the feature's
  shape without the channel axis (``[B]``, or ``[B, T]`` for ``[B, T, D]``
  tokens); ``reduction="mean"`` averages over unmasked entries (so without a
  mask it is the plain mean over all elements, PyTorch's ``nn.MSELoss()``),
  ``"sum"`` sums them, ``"none"`` returns them (masked entries 0).
* No gradient is stopped on the teacher: the train step passes a
  ``stop_gradient``-ed teacher output.
* A :class:`Connector` (a dense layer for ``[B, D]``, a 1x1 convolution for
  ``[B, H, W, C]``) maps student features to the teacher's width; it is a
  learnable loss parameter (trained with the student, dropped at export). It
  does not resize spatial dimensions: pass ``pooling="spatial"`` to
  :func:`feature_mse` for that.
* Spatial resizing (``attention_transfer_loss``, ``pooling="spatial"``) is
  adaptive average pooling of the larger feature to the smaller size, per
  spatial axis, with PyTorch's ``adaptive_avg_pool`` bins (bin ``i`` of an
  axis of length ``n`` pooled to ``m`` covers
  ``[floor(i n / m), ceil((i + 1) n / m))``), as RepDistiller's AT does.

The ``*_term`` factories wrap the losses as :class:`kdjax.losses.Term` s that
read ``inputs.student.features[name]`` and ``inputs.teacher.features[name]``.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kdjax.losses import _utils
from kdjax.losses._compose import ScalarOrSchedule
from kdjax.losses._compose import Term
from kdjax.losses._compose import TermInputs
from kdjax.losses._compose import batch_mask

POOLINGS = (None, "global", "spatial")
CONNECTOR_KINDS = ("auto", "dense", "conv")
_NORMALIZE_EPS = 1e-12  # torch.nn.functional.normalize's default eps.

# -----------------------------------------------------------------------------
# Helpers.
# -----------------------------------------------------------------------------


def get_feature(output: Any, name: str, who: str) -> chex.Array:
  """Returns ``output.features[name]``; a clear KeyError lists those present.

  ``output`` is duck-typed (anything with a ``.features`` mapping, e.g.
  ``kdjax.models.ModelOutput``); ``who`` is ``"student"`` or ``"teacher"``.
  """
  if output is None:
    raise ValueError(
        f"a feature term needs the {who}'s output, got None (is the {who} "
        "dropped by a schedule?).")
  features = getattr(output, "features", None)
  if features is None:
    features = {}
  if name not in features:
    raise KeyError(
        f"the {who} did not produce a feature named {name!r}; available "
        f"{who} features: {sorted(features)}. Ask the {who}'s adapter to "
        "capture it (feature_names=...).")
  return features[name]


def safe_norm(x: chex.Array, axis: int = -1,
              keepdims: bool = False) -> chex.Array:
  """Euclidean norm whose gradient at ``x = 0`` is 0 instead of NaN."""
  sq = jnp.sum(jnp.square(x), axis=axis, keepdims=keepdims)
  positive = sq > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def l2_normalize(x: chex.Array, axis: int = -1,
                 eps: float = _NORMALIZE_EPS) -> chex.Array:
  """``x / max(||x||, eps)`` (torch's ``F.normalize``); finite grads."""
  return x / jnp.maximum(safe_norm(x, axis=axis, keepdims=True), eps)


def _pool_matrix(n: int, m: int) -> np.ndarray:
  """``[m, n]`` matrix of PyTorch's adaptive average pooling, ``n -> m``."""
  mat = np.zeros((m, n), np.float32)
  for i in range(m):
    start = (i * n) // m
    end = -((-(i + 1) * n) // m)  # ceil((i + 1) n / m)
    mat[i, start:end] = 1.0 / (end - start)
  return mat


def adaptive_avg_pool(x: chex.Array, sizes: Sequence[int]) -> chex.Array:
  """Adaptive average pooling of the spatial axes of ``x: [B, *spatial, C]``.

  Pools each spatial axis of length ``n`` to ``sizes[k]`` with PyTorch's
  ``adaptive_avg_pool{1,2,3}d`` bins (exact when ``n`` is a multiple of the
  target, overlapping bins otherwise). Axes already of the target size are
  untouched.
  """
  spatial = x.shape[1:-1]
  if len(sizes) != len(spatial):
    raise ValueError(
        f"adaptive_avg_pool: {len(sizes)} target sizes for {len(spatial)} "
        f"spatial axes (input shape {x.shape}).")
  for axis, (n, m) in enumerate(zip(spatial, sizes), start=1):
    if n == m:
      continue
    if m > n or m < 1:
      raise ValueError(
          f"adaptive_avg_pool only shrinks: axis {axis} has size {n}, target "
          f"{m}.")
    mat = jnp.asarray(_pool_matrix(n, m))
    x = jnp.moveaxis(
        jnp.tensordot(x, mat, axes=((axis,), (1,)),
                      precision=jax.lax.Precision.HIGHEST), -1, axis)
  return x


def _pool_pair(student: chex.Array, teacher: chex.Array,
               pooling: Optional[str]) -> tuple[chex.Array, chex.Array]:
  """Applies ``pooling`` (None, "global" or "spatial") to both features."""
  if pooling not in POOLINGS:
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
  if pooling is None:
    return student, teacher
  if student.ndim != teacher.ndim:
    raise ValueError(
        f"pooling={pooling!r} needs features of the same rank; got student "
        f"shape {student.shape} and teacher shape {teacher.shape}.")
  if student.ndim < 3:
    return student, teacher  # [B, D]: nothing spatial to pool.
  if pooling == "global":
    axes = tuple(range(1, student.ndim - 1))
    return jnp.mean(student, axis=axes), jnp.mean(teacher, axis=axes)
  sizes = [min(a, b) for a, b in zip(student.shape[1:-1], teacher.shape[1:-1])]
  return adaptive_avg_pool(student, sizes), adaptive_avg_pool(teacher, sizes)


def _check_feature_mask(mask: Optional[chex.Array], shape: tuple) -> None:
  if mask is None:
    return
  mshape = tuple(jnp.shape(mask))
  if not 1 <= len(mshape) <= len(shape) - 1 or shape[:len(mshape)] != mshape:
    raise ValueError(
        f"mask shape {mshape} must be a leading prefix of the feature shape "
        f"without its channel axis, {shape[:-1]} (e.g. [B]).")


def _reduce_per_position(per_position: chex.Array, mask: Optional[chex.Array],
                         reduction: str) -> chex.Array:
  """Averages ``per_position`` down to the mask's rank (``[B]``), reduces."""
  keep = 1 if mask is None else jnp.ndim(mask)
  axes = tuple(range(keep, per_position.ndim))
  if axes:
    per_position = jnp.mean(per_position, axis=axes)
  return _utils.reduce_loss(per_position, mask, reduction)


# -----------------------------------------------------------------------------
# Connector.
# -----------------------------------------------------------------------------


class Connector(nn.Module):
  """Maps student features to the teacher's width (the FitNets regressor).

  ``kind="dense"``: ``y = x W + b`` on the last axis (for ``[B, D]``);
  ``kind="conv"``: a 1x1 convolution (``[B, H, W, C]``, or any
  ``[B, *spatial, C]``); ``kind="auto"``: dense for rank 2, conv otherwise.
  Spatial sizes are kept (resizing is not a connector's job). Computes in
  float32; initialise with ``Connector(C_t).init(rng, student_feature)``.

  Attributes:
    features: the output width (the teacher's channel count ``C_t``).
    kind: ``"auto"``, ``"dense"`` or ``"conv"``.
    use_bias: whether to add a bias.
  """
  features: int
  kind: str = "auto"
  use_bias: bool = True

  @nn.compact
  def __call__(self, x: chex.Array) -> chex.Array:
    if self.kind not in CONNECTOR_KINDS:
      raise ValueError(
          f"Connector kind must be one of {CONNECTOR_KINDS}, got "
          f"{self.kind!r}.")
    x = _utils.to_float32(x)
    if x.ndim < 2:
      raise ValueError(
          f"Connector needs [B, ..., C] inputs, got shape {x.shape}.")
    kind = self.kind
    if kind == "auto":
      kind = "dense" if x.ndim == 2 else "conv"
    if kind == "dense":
      return nn.Dense(self.features, use_bias=self.use_bias,
                      dtype=jnp.float32, param_dtype=jnp.float32,
                      name="proj")(x)
    if x.ndim < 3:
      raise ValueError(
          "a conv Connector needs [B, *spatial, C] inputs, got shape "
          f"{x.shape}.")
    return nn.Conv(self.features, (1,) * (x.ndim - 2), use_bias=self.use_bias,
                   dtype=jnp.float32, param_dtype=jnp.float32, name="proj")(x)


def _apply_connector(x: chex.Array, connector, connector_params) -> chex.Array:
  """Applies a Connector (or any module/callable) to the student feature."""
  if connector is None:
    if connector_params is not None:
      raise ValueError(
          "connector_params were given without a connector; pass "
          "connector=kdjax.losses.Connector(teacher_width) as well.")
    return x
  if isinstance(connector, nn.Module):
    if connector_params is None:
      raise ValueError(
          "a connector module needs connector_params (from "
          "connector.init(rng, student_feature)['params']).")
    variables = (connector_params
                 if isinstance(connector_params, Mapping)
                 and "params" in connector_params else
                 {"params": connector_params})
    return connector.apply(variables, x)
  if connector_params is None:
    return connector(x)
  return connector(connector_params, x)


def _check_same_shape(student: chex.Array, teacher: chex.Array, what: str,
                      connected: bool) -> None:
  if student.shape == teacher.shape:
    return
  if student.ndim != teacher.ndim:
    problem = (f"ranks differ ({student.ndim} vs {teacher.ndim})")
  elif student.shape[0] != teacher.shape[0]:
    problem = f"batch sizes differ ({student.shape[0]} vs {teacher.shape[0]})"
  elif student.shape[-1] != teacher.shape[-1]:
    problem = (f"widths differ ({student.shape[-1]} vs {teacher.shape[-1]})")
  else:
    problem = "spatial sizes differ"
  if connected:
    hint = (" (after the connector); the connector must output the teacher's "
            "shape")
  elif "spatial" in problem:
    hint = ("; a connector does not resize: use feature_mse(..., "
            "pooling='spatial' or 'global')")
  else:
    hint = (" and no connector was given; pass connector="
            "kdjax.losses.Connector(teacher_width) with its connector_params "
            "(or use fitnets_term, which creates one)")
  raise ValueError(
      f"{what}: student feature shape {student.shape} and teacher feature "
      f"shape {teacher.shape} are incompatible: {problem}{hint}.")


# -----------------------------------------------------------------------------
# Losses.
# -----------------------------------------------------------------------------


def feature_mse(student_feature: chex.Array,
                teacher_feature: chex.Array,
                *,
                pooling: Optional[str] = None,
                connector: Optional[Any] = None,
                connector_params: Optional[Any] = None,
                mask: Optional[chex.Array] = None,
                reduction: str = "mean") -> chex.Array:
  """Mean squared error of (pooled, projected) student and teacher features.

  ``loss_b = mean_{positions, c} (r(P(s))_b - P(t)_b)^2`` where ``P`` is the
  pooling and ``r`` the optional connector. Pooling: ``None``; ``"global"``,
  the average over the spatial axes (``[B, *spatial, C] -> [B, C]``);
  ``"spatial"``, adaptive average pooling of each spatial axis to the smaller
  of the two sizes. Pooling runs before the connector (both are linear over
  positions, so the order does not change a 1x1-conv result).

  Args:
    student_feature: ``[B, ..., C_s]`` student feature.
    teacher_feature: ``[B, ..., C_t]`` teacher feature.
    pooling: ``None``, ``"global"`` or ``"spatial"``.
    connector: optional :class:`Connector` (or ``fn(params, x)`` / ``fn(x)``)
      mapping the student to the teacher's width.
    connector_params: the connector's ``params`` collection.
    mask: optional mask over a leading prefix of the positions (``[B]``).
    reduction: ``"mean"``, ``"sum"`` or ``"none"`` (over mask entries).

  Returns:
    Scalar, or the per-example (per mask entry) losses for ``"none"``.
  """
  return _mse(student_feature, teacher_feature, pooling, connector,
              connector_params, mask, reduction, "feature_mse")


def _mse(student_feature, teacher_feature, pooling, connector,
         connector_params, mask, reduction, what):
  _utils.check_reduction(reduction)
  s = _utils.to_float32(student_feature)
  t = _utils.to_float32(teacher_feature)
  s, t = _pool_pair(s, t, pooling)
  s = _apply_connector(s, connector, connector_params)
  _check_same_shape(s, t, what, connected=connector is not None)
  _check_feature_mask(mask, t.shape)
  per_position = jnp.mean(jnp.square(s - t), axis=-1)
  return _reduce_per_position(per_position, mask, reduction)


def fitnets_hint_loss(student_feature: chex.Array,
                      teacher_feature: chex.Array,
                      *,
                      connector_params: Optional[Any] = None,
                      connector: Optional[Any] = None,
                      mask: Optional[chex.Array] = None,
                      reduction: str = "mean") -> chex.Array:
  """FitNets hint loss (Romero et al., ICLR 2015): MSE of regressed hints.

  ``loss = mean (r(s) - t)^2`` where ``r`` is the connector (the paper's
  regressor; a :class:`Connector`: dense or 1x1 conv) or the identity when
  shapes already agree, as RepDistiller's ``HintLoss`` (``nn.MSELoss`` on
  ``ConvReg(f_s)`` and ``f_t``; github.com/HobbitLong/RepDistiller,
  ``distiller_zoo/FitNet.py``).

  Args:
    student_feature: ``[B, D_s]`` or ``[B, H, W, C_s]``.
    teacher_feature: ``[B, D_t]`` or ``[B, H, W, C_t]`` (same spatial size).
    connector_params: the connector's ``params`` collection.
    connector: a :class:`Connector` (or callable); required when the ranks or
      widths differ (a ValueError says so otherwise).
    mask: optional ``[B]`` (or longer prefix) mask.
    reduction: ``"mean"``, ``"sum"`` or ``"none"``.

  Returns:
    Scalar, or ``[B]`` for ``"none"``.
  """
  return _mse(student_feature, teacher_feature, None, connector,
              connector_params, mask, reduction, "fitnets_hint_loss")


def feature_cosine_distance(student_feature: chex.Array,
                            teacher_feature: chex.Array,
                            *,
                            pooling: Optional[str] = None,
                            connector: Optional[Any] = None,
                            connector_params: Optional[Any] = None,
                            eps: float = 1e-8,
                            mask: Optional[chex.Array] = None,
                            reduction: str = "mean") -> chex.Array:
  """Cosine distance ``1 - cos(r(P(s)), P(t))`` over the channel (last) axis.

  ``cos(u, v) = <u / max(|u|, eps), v / max(|v|, eps)>`` per position
  (each example for ``[B, D]``, each spatial position or token for
  ``[B, *spatial, C]``), averaged over the positions of an example. Pooling and
  connector as in :func:`feature_mse`. Lies in ``[0, 2]``; 0 when the
  features are positive multiples of each other.

  Args:
    student_feature: ``[B, ..., C_s]``.
    teacher_feature: ``[B, ..., C_t]``.
    pooling: ``None``, ``"global"`` or ``"spatial"``.
    connector: optional :class:`Connector` (or callable).
    connector_params: the connector's ``params`` collection.
    eps: lower bound of the norms.
    mask: optional ``[B]`` (or longer prefix) mask.
    reduction: ``"mean"``, ``"sum"`` or ``"none"``.

  Returns:
    Scalar, or ``[B]`` for ``"none"``.
  """
  _utils.check_reduction(reduction)
  s = _utils.to_float32(student_feature)
  t = _utils.to_float32(teacher_feature)
  s, t = _pool_pair(s, t, pooling)
  s = _apply_connector(s, connector, connector_params)
  _check_same_shape(s, t, "feature_cosine_distance",
                    connected=connector is not None)
  _check_feature_mask(mask, t.shape)
  cos = jnp.sum(l2_normalize(s, eps=eps) * l2_normalize(t, eps=eps), axis=-1)
  return _reduce_per_position(1.0 - cos, mask, reduction)


def attention_map(feature: chex.Array, p: float = 2) -> chex.Array:
  """Spatial attention map of Zagoruyko & Komodakis (ICLR 2017).

  ``Q = vec(mean_c |A_c|^p)`` flattened over the spatial positions and
  L2-normalised, ``Q / max(||Q||_2, 1e-12)``. The paper sums over channels;
  the reference code (github.com/szagoruyko/attention-transfer, RepDistiller
  ``distiller_zoo/AT.py``: ``F.normalize(f.pow(p).mean(1).view(B, -1))``)
  averages: after normalisation the two agree. ``|A|`` makes odd ``p`` well
  defined (the reference uses ``A^p``; identical for even ``p``).

  Args:
    feature: ``[B, *spatial, C]`` channels-last activations (``[B, H, W, C]``).
    p: the exponent (2 in the paper).

  Returns:
    ``[B, prod(spatial)]`` float32 unit-norm maps.
  """
  x = _utils.to_float32(feature)
  if x.ndim < 3:
    raise ValueError(
        "attention_map needs channels-last feature maps [B, *spatial, C] "
        f"(e.g. [B, H, W, C]), got shape {x.shape}.")
  if p == 2:
    powered = jnp.square(x)
  else:
    powered = jnp.power(jnp.abs(x), p)
  q = jnp.mean(powered, axis=-1).reshape(x.shape[0], -1)
  return l2_normalize(q, axis=-1)


def attention_transfer_loss(student_feature: chex.Array,
                            teacher_feature: chex.Array,
                            *,
                            p: float = 2,
                            mask: Optional[chex.Array] = None,
                            reduction: str = "mean") -> chex.Array:
  """Attention transfer (Zagoruyko & Komodakis, ICLR 2017), as reference code.

  ``loss_b = mean_j (Q_s - Q_t)_{b j}^2`` with ``Q = attention_map(., p)``;
  ``"mean"`` is ``(at(x) - at(y)).pow(2).mean()`` of the reference. The paper's
  ``beta / 2`` factor (``beta = 1000``) is the term's weight, not part of this
  function. Channel counts may differ. When the spatial sizes differ, the
  larger *feature* is adaptive-average-pooled to the smaller size on each
  spatial axis before its map is taken, as RepDistiller's ``at_loss``
  (``F.adaptive_avg_pool2d``). Zero when the maps agree; invariant to a
  positive scaling of either feature.

  Args:
    student_feature: ``[B, H_s, W_s, C_s]`` (or ``[B, *spatial, C_s]``).
    teacher_feature: ``[B, H_t, W_t, C_t]``.
    p: the attention exponent.
    mask: optional ``[B]`` mask.
    reduction: ``"mean"``, ``"sum"`` or ``"none"``.

  Returns:
    Scalar, or ``[B]`` for ``"none"``.
  """
  _utils.check_reduction(reduction)
  s = _utils.to_float32(student_feature)
  t = _utils.to_float32(teacher_feature)
  if s.ndim != t.ndim or s.ndim < 3 or s.shape[0] != t.shape[0]:
    raise ValueError(
        "attention_transfer_loss needs channels-last maps [B, *spatial, C] of "
        f"the same rank and batch size; got student shape {s.shape} and "
        f"teacher shape {t.shape}.")
  if s.shape[1:-1] != t.shape[1:-1]:
    sizes = [min(a, b) for a, b in zip(s.shape[1:-1], t.shape[1:-1])]
    s, t = adaptive_avg_pool(s, sizes), adaptive_avg_pool(t, sizes)
  if mask is not None and tuple(jnp.shape(mask)) != (s.shape[0],):
    raise ValueError(
        f"attention_transfer_loss mask must have shape [B] = ({s.shape[0]},), "
        f"got {tuple(jnp.shape(mask))}.")
  diff = attention_map(s, p) - attention_map(t, p)
  return _reduce_per_position(jnp.square(diff), mask, reduction)


# -----------------------------------------------------------------------------
# Term factories.
# -----------------------------------------------------------------------------


def _connector_width(teacher: chex.Array) -> int:
  return int(teacher.shape[-1])


def _make_connector_init(student_feature: str, teacher_feature: str,
                         connector_kind: str, pooling: Optional[str]):
  def init_params(rng, student_out, teacher_out, batch):
    del batch
    s = _utils.to_float32(get_feature(student_out, student_feature, "student"))
    t = _utils.to_float32(get_feature(teacher_out, teacher_feature, "teacher"))
    s, t = _pool_pair(s, t, pooling)
    module = Connector(_connector_width(t), kind=connector_kind)
    return module.init(rng, s)["params"]
  return init_params


def _connector_from_params(name: str, params, teacher: chex.Array,
                           connector_kind: str) -> Connector:
  if params is None:
    raise ValueError(
        f"loss term {name!r} has a learnable connector but received no params; "
        "create them with loss_fn.init_params(rng, student_out, teacher_out, "
        "batch) and pass params= to the composed loss (create_state("
        "loss_params=...) in training).")
  return Connector(_connector_width(teacher), kind=connector_kind)


def _check_connector_kind(connector_kind):
  if connector_kind is not None and connector_kind not in CONNECTOR_KINDS:
    raise ValueError(
        f"connector_kind must be None or one of {CONNECTOR_KINDS}, got "
        f"{connector_kind!r}.")


def feature_term(name: str,
                 student_feature: str,
                 teacher_feature: str,
                 *,
                 kind: str = "mse",
                 pooling: Optional[str] = None,
                 weight: ScalarOrSchedule = 1.0,
                 connector_kind: Optional[str] = None,
                 mask_key: Optional[str] = "mask") -> Term:
  """A :class:`Term` comparing one student feature with one teacher feature.

  ``kind="mse"`` uses :func:`feature_mse`, ``kind="cosine"``
  :func:`feature_cosine_distance`. With ``connector_kind`` (``"auto"``,
  ``"dense"``, ``"conv"``) the term owns a learnable :class:`Connector` to
  the teacher's width, created by the term's ``init_params`` from the
  (pooled) feature shapes; ``None`` (default) compares the features as they
  are. ``batch[mask_key]``, when present, is the mask.

  Args:
    name: the term's name.
    student_feature: key into ``student.features``.
    teacher_feature: key into ``teacher.features``.
    kind: ``"mse"`` or ``"cosine"``.
    pooling: ``None``, ``"global"`` or ``"spatial"``.
    weight: float or optax schedule.
    connector_kind: ``None`` or a :class:`Connector` kind.
    mask_key: batch key of the mask, or ``None``.

  Returns:
    A :class:`kdjax.losses.Term`.
  """
  losses = {"mse": feature_mse, "cosine": feature_cosine_distance}
  if kind not in losses:
    raise ValueError(f"feature_term kind must be one of {sorted(losses)}, got "
                     f"{kind!r}.")
  if pooling not in POOLINGS:
    raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}.")
  _check_connector_kind(connector_kind)
  loss_fn = losses[kind]

  def fn(inputs: TermInputs) -> chex.Array:
    s = get_feature(inputs.student, student_feature, "student")
    t = get_feature(inputs.teacher, teacher_feature, "teacher")
    extra = {}
    if connector_kind is not None:
      extra["connector"] = _connector_from_params(name, inputs.params, t,
                                                  connector_kind)
      extra["connector_params"] = inputs.params
    try:
      return loss_fn(s, t, pooling=pooling,
                     mask=batch_mask(inputs.batch, mask_key), **extra)
    except ValueError as e:
      raise ValueError(
          f"loss term {name!r} (student feature {student_feature!r}, teacher "
          f"feature {teacher_feature!r}): {e}") from e

  init = (None if connector_kind is None else
          _make_connector_init(student_feature, teacher_feature,
                               connector_kind, pooling))
  return Term(name, fn, weight, init_params=init)


def fitnets_term(name: str,
                 student_feature: str,
                 teacher_feature: str,
                 weight: ScalarOrSchedule = 1.0,
                 *,
                 connector_kind: Optional[str] = "auto",
                 mask_key: Optional[str] = "mask") -> Term:
  """FitNets (Romero et al. 2015) as a :class:`Term` with a learnable connector.

  The term's ``init_params(rng, student_out, teacher_out, batch)`` creates a
  :class:`Connector` (``connector_kind``: ``"auto"`` = dense for ``[B, D]``,
  1x1 conv for ``[B, H, W, C]``) from the two feature shapes; its value is
  :func:`fitnets_hint_loss`. ``connector_kind=None`` drops the connector
  (features must then have the same shape).

  Example::

    loss_fn = losses.compose(
        [losses.fitnets_term("hint", "block_1", "block_2", weight=100.0)])
    loss_params = loss_fn.init_params(rng, student_out, teacher_out, batch)
    total, aux = loss_fn(student_out, teacher_out, batch, params=loss_params)

  Args:
    name: the term's name.
    student_feature: key into ``student.features`` (the guided layer).
    teacher_feature: key into ``teacher.features`` (the hint layer).
    weight: float or optax schedule.
    connector_kind: ``"auto"``, ``"dense"``, ``"conv"`` or ``None``.
    mask_key: batch key of the mask, or ``None``.

  Returns:
    A :class:`kdjax.losses.Term`.
  """
  return feature_term(name, student_feature, teacher_feature, kind="mse",
                      pooling=None, weight=weight,
                      connector_kind=connector_kind, mask_key=mask_key)


def attention_transfer_term(name: str,
                            pairs: Sequence[tuple[str, str]],
                            weight: ScalarOrSchedule = 1.0,
                            *,
                            p: float = 2,
                            mask_key: Optional[str] = "mask") -> Term:
  """Attention transfer over several layer pairs as one :class:`Term`.

  The value is ``sum_{(s, t) in pairs} attention_transfer_loss(s, t, p=p)``
  (RepDistiller sums the per-layer losses and weights the sum by
  ``beta = 1000``; the paper uses ``beta / 2`` per pair).

  Args:
    name: the term's name.
    pairs: ``[(student_feature, teacher_feature), ...]`` names.
    weight: float or optax schedule.
    p: the attention exponent.
    mask_key: batch key of a ``[B]`` mask, or ``None``.

  Returns:
    A :class:`kdjax.losses.Term`.
  """
  pairs = tuple(tuple(pair) for pair in pairs)
  if not pairs or any(len(pair) != 2 for pair in pairs):
    raise ValueError(
        "attention_transfer_term needs a non-empty list of (student_feature, "
        f"teacher_feature) pairs, got {pairs!r}.")

  def fn(inputs: TermInputs) -> chex.Array:
    mask = batch_mask(inputs.batch, mask_key)
    total = jnp.zeros((), jnp.float32)
    for s_name, t_name in pairs:
      s = get_feature(inputs.student, s_name, "student")
      t = get_feature(inputs.teacher, t_name, "teacher")
      total = total + attention_transfer_loss(s, t, p=p, mask=mask)
    return total

  return Term(name, fn, weight)
