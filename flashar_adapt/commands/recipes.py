"""``flashar-adapt recipes`` and ``show``: the recipes on the search path."""

from __future__ import annotations

import sys

from ..recipe import RecipeError, list_recipes, load_recipe
from .report import one_line


def _recipes(args) -> int:
    broken = 0
    for name in list_recipes(args.recipe_dir):
        try:
            r = load_recipe(name, args.recipe_dir)
        except RecipeError as e:  # one broken file must not hide the others
            broken += 1
            print(f"{name:20s} BROKEN       {one_line(e)}", file=sys.stderr)
            continue
        desc = " ".join(r.description.split())
        print(f"{name:20s} {r.backend:12s} {desc[:70] + ('...' if len(desc) > 70 else '')}")
    return 2 if broken else 0


def _show(args) -> int:
    print(load_recipe(args.recipe, args.recipe_dir).to_yaml(), end="")
    return 0


def add_parsers(sub) -> None:
    s = sub.add_parser("recipes", help="list the recipes on the search path")
    s.set_defaults(fn=_recipes)
    s = sub.add_parser("show", help="print a recipe as YAML")
    s.add_argument("recipe")
    s.set_defaults(fn=_show)
