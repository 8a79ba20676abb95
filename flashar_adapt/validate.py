"""One validation layer for the toolkit's configuration data.

A config class (the training config, each recipe section) declares, per field, the rule its
value obeys (``field(metadata=rule(...))``); a manifest or export config declares the same
rules in a plain mapping. ``first_problem`` walks them and returns the first ``(dotted key,
message)`` that fails, so every caller raises its own error type with the key named and
every check lives in one place.
NaN and infinities fail every numeric rule.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


def short(v: Any, n: int = 60) -> str:
    """``repr`` cut to ``n`` characters, so an error never formats a huge value."""
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


@dataclass(frozen=True)
class Num:
    """A finite number (``integer``: an int, never a bool) in [lo, hi], ends open on request."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    optional: bool = False

    def problem(self, v: Any) -> str | None:
        if v is None:
            return None if self.optional else "is required"
        if isinstance(v, bool) or not isinstance(v, int if self.integer else (int, float)):
            return f"must be {'an integer' if self.integer else 'a number'}, got {short(v)}"
        if isinstance(v, float) and not math.isfinite(v):  # an int is finite (and 10**400 overflows isfinite)
            return f"must be a finite number, got {short(v)}"
        if self.lo is not None and (v < self.lo or (self.lo_open and v == self.lo)):
            return f"must be {self.describe()}, got {short(v)}"
        if self.hi is not None and (v > self.hi or (self.hi_open and v == self.hi)):
            return f"must be {self.describe()}, got {short(v)}"
        return None

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a number"

        def num(x) -> str:  # integers exactly (4294967295, not 4.29497e+09)
            return str(int(x)) if self.integer or float(x).is_integer() and abs(x) < 1e16 else f"{x:g}"

        lo, hi = (None if v is None else num(v) for v in (self.lo, self.hi))
        if lo is not None and hi is not None:
            return f"{kind} in {'(' if self.lo_open else '['}{lo}, {hi}{')' if self.hi_open else ']'}"
        if lo is not None:
            return f"{kind} {'>' if self.lo_open else '>='} {lo}"
        if hi is not None:
            return f"{kind} {'<' if self.hi_open else '<='} {hi}"
        return kind


@dataclass(frozen=True)
class Is:
    """A value of one of ``types`` (bools are not ints here)."""

    types: tuple
    name: str
    optional: bool = False

    def problem(self, v: Any) -> str | None:
        if v is None:
            return None if self.optional else "is required"
        if isinstance(v, bool) and bool not in self.types:
            return f"must be {self.name}, got {short(v)}"
        return None if isinstance(v, self.types) else f"must be {self.name}, got {short(v)}"

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True)
class OneOf:
    choices: tuple

    def problem(self, v: Any) -> str | None:
        return (
            None
            if any(v == c and type(v) is type(c) for c in self.choices)
            else f"must be one of {', '.join(repr(c) for c in self.choices)}, got {short(v)}"
        )

    def describe(self) -> str:
        return "one of " + ", ".join(repr(c) for c in self.choices)


@dataclass(frozen=True)
class Text:
    """A string (``nonempty``: with at least one character)."""

    nonempty: bool = False
    optional: bool = False

    def problem(self, v: Any) -> str | None:
        if v is None:
            return None if self.optional else "is required"
        if not isinstance(v, str) or (self.nonempty and not v):
            return f"must be {self.describe()}, got {short(v)}"
        return None

    def describe(self) -> str:
        return "a non-empty string" if self.nonempty else "a string"


@dataclass(frozen=True)
class Seq:
    """A list (or tuple) of ``length`` items (any length if None), each obeying ``item``."""

    item: Any
    length: int | None = None
    min_length: int = 0
    optional: bool = False

    def problem(self, v: Any) -> str | None:
        if v is None:
            return None if self.optional else "is required"
        if not isinstance(v, (list, tuple)):
            return f"must be a list, got {short(v)}"
        if self.length is not None and len(v) != self.length:
            return f"must have {self.length} entries, got {len(v)}"
        if len(v) < self.min_length:
            return f"must have at least {self.min_length} entries, got {len(v)}"
        for i, x in enumerate(v):
            p = self.item.problem(x)
            if p:
                return f"[{i}] {p}"
        return None

    def describe(self) -> str:
        n = f"{self.length} " if self.length is not None else ""
        return f"a list of {n}({self.item.describe()})"


