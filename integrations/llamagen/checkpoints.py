"""LlamaGen checkpoints: reading official files (without running pickled code) and the
model's sizes, which are never guessed.

The weights record most sizes (width, depth, vocabulary, classes or caption width, the FFN
rounding) but not the number of attention heads nor the grid the 2D rotary positions were
built for (``block_size``). Those come, in this order, from values given explicitly
(``--set n_head=N``, a training config's ``config:``), from a ``model_args.json`` in the
checkpoint's folder (every ModelArgs field; ``export`` and the Fashion-MNIST build write
one), or, for the head count, from the official GPT sizes; otherwise loading is refused
with one sentence naming ``--set n_head=N``. Whatever the source, the values are checked
against the weights, and a mismatch names the key."""

from __future__ import annotations

import json
import os
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import load_file

from flashar_adapt.formats import FormatError
from flashar_adapt.validate import Num, OneOf, did_you_mean, first_problem

from .model import ModelArgs, Transformer, find_multiple

# The file beside a checkpoint that holds every ModelArgs field (what the weights cannot say).
MODEL_ARGS = "model_args.json"
# (n_layer, dim) -> n_head of the official GPT sizes (GPT_models); weights do not record it.
OFFICIAL_HEADS = {
    (12, 768): 12,
    (24, 1024): 16,
    (36, 1280): 20,
    (48, 1536): 24,
    (48, 2560): 40,
    (24, 3200): 32,
    (32, 4096): 32,
}


def extract_state_dict(obj) -> dict:
    """The weights inside an official checkpoint: {"model": ...} (DDP), {"module": ...}
    (DeepSpeed), {"state_dict": ...}, or a raw state dict (FSDP consolidated.pth)."""
    if not isinstance(obj, dict):
        raise ValueError(f"checkpoint holds a {type(obj).__name__}, expected a dict of tensors")
    for key in ("model", "module", "state_dict"):
        if key in obj and isinstance(obj[key], dict):
            obj = obj[key]
            break
    sd = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    sd.pop("freqs_cis", None)
    if not sd:
        raise ValueError("checkpoint holds no tensors")
    return sd


def load_checkpoint(model: Transformer, path: str | os.PathLike, strict: bool = True) -> Transformer:
    """Load an official LlamaGen checkpoint (.pt/.pth via torch.load(weights_only=True), or .safetensors)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    return load_state_dict_into(model, read_state_dict(path), path, strict)


def load_state_dict_into(model: Transformer, sd: dict, path: str | os.PathLike, strict: bool = True) -> Transformer:
    """``load_checkpoint`` for weights already read from ``path`` (named in errors)."""
    own = model.state_dict()
    bad = [
        f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items() if k in own and own[k].shape != v.shape
    ]
    if bad:
        raise ValueError(f"{path}: checkpoint does not match the model (other sizes?): {bad[:3]}")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith(("k_cache", "v_cache"))]
    if strict and (missing or unexpected):
        raise ValueError(
            f"{path}: checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model


def read_state_dict(path: Path) -> dict:
    """The state dict of a LlamaGen checkpoint: safetensors, or a .pt read with
    ``weights_only=True`` in either official layout ({"model": ...} or raw)."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return extract_state_dict(torch.load(path, map_location="cpu", weights_only=True))


def config_from_state_dict(sd: dict, **overrides) -> ModelArgs:
    """ModelArgs with the sizes the weights record (width, depth, vocabulary, classes) and
    ModelArgs' defaults elsewhere (``overrides`` replace any field): a quick model of the
    right shape for tests and tools; ``resolve_model_args`` is what loading uses."""
    kw = {
        k: v for k, v in weight_sizes(sd).items() if k in ("dim", "n_layer", "vocab_size", "model_type", "num_classes")
    }
    kw.update(overrides)
    valid = {f.name for f in fields(ModelArgs)}
    return ModelArgs(**{k: v for k, v in kw.items() if k in valid})


