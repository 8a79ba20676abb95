"""Teacher-forced logits, exact scores, and the two decoders (anti-diagonal and raster).

The decoders are built on one public seam, ``prefill`` (a ``DecoderState``) and ``step``
(one anti-diagonal, or one raster token); ``generate`` is that loop. Every decoder and the
teacher-forced pass share ``build_prefix``, ``embed_codes``, ``backbone_forward`` and
``FlashARModules.fuse``, so incremental decoding equals teacher forcing by construction
(and the tests check it does). What step t feeds and samples is one ``Step`` of the
layout's ``schedule``; ``sampled_step`` runs one (``step_logits``, then the draw from the
uniforms drawn at prefill), eagerly or compiled (``compiled``).

Modules, in import order: ``inputs`` (checks, the prefix), ``forward`` (one backbone and
branch forward, the heads), ``teacher_forcing``, ``schedules`` (steps, buckets), ``decoder``
(caches, feeding, ``step_logits``, ``sampled_step``), ``compiled``, ``steps`` (the step API).
"""

from .compiled import AUTO_CPU_MAX_ROWS, compiled_step, recompile_room, use_compile
from .decoder import Decoder, sampled_step, step_logits
from .forward import backbone_forward, cell_logits, horizontal_logits, positions, run_then_branch
from .inputs import (
    MODES,
    Negative,
    Prefix,
    build_prefix,
    check_codes,
    check_cond,
    check_grid,
    check_mode,
    check_negative,
    check_positions,
    condition_prefix,
    embed_codes,
    embed_ids,
    eval_behaviour,
    feature_width,
    grid_shape,
    has_uncond,
)
from .schedules import Schedule, Step, bucket, padded_schedule, schedule
from .steps import DecoderState, generate, prefill, step
from .teacher_forcing import TeacherForced, logits, score, sequence_embeds, teacher_forward

__all__ = [
    "MODES",
    "Decoder",
    "DecoderState",
    "Negative",
    "Prefix",
    "Schedule",
    "Step",
    "TeacherForced",
    "backbone_forward",
    "bucket",
    "build_prefix",
    "cell_logits",
    "check_codes",
    "check_cond",
    "check_grid",
    "check_mode",
    "check_negative",
    "check_positions",
    "compiled_step",
    "use_compile",
    "AUTO_CPU_MAX_ROWS",
    "condition_prefix",
    "embed_codes",
    "embed_ids",
    "eval_behaviour",
    "feature_width",
    "generate",
    "has_uncond",
    "horizontal_logits",
    "logits",
    "padded_schedule",
    "positions",
    "prefill",
    "recompile_room",
    "run_then_branch",
    "schedule",
    "score",
    "sequence_embeds",
    "step",
    "sampled_step",
    "step_logits",
    "teacher_forward",
    "grid_shape",
]
