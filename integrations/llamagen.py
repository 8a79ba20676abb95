"""LlamaGen: a model definition with the official module/parameter names and config fields
(so official c2i/t2i checkpoints load as they are), checkpoint loading, and the backend.

Written from the published architecture (gpt-fast style Llama with 2D RoPE, class or caption
prefix). Prefix positions get all-zero rotary entries, as in the original, which zeroes
their queries and keys: every image token therefore attends to the prefix uniformly, and
we reproduce that rather than "fix" it, because the checkpoints were trained with it.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flashar_adapt.backends import Backend, dtype_name, register_backend
from flashar_adapt.patching import backbone_state_dict


def find_multiple(n: int, k: int) -> int:
    return n if n % k == 0 else n + k - (n % k)


@dataclass
class ModelArgs:
    dim: int = 4096
    n_layer: int = 32
    n_head: int = 32
    n_kv_head: int | None = None
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None
    rope_base: float = 10000
    norm_eps: float = 1e-5
    initializer_range: float = 0.02
    token_dropout_p: float = 0.1
    attn_dropout_p: float = 0.0
    resid_dropout_p: float = 0.1
    ffn_dropout_p: float = 0.1
    drop_path_rate: float = 0.0
    num_classes: int = 1000
    caption_dim: int = 2048
    class_dropout_prob: float = 0.1
    model_type: str = "c2i"
    vocab_size: int = 16384
    cls_token_num: int = 1
    block_size: int = 256
    max_batch_size: int = 32
    max_seq_len: int = 2048

    def __post_init__(self):
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head


class LabelEmbedder(nn.Module):
    """Class ids -> one prefix token; row ``num_classes`` is the CFG null class."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        if force_drop_ids is None:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        else:
            drop = force_drop_ids == 1
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels, train: bool = False, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels).unsqueeze(1)


class MLP(nn.Module):
    def __init__(self, in_features: int, hidden_features: int, out_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=False)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden_features, out_features, bias=False)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class CaptionEmbedder(nn.Module):
    """Caption features (T5) -> prefix tokens; ``uncond_embedding`` is the CFG null caption."""

    def __init__(self, in_channels: int, hidden_size: int, uncond_prob: float, token_num: int = 120):
        super().__init__()
        self.cap_proj = MLP(in_channels, hidden_size, hidden_size)
        self.register_buffer("uncond_embedding", torch.randn(token_num, in_channels) / in_channels ** 0.5)
        self.uncond_prob = uncond_prob

    def forward(self, caption, train: bool = False, force_drop_ids=None):
        if (train and self.uncond_prob > 0) or force_drop_ids is not None:
            drop = (torch.rand(caption.shape[0], device=caption.device) < self.uncond_prob
                    if force_drop_ids is None else force_drop_ids == 1)
            caption = torch.where(drop[:, None, None], self.uncond_embedding.to(caption.dtype), caption)
        return self.cap_proj(caption)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.weight


