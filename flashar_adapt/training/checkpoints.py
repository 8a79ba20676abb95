"""A run folder's checkpoint (atomic, resumable: weights, optimizer, schedule, random state)
and metrics log, and the trained model read back from it."""

from __future__ import annotations

import io
import json
import random
import warnings
from pathlib import Path

import torch
from torch import nn

from ..adapters import lora_parameters
from ..files import atomic_write_bytes
from ..validate import state_dict_misfit
from .config import TrainConfig, TrainingError, stage_of
from .model import add_lora, build_model, trainable_state

CKPT = "checkpoint.pt"


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: written to a temp file in the same folder, fsynced, renamed over the old one.
    Any failure (disk full, kill) leaves the previous checkpoint as it was."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainingError(f"{path}: checkpoint is unreadable ({e}); move it away to restart from scratch") from None


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(_tuplify(s["python"]))


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_if_due(acc, loss_mod, opt, sched, ckpt_path: Path, recipe_name: str, cfg: TrainConfig, step: int) -> None:
    """Checkpoint after optimizer step ``step`` every ``save_every`` steps, at the end of
    each stage and of the run (the main process writes; all wait for it)."""
    total = cfg.stage1.steps + cfg.stage2.steps
    if step % cfg.save_every == 0 or step == total or step == cfg.stage1.steps:
        inner = acc.unwrap_model(loss_mod).model
        if acc.is_main_process:
            save_checkpoint(
                ckpt_path,
                {
                    "global_step": step,
                    "stage": stage_of(step - 1, cfg)[0],
                    "recipe": recipe_name,
                    "trainable": trainable_state(inner),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "rng": rng_state(),
                    "lora": bool(lora_parameters(inner)),
                    "config": cfg.to_dict(),
                },
            )
        acc.wait_for_everyone()


def load_trainable(model, state, cfg) -> None:
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


def truncate_log(path: Path, step: int) -> None:
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
        warnings.warn(
            f"{path}: dropped {len(torn)} line(s) that are not whole records (line {', '.join(map(str, torn[:5]))}"
            f"{', ...' if len(torn) > 5 else ''}); a run killed mid-write leaves one",
            stacklevel=4,
        )  # the caller of train()
    atomic_write_bytes(path, ("\n".join(keep) + ("\n" if keep else "")).encode())


def build_model_from_run(cfg: TrainConfig) -> nn.Module:
    """The trained model of a run folder: base model, patched, with the last checkpoint loaded."""
    path = Path(cfg.out_dir) / CKPT
    if not path.is_file():
        raise TrainingError(f"{path}: no checkpoint yet; run `flashar-adapt train --config ...` first")
    state = load_checkpoint(path)
    model = build_model(cfg)
    load_trainable(model, state, cfg)
    return model.eval()
