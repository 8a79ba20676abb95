"""Recipes: the YAML data that says where a model keeps what FlashAR needs.

A recipe is pure data. It is checked twice: once on load (types, required and unknown
keys) and once against the real model in ``patch`` (paths resolve, layer indices and
token ids are in range, the grid fits the model's positions). Every failure is a
``RecipeError`` that names the YAML key, so a typo costs seconds.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

import yaml

from .errors import FlashARError
from .validate import Num, did_you_mean, first_unknown, short

ENV_RECIPE_PATH = "FLASHAR_RECIPE_PATH"
ENTRY_POINT_GROUP = "flashar_adapt.recipes"


class RecipeError(FlashARError, ValueError):
    """A recipe is malformed or does not fit the model. ``key`` is the dotted YAML key."""

    def __init__(self, key: str, message: str, source: str | None = None):
        self.key = key
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {message}")


@dataclass(frozen=True)
class Modules:
    layers: str
    norm: str
    head: str
    embed: str
    decoder: str = ""
    image_embed: tuple[str, ...] = ()
    after_norm: tuple[str, ...] = ()  # applied in order between norm and head (a projection the decoder ends with)

    @classmethod
    def parse(cls, m: dict, src) -> "Modules":
        ie = m.get("image_embed", [])
        if isinstance(ie, str):
            ie = [ie]
        _expect(isinstance(ie, list) and all(isinstance(x, str) for x in ie), "modules.image_embed",
                f"must be a module path or a list of them, got {short(ie)}", src)
        an = m.get("after_norm", []) or []
        if isinstance(an, str):
            an = [an]
        _expect(isinstance(an, list) and all(isinstance(x, str) for x in an), "modules.after_norm",
                f"must be a module path or a list of them, got {short(an)}", src)
        return cls(
            layers=_str(m, "modules", "layers", src), norm=_str(m, "modules", "norm", src),
            head=_str(m, "modules", "head", src), embed=_str(m, "modules", "embed", src),
            decoder=_or_default(_str(m, "modules", "decoder", src, optional=True), cls, "decoder"), image_embed=tuple(ie), after_norm=tuple(an),
        )


ConditionKind = Literal["class", "tokens", "features"]
Uncond = Literal["null_class", "pad_inner", "ids", "param", "none"]
# How each kind builds its CFG unconditional prefix; the first is the default.
UNCOND_BY_KIND: dict[str, tuple[str, ...]] = {"class": ("null_class", "none"), "tokens": ("none", "pad_inner", "ids"),
                                              "features": ("none", "param")}


@dataclass(frozen=True)
class Condition:
    kind: ConditionKind
    embedding: str | None = None
    num_classes: int | None = None
    null_class: int | None = None
    prefix_len: int | None = None
    pad_id: int | None = None
    uncond: Uncond = "none"  # which ones a kind allows, the first its default: UNCOND_BY_KIND
    uncond_ids: tuple[int, ...] = ()
    uncond_features: str | None = None

    @classmethod
    def parse(cls, c: dict, src) -> "Condition":
        kind = c.get("kind")
        kinds = get_args(ConditionKind)
        _expect(kind in kinds, "condition.kind", f"must be one of {', '.join(map(repr, kinds))}, got {short(kind)}", src)
        allowed_uncond = UNCOND_BY_KIND[kind]
        uncond = c.get("uncond", allowed_uncond[0])
        _expect(uncond in allowed_uncond, "condition.uncond",
                f"must be one of {list(allowed_uncond)} for kind {kind!r}, got {short(uncond)}", src)
        cond = cls(
            kind=kind,
            embedding=_str(c, "condition", "embedding", src, optional=kind == "tokens"),
            num_classes=_int(c, "condition", "num_classes", src, minimum=1, optional=kind != "class"),
            null_class=_int(c, "condition", "null_class", src, minimum=0, optional=not (kind == "class" and uncond == "null_class")),
            prefix_len=_int(c, "condition", "prefix_len", src, minimum=1, optional=kind == "tokens"),
            pad_id=_int(c, "condition", "pad_id", src, minimum=0, optional=not (kind == "tokens" and uncond == "pad_inner")),
            uncond=uncond,
            uncond_ids=_int_list(c, "condition", "uncond_ids", src),
            uncond_features=_str(c, "condition", "uncond_features", src, optional=not (kind == "features" and uncond == "param")),
        )
        if kind == "tokens" and uncond == "ids":
            _expect(len(cond.uncond_ids) > 0, "condition.uncond_ids", "is required when condition.uncond is 'ids'", src)
        if kind == "class" and cond.null_class is not None:
            _expect(cond.null_class <= cond.num_classes, "condition.null_class",
                    f"must be <= condition.num_classes ({cond.num_classes}), got {cond.null_class}", src)
        return cond


@dataclass(frozen=True)
class Image:
    codebook_size: int
    grid: tuple[int, int]
    visual_token_offset: int = 0
    variable_grid: bool = False
    before: tuple[Any, ...] = ()
    digit_ids: tuple[int, ...] = ()
    eol_token: int | None = None
    size_token_offset: int | None = None  # "{size_H}" / "{size_W}" in before = this + H (or W) // size_token_divisor
    size_token_divisor: int = 1
    last_row_end: int | None = None  # id after the last code in place of the last row's eol_token (end-of-image)

    @classmethod
    def parse(cls, im: dict, src) -> "Image":
        codebook = _int(im, "image", "codebook_size", src, minimum=2)
        grid = im.get("grid")
        _expect(isinstance(grid, (list, tuple)) and len(grid) == 2 and all(_is_int(g) and g >= 1 for g in grid),
                "image.grid", f"must be [H, W] with positive integers, got {short(grid)}", src)
        before = im.get("before", []) or []
        _expect(isinstance(before, list), "image.before", f"must be a list, got {short(before)}", src)
        for i, item in enumerate(before):
            ok = (_is_int(item) and item >= 0) or item in _GRID_ITEMS
            _expect(ok, f"image.before[{i}]", f"must be a token id or one of {', '.join(repr(g) for g in _GRID_ITEMS)}, "
                                              f"got {short(item)}", src)
        digits = _int_list(im, "image", "digit_ids", src)
        if any(item in ("{H}", "{W}") for item in before):
            _expect(len(digits) == 10, "image.digit_ids", "must list the 10 token ids of '0'..'9' when image.before uses {H} or {W}", src)
        size_offset = _int(im, "image", "size_token_offset", src, minimum=0, optional=True)
        size_div = _or_default(_int(im, "image", "size_token_divisor", src, minimum=1, optional=True), cls, "size_token_divisor")
        if any(item in ("{size_H}", "{size_W}") for item in before):
            _expect(size_offset is not None, "image.size_token_offset",
                    "is required when image.before uses {size_H} or {size_W}", src)
        if size_div > 1:
            _expect(all(g % size_div == 0 for g in grid), "image.grid",
                    f"{list(grid)} must be divisible by image.size_token_divisor ({size_div})", src)
        variable = im.get("variable_grid", False)
        _expect(isinstance(variable, bool), "image.variable_grid", f"must be true or false, got {short(variable)}", src)
        if im.get("last_row_end") is not None:
            _expect(im.get("eol_token") is not None, "image.last_row_end",
                    "takes the place of the last row's image.eol_token, so it needs image.eol_token", src)
        return cls(
            codebook_size=codebook, grid=(int(grid[0]), int(grid[1])),
            visual_token_offset=_or_default(_int(im, "image", "visual_token_offset", src, minimum=0, optional=True), cls, "visual_token_offset"),
            variable_grid=variable, before=tuple(before), digit_ids=digits,
            eol_token=_int(im, "image", "eol_token", src, minimum=0, optional=True),
            size_token_offset=size_offset, size_token_divisor=size_div,
            last_row_end=_int(im, "image", "last_row_end", src, minimum=0, optional=True),
        )


@dataclass(frozen=True)
class FlashAR:
    branch_layer: int = -1
    branch_depth: int = 1
    gate_hidden: int | None = None

    @classmethod
    def parse(cls, f: dict, src) -> "FlashAR":
        flash = FlashAR(
            branch_layer=_int(f, "flashar", "branch_layer", src, optional=True) if "branch_layer" in f else -1,
            branch_depth=_or_default(_int(f, "flashar", "branch_depth", src, minimum=1, optional=True), cls, "branch_depth"),
            gate_hidden=_int(f, "flashar", "gate_hidden", src, minimum=1, optional=True),
        )
        _expect(flash.gate_hidden is None or flash.gate_hidden <= MAX_GATE_HIDDEN, "flashar.gate_hidden",
                f"must be <= {MAX_GATE_HIDDEN}, got {flash.gate_hidden} (the paper's gate uses max(64, d/8))", src)
        return flash


@dataclass(frozen=True)
class Logits:
    """What the model does to its head's output: logits = softcap * tanh(scale * head(h) / softcap)."""

    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def parse(cls, lg: dict, src) -> "Logits":
        scale = lg.get("scale", 1.0)
        _expect(Num(0, 1e6, lo_open=True).problem(scale) is None, "logits.scale",
                f"must be a positive number up to 1e6, got {short(scale)}", src)
        cap = lg.get("softcap")
        _expect(Num(0, 1e6, lo_open=True, optional=True).problem(cap) is None, "logits.softcap",
                f"must be a positive number up to 1e6 or null, got {short(cap)}", src)
        return cls(scale=float(scale), softcap=None if cap is None else float(cap))


