"""``flashar-adapt generate``: images (PNG files and a labelled grid, or codes) from a model
(``flashar_adapt.generation``)."""

from __future__ import annotations

import time

from ..generation import GenerateError, conditions, generate_to_folder, negative_prompt_ids, refuse_existing
from ..tokenizers import tokenizer_of
from .model_options import add_model_options, add_sampling_options, class_names_of, load_from, sampling_of, text_of
from .types import class_id, positive_int


def _generate(args) -> int:
    out = refuse_existing(args.out)
    model, recipe, folder = load_from(args)
    if args.mode == "two_way" and args.model and not args.flashar_weights:
        raise GenerateError(
            "--mode two_way needs trained FlashAR weights: --flashar-weights FILE (or an --export "
            "folder); use --mode raster for the checkpoint's own decoding"
        )
    conds = conditions(
        recipe, classes=args.classes, prompts=args.prompts, prompts_file=args.prompts_file, per_cond=args.per_cond
    )
    text = text_of(args, recipe, folder)
    negative = negative_prompt_ids(recipe, args.negative_prompt, args.cfg_scale, text)
    # built before sampling: a bad tokenizer fails fast
    tok = tokenizer_of(model, checkpoint=args.tokenizer_checkpoint) if recipe.tokenizer is not None else None
    t0 = time.perf_counter()
    what = generate_to_folder(
        model,
        conds,
        out,
        tok=tok,
        text=text,
        mode=args.mode,
        **sampling_of(args),
        seed=args.seed,
        batch_size=args.batch_size,
        per_cond=args.per_cond,
        progress=not args.no_progress,
        compile="auto" if args.compile else False,
        class_names=class_names_of(args, recipe),
        negative=negative,
    )
    print(f"{len(conds)} images in {time.perf_counter() - t0:.1f} s -> {out}: {what}")
    return 0


def add_parsers(sub) -> None:
    s = sub.add_parser("generate", help="generate images (PNG + a labelled grid, or codes) from a model")
    s.add_argument("--out", required=True, help="output folder (must not exist)")
    add_model_options(s, need_model=True)
    s.add_argument("--flashar-weights", help="flashar.safetensors of an export, with --model")
    s.add_argument("--classes", type=class_id, nargs="+", help="class ids (default: every class)")
    s.add_argument("--prompts", nargs="+", help="prompts")
    s.add_argument("--prompts-file", help="a file with one prompt per line")
    s.add_argument("--per-cond", type=positive_int, default=1, help="images per class or prompt")
    s.add_argument(
        "--negative-prompt",
        metavar="TEXT",
        help="prompt recipes with --cfg: the unconditional branch's prompt for every image (through "
        "--prompt-template, like the prompts), instead of the recipe's condition.uncond",
    )
    s.add_argument("--mode", choices=("two_way", "raster"), default="two_way")
    add_sampling_options(s)
    s.add_argument("--batch-size", type=positive_int, default=16)
    s.add_argument(
        "--compile",
        action="store_true",
        help="compile the decoding step where it pays (torch.compile; CUDA graphs on CUDA; on a CPU up to "
        "8 sequences per batch, CFG counting twice): the first batch, and a smaller last one, pay the compile time",
    )
    s.set_defaults(fn=_generate)
