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
import time
from pathlib import Path

import torch

from flashar_adapt import export_merged, load_recipe, logits, patch, train
from flashar_adapt.integrations.llamagen import ModelArgs, Transformer
from flashar_adapt.patching import backbone_only

from . import ASSETS, data
from .build import post_config, tokenize, write_shards
from .data import CLASS_NAMES
from .evaluate import (
    BUSY_SPREAD,
    Judge,
    decoder,
    image_grid,
    load_base,
    load_flashar,
    nll_bits,
    sample_codes,
    save_side_by_side,
    speed,
    steps_of,
)
from .tokenizer import PatchVQ


def missing_inputs(
    out: str | os.PathLike, *, retrain: bool = False, samples: int = 1, nll_images: int = 1, repeat: int = 1
) -> str | None:
    """What the demo cannot run without, as one line naming the fix; None when all is there.
    Checked before any long work, so a fresh machine fails in a second, not after the timings."""
    absent = [p for p in data.dataset_files(data.DEFAULT_DIR) if not p.is_file()]
    if absent:
        return (
            f"Fashion-MNIST is missing ({absent[0]} not found): run `apt-get install -y dataset-fashion-mnist` "
            "as root (scripts/demo.sh does this), or set FMNIST_DIR to a folder holding the idx files"
        )
    if retrain:
        for mod in ("accelerate", "peft", "transformers"):
            if importlib.util.find_spec(mod) is None:
                return (
                    f"--retrain needs the training extras ({mod} is not installed): "
                    "run `pip install -c constraints.txt -e '.[train]'` (scripts/demo.sh does this)"
                )
    for bad, value in (("samples", samples), ("nll_images", nll_images), ("repeat", repeat)):
        if value < 1:
            return f"--{bad.replace('_', '-')} must be at least 1, got {value}"
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"cannot create the output folder {out}: {e.strerror}"
    if not os.access(out, os.W_OK):
        return f"the output folder {out} is not writable"
    return None


def run(
    out: str | os.PathLike = "out/demo",
    *,
    retrain: bool = False,
    cfg_scale: float = 2.0,
    samples: int = 500,
    nll_images: int = 1000,
    repeat: int = 2,
    tiny_grid: int = 16,
    tiny_batch: int = 4,
) -> int:
    """The demo: a labelled sample grid (PNG), then steps, speed and quality of both models.
    Without the shipped assets it runs ``tiny_demo(tiny_grid, tiny_batch)`` instead."""
    if not (ASSETS / "flashar" / "flashar_config.json").is_file():
        print(f"the shipped Fashion-MNIST assets are missing under {ASSETS}; running the tiny random-model demo")
        return tiny_demo(tiny_grid, tiny_batch)
    problem = missing_inputs(out, retrain=retrain, samples=samples, nll_images=nll_images, repeat=repeat)
    if problem:
        print(f"flashar-adapt demo: {problem}", file=sys.stderr)
        return 2
    out = Path(out)
    started = time.perf_counter()
    minutes = _expected_minutes(samples, repeat, retrain)
    print(
        f"Fashion-MNIST demo: a sample grid, speed ({repeat} timed repeats) and quality ({samples} samples "
        f"per model); about {minutes} minutes on a quiet 2-core CPU, longer on a busy one"
    )
    base = load_base()
    if retrain:
        work = out / "retrain"
        write_shards(ASSETS, work)
        model = train(post_config(work, "flashar"))
        flash = load_flashar(export_merged(model, work / "flashar_export"))
        source = "re-trained now (stage 1 + stage 2)"
    else:
        flash = load_flashar()
        source = "shipped"
    info = json.loads((ASSETS / "info.json").read_text()) if (ASSETS / "info.json").is_file() else {}
    with backbone_only(base):
        base_params = sum(p.numel() for p in base.parameters())
    print(
        f"raster base: LlamaGen architecture, {base_params / 1e6:.2f}M "
        "parameters, 14x14 grid of a 256-code k-means VQ "
        f"(test PSNR {info.get('tokenizer', {}).get('test_psnr_db', '?')} dB)"
    )
    print(
        f"FlashAR: {source}; branch of {len(flash.flashar.branch_layers)} layer(s) from layer "
        f"{flash.flashar.ctx.branch_index}, "
        f"{sum(p.numel() for p in flash.flashar.parameters()) / 1e6:.2f}M added parameters"
    )
    decs = {"raster": decoder(base, "raster", cfg_scale), "two_way": decoder(flash, "two_way", cfg_scale)}

    # 1. the picture
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(10).repeat_interleave(8)
    grids = {k: image_grid(d(labels, g), _vq(), rows=10) for k, d in decs.items()}
    png = out / "fmnist_samples.png"
    save_side_by_side(
        grids["raster"],
        grids["two_way"],
        (f"raster base: {steps_of('raster')} steps", f"FlashAR two-way: {steps_of('two_way')} steps"),
        png,
        CLASS_NAMES,
    )
    print(f"sample grid (CFG {cfg_scale}): {png}")

    # 2. speed, side by side
    print_speed(speed(decs, big_batch=64, repeat=repeat))

    # 3. quality on a quick sample
    n = samples
    sub = torch.arange(nll_images)
    # said before the test set is coded and the classifier loaded (about 10 s)
    print(f"\nquality (NLL on {len(sub)} test images; {n} samples per model at CFG {cfg_scale}):", flush=True)
    print("  coding the test set and loading the classifier (about 10 s; the codes are cached) ...", flush=True)
    codes = tokenize(ASSETS, out / "cache")
    judge = Judge()
    print(f"{'':10s} {'NLL bits/token':>15s} {'Frechet dist.':>14s} {'sample acc.':>12s}")
    for k, model in (("raster", base), ("two_way", flash)):
        nll = nll_bits(model, codes["test"][sub], codes["test_labels"][sub], k)
        # batches of 100: the bar moves every few seconds (sampling 500 took 80 s unseen)
        c, y = sample_codes(decs[k], n, batch=min(n, 100), seed=1, progress=f"{k}: {n} samples")
        q = judge(c, y)
        print(f"{k:10s} {nll:15.4f} {q['frechet']:14.3f} {q['accuracy']:12.3f}")
    print("\n(the full benchmark with ablations and the ZipAR peer: python benchmarks/fmnist.py)")
    print(f"demo done in {time.perf_counter() - started:.0f} s")
    return 0


