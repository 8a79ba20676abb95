"""Image tokenizers behind one small interface, found through a recipe's ``tokenizer:`` section.

Every tokenizer maps pixels to this model's codes and back::

    codes  = tok.encode(images)   # float [N, C, H, W] in [0, 1] at tok.image_size -> long [N, h, w]
    images = tok.decode(codes)    # long [N, h, w] -> float [N, C, H, W] in [0, 1]

A kind is a factory ``(spec, model, root) -> ImageTokenizer``; ``spec`` is the recipe's
Tokenizer section, ``model`` the (optional) model whose checkpoint carries the VQ module,
``root`` the folder relative checkpoint paths start from. Kinds are plugins
(``flashar_adapt.plugins``): entry points of the group ``flashar_adapt.tokenizers`` (the
shipped integrations and the Fashion-MNIST demo declare theirs in ``pyproject.toml``), or
factories registered in-process with ``@register_tokenizer("kind")``. The kind
``color-clusters`` (one code per pixel: the nearest of K colours, a palette read from a
safetensors or a JSON file) lives here because it needs no family code.
"""

from __future__ import annotations

import dataclasses
import json
import os
import weakref
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from .context import context
from .errors import InputError
from .plugins import TOKENIZERS, MissingDependency, Registry
from .recipe import Recipe, RecipeError, Tokenizer, load_recipe
from .validate import did_you_mean

REGISTRY = Registry(TOKENIZERS, "tokenizer kind")


class TokenizerError(InputError):
    """A tokenizer cannot be built, or its input does not fit it."""


