"""Bounds on the module-name patterns a recipe gives (``lora.targets``): each is a regex
matched against every module name of the model, so one that backtracks exponentially would
hang ``patch``; it is refused from its shape, before it is ever matched."""

from __future__ import annotations

import re

try:
    from re import _parser as sre_parse  # the stdlib's own regex parser (3.11+); no public one exists
except ImportError:  # Python 3.10
    import sre_parse  # type: ignore[no-redef]

# Bounds on lora.targets: each is a regex matched against every module name of the model.
MAX_PATTERN_LEN = 200
MAX_PATTERN_REPEATS = 3


def regex_problem(pattern: str) -> str | None:
    """Why ``pattern`` is refused as a module-name regex, or None. It must compile, be at most
    MAX_PATTERN_LEN characters, hold at most MAX_PATTERN_REPEATS repeats (``+``, ``*``,
    ``{m,n}``), and never repeat something that itself holds a repeat, an alternation or a
    back-reference: those are the patterns whose matching time explodes with the name length
    (``(?:[a-z0-9_.]+)+X``)."""
    if len(pattern) > MAX_PATTERN_LEN:
        return f"is longer than {MAX_PATTERN_LEN} characters"
    try:
        re.compile(pattern)
    except re.error as e:
        return f"is not a valid regular expression ({e})"
    repeats = 0

    def walk(items, under_repeat: bool) -> str | None:
        nonlocal repeats
        for op, av in items:
            name = str(op)
            if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                lo, hi, body = av
                if hi > 1:
                    if under_repeat:
                        return "repeats a group that holds a repeat (nested quantifiers backtrack exponentially)"
                    repeats += 1
                    bad = walk(body, True)
                else:
                    bad = walk(body, under_repeat)
            elif name == "BRANCH":
                if under_repeat:
                    return "repeats an alternation (backtracks exponentially); list the names as separate targets"
                bad = next((b for b in (walk(br, under_repeat) for br in av[1]) if b), None)
            elif name in ("GROUPREF", "GROUPREF_EXISTS"):
                return "uses a back-reference"
            elif name == "SUBPATTERN":
                bad = walk(av[-1], under_repeat)
            elif name in ("ATOMIC_GROUP",):
                bad = walk(av, under_repeat)
            elif name in ("ASSERT", "ASSERT_NOT"):
                bad = walk(av[1], under_repeat)
            else:
                bad = None
            if bad:
                return bad
        return None

    bad = walk(sre_parse.parse(pattern), False)
    if bad:
        return bad
    if repeats > MAX_PATTERN_REPEATS:
        return f"holds {repeats} repeats; at most {MAX_PATTERN_REPEATS} keep matching time bounded"
    return None