class FeedForward(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        hidden = int(2 * (4 * config.dim) / 3)
        if config.ffn_dim_multiplier is not None:
            hidden = int(config.ffn_dim_multiplier * hidden)
        hidden = find_multiple(hidden, config.multiple_of)
        self.w1 = nn.Linear(config.dim, hidden, bias=False)
        self.w3 = nn.Linear(config.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, config.dim, bias=False)
        self.ffn_dropout = nn.Dropout(config.ffn_dropout_p)

    def forward(self, x):
        return self.ffn_dropout(self.w2(F.silu(self.w1(x)) * self.w3(x)))


class KVCache(nn.Module):
    """Static cache indexed by sequence slot, so tokens may be written in any order."""

    def __init__(self, max_batch_size, max_seq_length, n_head, head_dim, dtype):
        super().__init__()
        shape = (max_batch_size, n_head, max_seq_length, head_dim)
        self.register_buffer("k_cache", torch.zeros(shape, dtype=dtype), persistent=False)
        self.register_buffer("v_cache", torch.zeros(shape, dtype=dtype), persistent=False)

    def update(self, input_pos, k_val, v_val):
        """``input_pos``: slot indices (the original, slot-indexed use: returns the whole
        cache), or a ``slice(start, stop)`` of cache entries filled in feeding order
        (flashar decoding: returns entries [0, stop), views, nothing allocated)."""
        B = k_val.shape[0]
        if isinstance(input_pos, slice):
            self.k_cache[:B, :, input_pos] = k_val
            self.v_cache[:B, :, input_pos] = v_val
            return self.k_cache[:B, :, : input_pos.stop], self.v_cache[:B, :, : input_pos.stop]
        self.k_cache[:B, :, input_pos] = k_val
        self.v_cache[:B, :, input_pos] = v_val
        return self.k_cache[:B], self.v_cache[:B]


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    # x [B, T, heads, hd]; freqs_cis [T, hd/2, 2] holding (cos, sin)
    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    f = freqs_cis.view(1, xs.shape[1], 1, xs.shape[3], 2)
    out = torch.stack([xs[..., 0] * f[..., 0] - xs[..., 1] * f[..., 1],
                       xs[..., 1] * f[..., 0] + xs[..., 0] * f[..., 1]], -1)
    return out.flatten(3).type_as(x)


class Attention(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.dim = config.dim
        self.head_dim = config.dim // config.n_head
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        total = (config.n_head + 2 * config.n_kv_head) * self.head_dim
        self.wqkv = nn.Linear(config.dim, total, bias=False)
        self.wo = nn.Linear(config.dim, config.dim, bias=False)
        self.kv_cache: KVCache | None = None
        self.attn_dropout_p = config.attn_dropout_p
        self.resid_dropout = nn.Dropout(config.resid_dropout_p)

    def forward(self, x, freqs_cis, input_pos=None, mask=None):
        B, T, _ = x.shape
        kv = self.n_kv_head * self.head_dim
        q, k, v = self.wqkv(x).split([self.dim, kv, kv], dim=-1)
        q = apply_rotary_emb(q.view(B, T, self.n_head, self.head_dim), freqs_cis)
        k = apply_rotary_emb(k.view(B, T, self.n_kv_head, self.head_dim), freqs_cis)
        v = v.view(B, T, self.n_kv_head, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if self.kv_cache is not None and input_pos is not None:
            k, v = self.kv_cache.update(input_pos, k, v)
        if self.n_head != self.n_kv_head:  # repeat_interleave(1) would copy the whole cache
            k = k.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
            v = v.repeat_interleave(self.n_head // self.n_kv_head, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                             dropout_p=self.attn_dropout_p if self.training else 0.0)
        return self.resid_dropout(self.wo(out.transpose(1, 2).reshape(B, T, self.dim)))


class DropPath(nn.Module):
    def __init__(self, p: float = 0.0):
        super().__init__()
        self.p = p

    def forward(self, x):
        if self.p == 0.0 or not self.training:
            return x
        keep = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelArgs, drop_path: float = 0.0):
        super().__init__()
        self.attention = Attention(config)
        self.feed_forward = FeedForward(config)
        self.attention_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.ffn_norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.drop_path = DropPath(drop_path)

    def forward(self, x, freqs_cis, start_pos=None, mask=None):
        h = x + self.drop_path(self.attention(self.attention_norm(x), freqs_cis, start_pos, mask))
        return h + self.drop_path(self.feed_forward(self.ffn_norm(h)))


def precompute_freqs_cis_2d(grid_size: int, n_elem: int, base: float = 10000, cls_token_num: int = 120) -> torch.Tensor:
    """[cls_token_num + grid^2, n_elem/2, 2] (cos, sin); half the pairs rotate by row, half by
    column; the prefix rows are all zero, as in the original."""
    half = n_elem // 2
    inv = 1.0 / (base ** (torch.arange(0, half, 2)[: half // 2].float() / half))
    t = torch.arange(grid_size, dtype=torch.float32)
    f = torch.outer(t, inv)  # [G, hd/4]
    grid = torch.cat([f[:, None, :].expand(-1, grid_size, -1), f[None, :, :].expand(grid_size, -1, -1)], -1)
    cache = torch.stack([torch.cos(grid), torch.sin(grid)], -1).flatten(0, 1)
    return torch.cat([torch.zeros(cls_token_num, n_elem // 2, 2), cache])


class Transformer(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.config = config
        self.n_layer = config.n_layer
        self.block_size = config.block_size
        self.num_classes = config.num_classes
        self.model_type = config.model_type
        self.cls_token_num = config.cls_token_num
        if config.model_type == "c2i":
            self.cls_embedding = LabelEmbedder(config.num_classes, config.dim, config.class_dropout_prob)
        elif config.model_type == "t2i":
            self.cls_embedding = CaptionEmbedder(config.caption_dim, config.dim, config.class_dropout_prob,
                                                 token_num=config.cls_token_num)
        else:
            raise ValueError(f"model_type must be 'c2i' or 't2i', got {config.model_type!r}")
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout_p)
        rates = [x.item() for x in torch.linspace(0, config.drop_path_rate, config.n_layer)]
        self.layers = nn.ModuleList(TransformerBlock(config, rates[i]) for i in range(config.n_layer))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        grid_size = int(self.block_size ** 0.5)
        assert grid_size * grid_size == self.block_size, "block_size must be a square grid"
        # A plain attribute (not a buffer): official checkpoints do not store it.
        self.freqs_cis = precompute_freqs_cis_2d(grid_size, config.dim // config.n_head, config.rope_base,
                                                 config.cls_token_num)
        self.max_batch_size = -1
        self.max_seq_length = -1
        self.initialize_weights()

    def initialize_weights(self):
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, nn.Linear):
                m.weight.data.normal_(0.0, std)
                if m.bias is not None:
                    m.bias.data.zero_()
            elif isinstance(m, nn.Embedding):
                m.weight.data.normal_(0.0, std)
        nn.init.constant_(self.output.weight, 0)

    def setup_caches(self, max_batch_size: int, max_seq_length: int, dtype=None):
        dtype = dtype or self.tok_embeddings.weight.dtype
        setup_kv_caches(self.layers, max_batch_size, max_seq_length, self.config, dtype)
        self.max_batch_size, self.max_seq_length = max_batch_size, max_seq_length

    def forward(self, idx, cond_idx, input_pos=None, targets=None, mask=None, valid=None):
        """Training / naive forward: ``cond_idx`` prefix then ``idx`` codes, causal.
        Returns (logits from the last prefix position on, loss)."""
        cond = self.cls_embedding(cond_idx, train=self.training)[:, : self.cls_token_num]
        h = cond if idx is None else torch.cat([cond, self.tok_embeddings(idx)], 1)
        h = self.tok_dropout(h)
        freqs = self.freqs_cis.to(h.device)[: h.shape[1]]
        for layer in self.layers:
            h = layer(h, freqs, None, mask)
        logits = self.output(self.norm(h)).float()[:, self.cls_token_num - 1:]
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss


def setup_kv_caches(layers, batch, seq_len, config: ModelArgs, dtype):
    hd = config.dim // config.n_head
    for layer in layers:
        dev = layer.attention.wqkv.weight.device
        layer.attention.kv_cache = KVCache(batch, seq_len, config.n_kv_head, hd, dtype).to(dev)


def _gpt(**kw):
    def make(**extra):
        return Transformer(ModelArgs(**{**kw, **extra}))
    return make


GPT_B = _gpt(n_layer=12, n_head=12, dim=768)
GPT_L = _gpt(n_layer=24, n_head=16, dim=1024)
GPT_XL = _gpt(n_layer=36, n_head=20, dim=1280)
GPT_XXL = _gpt(n_layer=48, n_head=24, dim=1536)
GPT_XXXL = _gpt(n_layer=48, n_head=40, dim=2560)
GPT_3B = _gpt(n_layer=24, n_head=32, dim=3200)
GPT_7B = _gpt(n_layer=32, n_head=32, dim=4096)
GPT_models = {
    "GPT-B": GPT_B, "GPT-L": GPT_L, "GPT-XL": GPT_XL, "GPT-XXL": GPT_XXL,
    "GPT-XXXL": GPT_XXXL, "GPT-3B": GPT_3B, "GPT-7B": GPT_7B,
}


# ---------------------------------------------------------------- checkpoints

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
    bad = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if bad:
        raise ValueError(f"{path}: checkpoint does not match the model (other sizes?): {bad[:3]}")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.endswith(("k_cache", "v_cache"))]
    if strict and (missing or unexpected):
        raise ValueError(f"{path}: checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model


# ---------------------------------------------------------------- backend

@register_backend("llamagen")
class LlamaGenBackend(Backend):
    """Runs ``model.layers`` with slot-indexed 2D RoPE and static per-layer caches."""

    static_caches = True

    def validate(self, ctx) -> None:
        if not isinstance(getattr(ctx.model, "config", None), ModelArgs):
            from flashar_adapt.recipe import RecipeError

            raise RecipeError("backend", f"'llamagen' needs a LlamaGen Transformer, got {type(ctx.model).__name__}",
                              ctx.recipe.source)

    def max_positions(self, ctx):
        return ctx.model.freqs_cis.shape[0]

    def run(self, ctx, embeds, positions, slots, key_slots, allowed, cache, entries=None):
        h = ctx.model.tok_dropout(embeds)
        freqs, start, mask = _step_inputs(ctx, embeds, slots, key_slots, allowed, cache, entries)
        if ctx.gradient_checkpointing and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            for layer in ctx.layers:
                h = checkpoint(layer, h, freqs, start, mask, use_reentrant=False)
        else:
            for layer in ctx.layers:
                h = layer(h, freqs, start, mask)
        return ctx.norm(h)

    def new_cache(self, ctx, batch, max_len, static=False):
        return _Cache(ctx.model, _ensure_caches(ctx.layers, batch, max_len, ctx.model, static), max_len)

    def new_branch_cache(self, ctx, batch, max_len, static=False):
        branch = ctx.flashar.branch_layers
        a = ctx.layers[ctx.branch_index]
        if _DualBlock.eligible(a, branch):
            cache = _Cache(ctx.model, False, max_len)
            key = _DualBlock.key_of(a, branch[0], batch, max_len)
            pair = self.__dict__.get("pair")
            if pair is None or pair.key != key:
                pair = self.pair = _DualBlock(a, branch[0], batch, max_len)
            else:
                pair.load(a, branch[0])
            cache.pair = pair
            return cache
        return _Cache(ctx.model, _ensure_caches(branch, batch, max_len, ctx.model, static), max_len)

    def run_with_branch(self, ctx, embeds, positions, slots, key_slots, allowed, cache, branch_cache, entries=None):
        pair = getattr(branch_cache, "pair", None)
        if pair is None or torch.is_grad_enabled():
            return None
        h = ctx.model.tok_dropout(embeds)
        freqs, start, mask = _step_inputs(ctx, embeds, slots, key_slots, allowed, cache, entries)
        x = None
        for i, layer in enumerate(ctx.layers):
            if i == ctx.branch_index:
                h, x = pair(h, freqs, start, mask)
            else:
                h = layer(h, freqs, start, mask)
        return ctx.norm(h), x

    def prepare_branch_layers(self, layers):
        for layer in layers:
            layer.attention.kv_cache = None

    def branch_call(self, layer, hidden, args, kwargs, cache):
        return layer(hidden, *args[1:], **kwargs)

    def save_model(self, model, out_dir):
        out_dir = Path(out_dir)
        sd = backbone_state_dict(model)
        torch.save({"model": sd}, out_dir / "llamagen.pt")  # the official {"model": ...} layout
        args = {f.name: getattr(model.config, f.name) for f in fields(ModelArgs)}
        (out_dir / "model_args.json").write_text(json.dumps(args, indent=1))
        dtype = dtype_name(model.tok_embeddings.weight.dtype)
        return {"checkpoint": "llamagen.pt", "model_args": "model_args.json", "dtype": dtype}

    def load_model(self, spec, root=None):
        """spec: {checkpoint: path (.pt/.pth/.safetensors), model_args: json path | config: {...} |
        gpt_model: "GPT-B" (+ config overrides), dtype}. Without any config the sizes are
        inferred from the weights."""
        root = Path(root or ".")
        ckpt = spec.get("checkpoint")
        cfg = dict(spec.get("config") or {})
        if spec.get("model_args"):
            cfg = {**json.loads((root / spec["model_args"]).read_text()), **cfg}
        if ckpt is None:
            if not cfg and not spec.get("gpt_model"):
                raise ValueError("model spec needs 'checkpoint' or a 'config'/'gpt_model' to build from")
            model = GPT_models[spec["gpt_model"]](**cfg) if spec.get("gpt_model") else Transformer(ModelArgs(**cfg))
        else:
            path = root / ckpt
            if spec.get("gpt_model"):
                model = GPT_models[spec["gpt_model"]](**cfg)
            elif cfg:
                model = Transformer(ModelArgs(**cfg))
            else:
                model = Transformer(config_from_state_dict(read_state_dict(path)))
            load_checkpoint(model, path)
        if spec.get("dtype"):
            model = model.to(getattr(torch, spec["dtype"]))
        return model.eval()


def _step_inputs(ctx, embeds, slots, key_slots, allowed, cache, entries=None):
    """Rotary rows, cache entries to fill and the attention mask of one backend call.

    With a cache, entries are filled in feeding order (key_slots order): the new tokens go
    to entries [S - T, S) and attend entries [0, S), so the mask is ``allowed`` itself (a
    view) and attention never reads past the filled part of the cache. Static caches get
    the entries as a tensor and attend the whole cache (``KVCache.update``'s index path)."""
    if cache is None:
        return ctx.model.freqs_cis.to(embeds.device)[slots], None, allowed[:, None]
    if entries is not None:
        return cache.freqs(embeds.device)[slots], entries, allowed[:, None]
    S, T = key_slots.shape[0], embeds.shape[1]
    if S > cache.max_len:
        raise ValueError(f"{S} keys do not fit the cache ({cache.max_len} entries)")
    return cache.freqs(embeds.device)[slots], slice(S - T, S), allowed[:, None]


class _DualBlock:
    """The backbone block at the branch index and its vertical-branch copy, run as one.

    Both read the same input, so every projection becomes one batched matmul over the two
    stacked weights and the attention one call over both caches. At small decoding batches
    each op costs mostly its fixed overhead, so this makes the branch nearly free instead of
    one more block per step. Same arithmetic as the two separate calls. The backend keeps
    one between generate() calls of the same blocks, batch and length (a CUDA graph of the
    compiled step replays on its buffers) and reloads the weights into it at every call
    (``load``): weights changed in between, even through ``.data``, are always the ones used."""

    _STACKED = {  # name: (weight of a block, stacked layout)
        "attn_norm": (lambda m: m.attention_norm.weight, "row"),  # [2, 1, D]
        "ffn_norm": (lambda m: m.ffn_norm.weight, "row"),
        "wqkv": (lambda m: m.attention.wqkv.weight, "t"),  # [2, D, (H+2Hkv)hd]
        "wo": (lambda m: m.attention.wo.weight, "t"),
        "w1": (lambda m: m.feed_forward.w1.weight, "t"),
        "w3": (lambda m: m.feed_forward.w3.weight, "t"),
        "w2": (lambda m: m.feed_forward.w2.weight, "t"),
    }

    @staticmethod
    def key_of(a, b, batch: int, max_len: int) -> tuple:
        w = a.attention.wqkv.weight
        shapes = tuple(get(a).shape for get, _ in _DualBlock._STACKED.values())
        return id(a), id(b), batch, max_len, w.dtype, w.device, shapes

    def __init__(self, a: "TransformerBlock", b: "TransformerBlock", batch: int, max_len: int):
        self.key = self.key_of(a, b, batch, max_len)
        self._base = {}
        for name, (get, layout) in self._STACKED.items():
            w = get(a)
            base = self._base[name] = torch.empty((2, *w.shape), dtype=w.dtype, device=w.device)
            setattr(self, name, base[:, None] if layout == "row" else base.transpose(1, 2))
        self.load(a, b)
        self.eps = (a.attention_norm.eps, a.ffn_norm.eps)
        att = a.attention
        self.dim, self.n_head, self.n_kv, self.hd = att.dim, att.n_head, att.n_kv_head, att.head_dim
        w = att.wqkv.weight
        shape = (2 * batch, self.n_kv, max_len, self.hd)  # [backbone rows; branch rows]
        # zeros: static decoding attends unwritten entries under the mask (0 * garbage may be NaN)
        self.k = torch.zeros(shape, dtype=w.dtype, device=w.device)
        self.v = torch.zeros(shape, dtype=w.dtype, device=w.device)
        if w.is_cuda:  # a CUDA graph of the compiled step replays on these very buffers
            from torch import _dynamo

            for t in (self.k, self.v, *self._base.values()):
                _dynamo.mark_static_address(t)

    def load(self, a: "TransformerBlock", b: "TransformerBlock") -> None:
        """Copy both blocks' current weights into the stacked buffers."""
        for name, (get, _) in self._STACKED.items():
            self._base[name][0].copy_(get(a).detach())
            self._base[name][1].copy_(get(b).detach())

    @staticmethod
    def eligible(a, branch) -> bool:
        """Only plain (eval-mode, unwrapped) LlamaGen blocks: LoRA wrappers, hooks or
        dropout take the generic path."""
        if torch.is_grad_enabled() or len(branch) != 1:
            return False
        mods = []
        for blk in (a, branch[0]):
            if type(blk) is not TransformerBlock or blk.training or blk._forward_hooks:
                return False
            att, ff = blk.attention, blk.feed_forward
            mods += [att.wqkv, att.wo, ff.w1, ff.w2, ff.w3]
        return all(type(m) is nn.Linear and m.bias is None and not m._forward_hooks and not m._forward_pre_hooks
                   for m in mods)

    @staticmethod
    def _norm(x, w, eps):
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x) * w

    def __call__(self, x, freqs, start: slice | torch.Tensor, mask):
        B, T, D = x.shape
        N, H, Hkv, hd = B * T, self.n_head, self.n_kv, self.hd
        x = x.reshape(1, N, D)
        qkv = torch.bmm(self._norm(x, self.attn_norm, self.eps[0]), self.wqkv)  # [2, N, .]
        q, k, v = qkv.split([H * hd, Hkv * hd, Hkv * hd], dim=-1)
        q = apply_rotary_emb(q.reshape(2 * B, T, H, hd), freqs).transpose(1, 2)
        k = apply_rotary_emb(k.reshape(2 * B, T, Hkv, hd), freqs).transpose(1, 2)
        self.k[:, :, start] = k
        self.v[:, :, start] = v.reshape(2 * B, T, Hkv, hd).transpose(1, 2)
        keys, vals = (self.k[:, :, : start.stop], self.v[:, :, : start.stop]) if isinstance(start, slice) \
            else (self.k, self.v)  # static: entries as a tensor, the whole cache under the mask
        if H != Hkv:
            keys = keys.repeat_interleave(H // Hkv, dim=1)
            vals = vals.repeat_interleave(H // Hkv, dim=1)
        out = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask.repeat(2, 1, 1, 1))
        h = x + torch.bmm(out.transpose(1, 2).reshape(2, N, D), self.wo)
        n = self._norm(h, self.ffn_norm, self.eps[1])
        h = h + torch.bmm(F.silu(torch.bmm(n, self.w1)) * torch.bmm(n, self.w3), self.w2)
        return h[0].view(B, T, D), h[1].view(B, T, D)


class _Cache:
    """What new_cache returns: the static per-layer caches live on the attention modules;
    this records their length and keeps the rotary table on the decoding device."""

    def __init__(self, model, allocated: bool, max_len: int):
        self.model, self.allocated, self.max_len = model, allocated, max_len
        self._freqs = None
        self.pair: _DualBlock | None = None  # branch caches only: the fused branch block

    def freqs(self, device):
        f = self._freqs
        if f is None or f.device != device:
            f = self._freqs = self.model.freqs_cis.to(device)
        return f


def _ensure_caches(layers, batch: int, max_len: int, model, exact: bool = False) -> bool:
    """Static caches of at least [batch, max_len] on every layer (``exact``: exactly max_len
    entries, which static decoding attends whole); reuses the ones already there when they
    fit (nothing past the filled entries is ever read, or it is masked). Returns whether
    new buffers were allocated."""
    dtype = model.tok_embeddings.weight.dtype
    for layer in layers:
        c = layer.attention.kv_cache
        w = layer.attention.wqkv.weight
        if not (isinstance(c, KVCache) and c.k_cache.dtype == dtype and c.k_cache.device == w.device
                and c.k_cache.shape[0] >= batch and c.k_cache.shape[2] >= max_len
                and (not exact or c.k_cache.shape[2] == max_len)):
            break
    else:
        return False
    setup_kv_caches(layers, batch, max_len, model.config, dtype)
    return True


def read_state_dict(path: Path) -> dict:
    """The state dict of a LlamaGen checkpoint: safetensors, or a .pt read with
    ``weights_only=True`` in either official layout ({"model": ...} or raw)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

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


# ---------------------------------------------------------------- discovery (inspect / check)

# (n_layer, dim) -> n_head of the official GPT sizes; weights do not record the head count.
_HEADS = {(12, 768): 12, (24, 1024): 16, (36, 1280): 20, (48, 1536): 24, (48, 2560): 40, (24, 3200): 32, (32, 4096): 32}


def infer_model_args(sd: dict, **overrides) -> ModelArgs:
    """Every ModelArgs field the weights determine: sizes, c2i/t2i, caption tokens, FFN rounding,
    GQA heads. ``n_head`` comes from the official size table (else ``dim // 64``) unless given;
    ``block_size`` (grid^2) defaults to 256 (16x16), also overridable."""
    kw = {f: getattr(config_from_state_dict(sd), f) for f in ("dim", "n_layer", "vocab_size", "model_type", "num_classes")}
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


def _sniff(path) -> dict | None:
    path = Path(path)
    if not (path.is_file() and path.suffix in (".pt", ".pth", ".safetensors")):
        return None
    try:
        sd = read_state_dict(path)
    except Exception:  # noqa: BLE001 - not a LlamaGen file
        return None
    if "tok_embeddings.weight" not in sd or "layers.0.attention.wqkv.weight" not in sd:
        return None
    return {"checkpoint": str(path.resolve())}


def _load_sniffed(spec: dict, overrides: dict | None = None) -> Transformer:
    path = Path(spec["checkpoint"])
    sd = read_state_dict(path)
    args = infer_model_args(sd, **(overrides or {}))
    return load_checkpoint(Transformer(args), path).eval()


def _reference_logits(ctx, cond, codes) -> torch.Tensor:
    """The model's own (naive, causal) forward: next-code logits [B, H, W, K]."""
    B, H, W = codes.shape
    logits, _ = ctx.model(codes.reshape(B, -1)[:, :-1], cond)
    return logits.view(B, H, W, -1)[..., : ctx.recipe.image.codebook_size]


LlamaGenBackend.sniff = staticmethod(_sniff)
LlamaGenBackend.load_sniffed = staticmethod(_load_sniffed)
LlamaGenBackend.reference_logits = staticmethod(_reference_logits)


# ---------------------------------------------------------------- VQ tokenizer (VQ-8 / VQ-16)
# The published LlamaGen image tokenizer, written from its description with the official
# module and parameter names (encoder.conv_blocks.{i}.res.{j}.conv1, quantize.embedding, ...)
# so `vq_ds16_c2i.pt`-style checkpoints load as they are. Images enter in [-1, 1].

@dataclass
class VQModelArgs:
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    encoder_ch_mult: tuple = (1, 1, 2, 2, 4)
    decoder_ch_mult: tuple = (1, 1, 2, 2, 4)
    z_channels: int = 256
    dropout_p: float = 0.0
    ch: int = 128  # fixed in the original; a field here so tiny test models can be built
    num_res_blocks: int = 2


def _group_norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def _swish(x):
    return x * torch.sigmoid(x)


class VQResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, dropout: float = 0.0):
        super().__init__()
        self.norm1, self.conv1 = _group_norm(cin), nn.Conv2d(cin, cout, 3, 1, 1)
        self.norm2, self.conv2 = _group_norm(cout), nn.Conv2d(cout, cout, 3, 1, 1)
        self.dropout = nn.Dropout(dropout)
        if cin != cout:
            self.nin_shortcut = nn.Conv2d(cin, cout, 1)

    def forward(self, x):
        h = self.conv1(_swish(self.norm1(x)))
        h = self.conv2(self.dropout(_swish(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class VQAttnBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm = _group_norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        h = self.norm(x)
        B, C, H, W = x.shape
        q, k, v = (m(h).reshape(B, C, H * W).transpose(1, 2) for m in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(C)) v
        return x + self.proj_out(out.transpose(1, 2).reshape(B, C, H, W))


class VQDownsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 2, 0)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as the original


class VQUpsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _mid(c: int, dropout: float) -> nn.ModuleList:
    return nn.ModuleList([VQResnetBlock(c, c, dropout), VQAttnBlock(c), VQResnetBlock(c, c, dropout)])


class VQEncoder(nn.Module):
    def __init__(self, a: VQModelArgs, in_channels: int = 3):
        super().__init__()
        mult, n = tuple(a.encoder_ch_mult), a.num_res_blocks
        self.conv_in = nn.Conv2d(in_channels, a.ch, 3, 1, 1)
        self.conv_blocks = nn.ModuleList()
        cin = a.ch
        for i, m in enumerate(mult):
            block = nn.Module()
            block.res = nn.ModuleList()
            block.attn = nn.ModuleList()
            for _ in range(n):
                block.res.append(VQResnetBlock(cin, a.ch * m, a.dropout_p))
                cin = a.ch * m
                if i == len(mult) - 1:
                    block.attn.append(VQAttnBlock(cin))
            if i != len(mult) - 1:
                block.downsample = VQDownsample(cin)
            self.conv_blocks.append(block)
        self.mid = _mid(cin, a.dropout_p)
        self.norm_out = _group_norm(cin)
        self.conv_out = nn.Conv2d(cin, a.z_channels, 3, 1, 1)

    def forward(self, x):
        h = _run_levels(self.conv_blocks, self.conv_in(x), "downsample")
        for m in self.mid:
            h = m(h)
        return self.conv_out(_swish(self.norm_out(h)))


def _run_levels(blocks, h, resample: str):
    """Each resolution level: its resnet blocks (each followed by its attention block where
    the level has attention), then its down/up-sampling if it has one."""
    for block in blocks:
        for j, res in enumerate(block.res):
            h = res(h)
            if len(block.attn):
                h = block.attn[j](h)
        if hasattr(block, resample):
            h = getattr(block, resample)(h)
    return h


class VQDecoder(nn.Module):
    def __init__(self, a: VQModelArgs, out_channels: int = 3):
        super().__init__()
        mult, n = tuple(a.decoder_ch_mult), a.num_res_blocks
        cin = a.ch * mult[-1]
        self.conv_in = nn.Conv2d(a.z_channels, cin, 3, 1, 1)
        self.mid = _mid(cin, a.dropout_p)
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(len(mult))):
            block = nn.Module()
            block.res = nn.ModuleList()
            block.attn = nn.ModuleList()
            for _ in range(n + 1):
                block.res.append(VQResnetBlock(cin, a.ch * mult[i], a.dropout_p))
                cin = a.ch * mult[i]
                if i == len(mult) - 1:
                    block.attn.append(VQAttnBlock(cin))
            if i != 0:
                block.upsample = VQUpsample(cin)
            self.conv_blocks.append(block)
        self.norm_out = _group_norm(cin)
        self.conv_out = nn.Conv2d(cin, out_channels, 3, 1, 1)

    def forward(self, z):
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        h = _run_levels(self.conv_blocks, h, "upsample")
        return self.conv_out(_swish(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    """Nearest codebook entry; with ``l2_norm`` both sides are unit-normalised first."""

    def __init__(self, n_e: int, e_dim: int, l2_norm: bool = True, show_usage: bool = True):
        super().__init__()
        self.n_e, self.e_dim, self.l2_norm = n_e, e_dim, l2_norm
        self.embedding = nn.Embedding(n_e, e_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / n_e, 1.0 / n_e)
        if show_usage:  # usage statistics of training; kept so official checkpoints load strictly
            self.register_buffer("codebook_used", torch.zeros(65536))

    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, p=2, dim=-1) if self.l2_norm else w

    def indices(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, C, h, w] -> code indices [B, h, w]."""
        B, C, h, w = z.shape
        zf = z.permute(0, 2, 3, 1).reshape(-1, C)
        if self.l2_norm:
            zf = F.normalize(zf, p=2, dim=-1)
        e = self.codebook()
        d = (zf ** 2).sum(1, keepdim=True) + (e ** 2).sum(1)[None] - 2 * zf @ e.T
        return d.argmin(1).view(B, h, w)

    def get_codebook_entry(self, indices: torch.Tensor) -> torch.Tensor:
        """indices [B, h, w] -> quantised latents [B, C, h, w]."""
        return self.codebook()[indices].permute(0, 3, 1, 2).contiguous()


class VQModel(nn.Module):
    def __init__(self, config: VQModelArgs):
        super().__init__()
        self.config = config
        self.encoder = VQEncoder(config)
        self.decoder = VQDecoder(config)
        self.quantize = VectorQuantizer(config.codebook_size, config.codebook_embed_dim, config.codebook_l2_norm,
                                        config.codebook_show_usage)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.config.encoder_ch_mult) - 1)

    def encode_indices(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] [B, 3, H, W] -> codes [B, H/ds, W/ds]."""
        return self.quantize.indices(self.quant_conv(self.encoder(x)))

    def decode_code(self, codes: torch.Tensor) -> torch.Tensor:
        """Codes [B, h, w] -> images in (about) [-1, 1] [B, 3, h*ds, w*ds]."""
        return self.decoder(self.post_quant_conv(self.quantize.get_codebook_entry(codes)))


def VQ_8(**kw) -> VQModel:
    return VQModel(VQModelArgs(encoder_ch_mult=(1, 2, 2, 4), decoder_ch_mult=(1, 2, 2, 4), **kw))


def VQ_16(**kw) -> VQModel:
    return VQModel(VQModelArgs(encoder_ch_mult=(1, 1, 2, 2, 4), decoder_ch_mult=(1, 1, 2, 2, 4), **kw))


def vq_args_from_state_dict(sd: dict) -> VQModelArgs:
    """Every VQModelArgs field the weights determine (channel multipliers, widths, codebook)."""
    try:
        ch = sd["encoder.conv_in.weight"].shape[0]
        n_enc = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.conv_blocks."))
        n_dec = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("decoder.conv_blocks."))
        n_res = 1 + max(int(k.split(".")[4]) for k in sd if k.startswith("encoder.conv_blocks.0.res."))
        enc = tuple(sd[f"encoder.conv_blocks.{i}.res.0.conv1.weight"].shape[0] // ch for i in range(n_enc))
        # decoder blocks run from the deepest level up, so block i holds multiplier [n-1-i]
        dec = tuple(sd[f"decoder.conv_blocks.{n_dec - 1 - i}.res.0.conv1.weight"].shape[0] // ch for i in range(n_dec))
        n_e, e_dim = sd["quantize.embedding.weight"].shape
    except (KeyError, ValueError) as e:
        raise ValueError(f"not a LlamaGen VQ state dict (missing {e})") from None
    return VQModelArgs(codebook_size=n_e, codebook_embed_dim=e_dim, encoder_ch_mult=enc, decoder_ch_mult=dec,
                       z_channels=sd["encoder.conv_out.weight"].shape[0], ch=ch, num_res_blocks=n_res,
                       codebook_show_usage="quantize.codebook_used" in sd)


def _read_vq_state_dict(path: Path) -> dict:
    """A VQ checkpoint's weights, without running pickled code: safetensors, or torch.load
    with weights_only=True. Training checkpoints also hold the run's argparse.Namespace,
    plain data, so that one class is allowed."""
    if path.suffix == ".safetensors":
        return read_state_dict(path)
    import argparse

    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    return extract_state_dict(obj)


def load_vq(path: str | os.PathLike, **overrides) -> VQModel:
    """A LlamaGen VQ model from its checkpoint (sizes read from the weights)."""
    path = Path(path)
    sd = {k: v for k, v in _read_vq_state_dict(path).items() if k.split(".")[0] in
          ("encoder", "decoder", "quantize", "quant_conv", "post_quant_conv")}  # drops a discriminator, if any
    args = vq_args_from_state_dict(sd)
    known = {f.name for f in fields(args)}
    for k, v in overrides.items():
        if k not in known:  # setattr would add an attribute nobody reads
            raise ValueError(f"tokenizer.config: {k!r} is not a VQ setting (known: {sorted(known)})")
        setattr(args, k, v)
    model = VQModel(args)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shapes the overrides changed
        raise ValueError(f"{path}: the weights do not fit the VQ model with tokenizer.config {overrides}: "
                         f"{' '.join(str(e).split())[:300]}") from None
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the VQ model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return model.eval()


from flashar_adapt.tokenizers import ImageTokenizer, TokenizerError, denormalize, normalize, register_tokenizer  # noqa: E402


class LlamaGenVQTokenizer(ImageTokenizer):
    def __init__(self, vq: VQModel, spec):
        ds = vq.downsample
        size = tuple(spec.image_size)
        if spec.downsample is not None and spec.downsample != ds:
            raise TokenizerError(f"tokenizer.downsample is {spec.downsample}, but this VQ model downsamples by {ds}")
        if size[0] % ds or size[1] % ds:
            raise TokenizerError(f"image size {list(size)} is not a multiple of the VQ downsampling factor {ds}")
        self.vq, self.spec = vq.eval(), spec
        self.codebook_size, self.image_size, self.channels = vq.config.codebook_size, size, 3
        self.grid = (size[0] // ds, size[1] // ds)

    def _device(self):
        return self.vq.quant_conv.weight.device

    def _encode(self, images):
        x = normalize(images, self.spec).to(self._device(), self.vq.quant_conv.weight.dtype)
        return self.vq.encode_indices(x).cpu()

    def _decode(self, codes):
        return denormalize(self.vq.decode_code(codes.to(self._device())).float().cpu(), self.spec)


@register_tokenizer("llamagen-vq")
def _llamagen_vq(spec, model, root) -> LlamaGenVQTokenizer:
    from flashar_adapt.tokenizers import resolve_checkpoint

    path = resolve_checkpoint(spec, root)
    if path is None:
        raise TokenizerError("tokenizer.checkpoint: the LlamaGen VQ weights are a separate file (vq_ds16_c2i.pt "
                             "or vq_ds16_t2i.pt): pass --tokenizer-checkpoint or set tokenizer.checkpoint")
    try:
        vq = load_vq(path, **spec.config)
    except ValueError as e:
        raise TokenizerError(str(e)) from None
    if model is not None:  # decode where the generator runs
        vq = vq.to(next(model.parameters()).device)
    return LlamaGenVQTokenizer(vq, spec)
