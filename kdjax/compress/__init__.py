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
  arrays (``.npz``) and a loader script that needs jax but not kdjax. With
  w8a8 its Dense / Conv layers compute ``s_x[b] s_w[n] (q_x · q_w)`` with
  s8 x s8 -> s32 dots (:func:`int8_dense`, :func:`int8_conv`; dynamic
  per-example activation scales, per-output-channel weight scales).
"""

from typing import TYPE_CHECKING

from kdjax import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, {
    "._export": ("export_for_inference", "quantize_for_storage",
        "directory_size", "LOADER_SOURCE"),
    "._prune": ("PruneState", "apply_masks", "check_sparsity", "compute_masks",
        "current_masks", "kernel_mask", "prune", "prune_params", "sparsity_of",
        "sparsity_schedule"),
    "._quant": ("SUPPORTED_BITS", "QuantConfig", "check_bits", "fake_quant",
        "fake_quant_params", "quant_scale", "quantize_apply",
        "quantize_to_int", "qwix_quantize_module"),
})

if TYPE_CHECKING:  # the lazy names above, for type checkers and IDEs
  from kdjax.compress._export import (
      export_for_inference, quantize_for_storage, directory_size, LOADER_SOURCE)
  from kdjax.compress._prune import (
      PruneState, apply_masks, check_sparsity, compute_masks, current_masks,
      kernel_mask, prune, prune_params, sparsity_of, sparsity_schedule)
  from kdjax.compress._quant import (
      SUPPORTED_BITS, QuantConfig, check_bits, fake_quant, fake_quant_params,
      quant_scale, quantize_apply, quantize_to_int, qwix_quantize_module)
