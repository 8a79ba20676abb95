"""Export an adapted model (LoRA merged) in its family's own layout, and load it back.

An export folder::

    backbone/               the model in its native layout (save_pretrained dir, LlamaGen .pt, ...)
    flashar.safetensors     everything under model.flashar (branch, norm, vertical head, gate)
    recipe.yaml             the recipe the model was patched with
    flashar_config.json     format, backbone spec (it names its model format), patch options, library version

The folder is built beside its destination and renamed into place, so a failure at any
point leaves either the previous export or nothing, never half a folder. An existing
destination is replaced only when it is a previous export (its ``flashar_config.json``
marker and nothing but export files at the top); anything else is refused, naming what is
there. Files and folders get the modes the user's umask gives. Nothing else is removed:
the temp folder carries a marker (kind, target, pid, host, time), and an export removes
only such folders of dead processes; a lock beside the destination keeps a second export
to it out while one runs (``flashar_adapt.files``).

Loading treats the folder as untrusted: every file it names must resolve inside it, the
recipe must equal the one the weights were exported with (recorded in the config), and
any defect is an ``ExportError``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .adapters import base_layers_in_place, lora_layers, lora_named_parameters, merge_lora
from .devices import device_problem
from .errors import FlashARError, InputError
from .files import (
    apply_umask,
    disown,
    escaping_links,
    file_record,
    inside,
    lock_holder,
    owned_temp_dir,
    remove_dead_temp_dirs,
    target_lock,
    write_failure,
)
from .formats import FormatError, save_model, spec_format
from .generation import CLASSES
from .numerics import non_finite_weights
from .patching import context, patch
from .recipe import RecipeError, recipe_from_dict, safe_yaml
from .training import RunPoint, TrainConfig, TrainingError, add_lora, load_run
from .validate import (
    Is,
    Num,
    OneOf,
    did_you_mean,
    differing_keys,
    first_problem,
    first_unknown,
    short,
    state_dict_misfit,
)
from .version import __version__

FORMAT = "flashar-export/1"
CONFIG = "flashar_config.json"  # also the marker that a folder is an export
EXPORT_KIND = "flashar-adapt export"  # the kind our temp folders' markers name
# classes.json: the class names of the training data, which ``flashar-adapt export`` adds
EXPORT_ENTRIES = ("backbone", "flashar.safetensors", "recipe.yaml", CONFIG, "adapters.safetensors", "classes.json")
# ``backend``: where exports written before model formats named the backbone's format
CONFIG_RULES = {
    "format": OneOf((FORMAT,)),
    "backend": Is((str,), "a model format name", optional=True),
    "backbone": {"format": Is((str,), "a model format name", optional=True)},
    "fixed_gate": Num(0, 1, optional=True),
    "lora_layers_merged": Num(0, integer=True, optional=True),
}
# Every key an export's config may hold (what _write_export writes, and "backend", its older name
# for the backbone's format).
CONFIG_KEYS = (
    "format",
    "recipe",
    "backbone",
    "backend",
    "fixed_gate",
    "lora_layers_merged",
    "flashar_adapt",
    "recipe_config",
    "lora_adapters",
    "backbone_files",
    "files",
    "config_sha256",
)
_ADAPTER_RULES = {"file": Is((str,), "a file name"), "r": Num(1, integer=True), "alpha": Num(1, integer=True)}
# Recipe keys that do not change what the exported weights compute.
_RECIPE_FREE = ("name", "description", "match", "lora", "tokenizer")


class ExportError(FlashARError, ValueError):
    """An export folder is missing pieces, is damaged, or does not fit its recipe."""


def _adapter_state(model) -> tuple[dict, dict | None]:
    layers = lora_layers(model)
    if not layers:
        return {}, None
    m = layers[0][1]
    name = m.active_adapters[0] if getattr(m, "active_adapters", None) else "default"
    meta = {
        "file": "adapters.safetensors",
        "r": int(m.r[name]),
        "alpha": int(m.lora_alpha[name]),
        "layers": len(layers),
    }
    sd = {k: v.detach().cpu().contiguous() for k, v in lora_named_parameters(model)}
    return sd, meta


def _flashar_state(model) -> dict:
    return {k: v.detach().cpu().contiguous() for k, v in model.flashar.state_dict().items()}


def export_merged(model: torch.nn.Module, out_dir, merge: bool = True, extra_files: dict | None = None) -> Path:
    """Write ``model`` (patched, possibly with LoRA) to ``out_dir``. LoRA is merged into the
    backbone in place first, so the exported weights are what the model computes.
    ``out_dir`` must not exist, be empty, or be a previous export (then it is replaced).
    Two exports to one folder at once: the second is refused (a lock beside the folder).

    ``merge=False`` keeps the adapters apart instead: ``backbone/`` holds the original
    weights and ``adapters.safetensors`` the LoRA factors, re-attached by ``load_adapted``;
    under ``fa.adapters_disabled(model)`` the loaded model is the original model exactly
    (raster mode), with them it is the post-trained one (two-way).

    ``extra_files`` ({name in ``EXPORT_ENTRIES``: bytes}) are written into the folder before
    it appears, so an export is complete or absent, never half labelled."""
    if not isinstance(out_dir, (str, os.PathLike)):
        raise ExportError(f"out_dir must be a folder path, got {type(out_dir).__name__}")
    if not isinstance(merge, bool):
        raise ExportError(f"merge must be True or False, got {merge!r}")
    ctx = context(model)
    nan = non_finite_weights(model)
    if nan:
        raise ExportError(
            f"the model holds NaN or infinite weights ({', '.join(nan)}); refusing to export them "
            "(training diverged? export an earlier checkpoint)"
        )
    if not merge and not lora_layers(model):
        raise ExportError(
            "merge=False (--keep-adapters) keeps LoRA adapters apart, but this model has none (a run with "
            "stage2.lora: false fine-tunes the backbone itself, so its original weights are not kept); "
            "export it merged"
        )
    for name, data in (extra_files or {}).items():
        if name not in EXPORT_ENTRIES or "/" in name:
            raise ExportError(f"extra_files: {name!r} is not a file an export holds ({', '.join(EXPORT_ENTRIES)})")
        if not isinstance(data, bytes):
            raise ExportError(f"extra_files[{name!r}] must be bytes, got {type(data).__name__}")
    out_dir = Path(out_dir)
    _check_replaceable(out_dir)
    blocked = next((q for q in out_dir.parents if q.exists() and not q.is_dir()), None)
    if blocked is not None:  # mkdir would say "File exists" about a file the user never named
        raise ExportError(f"{out_dir}: {blocked} is a file, not a folder; export somewhere else")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with target_lock(out_dir, ExportError, "export"):
        _check_replaceable(out_dir)  # again, now that no other export can be writing it
        remove_dead_temp_dirs(out_dir, EXPORT_KIND)  # left by exports that were killed
        adapters, lora_meta = ({}, None) if merge else _adapter_state(model)
        merged = merge_lora(model) if merge else 0
        ctx.merged_adapters += merged  # the original weights are gone: unpatch refuses from now on
        tmp = owned_temp_dir(out_dir, EXPORT_KIND)
        try:
            _write_export(model, ctx, tmp, merged, adapters, lora_meta, extra_files or {})
            _swap_in(tmp, out_dir)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)  # made by this call
            failed = write_failure(e, out_dir)
            if failed is not None:
                raise OSError(
                    failed.errno, f"{failed.strerror} (writing the export: nothing was replaced)", failed.filename
                ) from e
            raise
    return out_dir


def export_run(
    config,
    out_dir,
    *,
    merge: bool = True,
    allow_unfinished: bool = False,
    allow_config_change: bool = False,
    log=print,
) -> tuple[Path, RunPoint]:
    """Export the last checkpoint of the training run that ``config`` (a training config
    file or ``TrainConfig``) describes; ``log`` is told which step and stage. A run that is
    training now, or whose checkpoint is short of the config's steps (stage 2 configured,
    never run), is refused unless ``allow_unfinished``; a checkpoint that this config and
    recipe did not make, unless ``allow_config_change`` (``training.check_run_identity``)."""
    cfg = config if isinstance(config, TrainConfig) else TrainConfig.load(config)
    holder = lock_holder(cfg.out_dir)
    if holder is not None and not allow_unfinished:
        raise ExportError(
            f"run {cfg.out_dir} is being trained now (pid {holder}); its checkpoint is not the final one. "
            "Wait for it to finish, or pass --allow-unfinished to export the checkpoint as it is"
        )
    try:
        model, point = load_run(cfg, allow_config_change=allow_config_change)
    except TrainingError as e:
        raise ExportError(str(e)) from None
    if not point.finished and not allow_unfinished:
        raise ExportError(
            f"run {cfg.out_dir} is at {point}; finish it (flashar-adapt train --config ...) or pass "
            "--allow-unfinished to export this checkpoint"
        )
    log(f"exporting run {cfg.out_dir} at {point}" + (" (still training)" if holder is not None else ""))
    names = Path(cfg.data) / CLASSES
    extra = {CLASSES: names.read_bytes()} if names.is_file() else None  # labels what the export generates
    return export_merged(model, out_dir, merge=merge, extra_files=extra), point


def _write_export(
    model, ctx, tmp: Path, merged: int, adapters: dict, lora_meta: dict | None, extra_files: dict
) -> None:
    (tmp / "backbone").mkdir()
    with base_layers_in_place(model):
        spec = save_model(model, tmp / "backbone")
    save_file(_flashar_state(model), str(tmp / "flashar.safetensors"), metadata={"format": FORMAT})
    if lora_meta is not None:
        save_file(adapters, str(tmp / lora_meta["file"]), metadata={"format": FORMAT})
    (tmp / "recipe.yaml").write_text(ctx.recipe.to_yaml())
    for name, data in extra_files.items():
        (tmp / name).write_bytes(data)
    cfg = {
        "format": FORMAT,
        "recipe": ctx.recipe.name,
        "backbone": spec,
        "fixed_gate": model.flashar.fixed_gate,
        "lora_layers_merged": merged,
        "flashar_adapt": __version__,
        "recipe_config": ctx.recipe.to_dict(),
    }
    if lora_meta is not None:
        cfg["lora_adapters"] = lora_meta
    cfg["backbone_files"] = backbone_files(tmp / "backbone")
    # the export's own files (recipe.yaml has its own check, against recipe_config)
    cfg["files"] = {
        n: file_record(tmp / n)
        for n in EXPORT_ENTRIES
        if n not in ("backbone", "recipe.yaml", CONFIG)
        if (tmp / n).is_file()
    }
    cfg["config_sha256"] = config_digest(cfg)
    (tmp / CONFIG).write_text(json.dumps(cfg, indent=1))


def backbone_files(root: Path) -> dict:
    """{path under ``root``: ``file_record``}: what the export wrote, so a file edited or
    swapped since (a model_args.json with another head count, another model's weights of the
    same size) is named on load instead of building another model."""
    return {f.relative_to(root).as_posix(): file_record(f) for f in sorted(p for p in root.rglob("*") if p.is_file())}


def config_digest(cfg: dict) -> str:
    """The hash of an export config without its own ``config_sha256``: an edited value (a
    ``fixed_gate`` set by hand) would silently change what the loaded model computes."""
    body = {k: v for k, v in cfg.items() if k != "config_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _check_files(folder: Path, recorded, now: dict) -> None:
    """Every recorded file is there and matches what its record holds (exports written before
    a kind of record existed hold fewer keys: those are compared)."""
    if not isinstance(recorded, dict):  # exports written before files were recorded
        return
    for name, rec in recorded.items():
        have = now.get(name)
        if have is None or not isinstance(rec, dict) or any(have.get(k) != v for k, v in rec.items()):
            size = rec.get("bytes") if isinstance(rec, dict) else None
            if have is None:
                what = "is missing"
            elif isinstance(size, int) and have["bytes"] != size:
                what = f"differs from what the export wrote ({have['bytes']} bytes, not {size}: truncated or replaced)"
            else:
                what = "differs from what the export wrote"
            raise ExportError(
                f"{folder / name} {what}; the weights would load into another model. Restore it or export again"
            )


def _check_backbone_files(out_dir: Path, recorded) -> None:
    if isinstance(recorded, dict):
        _check_files(out_dir / "backbone", recorded, backbone_files(out_dir / "backbone"))


def _check_config_digest(out_dir: Path, cfg: dict) -> None:
    """The config holds the values the export wrote (exports written before the digest pass)."""
    if "config_sha256" in cfg and cfg["config_sha256"] != config_digest(cfg):
        raise ExportError(
            f"{out_dir / CONFIG} was edited after the export (its values no longer match its config_sha256); "
            "the loaded model would compute something else. Restore it or export again"
        )


def _check_export_files(out_dir: Path, cfg: dict) -> None:
    """The export's own files (FlashAR weights, adapters, class names) as it recorded them;
    exports written before these records pass unchecked."""
    recorded = cfg.get("files")
    if isinstance(recorded, dict):
        odd = next((n for n in recorded if n not in EXPORT_ENTRIES or n in ("backbone", CONFIG)), None)
        if odd is not None:
            raise ExportError(f"{out_dir / CONFIG}: files: {odd!r} is not a file an export holds")
        now = {n: file_record(out_dir / n) for n in recorded if (out_dir / n).is_file()}
        _check_files(out_dir, recorded, now)


def _swap_in(tmp: Path, out_dir: Path) -> None:
    """Rename the finished ``tmp`` to ``out_dir``; a previous export there is first moved
    into a marked folder of ours (removed after, or by the next export if we are killed)."""
    disown(tmp)  # from here on it is the export itself
    apply_umask(tmp)  # mkdtemp made it 0700; an export is read by others like any file
    old = None
    if out_dir.exists() or out_dir.is_symlink():
        _check_replaceable(out_dir)  # again: something may have appeared while we wrote
        old = owned_temp_dir(out_dir, EXPORT_KIND, "old")
        os.replace(out_dir, old / "previous")
    try:
        os.replace(tmp, out_dir)
    except BaseException:
        if old is not None and not out_dir.exists():
            os.replace(old / "previous", out_dir)  # put the previous export back
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace anything but nothing, an empty folder or a previous export."""
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise ExportError(f"{out_dir} exists and is not a folder; refusing to replace it (choose a new folder)")
    if not out_dir.is_dir():
        return
    entries = sorted(p.name for p in out_dir.iterdir())
    if not entries:
        return
    foreign = [n for n in entries if n not in EXPORT_ENTRIES]
    marker = out_dir / CONFIG
    try:
        is_export = marker.is_file() and json.loads(marker.read_bytes()).get("format") == FORMAT
    except (ValueError, OSError, AttributeError):
        is_export = False
    if foreign or not is_export:
        what = ", ".join((foreign or entries)[:6]) + (", ..." if len(foreign or entries) > 6 else "")
        raise ExportError(
            f"{out_dir} is not a flashar-adapt export (it holds {what}); refusing to replace it. "
            "Export to a new or empty folder, or to a previous export"
        )


