"""The paper's Table 1 in miniature, on Fashion-MNIST (not a test; run by hand).

    python benchmarks/fmnist.py [--samples 5000] [--work runs/fmnist]

Rows, all measured in this run on this machine: the raster base, FlashAR, the ablations
(fixed 0.5 average instead of the gate, branch at the last layer, stage 1 only, full
fine-tuning instead of LoRA in stage 2, the paper's loss without fused distillation) and
the training-free ZipAR-style peer at two windows. Columns: exact test NLL in bits per
token under each model's own factorisation (10k test images), Frechet distance to the test
set in a classifier's feature space and sample accuracy (same CFG for all),
serial steps, batch-1 latency, batch-64 throughput, and speedups over raster measured side
by side. Writes benchmarks/results/fmnist.{json,md,png}. Ablation models come from
``python -m flashar_adapt.fmnist.build variants`` (trained on the spot if missing).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from flashar_adapt import export_merged
from flashar_adapt.fmnist import ASSETS
from flashar_adapt.fmnist.build import VARIANTS, build_variants, post_config, tokenize
from flashar_adapt.fmnist.evaluate import (
    Judge,
    decoder,
    load_base,
    load_flashar,
    nll_bits,
    sample_codes,
    speed,
    steps_of,
)
from flashar_adapt.training import TrainConfig, build_model_from_run

LABELS = {
    "raster": "raster base (original decoding)",
    "flashar": "FlashAR (2 stages, LoRA stage 2, gate, branch at L-2)",
    "nar_avg": "ablation: fixed 0.5 average (NAR-style)",
    "last_layer": "ablation: branch at the last layer",
    "stage1_only": "ablation: stage 1 only",
    "full_ft": "ablation: full fine-tuning in stage 2",
    "paper_loss": "ablation: paper's loss (no fused distillation)",
    "zipar1": "ZipAR-style peer, window 1",
    "zipar2": "ZipAR-style peer, window 2",
}


def variant_model(work: Path, name: str):
    cfg = TrainConfig.load(post_config(work, name, **VARIANTS[name]))
    model = build_model_from_run(cfg)
    out = export_merged(model, work / "exports" / name)  # merged and reloaded, as users ship it
    return load_flashar(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "fmnist")
    ap.add_argument("--samples", type=int, default=5000)
    ap.add_argument("--cfg", type=float, default=2.0)
    ap.add_argument("--nll-images", type=int, default=10_000)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--speed-only",
        action="store_true",
        help="keep the quality columns of the existing JSON, re-measure speed (on a quiet machine)",
    )
    a = ap.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    missing = [n for n in VARIANTS if not (a.work / "runs" / n / "checkpoint.pt").is_file()]
    if missing:
        build_variants(ASSETS, a.work, only=missing)
    base = load_base()
    models = {"raster": (base, "raster"), "flashar": (load_flashar(), "two_way")}
    for name in VARIANTS:
        models[name] = (variant_model(a.work, name), "two_way")
    models["zipar1"] = (base, "zipar1")
    models["zipar2"] = (base, "zipar2")

    codes = tokenize(ASSETS, a.work)
    test_codes, test_labels = codes["test"][: a.nll_images], codes["test_labels"][: a.nll_images]
    from tqdm.auto import tqdm

    rows = {}
    judge = None
    if a.speed_only:
        old = json.loads((a.out / "fmnist.json").read_text())
        rows = old["rows"]
        a.samples, test_codes = old["samples_per_row"], test_codes[: old["nll_test_images"]]
    for name, (model, mode) in tqdm([] if a.speed_only else models.items(), desc="quality"):
        judge = judge or Judge()
        nll_mode = "raster" if mode.startswith("zipar") else mode  # ZipAR keeps the raster model's likelihood
        nll = nll_bits(model, test_codes, test_labels, nll_mode)
        c, y = sample_codes(decoder(model, mode, a.cfg), a.samples, batch=500, seed=1, progress=name)
        rows[name] = {"label": LABELS[name], "mode": mode, "steps": steps_of(mode), "nll_bits": nll, **judge(c, y)}

    sp = speed({k: decoder(m, mode, a.cfg) for k, (m, mode) in models.items()}, big_batch=64, repeat=a.repeat)
    for k in rows:
        rows[k].update(sp[k])
        rows[k]["latency_speedup"] = sp["raster"]["latency_s"] / sp[k]["latency_s"]
        rows[k]["throughput_speedup"] = sp[k]["throughput"] / sp["raster"]["throughput"]
        rows[k]["step_ratio"] = rows["raster"]["steps"] / rows[k]["steps"]

    info = json.loads((ASSETS / "info.json").read_text()) if (ASSETS / "info.json").is_file() else {}
    result = {
        "machine": platform.platform(),
        "torch_threads": torch.get_num_threads(),
        "cfg_scale": a.cfg,
        "samples_per_row": a.samples,
        "nll_test_images": len(test_codes),
        "assets": info,
        "rows": rows,
        "seconds": round(time.time() - t_start, 1),
    }
    old_path = a.out / "fmnist.json"
    if old_path.is_file() and "data_free" in json.loads(old_path.read_text()):
        result["data_free"] = json.loads(old_path.read_text())["data_free"]  # measured by fmnist.build data_free
    (a.out / "fmnist.json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    (a.out / "fmnist.md").write_text(md)
    plot(result, a.out / "fmnist.png")
    print(md)
    return 0


def markdown(r: dict) -> str:
    head = (
        "| model | steps | NLL bits/token | Frechet dist. | sample acc. | batch-1 latency | batch-64 img/s "
        "| latency speedup | throughput speedup |\n|---|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {v['label']} | {v['steps']} | {v['nll_bits']:.4f} | {v['frechet']:.3f} | {v['accuracy']:.3f} | "
        f"{v['latency_s'] * 1000:.0f} ms | {v['throughput']:.1f} | {v['latency_speedup']:.2f}x | "
        f"{v['throughput_speedup']:.2f}x |"
        for v in r["rows"].values()
    ]
    cls = r["assets"].get("classifier", {}).get("test_accuracy")
    return (
        f"Fashion-MNIST, 14x14 codes, CFG {r['cfg_scale']}, {r['samples_per_row']} samples per row, NLL on "
        f"{r['nll_test_images']} test images; classifier test accuracy {cls}; {r['machine']}, "
        f"{r['torch_threads']} torch threads.\n\n" + head + "\n".join(lines) + "\n" + data_free_markdown(r)
    )


def data_free_markdown(r: dict) -> str:
    """The data-free rows (``python -m flashar_adapt.fmnist.build data_free``), each beside the
    shipped FlashAR measured with the same number of samples."""
    d = r.get("data_free")
    if not d:
        return ""
    head = (
        "| model | post-trained on | teacher sampling | samples per row | NLL bits/token | Frechet dist. | "
        "sample acc. |\n|---|---|---|---|---|---|---|\n"
    )
    lines = []
    for v in d["rows"]:
        src = (
            f"{v['teacher_samples']} base samples (CFG {v['teacher_cfg']}), each seen "
            f"{d['images_seen'] / v['teacher_samples']:.0f}x"
            if "teacher_samples" in v
            else f"{d['images_seen']} real images"
        )
        t = f"{v['teacher_seconds']:.0f} s" if "teacher_seconds" in v else "-"
        lines.append(
            f"| {v['label']} | {src} | {t} | {v['samples']} | {v['nll_bits']:.4f} | {v['frechet']:.3f} | "
            f"{v['accuracy']:.3f} |"
        )
    return (
        f"\nData-free post-training, same budget as the shipped FlashAR ({d['images_seen']} images over "
        f"{d['steps']} steps); {d['note']}\n\n" + head + "\n".join(lines) + "\n"
    )


def plot(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, v in r["rows"].items():
        ax.scatter(v["latency_speedup"], v["frechet"], s=40)
        ax.annotate(k, (v["latency_speedup"], v["frechet"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("batch-1 latency speedup over raster (measured)")
    ax.set_ylabel("Frechet distance to test set (lower is better)")
    ax.set_title("Fashion-MNIST: quality vs speed")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    raise SystemExit(main())
