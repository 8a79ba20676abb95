"""The Fashion-MNIST test set as a reference for ``flashar-adapt evaluate``:

    python -m flashar_adapt.fmnist.reference --out runs/fmnist/reference

writes ``test.npz`` (the 10,000 test images in the ADM layout: arr_0 uint8 [N, 28, 28, 3],
arr_1 labels) and ``test_shards/`` (their codes, a data folder: the held-out NLL of
``evaluate --shards``). ``--count`` takes the first N test images only."""

from __future__ import annotations

import argparse
from pathlib import Path

from flashar_adapt.npz_images import write_npz
from flashar_adapt.shards import ShardWriter

from . import ASSETS
from .data import load_fmnist
from .tokenizer import PatchVQ


def write_reference(out, count: int | None = None) -> Path:
    """``out``/test.npz and ``out``/test_shards (skipped when already there); returns ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    x, y = load_fmnist("test")
    x, y = x[:count], y[:count]
    if not (out / "test.npz").is_file():
        rgb = x[..., None].expand(-1, -1, -1, 3).numpy()
        write_npz(out / "test.npz", iter(rgb), (x.shape[0], 28, 28), y.numpy())
    if not (out / "test_shards" / "manifest.json").is_file():
        codes = PatchVQ.load(ASSETS / "tokenizer.safetensors").encode(x)
        w = ShardWriter(out / "test_shards", (14, 14), 256, "class", recipe="fmnist-c2i", shard_size=10_000)
        w.add(codes.long(), y)
        w.close()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flashar_adapt.fmnist.reference", description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("runs/fmnist/reference"))
    ap.add_argument("--count", type=int, default=None, help="the first N test images only")
    a = ap.parse_args(argv)
    print(f"reference -> {write_reference(a.out, a.count)}: test.npz, test_shards/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