@dataclass(frozen=True)
class LoRA:
    targets: tuple[str, ...] = ()
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0

    @classmethod
    def parse(cls, lo: dict, src) -> "LoRA":
        targets = lo.get("targets", [])
        _expect(isinstance(targets, list) and all(isinstance(t, str) for t in targets), "lora.targets",
                f"must be a list of module-name patterns, got {short(targets)}", src)
        _expect("all-linear" not in targets, "lora.targets",
                "'all-linear' also matches non-decoder modules (VQ model, vision tower); name the decoder projections", src)
        for i, t in enumerate(targets):
            problem = regex_problem(t)
            _expect(problem is None, f"lora.targets[{i}]", f"{problem}: {t!r}", src)
        try:
            re.compile("|".join(f"(?:{t})" for t in targets))
        except re.error as e:
            raise RecipeError("lora.targets", f"the patterns do not combine into one regex ({e})", src) from None
        dropout = lo.get("dropout", 0.0)
        _expect(isinstance(dropout, (int, float)) and 0 <= dropout < 1, "lora.dropout", f"must be in [0, 1), got {short(dropout)}", src)
        return cls(targets=tuple(targets), r=_or_default(_int(lo, "lora", "r", src, minimum=1, optional=True), cls, "r"),
                    alpha=_or_default(_int(lo, "lora", "alpha", src, minimum=1, optional=True), cls, "alpha"), dropout=float(dropout))


