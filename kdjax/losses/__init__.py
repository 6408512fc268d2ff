"""kdjax.losses: pure, jit/grad/vmap-safe distillation losses.

Import alone, with no trainer: ``from kdjax import losses``. Each topic lives in
its own module; the public names are re-exported here.

Arguments are checked eagerly when concrete (``ValueError``: shapes, labels in
``[0, C)``, ``temperature > 0``, ...). Traced values (under ``jax.jit``) are
checked only inside :func:`runtime_checks`, as ``jax.experimental.checkify``
checks (``kdjax.train.make_train_step(..., checks=True)``).
"""

from typing import TYPE_CHECKING

from kdjax import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, {
    "._compose": ("ComposedLoss", "LossAux", "ScalarOrSchedule", "Term",
        "TermInputs", "compose", "dist_term", "dkd_term", "evaluate_schedule",
        "label_term", "logit_term"),
    "._decoupled": ("dist", "dkd", "dkd_terms"),
    "._divergences": ("DIVERGENCES", "TopKTeacher",
        "divergence_from_log_probs", "hard_label_cross_entropy",
        "jensen_shannon_divergence", "kl_divergence", "logit_divergence",
        "logit_mse", "reverse_kl_divergence", "skew_kl_divergence",
        "skew_reverse_kl_divergence", "soft_cross_entropy", "top_k_divergence",
        "top_k_teacher", "total_variation_distance",
        "top_k_divergence_from_student_log_probs"),
    "._large_vocab": ("DEFAULT_MEMORY_BUDGET_BYTES", "Unembedding",
        "choose_chunk_size", "cross_entropy_from_hidden",
        "divergence_from_hidden", "top_k_divergence_from_hidden"),
    "._vocab_sharded": ("vocab_sharded_divergence_from_hidden",),
    "._uld": ("align_responses", "check_uld_options", "sorted_probabilities",
        "sorted_probability_distance", "uld_loss",
        "universal_logit_distillation_loss",
        "universal_logit_distillation_parts"),
    "._features": ("Connector", "adaptive_avg_pool", "attention_map",
        "attention_transfer_loss", "attention_transfer_term",
        "feature_cosine_distance", "feature_mse", "feature_term",
        "fitnets_hint_loss", "fitnets_term", "get_feature"),
    "._relational": ("correlation_congruence_loss", "pairwise_distances",
        "pkt_loss", "relational_term", "rkd_angle_loss", "rkd_distance_loss",
        "similarity_preserving_loss"),
    "._contrastive": ("CRDEmbed", "CRDState", "crd_loss", "crd_nce_loss",
        "crd_term", "init_crd_heads", "init_crd_state",
        "sample_contrast_indices"),
    "._utils": ("check_logits_pair", "check_temperature",
        "check_unit_interval", "reduce_loss", "runtime_checks", "to_float32"),
    "._ensemble": ("confidence_weights", "ensemble_probabilities",
        "multi_teacher_kl", "multi_teacher_term", "stack_teacher_logits",
        "teacher_logits_of"),
})

if TYPE_CHECKING:  # the lazy names above, for type checkers and IDEs
  from kdjax.losses._compose import (
      ComposedLoss, LossAux, ScalarOrSchedule, Term, TermInputs, compose,
      dist_term, dkd_term, evaluate_schedule, label_term, logit_term)
  from kdjax.losses._contrastive import (
      CRDEmbed, CRDState, crd_loss, crd_nce_loss, crd_term, init_crd_heads,
      init_crd_state, sample_contrast_indices)
  from kdjax.losses._decoupled import dist, dkd, dkd_terms
  from kdjax.losses._divergences import (
      DIVERGENCES, TopKTeacher, divergence_from_log_probs,
      hard_label_cross_entropy, jensen_shannon_divergence, kl_divergence,
      logit_divergence, logit_mse, reverse_kl_divergence, skew_kl_divergence,
      skew_reverse_kl_divergence, soft_cross_entropy, top_k_divergence,
      top_k_teacher, total_variation_distance,
      top_k_divergence_from_student_log_probs)
  from kdjax.losses._ensemble import (
      confidence_weights, ensemble_probabilities, multi_teacher_kl,
      multi_teacher_term, stack_teacher_logits, teacher_logits_of)
  from kdjax.losses._features import (
      Connector, adaptive_avg_pool, attention_map, attention_transfer_loss,
      attention_transfer_term, feature_cosine_distance, feature_mse,
      feature_term, fitnets_hint_loss, fitnets_term, get_feature)
  from kdjax.losses._large_vocab import (
      DEFAULT_MEMORY_BUDGET_BYTES, Unembedding, choose_chunk_size,
      cross_entropy_from_hidden, divergence_from_hidden,
      top_k_divergence_from_hidden)
  from kdjax.losses._relational import (
      correlation_congruence_loss, pairwise_distances, pkt_loss,
      relational_term, rkd_angle_loss, rkd_distance_loss,
      similarity_preserving_loss)
  from kdjax.losses._uld import (
      align_responses, check_uld_options, sorted_probabilities,
      sorted_probability_distance, uld_loss, universal_logit_distillation_loss,
      universal_logit_distillation_parts)
  from kdjax.losses._utils import (
      check_logits_pair, check_temperature, check_unit_interval, reduce_loss,
      runtime_checks, to_float32)
  from kdjax.losses._vocab_sharded import vocab_sharded_divergence_from_hidden
