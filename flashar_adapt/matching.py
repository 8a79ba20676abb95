"""Auto-match: pick the registry recipe whose ``match:`` section fits a loaded model.

A recipe's ``match:`` section is data::

    match:
      class: JanusForConditionalGeneration      # the model's class name (or a base class's)
      config: {text_config.hidden_size: 2048}   # dotted paths into model.config, exact values

Every condition must hold. Among the recipes that match, the one with the most conditions
wins (a more specific recipe beats a generic one). Between equally specific recipes, the one
from the folder searched first wins, the same order that resolves names: a user's recipe
beats a shipped one. A tie within one folder is an error, because guessing would silently
pick the wrong token layout. Candidates are named by their registry name (the file stem),
the name ``recipe=`` accepts.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any

from torch import nn

from .recipe import Recipe, RecipeError, load_recipe, recipe_files

_MISSING = object()
MATCH_KEYS = ("class", "config")


@dataclass
class Candidate:
    name: str
    recipe: Recipe | None
    matched: bool
    score: int
    reason: str
    rank: int = 0  # position of the recipe's folder on the search path (0 = searched first)


def config_value(config: Any, path: str) -> Any:
    """Follow a dotted path ("text_config.hidden_size") through attributes or dict keys."""
    obj = config
    for part in path.split("."):
        if isinstance(obj, dict):
            obj = obj.get(part, _MISSING)
        else:
            obj = getattr(obj, part, _MISSING)
        if obj is _MISSING:
            return _MISSING
    return obj


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def class_names(model: nn.Module) -> list[str]:
    return [c.__name__ for c in type(model).__mro__]


def evaluate(model: nn.Module, recipe: Recipe) -> Candidate:
    """Does ``recipe.match`` fit ``model``? Returns the verdict with a one-line reason."""
    m = recipe.match or {}
    if not m:
        return Candidate(recipe.name, recipe, False, 0, "no match: section")
    for key in m:
        if key not in MATCH_KEYS:
            raise RecipeError(f"match.{key}", f"unknown key (use {', '.join(MATCH_KEYS)})", recipe.source)
    score = 0
    want_cls = m.get("class")
    if want_cls is not None:
        wanted = [want_cls] if isinstance(want_cls, str) else list(want_cls)
        if not any(w in class_names(model) for w in wanted):
            return Candidate(recipe.name, recipe, False, 0, f"class {type(model).__name__} is not {' / '.join(wanted)}")
        score += 1
    cfg_conds = m.get("config") or {}
    if not isinstance(cfg_conds, dict):
        raise RecipeError(
            "match.config", f"must be a mapping of dotted config paths to values, got {cfg_conds!r}", recipe.source
        )
    config = getattr(model, "config", None)
    for path, want in cfg_conds.items():
        got = config_value(config, str(path)) if config is not None else _MISSING
        if got is _MISSING:
            return Candidate(recipe.name, recipe, False, 0, f"config has no {path}")
        if not _same(got, want):
            return Candidate(recipe.name, recipe, False, 0, f"config {path} = {got!r}, recipe wants {want!r}")
        score += 1
    return Candidate(recipe.name, recipe, True, score, "matches")


def candidates(model: nn.Module, extra_dirs: list[str | os.PathLike] | None = None) -> list[Candidate]:
    out = []
    for f in recipe_files(extra_dirs):
        try:
            recipe = load_recipe(f.path)
        except RecipeError as e:
            out.append(Candidate(f.name, None, False, 0, f"does not load ({e})", f.rank))
            continue
        out.append(dataclasses.replace(evaluate(model, recipe), name=f.name, rank=f.rank))
    return out


def match_recipe(model: nn.Module, extra_dirs: list[str | os.PathLike] | None = None) -> Recipe:
    """The best-matching registry recipe for ``model``, or a RecipeError (key "<recipe>")
    that lists every candidate considered and why it did not fit."""
    cands = candidates(model, extra_dirs)
    hits = [c for c in cands if c.matched]
    if hits:
        best = max(c.score for c in hits)
        top = [c for c in hits if c.score == best]
        first = min(c.rank for c in top)
        top = [c for c in top if c.rank == first]  # a user folder beats the shipped recipes
        if len(top) == 1:
            return top[0].recipe
        folder = top[0].recipe.source and os.path.dirname(top[0].recipe.source)
        raise RecipeError(
            "<recipe>",
            f"{type(model).__name__} matches several recipes equally well "
            f"({', '.join(c.name for c in top)}, all in {folder}); "
            "pass one of them as recipe=",
        )
    considered = [c for c in cands if c.reason != "no match: section"]
    lines = "; ".join(f"{c.name}: {c.reason}" for c in considered) or "none has a match: section"
    raise RecipeError(
        "<recipe>",
        f"no recipe matches {type(model).__name__}. Considered: {lines}. "
        "Pass recipe= (a name or a YAML path), or write one: docs/writing-a-recipe.md",
    )
