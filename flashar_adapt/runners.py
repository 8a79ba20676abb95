"""Runners: the little code that knows how to run one kind of decoder stack.

The core decides *what* to run (which tokens, which mask, which cache, which positions);
a runner knows *how* a model family takes those (keyword names, cache objects, mask
format). ``patch`` makes one runner per patched model, named by the recipe's ``backend:``,
and binds it to the model (:meth:`Runner.bind`). Runners are plugins (``flashar_adapt.plugins``):
entry points of the group ``flashar_adapt.runners``, or classes registered in-process with
``@register_runner("name")``.

The contract: ``run``, ``new_cache``, ``new_branch_cache`` and ``branch_call`` are required
(abstract); ``bind``, ``unbind``, ``max_positions`` and ``prepare_branch_layers`` have defaults; what a
runner can do beyond that it declares as class attributes (``static_caches``,
``fused_branch``, ``reference_forward``, ``reference_generation``), and the core asks the attribute, never a method
that might return None.
"""

from __future__ import annotations

import abc
import inspect
from typing import Any, ClassVar

import torch
from torch import nn

from .plugins import RUNNERS, MissingDependency, Registry
from .recipe import RecipeError
from .validate import did_you_mean

REGISTRY = Registry(RUNNERS, "runner")


def register_runner(name: str):
    """Class decorator: make a runner available to recipes as ``backend: <name>`` (a name
    already taken by another class is an error)."""

    def deco(cls):
        if inspect.isabstract(cls):
            raise TypeError(
                f"runner {cls.__qualname__} does not implement {', '.join(sorted(cls.__abstractmethods__))}"
            )
        return REGISTRY.register(name, cls)

    return deco


def get_runner(name: str) -> type[Runner]:
    """The runner class a recipe's ``backend:`` names; RecipeError naming the key if unknown."""
    try:
        cls = REGISTRY.get(name)
    except MissingDependency as e:
        raise RecipeError("backend", str(e)) from None
    if cls is None:
        known = list_runners()
        raise RecipeError("backend", f"unknown backend {name!r}{did_you_mean(name, known)}; known: {', '.join(known)}")
    return cls


def list_runners() -> list[str]:
    """Names of every usable runner (what a recipe's ``backend:`` may say)."""
    return REGISTRY.names()


