"""LlamaGen's image tokenizer (VQ-8 / VQ-16) and the tokenizer kind ``llamagen-vq``.

The published model, written from its description with the official module and parameter
names (encoder.conv_blocks.{i}.res.{j}.conv1, quantize.embedding, ...) so ``vq_ds16_c2i.pt``-style
checkpoints load as they are. Images enter in [-1, 1].
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from flashar_adapt.tokenizers import ImageTokenizer, TokenizerError, denormalize, normalize, resolve_checkpoint

from .checkpoints import extract_state_dict, read_state_dict


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
        d = (zf**2).sum(1, keepdim=True) + (e**2).sum(1)[None] - 2 * zf @ e.T
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
        self.quantize = VectorQuantizer(
            config.codebook_size, config.codebook_embed_dim, config.codebook_l2_norm, config.codebook_show_usage
        )
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
    return VQModelArgs(
        codebook_size=n_e,
        codebook_embed_dim=e_dim,
        encoder_ch_mult=enc,
        decoder_ch_mult=dec,
        z_channels=sd["encoder.conv_out.weight"].shape[0],
        ch=ch,
        num_res_blocks=n_res,
        codebook_show_usage="quantize.codebook_used" in sd,
    )


def _read_vq_state_dict(path: Path) -> dict:
    """A VQ checkpoint's weights, without running pickled code: safetensors, or torch.load
    with weights_only=True. Training checkpoints also hold the run's argparse.Namespace,
    plain data, so that one class is allowed."""
    if path.suffix == ".safetensors":
        return read_state_dict(path)
    with torch.serialization.safe_globals([argparse.Namespace]):
        obj = torch.load(path, map_location="cpu", weights_only=True)
    return extract_state_dict(obj)


def load_vq(path: str | os.PathLike, **overrides) -> VQModel:
    """A LlamaGen VQ model from its checkpoint (sizes read from the weights)."""
    path = Path(path)
    sd = {
        k: v
        for k, v in _read_vq_state_dict(path).items()
        if k.split(".")[0] in ("encoder", "decoder", "quantize", "quant_conv", "post_quant_conv")
    }  # drops a discriminator, if any
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
        raise ValueError(
            f"{path}: the weights do not fit the VQ model with tokenizer.config {overrides}: "
            f"{' '.join(str(e).split())[:300]}"
        ) from None
    if missing or unexpected:
        raise ValueError(
            f"{path}: checkpoint does not match the VQ model: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    return model.eval()


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


def llamagen_vq_tokenizer(spec, model, root) -> LlamaGenVQTokenizer:
    """The tokenizer kind ``llamagen-vq``: the VQ model of ``tokenizer.checkpoint``."""
    path = resolve_checkpoint(spec, root)
    if path is None:
        raise TokenizerError(
            "tokenizer.checkpoint: the LlamaGen VQ weights are a separate file (vq_ds16_c2i.pt "
            "or vq_ds16_t2i.pt): pass --tokenizer-checkpoint or set tokenizer.checkpoint"
        )
    try:
        vq = load_vq(path, **spec.config)
    except ValueError as e:
        raise TokenizerError(str(e)) from None
    if model is not None:  # decode where the generator runs
        vq = vq.to(next(model.parameters()).device)
    return LlamaGenVQTokenizer(vq, spec)
