"""``inspect``: look inside a model (or a checkpoint on disk) and draft a recipe for it.

Everything here is structural and family-agnostic: the longest ModuleList of identical
blocks is the decoder stack, the norm beside it is the final norm, the embedding the
decoder owns is the token embedding, Linear layers outside the stack that read the hidden
size are candidate heads. What structure cannot tell -- the token layout (visual ids, grid,
meta tokens) -- is left as a loud ``TODO`` that fails recipe validation until filled in.
"""

from __future__ import annotations

import inspect as _inspect
import os
import re
from dataclasses import dataclass, field
from typing import Any

import torch
import yaml
from torch import nn

from .errors import InputError
from .formats import open_path
from .logit_maps import find_logit_map
from .recipe import TODO
from .runners import get_runner

# ---------------------------------------------------------------- loading files


def load_model(path: str | os.PathLike, overrides: dict | None = None) -> tuple[nn.Module, str]:
    """Load a model from a folder or checkpoint file with the first model format that
    recognises it (each decides from the files alone; local files only). Returns (model in
    eval mode, the runner a recipe names for it). ``overrides`` go to the format's
    constructor (e.g. sizes a checkpoint does not record)."""
    model, fmt = open_path(path, overrides)
    return model, fmt.runner


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
    # "section.key" -> where the draft's value came from (written as a comment beside it)
    notes: dict[str, str] = field(default_factory=dict)

    def draft_yaml(self) -> str:
        text = _annotate(yaml.safe_dump(self.draft, sort_keys=False, width=120), self.notes)
        notes = [
            "# Draft recipe written by `flashar-adapt inspect`. Every value 'TODO' must be filled in",
            "# (the loader rejects it, naming the key). Then run `flashar-adapt check MODEL THIS.yaml`.",
        ]
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


