"""kdjax.models: the ModelOutput type, adapters to apply functions, reference models."""

from kdjax import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, {
    "._adapters": ("from_function", "from_linen", "from_nnx"),
    "._ensemble": ("ensemble_apply",),
    "._output": ("ApplyFn", "ModelOutput", "check_finite_output"),
    "._reference": ("CNN", "MLP"),
})
