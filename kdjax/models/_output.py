"""The output type every apply function returns."""

from __future__ import annotations

from typing import Any, Mapping, Optional, Protocol

import chex
import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class ModelOutput:
  """What a teacher or student apply function returns (a pytree).

  Attributes:
    logits: ``[..., C]`` logits.
    features: named intermediate features, ``{name: array}``; the names are
      the ones the user asked the adapter to capture.
    state: updated non-parameter collections of a Flax model (e.g. linen
      ``batch_stats`` or NNX ``BatchStat`` after a training-mode call), or
      ``None``; the train step writes them back into the model's variables.
  """
  logits: chex.Array
  features: Mapping[str, chex.Array] = flax.struct.field(default_factory=dict)
  state: Optional[Any] = None

  def feature(self, name: str) -> chex.Array:
    """Returns the named feature, or raises a clear error listing those present."""
    if name not in self.features:
      raise KeyError(
          f"the model did not produce a feature named {name!r}; available "
          f"features: {sorted(self.features)}. Ask the adapter to capture it "
          "(feature_names=...).")
    return self.features[name]


class ApplyFn(Protocol):
  """``apply(params, batch, *, train=False, rng=None) -> ModelOutput``."""

  def __call__(self, params: Any, batch: Any, *, train: bool = False,
               rng: Optional[chex.PRNGKey] = None) -> ModelOutput:
    ...


def check_finite_output(output: ModelOutput, who: str = "teacher") -> None:
  """Raises ``FloatingPointError`` if a (concrete) output holds NaN or inf.

  For use outside ``jax.jit`` (e.g. on the first batch, or in a cache builder);
  inside a jitted step use ``jax.experimental.checkify`` or the train step's
  ``check_finite`` option.
  """
  leaves = {"logits": output.logits, **{
      f"features[{k!r}]": v for k, v in output.features.items()}}
  for name, value in leaves.items():
    if isinstance(value, jax.core.Tracer):
      return
    bad = ~jnp.isfinite(jnp.asarray(value))
    if bool(jnp.any(bad)):
      raise FloatingPointError(
          f"the {who}'s {name} contain {int(jnp.sum(bad))} NaN/inf value(s) "
          f"(shape {jnp.shape(value)}); check the {who}'s parameters and "
          "inputs.")
