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

from kdjax.checkpoint._export import export_student
from kdjax.checkpoint._export import restore_teacher
from kdjax.checkpoint._integrity import CheckpointCorruptedError
from kdjax.checkpoint._integrity import CheckpointError
from kdjax.checkpoint._integrity import StructureMismatchError
from kdjax.checkpoint._integrity import TeacherMismatchError
from kdjax.checkpoint._integrity import tree_checksums
from kdjax.checkpoint._integrity import tree_fingerprint
from kdjax.checkpoint._iterator import ArrayBatchIterator
from kdjax.checkpoint._iterator import ResumableIterator
from kdjax.checkpoint._manager import DistillCheckpointer
from kdjax.checkpoint._manager import RestoredRun
from kdjax.checkpoint._manager import abstract_like