def weight_sizes(sd: dict) -> dict:
    """What the weights record: ``dim``, ``n_layer``, ``vocab_size``, ``model_type`` and
    ``num_classes`` (c2i) or ``cls_token_num`` and ``caption_dim`` (t2i), plus the rows of
    the fused QKV projection and the FFN width (which other fields must reproduce)."""
    emb = sd["tok_embeddings.weight"]
    out = {
        "dim": int(emb.shape[1]),
        "n_layer": 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers.")),
        "vocab_size": int(emb.shape[0]),
    }
    if "cls_embedding.embedding_table.weight" in sd:
        out.update(model_type="c2i", num_classes=int(sd["cls_embedding.embedding_table.weight"].shape[0]) - 1)
    if "cls_embedding.uncond_embedding" in sd:
        tokens, channels = sd["cls_embedding.uncond_embedding"].shape
        out.update(model_type="t2i", cls_token_num=int(tokens), caption_dim=int(channels))
    if "layers.0.attention.wqkv.weight" in sd:
        out["qkv_rows"] = int(sd["layers.0.attention.wqkv.weight"].shape[0])
    if "layers.0.feed_forward.w1.weight" in sd:
        out["ffn_hidden"] = int(sd["layers.0.feed_forward.w1.weight"].shape[0])
    return out


def _ffn_hidden(a: ModelArgs) -> int:
    hidden = int(2 * (4 * a.dim) / 3)
    if a.ffn_dim_multiplier is not None:
        hidden = int(a.ffn_dim_multiplier * hidden)
    return find_multiple(hidden, a.multiple_of)