def load_adapted(out_dir, device: str | torch.device | None = None) -> torch.nn.Module:
    """Rebuild the patched model from an export folder: no network, no pickled code. Any
    defect of the folder (missing or damaged files, a file leading outside the folder, a
    recipe.yaml edited since the export) is an ``ExportError``."""
    if not isinstance(out_dir, (str, os.PathLike)) or not str(out_dir).strip():
        raise InputError(f"out_dir must be the path of an export folder, got {out_dir!r}")
    out_dir = Path(out_dir)
    problem = None if device is None else device_problem(device)
    if problem:
        raise InputError(f"device: {problem}")
    cfg_path = out_dir / CONFIG
    if not cfg_path.is_file():
        raise ExportError(f"{out_dir}: no {CONFIG} (not a flashar-adapt export?)")
    cfg = _read_config(out_dir)
    recipe = _read_recipe(out_dir, cfg)
    try:
        fmt, spec = spec_format(cfg["backbone"], legacy=cfg.get("backend"))
    except FormatError as e:
        raise ExportError(f"{cfg_path}: {e}") from None
    root = inside(out_dir, "backbone", ExportError, "backbone folder")
    for v in spec.values():  # every file name the spec holds stays in backbone/
        if isinstance(v, str):
            inside(root, v, ExportError, "backbone file")
    links = escaping_links(out_dir)
    if links:
        raise ExportError(f"{links[0]}: a symbolic link leading outside the export folder; refused")
    _check_export_files(out_dir, cfg)
    _check_backbone_files(out_dir, cfg.get("backbone_files"))
    try:
        model = fmt.load(spec, root)
    except Exception as e:  # noqa: BLE001 - a damaged backbone raises many types; report which file
        raise ExportError(
            f"{root}: cannot load the backbone ({type(e).__name__}: {' '.join(str(e).split())[:300]})"
        ) from None
    if device is not None:
        model = model.to(device)
    try:
        patch(model, recipe, fixed_gate=cfg.get("fixed_gate"))
    except RecipeError as e:
        raise ExportError(f"{out_dir / 'recipe.yaml'} does not fit the exported backbone: {e}") from None
    load_flashar_weights(model, inside(out_dir, "flashar.safetensors", ExportError))
    if cfg.get("lora_adapters"):
        _attach_adapters(model, out_dir, cfg["lora_adapters"])
    nan = non_finite_weights(model)
    if nan:
        raise ExportError(f"{out_dir}: the exported weights hold NaN or infinite values ({', '.join(nan)})")
    _check_config_digest(out_dir, cfg)  # last: every value a specific check names has been named by now
    return model.eval()


