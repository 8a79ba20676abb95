"""Export an adapted model (LoRA merged) in its family's own layout, and load it back.

An export folder::

    backbone/               the model in its native layout (save_pretrained dir, LlamaGen .pt, ...)
    flashar.safetensors     everything under model.flashar (branch, norm, vertical head, gate)
    recipe.yaml             the recipe the model was patched with
    flashar_config.json     format, backend, backbone spec, patch options, library version

The folder is built beside its destination and renamed into place, so a failure at any
point leaves either the previous export or nothing, never half a folder.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from .backends import get_backend
from .patching import context, patch
from .recipe import recipe_from_dict

FORMAT = "flashar-export/1"


class ExportError(ValueError):
    """An export folder is missing pieces or does not fit its recipe."""


def merge_lora(model: torch.nn.Module) -> int:
    """Merge every LoRA layer into its base weight and put the plain layer back, in place.
    Returns how many layers were merged."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return 0
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]
    for name, m in targets:
        m.merge()
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, m.get_base_layer())
    return len(targets)


def _flashar_state(model) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in model.flashar.state_dict().items()}


def export_merged(model: torch.nn.Module, out_dir) -> Path:
    """Write ``model`` (patched, possibly with LoRA) to ``out_dir``. LoRA is merged into the
    backbone in place first, so the exported weights are what the model computes."""
    ctx = context(model)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    merged = merge_lora(model)
    for stale in list(out_dir.parent.glob(f".{out_dir.name}.tmp-*")) + list(out_dir.parent.glob(f".{out_dir.name}.old-*")):
        shutil.rmtree(stale, ignore_errors=True)  # left by an export that was killed
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        (tmp / "backbone").mkdir()
        spec = ctx.backend.save_model(model, tmp / "backbone")
        save_file(_flashar_state(model), str(tmp / "flashar.safetensors"), metadata={"format": FORMAT})
        (tmp / "recipe.yaml").write_text(ctx.recipe.to_yaml())
        from . import __version__

        cfg = {"format": FORMAT, "backend": ctx.recipe.backend, "recipe": ctx.recipe.name, "backbone": spec,
               "fixed_gate": model.flashar.fixed_gate, "lora_layers_merged": merged, "flashar_adapt": __version__}
        (tmp / "flashar_config.json").write_text(json.dumps(cfg, indent=1))
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def load_adapted(out_dir, device: str | torch.device | None = None) -> torch.nn.Module:
    """Rebuild the patched model from an export folder: no network, no pickled code."""
    out_dir = Path(out_dir)
    cfg_path = out_dir / "flashar_config.json"
    if not cfg_path.is_file():
        raise ExportError(f"{out_dir}: no flashar_config.json (not a flashar-adapt export?)")
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("format") != FORMAT:
        raise ExportError(f"{cfg_path}: format {cfg.get('format')!r} is not {FORMAT!r}")
    recipe = recipe_from_dict(yaml.safe_load((out_dir / "recipe.yaml").read_text()), source=str(out_dir / "recipe.yaml"))
    backend = get_backend(cfg["backend"])
    model = backend.load_model(cfg["backbone"], out_dir / "backbone")
    if device is not None:
        model = model.to(device)
    patch(model, recipe, fixed_gate=cfg.get("fixed_gate"))
    load_flashar_weights(model, out_dir / "flashar.safetensors")
    return model.eval()


def load_flashar_weights(model, path) -> None:
    """Load FlashAR module weights (safetensors) into a patched model, checking they fit."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: missing FlashAR weights")
    try:
        sd = load_file(str(path))
    except Exception as e:  # safetensors raises several types for truncated/corrupt files
        raise ExportError(f"{path}: unreadable or truncated safetensors file ({e})") from None
    own = model.flashar.state_dict()
    missing = sorted(set(own) - set(sd))
    extra = sorted(set(sd) - set(own))
    bad = [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if missing or extra or bad:
        raise ExportError(f"{path}: FlashAR weights do not fit this model/recipe (another recipe or branch setting?): "
                          f"missing {missing[:3]}, unexpected {extra[:3]}, wrong shape {bad[:3]}")
    model.flashar.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()})


def add_cli(sub) -> None:
    s = sub.add_parser("export", help="merge LoRA and export an adapted model from a training run")
    s.add_argument("--config", required=True, help="the training config YAML of the run")
    s.add_argument("--out", required=True, help="export folder to write")
    s.set_defaults(fn=_cmd_export)


def _cmd_export(args) -> int:
    from .training import TrainConfig, build_model_from_run

    cfg = TrainConfig.load(args.config)
    model = build_model_from_run(cfg)
    export_merged(model, args.out)
    print(f"exported to {args.out}")
    return 0
