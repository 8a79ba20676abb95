"""The main job: the whole FlashAR story on Fashion-MNIST in a few minutes on a laptop CPU.

Loads the shipped raster base model and its FlashAR version (or re-runs the post-training
with --retrain), writes a labelled side-by-side sample grid, and prints steps, batch-1
latency and batch-64 throughput of both with the ratios measured in this run, then quick
quality numbers (NLL, Frechet distance, sample accuracy).
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import torch

from . import ASSETS
from .data import CLASS_NAMES


def missing_inputs(args) -> str | None:
    """What the demo cannot run without, as one line naming the fix; None when all is there.
    Checked before any long work, so a fresh machine fails in a second, not after the timings."""
    from .data import DEFAULT_DIR, dataset_files

    absent = [p for p in dataset_files(DEFAULT_DIR) if not p.is_file()]
    if absent:
        return (f"Fashion-MNIST is missing ({absent[0]} not found): run `apt-get install -y dataset-fashion-mnist` "
                "as root (scripts/demo.sh does this), or set FMNIST_DIR to a folder holding the idx files")
    if args.retrain:
        for mod in ("accelerate", "peft", "transformers"):
            if importlib.util.find_spec(mod) is None:
                return (f"--retrain needs the training extras ({mod} is not installed): "
                        "run `pip install -c constraints.txt -e '.[train]'` (scripts/demo.sh does this)")
    for bad in ("samples", "nll_images", "repeat"):
        if getattr(args, bad) < 1:
            return f"--{bad.replace('_', '-')} must be at least 1, got {getattr(args, bad)}"
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot create the output folder {out}: {e.strerror}"
    if not os.access(out, os.W_OK):
        return f"the output folder {out} is not writable"
    return None


def run(args) -> int:
    from .evaluate import (Judge, decoder, image_grid, load_base, load_flashar, nll_bits, sample_codes,
                           save_side_by_side, speed, steps_of)

    if not (ASSETS / "flashar" / "flashar_config.json").is_file():
        print(f"the shipped Fashion-MNIST assets are missing under {ASSETS}; running the tiny random-model demo")
        return tiny_demo(args)
    problem = missing_inputs(args)
    if problem:
        print(f"flashar-adapt demo: {problem}", file=sys.stderr)
        return 2
    out = Path(args.out)
    base = load_base()
    if args.retrain:
        from flashar_adapt import export_merged, train

        from .build import post_config, write_shards

        work = out / "retrain"
        write_shards(ASSETS, work)
        model = train(post_config(work, "flashar"))
        flash = load_flashar(export_merged(model, work / "flashar_export"))
        source = "re-trained now (stage 1 + stage 2)"
    else:
        flash = load_flashar()
        source = "shipped"
    info = json.loads((ASSETS / "info.json").read_text()) if (ASSETS / "info.json").is_file() else {}
    print(f"raster base: LlamaGen architecture, {sum(p.numel() for n, p in base.named_parameters() if not n.startswith('flashar')) / 1e6:.2f}M "
          f"parameters, 14x14 grid of a 256-code k-means VQ (test PSNR {info.get('tokenizer', {}).get('test_psnr_db', '?')} dB)")
    print(f"FlashAR: {source}; branch of {len(flash.flashar.branch_layers)} layer(s) from layer "
          f"{flash.flashar.ctx.branch_index}, {sum(p.numel() for p in flash.flashar.parameters()) / 1e6:.2f}M added parameters")
    cfg = args.cfg
    decs = {"raster": decoder(base, "raster", cfg), "two_way": decoder(flash, "two_way", cfg)}

    # 1. the picture
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat_interleave(8)
    grids = {k: image_grid(d(labels, g), _vq(), rows=10) for k, d in decs.items()}
    png = out / "fmnist_samples.png"
    save_side_by_side(grids["raster"], grids["two_way"],
                      (f"raster base: {steps_of('raster')} steps", f"FlashAR two-way: {steps_of('two_way')} steps"),
                      png, CLASS_NAMES)
    print(f"sample grid (CFG {cfg}): {png}")

    # 2. speed, side by side
    sp = speed(decs, big_batch=64, repeat=args.repeat)
    print(f"\n{'':10s} {'steps':>6s} {'batch-1 latency':>16s} {'batch-64 img/s':>15s}")
    for k in decs:
        print(f"{k:10s} {steps_of(k):6d} {sp[k]['latency_s'] * 1000:13.1f} ms {sp[k]['throughput']:15.1f}")
    print(f"{'ratio':10s} {steps_of('raster') / steps_of('two_way'):5.2f}x "
          f"{sp['raster']['latency_s'] / sp['two_way']['latency_s']:15.2f}x "
          f"{sp['two_way']['throughput'] / sp['raster']['throughput']:14.2f}x")

    # 3. quality on a quick sample
    from .build import tokenize

    n = args.samples
    codes = tokenize(ASSETS, Path(args.out) / "cache")
    sub = torch.arange(args.nll_images)
    judge = Judge()
    print(f"\nquality (NLL on {len(sub)} test images; {n} samples per model at CFG {cfg}):")
    print(f"{'':10s} {'NLL bits/token':>15s} {'Frechet dist.':>14s} {'sample acc.':>12s}")
    for k, model in (("raster", base), ("two_way", flash)):
        nll = nll_bits(model, codes["test"][sub], codes["test_labels"][sub], k)
        c, y = sample_codes(decs[k], n, batch=min(n, 250), seed=1)
        q = judge(c, y)
        print(f"{k:10s} {nll:15.4f} {q['frechet']:14.3f} {q['accuracy']:12.3f}")
    print("\n(the full benchmark with ablations and the ZipAR peer: python benchmarks/fmnist.py)")
    return 0


_VQ = {}


def _vq():
    from .tokenizer import PatchVQ

    if "vq" not in _VQ:
        _VQ["vq"] = PatchVQ.load(ASSETS / "tokenizer.safetensors")
    return _VQ["vq"]


def add_arguments(p) -> None:
    p.add_argument("--retrain", action="store_true", help="re-run the post-training from the shipped base")
    p.add_argument("--out", default="out/demo", help="where the PNG (and any re-trained model) go")
    p.add_argument("--cfg", type=float, default=2.0, help="classifier-free guidance scale")
    p.add_argument("--samples", type=int, default=500, help="samples per model for the quick quality numbers")
    p.add_argument("--nll-images", type=int, default=1000, help="test images for the quick NLL")
    p.add_argument("--repeat", type=int, default=2, help="timing repeats (best of)")


def tiny_demo(args) -> int:
    """Patch a small random LlamaGen-architecture model and decode both ways."""
    import torch

    from flashar_adapt import load_recipe, logits, patch
    from flashar_adapt.integrations.llamagen import ModelArgs, Transformer

    from .evaluate import timed

    torch.manual_seed(0)
    g = args.grid
    model = Transformer(ModelArgs(dim=256, n_layer=8, n_head=8, vocab_size=1024, num_classes=10, block_size=g * g,
                                  token_dropout_p=0, resid_dropout_p=0, ffn_dropout_p=0)).eval()
    torch.nn.init.normal_(model.output.weight, std=0.02)
    recipe = load_recipe("llamagen-c2i-b").replace(**{"image.codebook_size": 1024, "condition.num_classes": 10,
                                                      "condition.null_class": 10, "image.grid": [g, g]})
    patch(model, recipe)
    cond = torch.arange(args.batch) % 10
    H, W = recipe.image.grid
    print(f"random LlamaGen-architecture model: 8 layers, dim 256, grid {H}x{W}, batch {args.batch}, CFG 4.0")
    out = {}
    for mode in ("raster", "two_way"):
        out[mode] = timed(lambda: model.generate(cond, mode=mode, cfg_scale=4.0, top_k=1), repeat=2)  # warms up once
    codes = model.generate(cond, mode="two_way", top_k=1)
    exact = bool((logits(model, cond, codes).argmax(-1) == codes).all())
    steps = {"raster": H * W, "two_way": H + W - 1}
    for mode in ("raster", "two_way"):
        print(f"  {mode:8s} steps {steps[mode]:5d}   time {out[mode] * 1000:8.1f} ms")
    print(f"  step ratio {steps['raster'] / steps['two_way']:.2f}x, measured speedup {out['raster'] / out['two_way']:.2f}x")
    print(f"  greedy two-way decoding equals teacher forcing: {exact}")
    return 0