@dataclass(frozen=True)
class AnyOf:
    """A value that obeys at least one of ``rules``; ``name`` says what that is."""

    rules: tuple
    name: str
    optional: bool = False

    def problem(self, v: Any) -> str | None:
        if v is None:
            return None if self.optional else "is required"
        if any(r.problem(v) is None for r in self.rules):
            return None
        return f"must be {self.name}, got {short(v)}"

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True)
class Named:
    """``rule`` with its failures said in one phrase ("[H, W] with positive integers") instead
    of the rule's own words; a missing required value is still "is required"."""

    rule: Any
    name: str

    @property
    def optional(self) -> bool:
        return self.rule.optional

    def problem(self, v: Any) -> str | None:
        p = self.rule.problem(v)
        if p is None or v is None:  # a missing value: the rule's own "is required"
            return p
        return f"must be {self.name}, got {short(v)}"

    def describe(self) -> str:
        return self.name


def required(r):
    """The same rule with a missing value refused ("is required")."""
    return Named(required(r.rule), r.name) if isinstance(r, Named) else dataclasses.replace(r, optional=False)


def rule(r, **kw) -> dataclasses.Field:
    """A dataclass field whose value must obey ``r`` (``kw``: default / default_factory)."""
    return dataclasses.field(metadata={"rule": r}, **kw)


def dataclass_rules(cls) -> dict[str, Any]:
    return {f.name: f.metadata["rule"] for f in dataclasses.fields(cls) if "rule" in f.metadata}


def first_problem(values: Any, rules: Mapping[str, Any], prefix: str = "") -> tuple[str, str] | None:
    """The first (dotted key, message) where ``values`` (a dataclass or a mapping) breaks
    ``rules``, or None. A rule that is itself a mapping checks a nested mapping."""
    get = (
        (lambda k: getattr(values, k, None))
        if dataclasses.is_dataclass(values)
        else (lambda k: values.get(k) if isinstance(values, Mapping) else None)
    )
    for k, r in rules.items():
        v = get(k)
        key = f"{prefix}{k}"
        if isinstance(r, Mapping):
            if not isinstance(v, Mapping):
                return key, f"must be a mapping, got {short(v)}"
            p = first_problem(v, r, key + ".")
        else:
            msg = r.problem(v)
            if msg is not None and msg.startswith("["):  # a list item: "[i] message"
                idx, msg = msg.split(" ", 1)
                key += idx
            p = None if msg is None else (key, msg)
        if p:
            return p
    return None


def flatten(d: Mapping, prefix: str = "") -> dict:
    """Nested mappings as one mapping of dotted keys (tuples read as lists)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def differing_keys(old: Mapping, new: Mapping, ignore: tuple = ()) -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) wherever the two differ; a missing key reads as
    ``MISSING``. Keys whose first part is in ``ignore`` are skipped."""
    a, b = flatten(old), flatten(new)
    return [
        (k, a.get(k, MISSING), b.get(k, MISSING))
        for k in sorted(set(a) | set(b))
        if k.split(".")[0] not in ignore and a.get(k, MISSING) != b.get(k, MISSING)
    ]


class _Missing:
    def __repr__(self) -> str:
        return "<unset>"


MISSING = _Missing()


def did_you_mean(word: str, choices) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``choices``, or ''."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def first_unknown(keys, allowed):
    """The first of ``keys`` not in ``allowed``, or None: the one unknown-key check of
    recipes and training configs (each reports it with ``did_you_mean``)."""
    return next((k for k in keys if k not in allowed), None)


def state_dict_misfit(own: Mapping, given: Mapping, may_miss=()) -> str | None:
    """How the tensors ``given`` fail to fit a module whose state dict is ``own`` (missing,
    unexpected and wrong-shape keys, a few of each), or None when they fit: the one check
    every loader runs before ``load_state_dict``."""
    missing = sorted(set(own) - set(given) - set(may_miss))
    extra = sorted(set(given) - set(own))
    shape = [k for k in own if k in given and tuple(own[k].shape) != tuple(given[k].shape)]
    if not (missing or extra or shape):
        return None
    return f"missing {missing[:4]}, unexpected {extra[:4]}, wrong shape {shape[:4]}"
