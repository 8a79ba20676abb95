"""Emu3.5 (BAAI): load the official checkpoint without ``trust_remote_code`` and run it
with the transformers backend.

Emu3.5's modelling code is not in transformers; it ships as ``src/emu3p5/modeling_emu3.py``
in github.com/baaivision/Emu3.5 (the FlashAR fork lxazjk/Emu3.5-FlashAR wraps the same
``Emu3ForCausalLM``). Its module tree, which the official checkpoints are keyed by::

    Emu3ForCausalLM
      model: Emu3Model
        embed_tokens                         nn.Embedding(vocab_size, hidden_size)
        layers[i]: Emu3DecoderLayer
          input_layernorm, post_attention_layernorm      RMSNorm(hidden_size)
          self_attn: q_proj, k_proj, v_proj, o_proj (no bias),
                     q_norm, k_norm                      RMSNorm(head_dim), per head, before RoPE
          mlp: gate_proj, up_proj, down_proj             SiLU-gated
        norm                                 RMSNorm(hidden_size)
      lm_head                                nn.Linear(hidden_size, vocab_size, bias=False)

The math of that decoder (pre-norm residual blocks, GQA attention with per-head RMSNorm
on queries and keys applied before 1D RoPE with ``rope_theta``, SiLU-gated MLP, RMSNorm in
float32) is the math of transformers' Qwen3 layers, and the attribute names are the same,
so ``Emu3p5ForCausalLM`` below is a ``Qwen3ForCausalLM`` whose state dict keys are exactly
the official ones. Only the config differs: the official ``config.json`` (model_type
``Emu3``, ``architectures: [Emu3ForCausalLM]``, an ``auto_map`` to the remote code) is read
here and mapped onto a ``Qwen3Config``; the image token ids it carries (``img_token_id``,
``boi_token_id``, ``eoi_token_id``, ``eol_token_id``, ...) stay on the config so recipes can
match on them. Dropout in the official layers is inactive in eval mode and has no weights.

Usage (see recipes/emu3.5-image.yaml)::

    from flashar_adapt.integrations.emu3p5 import load_emu3p5
    model = load_emu3p5("weights/Emu3.5-Image", dtype=torch.bfloat16)   # official HF folder
    fa.patch(model)            # auto-matches recipe "emu3.5-image"
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from flashar_adapt.backends import register_backend

from .hf import TransformersBackend

try:
    from transformers import Qwen3Config, Qwen3ForCausalLM
except ImportError:  # transformers is an optional dependency; the backend then cannot load models
    Qwen3Config = Qwen3ForCausalLM = None

# official config.json key -> Qwen3Config key (same meaning)
_SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "hidden_act", "max_position_embeddings", "rms_norm_eps", "rope_theta",
              "initializer_range", "tie_word_embeddings", "pad_token_id", "bos_token_id", "eos_token_id")
# token-layout keys kept verbatim on the config (recipes match on them; METHOD.md / Emu3 config defaults)
TOKEN_KEYS = ("img_token_id", "boi_token_id", "eoi_token_id", "eol_token_id", "eof_token_id", "image_area")

if Qwen3ForCausalLM is not None:

    class Emu3p5ForCausalLM(Qwen3ForCausalLM):
        """Emu3.5's ``Emu3ForCausalLM`` (same module names, same math), loadable without remote code."""

        _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]
else:  # pragma: no cover
    Emu3p5ForCausalLM = None


def config_from_official(cfg: dict):
    """Map an official Emu3.5 ``config.json`` dict onto a Qwen3Config (with the token ids kept)."""
    if Qwen3Config is None:
        raise ImportError("Emu3.5 support needs transformers: pip install 'flashar-adapt[hf]'")
    if cfg.get("rope_scaling"):
        raise NotImplementedError(f"rope_scaling {cfg['rope_scaling']!r} is not supported by this loader")
    if cfg.get("pretraining_tp", 1) != 1:
        raise NotImplementedError("pretraining_tp > 1 is not supported (it only re-slices the same math)")
    kw = {k: cfg[k] for k in _SIZE_KEYS if k in cfg}
    kw["head_dim"] = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    kw.setdefault("num_key_value_heads", cfg["num_attention_heads"])
    kw.setdefault("rms_norm_eps", 1e-5)
    kw.setdefault("rope_theta", 1e6)
    kw.setdefault("tie_word_embeddings", False)
    kw["attention_bias"] = False
    config = Qwen3Config(**kw)
    for k in TOKEN_KEYS:
        if k in cfg:
            setattr(config, k, cfg[k])
    config.emu3p5_official_config = {k: v for k, v in cfg.items() if k not in ("architectures", "auto_map")}
    config._attn_implementation = "sdpa"
    return config


