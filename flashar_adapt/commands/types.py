"""What the command line accepts beside plain strings: argparse types (checked with
``validate``'s rules) and ``--set KEY=VALUE`` pairs."""

from __future__ import annotations

import argparse

import yaml

from ..errors import InputError
from ..validate import Num

_POSITIVE_INT = Num(1, integer=True)
_NON_NEGATIVE = Num(0)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if _POSITIVE_INT.problem(v) is not None:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def non_negative_float(text: str) -> float:
    """argparse type: a finite number >= 0."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if _NON_NEGATIVE.problem(v) is not None:
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return v


def key_values(pairs: list[str] | None) -> dict:
    """``--set KEY=VALUE`` pairs as a mapping, each value read as YAML (``n_head=16`` is an int)."""
    out = {}
    for p in pairs or []:
        k, sep, v = p.partition("=")
        if not sep:
            raise InputError(f"--set expects KEY=VALUE, got {p!r}")
        try:
            out[k] = yaml.safe_load(v)
        except yaml.YAMLError as e:
            raise InputError(f"--set {k}: not a YAML value ({' '.join(str(e).split())})") from None
    return out
