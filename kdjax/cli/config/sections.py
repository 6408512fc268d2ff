"""Config sections shared by the image and LM commands: ``optimizer``,
``train`` and ``checkpoint`` (each command changes some defaults with
:func:`with_defaults`). Standard library only.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

from kdjax.cli.config.base import Field


def with_defaults(section: Mapping[str, Field], **defaults) -> dict:
  """``section`` with other defaults for some of its keys."""
  return {k: (dataclasses.replace(v, default=defaults[k]) if k in defaults
              else v) for k, v in section.items()}


OPTIMIZER: dict = {
    "name": Field("adamw", "str", "optax optimizer",
                  choices=("adamw", "adam", "sgd")),
    "lr": Field(2e-3, "float", "peak learning rate", minimum=0.0),
    "weight_decay": Field(1e-4, "float", "adamw weight decay",
                          minimum=0.0),
    "momentum": Field(0.9, "float", "sgd momentum (0: none)",
                      minimum=0.0),
    "schedule": Field("cosine", "str", "learning-rate schedule over the "
                      "run's steps", choices=("cosine", "constant")),
    "warmup_steps": Field(0, "int", "linear warm-up steps", minimum=0),
    "grad_clip": Field(None, "float", "clip the global gradient norm "
                       "(null: no clipping)", nullable=True,
                       minimum=0.0),
}

TRAIN: dict = {
    "steps": Field(None, "int", "optimizer steps (default: epochs x "
                   "steps per epoch)", nullable=True, minimum=1),
    "epochs": Field(6.0, "float", "epochs, when steps is null",
                    minimum=0.0),
    "log_every": Field(50, "int", "fetch metrics from the device, log "
                       "and update the progress bar every N steps",
                       minimum=1),
    "eval_every": Field(0, "int", "evaluate every N steps (0: only at "
                        "the end)", minimum=0),
    "accumulation_steps": Field(1, "int", "gradient accumulation "
                                "micro-batches per step", minimum=1),
    "precision": Field("float32", "str", "kdjax.train.Policy: float32, "
                       "bf16_teacher or bf16",
                       choices=("float32", "bf16_teacher", "bf16")),
    "progress": Field(True, "bool", "show a tqdm progress bar"),
    "checks": Field(False, "bool", "run-time checks in the jitted step "
                    "(kdjax.train.make_train_step(checks=True), checkify): "
                    "a traced temperature <= 0, a label out of range, a "
                    "NaN/inf teacher output stop the run with exit status "
                    "1 instead of a NaN loss; each step then waits for "
                    "the device (a debugging option)"),
}

CHECKPOINT: dict = {
    "save_every": Field(500, "int", "save every N steps (0: only at the "
                        "end)", minimum=0),
    "keep": Field(3, "int", "keep the newest N checkpoints", minimum=1),
    "async": Field(True, "bool", "write checkpoints in the background"),
}
