"""kdjax.compress: quantised and pruned students, and a kdjax-free export.

* Quantisation-aware distillation: :func:`quantize_apply` wraps a student's
  apply function (int8 / int4 per-channel weights, int8 activations,
  straight-through gradients) for the ordinary ``kdjax.train`` step;
  :func:`fake_quant` is the primitive; :func:`qwix_quantize_module` uses
  Google's Qwix instead (optional). Evaluating a float student through
  :func:`quantize_apply` is post-training quantisation.
* Pruning with distillation: :func:`sparsity_schedule` (Zhu & Gupta 2017),
  :func:`prune` (an optax transformation keeping pruned weights at zero),
  unstructured or structured (neurons/channels) magnitude masks.
* :func:`export_for_inference`: a serialized ``jax.export`` artifact, its
  arrays (``.npz``) and a loader script that needs jax but not kdjax.
"""

from kdjax.compress._export import export_for_inference
from kdjax.compress._export import quantize_for_storage
from kdjax.compress._export import directory_size
from kdjax.compress._export import LOADER_SOURCE
from kdjax.compress._prune import PruneState
from kdjax.compress._prune import apply_masks
from kdjax.compress._prune import check_sparsity
from kdjax.compress._prune import compute_masks
from kdjax.compress._prune import current_masks
from kdjax.compress._prune import kernel_mask
from kdjax.compress._prune import prune
from kdjax.compress._prune import prune_params
from kdjax.compress._prune import sparsity_of
from kdjax.compress._prune import sparsity_schedule
from kdjax.compress._quant import SUPPORTED_BITS
from kdjax.compress._quant import QuantConfig
from kdjax.compress._quant import check_bits
from kdjax.compress._quant import fake_quant
from kdjax.compress._quant import fake_quant_params
from kdjax.compress._quant import quant_scale
from kdjax.compress._quant import quantize_apply
from kdjax.compress._quant import quantize_to_int
from kdjax.compress._quant import qwix_quantize_module