def _read_config(out_dir: Path) -> dict:
    path = inside(out_dir, CONFIG, ExportError)
    try:
        cfg = json.loads(path.read_bytes())
    except (ValueError, OSError) as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(cfg, dict):
        raise ExportError(f"{path}: must hold a JSON object, got {short(cfg)}")
    if cfg.get("format") != FORMAT:
        raise ExportError(f"{path}: format {short(cfg.get('format'))} is not {FORMAT!r}")
    bad = first_problem(cfg, CONFIG_RULES)
    if bad:
        raise ExportError(f"{path}: {bad[0]}: {bad[1]}")
    unknown = first_unknown(cfg, CONFIG_KEYS)
    if unknown is not None:  # a key edited by hand (fixed_gat) would otherwise be ignored
        raise ExportError(f"{path}: unknown key {short(unknown)}{did_you_mean(str(unknown), CONFIG_KEYS)}")
    return cfg


def _read_recipe(out_dir: Path, cfg: dict):
    path = inside(out_dir, "recipe.yaml", ExportError)
    if not path.is_file():
        raise ExportError(f"{path}: missing (every export holds the recipe it was patched with)")
    try:
        recipe = recipe_from_dict(safe_yaml(path.read_bytes(), str(path)), source=str(path))
    except RecipeError as e:
        raise ExportError(str(e)) from None
    saved = cfg.get("recipe_config")  # absent in exports written before it was recorded
    if isinstance(saved, dict):
        diff = differing_keys(saved, recipe.to_dict(), ignore=_RECIPE_FREE)
        if diff:
            what = ", ".join(f"{k} ({short(old, 30)} -> {short(new, 30)})" for k, old, new in diff[:5])
            raise ExportError(
                f"{path} differs from the recipe the weights were exported with at {what}; "
                "restore it (the exported recipe is in flashar_config.json) or export again"
            )
    return recipe