@dataclass(frozen=True)
class Tokenizer:
    """Optional ``tokenizer:`` section: which image tokenizer turns pixels into this model's
    codes and back. ``kind`` names a registered tokenizer (flashar_adapt.tokenizers);
    ``image_size`` defaults to image.grid x ``downsample``."""

    kind: str
    module: str | None = None  # path of the VQ module inside the model, for tokenizers the checkpoint carries
    checkpoint: str | None = None  # weights file; relative paths are relative to the recipe file
    downsample: int | None = None  # pixels per code, per side
    image_size: tuple[int, int] | None = None
    channels: int = 3
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)  # the tokenizer sees (pixels in [0, 1] - mean) / std
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    config: dict = field(default_factory=dict)  # kind-specific constructor arguments

    @classmethod
    def parse(cls, t: Any, image: Image, src) -> "Tokenizer | None":
        """The optional ``tokenizer:`` section. A stated image_size must agree with image.grid x
        downsample: a tokenizer whose grid disagrees with the recipe is refused on load."""
        if t is None:
            return None
        _expect(isinstance(t, dict), "tokenizer", f"must be a mapping, got {short(t)}", src)
        allowed = {f.name for f in dataclasses.fields(Tokenizer)}
        k = first_unknown(t, allowed)
        _expect(k is None, f"tokenizer.{k}", "unknown key" + did_you_mean(str(k), allowed), src)
        kind = _str(t, "tokenizer", "kind", src)
        _expect(bool(kind), "tokenizer.kind", "must be a non-empty string", src)
        down = _int(t, "tokenizer", "downsample", src, minimum=1, optional=True)
        size = t.get("image_size")
        if size is not None:
            _expect(isinstance(size, (list, tuple)) and len(size) == 2 and all(_is_int(s) and s >= 1 for s in size),
                    "tokenizer.image_size", f"must be [H, W] with positive integers, got {short(size)}", src)
            size = (int(size[0]), int(size[1]))
            if down is not None:
                want = (image.grid[0] * down, image.grid[1] * down)
                _expect(size == want, "tokenizer.image_size",
                        f"{list(size)} gives a {size[0] // down}x{size[1] // down} grid of codes, but image.grid is "
                        f"{list(image.grid)} (image_size must be grid x downsample = {list(want)})", src)
        channels = _or_default(_int(t, "tokenizer", "channels", src, minimum=1, optional=True), cls, "channels")
        std = _floats(t, "std", channels, [0.5] * channels, src)
        _expect(all(s > 0 for s in std), "tokenizer.std", f"must be positive, got {list(std)}", src)
        cfg = t.get("config", {}) or {}
        _expect(isinstance(cfg, dict), "tokenizer.config", f"must be a mapping, got {short(cfg)}", src)
        return cls(kind=kind, module=_str(t, "tokenizer", "module", src, optional=True),
                         checkpoint=_str(t, "tokenizer", "checkpoint", src, optional=True), downsample=down,
                         image_size=size, channels=channels, mean=_floats(t, "mean", channels, [0.5] * channels, src),
                         std=std, config=cfg)


