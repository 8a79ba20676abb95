"""``inspect``: look inside a model (or a checkpoint on disk) and draft a recipe for it.

Everything here is structural and family-agnostic: the longest ModuleList of identical
blocks is the decoder stack, the norm beside it is the final norm, the embedding the
decoder owns is the token embedding, Linear layers outside the stack that read the hidden
size are candidate heads. What structure cannot tell -- the token layout (visual ids, grid,
meta tokens) -- is left as a loud ``TODO`` that fails recipe validation until filled in.
"""
from __future__ import annotations

import importlib
import inspect as _inspect
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

TODO = "TODO"


# ---------------------------------------------------------------- loading files

def _backends_that_sniff() -> list[type]:
    from .backends import _REGISTRY

    importlib.import_module("flashar_adapt.integrations")
    classes = [cls for cls in _REGISTRY.values() if hasattr(cls, "sniff")]
    return sorted(classes, key=lambda c: getattr(c, "sniff_priority", 0))


def load_model(path: str | os.PathLike, overrides: dict | None = None) -> tuple[nn.Module, str]:
    """Load a model from a folder or checkpoint file with the first backend that recognises
    it (each integration decides from the files alone; local files only). Returns
    (model in eval mode, backend name). ``overrides`` go to the backend's constructor (e.g.
    sizes a checkpoint does not record)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    for cls in _backends_that_sniff():
        spec = cls.sniff(path)
        if spec is not None:
            return cls.load_sniffed(spec, overrides or {}), cls.name
    raise ValueError(f"{path}: no backend recognises it (a transformers save_pretrained folder, a LlamaGen "
                     f".pt/.pth/.safetensors checkpoint, or another integration's layout)")


# ---------------------------------------------------------------- structure

@dataclass
class Entry:
    path: str
    kind: str
    detail: str


@dataclass
class Inspection:
    model_class: str
    backend: str | None
    layers: Entry | None
    other_layer_lists: list[Entry]
    decoder: str | None
    norms: list[Entry]
    final_norm: str | None
    embeddings: list[Entry]
    embed: str | None
    heads: list[Entry]
    head: str | None
    dim: int | None
    draft: dict = field(default_factory=dict)
    todo: list[str] = field(default_factory=list)

    def draft_yaml(self) -> str:
        import yaml

        text = yaml.safe_dump(self.draft, sort_keys=False, width=120)
        notes = ["# Draft recipe written by `flashar-adapt inspect`. Every value 'TODO' must be filled in",
                 "# (the loader rejects it, naming the key). Then run `flashar-adapt check MODEL THIS.yaml`."]
        for t in self.todo:
            notes.append(f"# TODO {t}")
        return "\n".join(notes) + "\n" + text

    def __str__(self) -> str:
        out = [f"model class: {self.model_class}   backend: {self.backend or '?'}   hidden size: {self.dim or '?'}"]
        if self.layers:
            out.append(f"decoder layers: {self.layers.path}  ({self.layers.detail})")
        for e in self.other_layer_lists:
            out.append(f"  other block list: {e.path}  ({e.detail})")
        out.append(f"decoder module (takes inputs_embeds): {self.decoder or '?'}")
        out.append("norms outside the layers:")
        out += [f"  {e.path:40s} {e.detail}" for e in self.norms] or ["  (none)"]
        out.append("embeddings:")
        out += [f"  {e.path:40s} {e.detail}" for e in self.embeddings] or ["  (none)"]
        out.append("candidate heads (reading the hidden size, by output size):")
        out += [f"  {e.path:40s} {e.detail}" for e in self.heads] or ["  (none)"]
        return "\n".join(out)


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def _inside(path: str, prefix: str | None) -> bool:
    return bool(prefix) and (path == prefix or path.startswith(prefix + "."))


def _takes_embeds(mod: nn.Module) -> bool:
    try:
        return "inputs_embeds" in _inspect.signature(mod.forward).parameters
    except (TypeError, ValueError):
        return False


def _is_norm(mod: nn.Module) -> bool:
    return isinstance(mod, (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", nn.LayerNorm))) \
        or "norm" in type(mod).__name__.lower()


def _norm_dim(mod: nn.Module) -> int | None:
    w = getattr(mod, "weight", None)
    return int(w.shape[-1]) if w is not None and hasattr(w, "shape") and len(w.shape) == 1 else None


def _lora_targets(layers_path: str, layer: nn.Module) -> list[str]:
    groups: dict[str, list[str]] = {}
    for name, mod in layer.named_modules():
        w = getattr(mod, "weight", None)
        proj = isinstance(mod, nn.Linear) or (not list(mod.children()) and isinstance(w, nn.Parameter) and w.dim() == 2
                                              and not isinstance(mod, nn.Embedding))
        if proj and name:
            parent, _, leaf = name.rpartition(".")
            groups.setdefault(parent, []).append(leaf)
    base = re.escape(layers_path) + r"\.\d+"
    out = []
    for parent, leaves in groups.items():
        sub = (r"\." + re.escape(parent)) if parent else ""
        alt = leaves[0] if len(leaves) == 1 else "(" + "|".join(leaves) + ")"
        out.append(f"{base}{sub}\\.{alt}")
    return out


def inspect_model(model: nn.Module | str | os.PathLike, backend: str | None = None,
                  overrides: dict | None = None) -> Inspection:
    """Describe ``model`` (a module, or a path loaded with :func:`load_model`) and draft a recipe."""
    if not isinstance(model, nn.Module):
        model, backend = load_model(model, overrides)
    named = dict(model.named_modules())

    # the decoder stack: the longest ModuleList/Sequential of same-class blocks
    lists = []
    for path, mod in named.items():
        if isinstance(mod, (nn.ModuleList, nn.Sequential)) and len(mod) >= 1 and path:
            kinds = {type(m).__name__ for m in mod}
            if len(kinds) == 1 and sum(1 for _ in mod[0].parameters()) > 0:
                n_params = sum(p.numel() for p in mod.parameters())
                lists.append((len(mod), n_params, path, next(iter(kinds))))
    lists.sort(key=lambda t: (t[1], t[0]), reverse=True)
    layers = Entry(lists[0][2], "layers", f"{lists[0][0]} x {lists[0][3]}") if lists else None
    others = [Entry(p, "layers", f"{n} x {k}") for n, _, p, k in lists[1:4]]
    lp = layers.path if layers else None

    decoder = None
    if lp:
        cand = _parent(lp)
        while True:
            mod = named.get(cand)
            if mod is not None and _takes_embeds(mod):
                decoder = cand
                break
            if cand == "":
                break
            cand = _parent(cand)

    embeds = [(p, m) for p, m in named.items() if isinstance(m, nn.Embedding)]
    emb_entries = [Entry(p, "embedding", f"{m.num_embeddings} x {m.embedding_dim}") for p, m in embeds]
    # token embedding: the biggest embedding under the decoder (or anywhere)
    scope = [(p, m) for p, m in embeds if decoder is None or _inside(p, decoder) or decoder == ""] or embeds
    embed_path, embed_mod = max(scope, key=lambda pm: pm[1].num_embeddings) if scope else (None, None)
    dim = embed_mod.embedding_dim if embed_mod is not None else None

    norms = []
    for p, m in named.items():
        if p and _is_norm(m) and not _inside(p, lp) and not any(_inside(p, e.path) for e in others):
            if not any(_inside(p, q.path) and q.path != p for q in norms):
                norms.append(Entry(p, "norm", f"{type(m).__name__}({_norm_dim(m)})"))
    final_norm = None
    if lp:
        siblings = [e.path for e in norms if _parent(e.path) == _parent(lp)]
        final_norm = siblings[-1] if siblings else (norms[-1].path if norms else None)
    if dim is None and final_norm:
        dim = _norm_dim(named[final_norm])

    heads = []
    for p, m in named.items():
        if isinstance(m, nn.Linear) and not _inside(p, lp) and (dim is None or m.in_features == dim):
            if not any(_inside(p, e.path) for e in others):
                heads.append((m.out_features, p))
    heads.sort(reverse=True)
    head_entries = [Entry(p, "head", f"{m_out} outputs") for m_out, p in heads]
    vocab = embed_mod.num_embeddings if embed_mod is not None else None
    head = next((p for o, p in heads if o == vocab), heads[0][1] if heads else None)

    if backend is None and decoder is not None:
        backend = "transformers"

    todo = []
    draft: dict[str, Any] = {"name": TODO, "description": f"{type(model).__name__} (drafted by flashar-adapt inspect)",
                             "backend": backend or TODO, "match": {"class": type(model).__name__}}
    mods: dict[str, Any] = {"decoder": decoder if decoder is not None else ""}
    mods.update(layers=lp or TODO, norm=final_norm or TODO, head=head or TODO, embed=embed_path or TODO)
    draft["modules"] = mods
    if backend != "transformers" and decoder is None:
        mods.pop("decoder")
    # a second, small embedding outside the decoder is most likely a class embedding
    extra = [(p, m) for p, m in embeds if p != embed_path and not _inside(p, decoder if decoder else None)]
    small = [(p, m) for p, m in extra if m.num_embeddings < (vocab or 10**9)]
    if small and backend != "transformers":
        p, m = small[0]
        draft["condition"] = {"kind": "class", "embedding": p, "num_classes": m.num_embeddings - 1,
                              "null_class": m.num_embeddings - 1, "prefix_len": 1}
        todo.append(f"condition: {p} has {m.num_embeddings} rows; assumed the last one is the CFG null class")
    else:
        draft["condition"] = {"kind": "tokens", "prefix_len": 256, "uncond": "pad_inner", "pad_id": TODO}
        todo.append("condition.pad_id: the id used to blank the unconditional prompt (or use uncond: ids)")
    codebook = None
    if head and vocab and named[head].out_features != vocab:
        codebook = named[head].out_features  # a head of its own: codebook-sized
    draft["image"] = {"codebook_size": codebook or TODO, "visual_token_offset": 0 if codebook else TODO,
                      "grid": TODO, "variable_grid": False, "before": [], "eol_token": None}
    todo.append("image.*: the token layout (codebook size, first visual id, grid, forced meta tokens before the "
                "codes, end-of-line token) is not in the weights -- read the model's tokenizer / generation code")
    n_layers = len(named[lp]) if lp else 0
    draft["flashar"] = {"branch_layer": -4 if n_layers >= 8 else -1, "branch_depth": 1}
    draft["lora"] = {"targets": _lora_targets(lp, named[lp][0]) if lp else []}
    return Inspection(type(model).__name__, backend, layers, others, decoder, norms, final_norm, emb_entries, embed_path,
                      head_entries, head, dim, draft, todo)
