"""``flashar-adapt inspect`` (a model's structure and a draft recipe) and ``check`` (the
recipe doctor on the real model)."""

from __future__ import annotations

import os
import sys

from ..doctor import FAIL, check
from ..errors import InputError
from ..files import atomic_write_bytes
from ..inspection import inspect_model
from ..model_sources import load_model_file
from ..recipe import load_recipe
from .model_options import add_set_option
from .report import printable
from .types import key_values, non_negative_float, positive_int


def _inspect(args) -> int:
    if args.out and os.path.lexists(args.out):  # a recipe the user edited is never written over
        what = (
            "is a folder; give the path of a new YAML file" if os.path.isdir(args.out) else "exists; choose a new path"
        )
        raise InputError(f"--out {args.out}: {what}")
    model, backend = load_model_file(args.model, key_values(args.set))
    ins = inspect_model(model, backend=backend)
    print(ins)
    print()
    text = ins.draft_yaml()
    if args.out:
        atomic_write_bytes(args.out, text.encode())
        print(f"draft recipe written to {args.out}")
    else:
        print(text, end="")
    return 0


def _check(args) -> int:
    recipe = None if args.recipe in (None, "auto") else load_recipe(args.recipe, args.recipe_dir)
    model, _ = load_model_file(args.model, key_values(args.set))
    grid = tuple(args.grid) if args.grid else None
    rep = check(model, recipe, grid=grid, atol=args.atol)
    print(rep)
    if rep.ok:
        return 0
    # the recipe does not fit the model (a RecipeError at the patch stage): a recipe error, 2,
    # said on stderr in one line as every other refusal (the report above is on stdout)
    unfit = next((i for i in rep.items if i.name == "patch" and i.status == FAIL), None)
    if unfit is not None:
        key = f"{unfit.key}: " if unfit.key else ""
        print(f"recipe error: {key}{printable(' '.join(unfit.detail.split()))}", file=sys.stderr)
        return 2
    return 1


def add_parsers(sub) -> None:
    s = sub.add_parser("inspect", help="show a model's decoder layers, heads, norms, embeddings and draft a recipe")
    s.add_argument("model", help="a transformers save_pretrained folder or a checkpoint file")
    s.add_argument("--out", help="write the draft recipe YAML here")
    add_set_option(s)
    s.set_defaults(fn=_inspect)
    s = sub.add_parser(
        "check", help="verify a recipe on the real model (raster equality, two-way = teacher forcing, H+W-1 steps)"
    )
    s.add_argument("model", help="a transformers save_pretrained folder or a checkpoint file")
    s.add_argument("recipe", nargs="?", default="auto", help="registry name or YAML path (default: auto-match)")
    s.add_argument(
        "--grid", type=positive_int, nargs=2, metavar=("H", "W"), help="grid to test (default: small if variable)"
    )
    s.add_argument("--atol", type=non_negative_float, default=1e-4)
    add_set_option(s)
    s.set_defaults(fn=_check)
