"""A run folder's checkpoint (atomic, resumable: weights, optimizer, schedule, random state)
and metrics log, and the trained model read back from it.

A run's identity is its contents: a checkpoint records the config and the resolved recipe
(``recipe.to_dict()``, overrides applied) that made it, and resuming it, exporting it or
generating from it compares both with what is given now, naming each difference
(``check_run_identity``). A run folder is marked as ours (``RUN_MARKER``) before anything
in it is rewritten, so another tool's ``metrics.jsonl`` is never truncated.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..adapters import lora_parameters
from ..files import atomic_write_bytes, file_record, marker_kind, owner_record
from ..numerics import weights_fingerprint
from ..patching import context
from ..recipe import Recipe
from ..validate import differing_keys, short, state_dict_misfit
from .config import TrainConfig, TrainingError, resume_diff, stage_of
from .model import add_lora, build_model, trainable_state

CKPT = "checkpoint.pt"
LOG = "metrics.jsonl"
RUN_MARKER = ".flashar_run.json"  # written into a run folder before anything in it is rewritten
RUN_KIND = "flashar-adapt train run"
# Recipe keys that do not change what a run computes.
RECIPE_FREE_KEYS = ("name", "description", "match")


DIGEST_KEY = "contents_sha256"  # a checkpoint's digest of everything else it holds


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: written to a temp file in the same folder, fsynced, renamed over the old one.
    Any failure (disk full, kill) leaves the previous checkpoint as it was. The state gets a
    digest of its contents (``DIGEST_KEY``): torch's reader checks no checksum, so a byte
    changed on disk inside a tensor would otherwise load as a different weight."""
    buf = io.BytesIO()
    torch.save({**state, DIGEST_KEY: contents_digest(state)}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: Path) -> dict:
    """The checkpoint's state; TrainingError if unreadable or if its contents no longer match
    the digest written with them (checkpoints written before digests load unchecked)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise TrainingError(f"{path}: checkpoint is unreadable ({e}); move it away to restart from scratch") from None
    if isinstance(state, dict) and DIGEST_KEY in state:
        want = state.pop(DIGEST_KEY)
        if contents_digest(state) != want:
            raise TrainingError(
                f"{path}: the checkpoint's contents differ from the digest written with them (damaged on disk or "
                "edited); restore it from a copy, or move it away to restart from scratch"
            )
    return state


def contents_digest(state) -> str:
    """sha256 over a checkpoint state: every tensor's dtype, shape and bytes, every other value
    by its repr, dict keys in sorted order; a list and a tuple hash alike (a saved tuple may
    load back as a list)."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(x, dict):
            h.update(f"D{len(x)}".encode())
            for k in sorted(x, key=repr):
                h.update(repr(k).encode())
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            h.update(f"L{len(x)}".encode())
            for v in x:
                walk(v)
        else:
            h.update(f"V{x!r}".encode())

    walk(state)
    return h.hexdigest()


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate(_tuplify(s["python"]))


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def save_if_due(
    acc, loss_mod, opt, sched, ckpt_path: Path, recipe: Recipe, cfg: TrainConfig, step: int, inputs: dict | None = None
) -> None:
    """Checkpoint after optimizer step ``step`` every ``save_every`` steps, at the end of
    each stage and of the run (the main process writes; all wait for it). ``inputs``
    (``run_inputs``) records what the run trains on."""
    total = cfg.stage1.steps + cfg.stage2.steps
    if step % cfg.save_every == 0 or step == total or step == cfg.stage1.steps:
        inner = acc.unwrap_model(loss_mod).model
        if acc.is_main_process:
            save_checkpoint(
                ckpt_path,
                {
                    "global_step": step,
                    "stage": stage_of(step - 1, cfg)[0],
                    "recipe": recipe.name,
                    "recipe_config": recipe.to_dict(),
                    "trainable": trainable_state(inner),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "rng": rng_state(),
                    "lora": bool(lora_parameters(inner)),
                    "config": cfg.to_dict(),
                    **({"inputs": inputs} if inputs else {}),
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


@dataclass(frozen=True)
class RunPoint:
    """Where a run's last checkpoint stands."""

    out_dir: str
    step: int
    stage: int  # the stage of the last step done
    stage1_steps: int
    total: int  # of the config given now

    @property
    def finished(self) -> bool:
        return self.step >= self.total

    def __str__(self) -> str:
        if self.finished:
            return f"step {self.step} of {self.total} (stage {self.stage}, finished)"
        if self.step == self.stage1_steps:
            return (
                f"step {self.step} of {self.total} (stage 1 done; stage 2, {self.total - self.step} steps, not started)"
            )
        return (
            f"step {self.step} of {self.total} (stage {self.stage}, unfinished: {self.total - self.step} steps to go)"
        )


def recipe_diff(saved: dict, recipe: Recipe) -> list[str]:
    """``recipe.key: old -> new`` wherever ``recipe`` (resolved) differs from a recorded one."""
    return [
        f"recipe.{k}: {short(a, 40)} -> {short(b, 40)}"
        for k, a, b in differing_keys(saved, recipe.to_dict(), RECIPE_FREE_KEYS)
    ]


def run_differences(state: dict, cfg: TrainConfig, recipe: Recipe, inputs: dict | None = None) -> list[str]:
    """How ``cfg`` and its resolved ``recipe`` differ from what made the checkpoint ``state``;
    a record the checkpoint lacks is a difference too (nothing shows it is the same run)."""
    out = []
    if state.get("recipe") != recipe.name:
        out.append(f"recipe name: {short(state.get('recipe'), 40)} -> {recipe.name!r}")
    saved_cfg, saved_recipe = state.get("config"), state.get("recipe_config")
    if isinstance(saved_cfg, dict):
        out += resume_diff(saved_cfg, state["global_step"], cfg, recipe_by_content=isinstance(saved_recipe, dict))
    else:
        out.append("config: not recorded in the checkpoint")
    if isinstance(saved_recipe, dict):
        out += recipe_diff(saved_recipe, recipe)
    else:
        out.append("recipe content: not recorded in the checkpoint")
    saved_inputs = state.get("inputs")
    if isinstance(saved_inputs, dict) and inputs is not None:  # checkpoints written before it record none
        if saved_inputs.get("data") != inputs["data"]:
            out.append(f"data: the files in {cfg.data} are not those the run trained on")
        if saved_inputs.get("model") != inputs["model"]:
            out.append("model: the base model's weights are not those the run started from")
    return out


def run_inputs(cfg: TrainConfig, model) -> dict:
    """What a run trains on, beyond its config: the data (its manifest and each shard file
    it lists, by size and the hash of both ends) and the base model's weights (a sampled
    hash, ``numerics.weights_fingerprint``; the FlashAR modules are the run's own). A data
    folder or a model file replaced under the same names is then another run."""
    data = Path(cfg.data)
    h = hashlib.sha256()
    try:
        manifest = (data / "manifest.json").read_bytes()
        h.update(manifest)
        for sh in json.loads(manifest).get("shards", []):
            h.update(json.dumps(file_record(data / sh["file"]), sort_keys=True).encode())
    except (OSError, ValueError, TypeError, KeyError, AttributeError):  # read and checked by ShardDataset already
        pass
    return {"data": h.hexdigest(), "model": weights_fingerprint(model, skip=("flashar.",))}


def check_run_identity(
    state: dict,
    cfg: TrainConfig,
    recipe: Recipe,
    ckpt_path: Path,
    allow: bool,
    action: str = "resume",
    inputs: dict | None = None,
) -> None:
    """Refuse a checkpoint that the config and recipe given now did not make, naming every
    difference; with ``allow`` (``--allow-config-change``) list them in a warning instead."""
    diff = run_differences(state, cfg, recipe, inputs)
    if not diff:
        return
    if not allow:
        how = (
            "Resume with the config that made it, use another out_dir, or pass --allow-config-change "
            "(train(..., allow_config_change=True)) to go on with the new values"
            if action == "resume"
            else "Use the config (and recipe) that made it, or pass --allow-config-change to use the "
            "checkpoint with these"
        )
        raise TrainingError(f"{ckpt_path} was written with another config; it differs at {'; '.join(diff)}. {how}")
    doing = "resuming" if action == "resume" else "using"
    warnings.warn(f"{doing} {ckpt_path} with a changed config: {'; '.join(diff)}", stacklevel=4)


def claim_run_folder(out: Path, has_checkpoint: bool) -> None:
    """Mark ``out`` as a run folder of ours before the run rewrites anything in it. A
    ``metrics.jsonl`` with neither our marker nor a checkpoint beside it is another tool's:
    refused, and left as it was."""
    marker = out / RUN_MARKER
    ours = has_checkpoint or _is_run_marker(marker)
    if not ours and (out / LOG).exists():
        raise TrainingError(
            f"{out / LOG} exists, but {out} holds no checkpoint and no mark of a flashar-adapt run: "
            "it is another program's log and was left as it was; move it away or choose another out_dir"
        )
    if not marker.exists():
        atomic_write_bytes(marker, json.dumps(owner_record(RUN_KIND)).encode())


def _is_run_marker(path: Path) -> bool:
    return marker_kind(path) == RUN_KIND


def load_run(cfg: TrainConfig, allow_config_change: bool = False) -> tuple[nn.Module, RunPoint]:
    """The trained model of a run folder (base model, patched, last checkpoint loaded) and
    where that checkpoint stands. The checkpoint must have been made by ``cfg`` and its
    recipe as they are now (``check_run_identity``), unless ``allow_config_change``."""
    path = Path(cfg.out_dir) / CKPT
    if not path.is_file():
        raise TrainingError(f"{path}: no checkpoint yet; run `flashar-adapt train --config ...` first")
    state = load_checkpoint(path)
    model = build_model(cfg)
    inputs = run_inputs(cfg, model)
    check_run_identity(state, cfg, context(model).recipe, path, allow_config_change, action="use", inputs=inputs)
    load_trainable(model, state, cfg)
    step = int(state["global_step"])
    point = RunPoint(
        str(cfg.out_dir),
        step,
        int(state.get("stage", stage_of(step - 1, cfg)[0])),
        cfg.stage1.steps,
        cfg.stage1.steps + cfg.stage2.steps,
    )
    return model.eval(), point


def build_model_from_run(cfg: TrainConfig, allow_config_change: bool = False) -> nn.Module:
    """``load_run``'s model."""
    return load_run(cfg, allow_config_change)[0]
