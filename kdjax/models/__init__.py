"""kdjax.models: the ModelOutput type, adapters to apply functions, reference models."""

from kdjax.models._adapters import from_function
from kdjax.models._adapters import from_linen
from kdjax.models._adapters import from_nnx
from kdjax.models._ensemble import ensemble_apply
from kdjax.models._output import ApplyFn
from kdjax.models._output import ModelOutput
from kdjax.models._output import check_finite_output
from kdjax.models._reference import CNN
from kdjax.models._reference import MLP
