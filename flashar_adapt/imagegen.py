"""The ``tokenize`` and ``generate`` commands: from an image folder to shards, and from a
model to PNG files (``fa.decode_images`` is the Python form of the last step).

Both load a model the same ways: an export folder (``--export``), a training run
(``--config``), or a checkpoint plus a recipe (``--model`` + ``--recipe``, optionally with
``--flashar-weights`` from an export). Their errors are one line on stderr and exit code 2;
an output folder that exists is refused before any work, so nothing is overwritten.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from .data import DataError, atomic_save_safetensors
from .errors import InputError
from .files import apply_umask, atomic_write_bytes
from .recipe import load_recipe
from .tokenizers import TokenizerError, load_tokenizer

class GenerateError(InputError):
    """Bad input to ``generate`` (conditions, prompts file, output folder, model source)."""


# ---------------------------------------------------------------- shared loading

def _load(args, need_model: bool = True):
    """(model or None, recipe, folder a text tokenizer may live in)."""
    from .export import ExportError, load_adapted

    dev = getattr(args, "device", None)
    if getattr(args, "export", None):
        try:
            model = load_adapted(args.export, device=dev)
        except ExportError as e:
            raise GenerateError(str(e)) from None
        from .patching import context

        return model, context(model).recipe, Path(args.export) / "backbone"
    if getattr(args, "config", None):
        from .patching import context
        from .training import TrainConfig, build_model_from_run

        model = build_model_from_run(TrainConfig.load(args.config))
        return (model.to(dev) if dev else model), context(model).recipe, None
    if not getattr(args, "recipe", None):
        raise GenerateError("say which model: --export DIR, --config RUN.yaml, or --model PATH with --recipe NAME")
    recipe = load_recipe(args.recipe, args.recipe_dir)
    if not getattr(args, "model", None):
        if need_model:
            raise GenerateError("--recipe needs --model PATH (the checkpoint to generate with)")
        return None, recipe, None
    from .inspection import load_model
    from .patching import patch

    model, _ = load_model(args.model)
    model = patch(model.to(dev) if dev else model, recipe)
    if getattr(args, "flashar_weights", None):
        from .export import load_flashar_weights

        load_flashar_weights(model, args.flashar_weights)
    return model.eval(), recipe, Path(args.model)


def _text_tokenizer(path: str | os.PathLike | None, template: str):
    """ids = f(prompt): the model's own tokenizer (transformers, local files only)."""
    if path is None:
        return None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a folder without a tokenizer
        raise GenerateError(f"{path}: no usable text tokenizer there ({type(e).__name__}: {e}); "
                            "pass --text-tokenizer DIR") from None
    return lambda prompt: tok(template.replace("{prompt}", prompt))["input_ids"]


def _has_text_tokenizer(folder: Path | None) -> bool:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    return folder is not None and folder.is_dir() and any((folder / n).is_file() for n in names)


def _pick_text_tokenizer(args, recipe, folder):
    if recipe.condition.kind != "tokens":
        return None
    path = args.text_tokenizer or (folder if _has_text_tokenizer(folder) else None)
    if path is None:
        raise GenerateError(f"recipe {recipe.name!r} is conditioned on prompts: pass --text-tokenizer DIR "
                            "(the model's own tokenizer folder)")
    return _text_tokenizer(path, args.prompt_template)


# ---------------------------------------------------------------- tokenize

