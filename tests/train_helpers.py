"""Builders for small training runs: a base checkpoint on disk, data shards, a config."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

from flashar_adapt.shards import ShardWriter
from tests import tiny

LLAMAGEN_ARGS = dict(
    dim=32,
    n_layer=5,
    n_head=4,
    multiple_of=16,
    vocab_size=48,
    num_classes=10,
    block_size=16,
    token_dropout_p=0.0,
    resid_dropout_p=0.0,
    ffn_dropout_p=0.0,
)
LLAMAGEN_OVERRIDES = {
    "image.codebook_size": 48,
    "condition.num_classes": 10,
    "condition.null_class": 10,
    "image.grid": [4, 4],
}


def structured_codes(n: int, grid: int, K: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes with learnable structure (class sets a base code, rows and columns shift it),
    so losses measurably fall within a few dozen steps."""
    g = torch.Generator().manual_seed(seed)
    cls = torch.randint(0, 10, (n,), generator=g)
    i = torch.arange(grid)[:, None]
    j = torch.arange(grid)[None, :]
    codes = (cls[:, None, None] * 4 + i + 2 * j) % K
    noise = torch.rand(n, grid, grid, generator=g) < 0.1
    codes = torch.where(noise, torch.randint(0, K, (n, grid, grid), generator=g), codes)
    return codes, cls


def llamagen_run(root: Path, *, stage1: int = 6, stage2: int = 4, lora: bool = False, n: int = 64, **extra) -> Path:
    """Write base.pt, data/ and cfg.yaml under ``root``; return the config path."""
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "base.pt").exists():
        # realistic weight scale (~1/sqrt(dim)) so float error stays at the level real models see
        torch.save({"model": tiny.llamagen(grid=4, std=0.15).state_dict()}, root / "base.pt")
    if not (root / "data").exists():
        w = ShardWriter(root / "data", (4, 4), 48, "class", recipe="llamagen-c2i-b", shard_size=24)
        codes, cls = structured_codes(n, 4, 48)
        w.add(codes, cls)
        w.close()
    cfg = dict(
        model={"format": "llamagen", "checkpoint": "base.pt", "config": LLAMAGEN_ARGS},
        recipe="llamagen-c2i-b",
        recipe_overrides=LLAMAGEN_OVERRIDES,
        data="data",
        out_dir="run",
        stage1={"steps": stage1, "lr": 3e-3, "warmup_steps": 2},
        stage2={"steps": stage2, "lr": 3e-3, "lora": lora},
        batch_size=8,
        save_every=3,
        cpu=True,
    )
    cfg.update(extra)
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def hf_run(root: Path, *, stage1: int = 3, stage2: int = 3, lora: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    model = tiny.hf_llama(std=0.15)
    model.save_pretrained(root / "base")
    w = ShardWriter(root / "data", (3, 4), 40, "tokens", recipe="llama-image-ar", max_prompt_len=6)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, 90, (32, 6), generator=g)
    lens = torch.randint(2, 7, (32,), generator=g)
    prompts = prompts.masked_fill(torch.arange(6)[None] < (6 - lens)[:, None], 0)
    w.add(torch.randint(0, 40, (32, 3, 4), generator=g), prompts, lens)
    w.close()
    over = {
        "image.codebook_size": 40,
        "image.visual_token_offset": 100,
        "image.grid": [3, 4],
        "condition.prefix_len": 16,
        "condition.pad_id": 0,
    }
    cfg = dict(
        model={"format": "transformers", "path": "base"},
        recipe="llama-image-ar",
        recipe_overrides=over,
        data="data",
        out_dir="run",
        stage1={"steps": stage1, "lr": 3e-3},
        stage2={"steps": stage2, "lr": 3e-3, "lora": lora},
        batch_size=4,
        save_every=2,
        cpu=True,
    )
    path = root / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path
