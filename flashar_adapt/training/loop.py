"""The training loop on accelerate: both stages, resumed from the run folder's checkpoint."""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import random
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..adapters import lora_parameters
from ..files import exclusive_lock, remove_dead_temp_files
from ..patching import context
from ..shards import ShardDataset
from .checkpoints import (
    CKPT,
    LOG,
    RUN_MARKER,
    check_run_identity,
    claim_run_folder,
    load_checkpoint,
    load_trainable,
    run_inputs,
    save_if_due,
    set_rng_state,
    truncate_log,
)
from .config import StageConfig, TrainConfig, TrainingError, stage_of
from .loss import FlashARLoss
from .model import add_lora, build_model, enable_gradient_checkpointing, frozen_teacher, param_groups, set_trainable


def _accelerator(cfg: TrainConfig):
    # accelerate is an optional dependency (the "train" extra): imported when a run starts
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    mp = cfg.mixed_precision
    cpu = cfg.cpu or not torch.cuda.is_available()
    if mp == "fp16" and cpu:
        raise TrainingError("mixed_precision fp16 needs a GPU; use bf16 or no on CPU")
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
    import accelerate  # optional dependency (the "train" extra), present when this is reached

    return (
        f"launched with FSDP on CPU, which accelerate {accelerate.__version__} does not shard ({what}); "
        "launch with integrations/accelerate/cpu.yaml (DDP over gloo) or on GPUs (docs/training.md)"
    )


def train(cfg: TrainConfig | str | os.PathLike, progress: bool = True, allow_config_change: bool = False) -> nn.Module:
    """Run (or resume) both stages; returns the trained, patched model (unwrapped).

    A run resumes from ``out_dir/checkpoint.pt`` only with the config and the recipe content
    that wrote it; a change (or a checkpoint that records neither) is refused with the keys
    that differ, unless ``allow_config_change`` (then they are listed in a warning).
    ``out_dir`` is locked while the run lasts; a ``metrics.jsonl`` there that no run of ours
    wrote is refused, never rewritten."""
    if not isinstance(cfg, TrainConfig):
        cfg = TrainConfig.load(cfg)
    acc = _accelerator(cfg)
    out = Path(cfg.out_dir)
    if acc.is_main_process:
        _make_run_folder(out, cfg.source)
    acc.wait_for_everyone()
    with exclusive_lock(out, TrainingError, "train run") if acc.is_main_process else contextlib.nullcontext():
        return _train_in(cfg, acc, out, progress, allow_config_change)


def _make_run_folder(out: Path, source: str) -> None:
    where = f"{source}: " if source else ""
    if out.exists() and not out.is_dir():
        raise TrainingError(f"{where}out_dir {str(out)!r} is a file, not a folder: choose another out_dir")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TrainingError(f"{where}out_dir {str(out)!r}: cannot make the run folder ({e.strerror or e})") from None


def _train_in(cfg: TrainConfig, acc, out: Path, progress: bool, allow_config_change: bool) -> nn.Module:
    data = ShardDataset(cfg.data)
    torch.manual_seed(cfg.seed)  # the gate's first layer is randomly initialised
    model = build_model(cfg)
    ctx = context(model)
    check_data(data, ctx.recipe)
    inputs = run_inputs(cfg, model)  # the base weights, before any checkpoint is loaded into them
    total = cfg.stage1.steps + cfg.stage2.steps
    world = acc.num_processes
    if cfg.batch_size % (world * cfg.grad_accum):
        raise TrainingError(
            f"batch_size {cfg.batch_size} must divide by processes x grad_accum = {world * cfg.grad_accum}"
        )

    ckpt_path = out / CKPT
    state = load_checkpoint(ckpt_path) if ckpt_path.is_file() else None
    if state is not None and state.get("recipe") != ctx.recipe.name:
        raise TrainingError(f"{ckpt_path} was written for recipe {state.get('recipe')!r}, not {ctx.recipe.name!r}")
    if state is not None:
        check_run_identity(state, cfg, ctx.recipe, ckpt_path, allow_config_change, inputs=inputs)
    step = state["global_step"] if state else 0
    if acc.is_main_process:
        _say_resume(cfg, ckpt_path, state, total)
        for name, st in (("stage1", cfg.stage1), ("stage2", cfg.stage2)):
            if st.steps and st.warmup_steps > st.steps:  # legal (a short test run), rarely meant
                print(
                    f"train: {name}.warmup_steps ({st.warmup_steps}) is longer than the stage ({st.steps} steps): "
                    f"its learning rate stays below {name}.lr ({st.lr:g})"
                )
    if step >= total:
        load_trainable(model, state, cfg)
        return model
    log_path = out / LOG
    if acc.is_main_process:
        claim_run_folder(out, state is not None)
        if state is None and log_path.is_file() and log_path.stat().st_size:
            print(f"train: {out} holds no checkpoint ({CKPT}): starting from step 0, {LOG} begins again")
        truncate_log(log_path, step)
        for name in (CKPT, LOG, RUN_MARKER):  # temp files of a process killed mid-write
            remove_dead_temp_files(out, name)

    stage = None
    loss_mod = opt = sched = teacher = None
    it = None
    bar = None
    first, recent = step, collections.deque(maxlen=10)  # the summary averages the last steps
    if progress and acc.is_main_process:
        bar = tqdm(total=total, initial=step, desc="flashar train", dynamic_ncols=True)
    while step < total:
        st_idx, _ = stage_of(step, cfg)
        if st_idx != stage:
            stage = st_idx
            model = acc.unwrap_model(loss_mod).model if loss_mod is not None else model
            loss_mod, opt, sched, teacher = _start_stage(model, cfg, acc, stage, state, teacher)
            state = None
            it = data.global_batches(cfg.batch_size, cfg.seed, start_step=step)
        _, idx = next(it)
        t0 = time.perf_counter()
        lr = opt.param_groups[0]["lr"]  # the rate this step runs at (the schedule moves on after it)
        metrics = _train_step(loss_mod, opt, sched, data, ctx, cfg, acc, idx, step, ckpt_path)
        recent.append(metrics)
        step += 1
        _log_step(acc, bar, log_path, cfg, step, stage, metrics, lr, t0)
        save_if_due(acc, loss_mod, opt, sched, ckpt_path, ctx.recipe, cfg, step, inputs)
    if bar is not None:
        bar.close()
    if acc.is_main_process:
        _say_done(cfg, ckpt_path, step - first, total, recent)
    model = acc.unwrap_model(loss_mod).model
    model.eval()
    return model


