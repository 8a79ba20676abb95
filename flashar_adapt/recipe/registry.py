"""The recipe registry: the folders searched for recipe files, in order (``extra_dirs``, the
``FLASHAR_RECIPE_PATH`` folders, folders that installed packages register under the
entry-point group ``flashar_adapt.recipes``, the shipped recipes), and loading a recipe by
name or path."""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path
from typing import Any

from ..validate import did_you_mean
from .schema import Recipe, recipe_from_dict
from .sections import RecipeError
from .yaml_input import safe_yaml

ENV_RECIPE_PATH = "FLASHAR_RECIPE_PATH"
ENTRY_POINT_GROUP = "flashar_adapt.recipes"


def _search_dirs(extra: list[str | os.PathLike] | None = None) -> list[Path]:
    dirs = [Path(p) for p in (extra or [])]
    env = [Path(p) for p in os.environ.get(ENV_RECIPE_PATH, "").split(os.pathsep) if p]
    # folders the user named: a typo must not silently fall back to the shipped recipes
    for key, d in [("<recipe-dir>", d) for d in dirs] + [(f"<{ENV_RECIPE_PATH}>", d) for d in env]:
        if not d.is_dir():
            raise RecipeError(key, f"{d}: {'not a folder' if d.exists() else 'no such folder'}")
    dirs += env
    dirs += _entry_point_dirs()
    dirs.append(Path(str(resources.files("flashar_adapt.recipes"))))
    return dirs


def _entry_point_dirs() -> list[Path]:
    """Recipe folders that installed packages register under the entry-point group
    ``flashar_adapt.recipes``: each entry point resolves to a folder path (str / PathLike /
    importlib Traversable) or to a callable returning one. A broken entry point is skipped
    with a warning, never fatal: one bad plugin must not hide every other recipe."""
    out: list[Path] = []
    for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            obj = ep.load()
            if callable(obj) and not isinstance(obj, (str, os.PathLike)):
                obj = obj()
            out.append(Path(str(obj)))
        except Exception as e:  # noqa: BLE001 - a plugin's failure is reported, not raised
            warnings.warn(f"recipe entry point {ep.name!r} ({ep.value}) failed: {e}", stacklevel=2)
    return out


@dataclass(frozen=True)
class RecipeFile:
    """One recipe on the search path. ``name`` is the registry name (the file stem);
    ``rank`` is the position of its folder on the search path (0 = searched first)."""

    name: str
    path: Path
    rank: int


def recipe_files(extra_dirs: list[str | os.PathLike] | None = None) -> list[RecipeFile]:
    """Every recipe file on the search path; a name in an earlier folder hides a later one."""
    out: list[RecipeFile] = []
    seen: set[str] = set()
    for rank, d in enumerate(_search_dirs(extra_dirs)):
        if d.is_dir():
            for p in sorted([*d.glob("*.yaml"), *d.glob("*.yml")]):
                if p.stem not in seen:
                    seen.add(p.stem)
                    out.append(RecipeFile(p.stem, p, rank))
    return out


def list_recipes(extra_dirs: list[str | os.PathLike] | None = None) -> list[str]:
    """Names of every recipe on the search path (user folders first, then the shipped ones)."""
    return [f.name for f in recipe_files(extra_dirs)]


def _declared_name(path: Path) -> Any:
    try:  # a broken file elsewhere on the path must not break looking up other names
        data = safe_yaml(path.read_bytes(), str(path))
    except (OSError, RecipeError):
        return None
    return data.get("name") if isinstance(data, dict) else None


def load_recipe(name_or_path: str | os.PathLike | Recipe, extra_dirs: list[str | os.PathLike] | None = None) -> Recipe:
    """Load a recipe by registry name or from a YAML file path.

    A registry name is a file stem on the search path or, failing that, the ``name:`` a
    recipe there declares. A folder is never a recipe: ``"my-gpt2"`` beside a model folder
    ``./my-gpt2`` still means the recipe of that name."""
    if isinstance(name_or_path, Recipe):
        return name_or_path
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise RecipeError("<name>", f"a recipe is a registry name or a YAML file path, got {name_or_path!r}")
    if isinstance(extra_dirs, (str, os.PathLike)):  # one folder given where a list was meant: never walked per letter
        extra_dirs = [extra_dirs]
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise RecipeError("<file>", f"recipe file {str(p)!r} does not exist")
        return _load_file(p)
    files = recipe_files(extra_dirs)
    for f in files:
        if f.name == str(name_or_path):
            # a recipe in a folder searched first that declares this name was meant to be found
            shadowing = next((g for g in files if g.rank < f.rank and _declared_name(g.path) == f.name), None)
            if shadowing is not None:
                raise RecipeError(
                    "<name>",
                    f"{f.name!r} names both {f.path} (its file name) and {shadowing.path} (its name: key, in a "
                    "folder searched first); pass the file's path, or rename one",
                )
            return _load_file(f.path)
    declaring = [f for f in files if _declared_name(f.path) == str(name_or_path)]
    if declaring:
        same_rank = [f for f in declaring if f.rank == declaring[0].rank]
        if len(same_rank) > 1:  # which one was meant cannot be told: say so, never pick one
            raise RecipeError(
                "<name>",
                f"{len(same_rank)} recipes declare name {str(name_or_path)!r} in one folder "
                f"({same_rank[0].path.name}, {same_rank[1].path.name}); pass the file's path, or rename one",
            )
        return _load_file(declaring[0].path)
    names = [f.name for f in files]
    hint = ""
    for suffix in (".yaml", ".yml"):
        if p.with_name(p.name + suffix).is_file():
            hint = (
                f"; {str(p) + suffix!r} is a file here but not on the search path: pass that path, or put its "
                f"folder on {ENV_RECIPE_PATH} / extra_dirs"
            )
    raise RecipeError(
        "<name>",
        f"no recipe named {str(name_or_path)!r}{did_you_mean(str(name_or_path), names)}{hint}; "
        f"known: {', '.join(names)}",
    )


def _load_file(path: Path) -> Recipe:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise RecipeError("<file>", f"cannot read: {e.strerror or e}", str(path)) from None
    return recipe_from_dict(safe_yaml(raw, str(path)), source=str(path))
