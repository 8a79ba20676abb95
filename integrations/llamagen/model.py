"""LlamaGen's model definition, with the official module/parameter names and config fields
(so official c2i/t2i checkpoints load as they are).

Written from the published architecture (gpt-fast style Llama with 2D RoPE, class or caption
prefix). Prefix positions get all-zero rotary entries, as in the original, which zeroes
their queries and keys: every image token therefore attends to the prefix uniformly, and
we reproduce that rather than "fix" it, because the checkpoints were trained with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


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
        self.register_buffer("uncond_embedding", torch.randn(token_num, in_channels) / in_channels**0.5)
        self.uncond_prob = uncond_prob

    def forward(self, caption, train: bool = False, force_drop_ids=None):
        if (train and self.uncond_prob > 0) or force_drop_ids is not None:
            drop = (
                torch.rand(caption.shape[0], device=caption.device) < self.uncond_prob
                if force_drop_ids is None
                else force_drop_ids == 1
            )
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
    out = torch.stack(
        [xs[..., 0] * f[..., 0] - xs[..., 1] * f[..., 1], xs[..., 1] * f[..., 0] + xs[..., 0] * f[..., 1]], -1
    )
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
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None, dropout_p=self.attn_dropout_p if self.training else 0.0
        )
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
            self.cls_embedding = CaptionEmbedder(
                config.caption_dim, config.dim, config.class_dropout_prob, token_num=config.cls_token_num
            )
        else:
            raise ValueError(f"model_type must be 'c2i' or 't2i', got {config.model_type!r}")
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim)
        self.tok_dropout = nn.Dropout(config.token_dropout_p)
        rates = [x.item() for x in torch.linspace(0, config.drop_path_rate, config.n_layer)]
        self.layers = nn.ModuleList(TransformerBlock(config, rates[i]) for i in range(config.n_layer))
        self.norm = RMSNorm(config.dim, eps=config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        grid_size = int(self.block_size**0.5)
        assert grid_size * grid_size == self.block_size, "block_size must be a square grid"
        # A plain attribute (not a buffer): official checkpoints do not store it.
        self.freqs_cis = precompute_freqs_cis_2d(
            grid_size, config.dim // config.n_head, config.rope_base, config.cls_token_num
        )
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
        logits = self.output(self.norm(h)).float()[:, self.cls_token_num - 1 :]
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
    "GPT-B": GPT_B,
    "GPT-L": GPT_L,
    "GPT-XL": GPT_XL,
    "GPT-XXL": GPT_XXL,
    "GPT-XXXL": GPT_XXXL,
    "GPT-3B": GPT_3B,
    "GPT-7B": GPT_7B,
}
