"""The sections of a recipe, each a frozen dataclass whose fields declare the rule their YAML
value obeys (``validate.rule``). ``parse`` checks a section's mapping against those rules
(``first_problem``: the first wrong key, named), then what ties fields together, and builds
the section; a value the YAML leaves out (or sets to null) takes the field's default.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from typing import Any, Literal, get_args

from ..errors import FlashARError
from ..validate import (
    AnyOf,
    Is,
    Named,
    Num,
    OneOf,
    Seq,
    Text,
    dataclass_rules,
    did_you_mean,
    first_problem,
    first_unknown,
    required,
    rule,
    short,
)
from .patterns import regex_problem


class RecipeError(FlashARError, ValueError):
    """A recipe is malformed or does not fit the model. ``key`` is the dotted YAML key."""

    def __init__(self, key: str, message: str, source: str | None = None):
        self.key = key
        self.source = source
        where = f"{source}: " if source else ""
        super().__init__(f"{where}{key}: {message}")


def expect(cond: bool, key: str, msg: str, src: str | None) -> None:
    """Raise a RecipeError naming ``key`` unless ``cond``."""
    if not cond:
        raise RecipeError(key, msg, src)


def checked(cls, data: dict, section: str, src, rules: dict | None = None) -> dict:
    """``data`` checked against the rules of ``cls``'s fields (or ``rules``), with the values
    left out or null dropped so that the dataclass defaults apply."""
    bad = first_problem(data, dataclass_rules(cls) if rules is None else rules, f"{section}." if section else "")
    if bad:
        raise RecipeError(bad[0], bad[1], src)
    return {k: v for k, v in data.items() if v is not None}


def required_fields(cls) -> set[str]:
    """The fields of a section without a default: the keys its YAML must give."""
    return {
        f.name
        for f in dataclasses.fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    }


_INT = Num(integer=True, optional=True)
_ID = Num(0, integer=True, optional=True)  # a token id, or a count that may be 0
_COUNT = Num(1, integer=True, optional=True)
_PATH = Text(optional=True)  # a module path inside the model ("" is the model itself)
_PATHS = Named(
    AnyOf((Text(), Seq(Text())), "a module path or a list of them", optional=True), "a module path or a list of them"
)
_IDS = Seq(Num(0, integer=True), optional=True)
_GRID = Named(Seq(Num(1, integer=True), length=2, optional=True), "[H, W] with positive integers")


def _paths(v) -> tuple[str, ...]:
    return (v,) if isinstance(v, str) else tuple(v)


@dataclass(frozen=True)
class Modules:
    layers: str = rule(Text())
    norm: str = rule(Text())
    head: str = rule(Text())
    embed: str = rule(Text())
    decoder: str = rule(_PATH, default="")
    image_embed: tuple[str, ...] = rule(_PATHS, default=())
    after_norm: tuple[str, ...] = rule(
        _PATHS, default=()
    )  # applied in order between norm and head (a projection the decoder ends with)

    @classmethod
    def parse(cls, m: dict, src) -> Modules:
        kw = checked(cls, m, "modules", src)
        if not kw.get("after_norm"):  # after_norm: "" is no projection (never the model itself)
            kw.pop("after_norm", None)
        for k in ("image_embed", "after_norm"):
            if k in kw:
                kw[k] = _paths(kw[k])
        return cls(**kw)


ConditionKind = Literal["class", "tokens", "features"]
Uncond = Literal["null_class", "pad_inner", "ids", "param", "none"]
# How each kind builds its CFG unconditional prefix; the first is the default.
UNCOND_BY_KIND: dict[str, tuple[str, ...]] = {
    "class": ("null_class", "none"),
    "tokens": ("none", "pad_inner", "ids"),
    "features": ("none", "param"),
}


@dataclass(frozen=True)
class Condition:
    kind: ConditionKind = rule(OneOf(get_args(ConditionKind)))
    embedding: str | None = rule(_PATH, default=None)
    num_classes: int | None = rule(_COUNT, default=None)
    null_class: int | None = rule(_ID, default=None)
    prefix_len: int | None = rule(_COUNT, default=None)
    pad_id: int | None = rule(_ID, default=None)
    uncond: Uncond = "none"  # which ones a kind allows, the first its default: UNCOND_BY_KIND
    uncond_ids: tuple[int, ...] = rule(_IDS, default=())
    uncond_features: str | None = rule(_PATH, default=None)
    # whether the forced image.before tokens follow the unconditional prefix too (true: the
    # header closes both branches; false: the unconditional prompt alone, as Emu3's model card)
    uncond_before: bool = rule(Is((bool,), "true or false", optional=True), default=True)

    @staticmethod
    def needs(kind: str, uncond: str) -> set[str]:
        """The keys a condition of this kind and unconditional rule must give."""
        need = {"embedding"} if kind != "tokens" else set()
        need |= {"prefix_len"} if kind != "tokens" else set()
        need |= {"num_classes"} if kind == "class" else set()
        need |= {"null_class"} if (kind, uncond) == ("class", "null_class") else set()
        need |= {"pad_id"} if (kind, uncond) == ("tokens", "pad_inner") else set()
        need |= {"uncond_features"} if (kind, uncond) == ("features", "param") else set()
        return need

    @classmethod
    def parse(cls, c: dict, src) -> Condition:
        kind = c.get("kind")
        kinds = get_args(ConditionKind)
        expect(kind in kinds, "condition.kind", f"must be one of {', '.join(map(repr, kinds))}, got {short(kind)}", src)
        allowed_uncond = UNCOND_BY_KIND[kind]
        uncond = c.get("uncond", allowed_uncond[0])
        expect(
            uncond in allowed_uncond,
            "condition.uncond",
            f"must be one of {list(allowed_uncond)} for kind {kind!r}, got {short(uncond)}",
            src,
        )
        rules = dataclass_rules(cls)
        rules.pop("kind")
        for k in cls.needs(kind, uncond):
            rules[k] = required(rules[k])
        kw = checked(cls, c, "condition", src, rules)
        cond = cls(**{**kw, "uncond": uncond, "uncond_ids": tuple(kw.get("uncond_ids", ()))})
        if kind == "tokens" and uncond == "ids":
            expect(len(cond.uncond_ids) > 0, "condition.uncond_ids", "is required when condition.uncond is 'ids'", src)
        if kind == "class" and cond.null_class is not None:
            # inside the real classes, guidance would steer a class against itself and class
            # dropout would relabel real examples
            expect(
                cond.null_class >= cond.num_classes,
                "condition.null_class",
                f"must be outside the real classes 0..{cond.num_classes - 1} (the unconditional row; "
                f"LlamaGen's is num_classes = {cond.num_classes}), got {cond.null_class}",
                src,
            )
        return cond


# Placeholders allowed in image.before: "{H}"/"{W}" spell the number with image.digit_ids;
# "{size_H}"/"{size_W}" are one token, image.size_token_offset + H (or W) // image.size_token_divisor.
GRID_ITEMS = ("{H}", "{W}", "{size_H}", "{size_W}")
_BEFORE_ITEM = AnyOf(
    (Num(0, integer=True), OneOf(GRID_ITEMS)), f"a token id or one of {', '.join(repr(g) for g in GRID_ITEMS)}"
)


# How image tokens are positioned (grid.Layout.position_table): "sequence", one axis, slot s at
# s (the default); "grid", three axes (t, h, w): prompt token s at (s, s, s), cell (r, c) of a
# grid starting at P at (P, P + r, P + c), the next grid starting at P + max(h, w).
POSITION_RULES = ("sequence", "grid")


@dataclass(frozen=True)
class Image:
    codebook_size: int = rule(Num(2, integer=True))
    grid: tuple[int, int] = rule(required(_GRID))
    visual_token_offset: int = rule(_ID, default=0)
    variable_grid: bool = rule(Is((bool,), "true or false", optional=True), default=False)
    before: tuple[Any, ...] = rule(Seq(_BEFORE_ITEM, optional=True), default=())
    digit_ids: tuple[int, ...] = rule(_IDS, default=())
    eol_token: int | None = rule(_ID, default=None)
    # "{size_H}" / "{size_W}" in before = this + H (or W) // size_token_divisor
    size_token_offset: int | None = rule(_ID, default=None)
    size_token_divisor: int = rule(_COUNT, default=1)
    # id after the last code in place of the last row's eol_token (end-of-image)
    last_row_end: int | None = rule(_ID, default=None)
    positions: str = rule(AnyOf((OneOf(POSITION_RULES),), "'sequence' or 'grid'", optional=True), default="sequence")
    # a preview grid decoded (raster) before the main grid, which is conditioned on it: given
    # as [h, w], or as a side s with h = int(sqrt(H / W) * s), w = int(sqrt(W / H) * s)
    preview_grid: tuple[int, int] | None = rule(_GRID, default=None)
    preview_side: int | None = rule(_COUNT, default=None)

    def preview(self, grid: tuple[int, int]) -> tuple[int, int] | None:
        """The preview grid (h, w) decoded before the main ``grid`` (H, W), or None."""
        if self.preview_grid is not None:
            return self.preview_grid
        if self.preview_side is None:
            return None
        ratio = grid[0] / grid[1]  # in floats, then truncated: as the processors that define this rule do
        return max(1, int(math.sqrt(ratio) * self.preview_side)), max(1, int(math.sqrt(1 / ratio) * self.preview_side))

    @classmethod
    def parse(cls, im: dict, src) -> Image:
        kw = checked(cls, im, "image", src)
        expect(
            kw.get("preview_grid") is None or kw.get("preview_side") is None,
            "image.preview_side",
            "give the preview as image.preview_grid or as image.preview_side, not both",
            src,
        )
        if kw.get("preview_grid") is not None:
            kw["preview_grid"] = tuple(int(g) for g in kw["preview_grid"])
        expect(
            kw.get("positions", "sequence") == "sequence" or kw.get("eol_token") is None,
            "image.positions",
            "grid positions place cells by (row, column): a grid with end-of-line tokens (image.eol_token) "
            "needs positions: sequence",
            src,
        )
        grid, before = tuple(int(g) for g in kw["grid"]), tuple(kw.get("before", ()))
        digits = tuple(kw.get("digit_ids", ()))
        if any(item in ("{H}", "{W}") for item in before):
            expect(
                len(digits) == 10,
                "image.digit_ids",
                "must list the 10 token ids of '0'..'9' when image.before uses {H} or {W}",
                src,
            )
        if any(item in ("{size_H}", "{size_W}") for item in before):
            expect(
                kw.get("size_token_offset") is not None,
                "image.size_token_offset",
                "is required when image.before uses {size_H} or {size_W}",
                src,
            )
        div = kw.get("size_token_divisor", 1)
        if div > 1:
            expect(
                all(g % div == 0 for g in grid),
                "image.grid",
                f"{list(grid)} must be divisible by image.size_token_divisor ({div})",
                src,
            )
        if kw.get("last_row_end") is not None:
            expect(
                kw.get("eol_token") is not None,
                "image.last_row_end",
                "takes the place of the last row's image.eol_token, so it needs image.eol_token",
                src,
            )
        return cls(**{**kw, "grid": grid, "before": before, "digit_ids": digits})

    def special_ids(self) -> dict[str, list[int]]:
        """The token ids the recipe places beside the codes, by key: none may be a code's id
        when the codes share the vocabulary (a decoder could not tell them apart)."""
        sizes = []
        if self.size_token_offset is not None:
            sizes = [self.size_token_offset + g // self.size_token_divisor for g in self.grid]
        return {
            "image.before": [x for x in self.before if isinstance(x, int)],
            "image.digit_ids": list(self.digit_ids),
            "image.eol_token": [] if self.eol_token is None else [self.eol_token],
            "image.last_row_end": [] if self.last_row_end is None else [self.last_row_end],
            "image.size_token_offset": sizes,
        }

    def check_special_ids(self, src) -> None:
        """Refuse a special id inside the visual range [visual_token_offset, + codebook_size)."""
        lo, hi = self.visual_token_offset, self.visual_token_offset + self.codebook_size
        for key, ids in self.special_ids().items():
            inside = [i for i in ids if lo <= i < hi]
            expect(
                not inside,
                key,
                f"id {inside[0] if inside else ''} is inside the visual range {lo}..{hi - 1} "
                "(image.visual_token_offset + image.codebook_size): a special token must not be a code",
                src,
            )


MAX_GATE_HIDDEN = 65536


@dataclass(frozen=True)
class FlashAR:
    branch_layer: int = rule(_INT, default=-1)
    branch_depth: int = rule(_COUNT, default=1)
    gate_hidden: int | None = rule(_COUNT, default=None)

    @classmethod
    def parse(cls, f: dict, src) -> FlashAR:
        flash = cls(**checked(cls, f, "flashar", src))
        expect(
            flash.gate_hidden is None or flash.gate_hidden <= MAX_GATE_HIDDEN,
            "flashar.gate_hidden",
            f"must be <= {MAX_GATE_HIDDEN}, got {flash.gate_hidden} (the paper's gate uses max(64, d/8))",
            src,
        )
        return flash


_LOGIT = Num(0, 1e6, lo_open=True, optional=True)


@dataclass(frozen=True)
class Logits:
    """What the model does to its head's output: logits = softcap * tanh(scale * head(h) / softcap)."""

    scale: float = rule(Named(_LOGIT, "a positive number up to 1e6"), default=1.0)
    softcap: float | None = rule(Named(_LOGIT, "a positive number up to 1e6 or null"), default=None)

    @classmethod
    def parse(cls, lg: dict, src) -> Logits:
        kw = checked(cls, lg, "logits", src)
        return cls(**{k: float(v) for k, v in kw.items()})


