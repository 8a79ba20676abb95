"""Write (or check) the training-config reference table in docs/training.md from the config
classes themselves, so the documented keys and defaults cannot drift from the code.

    python scripts/config_reference.py           # rewrite the table in place
    python scripts/config_reference.py --check   # exit 1 if the table is out of date

Keys and defaults come from ``TrainConfig`` / ``StageConfig``; the "meaning" column is kept
from the current table (a new key gets an empty meaning for you to fill in).
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import yaml

DOC = Path(__file__).resolve().parent.parent / "docs" / "training.md"
BEGIN, END = "<!-- config-reference:begin -->", "<!-- config-reference:end -->"
HEADER = ["| key | default | meaning |", "|---|---|---|"]


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _cell(value) -> str:
    if value is dataclasses.MISSING:
        return "required"
    if isinstance(value, tuple):
        value = list(value)
    text = yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    return f"`{text.removesuffix(chr(10) + '...').strip()}`"


def rows() -> list[tuple[str, str]]:
    """(key, default cell) for every config key, stage keys once per stage."""
    from flashar_adapt.training import StageConfig, TrainConfig

    out = []
    for f in dataclasses.fields(TrainConfig):
        if f.name == "source":  # set by the loader, not a key
            continue
        default = _default(f)
        if isinstance(default, StageConfig):
            out += [(f"{f.name}.{g.name}", _cell(getattr(default, g.name))) for g in dataclasses.fields(StageConfig)]
        else:
            out.append((f.name, _cell(default)))
    return out


def _meanings(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[0].startswith("`"):
            out[cells[0].strip("`")] = " | ".join(cells[2:])
    return out


def render(current: list[str]) -> list[str]:
    means = _meanings(current)
    return HEADER + [f"| `{k}` | {d} | {means.get(k, '')} |" for k, d in rows()]


def split(text: str) -> tuple[str, list[str], str]:
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{DOC}: markers {BEGIN} / {END} not found")
    head, rest = text.split(BEGIN, 1)
    table, tail = rest.split(END, 1)
    return head, [ln for ln in table.strip("\n").splitlines()], tail


def main(argv: list[str]) -> int:
    text = DOC.read_text()
    head, table, tail = split(text)
    new = render(table)
    if "--check" in argv:
        if new != table:
            print(f"{DOC}: the config reference table is out of date; run python scripts/config_reference.py")
            return 1
        return 0
    DOC.write_text(head + BEGIN + "\n" + "\n".join(new) + "\n" + END + tail)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