def _next_command(cfg: TrainConfig) -> str:
    return f"flashar-adapt export --config {cfg.source or 'CONFIG.yaml'} --out EXPORT_DIR"


def _say_resume(cfg: TrainConfig, ckpt_path: Path, state: dict | None, total: int) -> None:
    """One line when a run continues from its checkpoint (or has nothing left to do)."""
    if state is None:
        return
    step = state["global_step"]
    if step >= total:
        print(f"train: {ckpt_path} is complete ({step}/{total} steps), nothing to train; next: {_next_command(cfg)}")
    else:
        print(f"train: resuming {ckpt_path} at step {step}/{total} (stage {stage_of(step, cfg)[0]})")


def _say_done(cfg: TrainConfig, ckpt_path: Path, ran: int, total: int, recent) -> None:
    """The summary at the end of a run: steps, final losses and gate (means of the last
    steps), where the checkpoint is, what to run next."""
    mean = {k: sum(m[k] for m in recent) / len(recent) for k in recent[-1]} if recent else {}
    losses = ", ".join(f"{k} {v:.4f}" for k, v in mean.items() if k != "gate")
    print(
        f"train: done, {total} steps ({ran} in this run); last {len(recent)} steps' mean: {losses}; "
        f"gate mean {mean.get('gate', float('nan')):.3f}\n"
        f"train: checkpoint {ckpt_path}; metrics {ckpt_path.parent / 'metrics.jsonl'}\n"
        f"train: next: {_next_command(cfg)}"
    )


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
        enable_gradient_checkpointing(model)
    groups = param_groups(model, cfg, stage)
    set_trainable(model, groups)
    opt = torch.optim.AdamW(groups, betas=cfg.betas, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_factor(st), last_epoch=-1)
    if state is not None and state["stage"] == stage:
        load_trainable(model, state, cfg)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"])
    elif state is not None:  # resumed at a stage boundary: weights only
        load_trainable(model, state, cfg)
    if teacher is None and stage == 2 and cfg.w_kd_fused > 0 and not st.lora:
        teacher = frozen_teacher(cfg, acc.device)
    loss_mod = FlashARLoss(model, cfg, stage, teacher)  # stages run 1 then 2: None in stage 1
    # The scheduler is stepped by hand: accelerate's wrapper would step it once per
    # process, making the schedule depend on the number of processes.
    loss_mod, opt = acc.prepare(loss_mod, opt)
    return loss_mod, opt, sched, teacher


def _lr_factor(st: StageConfig):
    """The stage's learning-rate multiplier per step: linear warmup, then cosine down to min_lr_ratio."""

    def f(step: int) -> float:
        if st.warmup_steps and step < st.warmup_steps:
            return (step + 1) / st.warmup_steps
        span = max(1, st.steps - st.warmup_steps)
        prog = min(1.0, (step - st.warmup_steps) / span)
        return st.min_lr_ratio + (1 - st.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * prog))

    return f