@dataclass(frozen=True)
class LoRA:
    targets: tuple[str, ...] = rule(Named(Seq(Text(), optional=True), "a list of module-name patterns"), default=())
    r: int = rule(_COUNT, default=16)
    alpha: int = rule(_COUNT, default=32)
    dropout: float = rule(Num(0, 1, hi_open=True, optional=True), default=0.0)

    @classmethod
    def parse(cls, lo: dict, src) -> LoRA:
        kw = checked(cls, lo, "lora", src)
        targets = tuple(kw.get("targets", ()))
        expect(
            "all-linear" not in targets,
            "lora.targets",
            "'all-linear' also matches non-decoder modules (VQ model, vision tower); name the decoder projections",
            src,
        )
        for i, t in enumerate(targets):
            problem = regex_problem(t)
            expect(problem is None, f"lora.targets[{i}]", f"{problem}: {t!r}", src)
        try:
            re.compile("|".join(f"(?:{t})" for t in targets))
        except re.error as e:
            raise RecipeError("lora.targets", f"the patterns do not combine into one regex ({e})", src) from None
        return cls(**{**kw, "targets": targets, "dropout": float(kw.get("dropout", 0.0))})


_CHANNEL_VALUES = Seq(Num(), optional=True)
MAX_CHANNELS = 64  # a default mean/std is built per channel: a huge count is refused, not allocated


