"""``flashar-adapt sample``: N samples of a model into a folder (PNG files, an ADM-layout
``.npz``, the codes and a manifest), sharded across the processes of a ``torchrun`` or
``accelerate launch``, resumable (``flashar_adapt.sample_sets``)."""

from __future__ import annotations

import time
from pathlib import Path

from ..errors import InputError
from ..generation import GenerateError, conditions
from ..sample_sets import Processes, launched_processes, sample_set
from ..tokenizers import tokenizer_of
from .model_options import add_model_options, add_sampling_options, load_from, sampling_of, source_of, text_of
from .types import class_id, positive_int


def processes_of(args) -> Processes:
    """This launch's processes; under a launch every process decodes on its own device."""
    procs = launched_processes(cpu=args.device == "cpu")
    if procs.world > 1:
        if args.device not in (None, "cpu"):
            raise InputError(
                f"--device {args.device}: under a launch each process uses its own device; leave --device out "
                "(or --device cpu)"
            )
        args.device = procs.device
    return procs


def model_info(args) -> dict:
    """How the model was given, paths made absolute: part of a sample run's identity."""
    info = {k: v for k, v in source_of(args).items() if v is not None and k not in ("device", "recipe_dirs")}
    for k in ("export", "run_config", "model"):
        if k in info:
            info[k] = str(Path(info[k]).resolve())
    if getattr(args, "flashar_weights", None):
        info["flashar_weights"] = str(Path(args.flashar_weights).resolve())
    return info


def load_for_sampling(args, modes: tuple[str, ...]):
    """(model, recipe, conditions, image tokenizer or None, text tokenizer or None)."""
    model, recipe, folder = load_from(args)
    if "two_way" in modes and args.model and not args.flashar_weights:
        raise GenerateError(
            "two-way sampling needs trained FlashAR weights: --flashar-weights FILE (or an --export folder); "
            "use --mode raster for the checkpoint's own decoding"
        )
    conds = conditions(recipe, classes=args.classes, prompts=args.prompts, prompts_file=args.prompts_file)
    text = text_of(args, recipe, folder)
    tok = tokenizer_of(model, checkpoint=args.tokenizer_checkpoint) if recipe.tokenizer is not None else None
    return model, recipe, conds, tok, text


def sample_options_of(args) -> dict:
    """The options ``sample_set`` takes beside the model, conditions and folder."""
    return dict(
        num_samples=args.num_samples,
        **sampling_of(args),
        seed=args.seed,
        batch_size=args.batch_size,
        compile=args.compile,
        progress=not args.no_progress,
    )


def _sample(args) -> int:
    procs = processes_of(args)
    model, recipe, conds, tok, text = load_for_sampling(args, (args.mode,))
    t0 = time.perf_counter()
    m = sample_set(
        model,
        conds,
        args.out,
        tok=tok,
        text=text,
        mode=args.mode,
        procs=procs,
        model_info=model_info(args),
        **sample_options_of(args),
    )
    if m is not None:
        what = "images/, samples.npz, codes.safetensors" if "npz" in m["files"] else "codes.safetensors (no tokenizer)"
        print(
            f"{m['num_samples']} samples ({args.mode}, {procs.world} process(es), {time.perf_counter() - t0:.1f} s) "
            f"-> {args.out}: {what}, manifest.json"
        )
    return 0


def add_sample_options(s) -> None:
    """What to sample and how: shared by ``sample`` and ``evaluate --export``."""
    add_model_options(s, need_model=True)
    s.add_argument("--flashar-weights", help="flashar.safetensors of an export, with --model")
    s.add_argument(
        "--num-samples",
        type=positive_int,
        default=None,
        help="how many samples (default: one per class or prompt); conditions are taken in turn",
    )
    s.add_argument("--classes", type=class_id, nargs="+", help="class ids (default: every class)")
    s.add_argument("--prompts", nargs="+", help="prompts")
    s.add_argument("--prompts-file", help="a file with one prompt per line")
    add_sampling_options(s)
    s.add_argument("--batch-size", type=positive_int, default=32, help="samples per batch (per process)")
    s.add_argument("--compile", action="store_true", help="compile the decoding step (torch.compile)")


def add_parsers(sub) -> None:
    s = sub.add_parser(
        "sample",
        help="N samples into a folder (PNGs, an ADM .npz, codes, manifest); resumable, shards across "
        "torchrun / accelerate launch processes",
    )
    s.add_argument("--out", required=True, help="output folder (new, empty, or this command's interrupted run)")
    add_sample_options(s)
    s.add_argument("--mode", choices=("two_way", "raster"), default="two_way")
    s.set_defaults(fn=_sample)
