"""The patch context: what patch() resolved from the recipe, and the per-model guard that
keeps generation calls on one model from corrupting each other.

Both ``patching`` (which builds the context) and ``decoding`` (which runs it) import this
module; neither imports the other's internals.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .errors import InputError
from .grid import Layout
from .heads import FlashARModules
from .recipe import Recipe
from .runners import Runner


class ModelGuard:
    """Serialises the FlashAR forwards of one patched model across threads.

    A patched model keeps per-call state on itself (static KV caches on LlamaGen's attention
    modules, the branch layer's input capture), so two calls at once would mix their state.
    Calls from different threads therefore wait for each other (each one's result equals a
    sequential run); a call from the thread that already runs one (a hook that generates
    inside a forward) raises instead of deadlocking. ``epoch`` counts prefills: a decoder
    state whose caches a later prefill reused knows it is stale. ``unpatch`` holds the guard
    while it takes the model apart and then closes it: a call that waited for it raises
    instead of running on a model that is no longer patched. A deep copy gets a fresh
    guard (locks cannot be copied, and the copy has caches of its own)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._owner: int | None = None
        self.epoch = 0
        self.closed = False

    def __deepcopy__(self, memo):
        return ModelGuard()

    def __enter__(self):
        me = threading.get_ident()
        if self._owner == me:
            raise RuntimeError(
                "re-entrant FlashAR call: this thread is already inside a generate/logits/step call "
                "on this model (e.g. from a forward hook); use a copy.deepcopy of the model instead"
            )
        self._lock.acquire()
        if self.closed:
            self._lock.release()
            raise RuntimeError(
                "this model's patch was removed (fa.unpatch): a decoder state of that patch cannot step any more, "
                "and a call that waited for the model finds it unpatched; patch it again and prefill again"
            )
        self._owner = me
        return self

    def __exit__(self, *exc):
        self._owner = None
        self._lock.release()
        return False


class CaptureSlot(threading.local):
    """Per-thread slot the branch-layer pre-hook writes the layer's inputs into."""

    layer: nn.Module | None = None
    captured: tuple | None = None


CAPTURE = CaptureSlot()


def capture_hook(module, args, kwargs):
    """Forward pre-hook on the backbone's branch layer: record its inputs while a FlashAR
    forward of this very layer asks for them. A plain module-level function that keys on the
    layer object, so a deep-copied model (whose copied layer carries this same hook) captures
    into its own forwards, never into the original's."""
    if CAPTURE.layer is module:
        CAPTURE.captured = (args, kwargs)


@dataclass
class PatchContext:
    """What patch() resolved from the recipe; kept on ``model.flashar.ctx``."""

    recipe: Recipe
    runner: Runner
    model: Any = field(repr=False)
    decoder: nn.Module = field(repr=False)
    layers: nn.ModuleList = field(repr=False)
    norm: nn.Module = field(repr=False)
    head: nn.Module = field(repr=False)
    embed: nn.Module = field(repr=False)
    image_embed: list = field(repr=False)
    cond_embed: nn.Module | None = field(repr=False)
    uncond_features: torch.Tensor | None = field(repr=False)
    branch_index: int
    dim: int
    vocab_size: int | None
    after_norm: list = field(default_factory=list, repr=False)
    hook_id: int | None = None
    gradient_checkpointing: bool = False  # runners that run their own layer loop honour it
    had_generate: bool = False
    old_generate: Any = field(default=None, repr=False)
    guard: ModelGuard = field(default_factory=ModelGuard, repr=False)
    # names of the LoRA layers FlashAR added (training.add_lora): unpatch removes exactly these
    adapter_layers: list = field(default_factory=list, repr=False)
    merged_adapters: int = 0  # of those, how many an export merged into the base weights

    @property
    def flashar(self) -> FlashARModules:
        return self.model.flashar

    def layout(self, prefix_len: int, grid: tuple[int, int], before_grids: tuple = ()) -> Layout:
        """The layout of ``grid`` after a prefix of ``prefix_len`` slots, whose last cells are
        those of ``before_grids`` (a preview grid already decoded), positioned by the recipe's rule."""
        r = self.recipe
        return Layout(prefix_len, grid[0], grid[1], r.eol, r.eol_last, r.image.positions, tuple(before_grids))

    def preview_grid(self, grid: tuple[int, int]) -> tuple[int, int] | None:
        """The grid decoded before ``grid`` (the recipe's preview), or None."""
        return self.recipe.image.preview(grid)

    def meta_ids(self, grid: tuple[int, int]) -> list[int]:
        """Forced tokens between the condition and the first code, for this grid."""
        im = self.recipe.image
        out: list[int] = []
        for item in im.before:
            if item in ("{H}", "{W}"):
                value = grid[0] if item == "{H}" else grid[1]
                out += [im.digit_ids[int(c)] for c in str(value)]
            elif item in ("{size_H}", "{size_W}"):
                value = grid[0] if item == "{size_H}" else grid[1]
                if value % im.size_token_divisor:
                    raise InputError(
                        f"grid {list(grid)} is not a multiple of image.size_token_divisor "
                        f"({im.size_token_divisor}) of recipe {self.recipe.name!r}"
                    )
                out.append(im.size_token_offset + value // im.size_token_divisor)
            else:
                out.append(int(item))
        return out

    def device(self) -> torch.device:
        return next(self.layers.parameters()).device


def check_not_meta(model: nn.Module) -> None:
    """A model built on the meta device has shapes and no values: nothing can run on it."""
    name = next((n for n, t in (*model.named_parameters(), *model.named_buffers()) if t.is_meta), None)
    if name is not None:
        raise InputError(
            f"the model's {name} is on the meta device (a shape, no values): load the weights first "
            "(model.to_empty(device=...) then load_state_dict, or load_state_dict(..., assign=True))"
        )


def context(model: nn.Module) -> PatchContext:
    """The PatchContext of a patched model; RuntimeError if it is not patched."""
    mods = getattr(model, "flashar", None)
    if not isinstance(mods, FlashARModules) or mods.ctx is None:
        raise RuntimeError("model is not patched with FlashAR; call flashar_adapt.patch(model, recipe) first")
    return mods.ctx
