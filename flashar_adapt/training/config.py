"""The training config: one YAML file, every key checked on load (``validate`` rules), and
what a resumed run may change."""

from __future__ import annotations

import dataclasses
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import FlashARError
from ..formats import FormatError, spec_format
from ..recipe import RecipeError, safe_yaml
from ..validate import (
    Is,
    Num,
    OneOf,
    Seq,
    dataclass_rules,
    did_you_mean,
    differing_keys,
    first_problem,
    first_unknown,
    rule,
    short,
)


class TrainingError(FlashARError, RuntimeError):
    """Training cannot go on (bad config, non-finite loss, checkpoint mismatch)."""


_BOOL = Is((bool,), "true or false")
_STR = Is((str,), "a string")


@dataclass
class StageConfig:
    steps: int = rule(Num(0, integer=True), default=0)
    lr: float = rule(Num(0, lo_open=True), default=1e-4)
    warmup_steps: int = rule(Num(0, integer=True), default=0)
    min_lr_ratio: float = rule(Num(0, 1), default=0.1)
    backbone_lr_scale: float = rule(Num(0), default=0.2)  # stage 2, full fine-tuning
    lora: bool = rule(_BOOL, default=False)  # stage 2: LoRA on the recipe's targets instead of full fine-tuning
    lora_lr_scale: float = rule(Num(0), default=1.0)


@dataclass
class TrainConfig:
    model: dict = rule(Is((dict,), "a mapping with a 'format' key"))
    recipe: str = rule(_STR)
    data: str = rule(_STR)
    out_dir: str = rule(_STR)
    recipe_overrides: dict = rule(Is((dict,), "a mapping of recipe keys to values"), default_factory=dict)
    stage1: StageConfig = field(default_factory=lambda: StageConfig(steps=100))
    stage2: StageConfig = field(default_factory=StageConfig)
    batch_size: int = rule(Num(1, integer=True), default=8)  # global, over all processes and accumulation steps
    grad_accum: int = rule(Num(1, integer=True), default=1)
    weight_decay: float = rule(Num(0), default=0.05)
    betas: tuple = rule(Seq(Num(0, 1, hi_open=True), length=2), default=(0.9, 0.95))
    grad_clip: float = rule(Num(0), default=1.0)  # 0: no clipping
    w_v: float = rule(Num(0), default=0.05)
    w_kd: float = rule(Num(0), default=0.2)
    kd_temperature: float = rule(Num(0, lo_open=True), default=2.0)
    w_kd_fused: float = rule(
        Num(0), default=0.0
    )  # distil the fused prediction too (both stages); see the module docstring
    kd_fused_temperature: float = rule(Num(0, lo_open=True), default=1.0)
    cond_dropout: float = rule(
        Num(0, 1), default=0.1
    )  # class conditions replaced by the null class, to keep CFG working
    mixed_precision: str = rule(OneOf(("no", "bf16", "fp16")), default="no")
    gradient_checkpointing: bool = rule(_BOOL, default=False)
    fixed_gate: float | None = rule(Num(0, 1, optional=True), default=None)  # ablation: constant mixing weight
    save_every: int = rule(Num(1, integer=True), default=50)
    log_every: int = rule(Num(1, integer=True), default=1)
    seed: int = rule(Num(0, 2**31 - 1, integer=True), default=0)
    cpu: bool = rule(_BOOL, default=False)
    source: str = ""

    @classmethod
    def load(cls, path) -> TrainConfig:
        path = Path(path)
        if path.is_dir():
            raise TrainingError(f"{path}: a folder, not a training config file (a YAML file)")
        if not path.is_file():
            raise TrainingError(f"{path}: training config not found")
        try:
            data = safe_yaml(path.read_bytes(), str(path))
        except RecipeError as e:
            raise TrainingError(str(e)) from None
        cfg = cls.from_dict(data, source=str(path))
        base = path.parent
        for attr in ("data", "out_dir"):
            v = getattr(cfg, attr)
            if v and not os.path.isabs(v):
                setattr(cfg, attr, str((base / v).resolve()))
        if cfg.recipe.endswith((".yaml", ".yml")) and not os.path.isabs(cfg.recipe):
            cfg.recipe = str((base / cfg.recipe).resolve())  # a recipe file beside the config
        for key in ("checkpoint", "path"):
            v = cfg.model.get(key)
            if isinstance(v, str) and v and not os.path.isabs(v):
                cfg.model[key] = str((base / v).resolve())
        return cfg

    @classmethod
    def from_dict(cls, data: Any, source: str = "") -> TrainConfig:
        """Validate a parsed mapping (every key and value, see ``validate``) and build the config."""
        if not isinstance(data, dict):
            raise TrainingError(f"{source}: a training config must be a mapping")
        names = {f.name for f in dataclasses.fields(cls)} - {"source"}
        k = first_unknown(data, names)
        if k is not None:
            raise TrainingError(f"{source}: unknown key {short(str(k))}{did_you_mean(str(k), names)}")
        for k in ("model", "recipe", "data", "out_dir"):
            if k not in data:
                raise TrainingError(f"{source}: missing key {k!r}")
        if not isinstance(data["model"], dict) or not {"format", "backend"} & set(data["model"]):
            raise TrainingError(
                f"{source}: model must be a mapping with a 'format' key (the model format; 'backend' "
                "is its old name) and how to load it"
            )
        try:  # the model's format is known before anything is loaded (the rest its loader checks)
            spec_format(data["model"])
        except FormatError as e:
            raise TrainingError(f"{source}: model: {e}") from None
        kw = dict(data)
        if kw.get("mixed_precision") is False:  # YAML 1.1 reads a bare `no` as false
            kw["mixed_precision"] = "no"
        snames = {f.name for f in dataclasses.fields(StageConfig)}
        for st in ("stage1", "stage2"):
            if st in kw:
                sd = kw[st] or {}
                if not isinstance(sd, dict):
                    raise TrainingError(f"{source}: {st} must be a mapping, got {short(sd)}")
                k = first_unknown(sd, snames)
                if k is not None:
                    raise TrainingError(f"{source}: unknown key {st}.{str(k)[:60]}{did_you_mean(str(k), snames)}")
                kw[st] = StageConfig(**sd)
        cfg = cls(**kw, source=source)
        for obj, prefix in ((cfg, ""), (cfg.stage1, "stage1."), (cfg.stage2, "stage2.")):
            bad = first_problem(obj, dataclass_rules(type(obj)), prefix)
            if bad:
                raise TrainingError(f"{source}: {bad[0]} {bad[1]}")
        if not cfg.recipe:
            raise TrainingError(f"{source}: recipe: must name a recipe or a recipe YAML file")
        if cfg.stage1.steps + cfg.stage2.steps == 0:
            raise TrainingError(f"{source}: stage1.steps + stage2.steps is 0: there is nothing to train")
        out, data = os.path.abspath(str(cfg.out_dir)), os.path.abspath(str(cfg.data))
        if out == data or out.startswith(data.rstrip(os.sep) + os.sep):
            raise TrainingError(
                f"{source}: out_dir {cfg.out_dir!r} is inside the data folder {cfg.data!r}: choose another"
            )
        cfg.betas = tuple(cfg.betas)
        return cfg

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        d["betas"] = list(d["betas"])
        return d


