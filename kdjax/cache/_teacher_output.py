"""Teacher outputs read from a cache, and the apply function that returns them.

Training from a cache needs no teacher in memory: :func:`cached_teacher_apply`
(``TeacherCache.teacher_apply()``) is an apply function that reads the
teacher's outputs from ``batch["teacher"]`` and returns a
:class:`CachedTeacherOutput`, which duck-types ``kdjax.models.ModelOutput``;
the usual :func:`kdjax.train.make_train_step` (or a sharded step) then works
unchanged, with ``teacher_variables=None``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional

import chex
import flax.struct
import jax.numpy as jnp

from kdjax.cache._format import TEACHER_KEY
from kdjax.losses import TopKTeacher
from kdjax.train import reads_teacher_from_batch


@flax.struct.dataclass
class CachedTeacherOutput:
  """A teacher output read from a cache (duck-types ``kdjax.models.ModelOutput``).

  Attributes:
    dense_logits: ``[..., C]`` full logits (full-logit cache), else ``None``.
    top_k: :class:`kdjax.losses.TopKTeacher` (top-k cache), else ``None``.
    features: named features, ``{name: array}``.
    state: always ``None`` (the teacher is frozen).
    num_classes: ``C`` (static).
  """
  dense_logits: Optional[chex.Array] = None
  top_k: Optional[TopKTeacher] = None
  features: Mapping[str, chex.Array] = flax.struct.field(default_factory=dict)
  state: Optional[Any] = None
  num_classes: int = flax.struct.field(pytree_node=False, default=0)

  @property
  def logits(self) -> chex.Array:
    """The full ``[..., C]`` logits: stored, or rebuilt exactly from a top-k with k = C.

    Raises:
      ValueError: the cache keeps only ``k < C`` logits; use
        :func:`kdjax.cache.top_k_term` (``kdjax.losses.top_k_divergence``).
    """
    if self.dense_logits is not None:
      return self.dense_logits
    k = self.top_k.values.shape[-1]
    if k != self.num_classes:
      raise ValueError(
          f"this teacher cache keeps only the top k={k} of {self.num_classes} "
          "logits, so full teacher logits are not available; use a top-k "
          "loss term (kdjax.cache.top_k_term / kdjax.losses.top_k_divergence) "
          "or build the cache with k=None.")
    # k == C: the indices are a permutation; invert it (exact, no arithmetic).
    inverse = jnp.argsort(self.top_k.indices, axis=-1)
    return jnp.take_along_axis(self.top_k.values, inverse, axis=-1)

  def feature(self, name: str) -> chex.Array:
    if name not in self.features:
      raise KeyError(
          f"the teacher cache holds no feature named {name!r}; cached "
          f"features: {sorted(self.features)}. Rebuild the cache with "
          f"feature_names=[..., {name!r}].")
    return self.features[name]


def cached_teacher_apply(*, num_classes: int, temperature: float = 1.0,
                         key: str = TEACHER_KEY
                         ) -> Callable[..., CachedTeacherOutput]:
  """An apply function that returns the teacher output stored in ``batch[key]``.

  ``batch[key]`` is ``{"logits": [B, C]}`` or ``{"values", "indices",
  "logsumexp"}`` (``[B, k]``, ``[B, k]``, ``[B]``), plus an optional
  ``"features": {name: array}``, each in the teacher's own layout (as
  :meth:`TeacherCache.batches` yields them: e.g. ``[M, B, C]`` for the
  ``"teacher_logits"`` of an ensemble). The ``variables`` argument is ignored.
  """

  def apply(variables, batch, *, train: bool = False, rng=None):
    del variables, train, rng
    if key not in batch:
      raise KeyError(
          f"the batch has no {key!r} entry with cached teacher outputs; keys "
          f"present: {sorted(batch)}. Iterate batches from a TeacherCache.")
    entry = batch[key]
    features = dict(entry.get("features", {}))
    if "logits" in entry:
      return CachedTeacherOutput(dense_logits=entry["logits"],
                                 features=features, num_classes=num_classes)
    top = TopKTeacher(entry["values"], entry["indices"],
                      entry.get("logsumexp"),
                      jnp.asarray(temperature, jnp.float32))
    return CachedTeacherOutput(top_k=top, features=features,
                               num_classes=num_classes)

  return reads_teacher_from_batch(apply)
