"""kdjax.cache: offline distillation from precomputed teacher outputs.

``build_teacher_cache`` runs the teacher once over a dataset and stores its
(top-k or full) logits and named features next to the examples, in ``.npz``
shards with a JSON manifest fingerprinting the teacher, the dataset and ``k``;
``open_teacher_cache`` verifies the fingerprint; ``make_cached_train_step``
trains the student from the cache with no teacher in memory.
"""

from kdjax.cache._cache import CacheMismatchError
from kdjax.cache._cache import CachedTeacherOutput
from kdjax.cache._cache import TeacherCache
from kdjax.cache._cache import build_teacher_cache
from kdjax.cache._cache import cached_teacher_apply
from kdjax.cache._cache import open_teacher_cache
from kdjax.cache._fingerprint import fingerprint_dataset
from kdjax.cache._fingerprint import fingerprint_tree
from kdjax.cache._train import make_cached_train_step
from kdjax.cache._train import top_k_term