def _attach_adapters(model, out_dir: Path, meta: dict) -> None:
    """Re-inject LoRA on the recipe's targets and load the exported factors, checking they fit."""
    bad = first_problem({"lora_adapters": meta}, {"lora_adapters": _ADAPTER_RULES})
    if bad:
        raise ExportError(f"{out_dir / CONFIG}: {bad[0]}: {bad[1]}")
    path = inside(out_dir, meta["file"], ExportError, "adapter file")
    try:
        sd = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for missing/corrupt files
        raise ExportError(f"{path}: unreadable or missing LoRA adapters ({e})") from None
    try:
        add_lora(model, r=meta["r"], alpha=meta["alpha"], dropout=0.0)
    except FlashARError as e:  # e.g. the recipe names no lora.targets
        raise ExportError(f"{path}: cannot re-attach the adapters: {e}") from None
    own = {k: v.detach() for k, v in lora_named_parameters(model)}
    bad = state_dict_misfit(own, sd)
    if bad:
        raise ExportError(f"{path}: adapters do not fit this model/recipe: {bad}")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()}, strict=False)


def load_flashar_weights(model, path) -> None:
    """Load FlashAR module weights (safetensors) into a patched model, checking they fit."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: missing FlashAR weights")
    try:
        sd = load_file(str(path))
    except Exception as e:  # noqa: BLE001 - safetensors raises several types for truncated/corrupt files
        raise ExportError(f"{path}: unreadable or truncated safetensors file ({e})") from None
    bad_dtype = sorted(k for k, v in sd.items() if not v.is_floating_point())
    if bad_dtype:
        raise ExportError(f"{path}: FlashAR weights must be floating point; {bad_dtype[:3]} are not")
    own = model.flashar.state_dict()
    bad = state_dict_misfit(own, sd)
    if bad:
        raise ExportError(
            f"{path}: FlashAR weights do not fit this model/recipe (another recipe or branch setting?): {bad}"
        )
    model.flashar.load_state_dict({k: v.to(own[k].dtype) for k, v in sd.items()})
