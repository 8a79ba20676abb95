"""Emu3.5 (BAAI): the model format of the official checkpoint, loaded without
``trust_remote_code``; the model runs with the transformers runner.

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
match on them.

Training behaviour follows the official modelling file too: ``attention_dropout`` (official
default 0.1) drops, in train mode only, the input embeddings (``Emu3Model.dropout``), the
attention probabilities, and the attention and MLP outputs before each residual add
(``Emu3DecoderLayer.dropout``). ``rope_scaling`` ``{"type": "linear" | "dynamic", "factor"}``
maps onto transformers' rope types of the same names (positions divided by the factor; NTK
base ``theta * (factor * n / max_pos - factor + 1) ** (d / (d - 2))`` for a sequence of
``n > max_position_embeddings`` positions, as the official
``Emu3DynamicNTKScalingRotaryEmbedding`` computes it on a fresh model). FlashAR's grids are
refused past ``max_position_embeddings``, so dynamic scaling never changes a patched model's
decoding or teacher forcing.

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
from torch import nn

# transformers is an optional dependency of the core: without it this plugin's import fails
# and the plugin registry hides the "emu3p5" format, naming the package.
from transformers import Qwen3Config, Qwen3ForCausalLM

from flashar_adapt.formats import ModelFormat, dtype_name
from flashar_adapt.patching import backbone_state_dict, context
from flashar_adapt.validate import state_dict_misfit

# official config.json key -> Qwen3Config key (same meaning)
_SIZE_KEYS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "hidden_act",
    "max_position_embeddings",
    "rms_norm_eps",
    "rope_theta",
    "initializer_range",
    "tie_word_embeddings",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "attention_dropout",
)
# defaults of the official Emu3Config (baaivision/Emu3.5 src/emu3p5/configuration_emu3.py) for keys a
# config.json leaves out
_OFFICIAL_DEFAULTS = dict(
    head_dim=128,
    num_key_value_heads=8,
    max_position_embeddings=9216,
    rms_norm_eps=1e-5,
    rope_theta=1e6,
    tie_word_embeddings=False,
    attention_dropout=0.1,
    hidden_act="silu",
    initializer_range=0.02,
)
# token-layout keys kept verbatim on the config (recipes match on them; official Emu3Config defaults)
TOKEN_KEYS = ("img_token_id", "boi_token_id", "eoi_token_id", "eol_token_id", "eof_token_id", "image_area")

# Emu3.5-Image t2i aspect ratios as (H, W) visual tokens: baaivision/Emu3.5 configs/example_config_t2i.py
# ``aspect_ratios`` (image_area 1048576 px, 16x down-sampling; "H*W" strings there). "auto" (the model
# picks its size) has no entry: two-way decoding needs the grid before the first step.
ASPECT_RATIOS = {
    "4:3": (55, 73),
    "21:9": (41, 97),
    "16:9": (47, 85),
    "3:2": (52, 78),
    "1:1": (64, 64),
    "3:4": (73, 55),
    "9:16": (85, 47),
    "2:3": (78, 52),
    "default": (55, 73),
}


def grid_for_aspect_ratio(aspect_ratio: str) -> tuple[int, int]:
    """The (H, W) token grid Emu3.5-Image uses for ``aspect_ratio`` (width:height as upstream
    writes it: "16:9" -> (47, 85), "default" -> (55, 73)); pass it as ``generate(grid=...)``."""
    if aspect_ratio not in ASPECT_RATIOS:
        hint = (
            " (upstream's 'auto' lets the model choose; two-way decoding needs the grid up front)"
            if aspect_ratio == "auto"
            else ""
        )
        raise ValueError(f"unknown aspect ratio {aspect_ratio!r}{hint}; known: {', '.join(ASPECT_RATIOS)}")
    return ASPECT_RATIOS[aspect_ratio]


def image_token_ids(model, codes: torch.Tensor) -> torch.Tensor:
    """The image as upstream writes it, for ``codes`` [B, H, W] from a patched model's
    ``generate``: the recipe's forced tokens (BOI "H*W" IMG), the rows at their vocabulary ids
    closed by end-of-line, the last row by ``image.last_row_end`` (EOI): [B, n]. Decoding
    this with the Emu3.5 tokenizer gives the string upstream's ``multimodal_decode`` parses."""
    ctx = context(model)
    im = ctx.recipe.image
    B, H, W = codes.shape
    ids = codes.long() + im.visual_token_offset
    if im.eol_token is not None:
        ids = torch.cat([ids, ids.new_full((B, H, 1), im.eol_token)], 2)
    ids = ids.flatten(1)
    if im.eol_token is not None and im.last_row_end is not None:
        ids[:, -1] = im.last_row_end
    meta = ids.new_tensor(ctx.meta_ids((H, W))).expand(B, -1)
    return torch.cat([meta, ids], 1)


def _drop_output(module, args, output):
    """Forward hook: the official residual dropout on a sub-block's output (identity in eval)."""
    if isinstance(output, tuple):
        return (module.output_dropout(output[0]),) + tuple(output[1:])
    return module.output_dropout(output)