def official_config(model) -> dict:
    """The model's config as an official Emu3.5 ``config.json`` dict."""
    c = model.config
    out = dict(getattr(c, "emu3p5_official_config", {}) or {})
    for k in _SIZE_KEYS:
        if k == "rope_theta":
            out[k] = (c.rope_parameters or {}).get("rope_theta", out.get(k))
        elif hasattr(c, k):
            out[k] = getattr(c, k)
    out["head_dim"] = c.head_dim
    for k in TOKEN_KEYS:
        if hasattr(c, k):
            out[k] = getattr(c, k)
    out.setdefault("model_type", "Emu3")
    out["architectures"] = ["Emu3ForCausalLM"]
    out["torch_dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    return out


def _read_weights(path: Path) -> dict:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights (model.safetensors or an index + shards)")
    sd: dict = {}
    for name in files:
        sd.update(load_file(str(path / name)))
    return sd


def load_emu3p5(path, dtype: torch.dtype | None = None, device: str | torch.device | None = None):
    """Build ``Emu3p5ForCausalLM`` from an official Emu3.5 folder (config.json + safetensors,
    sharded with model.safetensors.index.json or single). Local files only; no remote code."""
    path = Path(path)
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected an Emu3.5 checkpoint folder)")
    config = config_from_official(json.loads(cfg_path.read_text()))
    with torch.device("meta"):
        model = Emu3p5ForCausalLM(config)
    sd = _read_weights(path)
    sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    if config.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    unexpected = sorted(set(sd) - set(own))
    bad = [k for k in own if k in sd and tuple(own[k].shape) != tuple(sd[k].shape)]
    if missing or unexpected or bad:
        raise ValueError(f"{path}: weights do not fit an Emu3.5 decoder of this config: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}, wrong shape {bad[:4]}")
    model.load_state_dict(sd, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    # the rotary inv_freq buffer is not in checkpoints (and was on "meta"): rebuild it, in float32
    dev = next(model.parameters()).device
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config).to(dev)
    return model.eval()


def save_emu3p5(model, out_dir, max_shard_bytes: int = 5 * 2**30) -> Path:
    """Write ``model`` in the official layout: config.json + model-0000k-of-0000n.safetensors
    + model.safetensors.index.json (FlashAR modules, if patched, are left out)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
          if not k.startswith("flashar.") and not k.endswith("rotary_emb.inv_freq")}
    if model.config.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    shards: list[dict] = [{}]
    size = 0
    for k, v in sd.items():
        nbytes = v.numel() * v.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][k] = v
        size += nbytes
    n = len(shards)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        save_file(shard, str(out_dir / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    (out_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    (out_dir / "config.json").write_text(json.dumps(official_config(model), indent=1))
    return out_dir


@register_backend("emu3p5")
class Emu3p5Backend(TransformersBackend):
    """The transformers backend, reading and writing Emu3.5's official checkpoint layout."""

    def save_model(self, model, out_dir):
        save_emu3p5(model, out_dir)
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
        return {"path": ".", "dtype": dtype}

    def load_model(self, spec, root=None):
        path = Path(root or ".") / spec.get("path", ".")
        dtype = getattr(torch, spec["dtype"]) if spec.get("dtype") else None
        return load_emu3p5(path, dtype=dtype)


def _sniff(path) -> dict | None:
    """An official Emu3.5 folder: config.json with model_type "Emu3" (transformers' own Emu3
    uses "emu3" and nests text_config)."""
    path = Path(path)
    cfg = path / "config.json"
    if not (path.is_dir() and cfg.is_file()):
        return None
    try:
        data = json.loads(cfg.read_text())
    except ValueError:
        return None
    if data.get("model_type") != "Emu3" or "text_config" in data:
        return None
    return {"path": str(path.resolve())}


def _load_sniffed(spec: dict, overrides: dict | None = None):
    return load_emu3p5(spec["path"], **(overrides or {}))


Emu3p5Backend.sniff = staticmethod(_sniff)
Emu3p5Backend.load_sniffed = staticmethod(_load_sniffed)
Emu3p5Backend.sniff_priority = 0
