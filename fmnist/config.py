"""The configs that made the shipped Fashion-MNIST models (``fmnist/configs/*.yaml``, read by
``fmnist/build.py`` itself, so they cannot drift from what was shipped), and a training config
of your own from the post-training one::

    python -m flashar_adapt.fmnist.config --data data/ --out-dir run/ --out cfg.yaml

writes ``configs/flashar.yaml`` with your shard folder and run folder (written relative to
``cfg.yaml``, as training configs read them) and the shipped base model's absolute path, so
``flashar-adapt train --config cfg.yaml`` post-trains the shipped base on your data as the
shipped FlashAR model was. ``--set stage2.steps=500`` changes any key (dotted; YAML value).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import yaml

from flashar_adapt.commands.types import key_values
from flashar_adapt.errors import InputError
from flashar_adapt.files import atomic_write_bytes

CONFIGS = Path(__file__).parent / "configs"


def read_config(name: str) -> dict:
    """``configs/<name>.yaml`` as a mapping (``base``: the raster base; ``flashar``: its post-training)."""
    return yaml.safe_load((CONFIGS / f"{name}.yaml").read_text())


def base_config() -> dict:
    """The raster base model: ``model`` (ModelArgs fields) and ``train`` (``train_base`` settings)."""
    return read_config("base")


def post_training_config(
    data: str | os.PathLike, out_dir: str | os.PathLike, *, changes: dict | None = None, relative_to=None
) -> dict:
    """The shipped post-training config with ``data`` and ``out_dir`` set and the base model's
    path made absolute. ``changes``: dotted keys (``{"stage2.steps": 500}``) replaced.
    ``relative_to``: a folder; paths inside it are written relative to it (a config file's
    relative paths are read relative to its folder), others absolute."""
    cfg = read_config("flashar")
    cfg["model"]["checkpoint"] = str((CONFIGS / cfg["model"]["checkpoint"]).resolve())
    paths = {"data": _path_for(data, relative_to), "out_dir": _path_for(out_dir, relative_to)}
    cfg = {"model": cfg.pop("model"), "recipe": cfg.pop("recipe"), **paths, **cfg}  # the order a reader expects
    for key, value in (changes or {}).items():
        *parents, last = key.split(".")
        node = cfg
        for p in parents:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise InputError(f"--set {key}: {p!r} is not a section")
        node[last] = value
    return cfg


def _path_for(path, folder) -> str:
    p = Path(path).resolve()
    if folder is None:
        return str(p)
    rel = os.path.relpath(p, Path(folder).resolve())
    return str(p) if rel.startswith("..") else rel


def write_post_training_config(out, data, out_dir, changes: dict | None = None) -> Path:
    """Write ``post_training_config`` to ``out``; an existing ``out`` with other content is refused."""
    out = Path(out)
    cfg = post_training_config(data, out_dir, changes=changes, relative_to=out.parent)
    head = f"# written by python -m flashar_adapt.fmnist.config from {CONFIGS / 'flashar.yaml'}\n"
    text = (head + yaml.safe_dump(cfg, sort_keys=False)).encode()
    if out.exists() and out.read_bytes() != text:
        raise InputError(f"{out}: exists with other content; choose another --out (nothing was written)")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, text)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m flashar_adapt.fmnist.config",
        description="write the config that made the shipped FlashAR model, with your data and run folders",
    )
    ap.add_argument("--data", required=True, help="the shard folder (flashar-adapt tokenize --out)")
    ap.add_argument("--out-dir", required=True, help="the run folder (checkpoints, metrics)")
    ap.add_argument("--out", required=True, help="the config file to write")
    ap.add_argument("--set", action="append", metavar="KEY=VALUE", help="change a key (dotted, e.g. stage2.steps=500)")
    a = ap.parse_args(argv)
    try:
        out = write_post_training_config(a.out, a.data, a.out_dir, key_values(a.set))
    except (InputError, yaml.YAMLError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"wrote {out}; next: flashar-adapt train --config {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
