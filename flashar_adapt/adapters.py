"""LoRA adapters, found by type: peft's ``LoraLayer`` modules, whatever the model names them.

Adapters are injected with ``peft.inject_adapter_in_model``, which keeps the user's model class
(no ``PeftModel`` wrapper), so the wrapper's ``merge_and_unload`` and ``disable_adapter`` are
not there; each function below does what those do, layer by layer, with peft's own layer API
(``merge``, ``enable_adapters``, ``get_base_layer``).
"""

from __future__ import annotations

import contextlib

from torch import nn


def lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, layer) of every peft LoRA layer in ``model``; none without peft installed."""
    try:
        from peft.tuners.lora import LoraLayer  # optional dependency (the "train" extra)
    except ImportError:
        return []
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def lora_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The adapters' own parameters (not the base layers'), in ``named_parameters`` order, so
    optimizer groups and checkpoints keep the order they always had."""
    ids = set()
    for _, m in lora_layers(model):
        base = {id(p) for p in m.get_base_layer().parameters()}
        ids |= {id(p) for p in m.parameters() if id(p) not in base}
    return [(n, p) for n, p in model.named_parameters() if id(p) in ids]


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for _, p in lora_named_parameters(model)]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module):
    """``with fa.adapters_disabled(model):`` every LoRA layer computes its base layer exactly (a
    model post-trained with LoRA decodes as the original model), as peft's ``disable_adapter``."""
    layers = [m for _, m in lora_layers(model)]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield model
    finally:
        for m in layers:
            m.enable_adapters(True)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def merge_lora(model: nn.Module) -> int:
    """Merge every LoRA layer into its base weight and put the plain layer back, in place (as
    peft's ``merge_and_unload``). Returns how many layers were merged."""
    targets = lora_layers(model)
    for name, m in targets:
        m.merge()
        _replace(model, name, m.get_base_layer())
    return len(targets)


def remove_lora(model: nn.Module, names) -> int:
    """Put back the base layer of each LoRA layer named in ``names`` (adapters dropped, the
    base weights as they are). Returns how many were removed; names that are no longer LoRA
    layers (merged by ``merge_lora``) are skipped."""
    targets = [(n, m) for n, m in lora_layers(model) if n in set(names)]
    for name, m in targets:
        _replace(model, name, m.get_base_layer())
    return len(targets)


@contextlib.contextmanager
def base_layers_in_place(model: nn.Module):
    """Temporarily put every LoRA layer's base layer back (the original, unmerged weights), so
    the backbone saves in its native layout."""
    swapped = lora_layers(model)
    try:
        for name, m in swapped:
            _replace(model, name, m.get_base_layer())
        yield
    finally:
        for name, m in swapped:
            _replace(model, name, m)
