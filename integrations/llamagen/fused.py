"""LlamaGen's fused branch block: the backbone block at the branch index and its vertical-branch
copy run as one batched block while decoding (``LlamaGenRunner.run_with_branch``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .model import TransformerBlock, apply_rotary_emb


class FusedBranchBlock:
    """The backbone block at the branch index and its vertical-branch copy, run as one.

    Both read the same input, so every projection becomes one batched matmul over the two
    stacked weights and the attention one call over both caches. At small decoding batches
    each op costs mostly its fixed overhead, so this makes the branch nearly free instead of
    one more block per step. Same arithmetic as the two separate calls. The runner keeps
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
        shapes = tuple(get(a).shape for get, _ in FusedBranchBlock._STACKED.values())
        return id(a), id(b), batch, max_len, w.dtype, w.device, shapes

    def __init__(self, a: TransformerBlock, b: TransformerBlock, batch: int, max_len: int):
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
            from torch import _dynamo  # heavy to import, and only CUDA graphs need it

            for t in (self.k, self.v, *self._base.values()):
                _dynamo.mark_static_address(t)

    def load(self, a: TransformerBlock, b: TransformerBlock) -> None:
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
        return all(
            type(m) is nn.Linear and m.bias is None and not m._forward_hooks and not m._forward_pre_hooks for m in mods
        )

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
        keys, vals = (
            (self.k[:, :, : start.stop], self.v[:, :, : start.stop]) if isinstance(start, slice) else (self.k, self.v)
        )  # static: entries as a tensor, the whole cache under the mask
        if H != Hkv:
            keys = keys.repeat_interleave(H // Hkv, dim=1)
            vals = vals.repeat_interleave(H // Hkv, dim=1)
        out = F.scaled_dot_product_attention(q, keys, vals, attn_mask=mask.repeat(2, 1, 1, 1))
        h = x + torch.bmm(out.transpose(1, 2).reshape(2, N, D), self.wo)
        n = self._norm(h, self.ffn_norm, self.eps[1])
        h = h + torch.bmm(F.silu(torch.bmm(n, self.w1)) * torch.bmm(n, self.w3), self.w2)
        return h[0].view(B, T, D), h[1].view(B, T, D)