@dataclass(frozen=True)
class Recipe:
    name: str
    backend: str
    modules: Modules
    condition: Condition
    image: Image
    flashar: FlashAR = field(default_factory=FlashAR)
    lora: LoRA = field(default_factory=LoRA)
    logits: Logits = field(default_factory=Logits)
    description: str = ""
    match: dict = field(default_factory=dict)
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

    def replace(self, **overrides: Any) -> "Recipe":
        """Return a copy with dotted keys (``"flashar.branch_layer"``) or shortcuts
        (``branch_layer``, ``branch_depth``, ``gate_hidden``, ``grid``) overridden."""
        data = self.to_dict()
        for key, value in overrides.items():
            dotted = _SHORTCUTS.get(key, key)
            node = data
            parts = dotted.split(".")
            for part in parts[:-1]:
                if not isinstance(node.get(part), dict):
                    raise RecipeError(dotted, "is not a recipe key" + did_you_mean(part, node), self.source)
                node = node[part]
            if parts[-1] not in node and not (len(parts) == 1 and parts[0] in _TOP_KEYS):  # an absent optional section
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


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


# ---------------------------------------------------------------- schema and validation

_SECTIONS: dict[str, tuple[type, set[str]]] = {
    "modules": (Modules, {"layers", "norm", "head", "embed"}),
    "condition": (Condition, {"kind"}),
    "image": (Image, {"codebook_size", "grid"}),
    "flashar": (FlashAR, set()),
    "lora": (LoRA, set()),
    "logits": (Logits, set()),
}
_TOP_REQUIRED = {"name", "backend", "modules", "condition", "image"}
_TOP_KEYS = _TOP_REQUIRED | {"description", "flashar", "lora", "logits", "match", "tokenizer"}


