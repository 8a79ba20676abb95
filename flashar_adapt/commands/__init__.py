"""The ``flashar-adapt`` command line.

Exit codes: 0 success; 1 a check that ran and failed (``check``); 2 bad input: a usage
error, or any error the toolkit raises on purpose (``FlashARError``: recipe, config, data,
export, ...) or a file that cannot be read, reported as one line on stderr (``--debug``
prints the traceback too), or an optional dependency the command needs that is not
installed. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import traceback

from ..errors import FlashARError
from ..recipe import RecipeError
from . import demo, evaluate, export, generate, inspect_check, recipes, sample, tokenize, train
from .report import missing_dependency, one_line, printable
from .types import out_path, text

# Every subcommand's module, in the order ``--help`` lists them: each adds its parsers with
# ``add_parsers(subparsers)`` and sets ``fn`` on them. All are always listed; one that needs a
# missing optional dependency says so when it runs.
COMMAND_MODULES = (recipes, demo, inspect_check, train, export, tokenize, generate, sample, evaluate)


# Options accepted both before and after the subcommand (``flashar-adapt recipes --recipe-dir X``).
def _add_common(p: argparse.ArgumentParser, top: bool) -> None:
    # After the subcommand the values land under other names (argparse would otherwise let
    # the subcommand's defaults overwrite what was given before it); main() merges them.
    p.add_argument(
        "--recipe-dir",
        action="append",
        dest="recipe_dir" if top else "recipe_dir_after",
        default=None if top else argparse.SUPPRESS,
        help="extra folder of recipe YAML files (repeatable)",
    )
    p.add_argument(
        "--debug",
        action="store_true",
        default=False if top else argparse.SUPPRESS,
        help="print the full traceback of an error",
    )


class Parser(argparse.ArgumentParser):
    """argparse's parser with its usage error as one line on stderr, naming the option
    (argparse prints the whole usage first); ``--help`` still prints the usage."""

    def error(self, message: str):
        self.exit(2, printable(f"{self.prog}: error: {' '.join(message.split())} (see {self.prog} --help)\n"))


def build_parser() -> argparse.ArgumentParser:
    # subcommands' parsers are of the same class (argparse's add_subparsers default)
    p = Parser(prog="flashar-adapt", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_common(p, top=True)
    sub = p.add_subparsers(dest="cmd", required=True)
    for mod in COMMAND_MODULES:
        mod.add_parsers(sub)
    for sp in sub.choices.values():
        _add_common(sp, top=False)
    for parser in (p, *sub.choices.values()):
        _refuse_blank_strings(parser)
    return p


def _refuse_blank_strings(parser: argparse.ArgumentParser) -> None:
    # Every value an option takes as plain text is a path, a name or a prompt, none of which
    # may be blank: "" would otherwise name the current folder ("." after path joins).
    for action in parser._actions:  # argparse has no public accessor for a parser's actions
        if action.type is None and action.nargs != 0 and not isinstance(action, argparse._SubParsersAction):
            if action.choices is None:
                action.type = out_path if action.dest == "out" else text


def subcommands(parser: argparse.ArgumentParser | None = None) -> dict[str, argparse.ArgumentParser]:
    """Every subcommand's parser by name, as ``--help`` lists them (tests run each one)."""
    parser = parser or build_parser()
    for action in parser._actions:  # argparse has no public accessor for its subparsers
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    after = getattr(args, "recipe_dir_after", None)
    if after:
        args.recipe_dir = (args.recipe_dir or []) + after
    try:
        return args.fn(args) or 0
    except BrokenPipeError:  # `flashar-adapt recipes | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except (FlashARError, OSError, ModuleNotFoundError) as e:
        # Bad input or a file we cannot read: one line, exit 2. (Generation input errors are
        # FlashARError subclasses too; a bare ValueError from elsewhere is a bug.)
        missing = missing_dependency(e, args.cmd) if isinstance(e, ModuleNotFoundError) else None
        if isinstance(e, ModuleNotFoundError) and missing is None:
            raise  # not an optional dependency: a bug
        if args.debug:
            traceback.print_exc()
        kind = "recipe error" if isinstance(e, RecipeError) else "error"
        print(f"{kind}: {missing or one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flashar-adapt: interrupted", file=sys.stderr)
        return 130