def _drop_embeddings(module, args, kwargs):
    """Forward pre-hook on the decoder: the official dropout of the input embeddings, in train mode."""
    if not module.training or module.dropout.p == 0:
        return None
    embeds = kwargs.get("inputs_embeds")
    if embeds is None:
        ids = kwargs.pop("input_ids", None)
        if ids is None and args:
            ids, args = args[0], (None, *args[1:])  # keep the other positional arguments in place
        if ids is None:
            return None
        embeds = module.embed_tokens(ids)
    kwargs["inputs_embeds"] = module.dropout(embeds)
    return args, kwargs


class Emu3p5ForCausalLM(Qwen3ForCausalLM):
    """Emu3.5's ``Emu3ForCausalLM`` (same module names, same math), loadable without remote code."""

    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq"]

    def __init__(self, config):
        super().__init__(config)
        p = float(getattr(config, "attention_dropout", 0.0) or 0.0)  # also the attention probabilities' rate
        self.model.dropout = nn.Dropout(p)
        self.model.register_forward_pre_hook(_drop_embeddings, with_kwargs=True)
        for layer in self.model.layers:
            for block in (layer.self_attn, layer.mlp):
                block.output_dropout = nn.Dropout(p)  # a child of the block, so deep copies get their own
                block.register_forward_hook(_drop_output)


def config_from_official(cfg: dict):
    """Map an official Emu3.5 ``config.json`` dict onto a Qwen3Config (with the token ids kept)."""
    if cfg.get("pretraining_tp", 1) != 1:
        raise NotImplementedError("pretraining_tp > 1 is not supported (it only re-slices the same math)")
    kw = {k: cfg[k] for k in _SIZE_KEYS if cfg.get(k) is not None}
    kw["head_dim"] = cfg.get("head_dim") or _OFFICIAL_DEFAULTS["head_dim"]
    if "num_key_value_heads" in cfg and cfg["num_key_value_heads"] is None:
        kw["num_key_value_heads"] = cfg["num_attention_heads"]  # the official config's backward-compatible rule
    for k, v in _OFFICIAL_DEFAULTS.items():
        kw.setdefault(k, v)
    kw["attention_bias"] = False
    if cfg.get("rope_scaling"):
        kw["rope_parameters"] = _rope_parameters(cfg["rope_scaling"], kw.pop("rope_theta"))
    config = Qwen3Config(**kw)
    for k in TOKEN_KEYS:
        if k in cfg:
            setattr(config, k, cfg[k])
    config.emu3p5_official_config = {k: v for k, v in cfg.items() if k not in ("architectures", "auto_map")}
    config._attn_implementation = "sdpa"
    return config


def _rope_parameters(scaling, theta: float) -> dict:
    """Official ``rope_scaling`` ({"type", "factor"}: linear or dynamic) -> transformers' rope parameters."""
    kind = scaling.get("type", scaling.get("rope_type")) if isinstance(scaling, dict) else None
    factor = scaling.get("factor") if isinstance(scaling, dict) else None
    if kind not in ("linear", "dynamic"):
        raise ValueError(f"rope_scaling {scaling!r}: type must be 'linear' or 'dynamic' (the official Emu3Config's)")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor > 1:
        raise ValueError(f"rope_scaling {scaling!r}: factor must be a number > 1")
    return {"rope_type": kind, "factor": float(factor), "rope_theta": float(theta)}


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
    rp = c.rope_parameters or {}
    if rp.get("rope_type", "default") != "default":
        out["rope_scaling"] = {"type": rp["rope_type"], "factor": rp["factor"]}
    for k in TOKEN_KEYS:
        if hasattr(c, k):
            out[k] = getattr(c, k)
    out.setdefault("model_type", "Emu3")
    out["architectures"] = ["Emu3ForCausalLM"]
    out["torch_dtype"] = dtype_name(next(model.parameters()).dtype)
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
    bad = state_dict_misfit(own, sd, may_miss=["lm_head.weight"] if config.tie_word_embeddings else [])
    if bad:
        raise ValueError(f"{path}: weights do not fit an Emu3.5 decoder of this config: {bad}")
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
    sd = {
        k: v.detach().cpu().contiguous()
        for k, v in backbone_state_dict(model).items()
        if not k.endswith("rotary_emb.inv_freq")
    }
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
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    (out_dir / "config.json").write_text(json.dumps(official_config(model), indent=1))
    return out_dir


class Emu3p5Format(ModelFormat):
    """Emu3.5's official checkpoint layout (config.json with model_type "Emu3" + safetensors
    shards); ``Emu3p5ForCausalLM`` runs with the transformers runner. Spec: ``{path: the
    folder, dtype}``; ``overrides`` go to :func:`load_emu3p5` (``dtype``, ``device``)."""

    name = "emu3p5"
    runner = "transformers"
    spec_keys = ("path", "dtype")
    priority = 0

    @classmethod
    def owns(cls, model):
        return isinstance(model, Emu3p5ForCausalLM)

    @classmethod
    def sniff(cls, path):
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
        if not isinstance(data, dict) or data.get("model_type") != "Emu3" or "text_config" in data:
            return None
        return {"path": str(path.resolve())}

    @classmethod
    def load(cls, spec, root=None, overrides=None):
        path = Path(root or ".") / spec.get("path", ".")
        kw = {"dtype": getattr(torch, spec["dtype"])} if spec.get("dtype") else {}
        return load_emu3p5(path, **{**kw, **(overrides or {})})

    @classmethod
    def save(cls, model, out_dir):
        save_emu3p5(model, out_dir)
        return {"path": ".", "dtype": dtype_name(next(model.parameters()).dtype)}
