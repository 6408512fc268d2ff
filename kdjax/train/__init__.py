"""kdjax.train: the distillation state, jitted train/eval steps and a loop."""

from typing import TYPE_CHECKING

from kdjax import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(__name__, {
    "._compile": ("compile_step",),
    "._loop": ("Checkpointer", "LoopOptions", "LoopResult", "LoopStart",
        "fit", "resume", "run_loop"),
    "._options": ("StepOptions",),
    "._precision": ("Policy", "cast_floating"),
    "._state": ("DistillState", "create_state", "split_variables"),
    "._step": ("EvalStepFn", "StepFn", "build_step", "build_step_fn",
        "evaluate", "make_eval_step", "make_train_step",
        "reads_teacher_from_batch", "teacher_forward"),
    "._stop": ("StopRequest",),
    "._window": ("MetricsWindow",),
    "._self_distillation": ("GenerationResult", "born_again",
        "born_again_loss", "mean_teacher_decay", "mean_teacher_loss",
        "mean_teacher_step", "sigmoid_rampup", "softmax_mse"),
})

if TYPE_CHECKING:  # the lazy names above, for type checkers and IDEs
  from kdjax.train._compile import compile_step
  from kdjax.train._loop import (
      Checkpointer, LoopOptions, LoopResult, LoopStart, fit, resume, run_loop)
  from kdjax.train._options import StepOptions
  from kdjax.train._precision import Policy, cast_floating
  from kdjax.train._self_distillation import (
      GenerationResult, born_again, born_again_loss, mean_teacher_decay,
      mean_teacher_loss, mean_teacher_step, sigmoid_rampup, softmax_mse)
  from kdjax.train._state import DistillState, create_state, split_variables
  from kdjax.train._step import (
      EvalStepFn, StepFn, build_step, build_step_fn, evaluate, make_eval_step,
      make_train_step, reads_teacher_from_batch, teacher_forward)
  from kdjax.train._stop import StopRequest
  from kdjax.train._window import MetricsWindow
