"""The ``Recipe``: a name, a backend and the sections (``sections.py``), built from a parsed
YAML mapping by ``recipe_from_dict``: the keys first (every TODO, unknown and missing key),
then each section by its own ``parse``, so an error names the first key that is wrong."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..validate import Is, Text, did_you_mean, first_unknown, rule, short
from .sections import (
    SECTIONS,
    Condition,
    FlashAR,
    Image,
    Logits,
    LoRA,
    Modules,
    RecipeError,
    Tokenizer,
    checked,
    expect,
    required_fields,
)

# The marker `flashar-adapt inspect` writes where it cannot infer a value; a recipe holding it is refused.
TODO = "TODO"


@dataclass(frozen=True)
class Recipe:
    name: str = rule(Text(nonempty=True))
    backend: str = rule(Text(nonempty=True))
    modules: Modules  # each section is checked by its own parse
    condition: Condition
    image: Image
    flashar: FlashAR = field(default_factory=FlashAR)
    lora: LoRA = field(default_factory=LoRA)
    logits: Logits = field(default_factory=Logits)
    description: str = rule(Text(optional=True), default="")
    match: dict = rule(Is((dict,), "a mapping", optional=True), default_factory=dict)
    tokenizer: Tokenizer | None = None
    source: str | None = None

    @property
    def eol(self) -> bool:
        return self.image.eol_token is not None

    @property
    def eol_last(self) -> bool:
        """Whether the last row is closed by ``image.eol_token`` too (not by ``image.last_row_end``)."""
        return self.image.last_row_end is None

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out.pop("source")
        if out["tokenizer"] is None:
            out.pop("tokenizer")
        return _plain(out)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **overrides: Any) -> Recipe:
        """Return a copy with dotted keys (``"flashar.branch_layer"``) or shortcuts
        (``branch_layer``, ``branch_depth``, ``gate_hidden``, ``grid``) overridden."""
        data = self.to_dict()
        both = next((k for k, d in _SHORTCUTS.items() if k in overrides and d in overrides), None)
        if both is not None:  # one would silently win over the other
            raise RecipeError(_SHORTCUTS[both], f"given twice, as {both}= and as {_SHORTCUTS[both]}=", self.source)
        for key, value in overrides.items():
            dotted = _SHORTCUTS.get(key, key)
            node = data
            parts = dotted.split(".")
            for part in parts[:-1]:
                if not isinstance(node.get(part), dict):
                    raise RecipeError(dotted, "is not a recipe key" + did_you_mean(part, node), self.source)
                node = node[part]
            if parts[-1] not in node and not (len(parts) == 1 and parts[0] in TOP_KEYS):  # an absent optional section
                # an undotted typo is most likely a misspelt shortcut ("branch_layr")
                choices = list(node) + list(_SHORTCUTS) if len(parts) == 1 else node
                raise RecipeError(dotted, "is not a recipe key" + did_you_mean(parts[-1], choices), self.source)
            node[parts[-1]] = list(value) if isinstance(value, tuple) else value
        return recipe_from_dict(data, source=self.source)


_SHORTCUTS = {
    "branch_layer": "flashar.branch_layer",
    "branch_depth": "flashar.branch_depth",
    "gate_hidden": "flashar.gate_hidden",
    "grid": "image.grid",
}
_TOP_REQUIRED = {"name", "backend", "modules", "condition", "image"}
TOP_KEYS = _TOP_REQUIRED | {"description", "flashar", "lora", "logits", "match", "tokenizer"}


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def todo_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys (list items as key[i]) whose value is still the draft's TODO marker."""
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in todo_keys(v, f"{prefix}.{key}" if prefix else str(key))]
    if isinstance(node, list):
        return [k for i, v in enumerate(node) for k in todo_keys(v, f"{prefix}[{i}]")]
    return [prefix] if node == TODO else []


def recipe_from_dict(data: Any, source: str | None = None) -> Recipe:
    """Validate a parsed YAML mapping and build a ``Recipe``: the keys first, then each
    section by its own function, so an error names the first key that is wrong."""
    src = source
    expect(isinstance(data, dict), "<root>", f"a recipe must be a mapping, got {type(data).__name__}", src)
    _check_keys(data, src)
    top = checked(Recipe, {k: data.get(k) for k in ("name", "backend", "description", "match")}, "", src)
    modules, condition = Modules.parse(data["modules"], src), Condition.parse(data["condition"], src)
    image = Image.parse(data["image"], src)
    if not modules.image_embed:  # codes read through the shared vocabulary: specials apart from codes
        image.check_special_ids(src)
    return Recipe(
        **top,
        modules=modules,
        condition=condition,
        image=image,
        flashar=FlashAR.parse(data.get("flashar") or {}, src),
        lora=LoRA.parse(data.get("lora") or {}, src),
        logits=Logits.parse(data.get("logits") or {}, src),
        tokenizer=Tokenizer.parse(data.get("tokenizer"), image, src),
        source=source,
    )


def _check_keys(data: dict, src) -> None:
    """Every TODO, unknown and missing key, section by section."""
    todo = todo_keys(data)
    # Every TODO at once, whatever its type (a TODO name or backend would pass the type checks).
    expect(
        not todo,
        todo[0] if todo else "",
        f"is still {TODO!r}; fill in every TODO the draft marks: {', '.join(todo)}",
        src,
    )
    k = first_unknown(data, TOP_KEYS)
    expect(k is None, str(k), "unknown key" + did_you_mean(str(k), TOP_KEYS), src)
    for k in sorted(_TOP_REQUIRED):
        expect(k in data, k, "is required", src)
    for sec in SECTIONS:
        if sec in data:
            expect(isinstance(data[sec], dict), sec, f"must be a mapping, got {short(data[sec])}", src)
    for sec, cls in SECTIONS.items():
        allowed = {f.name for f in dataclasses.fields(cls)}
        k = first_unknown(data.get(sec, {}) or {}, allowed)
        expect(k is None, f"{sec}.{k}", "unknown key" + did_you_mean(str(k), allowed), src)
        for k in sorted(required_fields(cls)):
            expect(k in (data.get(sec) or {}), f"{sec}.{k}", "is required", src)
