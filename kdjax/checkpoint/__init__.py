"""kdjax.checkpoint: resumable, crash-safe checkpoints of distillation runs.

* :class:`DistillCheckpointer`: an orbax ``CheckpointManager`` saving the
  :class:`kdjax.train.DistillState`, the data iterator's position, the run
  config and the teacher's fingerprint; policies (every N steps, keep last K,
  keep best by a metric, asynchronous writes); restore into any device
  layout, with checksums and fallback to an older step.
* :class:`ResumableIterator` (``get_state``/``set_state``) and
  :class:`ArrayBatchIterator`, a deterministic resumable batcher.
* :func:`export_student` (student variables alone, for inference) and
  :func:`restore_teacher` (read-only, into the current mesh's shardings).
"""

from typing import TYPE_CHECKING

from kdjax import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, {
    "._export": ("export_student", "restore_teacher"),
    "._integrity": ("CheckpointCorruptedError", "CheckpointError",
        "StructureMismatchError", "TeacherMismatchError", "tree_checksums",
        "tree_fingerprint"),
    "._iterator": ("ArrayBatchIterator", "ResumableIterator"),
    "._layout": ("abstract_like",),
    "._manager": ("DistillCheckpointer",),
    "._restore": ("RestoredRun",),
})

if TYPE_CHECKING:  # the lazy names above, for type checkers and IDEs
  from kdjax.checkpoint._export import export_student, restore_teacher
  from kdjax.checkpoint._integrity import (
      CheckpointCorruptedError, CheckpointError, StructureMismatchError,
      TeacherMismatchError, tree_checksums, tree_fingerprint)
  from kdjax.checkpoint._iterator import ArrayBatchIterator, ResumableIterator
  from kdjax.checkpoint._layout import abstract_like
  from kdjax.checkpoint._manager import DistillCheckpointer
  from kdjax.checkpoint._restore import RestoredRun