def _cmd_tokenize(args) -> int:
    from .imagedata import list_class_folder, read_jsonl, tokenize_dataset

    if args.from_model:
        return _cmd_from_model(args)
    if args.source is None:
        raise GenerateError("give the images (a class folder or a .jsonl file), or --from-model")
    src = Path(args.source)
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such folder or JSONL file")
    model, recipe, folder = _load(args, need_model=False)
    tok = load_tokenizer(recipe, model, checkpoint=args.tokenizer_checkpoint)
    classes = None
    if src.is_dir():
        if recipe.condition.kind != "class":
            raise DataError(f"recipe {recipe.name!r} is conditioned on prompts: give a JSONL file of "
                            '{"image": ..., "prompt": ...} lines, not a class folder')
        items, classes = list_class_folder(src)
    else:
        items = read_jsonl(src, recipe.condition.kind)
    text = _pick_text_tokenizer(args, recipe, folder)
    print(f"{len(items)} images -> {args.out} ({tok.image_size[1]}x{tok.image_size[0]} px -> "
          f"{tok.grid[0]}x{tok.grid[1]} codes, recipe {recipe.name})")
    rep = tokenize_dataset(items, args.out, tok, recipe, text_tokenizer=text, batch_size=args.batch_size,
                           shard_size=args.shard_size, allow_upscale=args.allow_upscale, progress=not args.no_progress,
                           extra=json.dumps([args.prompt_template, args.tokenizer_checkpoint and
                                             str(Path(args.tokenizer_checkpoint).resolve()), args.allow_upscale]))
    if classes is not None:
        atomic_write_bytes(Path(args.out) / "classes.json", json.dumps(classes, indent=1).encode())
    print(f"wrote {rep['num_examples']} examples; {rep['num_bad']} bad input(s)"
          + (f" (listed in {Path(args.out) / 'tokenize_report.json'})" if rep["num_bad"] else ""))
    for path, why in rep["bad"][:10]:
        print(f"  bad: {path}: {why}")
    return 0


def _teacher_model(args):
    """(raster model, recipe, text tokenizer folder, its identity for the fingerprint)."""
    if args.export:
        raise GenerateError("--from-model samples the original raster model: give --model with --recipe, or --config "
                            "(its base model); an export's raster mode is the post-trained model, not the original")
    if args.config:
        from .patching import context
        from .training import TrainConfig, build_model

        cfg = TrainConfig.load(args.config)
        model = build_model(cfg).eval()  # the base model the run post-trains, not its checkpoint
        model = model.to(args.device) if args.device else model
        return model, context(model).recipe, None, json.dumps(cfg.model, sort_keys=True, default=str)
    if not (args.model and args.recipe):
        raise GenerateError("--from-model needs the raster model: --model PATH with --recipe NAME, or --config RUN.yaml")
    model, recipe, folder = _load(args)
    return model, recipe, folder, str(Path(args.model).resolve())


def _cmd_from_model(args) -> int:
    """``tokenize --from-model``: shards sampled from the raster model (data-free post-training)."""
    from .teacher import TeacherSampling, cycled_prompts, sample_dataset, uniform_classes

    if args.source is not None:
        raise GenerateError("--from-model takes no images; drop the SRC argument")
    if args.num_samples is None:
        raise GenerateError("--from-model needs --num-samples N (how many examples to sample)")
    model, recipe, folder, ident = _teacher_model(args)
    if recipe.condition.kind == "class":
        if args.prompts_file:
            raise GenerateError(f"recipe {recipe.name!r} is class-conditional: classes are sampled uniformly; "
                                "drop --prompts-file")
        conds, text = uniform_classes(args.num_samples, recipe.condition.num_classes), None
    elif recipe.condition.kind == "tokens":
        if not args.prompts_file:
            raise GenerateError(f"recipe {recipe.name!r} is conditioned on prompts: give --prompts-file FILE")
        conds = cycled_prompts(read_prompts(args.prompts_file), args.num_samples)
        text = _pick_text_tokenizer(args, recipe, folder)
    else:
        raise GenerateError(f"condition.kind {recipe.condition.kind!r}: --from-model samples classes or prompts only")
    sampling = TeacherSampling(args.cfg, args.cfg_schedule, args.temperature, args.top_k, args.top_p)
    print(f"sampling {len(conds)} examples from the raster model -> {args.out} (recipe {recipe.name}, "
          f"{recipe.image.grid[0] * recipe.image.grid[1]} steps each, CFG {args.cfg}, seed {args.seed})")
    rep = sample_dataset(model, conds, args.out, sampling=sampling, seed=args.seed, text=text,
                         batch_size=args.batch_size, shard_size=args.shard_size, progress=not args.no_progress,
                         extra=json.dumps([ident, args.prompt_template]))
    print(f"wrote {rep['num_examples']} examples in {rep['seconds']:.1f} s of sampling")
    return 0