def stage_of(step: int, cfg: TrainConfig) -> tuple[int, int]:
    """(stage, step within stage) of a global step."""
    if step < cfg.stage1.steps:
        return 1, step
    return 2, step - cfg.stage1.steps


# Keys a resumed run may change freely: they do not change what the run computes.
RESUME_FREE_KEYS = ("out_dir", "log_every", "save_every")


def config_diff(old: dict, new: dict, free: tuple = ()) -> list[str]:
    """``key: old -> new`` for every dotted key whose value differs (RESUME_FREE_KEYS and ``free`` aside)."""
    return [f"{k}: {short(a, 40)} -> {short(b, 40)}" for k, a, b in differing_keys(old, new, RESUME_FREE_KEYS + free)]


def _portable(d: dict) -> dict:
    """The config with its absolute paths made relative to the folder holding out_dir, so a
    project folder moved or copied as a whole resumes as the same run."""
    d = {**d, "model": dict(d.get("model") or {})}
    if "backend" in d["model"] and "format" not in d["model"]:  # the old spelling of the same key
        d["model"]["format"] = d["model"].pop("backend")
    base = Path(str(d.get("out_dir", ""))).parent
    for node, key in ((d, "data"), (d, "recipe"), (d["model"], "checkpoint"), (d["model"], "path")):
        v = node.get(key)
        if isinstance(v, str) and os.path.isabs(v):
            node[key] = os.path.relpath(v, base)
    return d


def resume_diff(old: dict, step: int, cfg: TrainConfig, recipe_by_content: bool = False) -> list[str]:
    """``key: old -> new`` for every setting of ``cfg`` that differs from ``old`` (a
    checkpoint's recorded config at ``step``) in a way that changes what the run computes.
    At the stage boundary, before any stage-2 step, the stage-2 settings are still free:
    runs that share stage 1 and differ in stage 2 are one stage-1 run copied and resumed
    (exact, since a stage starts from the config's seed). ``recipe_by_content``: the caller
    compares the resolved recipe itself, so how ``recipe`` names it (a name, a path) is free."""
    free = ("recipe",) if recipe_by_content else ()
    diff = config_diff(_portable(old), _portable(cfg.to_dict()), free)
    old_s1 = (old.get("stage1") or {}).get("steps")
    if step == old_s1 == cfg.stage1.steps:
        diff = [d for d in diff if not d.startswith("stage2.")]
    return diff


def check_resume_config(
    old: dict, step: int, cfg: TrainConfig, ckpt_path: Path, allow: bool, extra: list[str] | tuple = ()
) -> None:
    """Refuse (or, allowed, list) config changes that alter what the checkpoint's steps were
    or what the rest of the run does (``resume_diff``), and the ``extra`` differences the
    caller found (the recipe's content)."""
    diff = resume_diff(old, step, cfg) + list(extra)
    if not diff:
        return
    if not allow:
        raise TrainingError(
            f"{ckpt_path} was written with another config; it differs at {'; '.join(diff)}. "
            "Resume with the config that made it, use another out_dir, or pass "
            "--allow-config-change (train(..., allow_config_change=True)) to go on with the new values"
        )
    # stacklevel 4: the warning points at the caller of train()
    warnings.warn(f"resuming {ckpt_path} with a changed config: {'; '.join(diff)}", stacklevel=4)
