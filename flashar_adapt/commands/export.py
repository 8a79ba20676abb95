"""``flashar-adapt export``: a training run's model, LoRA merged (or kept apart), in its
family's own layout (``flashar_adapt.export``)."""

from __future__ import annotations

from ..export import export_run


def _export(args) -> int:
    out, _ = export_run(
        args.config,
        args.out,
        merge=not args.keep_adapters,
        allow_unfinished=args.allow_unfinished,
        allow_config_change=args.allow_config_change,
    )
    print(f"exported to {out}")
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
    s.add_argument(
        "--allow-unfinished",
        action="store_true",
        help="export a run that is still training or stopped short of its config's steps (the step and stage "
        "exported are printed)",
    )
    s.add_argument(
        "--allow-config-change",
        action="store_true",
        help="export even though the config or its recipe differ from what made the checkpoint (the "
        "differences are listed)",
    )
    s.set_defaults(fn=_export)