# ---------------------------------------------------------------- generate

def read_prompts(path) -> list[str]:
    """One prompt per line; an empty line is an error naming it (it would be a silent empty prompt)."""
    path = Path(path)
    if not path.is_file():
        raise GenerateError(f"{path}: prompts file not found")
    lines = path.read_text().splitlines()
    while lines and not lines[-1].strip():
        lines.pop()  # a trailing newline or blank tail is not a prompt
    empty = [n for n, ln in enumerate(lines, 1) if not ln.strip()]
    if empty:
        raise GenerateError(f"{path}: line {empty[0]} is empty ({len(empty)} empty line(s)); remove them")
    if not lines:
        raise GenerateError(f"{path}: no prompts in it")
    return [ln.strip() for ln in lines]


def _conditions(args, recipe) -> list:
    """What to generate, one entry per image (each condition repeated --per-cond times)."""
    if recipe.condition.kind == "class":
        if args.prompts or args.prompts_file:
            raise GenerateError(f"recipe {recipe.name!r} is class-conditional: give --classes, not prompts")
        n = recipe.condition.num_classes
        classes = args.classes if args.classes else list(range(n))
        bad = [c for c in classes if not 0 <= c < n]
        if bad:
            raise GenerateError(f"--classes: {bad[0]} is outside 0..{n - 1}")
        conds = classes
    elif recipe.condition.kind == "tokens":
        if args.classes:
            raise GenerateError(f"recipe {recipe.name!r} is conditioned on prompts: give --prompts or --prompts-file")
        conds = list(args.prompts or []) + (read_prompts(args.prompts_file) if args.prompts_file else [])
        if not conds:
            raise GenerateError("give --prompts TEXT ... or --prompts-file FILE")
        if any(not p.strip() for p in conds):
            raise GenerateError("--prompts: empty prompt")
    else:
        raise GenerateError(f"condition.kind {recipe.condition.kind!r}: generate takes classes or prompts only")
    return [c for c in conds for _ in range(args.per_cond)]


def _prompt_batch(prompts: list[str], text, prefix_len: int):
    ids = [list(text(p)) for p in prompts]
    for p, i in zip(prompts, ids):
        if not i or len(i) > prefix_len:
            raise GenerateError(f"prompt {p[:40]!r} is {len(i)} tokens; condition.prefix_len allows 1..{prefix_len}")
    T = max(len(i) for i in ids)
    cond = torch.zeros(len(ids), T, dtype=torch.long)
    mask = torch.zeros(len(ids), T, dtype=torch.bool)
    for k, i in enumerate(ids):  # left-padded
        cond[k, T - len(i):] = torch.tensor(i)
        mask[k, T - len(i):] = True
    return cond, mask


def steps_per_image(mode: str, grid) -> int:
    """Serial decoding steps after the prefix: H+W-1 anti-diagonals, or H*W tokens."""
    return grid[0] + grid[1] - 1 if mode == "two_way" else grid[0] * grid[1]


def generate_codes(model, conds: list, *, text=None, mode="two_way", cfg=1.0, cfg_schedule="constant", temperature=1.0,
                   top_k=0, top_p=1.0, seed=0, batch_size=16, progress=True, log=print,
                   compile=False) -> tuple[torch.Tensor, list[dict]]:
    """Codes for every condition, batch by batch, with the steps and wall time of each batch
    (with ``compile``, the first batch of each size includes the compile time)."""
    from tqdm.auto import tqdm

    from .patching import context

    ctx = context(model)
    dev = next(model.parameters()).device
    g = torch.Generator(device=dev).manual_seed(seed)
    grid = ctx.recipe.image.grid
    out, timings = [], []
    starts = range(0, len(conds), batch_size)
    for b, i in enumerate(tqdm(starts, desc=f"generate ({mode})", disable=not progress)):
        part = conds[i:i + batch_size]
        if text is None:
            cond, mask = torch.tensor(part, dtype=torch.long, device=dev), None
        else:
            cond, mask = (t.to(dev) for t in _prompt_batch(part, text, ctx.recipe.condition.prefix_len))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        codes = model.generate(cond, mode=mode, cfg_scale=cfg, cfg_schedule=cfg_schedule, temperature=temperature,
                               top_k=top_k, top_p=top_p, generator=g, cond_mask=mask, compile=compile)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t0
        steps = steps_per_image(mode, grid)
        timings.append({"batch": b, "images": len(part), "steps": steps, "seconds": round(dt, 4)})
        log(f"batch {b + 1}/{len(starts)}: {len(part)} images, {steps} steps, {dt:.2f} s")
        out.append(codes.cpu())
    return torch.cat(out), timings


