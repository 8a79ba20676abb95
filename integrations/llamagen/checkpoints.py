"""LlamaGen checkpoints: reading official files (without running pickled code) and
inferring the model's sizes from the weights."""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import load_file

from .model import ModelArgs, Transformer, find_multiple


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
    sd = read_state_dict(path)
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
    """Infer ModelArgs (sizes) from a state dict, for files that do not carry a config."""
    dim = sd["tok_embeddings.weight"].shape[1]
    n_layer = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("layers."))
    kw = dict(dim=dim, n_layer=n_layer, vocab_size=sd["tok_embeddings.weight"].shape[0])
    if "cls_embedding.embedding_table.weight" in sd:
        rows = sd["cls_embedding.embedding_table.weight"].shape[0]
        kw.update(model_type="c2i", num_classes=rows - 1)
    kw.update(overrides)
    valid = {f.name for f in fields(ModelArgs)}
    return ModelArgs(**{k: v for k, v in kw.items() if k in valid})


# (n_layer, dim) -> n_head of the official GPT sizes; weights do not record the head count.
_HEADS = {(12, 768): 12, (24, 1024): 16, (36, 1280): 20, (48, 1536): 24, (48, 2560): 40, (24, 3200): 32, (32, 4096): 32}


def infer_model_args(sd: dict, **overrides) -> ModelArgs:
    """Every ModelArgs field the weights determine: sizes, c2i/t2i, caption tokens, FFN rounding,
    GQA heads. ``n_head`` comes from the official size table (else ``dim // 64``) unless given;
    ``block_size`` (grid^2) defaults to 256 (16x16), also overridable."""
    kw = {
        f: getattr(config_from_state_dict(sd), f) for f in ("dim", "n_layer", "vocab_size", "model_type", "num_classes")
    }
    dim, n_layer = kw["dim"], kw["n_layer"]
    if "cls_embedding.uncond_embedding" in sd:
        tokens, channels = sd["cls_embedding.uncond_embedding"].shape
        kw.update(model_type="t2i", cls_token_num=tokens, caption_dim=channels)
    n_head = overrides.get("n_head") or _HEADS.get((n_layer, dim)) or max(1, dim // 64)
    kw["n_head"] = n_head
    qkv = sd["layers.0.attention.wqkv.weight"].shape[0]
    head_dim = dim // n_head
    kw["n_kv_head"] = (qkv // head_dim - n_head) // 2
    hidden = sd["layers.0.feed_forward.w1.weight"].shape[0]
    for m in (256, 128, 64, 32, 16, 8, 4, 2, 1):
        if find_multiple(int(2 * (4 * dim) / 3), m) == hidden:
            kw["multiple_of"] = m
            break
    kw.update(overrides)
    return ModelArgs(**kw)
