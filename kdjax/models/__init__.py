"""kdjax.models: apply functions, the adapters that make them, reference models.

A teacher or a student is an *apply function*, a pure function::

  apply(variables, batch, *, train=False, rng=None) -> ModelOutput

* ``variables``: a mapping with the trainable parameters under ``"params"``
  and the model's other collections beside them (linen ``"batch_stats"``; NNX
  non-parameter state under ``"state"``). The train step differentiates
  ``variables["params"]`` only, and passes the variables as an argument of the
  jitted step (never closed over).
* ``batch``: a dict of arrays (``{"image", "label"}`` for images,
  ``{"tokens", "targets", "loss_mask", "prompt_len"}`` for ``kdjax.lm``); the
  model reads its input from ``batch[input_key]`` (or ``input_fn(batch)``).
* ``train``: training mode (dropout, batch statistics updated); ``rng``: the
  dropout key.

:class:`ModelOutput` (a pytree) holds ``logits`` ``[..., C]``, ``features``
(the named intermediate arrays asked for, ``{name: array}``; distillation
terms on features read them) and ``state`` (a training-mode call's updated
collections, e.g. ``batch_stats``, or ``None``; the train step writes it back
into the student's variables). ``output.feature(name)`` raises a ``KeyError``
listing the names present.

Adapters turn models into apply functions:

* :func:`from_linen` (a Flax linen module): ``feature_names`` are submodule
  paths (``"conv_1"``, ``"block/conv"``: the submodule's output) or names the
  module sows with ``self.sow("intermediates", name, x)``; ``train_kwarg``
  names the module's train flag; ``mutable_collections`` are updated in
  training mode.
* :func:`from_nnx` (a Flax NNX module): returns ``(apply, variables)``; the
  module is split once into its ``nnx.Param`` s and other state, merged
  afresh on each call, so the function stays pure. Features are attribute
  paths (``"encoder"``, ``"blocks/0"``) or ``self.sow(nnx.Intermediate, ...)``
  names.
* :func:`from_function` (``fn(params, x) -> logits | (logits, features) |
  ModelOutput``): ``variables = {"params": params}``.

A requested feature the model does not produce raises a ``KeyError`` listing
those it does produce. :func:`ensemble_apply` runs several teachers as one
apply function; :func:`check_finite_output` checks an output for NaN/inf
outside ``jit``. :class:`MLP` and :class:`CNN` are the reference linen models
(features: ``"penultimate"``, and the CNN's ``"block_<i>"`` per convolution
block).

Example::

  cnn = kdjax.models.CNN(channels=(8, 16), dense=32)
  variables = cnn.init(jax.random.PRNGKey(0), jnp.zeros((1, 28, 28, 1)))
  apply = kdjax.models.from_linen(cnn, feature_names=("penultimate",))
  out = apply(variables, {"image": images})   # out.logits, out.features
"""

from typing import TYPE_CHECKING

from kdjax import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, {
    "._adapters": ("from_function", "from_linen", "from_nnx"),
    "._ensemble": ("TEACHER_LOGITS_KEY", "ensemble_apply"),
    "._output": ("ApplyFn", "ModelOutput", "check_finite_output"),
    "._reference": ("CNN", "MLP", "max_pool_2x2"),
})

if TYPE_CHECKING:  # the lazy names above, for type checkers and IDEs
  from kdjax.models._adapters import from_function, from_linen, from_nnx
  from kdjax.models._ensemble import TEACHER_LOGITS_KEY, ensemble_apply
  from kdjax.models._output import ApplyFn, ModelOutput, check_finite_output
  from kdjax.models._reference import CNN, MLP, max_pool_2x2