def labelled_grid(images: torch.Tensor, labels: list[str], per_row: int, min_cell: int = 64):
    """One PIL image: a row per condition, its label on the left."""
    from PIL import Image, ImageDraw

    from .imagedata import to_pil

    N, C, H, W = images.shape
    zoom = max(1, -(-min_cell // max(H, W)))
    h, w = H * zoom, W * zoom
    rows = -(-N // per_row)
    label_w = 8 + 7 * min(28, max((len(s) for s in labels), default=0))
    canvas = Image.new("RGB", (label_w + per_row * (w + 2), rows * (h + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for k in range(N):
        r, c = divmod(k, per_row)
        tile = to_pil(images[k]).convert("RGB").resize((w, h), Image.Resampling.NEAREST)
        canvas.paste(tile, (label_w + c * (w + 2), r * (h + 2)))
        if c == 0:
            draw.text((4, r * (h + 2) + h // 2 - 6), labels[k][:28], fill="black")
    return canvas


def _write_outputs(tmp: Path, codes, conds, timings, args, tok, recipe) -> str:
    labels = [str(c) for c in conds]
    meta = {"recipe": recipe.name, "mode": args.mode, "cfg": args.cfg, "seed": args.seed, "grid": list(codes.shape[1:]),
            "compile": args.compile, "conditions": labels, "batches": timings}
    atomic_save_safetensors({"codes": codes.to(torch.int32)}, tmp / "codes.safetensors")
    if tok is None:
        (tmp / "generate.json").write_text(json.dumps(meta, indent=1))
        return f"codes only (recipe {recipe.name!r} has no tokenizer section): codes.safetensors"
    try:
        images = tok.decode(codes)
    except TokenizerError as e:
        meta["decode_error"] = str(e)
        (tmp / "generate.json").write_text(json.dumps(meta, indent=1))
        return f"codes only ({e})"
    from .imagedata import to_pil

    (tmp / "images").mkdir()
    for k in range(images.shape[0]):
        safe = "".join(ch if ch.isalnum() else "_" for ch in labels[k][:32])
        to_pil(images[k]).save(tmp / "images" / f"{k:05d}_{safe}.png")
    labelled_grid(images, labels, args.per_cond).save(tmp / "grid.png")  # one labelled row per condition
    (tmp / "generate.json").write_text(json.dumps(meta, indent=1))
    return f"{images.shape[0]} PNG files in images/, grid.png, codes.safetensors"


def _cmd_generate(args) -> int:
    out = Path(args.out)
    if out.exists():
        raise GenerateError(f"{out}: exists; choose a new --out (nothing was written)")
    model, recipe, folder = _load(args)
    if args.mode == "two_way" and args.model and not args.flashar_weights:
        raise GenerateError("--mode two_way needs trained FlashAR weights: --flashar-weights FILE (or an --export "
                            "folder); use --mode raster for the checkpoint's own decoding")
    conds = _conditions(args, recipe)
    text = _pick_text_tokenizer(args, recipe, folder)
    tok = None
    if recipe.tokenizer is not None:
        from .tokenizers import tokenizer_of

        tok = tokenizer_of(model, checkpoint=args.tokenizer_checkpoint)  # built before sampling: a bad one fails fast
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        t0 = time.perf_counter()
        codes, timings = generate_codes(model, conds, text=text, mode=args.mode, cfg=args.cfg,
                                        cfg_schedule=args.cfg_schedule, temperature=args.temperature, top_k=args.top_k,
                                        top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
                                        progress=not args.no_progress, compile=args.compile)
        what = _write_outputs(tmp, codes, conds, timings, args, tok, recipe)
        if out.exists():
            raise GenerateError(f"{out}: appeared while generating; results left in {tmp}")
        apply_umask(tmp)  # mkdtemp made it 0700; the results are read like any file
        os.replace(tmp, out)
    except BaseException:
        if tmp.exists() and not isinstance(sys.exc_info()[1], GenerateError):
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"{len(conds)} images in {time.perf_counter() - t0:.1f} s -> {out}: {what}")
    return 0


# ---------------------------------------------------------------- command line

def _model_args(s, need_model: bool) -> None:
    s.add_argument("--export", help="an export folder (flashar-adapt export)")
    s.add_argument("--config", help="a training run's config YAML (its last checkpoint)")
    s.add_argument("--model", help="a checkpoint file or folder, with --recipe")
    s.add_argument("--recipe", help="recipe name or YAML file" + ("" if need_model else " (alone: no model needed)"))
    s.add_argument("--tokenizer-checkpoint", help="image tokenizer weights (overrides tokenizer.checkpoint)")
    s.add_argument("--text-tokenizer", help="the model's text tokenizer folder (prompt-conditioned recipes)")
    s.add_argument("--prompt-template", default="{prompt}", help="how a prompt is written before tokenising, e.g. "
                   "'{prompt}<begin_of_image>'")
    s.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...")
    s.add_argument("--no-progress", action="store_true")


def _positive(text: str) -> int:
    n = int(text)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {n}")
    return n


def _sampling_args(s) -> None:
    s.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1 = off)")
    s.add_argument("--cfg-schedule", default="constant")
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)


def add_cli(sub) -> None:
    s = sub.add_parser("tokenize", help="encode an image folder (class sub-folders) or a JSONL of {image, prompt} "
                       "into training shards (resumable)")
    s.add_argument("source", nargs="?", help="a folder with one sub-folder per class, or a .jsonl file "
                   "(none with --from-model)")
    s.add_argument("--out", required=True, help="data folder to write (an interrupted run there is continued)")
    _model_args(s, need_model=False)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--shard-size", type=int, default=4096)
    s.add_argument("--allow-upscale", action="store_true", help="scale up images smaller than the tokenizer input")
    t = s.add_argument_group("data-free: --from-model samples the shards from the raster model itself")
    t.add_argument("--from-model", action="store_true", help="sample the model (--model + --recipe, or --config: "
                   "its base model) instead of encoding images")
    t.add_argument("--num-samples", type=_positive, help="examples to sample (classes in turn, or the prompts in turn)")
    t.add_argument("--prompts-file", help="prompt-conditioned recipes: one prompt per line")
    _sampling_args(t)
    s.set_defaults(fn=_cmd_tokenize)

    s = sub.add_parser("generate", help="generate images (PNG + a labelled grid, or codes) from a model")
    s.add_argument("--out", required=True, help="output folder (must not exist)")
    _model_args(s, need_model=True)
    s.add_argument("--flashar-weights", help="flashar.safetensors of an export, with --model")
    s.add_argument("--classes", type=int, nargs="+", help="class ids (default: every class)")
    s.add_argument("--prompts", nargs="+", help="prompts")
    s.add_argument("--prompts-file", help="a file with one prompt per line")
    s.add_argument("--per-cond", type=int, default=1, help="images per class or prompt")
    s.add_argument("--mode", choices=("two_way", "raster"), default="two_way")
    _sampling_args(s)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--compile", action="store_true", help="compile the decoding step (torch.compile; CUDA graphs on "
                   "CUDA): the first batch, and a smaller last one, pay the compile time")
    s.set_defaults(fn=_cmd_generate)
