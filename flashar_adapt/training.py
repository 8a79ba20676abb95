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
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import adapters_disabled, lora_parameters
from .data import ShardDataset
from .decoding import teacher_forward
from .errors import FlashARError
from .files import atomic_write_bytes, exclusive_lock
from .formats import load_spec
from .patching import backbone_only, context, patch
from .recipe import RecipeError, did_you_mean, load_recipe, safe_yaml
from .validate import (Is, Num, OneOf, Seq, dataclass_rules, differing_keys, first_problem, first_unknown, rule,
                       short, state_dict_misfit)


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
    w_kd_fused: float = rule(Num(0), default=0.0)  # distil the fused prediction too (both stages); see the module docstring
    kd_fused_temperature: float = rule(Num(0, lo_open=True), default=1.0)
    cond_dropout: float = rule(Num(0, 1), default=0.1)  # class conditions replaced by the null class, to keep CFG working
    mixed_precision: str = rule(OneOf(("no", "bf16", "fp16")), default="no")
    gradient_checkpointing: bool = rule(_BOOL, default=False)
    fixed_gate: float | None = rule(Num(0, 1, optional=True), default=None)  # ablation: constant mixing weight
    save_every: int = rule(Num(1, integer=True), default=50)
    log_every: int = rule(Num(1, integer=True), default=1)
    seed: int = rule(Num(0, 2**31 - 1, integer=True), default=0)
    cpu: bool = rule(_BOOL, default=False)
    source: str = ""

    @classmethod
    def load(cls, path) -> "TrainConfig":
        path = Path(path)
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
    def from_dict(cls, data: Any, source: str = "") -> "TrainConfig":
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
            raise TrainingError(f"{source}: model must be a mapping with a 'format' key (the model format; 'backend' "
                                "is its old name) and how to load it")
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
        cfg.betas = tuple(cfg.betas)
        return cfg

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.pop("source")
        d["betas"] = list(d["betas"])
        return d


# ---------------------------------------------------------------- model

def build_model(cfg: TrainConfig) -> nn.Module:
    """Load the base model, patch it, and (for a resumed stage-2 LoRA run) add adapters."""
    model = load_spec(cfg.model)
    recipe = load_recipe(cfg.recipe)
    if cfg.recipe_overrides:
        recipe = recipe.replace(**cfg.recipe_overrides)
    patch(model, recipe, fixed_gate=cfg.fixed_gate)
    return model


def backbone_parameters(model) -> list[nn.Parameter]:
    """The parameters the decoder path uses (layers, norm, heads, embeddings): what stage 2
    unfreezes. Other towers (VQ model, vision encoder) stay frozen."""
    ctx = context(model)
    seen, out = set(), []
    mods = [ctx.layers, ctx.norm, ctx.head, ctx.embed, *ctx.image_embed]
    if ctx.cond_embed is not None:
        mods.append(ctx.cond_embed)
    for m in mods:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def add_lora(model, r: int | None = None, alpha: int | None = None, dropout: float | None = None) -> int:
    """Inject peft LoRA adapters on the recipe's target modules (decoder layers only)."""
    from peft import LoraConfig, inject_adapter_in_model

    ctx = context(model)
    lo = ctx.recipe.lora
    if not lo.targets:
        raise TrainingError(f"recipe {ctx.recipe.name!r} names no lora.targets; add them or use full fine-tuning")
    pattern = "|".join(f"(?:{t})" for t in lo.targets)
    cfg = LoraConfig(r=r or lo.r, lora_alpha=alpha or lo.alpha, lora_dropout=lo.dropout if dropout is None else dropout,
                     target_modules=pattern, bias="none")
    with backbone_only(model):  # the branch is trained in full, never wrapped
        inject_adapter_in_model(cfg, model)
    n = len(lora_parameters(model))
    if n == 0:
        raise TrainingError(f"lora.targets {list(lo.targets)} matched no module of the model")
    return n


