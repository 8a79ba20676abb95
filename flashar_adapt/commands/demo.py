"""``flashar-adapt demo``: the end-to-end example on Fashion-MNIST (``flashar_adapt.fmnist``),
or ``--tiny``: a small random model decoded both ways."""

from __future__ import annotations

from ..fmnist.main import run, tiny_demo
from .types import (
    MAX_TINY_BATCH,
    MAX_TINY_GRID,
    guidance_float,
    options_of,
    positive_int,
    refuse_given,
    tiny_batch,
    tiny_grid,
)


def _demo(args) -> int:
    if args.tiny:
        refuse_given(args, args.full_demo_options, "is an option of the Fashion-MNIST demo, which --tiny does not run")
        return tiny_demo(args.grid, args.batch)
    return run(
        args.out,
        retrain=args.retrain,
        cfg_scale=args.cfg_scale,
        samples=args.samples,
        nll_images=args.nll_images,
        repeat=args.repeat,
        tiny_grid=args.grid,
        tiny_batch=args.batch,
    )


def add_parsers(sub) -> None:
    s = sub.add_parser("demo", help="run the end-to-end example")
    s.add_argument("--grid", type=tiny_grid, default=16, help=f"--tiny: grid side (at most {MAX_TINY_GRID})")
    s.add_argument("--batch", type=tiny_batch, default=4, help=f"--tiny: images per batch (at most {MAX_TINY_BATCH})")
    s.add_argument("--tiny", action="store_true", help="use a small random model instead of the shipped one")
    s.set_defaults(fn=_demo, full_demo_options=options_of(s, _add_full_demo_options))


def _add_full_demo_options(s) -> None:
    s.add_argument("--retrain", action="store_true", help="re-run the post-training from the shipped base")
    s.add_argument("--out", default="out/demo", help="where the PNG (and any re-trained model) go")
    s.add_argument(
        "--cfg",
        dest="cfg_scale",
        metavar="CFG",
        type=guidance_float,
        default=2.0,
        help="classifier-free guidance scale",
    )
    s.add_argument("--samples", type=positive_int, default=500, help="samples per model for the quick quality numbers")
    s.add_argument("--nll-images", type=positive_int, default=1000, help="test images for the quick NLL")
    s.add_argument("--repeat", type=positive_int, default=2, help="timing repeats (best of)")
