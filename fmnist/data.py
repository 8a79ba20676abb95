"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (idx files, gzip)."""

from __future__ import annotations

import gzip
import os
import sys
from pathlib import Path

import torch
from PIL import Image

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


def class_folder_name(c: int) -> str:
    """``"3_Dress"``: sorted, these folder names give Fashion-MNIST's class ids 0..9 back."""
    return f"{c}_{CLASS_NAMES[c]}"


def write_png_folders(out: str | os.PathLike, count: int, split: str = "train", root: Path | None = None) -> Path:
    """Write ``count`` images of ``split`` as 28x28 grayscale PNGs in one sub-folder per class
    (``class_folder_name``), every class in turn: a class folder as ``flashar-adapt tokenize``
    reads it. ``out`` must be new or empty."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty; choose a new folder")
    x, y = load_fmnist(split, root)
    per_class = [torch.nonzero(y == c).flatten().tolist() for c in range(len(CLASS_NAMES))]
    for i in range(count):
        c, k = i % len(CLASS_NAMES), i // len(CLASS_NAMES)
        folder = out / class_folder_name(c)
        folder.mkdir(parents=True, exist_ok=True)
        idx = per_class[c][k]
        Image.fromarray(x[idx].numpy(), "L").save(folder / f"{split}_{idx:05d}.png")
    return out


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m flashar_adapt.fmnist.data", description="write Fashion-MNIST images as class folders of PNGs"
    )
    ap.add_argument("--write-pngs", required=True, metavar="DIR", help="a new folder for the class sub-folders")
    ap.add_argument("--count", type=int, default=300, help="images, every class in turn")
    ap.add_argument("--split", choices=sorted(_FILES), default="train")
    a = ap.parse_args(argv)
    if a.count < 1:
        ap.error(f"--count must be at least 1, got {a.count}")
    try:
        write_png_folders(a.write_pngs, a.count, a.split)
    except (DatasetMissing, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {a.count} PNGs of the {a.split} split to {a.write_pngs} (sub-folders {class_folder_name(0)} ...)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