class FlashARLoss(nn.Module):
    """Wraps the patched model so accelerate/DDP see one forward that returns the losses."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, stage: int, teacher: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.stage = stage
        # Kept out of the module tree so that DDP, the optimizer and checkpoints never see it.
        self.__dict__["teacher"] = teacher

    def _teacher_logits(self, cond, codes, cond_mask):
        with torch.no_grad():
            if self.teacher is not None:
                return teacher_forward(self.teacher, cond, codes, "raster", cond_mask).fused
            with adapters_disabled(self.model) if self.stage == 2 else contextlib.nullcontext():
                return teacher_forward(self.model, cond, codes, "raster", cond_mask).fused

    def forward(self, cond, codes, cond_mask=None):
        cfg = self.cfg
        out = teacher_forward(self.model, cond, codes, "two_way", cond_mask)
        K = out.fused.shape[-1]
        ce = F.cross_entropy(out.fused.reshape(-1, K), codes.reshape(-1))
        has_v = torch.zeros(codes.shape[1:], dtype=torch.bool, device=codes.device)
        has_v[1:] = True
        lv = out.vertical[:, has_v]  # [B, n, K]
        tv = codes[:, has_v]
        ce_v = F.cross_entropy(lv.reshape(-1, K), tv.reshape(-1)) if lv.numel() else ce.new_zeros(())
        kd = ce.new_zeros(())
        kd_f = ce.new_zeros(())
        if (cfg.w_kd > 0 and lv.numel()) or cfg.w_kd_fused > 0:
            teach = self._teacher_logits(cond, codes, cond_mask).float()
            if cfg.w_kd > 0 and lv.numel():
                kd = _kd(lv, teach[:, has_v], cfg.kd_temperature)
            if cfg.w_kd_fused > 0:
                kd_f = _kd(out.fused, teach, cfg.kd_fused_temperature)
        loss = ce + cfg.w_v * ce_v + cfg.w_kd * kd + cfg.w_kd_fused * kd_f
        gate = out.gate[:, 1:, 1:].mean() if out.gate is not None and out.gate[:, 1:, 1:].numel() else ce.new_zeros(())
        res = {"loss": loss, "ce_fused": ce.detach(), "ce_vertical": ce_v.detach(), "kd": kd.detach(),
               "gate": gate.detach()}
        if cfg.w_kd_fused > 0:
            res["kd_fused"] = kd_f.detach()
        return res


def _kd(student: torch.Tensor, teacher: torch.Tensor, T: float) -> torch.Tensor:
    """T^2 * KL(teacher || student) per token, over the last dimension."""
    K = student.shape[-1]
    p_t = F.log_softmax(teacher / T, -1).reshape(-1, K)
    p_s = F.log_softmax(student.float() / T, -1).reshape(-1, K)
    return F.kl_div(p_s, p_t, log_target=True, reduction="batchmean") * T * T


# ---------------------------------------------------------------- optimisation

def _lr_factor(st: StageConfig):
    """The stage's learning-rate multiplier per step: linear warmup, then cosine down to min_lr_ratio."""

    def f(step: int) -> float:
        if st.warmup_steps and step < st.warmup_steps:
            return (step + 1) / st.warmup_steps
        span = max(1, st.steps - st.warmup_steps)
        prog = min(1.0, (step - st.warmup_steps) / span)
        return st.min_lr_ratio + (1 - st.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog))
    return f


def _param_groups(model, cfg: TrainConfig, stage: int) -> list[dict]:
    """The optimizer's parameter groups for ``stage`` (pure: the model is not changed):
    the FlashAR modules always; in stage 2 also the LoRA adapters or the decoder path."""
    flash = [p for n, p in model.flashar.named_parameters()
             if not (model.flashar.fixed_gate is not None and n.startswith("gate."))]  # unused when fixed
    st = cfg.stage1 if stage == 1 else cfg.stage2
    groups = [{"params": flash, "lr": st.lr, "name": "flashar"}]
    if stage == 2:
        if st.lora:
            groups.append({"params": lora_parameters(model), "lr": st.lr * st.lora_lr_scale, "name": "lora"})
        else:
            groups.append({"params": backbone_parameters(model), "lr": st.lr * st.backbone_lr_scale,
                           "name": "backbone"})
    for g in groups:
        g["initial_lr"] = g["lr"]
    return groups


def _set_trainable(model, groups: list[dict]) -> None:
    """Gradients for exactly the parameters in ``groups``; the rest of the model is frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)


def _trainable_state(model) -> dict:
    """Everything training may have changed: FlashAR modules, LoRA weights, and (stage 2
    full) the decoder-path parameters. Names are the model's own."""
    keep = {id(p) for p in model.parameters() if p.requires_grad}
    keep |= {id(p) for p in model.flashar.parameters()}
    return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in keep}


# ---------------------------------------------------------------- checkpoints

