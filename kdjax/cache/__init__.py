"""kdjax.cache: offline distillation from precomputed teacher outputs.

``build_teacher_cache`` runs the teacher once over a dataset and stores its
(top-k or full) logits and named features next to the examples, in ``.npz``
shards with a JSON manifest fingerprinting the teacher, the dataset and ``k``;
``open_teacher_cache`` verifies the fingerprint; ``check_loss_compatible``
checks a loss against it (a top-k cache's temperature);
``make_cached_train_step`` trains the student from the cache with no teacher
in memory.
"""

from typing import TYPE_CHECKING

from kdjax import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, {
    "._build": ("build_teacher_cache",),
    "._cache": ("CacheMismatchError", "TeacherCache", "check_loss_compatible",
        "open_teacher_cache"),
    "._fingerprint": ("fingerprint_dataset", "fingerprint_tree"),
    "._teacher_output": ("CachedTeacherOutput", "cached_teacher_apply"),
    "._train": ("make_cached_train_step", "top_k_term"),
})

if TYPE_CHECKING:  # the lazy names above, for type checkers and IDEs
  from kdjax.cache._build import build_teacher_cache
  from kdjax.cache._cache import (
      CacheMismatchError, TeacherCache, check_loss_compatible,
      open_teacher_cache)
  from kdjax.cache._fingerprint import fingerprint_dataset, fingerprint_tree
  from kdjax.cache._teacher_output import (
      CachedTeacherOutput, cached_teacher_apply)
  from kdjax.cache._train import make_cached_train_step, top_k_term