class ImageTokenizer:
    """Base class. Subclasses set the attributes and implement ``_encode`` / ``_decode``.

    ``exact_roundtrip`` is True when the quantiser guarantees encode(decode(c)) == c (the
    decoder's output for a code is that code's own centroid); a learned VQ decoder gives no
    such guarantee."""

    codebook_size: int
    grid: tuple[int, int]
    image_size: tuple[int, int]
    channels: int = 3
    exact_roundtrip: bool = False

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        images = torch.as_tensor(images)
        want = (self.channels, *self.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != want:
            raise TokenizerError(
                f"images must be [N, {want[0]}, {want[1]}, {want[2]}] (pixels in [0, 1]), got {tuple(images.shape)}"
            )
        if not images.is_floating_point():
            raise TokenizerError(f"images must be float in [0, 1], got {images.dtype}")
        with torch.no_grad():
            codes = self._encode(images.float())
        return codes.long().view(images.shape[0], *self.grid)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        try:
            codes = torch.as_tensor(codes)
        except (TypeError, ValueError, RuntimeError):
            raise TokenizerError(f"codes must be integer code ids [N, h, w], got {type(codes).__name__}") from None
        if codes.is_meta or codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise TokenizerError(
                f"codes must be integer code ids [N, h, w], got a {codes.dtype} tensor on {codes.device}"
            )
        if codes.dim() != 3 or tuple(codes.shape[1:]) != self.grid:
            raise TokenizerError(f"codes must be [N, {self.grid[0]}, {self.grid[1]}], got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise TokenizerError(
                f"codes must lie in [0, {self.codebook_size}), got [{int(codes.min())}, {int(codes.max())}]"
            )
        with torch.no_grad():
            return self._decode(codes.long()).float().clamp(0, 1)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _decode(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def normalize(images: torch.Tensor, spec: Tokenizer) -> torch.Tensor:
    """Pixels in [0, 1] -> the tokenizer's input range, (x - mean) / std per channel."""
    mean = torch.tensor(spec.mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean) / std


def denormalize(x: torch.Tensor, spec: Tokenizer) -> torch.Tensor:
    mean = torch.tensor(spec.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(spec.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return x * std + mean


# ---------------------------------------------------------------- registry


def register_tokenizer(kind: str):
    """Decorator: make a factory ``(spec, model, root) -> ImageTokenizer`` available as ``kind``
    (a kind already taken by another factory is an error)."""

    def deco(fn):
        return REGISTRY.register(kind, fn)

    return deco


def list_tokenizers() -> list[str]:
    """Every usable tokenizer kind."""
    return REGISTRY.names()


def resolve_checkpoint(spec: Tokenizer, root: str | os.PathLike | None) -> Path | None:
    """The tokenizer's weights file: absolute, or relative to ``root``; None when unset."""
    if not spec.checkpoint:
        return None
    p = Path(spec.checkpoint).expanduser()
    if not p.is_absolute() and root is not None:
        p = Path(root) / p
    if not p.is_file():
        raise TokenizerError(f"tokenizer.checkpoint: {str(p)!r} does not exist")
    return p


def load_tokenizer(
    recipe: Recipe | str,
    model: nn.Module | None = None,
    *,
    checkpoint: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
) -> ImageTokenizer:
    """Build the tokenizer a recipe names and check it agrees with the recipe's grid and codebook.

    ``checkpoint`` overrides ``tokenizer.checkpoint``; ``root`` is where a relative checkpoint
    path starts (default: the recipe file's folder); ``model`` is needed by kinds whose VQ
    module lives in the model's own checkpoint."""
    recipe = load_recipe(recipe)
    spec = recipe.tokenizer
    if spec is None:
        raise RecipeError(
            "tokenizer",
            f"recipe {recipe.name!r} has no tokenizer section: images cannot be encoded "
            "or decoded (add one, see docs/writing-a-recipe.md)",
            recipe.source,
        )
    if checkpoint is not None:
        recipe = recipe.replace(**{"tokenizer.checkpoint": str(Path(checkpoint).resolve())})
        spec = recipe.tokenizer
    if root is None and recipe.source:
        root = Path(recipe.source).parent
    try:
        factory = REGISTRY.get(spec.kind)
    except MissingDependency as e:
        raise RecipeError("tokenizer.kind", str(e), recipe.source) from None
    if factory is None:
        known = list_tokenizers()
        raise RecipeError(
            "tokenizer.kind",
            f"unknown tokenizer kind {spec.kind!r}{did_you_mean(spec.kind, known)}; known: {', '.join(known)}",
            recipe.source,
        )
    if spec.downsample is None and spec.image_size is None:
        spec = _with_size(spec, recipe, 1)
    elif spec.image_size is None:
        spec = _with_size(spec, recipe, spec.downsample)
    tok = factory(spec, model, root)
    check_fits(tok, recipe)
    return tok


def _with_size(spec: Tokenizer, recipe: Recipe, down: int) -> Tokenizer:
    g = recipe.image.grid
    return dataclasses.replace(spec, image_size=(g[0] * down, g[1] * down))


def check_fits(tok: ImageTokenizer, recipe: Recipe) -> None:
    """A tokenizer whose grid or codebook disagrees with the recipe is refused, naming both."""
    if tuple(tok.grid) != tuple(recipe.image.grid):
        raise RecipeError(
            "tokenizer",
            f"the tokenizer makes a {tok.grid[0]}x{tok.grid[1]} grid of codes from "
            f"{tok.image_size[0]}x{tok.image_size[1]} images, but image.grid is {list(recipe.image.grid)}",
            recipe.source,
        )
    if tok.codebook_size != recipe.image.codebook_size:
        raise RecipeError(
            "tokenizer",
            f"the tokenizer has {tok.codebook_size} codes, but image.codebook_size is {recipe.image.codebook_size}",
            recipe.source,
        )


# ---------------------------------------------------------------- decode_images

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> (its PatchContext, tokenizer)


def tokenizer_of(model: nn.Module, checkpoint: str | os.PathLike | None = None) -> ImageTokenizer:
    """The tokenizer of a patched model's recipe (built once per model and kept)."""
    ctx = context(model)
    held = _CACHE.get(model)
    if checkpoint is None and held is not None and held[0] is ctx:  # the same patch: a re-patch may name another
        return held[1]
    tok = load_tokenizer(ctx.recipe, model, checkpoint=checkpoint)
    _CACHE[model] = (ctx, tok)
    return tok


def decode_images(model: nn.Module, codes: torch.Tensor, tokenizer: ImageTokenizer | None = None) -> torch.Tensor:
    """Codes [N, h, w] from ``model.generate`` -> images float [N, C, H, W] in [0, 1], with the
    tokenizer the model's recipe names (or the one given)."""
    if tokenizer is not None and not isinstance(tokenizer, ImageTokenizer):
        raise InputError(f"tokenizer must be an ImageTokenizer (fa.load_tokenizer), got {type(tokenizer).__name__}")
    tok = tokenizer or tokenizer_of(model)
    return tok.decode(codes.cpu() if isinstance(codes, torch.Tensor) and not codes.is_meta else codes)


# ---------------------------------------------------------------- colour clusters


class ColorClusters(ImageTokenizer):
    """One code per pixel: the nearest of K colours (squared distance in the normalised space).
    Decoding paints each code's colour, so re-encoding a decoded image returns the same codes
    as long as no two colours coincide."""

    exact_roundtrip = True

    def __init__(self, clusters: torch.Tensor, spec: Tokenizer):
        clusters = torch.as_tensor(clusters, dtype=torch.float32)
        if clusters.dim() != 2 or clusters.shape[1] != spec.channels:
            raise TokenizerError(f"colour clusters must be [K, {spec.channels}], got {tuple(clusters.shape)}")
        if spec.downsample not in (None, 1):
            raise TokenizerError(
                f"color-clusters has one code per pixel: tokenizer.downsample must be 1, got {spec.downsample}"
            )
        self.clusters, self.spec = clusters, spec
        self.codebook_size, self.channels = clusters.shape[0], spec.channels
        self.image_size = tuple(spec.image_size)
        self.grid = self.image_size

    def _encode(self, images):
        x = normalize(images, self.spec).permute(0, 2, 3, 1).reshape(-1, self.channels)
        d = (x * x).sum(1, keepdim=True) - 2 * x @ self.clusters.T + (self.clusters**2).sum(1)[None]
        return d.argmin(1)

    def _decode(self, codes):
        x = self.clusters[codes].permute(0, 3, 1, 2)
        return denormalize(x, self.spec)


@register_tokenizer("color-clusters")
def _color_clusters(spec: Tokenizer, model, root) -> ColorClusters:
    path = resolve_checkpoint(spec, root)
    if path is None:
        raise TokenizerError(
            "tokenizer.checkpoint: color-clusters needs the palette file (safetensors with "
            "'clusters' [K, C], or a JSON file with a 'clusters' list)"
        )
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{path}: not valid JSON: {e}") from None
        if not isinstance(data, dict) or "clusters" not in data:
            raise TokenizerError(f"{path}: no 'clusters' list in it")
        clusters = torch.tensor(data["clusters"], dtype=torch.float32)
    else:
        try:
            clusters = load_file(str(path))["clusters"]
        except Exception as e:  # noqa: BLE001 - safetensors raises several types for bad files
            raise TokenizerError(f"{path}: not a safetensors file with 'clusters' ({e})") from None
    return ColorClusters(clusters, spec)