def check_model_args(args: ModelArgs, sd: dict, source: str) -> None:
    """Refuse ``args`` (from ``source``: a config, a model_args.json, --set) when they do
    not build the weights' shapes; the error names the first key that differs."""
    w = weight_sizes(sd)
    for key in ("dim", "n_layer", "vocab_size", "model_type", "num_classes", "cls_token_num", "caption_dim"):
        if key in w and getattr(args, key) != w[key]:
            raise FormatError(
                f"{source}: {key}={getattr(args, key)!r}, but the checkpoint's weights have {key}={w[key]!r}"
            )
    if args.dim % args.n_head:
        raise FormatError(f"{source}: n_head={args.n_head} does not divide dim={args.dim}")
    rows = (args.n_head + 2 * args.n_kv_head) * (args.dim // args.n_head)
    if "qkv_rows" in w and rows != w["qkv_rows"]:
        raise FormatError(
            f"{source}: n_head={args.n_head}, n_kv_head={args.n_kv_head} give {rows} query/key/value rows, "
            f"but the checkpoint's weights have {w['qkv_rows']}"
        )
    if "ffn_hidden" in w and _ffn_hidden(args) != w["ffn_hidden"]:
        raise FormatError(
            f"{source}: multiple_of={args.multiple_of}, ffn_dim_multiplier={args.ffn_dim_multiplier} give an FFN "
            f"width of {_ffn_hidden(args)}, but the checkpoint's weights have {w['ffn_hidden']}"
        )


_SIZE = Num(1, integer=True)
_POSITIVE = Num(0, lo_open=True)
_PROBABILITY = Num(0, 1)
# What each ModelArgs field may hold: the model would otherwise fail deep inside (a string
# rope_base, a null norm_eps) or build something else than the weights were trained as.
ARG_RULES = {
    **dict.fromkeys(
        ("dim", "n_layer", "n_head", "multiple_of", "num_classes", "caption_dim", "vocab_size", "cls_token_num"), _SIZE
    ),
    **dict.fromkeys(("block_size", "max_batch_size", "max_seq_len"), _SIZE),
    "n_kv_head": Num(1, integer=True, optional=True),
    "ffn_dim_multiplier": Num(0, lo_open=True, optional=True),
    "rope_base": _POSITIVE,
    "norm_eps": _POSITIVE,
    "initializer_range": Num(0),
    **dict.fromkeys(
        ("token_dropout_p", "attn_dropout_p", "resid_dropout_p", "ffn_dropout_p", "drop_path_rate"), _PROBABILITY
    ),
    "class_dropout_prob": _PROBABILITY,
    "model_type": OneOf(("c2i", "t2i")),
}


def model_args_of(values: dict, source: str) -> ModelArgs:
    """ModelArgs from a mapping; an unknown key or a value of the wrong type or range is a
    FormatError naming the key and ``source``."""
    valid = {f.name for f in fields(ModelArgs)}
    unknown = sorted(set(values) - valid, key=str)
    if unknown:
        raise FormatError(
            f"{source}: {unknown[0]!r} is not a LlamaGen ModelArgs field{did_you_mean(str(unknown[0]), valid)}"
        )
    bad = first_problem(values, {k: ARG_RULES[k] for k in values if k in ARG_RULES})
    if bad:
        raise FormatError(f"{source}: {bad[0]} {bad[1]}")
    floats = {f.name for f in fields(ModelArgs) if "float" in str(f.type)}
    return ModelArgs(**{k: float(v) if k in floats and isinstance(v, int) else v for k, v in values.items()})


def model_args_beside(path: str | os.PathLike) -> tuple[dict, Path] | None:
    """The ``model_args.json`` in the folder of the checkpoint ``path``: (its values, its path), or None."""
    f = Path(path).parent / MODEL_ARGS
    if not f.is_file():
        return None
    try:
        values = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FormatError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(values, dict):
        raise FormatError(f"{f}: expected a JSON object of ModelArgs fields")
    return values, f


def infer_model_args(sd: dict, **overrides) -> ModelArgs:
    """Every ModelArgs field the weights determine: sizes, c2i/t2i, caption tokens, FFN
    rounding, GQA heads. ``n_head`` must be given unless the weights are an official GPT
    size (``OFFICIAL_HEADS``); without it this refuses (``FormatError``) rather than guess.
    ``block_size`` (grid^2) is ModelArgs' 256 (16x16, the official 256 px models) unless given."""
    w = weight_sizes(sd)
    kw = {
        k: w[k]
        for k in ("dim", "n_layer", "vocab_size", "model_type", "num_classes", "cls_token_num", "caption_dim")
        if k in w
    }
    dim, n_layer = kw["dim"], kw["n_layer"]
    n_head = overrides.get("n_head") or OFFICIAL_HEADS.get((n_layer, dim))
    if not n_head:
        raise FormatError(
            f"the checkpoint does not record its attention head count ({n_layer} layers of width {dim} is no "
            f"official LlamaGen size) and no {MODEL_ARGS} is beside it: pass --set n_head=N "
            "(in Python, overrides={'n_head': N}), and --set block_size=H*W unless its grid is 16x16"
        )
    head_dim = dim // n_head
    kw["n_head"] = n_head
    if "qkv_rows" in w:
        kw["n_kv_head"] = (w["qkv_rows"] // head_dim - n_head) // 2
    if "ffn_hidden" in w:
        for m in (256, 128, 64, 32, 16, 8, 4, 2, 1):
            if find_multiple(int(2 * (4 * dim) / 3), m) == w["ffn_hidden"]:
                kw["multiple_of"] = m
                break
    kw.update(overrides)
    args = model_args_of(kw, "--set")
    given = ", ".join(f"{k}={v}" for k, v in overrides.items())
    check_model_args(args, sd, f"--set {given}" if overrides else "the official GPT size")
    return args


def resolve_model_args(
    path: str | os.PathLike, sd: dict, given: dict, source: str, overrides: dict, beside: bool = True
) -> ModelArgs:
    """The ModelArgs of the checkpoint at ``path`` with weights ``sd``: the ``model_args.json``
    beside it, with the ``given`` values (from ``source``, e.g. a config's ``config:``) over
    it and ``overrides`` (``--set``) over both (``beside=False``: the given values already are
    a model_args file); with neither file nor given values, what ``infer_model_args`` reads
    from the weights. Checked against the weights (``check_model_args``)."""
    found = model_args_beside(path) if beside else None
    if found is not None:
        source = f"{found[1]}" + (f" with {source}" if given else "")
        given = {**found[0], **given}
    if not given:
        try:
            return infer_model_args(sd, **overrides)
        except FormatError as e:
            raise FormatError(f"{path}: {e}") from None
    if overrides:
        source = f"{source} with --set {', '.join(f'{k}={v}' for k, v in overrides.items())}"
    args = model_args_of({**given, **overrides}, source)
    check_model_args(args, sd, source)
    return args
