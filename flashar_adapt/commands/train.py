"""``flashar-adapt train``: two-stage post-training from one config file (``flashar_adapt.training``)."""

from __future__ import annotations

from ..training import train


def _train(args) -> int:
    train(args.config, progress=not args.no_progress, allow_config_change=args.allow_config_change)
    return 0


def add_parsers(sub) -> None:
    s = sub.add_parser("train", help="two-stage FlashAR post-training (resumes from the last checkpoint)")
    s.add_argument("--config", required=True, help="training config YAML")
    s.add_argument("--no-progress", action="store_true")
    s.add_argument(
        "--allow-config-change",
        action="store_true",
        help="resume even though the config differs from the checkpoint's (the differences are listed)",
    )
    s.set_defaults(fn=_train)
