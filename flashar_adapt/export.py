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

import contextlib
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


def _lora_layers(model) -> list:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return []
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


class adapters_disabled:  # noqa: N801 - used as a context manager, like torch.no_grad
    """``with fa.adapters_disabled(model):`` LoRA layers compute their base layer exactly, so a
    model exported with ``merge=False`` decodes as the original model (raster mode)."""

    def __init__(self, model):
        self.layers = [m for _, m in _lora_layers(model)]

    def __enter__(self):
        for m in self.layers:
            m.enable_adapters(False)
        return self

    def __exit__(self, *exc):
        for m in self.layers:
            m.enable_adapters(True)


@contextlib.contextmanager
def _base_layers_in_place(model):
    """Temporarily put every LoRA layer's base layer back, so the backbone saves in its
    native layout with the original (unmerged) weights."""
    swapped = []
    try:
        for name, m in _lora_layers(model):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, m.get_base_layer())
            swapped.append((parent, child, m))
        yield
    finally:
        for parent, child, m in swapped:
            setattr(parent, child, m)


def _adapter_state(model) -> tuple[dict, dict | None]:
    layers = _lora_layers(model)
    if not layers:
        return {}, None
    m = layers[0][1]
    name = m.active_adapters[0] if getattr(m, "active_adapters", None) else "default"
    meta = {"file": "adapters.safetensors", "r": int(m.r[name]), "alpha": int(m.lora_alpha[name]), "layers": len(layers)}
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items() if "lora_" in k and not k.startswith("flashar.")}
    return sd, meta


def _flashar_state(model) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in model.flashar.state_dict().items()}


def export_merged(model: torch.nn.Module, out_dir, merge: bool = True) -> Path:
    """Write ``model`` (patched, possibly with LoRA) to ``out_dir``. LoRA is merged into the
    backbone in place first, so the exported weights are what the model computes.

    ``merge=False`` keeps the adapters apart instead: ``backbone/`` holds the original
    weights and ``adapters.safetensors`` the LoRA factors, re-attached by ``load_adapted``;
    under ``fa.adapters_disabled(model)`` the loaded model is the original model exactly
    (raster mode), with them it is the post-trained one (two-way)."""
    ctx = context(model)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    adapters, lora_meta = ({}, None) if merge else _adapter_state(model)
    merged = merge_lora(model) if merge else 0
    for stale in list(out_dir.parent.glob(f".{out_dir.name}.tmp-*")) + list(out_dir.parent.glob(f".{out_dir.name}.old-*")):
        shutil.rmtree(stale, ignore_errors=True)  # left by an export that was killed
    tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.tmp-"))
    try:
        (tmp / "backbone").mkdir()
        with _base_layers_in_place(model):
            spec = ctx.backend.save_model(model, tmp / "backbone")
        save_file(_flashar_state(model), str(tmp / "flashar.safetensors"), metadata={"format": FORMAT})
        if lora_meta is not None:
            save_file(adapters, str(tmp / lora_meta["file"]), metadata={"format": FORMAT})
        (tmp / "recipe.yaml").write_text(ctx.recipe.to_yaml())
        from . import __version__

        cfg = {"format": FORMAT, "backend": ctx.recipe.backend, "recipe": ctx.recipe.name, "backbone": spec,
               "fixed_gate": model.flashar.fixed_gate, "lora_layers_merged": merged, "flashar_adapt": __version__}
        if lora_meta is not None:
            cfg["lora_adapters"] = lora_meta
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
    if cfg.get("lora_adapters"):
        _attach_adapters(model, out_dir, cfg["lora_adapters"])
    return model.eval()


def _attach_adapters(model, out_dir: Path, meta: dict) -> None:
    """Re-inject LoRA on the recipe's targets and load the exported factors, checking they fit."""
    from .training import add_lora

    path = out_dir / meta["file"]
    try:
        sd = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for missing/corrupt files
        raise ExportError(f"{path}: unreadable or missing LoRA adapters ({e})") from None
    add_lora(model, r=meta["r"], alpha=meta["alpha"], dropout=0.0)
    own = {k: v for k, v in model.state_dict().items() if "lora_" in k and not k.startswith("flashar.")}
    bad = sorted(set(own) ^ set(sd)) + [k for k in own if k in sd and own[k].shape != sd[k].shape]
    if bad:
        raise ExportError(f"{path}: adapters do not fit this model/recipe: {bad[:3]}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=False)


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
    s.add_argument("--keep-adapters", action="store_true",
                   help="keep LoRA adapters unmerged (adapters.safetensors): raster mode with adapters off is the "
                        "original model exactly")
    s.set_defaults(fn=_cmd_export)


def _cmd_export(args) -> int:
    from .training import TrainConfig, build_model_from_run

    cfg = TrainConfig.load(args.config)
    model = build_model_from_run(cfg)
    export_merged(model, args.out, merge=not getattr(args, "keep_adapters", False))
    print(f"exported to {args.out}")
    return 0