CKPT = "checkpoint.pt"


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: written to a temp file in the same folder, fsynced, renamed over the old one.
    Any failure (disk full, kill) leaves the previous checkpoint as it was."""
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainingError(f"{path}: checkpoint is unreadable ({e}); move it away to restart from scratch") from None


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def _set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(_tuplify(s["python"]))


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------- the loop

def _accelerator(cfg: TrainConfig):
    from accelerate import Accelerator

    mp = cfg.mixed_precision
    cpu = cfg.cpu or not torch.cuda.is_available()
    if mp == "fp16" and cpu:
        raise TrainingError("mixed_precision fp16 needs a GPU; use bf16 or no on CPU")
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != mp:
        # accelerate keeps one process-wide state; a second in-process run (notebooks, tests)
        # with another precision needs it cleared (private API, no public reset exists).
        AcceleratorState._reset_state()
    fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"  # set by accelerate launch
    try:
        acc = Accelerator(mixed_precision=mp, cpu=cpu, gradient_accumulation_steps=cfg.grad_accum)
    except RuntimeError as e:
        if fsdp and cpu:  # accelerate's FSDP plugin looks for an accelerator when syncing module states
            raise TrainingError(_fsdp_on_cpu(f"accelerate refused: {e}")) from None
        raise
    if fsdp and cpu and acc.distributed_type != DistributedType.FSDP:
        raise TrainingError(_fsdp_on_cpu(f"accelerate would run {acc.distributed_type.value} instead, unsharded"))
    return acc


def _fsdp_on_cpu(what: str) -> str:
    import accelerate

    return (f"launched with FSDP on CPU, which accelerate {accelerate.__version__} does not shard ({what}); "
            "launch with integrations/accelerate/cpu.yaml (DDP over gloo) or on GPUs (docs/training.md)")


def _stage_of(step: int, cfg: TrainConfig) -> tuple[int, int]:
    """(stage, step within stage) of a global step."""
    if step < cfg.stage1.steps:
        return 1, step
    return 2, step - cfg.stage1.steps


def train(cfg: TrainConfig | str | os.PathLike, progress: bool = True, allow_config_change: bool = False) -> nn.Module:
    """Run (or resume) both stages; returns the trained, patched model (unwrapped).

    A run resumes from ``out_dir/checkpoint.pt`` only with the config that wrote it; a
    changed config is refused with the keys that differ, unless ``allow_config_change``
    (then they are listed in a warning). ``out_dir`` is locked while the run lasts."""
    if not isinstance(cfg, TrainConfig):
        cfg = TrainConfig.load(cfg)
    acc = _accelerator(cfg)
    out = Path(cfg.out_dir)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    acc.wait_for_everyone()
    with exclusive_lock(out, TrainingError, "train run") if acc.is_main_process else contextlib.nullcontext():
        return _train_in(cfg, acc, out, progress, allow_config_change)


def _train_in(cfg: TrainConfig, acc, out: Path, progress: bool, allow_config_change: bool) -> nn.Module:
    data = ShardDataset(cfg.data)
    torch.manual_seed(cfg.seed)  # the gate's first layer is randomly initialised
    model = build_model(cfg)
    ctx = context(model)
    _check_data(data, ctx.recipe)
    total = cfg.stage1.steps + cfg.stage2.steps
    world = acc.num_processes
    if cfg.batch_size % (world * cfg.grad_accum):
        raise TrainingError(f"batch_size {cfg.batch_size} must divide by processes x grad_accum = {world * cfg.grad_accum}")

    ckpt_path = out / CKPT
    state = load_checkpoint(ckpt_path) if ckpt_path.is_file() else None
    if state is not None and state.get("recipe") != ctx.recipe.name:
        raise TrainingError(f"{ckpt_path} was written for recipe {state.get('recipe')!r}, not {ctx.recipe.name!r}")
    if state is not None and isinstance(state.get("config"), dict):
        _check_resume_config(state["config"], state["global_step"], cfg, ckpt_path, allow_config_change)
    step = state["global_step"] if state else 0
    if step >= total:
        _load_trainable(model, state, cfg)
        return model
    log_path = out / "metrics.jsonl"
    if acc.is_main_process:
        _truncate_log(log_path, step)
        for stale in out.glob(f".{CKPT}.*tmp"):  # left by a process killed mid-write
            stale.unlink()

    stage = None
    loss_mod = opt = sched = teacher = None
    it = None
    bar = None
    if progress and acc.is_main_process:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=step, desc="flashar train", dynamic_ncols=True)
    while step < total:
        st_idx, _ = _stage_of(step, cfg)
        if st_idx != stage:
            stage = st_idx
            model = acc.unwrap_model(loss_mod).model if loss_mod is not None else model
            loss_mod, opt, sched, teacher = _start_stage(model, cfg, acc, stage, state, teacher)
            state = None
            it = data.global_batches(cfg.batch_size, cfg.seed, start_step=step)
        _, idx = next(it)
        t0 = time.perf_counter()
        metrics = _train_step(loss_mod, opt, sched, data, ctx, cfg, acc, idx, step, ckpt_path)
        step += 1
        _log_step(acc, bar, log_path, cfg, step, stage, metrics, opt.param_groups[0]["lr"], t0)
        _save_if_due(acc, loss_mod, opt, sched, ckpt_path, ctx.recipe.name, cfg, step)
    if bar is not None:
        bar.close()
    model = acc.unwrap_model(loss_mod).model
    model.eval()
    return model


def _start_stage(model, cfg: TrainConfig, acc, stage: int, state: dict | None, teacher):
    """Set ``model`` up for ``stage``: seeds, LoRA, gradient checkpointing, trainable
    parameters, optimizer and schedule (restored from ``state`` when it was saved in this
    stage), the loss. Returns (prepared loss module, optimizer, scheduler, teacher)."""
    st = cfg.stage1 if stage == 1 else cfg.stage2
    # A stage that starts fresh seeds from the config, so a run resumed at the stage
    # boundary initialises LoRA exactly as an uninterrupted one.
    torch.manual_seed(cfg.seed + 1000 * stage)
    random.seed(cfg.seed + 1000 * stage)
    if stage == 2 and st.lora and not lora_parameters(model):
        add_lora(model)
    model.train()
    if cfg.gradient_checkpointing and stage == 2:  # stage 1 keeps no backbone activations
        _enable_gradient_checkpointing(model)
    groups = _param_groups(model, cfg, stage)
    _set_trainable(model, groups)
    opt = torch.optim.AdamW(groups, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(st), last_epoch=-1)
    if state is not None and state["stage"] == stage:
        _load_trainable(model, state, cfg)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
    elif state is not None:  # resumed at a stage boundary: weights only
        _load_trainable(model, state, cfg)
    if teacher is None and stage == 2 and cfg.w_kd_fused > 0 and not st.lora:
        teacher = _frozen_teacher(cfg, acc.device)
    loss_mod = FlashARLoss(model, cfg, stage, teacher)  # stages run 1 then 2: None in stage 1
    # The scheduler is stepped by hand: accelerate's wrapper would step it once per
    # process, making the schedule depend on the number of processes.
    loss_mod, opt = acc.prepare(loss_mod, opt)
    return loss_mod, opt, sched, teacher


def _enable_gradient_checkpointing(model) -> None:
    context(model).gradient_checkpointing = True
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _train_step(loss_mod, opt, sched, data, ctx, cfg: TrainConfig, acc, idx, step: int, ckpt_path: Path) -> dict:
    """One optimizer step on the global batch ``idx`` (grad_accum micro-batches per process);
    returns the loss terms averaged over micro-batches and processes."""
    world = acc.num_processes
    micro = cfg.batch_size // (world * cfg.grad_accum)
    metrics = {}
    for a in range(cfg.grad_accum):
        sl = idx[(a * world + acc.process_index) * micro:(a * world + acc.process_index + 1) * micro]
        batch = data.get(sl)
        cond = _drop_cond(ctx, batch.cond, cfg, step, (a * world + acc.process_index) * micro)
        with acc.accumulate(loss_mod):
            with acc.autocast():
                res = loss_mod(cond.to(acc.device), batch.codes.to(acc.device),
                               None if batch.cond_mask is None else batch.cond_mask.to(acc.device))
            loss = res["loss"]
            if not torch.isfinite(loss):
                raise TrainingError(f"loss is {loss.item()} at step {step}; stopping. The last good checkpoint "
                                    f"({ckpt_path}) is intact; lower the learning rate or check the data.")
            acc.backward(loss)
            if acc.sync_gradients and cfg.grad_clip:
                acc.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], cfg.grad_clip)
            opt.step()
            if acc.sync_gradients:
                sched.step()
            opt.zero_grad(set_to_none=True)
        for k, v in res.items():
            metrics[k] = metrics.get(k, 0.0) + float(v.detach()) / cfg.grad_accum
    return {k: float(acc.reduce(torch.tensor(v, device=acc.device), "mean")) for k, v in metrics.items()}


def _log_step(acc, bar, log_path: Path, cfg: TrainConfig, step: int, stage: int, metrics: dict, lr: float,
              t0: float) -> None:
    """metrics.jsonl every ``log_every`` steps and at the end; the progress bar every step."""
    if not acc.is_main_process:
        return
    rec = {"step": step, "stage": stage, "processes": acc.num_processes, **{k: round(v, 6) for k, v in metrics.items()},
           "lr": lr, "sec": round(time.perf_counter() - t0, 4)}
    if step % cfg.log_every == 0 or step == cfg.stage1.steps + cfg.stage2.steps:
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
    if bar is not None:
        bar.update(1)
        bar.set_postfix(stage=stage, fused=f"{metrics['ce_fused']:.3f}", vert=f"{metrics['ce_vertical']:.3f}",
                        kd=f"{metrics['kd']:.3f}", gate=f"{metrics['gate']:.3f}",
                        **({"kd_fused": f"{metrics['kd_fused']:.3f}"} if "kd_fused" in metrics else {}))


def _save_if_due(acc, loss_mod, opt, sched, ckpt_path: Path, recipe_name: str, cfg: TrainConfig, step: int) -> None:
    """Checkpoint after optimizer step ``step`` every ``save_every`` steps, at the end of
    each stage and of the run (the main process writes; all wait for it)."""
    total = cfg.stage1.steps + cfg.stage2.steps
    if step % cfg.save_every == 0 or step == total or step == cfg.stage1.steps:
        inner = acc.unwrap_model(loss_mod).model
        if acc.is_main_process:
            save_checkpoint(ckpt_path, {
                "global_step": step, "stage": _stage_of(step - 1, cfg)[0],
                "recipe": recipe_name, "trainable": _trainable_state(inner),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": _rng_state(),
                "lora": bool(lora_parameters(inner)), "config": cfg.to_dict(),
            })
        acc.wait_for_everyone()


def _frozen_teacher(cfg: TrainConfig, device) -> nn.Module:
    """The original model, loaded again from the config (so a resumed run gets the same
    teacher), for distillation while full fine-tuning changes the trained copy."""
    t = build_model(cfg).to(device).eval()
    for p in t.parameters():
        p.requires_grad_(False)
    return t


def _drop_cond(ctx, cond, cfg: TrainConfig, step: int, start: int):
    """Replace some class conditions by the null class (CFG needs a trained unconditional
    path). The draw depends only on (seed, step, position in the global batch), so resume
    and any number of processes see the same drops."""
    c = ctx.recipe.condition
    if cfg.cond_dropout <= 0 or c.kind != "class" or c.null_class is None:
        return cond
    g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
    u = torch.rand(cfg.batch_size, generator=g)[start:start + cond.shape[0]]
    return torch.where(u < cfg.cond_dropout, torch.full_like(cond, c.null_class), cond)


def _load_trainable(model, state, cfg) -> None:
    if state.get("lora") and not lora_parameters(model):
        add_lora(model)
    params = dict(model.named_parameters())
    # only the trained weights are saved: the model may have more, never fewer or other shapes
    bad = state_dict_misfit(params, state["trainable"], may_miss=params)
    if bad:
        raise TrainingError(f"checkpoint weights do not fit this model (another recipe or config?): {bad}")
    with torch.no_grad():
        for k, v in state["trainable"].items():
            params[k].copy_(v)


def _check_data(data: ShardDataset, recipe) -> None:
    im, c = recipe.image, recipe.condition
    if tuple(data.grid) != tuple(im.grid) and not im.variable_grid:
        raise TrainingError(f"data grid {list(data.grid)} differs from the recipe's {list(im.grid)}")
    if data.codebook_size != im.codebook_size:
        raise TrainingError(f"data codebook {data.codebook_size} differs from the recipe's {im.codebook_size}")
    want = "class" if c.kind == "class" else "tokens" if c.kind == "tokens" else None
    if want and data.cond_kind != want:
        raise TrainingError(f"{data.dir}: data conditions are {data.cond_kind!r}, the recipe's condition.kind is {c.kind!r}")
    if c.kind == "class":
        # ids in [0, num_classes) plus the null class (unconditional examples); each shard is
        # checked against this when opened, so a bad id is reported with its file
        top = c.num_classes - 1 if c.null_class is None else max(c.num_classes - 1, c.null_class)
        data.limit_classes(c.num_classes, top)


# Keys a resumed run may change freely: they do not change what the run computes.
RESUME_FREE_KEYS = ("out_dir", "log_every", "save_every")


def config_diff(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every dotted key whose value differs (RESUME_FREE_KEYS aside)."""
    return [f"{k}: {short(a, 40)} -> {short(b, 40)}" for k, a, b in differing_keys(old, new, RESUME_FREE_KEYS)]


