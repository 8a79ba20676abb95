"""Loading the shipped models and measuring them: NLL, sample quality, speed side by side."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm

import flashar_adapt as fa
from flashar_adapt.integrations.llamagen import ModelArgs, Transformer, load_checkpoint

from . import ASSETS
from .classifier import batched, frechet_distance, load_classifier
from .data import load_fmnist
from .tokenizer import PatchVQ


def load_base(assets: Path = ASSETS) -> torch.nn.Module:
    """The raster base model, patched (raster mode is its own decoding, bit for bit)."""
    args = ModelArgs(**json.loads((assets / "model_args.json").read_text()))
    model = load_checkpoint(Transformer(args), assets / "base.safetensors").float().eval()
    return fa.patch(model, "fmnist-c2i")


def load_flashar(path: Path = ASSETS / "flashar") -> torch.nn.Module:
    return fa.load_adapted(path).float().eval()


@torch.no_grad()
def nll_bits(model, codes: torch.Tensor, labels: torch.Tensor, mode: str, batch: int = 500) -> float:
    """Exact NLL in bits per token under the model's own factorisation (two_way or raster)."""
    total = 0.0
    for i in range(0, codes.shape[0], batch):
        total -= fa.score(model, labels[i : i + batch], codes[i : i + batch].long(), mode=mode).sum().item()
    return total / codes.numel() / math.log(2)


Decoder = Callable[[torch.Tensor, torch.Generator], torch.Tensor]


def decoder(model, mode: str, cfg_scale: float, **kw) -> Decoder:
    """A function (labels, generator) -> codes, for mode 'two_way', 'raster' or 'zipar<w>'."""
    if mode.startswith("zipar"):
        # the ZipAR peer is benchmark code beside the package, not part of it: found at run time
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
        from zipar import generate_zipar

        w = int(mode[5:])
        return lambda y, g: generate_zipar(model, y, w, cfg_scale=cfg_scale, generator=g, **kw)
    return lambda y, g: model.generate(y, mode=mode, cfg_scale=cfg_scale, generator=g, **kw)


def steps_of(mode: str, H: int = 14, W: int = 14) -> int:
    if mode == "raster":
        return H * W
    if mode == "two_way":
        return H + W - 1
    return (H - 1) * int(mode[5:]) + W


@torch.no_grad()
def sample_codes(
    dec: Decoder, n: int, batch: int = 500, seed: int = 0, progress: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples, classes balanced (i % 10), reproducible from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    out = []
    rng = range(0, n, batch)
    if progress:
        rng = tqdm(rng, desc=progress, leave=False)
    for i in rng:
        out.append(dec(labels[i : i + batch], g))
    return torch.cat(out), labels


class Judge:
    """Classifier-based quality: Frechet distance to the test set in the classifier's
    feature space, and the accuracy of class-conditional samples."""

    def __init__(self, assets: Path = ASSETS, test_images: torch.Tensor | None = None):
        self.vq = PatchVQ.load(assets / "tokenizer.safetensors")
        self.net = load_classifier(assets / "classifier.safetensors")
        if test_images is None:
            test_images = load_fmnist("test")[0]
        self.test_feats = batched(self.net.features, test_images.float() / 255)

    def __call__(self, codes: torch.Tensor, labels: torch.Tensor) -> dict:
        imgs = self.vq.decode(codes)
        feats = batched(self.net.features, imgs)
        pred = batched(self.net, imgs).argmax(1)
        return {"frechet": frechet_distance(feats, self.test_feats), "accuracy": (pred == labels).float().mean().item()}


def timed(fn: Callable[[], object], repeat: int = 3) -> float:
    """Best wall time of ``repeat`` runs after one warm-up."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def speed(decs: dict[str, Decoder], big_batch: int = 64, repeat: int = 3) -> dict:
    """Batch-1 latency and batch-``big_batch`` throughput of every decoder (the best of
    ``repeat`` runs), interleaved in one run so that all of them see the same machine state;
    ``spread``: the slowest run over the fastest, the largest over both measurements (a busy
    machine shows as a spread well above 1)."""
    times = {k: {"b1": [], "big": []} for k in decs}
    y1 = torch.tensor([3])
    yb = torch.arange(big_batch) % 10
    for d in decs.values():  # warm-up
        d(y1, torch.Generator().manual_seed(0))
    for _ in range(repeat):
        for k, d in decs.items():
            for name, y in (("b1", y1), ("big", yb)):
                t = time.perf_counter()
                d(y, torch.Generator().manual_seed(0))
                times[k][name].append(time.perf_counter() - t)
    return {
        k: {
            "latency_s": min(t["b1"]),
            "throughput": big_batch / min(t["big"]),
            "spread": max(max(v) / min(v) for v in t.values()),
        }
        for k, t in times.items()
    }


# Timings of one machine state agree within this factor; beyond it other processes took the cores.
BUSY_SPREAD = 1.25


def image_grid(codes: torch.Tensor, vq: PatchVQ, rows: int) -> torch.Tensor:
    imgs = vq.decode(codes)
    n, h, w = imgs.shape
    cols = n // rows
    return imgs[: rows * cols].view(rows, cols, h, w).permute(0, 2, 1, 3).reshape(rows * h, cols * w)


def save_side_by_side(
    left: torch.Tensor, right: torch.Tensor, titles: tuple[str, str], path: Path, row_labels: list[str]
) -> None:
    import matplotlib  # optional dependency (the "plots" extra): only the demo's picture needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 6.2))
    for ax, img, title in zip(axes, (left, right), titles):
        ax.imshow(img.numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=11)
        ax.set_xticks([])
        rows = len(row_labels)
        ax.set_yticks([(i + 0.5) * img.shape[0] / rows for i in range(rows)])
        ax.set_yticklabels(row_labels, fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
