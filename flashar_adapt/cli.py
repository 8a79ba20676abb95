"""The ``flashar-adapt`` command line.

Exit codes: 0 success; 1 a check that ran and failed (``check``); 2 bad input: a usage
error, or any error the toolkit raises on purpose (``FlashARError``: recipe, config, data,
export, ...) or a file that cannot be read, reported as one line on stderr (``--debug``
prints the traceback too). Any other exception is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import importlib
import sys


def _cmd_recipes(args) -> int:
    from . import list_recipes, load_recipe
    from .recipe import RecipeError

    broken = 0
    for name in list_recipes(args.recipe_dir):
        try:
            r = load_recipe(name, args.recipe_dir)
        except RecipeError as e:  # one broken file must not hide the others
            broken += 1
            print(f"{name:20s} BROKEN       {_one_line(e)}", file=sys.stderr)
            continue
        desc = " ".join(r.description.split())
        print(f"{name:20s} {r.backend:12s} {desc[:70] + ('...' if len(desc) > 70 else '')}")
    return 2 if broken else 0


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


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (v >= 0 and v != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


# Options accepted both before and after the subcommand (``flashar-adapt recipes --recipe-dir X``).
def _add_common(p: argparse.ArgumentParser, top: bool) -> None:
    # After the subcommand the values land under other names (argparse would otherwise let
    # the subcommand's defaults overwrite what was given before it); main() merges them.
    p.add_argument("--recipe-dir", action="append", dest="recipe_dir" if top else "recipe_dir_after",
                   default=None if top else argparse.SUPPRESS, help="extra folder of recipe YAML files (repeatable)")
    p.add_argument("--debug", action="store_true", default=False if top else argparse.SUPPRESS,
                   help="print the full traceback of an error")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flashar-adapt", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(p, top=True)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("recipes", help="list the recipes on the search path")
    s.set_defaults(fn=_cmd_recipes)
    s = sub.add_parser("show", help="print a recipe as YAML")
    s.add_argument("recipe")
    s.set_defaults(fn=_cmd_show)
    s = sub.add_parser("demo", help="run the end-to-end example")
    s.add_argument("--grid", type=positive_int, default=16)
    s.add_argument("--batch", type=positive_int, default=4)
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
    for sp in sub.choices.values():
        _add_common(sp, top=False)
    return p


# Modules that add their own subcommands through ``add_cli(subparsers)``; each sets
# ``fn`` on its parser. Kept apart so each feature owns its command.
_COMMAND_MODULES = ["flashar_adapt.doctor", "flashar_adapt.training", "flashar_adapt.export", "flashar_adapt.imagegen"]


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    after = getattr(args, "recipe_dir_after", None)
    if after:
        args.recipe_dir = (args.recipe_dir or []) + after
    from .errors import FlashARError
    from .recipe import RecipeError

    try:
        return args.fn(args) or 0
    except (FlashARError, OSError) as e:
        # Bad input or a file we cannot read: one line, exit 2. (Generation input errors are
        # FlashARError subclasses too; a bare ValueError from elsewhere is a bug.)
        if args.debug:
            import traceback

            traceback.print_exc()
        kind = "recipe error" if isinstance(e, RecipeError) else "error"
        print(f"{kind}: {_one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flashar-adapt: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