def _portable(d: dict) -> dict:
    """The config with its absolute paths made relative to the folder holding out_dir, so a
    project folder moved or copied as a whole resumes as the same run."""
    d = {**d, "model": dict(d.get("model") or {})}
    base = Path(str(d.get("out_dir", ""))).parent
    for node, key in ((d, "data"), (d, "recipe"), (d["model"], "checkpoint"), (d["model"], "path")):
        v = node.get(key)
        if isinstance(v, str) and os.path.isabs(v):
            node[key] = os.path.relpath(v, base)
    return d


def _check_resume_config(old: dict, step: int, cfg: TrainConfig, ckpt_path: Path, allow: bool) -> None:
    """Refuse (or, allowed, list) config changes that alter what the checkpoint's steps were
    or what the rest of the run does. At the stage boundary, before any stage-2 step, the
    stage-2 settings are still free: runs that share stage 1 and differ in stage 2 are one
    stage-1 run copied and resumed (exact, since a stage starts from the config's seed)."""
    diff = config_diff(_portable(old), _portable(cfg.to_dict()))
    old_s1 = (old.get("stage1") or {}).get("steps")
    if step == old_s1 == cfg.stage1.steps:
        diff = [d for d in diff if not d.startswith("stage2.")]
    if not diff:
        return
    if not allow:
        raise TrainingError(f"{ckpt_path} was written with another config; it differs at {'; '.join(diff)}. "
                            "Resume with the config that made it, use another out_dir, or pass "
                            "--allow-config-change (train(..., allow_config_change=True)) to go on with the new values")
    # stacklevel 4: the warning points at the caller of train()
    warnings.warn(f"resuming {ckpt_path} with a changed config: {'; '.join(diff)}", stacklevel=4)