# Placeholders allowed in image.before: "{H}"/"{W}" spell the number with image.digit_ids;
# "{size_H}"/"{size_W}" are one token, image.size_token_offset + H (or W) // image.size_token_divisor.
_GRID_ITEMS = ("{H}", "{W}", "{size_H}", "{size_W}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _or_default(value, cls, name: str):
    """A value the YAML leaves out takes the section dataclass's own default (one place each)."""
    return value if value is not None else next(f.default for f in dataclasses.fields(cls) if f.name == name)


def _expect(cond: bool, key: str, msg: str, src: str | None) -> None:
    if not cond:
        raise RecipeError(key, msg, src)


def _int(data: dict, section: str, name: str, src, *, minimum: int | None = None, optional=False):
    key = f"{section}.{name}"
    v = data.get(name)
    if v is None:
        _expect(optional, key, "is required", src)
        return None
    _expect(_is_int(v), key, f"must be an integer, got {short(v)}", src)
    if minimum is not None:
        _expect(v >= minimum, key, f"must be >= {minimum}, got {v}", src)
    return v


def _str(data: dict, section: str, name: str, src, *, optional=False):
    key = f"{section}.{name}"
    v = data.get(name)
    if v is None:
        _expect(optional, key, "is required", src)
        return None
    _expect(isinstance(v, str), key, f"must be a string, got {short(v)}", src)
    return v


def _int_list(data: dict, section: str, name: str, src, *, length: int | None = None) -> tuple[int, ...]:
    key = f"{section}.{name}"
    v = data.get(name, [])
    _expect(isinstance(v, (list, tuple)), key, f"must be a list of integers, got {short(v)}", src)
    for i, x in enumerate(v):
        _expect(_is_int(x) and x >= 0, f"{key}[{i}]", f"must be a non-negative integer, got {short(x)}", src)
    if length is not None:
        _expect(len(v) == length, key, f"must have {length} entries, got {len(v)}", src)
    return tuple(v)


# The marker `flashar-adapt inspect` writes where it cannot infer a value.
TODO = "TODO"


def _todo_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys (list items as key[i]) whose value is still the draft's TODO marker."""
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _todo_keys(v, f"{prefix}.{key}" if prefix else str(key))]
    if isinstance(node, list):
        return [k for i, v in enumerate(node) for k in _todo_keys(v, f"{prefix}[{i}]")]
    return [prefix] if node == TODO else []


def recipe_from_dict(data: Any, source: str | None = None) -> Recipe:
    """Validate a parsed YAML mapping and build a ``Recipe``: the keys first, then each
    section by its own function, so an error names the first key that is wrong."""
    src = source
    _expect(isinstance(data, dict), "<root>", f"a recipe must be a mapping, got {type(data).__name__}", src)
    _check_keys(data, src)
    name = data["name"]
    _expect(isinstance(name, str) and name, "name", f"must be a non-empty string, got {short(name)}", src)
    backend = data["backend"]
    _expect(isinstance(backend, str) and backend, "backend", f"must be a non-empty string, got {short(backend)}", src)
    desc = data.get("description", "")
    _expect(isinstance(desc, str), "description", "must be a string", src)
    match = data.get("match", {}) or {}
    _expect(isinstance(match, dict), "match", f"must be a mapping, got {short(match)}", src)
    modules, cond = Modules.parse(data["modules"], src), Condition.parse(data["condition"], src)
    image = Image.parse(data["image"], src)
    return Recipe(name=name, backend=backend, modules=modules, condition=cond, image=image,
                  flashar=FlashAR.parse(data.get("flashar", {}) or {}, src), lora=LoRA.parse(data.get("lora", {}) or {}, src),
                  logits=Logits.parse(data.get("logits", {}) or {}, src), description=desc, match=match,
                  tokenizer=Tokenizer.parse(data.get("tokenizer"), image, src), source=source)


def _check_keys(data: dict, src) -> None:
    """Every TODO, unknown and missing key, section by section."""
    todo = _todo_keys(data)
    # Every TODO at once, whatever its type (a TODO name or backend would pass the type checks).
    _expect(not todo, todo[0] if todo else "", f"is still {TODO!r}; fill in every TODO the draft marks: "
                                               f"{', '.join(todo)}", src)
    k = first_unknown(data, _TOP_KEYS)
    _expect(k is None, str(k), "unknown key" + did_you_mean(str(k), _TOP_KEYS), src)
    for k in sorted(_TOP_REQUIRED):
        _expect(k in data, k, "is required", src)
    for sec in _SECTIONS:
        if sec in data:
            _expect(isinstance(data[sec], dict), sec, f"must be a mapping, got {short(data[sec])}", src)
    for sec, (cls, required) in _SECTIONS.items():
        allowed = {f.name for f in dataclasses.fields(cls)}
        k = first_unknown(data.get(sec, {}) or {}, allowed)
        _expect(k is None, f"{sec}.{k}", "unknown key" + did_you_mean(str(k), allowed), src)
        for k in sorted(required):
            _expect(k in (data.get(sec) or {}), f"{sec}.{k}", "is required", src)


