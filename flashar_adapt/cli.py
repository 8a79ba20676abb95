"""The ``flashar-adapt`` command line."""
from __future__ import annotations

import argparse
import importlib
import sys


def _cmd_recipes(args) -> int:
    from . import list_recipes, load_recipe

    for name in list_recipes(args.recipe_dir):
        r = load_recipe(name, args.recipe_dir)
        desc = " ".join(r.description.split())
        print(f"{name:20s} {r.backend:12s} {desc[:70] + ('...' if len(desc) > 70 else '')}")
    return 0


def _cmd_show(args) -> int:
    from . import load_recipe

    print(load_recipe(args.recipe, args.recipe_dir).to_yaml(), end="")
    return 0


def _cmd_tiny_demo(args) -> int:
    from .fmnist.main import tiny_demo

    return tiny_demo(args)


def _cmd_demo(args) -> int:
    from .fmnist import main as demo_main

    return demo_main.run(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashar-adapt", description=__doc__)
    p.add_argument("--recipe-dir", action="append", default=None, help="extra folder of recipe YAML files")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("recipes", help="list the recipes on the search path")
    s.set_defaults(fn=_cmd_recipes)
    s = sub.add_parser("show", help="print a recipe as YAML")
    s.add_argument("recipe")
    s.set_defaults(fn=_cmd_show)
    s = sub.add_parser("demo", help="run the end-to-end example")
    s.add_argument("--grid", type=int, default=16)
    s.add_argument("--batch", type=int, default=4)
    s.add_argument("--tiny", action="store_true", help="use a small random model instead of the shipped one")
    from .fmnist.main import add_arguments

    add_arguments(s)
    s.set_defaults(fn=lambda a: _cmd_tiny_demo(a) if a.tiny else _cmd_demo(a))
    for name in _COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        mod.add_cli(sub)
    return p


# Modules that add their own subcommands through ``add_cli(subparsers)``; each sets
# ``fn`` on its parser. Kept apart so each feature owns its command.
_COMMAND_MODULES = ["flashar_adapt.doctor", "flashar_adapt.training", "flashar_adapt.export", "flashar_adapt.imagegen"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .recipe import RecipeError

    try:
        return args.fn(args) or 0
    except RecipeError as e:
        print(f"recipe error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