def _truncate_log(path: Path, step: int) -> None:
    """Drop metrics written after the checkpoint we resume from (they will be re-done), and
    lines that are not whole records (a kill or a full disk in the middle of an append),
    with a warning naming them."""
    if not path.is_file():
        return
    keep, torn = [], []
    for n, ln in enumerate(path.read_bytes().decode("utf-8", errors="replace").splitlines(), 1):
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
            ok = isinstance(rec, dict) and isinstance(rec.get("step"), int)
        except ValueError:
            ok = False
        if not ok:
            torn.append(n)
        elif rec["step"] <= step:
            keep.append(ln)
    if torn:
        warnings.warn(f"{path}: dropped {len(torn)} line(s) that are not whole records (line {', '.join(map(str, torn[:5]))}"
                      f"{', ...' if len(torn) > 5 else ''}); a run killed mid-write leaves one",
                      stacklevel=4)  # the caller of train()
    atomic_write_bytes(path, ("\n".join(keep) + ("\n" if keep else "")).encode())


def build_model_from_run(cfg: TrainConfig) -> nn.Module:
    """The trained model of a run folder: base model, patched, with the last checkpoint loaded."""
    path = Path(cfg.out_dir) / CKPT
    if not path.is_file():
        raise TrainingError(f"{path}: no checkpoint yet; run `flashar-adapt train --config ...` first")
    state = load_checkpoint(path)
    model = build_model(cfg)
    _load_trainable(model, state, cfg)
    return model.eval()


def add_cli(sub) -> None:
    s = sub.add_parser("train", help="two-stage FlashAR post-training (resumes from the last checkpoint)")
    s.add_argument("--config", required=True, help="training config YAML")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument("--allow-config-change", action="store_true",
                   help="resume even though the config differs from the checkpoint's (the differences are listed)")
    s.set_defaults(fn=lambda a: (train(a.config, progress=not a.no_progress,
                                       allow_config_change=a.allow_config_change), 0)[1])
