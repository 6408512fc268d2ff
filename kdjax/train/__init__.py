"""kdjax.train: the distillation state, jitted train/eval steps and a loop."""

from kdjax.train._loop import fit
from kdjax.train._precision import Policy
from kdjax.train._precision import cast_floating
from kdjax.train._state import DistillState
from kdjax.train._state import create_state
from kdjax.train._state import split_variables
from kdjax.train._step import build_step_fn
from kdjax.train._step import evaluate
from kdjax.train._step import make_eval_step
from kdjax.train._step import make_train_step
from kdjax.train._step import teacher_forward
from kdjax.train._self_distillation import GenerationResult
from kdjax.train._self_distillation import born_again
from kdjax.train._self_distillation import born_again_loss
from kdjax.train._self_distillation import mean_teacher_decay
from kdjax.train._self_distillation import mean_teacher_loss
from kdjax.train._self_distillation import mean_teacher_step
from kdjax.train._self_distillation import sigmoid_rampup
from kdjax.train._self_distillation import softmax_mse