@dataclass(frozen=True)
class Tokenizer:
    """Optional ``tokenizer:`` section: which image tokenizer turns pixels into this model's
    codes and back. ``kind`` names a registered tokenizer (flashar_adapt.tokenizers);
    ``image_size`` defaults to image.grid x ``downsample``."""

    kind: str = rule(Text(nonempty=True))
    module: str | None = rule(
        _PATH, default=None
    )  # path of the VQ module inside the model, for tokenizers the checkpoint carries
    checkpoint: str | None = rule(
        Text(optional=True), default=None
    )  # weights file; relative paths are relative to the recipe file
    downsample: int | None = rule(_COUNT, default=None)  # pixels per code, per side
    image_size: tuple[int, int] | None = rule(_GRID, default=None)
    channels: int = rule(Num(1, MAX_CHANNELS, integer=True, optional=True), default=3)
    mean: tuple[float, ...] = rule(
        _CHANNEL_VALUES, default=(0.5, 0.5, 0.5)
    )  # the tokenizer sees (pixels in [0, 1] - mean) / std
    std: tuple[float, ...] = rule(_CHANNEL_VALUES, default=(0.5, 0.5, 0.5))
    config: dict = rule(
        Is((dict,), "a mapping", optional=True), default_factory=dict
    )  # kind-specific constructor arguments

    @classmethod
    def parse(cls, t: Any, image: Image, src) -> Tokenizer | None:
        """The optional ``tokenizer:`` section. A stated image_size must agree with image.grid x
        downsample: a tokenizer whose grid disagrees with the recipe is refused on load."""
        if t is None:
            return None
        expect(isinstance(t, dict), "tokenizer", f"must be a mapping, got {short(t)}", src)
        allowed = {f.name for f in dataclasses.fields(cls)}
        k = first_unknown(t, allowed)
        expect(k is None, f"tokenizer.{k}", "unknown key" + did_you_mean(str(k), allowed), src)
        kw = checked(cls, t, "tokenizer", src)
        down, size = kw.get("downsample"), kw.get("image_size")
        if size is not None:
            size = kw["image_size"] = (int(size[0]), int(size[1]))
            if down is not None:
                want = (image.grid[0] * down, image.grid[1] * down)
                expect(
                    size == want,
                    "tokenizer.image_size",
                    f"{list(size)} gives a {size[0] // down}x{size[1] // down} grid of codes, but image.grid is "
                    f"{list(image.grid)} (image_size must be grid x downsample = {list(want)})",
                    src,
                )
        channels = kw.get("channels", 3)
        for name in ("mean", "std"):
            v = kw.setdefault(name, [0.5] * channels)
            expect(
                len(v) == channels,
                f"tokenizer.{name}",
                f"must be a list of {channels} numbers (one per channel), got {short(v)}",
                src,
            )
            kw[name] = tuple(float(x) for x in v)
        expect(all(s > 0 for s in kw["std"]), "tokenizer.std", f"must be positive, got {list(kw['std'])}", src)
        return cls(**kw)


# The sections a recipe holds beside its name, backend, description and match.
SECTIONS: dict[str, type] = {
    "modules": Modules,
    "condition": Condition,
    "image": Image,
    "flashar": FlashAR,
    "lora": LoRA,
    "logits": Logits,
}
