"""kdjax.losses: pure, jit/grad/vmap-safe distillation losses.

Import alone, with no trainer: ``from kdjax import losses``. Each topic lives in
its own module; the public names are re-exported here.

Arguments are checked eagerly when concrete (``ValueError``: shapes, labels in
``[0, C)``, ``temperature > 0``, ...). Traced values (under ``jax.jit``) are
checked only inside :func:`runtime_checks`, as ``jax.experimental.checkify``
checks (``kdjax.train.make_train_step(..., checks=True)``).
"""

from kdjax.losses._compose import ComposedLoss
from kdjax.losses._compose import LossAux
from kdjax.losses._compose import Term
from kdjax.losses._compose import TermInputs
from kdjax.losses._compose import compose
from kdjax.losses._compose import dist_term
from kdjax.losses._compose import dkd_term
from kdjax.losses._compose import evaluate_schedule
from kdjax.losses._compose import label_term
from kdjax.losses._compose import logit_term
from kdjax.losses._decoupled import dist
from kdjax.losses._decoupled import dkd
from kdjax.losses._decoupled import dkd_terms
from kdjax.losses._divergences import DIVERGENCES
from kdjax.losses._divergences import TopKTeacher
from kdjax.losses._divergences import divergence_from_log_probs
from kdjax.losses._divergences import hard_label_cross_entropy
from kdjax.losses._divergences import jensen_shannon_divergence
from kdjax.losses._divergences import kl_divergence
from kdjax.losses._divergences import logit_divergence
from kdjax.losses._divergences import logit_mse
from kdjax.losses._divergences import reverse_kl_divergence
from kdjax.losses._divergences import skew_kl_divergence
from kdjax.losses._divergences import skew_reverse_kl_divergence
from kdjax.losses._divergences import soft_cross_entropy
from kdjax.losses._divergences import top_k_divergence
from kdjax.losses._divergences import top_k_teacher
from kdjax.losses._divergences import total_variation_distance
from kdjax.losses._divergences import top_k_divergence_from_student_log_probs
from kdjax.losses._large_vocab import DEFAULT_MEMORY_BUDGET_BYTES
from kdjax.losses._large_vocab import Unembedding
from kdjax.losses._large_vocab import choose_chunk_size
from kdjax.losses._large_vocab import cross_entropy_from_hidden
from kdjax.losses._large_vocab import divergence_from_hidden
from kdjax.losses._large_vocab import top_k_divergence_from_hidden
from kdjax.losses._large_vocab import vocab_sharded_divergence_from_hidden
from kdjax.losses._utils import runtime_checks
from kdjax.losses._uld import align_responses
from kdjax.losses._uld import sorted_probabilities
from kdjax.losses._uld import sorted_probability_distance
from kdjax.losses._uld import uld_loss
from kdjax.losses._uld import universal_logit_distillation_loss
from kdjax.losses._uld import universal_logit_distillation_parts
from kdjax.losses._features import Connector
from kdjax.losses._features import adaptive_avg_pool
from kdjax.losses._features import attention_map
from kdjax.losses._features import attention_transfer_loss
from kdjax.losses._features import attention_transfer_term
from kdjax.losses._features import feature_cosine_distance
from kdjax.losses._features import feature_mse
from kdjax.losses._features import feature_term
from kdjax.losses._features import fitnets_hint_loss
from kdjax.losses._features import fitnets_term
from kdjax.losses._relational import correlation_congruence_loss
from kdjax.losses._relational import pairwise_distances
from kdjax.losses._relational import pkt_loss
from kdjax.losses._relational import relational_term
from kdjax.losses._relational import rkd_angle_loss
from kdjax.losses._relational import rkd_distance_loss
from kdjax.losses._relational import similarity_preserving_loss
from kdjax.losses._contrastive import CRDEmbed
from kdjax.losses._contrastive import CRDState
from kdjax.losses._contrastive import crd_loss
from kdjax.losses._contrastive import crd_nce_loss
from kdjax.losses._contrastive import crd_term
from kdjax.losses._contrastive import init_crd_heads
from kdjax.losses._contrastive import init_crd_state
from kdjax.losses._contrastive import sample_contrast_indices
from kdjax.losses._ensemble import confidence_weights
from kdjax.losses._ensemble import ensemble_probabilities
from kdjax.losses._ensemble import multi_teacher_kl
from kdjax.losses._ensemble import multi_teacher_term
from kdjax.losses._ensemble import stack_teacher_logits
from kdjax.losses._ensemble import teacher_logits_of