class Runner(abc.ABC):
    """Runs one patched model's decoder stack; ``ctx`` is that model's PatchContext.

    One instance per patched model: state it keeps between calls (caches it holds for
    compiled decoding, what ``bind`` found out about the model) is declared in ``__init__``."""

    name: ClassVar[str] = ""
    #: ``new_cache``/``new_branch_cache`` take ``static=True`` and ``run`` takes ``entries``:
    #: what ``generate(compile=True)`` needs (see ``run``)
    static_caches: ClassVar[bool] = False
    #: the runner implements ``run_with_branch``: the backbone and the vertical branch in
    #: one pass while decoding, which the core then calls instead of the generic path
    fused_branch: ClassVar[bool] = False
    #: the runner implements ``reference_logits``: the model's own raster forward, which
    #: ``check`` compares the patched raster logits against (otherwise the generic references)
    reference_forward: ClassVar[bool] = False
    #: the runner implements ``reference_generate``: the model's own greedy generation of image
    #: codes, which ``check`` compares the patched greedy raster codes against (before any
    #: reference forward: a model's own forward may position image tokens otherwise than its
    #: own generation does)
    reference_generation: ClassVar[bool] = False

    def bind(self, ctx) -> None:  # noqa: B027 - optional: a runner with nothing to check or configure keeps it
        """Check the model against what this runner needs and configure for it (called once,
        by ``patch``, before the FlashAR modules are attached); raise RecipeError naming the key."""

    def unbind(self, ctx) -> None:  # noqa: B027 - optional, like bind
        """Remove whatever this runner put on the model's own modules (called by ``unpatch``,
        under the model's guard, before the FlashAR modules are removed). Only what the runner
        can prove it put there (it marks it), never something found by name."""

    def max_positions(self, ctx) -> int | None:
        """Longest sequence the model's position scheme supports, or None for unbounded."""
        return None

    @abc.abstractmethod
    def run(
        self,
        ctx,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        key_slots: torch.Tensor,
        allowed: torch.Tensor,
        cache: Any,
        entries: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Run the decoder stack on ``embeds`` [B, T, d].

        positions: position ids by the recipe's rule (``image.positions``), left padding
        removed: [B, T] for ``sequence`` (one axis, the slot index), or [A, B, T] for a rule
        with A axes (``grid``: A = 3, (t, h, w) per token, as M-RoPE models take
        ``position_ids``); a runner hands them to the model as they are. slots [T]:
        sequence indices of the new tokens; key_slots [S]: sequence index of every key the
        attention will see after this call, in cache order (cached keys, then the new
        ones); allowed [B, T, S], or [B, 1, S] when every query sees the same keys: True where
        a query may attend a key. ``cache`` is what new_cache returned, or None for a single
        uncached pass. With a cache, the keys are the cached ones followed by the new ones:
        a runner may fill entries in this order (entries [S-T, S) now) and attend entries
        [0, S), so it never needs a scatter or a mask over unused entries. Returns the final,
        normalised hidden states [B, T, d]. The decoder layers must be called through
        their ``__call__`` so the branch hook sees their inputs.

        Static caches (``new_cache(..., static=True)``, compiled decoding): the call gets
        ``entries=`` [T], a tensor of the cache entries the new tokens are written to;
        attention reads every entry of the cache, ``allowed`` is [B, T, max_len] and
        ``key_slots`` None. Nothing may depend on a per-call Python value (a compiled graph
        would specialise on it). Entries nobody has written yet must hold finite values
        (zeros): a masked key still multiplies its value by zero."""

    @abc.abstractmethod
    def new_cache(self, ctx, batch: int, max_len: int, static: bool = False) -> Any:
        """Caches for one decoding run of ``batch`` sequences of ``max_len`` tokens; with
        ``static`` (only when ``static_caches``) exactly ``max_len`` entries, written by index."""

    @abc.abstractmethod
    def new_branch_cache(self, ctx, batch: int, max_len: int, static: bool = False) -> Any:
        """The vertical branch's caches, entry for entry beside the backbone's."""

    def prepare_branch_layers(self, layers: list[nn.Module]) -> None:  # noqa: B027 - optional, like bind
        """Fix up deep-copied layers (cache indices) so they run beside the originals."""

    @abc.abstractmethod
    def branch_call(
        self, layer: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict, cache: Any
    ) -> torch.Tensor:
        """Call one branch layer with the inputs captured from the backbone's branch layer."""

    def run_with_branch(
        self,
        ctx,
        embeds: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        key_slots: torch.Tensor,
        allowed: torch.Tensor,
        cache: Any,
        branch_cache: Any,
        entries: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Only when ``fused_branch``: the backbone and the vertical branch in one pass.

        Returns (final normed hidden [B, T, d], un-normed branch output [B, T, d]). Called
        for every decoding forward with caches that needs the branch, under
        ``torch.inference_mode``; it must compute the same function as the generic path
        (``run`` with the capture hook, then ``branch_call`` per branch layer), which a runner
        whose fused pass does not apply to a call runs instead:
        ``flashar_adapt.decoding.run_then_branch``."""
        raise NotImplementedError(f"runner {self.name!r} declares no fused_branch")

    def reference_logits(self, ctx, cond: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """Only when ``reference_forward``: the model's own raster next-code logits
        [B, H, W, K] for ``cond`` and ``codes`` (its own forward, not the patched path)."""
        raise NotImplementedError(f"runner {self.name!r} declares no reference_forward")

    def reference_generate(
        self, ctx, cond: torch.Tensor, grid: tuple[int, int], cond_mask: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Only when ``reference_generation``: the model's own greedy generation (its own
        ``generate``, not the patched path) for the prompts ``cond`` [B, T] (left-padded where
        ``cond_mask`` is False; the recipe's forced tokens follow them, as in the patched
        prefix), as codebook indices: one [B, h, w]
        tensor per grid in decoding order (a preview grid first, ``grid`` last). A cell the
        model filled with an id outside the codebook holds -1."""
        raise NotImplementedError(f"runner {self.name!r} declares no reference_generation")
