"""``flashar-adapt export``: a training run's model, LoRA merged (or kept apart), in its
family's own layout (``flashar_adapt.export``)."""

from __future__ import annotations

from pathlib import Path

from ..export import export_merged
from ..files import atomic_write_bytes
from ..generation import CLASSES
from ..training import TrainConfig, build_model_from_run


def _export(args) -> int:
    cfg = TrainConfig.load(args.config)
    model = build_model_from_run(cfg)
    out = export_merged(model, args.out, merge=not args.keep_adapters)
    names = Path(cfg.data) / CLASSES
    if names.is_file():  # the class names of the training data label what the export generates
        atomic_write_bytes(out / CLASSES, names.read_bytes())
    print(f"exported to {args.out}")
    return 0


def add_parsers(sub) -> None:
    s = sub.add_parser("export", help="merge LoRA and export an adapted model from a training run")
    s.add_argument("--config", required=True, help="the training config YAML of the run")
    s.add_argument("--out", required=True, help="export folder to write")
    s.add_argument(
        "--keep-adapters",
        action="store_true",
        help="keep LoRA adapters unmerged (adapters.safetensors): raster mode with adapters off is the "
        "original model exactly",
    )
    s.set_defaults(fn=_export)