def _expected_minutes(samples: int, repeat: int, retrain: bool) -> str:
    """A rough wall time on a quiet 2-core CPU, from the quiet-machine numbers of docs/fmnist.md
    (~25 s of loading, coding the test set and the grids, ~8 s per timed repeat, ~0.1 s per
    quality sample of the two models, ~20 minutes of post-training)."""
    m = (25 + 8 * (repeat + 1) + 0.1 * samples + (1200 if retrain else 0)) / 60
    return f"{max(1, round(m))}"


def print_speed(sp: dict) -> None:
    """The speed table; when the repeats disagree (a busy machine), the numbers are flagged
    as unusable instead of being printed as a result."""
    busy = max(v["spread"] for v in sp.values())
    print(f"\n{'':10s} {'steps':>6s} {'batch-1 latency':>16s} {'batch-64 img/s':>15s}")
    for k, v in sp.items():
        print(f"{k:10s} {steps_of(k):6d} {v['latency_s'] * 1000:13.1f} ms {v['throughput']:15.1f}")
    print(
        f"{'ratio':10s} {steps_of('raster') / steps_of('two_way'):5.2f}x "
        f"{sp['raster']['latency_s'] / sp['two_way']['latency_s']:15.2f}x "
        f"{sp['two_way']['throughput'] / sp['raster']['throughput']:14.2f}x"
        + ("   <- NOT a measurement: see below" if busy > BUSY_SPREAD else "")
    )
    if busy > BUSY_SPREAD:
        print(
            f"warning: the timed repeats differ by up to {busy:.2f}x (over {BUSY_SPREAD}x): other processes "
            "are using the CPU, so these times and ratios say nothing about FlashAR; run the demo on a quiet "
            "machine (the steps ratio holds regardless)"
        )


_VQ = {}


def _vq():
    if "vq" not in _VQ:
        _VQ["vq"] = PatchVQ.load(ASSETS / "tokenizer.safetensors")
    return _VQ["vq"]


def tiny_demo(grid: int = 16, batch: int = 4) -> int:
    """Patch a small random LlamaGen-architecture model (a ``grid`` x ``grid`` image) and
    decode ``batch`` images both ways."""
    torch.manual_seed(0)
    g = grid
    model = Transformer(
        ModelArgs(
            dim=256,
            n_layer=8,
            n_head=8,
            vocab_size=1024,
            num_classes=10,
            block_size=g * g,
            token_dropout_p=0,
            resid_dropout_p=0,
            ffn_dropout_p=0,
        )
    ).eval()
    torch.nn.init.normal_(model.output.weight, std=0.02)
    recipe = load_recipe("llamagen-c2i-b").replace(
        **{"image.codebook_size": 1024, "condition.num_classes": 10, "condition.null_class": 10, "image.grid": [g, g]}
    )
    patch(model, recipe)
    cond = torch.arange(batch) % 10
    H, W = recipe.image.grid
    print(f"random LlamaGen-architecture model: 8 layers, dim 256, grid {H}x{W}, batch {batch}, CFG 4.0")
    runs = {}
    for mode in ("raster", "two_way"):
        model.generate(cond, mode=mode, cfg_scale=4.0, top_k=1)  # warm-up
        runs[mode] = []
        for _ in range(3):
            t = time.perf_counter()
            model.generate(cond, mode=mode, cfg_scale=4.0, top_k=1)
            runs[mode].append(time.perf_counter() - t)
    out = {k: min(v) for k, v in runs.items()}
    busy = max(max(v) / min(v) for v in runs.values())
    codes = model.generate(cond, mode="two_way", top_k=1)
    exact = bool((logits(model, cond, codes).argmax(-1) == codes).all())
    steps = {"raster": H * W, "two_way": H + W - 1}
    for mode in ("raster", "two_way"):
        print(f"  {mode:8s} steps {steps[mode]:5d}   time {out[mode] * 1000:8.1f} ms")
    print(
        f"  step ratio {steps['raster'] / steps['two_way']:.2f}x, "
        f"measured speedup {out['raster'] / out['two_way']:.2f}x"
        + (f" (NOT a measurement: repeats differ by {busy:.2f}x, the CPU is busy)" if busy > BUSY_SPREAD else "")
    )
    print(f"  greedy two-way decoding equals teacher forcing: {exact}")
    return 0
