"""Recipes: the YAML data that says where a model keeps what FlashAR needs.

A recipe is pure data. It is checked twice: once on load (types, required and unknown
keys) and once against the real model in ``patch`` (paths resolve, layer indices and
token ids are in range, the grid fits the model's positions). Every failure is a
``RecipeError`` that names the YAML key, so a typo costs seconds.

- ``sections``: the sections (modules, condition, image, flashar, lora, logits, tokenizer),
  each field with the rule its value obeys (``flashar_adapt.validate``);
- ``schema``: the ``Recipe`` and ``recipe_from_dict``;
- ``patterns``: the bounds on ``lora.targets`` regexes;
- ``yaml_input``: YAML from files the toolkit did not write;
- ``registry``: the search path and ``load_recipe`` / ``list_recipes``.
"""

from ..validate import did_you_mean  # recipe errors suggest names with it; modules that patch import it from here
from .patterns import MAX_PATTERN_LEN, MAX_PATTERN_REPEATS, regex_problem
from .registry import ENTRY_POINT_GROUP, ENV_RECIPE_PATH, RecipeFile, list_recipes, load_recipe, recipe_files
from .schema import TODO, Recipe, recipe_from_dict, todo_keys
from .sections import (
    GRID_ITEMS,
    MAX_GATE_HIDDEN,
    POSITION_RULES,
    SECTIONS,
    UNCOND_BY_KIND,
    Condition,
    FlashAR,
    Image,
    Logits,
    LoRA,
    Modules,
    RecipeError,
    Tokenizer,
)
from .yaml_input import MAX_YAML_BYTES, safe_yaml

__all__ = [
    "ENTRY_POINT_GROUP",
    "ENV_RECIPE_PATH",
    "GRID_ITEMS",
    "MAX_GATE_HIDDEN",
    "MAX_PATTERN_LEN",
    "MAX_PATTERN_REPEATS",
    "MAX_YAML_BYTES",
    "POSITION_RULES",
    "SECTIONS",
    "TODO",
    "UNCOND_BY_KIND",
    "Condition",
    "FlashAR",
    "Image",
    "LoRA",
    "Logits",
    "Modules",
    "Recipe",
    "RecipeError",
    "RecipeFile",
    "Tokenizer",
    "did_you_mean",
    "list_recipes",
    "load_recipe",
    "recipe_files",
    "recipe_from_dict",
    "regex_problem",
    "safe_yaml",
    "todo_keys",
]
