"""Two-stage FlashAR post-training on accelerate: one YAML config, resumable, atomic.

Stage 1 freezes the backbone (and so the horizontal head) and trains the vertical branch
and the gate. Stage 2 fine-tunes jointly: the decoder in full at ``backbone_lr_scale`` x
the head learning rate, or LoRA adapters on the recipe's target modules; the branch and
gate keep training in full. Loss (both stages)::

    CE(fused) + w_v * CE(vertical alone) + w_kd * T^2 * KL(raster teacher || vertical)
              + w_kd_fused * Tf^2 * KL(raster teacher || fused)

The teacher is the raster model's own next-token distribution for the same target token:
the frozen backbone in stage 1, the backbone with LoRA switched off in LoRA stage 2 (the
original model exactly), and in full stage 2 the current backbone without gradient, or,
when ``w_kd_fused`` > 0, a frozen copy of the original model (a second copy in memory).
The fused term is off by default (the paper's loss). It helps when post-training sees few
images: the teacher's soft distribution carries more signal per token than the one-hot
target, and the KL minimiser given the two-way context is the teacher's own distribution
averaged over the context the student lacks.

- ``config``: ``TrainConfig`` / ``StageConfig``, what a resumed run may change;
- ``model``: the patched model, what each stage trains, LoRA, the frozen teacher;
- ``loss``: ``FlashARLoss``;
- ``checkpoints``: the run folder's checkpoint and metrics log, the trained model read back;
- ``loop``: ``train``, both stages on accelerate.
"""

from .checkpoints import (
    CKPT,
    LOG,
    RUN_MARKER,
    RunPoint,
    build_model_from_run,
    check_run_identity,
    claim_run_folder,
    load_checkpoint,
    load_run,
    load_trainable,
    recipe_diff,
    rng_state,
    run_differences,
    save_checkpoint,
    save_if_due,
    set_rng_state,
    truncate_log,
)
from .config import (
    RESUME_FREE_KEYS,
    StageConfig,
    TrainConfig,
    TrainingError,
    check_resume_config,
    config_diff,
    resume_diff,
    stage_of,
)
from .loop import train
from .loss import FlashARLoss, kd_loss
from .model import (
    add_lora,
    backbone_parameters,
    build_model,
    enable_gradient_checkpointing,
    frozen_teacher,
    param_groups,
    set_trainable,
    trainable_state,
)

__all__ = [
    "CKPT",
    "LOG",
    "RUN_MARKER",
    "RunPoint",
    "check_run_identity",
    "claim_run_folder",
    "load_run",
    "recipe_diff",
    "resume_diff",
    "run_differences",
    "RESUME_FREE_KEYS",
    "FlashARLoss",
    "StageConfig",
    "TrainConfig",
    "TrainingError",
    "add_lora",
    "backbone_parameters",
    "build_model",
    "build_model_from_run",
    "check_resume_config",
    "config_diff",
    "enable_gradient_checkpointing",
    "frozen_teacher",
    "kd_loss",
    "load_checkpoint",
    "load_trainable",
    "param_groups",
    "rng_state",
    "save_checkpoint",
    "save_if_due",
    "set_rng_state",
    "set_trainable",
    "stage_of",
    "train",
    "trainable_state",
    "truncate_log",
]