def _annotate(text: str, notes: dict[str, str]) -> str:
    """``text`` (a YAML dump) with ``# note`` after the line of each "section.key" in ``notes``."""
    lines, section = text.split("\n"), None
    for i, line in enumerate(lines):
        if line and not line[0].isspace():
            section = line.split(":")[0]
            continue
        key = line.strip().split(":")[0]
        note = notes.get(f"{section}.{key}")
        if note is not None and line.startswith("  ") and not line.startswith("   "):
            lines[i] = f"{line}  # {note}"
    return "\n".join(lines)


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
    return (
        isinstance(mod, (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", nn.LayerNorm)))
        or "norm" in type(mod).__name__.lower()
    )


def _norm_dim(mod: nn.Module) -> int | None:
    w = getattr(mod, "weight", None)
    return int(w.shape[-1]) if w is not None and hasattr(w, "shape") and len(w.shape) == 1 else None


def _lora_targets(layers_path: str, layer: nn.Module) -> list[str]:
    groups: dict[str, list[str]] = {}
    for name, mod in layer.named_modules():
        w = getattr(mod, "weight", None)
        proj = isinstance(mod, nn.Linear) or (
            not list(mod.children())
            and isinstance(w, nn.Parameter)
            and w.dim() == 2
            and not isinstance(mod, nn.Embedding)
        )
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


def inspect_model(
    model: nn.Module | str | os.PathLike, backend: str | None = None, overrides: dict | None = None
) -> Inspection:
    """Describe ``model`` (a module, or a path loaded with :func:`load_model`) and draft a recipe."""
    if not isinstance(model, (nn.Module, str, os.PathLike)) or (not isinstance(model, nn.Module) and not str(model)):
        raise InputError(f"model must be a torch.nn.Module or the path of a model, got {model!r}")
    if overrides is not None and not isinstance(overrides, dict):
        raise InputError(f"overrides must be a dict of model constructor values, got {type(overrides).__name__}")
    if backend is not None:
        get_runner(backend)  # a backend the draft names must exist: an unknown one is named, with "did you mean"
    if not isinstance(model, nn.Module):
        model, backend = load_model(model, overrides)
    named = dict(model.named_modules())
    layers, others = _decoder_stack(named)
    lp = layers.path if layers else None
    decoder = _decoder_module(named, lp)
    embeds = [(p, m) for p, m in named.items() if isinstance(m, nn.Embedding)]
    emb_entries = [Entry(p, "embedding", f"{m.num_embeddings} x {m.embedding_dim}") for p, m in embeds]
    probe = _probe(model, named, lp, embeds) if decoder is not None else {}
    norms, final_norm = _norms(named, lp, others)
    # the hidden size is the width the layers read (seen by the probe), else the final norm's
    dim = probe.get("width") or (_norm_dim(named[final_norm]) if final_norm else None)
    after_norm, heads, head, embed_path = _head_chain(named, lp, others, decoder, dim, embeds, probe)
    embed_mod = named.get(embed_path)
    if dim is None and embed_mod is not None:
        dim = embed_mod.embedding_dim
    if backend is None and decoder is not None:
        backend = "transformers"
    draft, todo, notes = _draft(
        model, named, backend, decoder, lp, final_norm, head, embed_path, after_norm, embeds, probe
    )
    head_entries = [Entry(p, "head", f"{m_out} outputs") for m_out, p in heads]
    return Inspection(
        type(model).__name__,
        backend,
        layers,
        others,
        decoder,
        norms,
        final_norm,
        emb_entries,
        embed_path,
        head_entries,
        head,
        dim,
        draft,
        todo,
        notes,
    )


def _decoder_stack(named: dict) -> tuple[Entry | None, list[Entry]]:
    """The decoder stack: the ModuleList/Sequential of same-class blocks holding the most
    parameters; the runners-up are reported too."""
    lists = []
    for path, mod in named.items():
        if isinstance(mod, (nn.ModuleList, nn.Sequential)) and len(mod) >= 1 and path:
            kinds = {type(m).__name__ for m in mod}
            if len(kinds) == 1 and sum(1 for _ in mod[0].parameters()) > 0:
                n_params = sum(p.numel() for p in mod.parameters())
                lists.append((len(mod), n_params, path, next(iter(kinds))))
    lists.sort(key=lambda t: (t[1], t[0]), reverse=True)
    layers = Entry(lists[0][2], "layers", f"{lists[0][0]} x {lists[0][3]}") if lists else None
    return layers, [Entry(p, "layers", f"{n} x {k}") for n, _, p, k in lists[1:4]]


def _decoder_module(named: dict, lp: str | None) -> str | None:
    """The nearest ancestor of the layers whose forward takes inputs_embeds."""
    if not lp:
        return None
    cand = _parent(lp)
    while True:
        mod = named.get(cand)
        if mod is not None and _takes_embeds(mod):
            return cand
        if cand == "":
            return None
        cand = _parent(cand)


def _norms(named: dict, lp: str | None, others: list[Entry]) -> tuple[list[Entry], str | None]:
    """Norm modules outside the layer stacks, and the final norm (the last one beside the layers)."""
    norms = []
    for p, m in named.items():
        if p and _is_norm(m) and not _inside(p, lp) and not any(_inside(p, e.path) for e in others):
            if not any(_inside(p, q.path) and q.path != p for q in norms):
                norms.append(Entry(p, "norm", f"{type(m).__name__}({_norm_dim(m)})"))
    final_norm = None
    if lp:
        siblings = [e.path for e in norms if _parent(e.path) == _parent(lp)]
        final_norm = siblings[-1] if siblings else (norms[-1].path if norms else None)
    return norms, final_norm


def _head_chain(named: dict, lp, others, decoder, dim, embeds, probe) -> tuple[list[str], list, str | None, str | None]:
    """(projections after the final norm, head candidates [(outputs, path)], the LM head, the
    token embedding), found by what they connect to: widths, and the table the head indexes."""
    linears = [
        (p, m)
        for p, m in named.items()
        if isinstance(m, nn.Linear) and not _inside(p, lp) and not any(_inside(p, e.path) for e in others)
    ]
    # a projection the decoder applies after its final norm (reads the hidden size, inside the decoder)
    after_norm = [
        p
        for p, m in linears
        if dim
        and m.in_features == dim
        and m.out_features != dim
        and decoder is not None
        and _inside(p, decoder)
        and decoder != ""
    ]
    head_in = named[after_norm[0]].out_features if len(after_norm) == 1 else dim
    if len(after_norm) != 1:
        after_norm = []
    heads = sorted(
        (
            (m.out_features, p)
            for p, m in linears
            if p not in after_norm and (head_in is None or m.in_features == head_in)
        ),
        reverse=True,
    )
    head = heads[0][1] if heads else None
    embed_path = _token_embedding(embeds, named.get(head), probe, decoder)
    embed_mod = named.get(embed_path)
    vocab = embed_mod.num_embeddings if embed_mod is not None else None
    if head and vocab:  # the LM head indexes the token table's rows; a bigger head is something else
        head = next((p for o, p in heads if o == vocab), next((p for o, p in heads if o <= vocab), head))
    return after_norm, heads, head, embed_path


def _draft(
    model, named, backend, decoder, lp, final_norm, head, embed_path, after_norm, embeds, probe
) -> tuple[dict, list[str], dict[str, str]]:
    """The draft recipe (TODO where structure cannot tell), what to review in it, and where
    its measured numbers came from."""
    embed_mod = named.get(embed_path)
    vocab = embed_mod.num_embeddings if embed_mod is not None else None
    todo = []
    draft: dict[str, Any] = {
        "name": TODO,
        "description": f"{type(model).__name__} (drafted by flashar-adapt inspect)",
        "backend": backend or TODO,
        "match": {"class": type(model).__name__},
    }
    mods: dict[str, Any] = {"decoder": decoder if decoder is not None else ""}
    mods.update(layers=lp or TODO, norm=final_norm or TODO, head=head or TODO, embed=embed_path or TODO)
    if after_norm:
        mods["after_norm"] = after_norm
    draft["modules"] = mods
    if backend != "transformers" and decoder is None:
        mods.pop("decoder")
    draft["condition"] = _draft_condition(model, backend, decoder, embed_path, embeds, vocab, todo)
    codebook = None
    if head and vocab and named[head].out_features != vocab:
        codebook = named[head].out_features  # a head of its own: codebook-sized
    draft["image"] = {
        "codebook_size": codebook or TODO,
        "visual_token_offset": 0 if codebook else TODO,
        "grid": TODO,
        "variable_grid": False,
        "before": [],
        "eol_token": None,
    }
    todo.append(
        "image.*: the token layout (codebook size, first visual id, grid, forced meta tokens before the "
        "codes, end-of-line token) is not in the weights -- read the model's tokenizer / generation code"
    )
    notes: dict[str, str] = {}
    found = _fit_head(model, probe, named.get(decoder) if decoder is not None else None, named.get(head))
    if found is not None and not found.identity:
        draft["logits"] = {key.split(".")[1]: value for key, value in found.items().items()}
        notes = {key: found.sources[key] for key in found.items()}
        todo.append(
            "logits.*: the model's logits are its head's output mapped this way, read off probe forwards at "
            f"several magnitudes (largest residual {found.residual:.1e} of the logits); the comment beside each "
            "value says where it came from"
        )
    elif found is None and probe.get("ids") is not None and head:
        todo.append(
            "logits: the model's logits are not its head's output, scaled and/or soft-capped, on any probe: "
            "check modules.head and the model's forward"
        )
    n_layers = len(named[lp]) if lp else 0
    draft["flashar"] = {"branch_layer": -4 if n_layers >= 8 else -1, "branch_depth": 1}
    draft["lora"] = {"targets": _lora_targets(lp, named[lp][0]) if lp else []}
    return draft, todo, notes


def _draft_condition(model, backend, decoder, embed_path, embeds, vocab, todo: list[str]) -> dict:
    # a second, small embedding outside the decoder is most likely a class embedding
    extra = [(p, m) for p, m in embeds if p != embed_path and not _inside(p, decoder if decoder else None)]
    small = [(p, m) for p, m in extra if m.num_embeddings < (vocab or 10**9)]
    if small and backend != "transformers":
        p, m = small[0]
        todo.append(f"condition: {p} has {m.num_embeddings} rows; assumed the last one is the CFG null class")
        return {
            "kind": "class",
            "embedding": p,
            "num_classes": m.num_embeddings - 1,
            "null_class": m.num_embeddings - 1,
            "prefix_len": 1,
        }
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    room = f"; the model has {limit} positions" if isinstance(limit, int) else ""
    todo.append(
        f"condition.prefix_len: the longest prompt (condition tokens); prompt + forced tokens + H*W - 1 "
        f"codes (+ H - 1 end-of-line tokens) are fed{room}"
    )
    todo.append("condition.pad_id: the id used to blank the unconditional prompt (or use uncond: ids, or none)")
    return {"kind": "tokens", "prefix_len": TODO, "uncond": "pad_inner", "pad_id": TODO}


# ---------------------------------------------------------------- probe forward (transformers-style models)


def _probe(model: nn.Module, named: dict, layers_path: str | None, embeds) -> dict:
    """One short forward of ``model(input_ids=...)``, watched by hooks: which embedding looks
    up the input ids (the token table) and what width the decoder layers read. Empty if the
    model does not run that way."""
    if not embeds or not layers_path:
        return {}
    rows = max(m.num_embeddings for _, m in embeds)
    ids = torch.tensor([[3, 1, 2, 1, 3]]) % rows  # not 0, 1, 2, ...: a position table sees arange
    seen: dict = {}
    hooks = []

    def lookup(p):
        def hook(mod, args, out):
            seen.setdefault("lookups", []).append((p, args[0] if args else None))

        return hook

    def width(mod, args, kwargs):
        seen.setdefault("width", (args[0] if args else kwargs["hidden_states"]).shape[-1])

    hooks = [m.register_forward_hook(lookup(p)) for p, m in embeds]
    hooks.append(named[layers_path][0].register_forward_pre_hook(width, with_kwargs=True))
    was = model.training
    model.eval()
    try:
        with torch.no_grad():
            dev = next(model.parameters()).device
            model(input_ids=ids.to(dev), use_cache=False)
        seen["ids"] = ids.to(dev)  # the logit map is read off forwards on the same ids
    except Exception:  # noqa: BLE001 - not a model that runs on input ids: structure only
        return {}
    finally:
        model.train(was)
        for h in hooks:
            h.remove()
    seen["token_tables"] = [
        p for p, x in seen.get("lookups", []) if x is not None and x.shape == ids.shape and bool((x.cpu() == ids).all())
    ]
    return seen


def _token_embedding(embeds, head: nn.Module | None, probe: dict, decoder: str | None) -> str | None:
    """The token table: the one sharing the head's weights, else the one the probe saw look up
    the input ids, else the smallest table with at least as many rows as the head has outputs."""
    if not embeds:
        return None
    w = getattr(head, "weight", None)
    for p, m in embeds:
        if w is not None and m.weight is w:
            return p
    if probe.get("token_tables"):
        return probe["token_tables"][0]
    out = getattr(head, "out_features", None)
    scope = [(p, m) for p, m in embeds if decoder is None or decoder == "" or _inside(p, decoder)] or embeds
    fits = [(p, m) for p, m in scope if out is None or m.num_embeddings >= out]
    if fits:
        return min(fits, key=lambda pm: pm[1].num_embeddings)[0]
    return max(scope, key=lambda pm: pm[1].num_embeddings)[0]


def _fit_head(model: nn.Module, probe: dict, decoder: nn.Module | None, head: nn.Module | None):
    """The logit map between ``head(decoder output)`` and the model's logits, on the probe's
    ids at several magnitudes (``logit_maps``); None without a probe or when none fits."""
    if head is None or decoder is None or decoder is model or probe.get("ids") is None:
        return None  # (a model that is its own decoder has no logits)
    return find_logit_map(model, decoder, head, probe["ids"])
