"""The options ``tokenize`` and ``generate`` share: which model (an export folder, a training
run, or a checkpoint with a recipe) and how to sample it."""

from __future__ import annotations

from ..generation import CLASSES, check_class_names, read_class_names
from ..model_sources import load_patched, model_folders, pick_text_tokenizer
from .types import (
    device_name,
    guidance_float,
    key_values,
    non_negative_int,
    probability,
    prompt_template,
    seed_int,
    temperature_float,
)


def add_set_option(s) -> None:
    """``--set KEY=VALUE``: what a model file does not record, for every command that loads one by path."""
    s.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="a model constructor value the checkpoint does not record (e.g. n_head=16; repeatable)",
    )


def add_model_options(s, need_model: bool) -> None:
    s.add_argument("--export", help="an export folder (flashar-adapt export)")
    s.add_argument("--config", help="a training run's config YAML (its last checkpoint)")
    s.add_argument(
        "--allow-config-change",
        action="store_true",
        help="with --config: use the checkpoint even though the config or its recipe differ from what made it",
    )
    s.add_argument("--model", help="a checkpoint file or folder, with --recipe")
    add_set_option(s)
    s.add_argument("--recipe", help="recipe name or YAML file" + ("" if need_model else " (alone: no model needed)"))
    s.add_argument("--tokenizer-checkpoint", help="image tokenizer weights (overrides tokenizer.checkpoint)")
    s.add_argument("--text-tokenizer", help="the model's text tokenizer folder (prompt-conditioned recipes)")
    s.add_argument(
        "--prompt-template",
        type=prompt_template,
        default="{prompt}",
        help="how a prompt is written before tokenising, e.g. '{prompt}<begin_of_image>'",
    )
    s.add_argument("--device", type=device_name, default=None, help="cpu, cuda, cuda:1, ...")
    s.add_argument("--no-progress", action="store_true")


def add_sampling_options(s) -> None:
    s.add_argument(
        "--cfg",
        dest="cfg_scale",
        metavar="CFG",
        type=guidance_float,
        default=1.0,
        help="classifier-free guidance scale (1 = off)",
    )
    s.add_argument("--cfg-schedule", default="constant")
    s.add_argument("--temperature", type=temperature_float, default=1.0)
    s.add_argument("--top-k", type=non_negative_int, default=0)
    s.add_argument("--top-p", type=probability, default=1.0)
    s.add_argument("--seed", type=seed_int, default=0)


def sampling_of(args) -> dict:
    """The sampling options as ``model.generate`` keywords."""
    return {
        "cfg_scale": args.cfg_scale,
        "cfg_schedule": args.cfg_schedule,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
    }


def source_of(args) -> dict:
    """The model options as ``model_sources`` keywords."""
    return {
        "export": args.export,
        "run_config": args.config,
        "model": args.model,
        "recipe": args.recipe,
        "recipe_dirs": args.recipe_dir,
        "device": args.device,
        "overrides": key_values(args.set),
    }


def load_from(args, need_model: bool = True):
    """(model or None, recipe, text tokenizer folder) of the model options."""
    return load_patched(
        **source_of(args),
        flashar_weights=getattr(args, "flashar_weights", None),
        need_model=need_model,
        allow_config_change=args.allow_config_change,
    )


def text_of(args, recipe, folder):
    """The text tokenizer a prompt recipe needs (--text-tokenizer, else the model's own); None otherwise."""
    return pick_text_tokenizer(recipe, args.text_tokenizer, folder, args.prompt_template)


def class_names_of(args, recipe) -> list[str] | None:
    """The class names of a class recipe's model (the first ``classes.json`` in
    ``model_sources.model_folders``), or None."""
    if recipe.condition.kind != "class":
        return None
    for folder in model_folders(**source_of(args)):
        names = read_class_names(folder / CLASSES)
        if names:
            check_class_names(names, recipe.condition.num_classes, folder / CLASSES)
            return names
    return None
