"""Backends: the little code that knows how to run one kind of decoder stack.

The core decides *what* to run (which tokens, which mask, which cache, which positions);
a backend knows *how* a model family takes those (keyword names, cache objects, mask
format). Integrations register backends by name; a recipe picks one with ``backend:``.
"""
from __future__ import annotations

import importlib
from typing import Any

import torch
from torch import nn

_REGISTRY: dict[str, type["Backend"]] = {}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: how saved specs and configs name a dtype
    (``getattr(torch, name)`` reads it back)."""
    return str(dtype).removeprefix("torch.")


def register_backend(name: str):
    """Class decorator: make a backend available to recipes as ``backend: <name>``."""

    def deco(cls):
        old = _REGISTRY.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"backend name {name!r} is already taken by {old.__module__}.{old.__qualname__}; "
                             f"register {cls.__qualname__} under another name")
        _REGISTRY[name] = cls  # the same class again (a module reloaded) replaces itself
        cls.name = name
        return cls

    return deco


def get_backend(name: str) -> "Backend":
    if name not in _REGISTRY:
        importlib.import_module("flashar_adapt.integrations")  # registers the shipped backends
    if name not in _REGISTRY:
        from .recipe import RecipeError, did_you_mean

        raise RecipeError("backend", f"unknown backend {name!r}{did_you_mean(name, _REGISTRY)}; "
                          f"known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]()


def list_backends() -> list[str]:
    importlib.import_module("flashar_adapt.integrations")
    return sorted(_REGISTRY)


class Backend:
    """Interface every backend implements. ``ctx`` is the PatchContext of the model."""

    name = "base"
    #: whether ``new_cache``/``new_branch_cache`` take ``static=True`` and ``run``/``run_with_branch``
    #: take ``entries``: what ``generate(compile=True)`` needs (see ``run``)
    static_caches = False
    #: order in which ``inspect`` / ``check`` ask backends to recognise a file (lowest first):
    #: family-specific backends go before generic ones.
    sniff_priority = 0

    # ------------------------------------------------------------ discovery (inspect / check)
    @staticmethod
    def sniff(path) -> dict | None:
        """Recognise a model on disk from its files alone (no weights loaded): return a load
        spec for :meth:`load_sniffed`, or None when the path is not in this backend's layout."""
        return None

    @staticmethod
    def load_sniffed(spec: dict, overrides: dict | None = None) -> nn.Module:
        """Load the model ``sniff`` recognised (local files only, weights never unpickled as
        code); ``overrides`` are constructor values the files do not record. Eval mode."""
        raise NotImplementedError

    def reference_logits(self, ctx, cond: torch.Tensor, codes: torch.Tensor) -> torch.Tensor | None:
        """The model's own raster next-code logits [B, H, W, K] for ``cond`` and ``codes``
        (its own forward, not the patched path), which ``check`` compares the patched raster
        logits against; None when the backend has none and ``check`` should use the generic
        references (the model's forward on input ids, or its head on the decoder's output)."""
        return None

    def validate(self, ctx) -> None:
        """Extra checks against the real model; raise RecipeError naming the key."""

    def max_positions(self, ctx) -> int | None:
        """Longest sequence the model's position scheme supports, or None for unbounded."""
        return None

    def run(self, ctx, embeds: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
            key_slots: torch.Tensor, allowed: torch.Tensor, cache: Any, entries: torch.Tensor | None = None) -> torch.Tensor:
        """Run the decoder stack on ``embeds`` [B, T, d].

        positions [B, T]: position ids (raster order, left padding removed); slots [T]:
        sequence indices of the new tokens; key_slots [S]: sequence index of every key the
        attention will see after this call, in cache order (cached keys, then the new
        ones); allowed [B, T, S], or [B, 1, S] when every query sees the same keys: True where
        a query may attend a key. ``cache`` is what new_cache returned, or None for a single
        uncached pass. With a cache, the keys are the cached ones followed by the new ones:
        a backend with static caches may fill entries in this order (entries [S-T, S) now)
        and attend entries [0, S), so it never needs a scatter or a mask over unused entries. Returns the final,
        normalised hidden states [B, T, d]. The decoder layers must be called through
        their ``__call__`` so the branch hook sees their inputs.

        Static caches (``new_cache(..., static=True)``, compiled decoding): the call gets
        ``entries=`` [T], a tensor of the cache entries the new tokens are written to;
        attention reads every entry of the cache, ``allowed`` is [B, T, max_len] and
        ``key_slots`` None. Nothing may depend on a per-call Python value (a compiled graph
        would specialise on it). Entries nobody has written yet must hold finite values
        (zeros): a masked key still multiplies its value by zero."""
        raise NotImplementedError

    def new_cache(self, ctx, batch: int, max_len: int, static: bool = False) -> Any:
        """Caches for one decoding run of ``batch`` sequences of ``max_len`` tokens; with
        ``static`` (only when ``static_caches``) exactly ``max_len`` entries, written by index."""
        raise NotImplementedError

    def new_branch_cache(self, ctx, batch: int, max_len: int, static: bool = False) -> Any:
        raise NotImplementedError

    def prepare_branch_layers(self, layers: list[nn.Module]) -> None:
        """Fix up deep-copied layers (cache indices) so they run beside the originals."""

    def branch_call(self, layer: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict,
                    cache: Any) -> torch.Tensor:
        """Call one branch layer with the inputs captured from the backbone's branch layer."""
        raise NotImplementedError

    def run_with_branch(self, ctx, embeds: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor,
                        key_slots: torch.Tensor, allowed: torch.Tensor, cache: Any, branch_cache: Any,
                        entries: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Optional decoding fast path: the backbone and the vertical branch in one pass.

        Return (final normed hidden [B, T, d], un-normed branch output [B, T, d]), or None to
        use the generic path (``run`` with the capture hook, then ``branch_call``). Called
        only while decoding with caches, under ``torch.inference_mode``; it must compute
        the same function as the generic path."""
        return None

    # Model files, in the family's own layout (used by training configs and export).
    def save_model(self, model: nn.Module, out_dir) -> dict:
        """Write the (unpatched view of the) backbone to ``out_dir``; return a JSON-able spec."""
        raise NotImplementedError(f"backend {self.name!r} cannot save models")

    def load_model(self, spec: dict, root=None) -> nn.Module:
        """Build a model from a spec (a training config's ``model:`` section, or what
        save_model returned, with paths relative to ``root``). Never unpickles code."""
        raise NotImplementedError(f"backend {self.name!r} cannot load models")