def _floats(t: dict, name: str, n: int, default, src) -> tuple[float, ...]:
    v = t.get(name, default)
    ok = isinstance(v, (list, tuple)) and len(v) == n and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
    _expect(ok, f"tokenizer.{name}", f"must be a list of {n} numbers (one per channel), got {short(v)}", src)
    return tuple(float(x) for x in v)


# Bounds on lora.targets: each is a regex matched against every module name of the model.
MAX_GATE_HIDDEN = 65536
MAX_PATTERN_LEN = 200
MAX_PATTERN_REPEATS = 3


def regex_problem(pattern: str) -> str | None:
    """Why ``pattern`` is refused as a module-name regex, or None. It must compile, be at most
    MAX_PATTERN_LEN characters, hold at most MAX_PATTERN_REPEATS repeats (``+``, ``*``,
    ``{m,n}``), and never repeat something that itself holds a repeat, an alternation or a
    back-reference: those are the patterns whose matching time explodes with the name length
    (``(?:[a-z0-9_.]+)+X``)."""
    if len(pattern) > MAX_PATTERN_LEN:
        return f"is longer than {MAX_PATTERN_LEN} characters"
    try:
        re.compile(pattern)
    except re.error as e:
        return f"is not a valid regular expression ({e})"
    repeats = 0

    def walk(items, under_repeat: bool) -> str | None:
        nonlocal repeats
        for op, av in items:
            name = str(op)
            if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
                lo, hi, body = av
                if hi > 1:
                    if under_repeat:
                        return "repeats a group that holds a repeat (nested quantifiers backtrack exponentially)"
                    repeats += 1
                    bad = walk(body, True)
                else:
                    bad = walk(body, under_repeat)
            elif name == "BRANCH":
                if under_repeat:
                    return "repeats an alternation (backtracks exponentially); list the names as separate targets"
                bad = next((b for b in (walk(br, under_repeat) for br in av[1]) if b), None)
            elif name in ("GROUPREF", "GROUPREF_EXISTS"):
                return "uses a back-reference"
            elif name == "SUBPATTERN":
                bad = walk(av[-1], under_repeat)
            elif name in ("ATOMIC_GROUP",):
                bad = walk(av, under_repeat)
            elif name in ("ASSERT", "ASSERT_NOT"):
                bad = walk(av[1], under_repeat)
            else:
                bad = None
            if bad:
                return bad
        return None

    try:
        from re import _parser as sre_parse  # the stdlib's own regex parser (3.11+)
    except ImportError:
        import sre_parse  # type: ignore[no-redef]
    bad = walk(sre_parse.parse(pattern), False)
    if bad:
        return bad
    if repeats > MAX_PATTERN_REPEATS:
        return f"holds {repeats} repeats; at most {MAX_PATTERN_REPEATS} keep matching time bounded"
    return None


# ---------------------------------------------------------------- YAML

MAX_YAML_BYTES = 1 << 20


class _Loader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader (same constructors: plain data only) that refuses an alias
    to a mapping or a list, since a few such aliases expand a 1 KB file into gigabytes
    ("billion laughs"), and reads ``5e-5`` as a number, as YAML 1.2 does (YAML 1.1 needs a dot)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            ev = self.peek_event()
            node = self.anchors.get(ev.anchor)
            if node is not None and not isinstance(node, yaml.ScalarNode):
                raise yaml.composer.ComposerError(None, None, f"alias *{ev.anchor} repeats a mapping or list; "
                                                  "aliases that expand are refused (write the value out)", ev.start_mark)
        return super().compose_node(parent, index)


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
                              list("-+0123456789."))


def safe_yaml(data: bytes | str, source: str | None = None) -> Any:
    """Parse YAML text from a file we did not write: UTF-8, at most MAX_YAML_BYTES, plain data
    only (as ``yaml.safe_load``), no aliases that expand. Errors are a RecipeError (key ``<yaml>``)."""
    if isinstance(data, bytes):
        if len(data) > MAX_YAML_BYTES:
            raise RecipeError("<yaml>", f"file is {len(data)} bytes; more than {MAX_YAML_BYTES} is refused", source)
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise RecipeError("<yaml>", f"is not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})", source) from None
    loader = _Loader(data)
    try:
        return loader.get_single_data()
    except yaml.YAMLError as e:
        raise RecipeError("<yaml>", "not valid YAML: " + " ".join(str(e).split()), source) from None
    finally:
        loader.dispose()


