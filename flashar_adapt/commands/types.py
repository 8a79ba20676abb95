"""What the command line accepts beside plain strings: argparse types (checked with
``validate``'s rules, so a wrong value is refused by the parser, naming its option, before
anything is loaded) and ``--set KEY=VALUE`` pairs."""

from __future__ import annotations

import argparse
import os

from ..devices import device_problem
from ..errors import InputError
from ..recipe import RecipeError, safe_yaml
from ..sampling import MAX_GUIDANCE, SEED_LIMIT
from ..validate import Num

# The largest count an option takes: far above any real run, small enough that nothing sized
# by it (a range, a list of seeds) is allocated before the work starts.
MAX_COUNT = 10**9


def _number(text: str, rule: Num, integer: bool):
    try:
        v = int(text) if integer else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if integer else 'a number'}, got {text!r}") from None
    problem = rule.problem(v)
    if problem is not None:
        raise argparse.ArgumentTypeError(f"must be {rule.describe()}, got {text}")
    return v


def _typed(name: str, rule: Num, integer: bool):
    def parse(text: str):
        return _number(text, rule, integer)

    parse.__name__ = name  # argparse names the type in its messages
    return parse


positive_int = _typed("positive_int", Num(1, MAX_COUNT, integer=True), True)
non_negative_int = _typed("non_negative_int", Num(0, MAX_COUNT, integer=True), True)
# a CPU torch.Generator keeps 32 bits of its seed; per-sample seeds are derived within them
seed_int = _typed("seed_int", Num(0, SEED_LIMIT - 1, integer=True), True)
class_id = _typed("class_id", Num(0, MAX_COUNT, integer=True), True)
non_negative_float = _typed("non_negative_float", Num(0), False)
# guidance and temperature: finite, and bounded where a larger value only overflows the logits
guidance_float = _typed("guidance_float", Num(0, MAX_GUIDANCE), False)
temperature_float = _typed("temperature_float", Num(0, 1e4), False)
probability = _typed("probability", Num(0, 1, lo_open=True), False)
# the tiny demo builds a random model of grid x grid positions in memory
MAX_TINY_GRID = 64
tiny_grid = _typed("tiny_grid", Num(1, MAX_TINY_GRID, integer=True), True)
MAX_TINY_BATCH = 256
tiny_batch = _typed("tiny_batch", Num(1, MAX_TINY_BATCH, integer=True), True)


def text(value: str) -> str:
    """argparse type of every plain-text option (a path, a name, a prompt): not blank."""
    if not value.strip():
        raise argparse.ArgumentTypeError(f"expected a path, name or text, got {value!r}")
    return value


def out_path(value: str) -> str:
    """argparse type of every ``--out``: a path that is not blank and not a link to nothing
    (creating it would fail with "File exists" about a name that seems free)."""
    value = text(value)
    if os.path.islink(value) and not os.path.exists(value):
        raise argparse.ArgumentTypeError(f"{value} is a symbolic link to a missing target ({os.readlink(value)})")
    return value


def prompt_template(value: str) -> str:
    """argparse type of ``--prompt-template``: holds ``{prompt}`` exactly once (without it every
    prompt would become the same text, each image labelled with a prompt it never saw)."""
    if value.count("{prompt}") != 1:
        raise argparse.ArgumentTypeError(f"must hold {{prompt}} once, where the prompt goes; got {value!r}")
    return value


def device_name(text: str) -> str:
    """argparse type: a torch device this build and machine have (cpu, cuda, cuda:1, mps)."""
    problem = device_problem(text)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return text


def key_values(pairs: list[str] | None) -> dict:
    """``--set KEY=VALUE`` pairs as a mapping, each value read as YAML (``n_head=16`` is an int,
    ``rope_base=1e4`` a float)."""
    out = {}
    for p in pairs or []:
        k, sep, v = p.partition("=")
        if not sep or not k:
            raise InputError(f"--set expects KEY=VALUE, got {p!r}")
        try:  # the recipes' YAML reader: 1e4 is a number, as in YAML 1.2
            out[k] = safe_yaml(v)
        except RecipeError as e:
            raise InputError(f"--set {k}: not a YAML value ({e})") from None
    return out


def options_of(parser, add) -> list:
    """The argparse actions ``add(parser)`` adds: a group of options one mode of a command
    uses, so the other mode can refuse them (``refuse_given``)."""
    before = set(map(id, parser._actions))  # argparse has no public accessor for a parser's actions
    add(parser)
    return [a for a in parser._actions if id(a) not in before]


def refuse_given(args, actions, why: str, keep: tuple[str, ...] = ()) -> None:
    """InputError naming the first of ``actions`` given a value other than its default (a
    mode that would ignore it: nothing a user typed is dropped without a word)."""
    for a in actions:
        if a.dest in keep or not a.option_strings:
            continue
        if getattr(args, a.dest, a.default) != a.default:
            raise InputError(f"{a.option_strings[0]} {why}")
