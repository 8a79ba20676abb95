"""Where the commands get a model from: a model file or folder (any backend that recognises
it), an export folder, a training run (its last checkpoint, or its base model), or a
checkpoint plus a recipe (optionally with the FlashAR weights of an export); and the
model's own text tokenizer for prompt-conditioned recipes."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from torch import nn

from .devices import device_problem
from .errors import InputError
from .export import ExportError, load_adapted, load_flashar_weights
from .inspection import load_model
from .numerics import non_finite_weights
from .patching import context, patch
from .recipe import Recipe, load_recipe
from .training import TrainConfig, build_model, build_model_from_run


class ModelSourceError(InputError):
    """The model to use is not said, or its source is not usable (export, run, checkpoint,
    recipe, text tokenizer)."""


def load_model_file(path: str | os.PathLike, overrides: dict | None = None) -> tuple[nn.Module, str]:
    """``inspection.load_model`` for a command: a missing or unrecognised file is bad input.
    Returns (model, backend name)."""
    if not Path(path).exists():
        raise InputError(f"{path}: no such file or folder")
    try:
        return load_model(path, overrides or {})
    except ValueError as e:  # no backend recognises it, or the files do not fit the backend
        if isinstance(e, InputError):
            raise
        raise InputError(" ".join(str(e).split())) from e


def load_patched(
    *,
    export: str | None = None,
    run_config: str | None = None,
    model: str | None = None,
    recipe: str | None = None,
    recipe_dirs: list | None = None,
    device: str | None = None,
    flashar_weights: str | None = None,
    need_model: bool = True,
    allow_config_change: bool = False,
    overrides: dict | None = None,
) -> tuple[nn.Module | None, Recipe, Path | None]:
    """(patched model, or None for a recipe alone when not ``need_model``; its recipe; the
    folder a text tokenizer may live in) from the first source given: an export folder, a
    training run's config (its checkpoint must come from that config and its recipe as
    they are now, unless ``allow_config_change``), or a checkpoint with a recipe.
    ``overrides`` (``--set``): model constructor values the checkpoint at ``model`` does not
    record."""
    _check_overrides(overrides, model, export, run_config)
    _check_sources(export, run_config, model, recipe, flashar_weights, device)
    if export:
        try:
            loaded = load_adapted(export, device=device)
        except ExportError as e:
            raise ModelSourceError(str(e)) from None
        return loaded, context(loaded).recipe, Path(export) / "backbone"
    if run_config:
        loaded = build_model_from_run(TrainConfig.load(run_config), allow_config_change=allow_config_change)
        _check_finite(loaded, run_config)
        return (loaded.to(device) if device else loaded), context(loaded).recipe, None
    if not recipe:
        raise ModelSourceError("say which model: --export DIR, --config RUN.yaml, or --model PATH with --recipe NAME")
    rec = load_recipe(recipe, recipe_dirs)
    if not model:
        if need_model:
            raise ModelSourceError("--recipe needs --model PATH (the checkpoint to generate with)")
        return None, rec, None
    loaded, _ = load_model_file(model, overrides)
    loaded = patch(loaded.to(device) if device else loaded, rec)
    if flashar_weights:
        load_flashar_weights(loaded, flashar_weights)
    _check_finite(loaded, model)
    return loaded.eval(), rec, Path(model)


def _check_sources(export, run_config, model, recipe, flashar_weights, device) -> None:
    """One model source, nothing given that it would ignore (an export holds its recipe and
    FlashAR weights, a run's config names its recipe and checkpoint), and a device this
    machine has: all before anything is loaded."""
    given = [name for name, v in (("--export", export), ("--config", run_config), ("--model", model)) if v]
    if len(given) > 1:
        raise ModelSourceError(f"{' and '.join(given)} each name a model; give one")
    if (export or run_config) and recipe:
        raise ModelSourceError(f"{given[0]} carries its own recipe; --recipe goes with --model (or alone)")
    if flashar_weights and not model:
        raise ModelSourceError("--flashar-weights goes with --model (an export or a run holds its own)")
    problem = None if device is None else device_problem(device)
    if problem:
        raise ModelSourceError(f"--device: {problem}")


def _check_finite(model: nn.Module, source) -> None:
    nan = non_finite_weights(model)
    if nan:
        raise ModelSourceError(
            f"{source}: the weights hold NaN or infinite values ({', '.join(nan)}); refusing to use them"
        )


def load_raster_teacher(
    *,
    export: str | None = None,
    run_config: str | None = None,
    model: str | None = None,
    recipe: str | None = None,
    recipe_dirs: list | None = None,
    device: str | None = None,
    overrides: dict | None = None,
) -> tuple[nn.Module, Recipe, Path | None, str]:
    """The original raster model to sample data-free shards from: (model, recipe, text
    tokenizer folder, its identity for the run's fingerprint). A run's base model, never its
    checkpoint; never an export (its raster mode is the post-trained model)."""
    _check_overrides(overrides, model, export, run_config)
    _check_sources(export, run_config, model, recipe, None, device)
    if export:
        raise ModelSourceError(
            "--from-model samples the original raster model: give --model with --recipe, or --config "
            "(its base model); an export's raster mode is the post-trained model, not the original"
        )
    if run_config:
        cfg = TrainConfig.load(run_config)
        loaded = build_model(cfg).eval()  # the base model the run post-trains, not its checkpoint
        loaded = loaded.to(device) if device else loaded
        return loaded, context(loaded).recipe, None, json.dumps(cfg.model, sort_keys=True, default=str)
    if not (model and recipe):
        raise ModelSourceError(
            "--from-model needs the raster model: --model PATH with --recipe NAME, or --config RUN.yaml"
        )
    loaded, rec, folder = load_patched(
        model=model, recipe=recipe, recipe_dirs=recipe_dirs, device=device, overrides=overrides
    )
    ident = str(Path(model).resolve()) + (json.dumps(overrides, sort_keys=True) if overrides else "")
    return loaded, rec, folder, ident


def _check_overrides(overrides: dict | None, model, export, run_config) -> None:
    """``--set`` sizes belong to a checkpoint loaded by path; an export or a run records its own."""
    if overrides and (export or run_config or not model):
        raise ModelSourceError(
            "--set gives sizes for a checkpoint loaded with --model; an --export folder or a --config run "
            "records its model's sizes itself"
        )


def model_folders(
    *, export: str | None = None, run_config: str | None = None, model: str | None = None, **_
) -> list[Path]:
    """The folders that may hold files describing a model source (its ``classes.json``):
    an export folder; a run's shard folder and its base model's folder; a checkpoint's folder."""
    if export:
        return [Path(export)]
    if run_config:
        cfg = TrainConfig.load(run_config)
        named = [cfg.model.get(k) for k in ("checkpoint", "path") if isinstance(cfg.model.get(k), str)]
        return [Path(cfg.data)] + [_folder_of(Path(p)) for p in named]
    return [_folder_of(Path(model))] if model else []


def _folder_of(path: Path) -> Path:
    return path if path.is_dir() else path.parent


def text_tokenizer(path: str | os.PathLike, template: str) -> Callable[[str], list[int]]:
    """ids = f(prompt): the model's own tokenizer (transformers, local files only)."""
    try:
        from transformers import AutoTokenizer  # optional dependency (the "hf" extra)

        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a folder without a tokenizer
        raise ModelSourceError(
            f"{path}: no usable text tokenizer there ({type(e).__name__}: {e}); pass --text-tokenizer DIR"
        ) from None
    return lambda prompt: tok(template.replace("{prompt}", prompt))["input_ids"]


def has_text_tokenizer(folder: Path | None) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    return folder is not None and folder.is_dir() and any((folder / n).is_file() for n in names)


def pick_text_tokenizer(
    recipe: Recipe, given: str | None, folder: Path | None, template: str
) -> Callable[[str], list[int]] | None:
    """The text tokenizer a prompt-conditioned recipe needs: ``given``, else the one beside
    the model (``folder``); None for other recipes."""
    if recipe.condition.kind != "tokens":
        return None
    path = given or (folder if has_text_tokenizer(folder) else None)
    if path is None:
        raise ModelSourceError(
            f"recipe {recipe.name!r} is conditioned on prompts: pass --text-tokenizer DIR "
            "(the model's own tokenizer folder)"
        )
    return text_tokenizer(path, template)