# ---------------------------------------------------------------- registry

def _search_dirs(extra: list[str | os.PathLike] | None = None) -> list[Path]:
    dirs = [Path(p) for p in (extra or [])]
    env = os.environ.get(ENV_RECIPE_PATH, "")
    dirs += [Path(p) for p in env.split(os.pathsep) if p]
    dirs += _entry_point_dirs()
    dirs.append(Path(str(resources.files("flashar_adapt.recipes"))))
    return dirs


def _entry_point_dirs() -> list[Path]:
    """Recipe folders that installed packages register under the entry-point group
    ``flashar_adapt.recipes``: each entry point resolves to a folder path (str / PathLike /
    importlib Traversable) or to a callable returning one. A broken entry point is skipped
    with a warning, never fatal: one bad plugin must not hide every other recipe."""
    import warnings
    from importlib.metadata import entry_points

    out: list[Path] = []
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            obj = ep.load()
            if callable(obj) and not isinstance(obj, (str, os.PathLike)):
                obj = obj()
            out.append(Path(str(obj)))
        except Exception as e:  # noqa: BLE001 - a plugin's failure is reported, not raised
            warnings.warn(f"recipe entry point {ep.name!r} ({ep.value}) failed: {e}", stacklevel=2)
    return out


@dataclass(frozen=True)
class RecipeFile:
    """One recipe on the search path. ``name`` is the registry name (the file stem);
    ``rank`` is the position of its folder on the search path (0 = searched first)."""
    name: str
    path: Path
    rank: int


def recipe_files(extra_dirs: list[str | os.PathLike] | None = None) -> list[RecipeFile]:
    """Every recipe file on the search path; a name in an earlier folder hides a later one."""
    out: list[RecipeFile] = []
    seen: set[str] = set()
    for rank, d in enumerate(_search_dirs(extra_dirs)):
        if d.is_dir():
            for p in sorted(d.glob("*.yaml")):
                if p.stem not in seen:
                    seen.add(p.stem)
                    out.append(RecipeFile(p.stem, p, rank))
    return out


def list_recipes(extra_dirs: list[str | os.PathLike] | None = None) -> list[str]:
    """Names of every recipe on the search path (user folders first, then the shipped ones)."""
    return [f.name for f in recipe_files(extra_dirs)]


def _declared_name(path: Path) -> Any:
    try:  # a broken file elsewhere on the path must not break looking up other names
        data = safe_yaml(path.read_bytes(), str(path))
    except (OSError, RecipeError):
        return None
    return data.get("name") if isinstance(data, dict) else None


def load_recipe(name_or_path: str | os.PathLike | Recipe, extra_dirs: list[str | os.PathLike] | None = None) -> Recipe:
    """Load a recipe by registry name or from a YAML file path.

    A registry name is a file stem on the search path or, failing that, the ``name:`` a
    recipe there declares. A folder is never a recipe: ``"my-gpt2"`` beside a model folder
    ``./my-gpt2`` still means the recipe of that name."""
    if isinstance(name_or_path, Recipe):
        return name_or_path
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise RecipeError("<file>", f"recipe file {str(p)!r} does not exist")
        return _load_file(p)
    files = recipe_files(extra_dirs)
    for f in files:
        if f.name == str(name_or_path):
            return _load_file(f.path)
    for f in files:
        if _declared_name(f.path) == str(name_or_path):
            return _load_file(f.path)
    names = [f.name for f in files]
    hint = ""
    for suffix in (".yaml", ".yml"):
        if p.with_name(p.name + suffix).is_file():
            hint = (f"; {str(p) + suffix!r} is a file here but not on the search path: pass that path, or put its "
                    f"folder on {ENV_RECIPE_PATH} / extra_dirs")
    raise RecipeError("<name>", f"no recipe named {str(name_or_path)!r}{did_you_mean(str(name_or_path), names)}{hint}; "
                      f"known: {', '.join(names)}")


def _load_file(path: Path) -> Recipe:
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise RecipeError("<file>", f"cannot read: {e.strerror or e}", str(path)) from None
    return recipe_from_dict(safe_yaml(raw, str(path)), source=str(path))
