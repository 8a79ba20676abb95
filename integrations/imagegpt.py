"""Image GPT: its codes are indices into 512 colour clusters, not VQ codes.

The released checkpoints (openai/imagegpt-small/medium/large) ship the cluster centres in
``preprocessor_config.json`` under ``"clusters"``: 512 RGB triples in [-1, 1]. A code grid
becomes an image by looking each code up there (recipes/imagegpt-*.yaml).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch


def load_clusters(folder: str | os.PathLike) -> torch.Tensor:
    """The [512, 3] colour clusters of a checkpoint folder (its preprocessor_config.json)."""
    path = Path(folder) / "preprocessor_config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no preprocessor_config.json (the clusters ship with the checkpoint)")
    clusters = json.loads(path.read_text()).get("clusters")
    if not clusters:
        raise ValueError(f"{path}: no 'clusters' entry")
    out = torch.tensor(clusters, dtype=torch.float32)
    if out.dim() != 2 or out.shape[1] != 3:
        raise ValueError(f"{path}: 'clusters' must be a list of RGB triples, got shape {tuple(out.shape)}")
    return out


def codes_to_pixels(codes: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
    """Codes [B, H, W] (cluster indices) -> uint8 images [B, H, W, 3]."""
    if codes.dtype not in (torch.int64, torch.int32) or codes.dim() != 3:
        raise ValueError(f"codes must be an integer tensor [B, H, W], got {codes.dtype} {tuple(codes.shape)}")
    if int(codes.min()) < 0 or int(codes.max()) >= clusters.shape[0]:
        raise ValueError(f"codes must be in [0, {clusters.shape[0]})")
    rgb = clusters.to(codes.device)[codes.long()]  # [-1, 1]
    return ((rgb + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
