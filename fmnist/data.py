"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (idx files, gzip)."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import torch

DEFAULT_DIR = Path(os.environ.get("FMNIST_DIR", "/usr/share/datasets/fashion-mnist"))
CLASS_NAMES = ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"]
_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


class DatasetMissing(FileNotFoundError):
    pass


def _read_idx(path: Path, magic: int, ndim: int) -> torch.Tensor:
    if not path.is_file():
        raise DatasetMissing(
            f"{path} not found: install Fashion-MNIST with "
            "`apt-get install -y dataset-fashion-mnist` (or set FMNIST_DIR)"
        )
    raw = gzip.open(path, "rb").read()
    got = int.from_bytes(raw[:4], "big")
    if got != magic:
        raise ValueError(f"{path}: magic number {got:#x}, expected {magic:#x} (not an idx file of this kind)")
    dims = [int.from_bytes(raw[4 + 4 * k : 8 + 4 * k], "big") for k in range(ndim)]
    body = raw[4 + 4 * ndim :]
    n = 1
    for d in dims:
        n *= d
    if len(body) != n:
        raise ValueError(f"{path}: {len(body)} bytes of data, header says {n}")
    return torch.frombuffer(bytearray(body), dtype=torch.uint8).view(*dims)


def dataset_files(root: Path | None = None) -> list[Path]:
    """The four idx files the default expects under ``root``."""
    root = Path(root or DEFAULT_DIR)
    return [root / name for pair in _FILES.values() for name in pair]


def load_fmnist(split: str, root: Path | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of the 'train' (60k) or 'test' (10k) split."""
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root or DEFAULT_DIR)
    imgs, labels = _FILES[split]
    x = _read_idx(root / imgs, 0x803, 3)
    y = _read_idx(root / labels, 0x801, 1).long()
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"{root}: {x.shape[0]} images but {y.shape[0]} labels")
    return x, y