def _train_step(loss_mod, opt, sched, data, ctx, cfg: TrainConfig, acc, idx, step: int, ckpt_path: Path) -> dict:
    """One optimizer step on the global batch ``idx`` (grad_accum micro-batches per process);
    returns the loss terms averaged over micro-batches and processes."""
    world = acc.num_processes
    micro = cfg.batch_size // (world * cfg.grad_accum)
    metrics = {}
    for a in range(cfg.grad_accum):
        sl = idx[(a * world + acc.process_index) * micro : (a * world + acc.process_index + 1) * micro]
        batch = data.get(sl)
        cond = _drop_cond(ctx, batch.cond, cfg, step, (a * world + acc.process_index) * micro)
        with acc.accumulate(loss_mod):
            with acc.autocast():
                res = loss_mod(
                    cond.to(acc.device),
                    batch.codes.to(acc.device),
                    None if batch.cond_mask is None else batch.cond_mask.to(acc.device),
                    None if batch.preview is None else batch.preview.to(acc.device),
                )
            loss = res["loss"]
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"loss is {loss.item()} at step {step}; stopping. The last good checkpoint "
                    f"({ckpt_path}) is intact; lower the learning rate or check the data."
                )
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


def _log_step(
    acc, bar, log_path: Path, cfg: TrainConfig, step: int, stage: int, metrics: dict, lr: float, t0: float
) -> None:
    """metrics.jsonl every ``log_every`` steps and at the end; the progress bar every step."""
    if not acc.is_main_process:
        return
    rec = {
        "step": step,
        "stage": stage,
        "processes": acc.num_processes,
        **{k: round(v, 6) for k, v in metrics.items()},
        "lr": lr,
        "sec": round(time.perf_counter() - t0, 4),
    }
    if step % cfg.log_every == 0 or step == cfg.stage1.steps + cfg.stage2.steps:
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
    if bar is not None:
        bar.update(1)
        bar.set_postfix(
            stage=stage,
            fused=f"{metrics['ce_fused']:.3f}",
            vert=f"{metrics['ce_vertical']:.3f}",
            kd=f"{metrics['kd']:.3f}",
            gate=f"{metrics['gate']:.3f}",
            **({"kd_fused": f"{metrics['kd_fused']:.3f}"} if "kd_fused" in metrics else {}),
        )


def _drop_cond(ctx, cond, cfg: TrainConfig, step: int, start: int):
    """Replace some class conditions by the null class (CFG needs a trained unconditional
    path). The draw depends only on (seed, step, position in the global batch), so resume
    and any number of processes see the same drops."""
    c = ctx.recipe.condition
    if cfg.cond_dropout <= 0 or c.kind != "class" or c.null_class is None:
        return cond
    g = torch.Generator().manual_seed(cfg.seed * 7919 + step)
    u = torch.rand(cfg.batch_size, generator=g)[start : start + cond.shape[0]]
    return torch.where(u < cfg.cond_dropout, torch.full_like(cond, c.null_class), cond)


def check_data(data: ShardDataset, recipe) -> None:
    """Refuse data that does not fit ``recipe`` (grid, codebook, condition kind, classes,
    preview grid), with a TrainingError naming what differs."""
    im, c = recipe.image, recipe.condition
    if tuple(data.grid) != tuple(im.grid) and not im.variable_grid:
        raise TrainingError(f"data grid {list(data.grid)} differs from the recipe's {list(im.grid)}")
    if data.codebook_size != im.codebook_size:
        raise TrainingError(f"data codebook {data.codebook_size} differs from the recipe's {im.codebook_size}")
    if data.recipe and data.recipe != recipe.name:
        # same grid and codebook, maybe another tokenizer: said, not refused (a renamed copy of a
        # recipe is common and legitimate)
        warnings.warn(
            f"{data.dir} was tokenized for recipe {data.recipe!r}; training with {recipe.name!r}. If their "
            "image tokenizers differ, the codes mean something else to this model",
            stacklevel=2,
        )
    small = im.preview(tuple(data.grid))
    if small != data.preview_grid:
        have = "none" if data.preview_grid is None else "x".join(map(str, data.preview_grid))
        raise TrainingError(
            f"{data.dir}: the data's preview grid is {have} (manifest preview_grid); the recipe decodes "
            + (
                "none"
                if small is None
                else f"a {small[0]}x{small[1]} preview before the {data.grid[0]}x{data.grid[1]} grid"
            )
        )
    want = "class" if c.kind == "class" else "tokens" if c.kind == "tokens" else None
    if want and data.cond_kind != want:
        raise TrainingError(
            f"{data.dir}: data conditions are {data.cond_kind!r}, the recipe's condition.kind is {c.kind!r}"
        )
    if c.kind == "class":
        # ids in [0, num_classes) plus the null class (unconditional examples); each shard is
        # checked against this when opened, so a bad id is reported with its file
        top = c.num_classes - 1 if c.null_class is None else max(c.num_classes - 1, c.null_class)
        data.limit_classes(c.num_classes, top)
