"""The tokenizer kind ``transformers-vq``: the VQ model a transformers checkpoint already
carries (Emu3, Janus, Chameleon / Lumina-mGPT keep it at ``model.vqmodel``), run with the
recipe's resize and normalisation.

The families' VQ classes differ in small ways, read from the module itself rather than
from its class name: ``encode`` may want ``image_sizes`` (and repeat an image over a temporal
axis); its output carries ``image_tokens`` as a tensor or a list; ``decode`` takes codes as
[N, h, w], or flat [N, h*w] when the quantiser has a fixed ``quant_state_dims``; some VQ
classes (Chameleon's in transformers) have no decoder at all.
"""

from __future__ import annotations

import inspect

import torch

from flashar_adapt.patching import resolve
from flashar_adapt.tokenizers import ImageTokenizer, TokenizerError, denormalize, normalize


def _downsample(vq) -> int:
    for attr in ("spatial_scale_factor", "vision_spatial_factor"):
        if isinstance(getattr(vq, attr, None), int):
            return getattr(vq, attr)
    mult = getattr(getattr(vq, "config", None), "channel_multiplier", None)
    if mult is None:
        raise TokenizerError(f"{type(vq).__name__}: cannot tell its downsampling factor; set tokenizer.downsample")
    return 2 ** (len(mult) - 1)


def _codebook_size(vq) -> int:
    emb = getattr(getattr(vq, "quantize", None), "embedding", None)
    if not isinstance(emb, torch.nn.Embedding):
        raise TokenizerError(f"{type(vq).__name__}: no quantize.embedding; not a VQ model this kind can drive")
    return emb.num_embeddings


class TransformersVQTokenizer(ImageTokenizer):
    def __init__(self, vq: torch.nn.Module, spec):
        if not callable(getattr(vq, "encode", None)):
            raise TokenizerError(f"{type(vq).__name__} has no encode(); tokenizer.module must name the VQ model")
        ds = _downsample(vq)
        if spec.downsample is not None and spec.downsample != ds:
            raise TokenizerError(
                f"tokenizer.downsample is {spec.downsample}, but {type(vq).__name__} downsamples by {ds}"
            )
        size = tuple(spec.image_size)
        if size[0] % ds or size[1] % ds:
            raise TokenizerError(f"image size {list(size)} is not a multiple of the VQ downsampling factor {ds}")
        self.vq, self.spec = vq.eval(), spec
        self.codebook_size, self.image_size, self.channels = _codebook_size(vq), size, spec.channels
        self.grid = (size[0] // ds, size[1] // ds)
        self._sizes = "image_sizes" in inspect.signature(vq.encode).parameters
        fixed = getattr(getattr(vq, "quantize", None), "quant_state_dims", None)
        self._flat = fixed is not None
        if fixed is not None and tuple(fixed) != self.grid:
            raise TokenizerError(
                f"{type(vq).__name__} decodes only a {fixed[0]}x{fixed[1]} grid of codes, but the "
                f"recipe asks for {self.grid[0]}x{self.grid[1]} ({size[0]}x{size[1]} pixels)"
            )

    def _param(self):
        return next(self.vq.parameters())

    def _encode(self, images):
        p = self._param()
        x = normalize(images, self.spec).to(p.device, p.dtype)
        if self._sizes:
            out = self.vq.encode(x, image_sizes=torch.tensor([list(self.image_size)] * x.shape[0]))
        else:
            out = self.vq.encode(x)
        tokens = out.image_tokens if hasattr(out, "image_tokens") else out[2]
        if isinstance(tokens, (list, tuple)):
            tokens = torch.stack(list(tokens))
        return tokens.reshape(x.shape[0], *self.grid).cpu()

    def _decode(self, codes):
        if not callable(getattr(self.vq, "decode", None)):
            raise TokenizerError(
                f"{type(self.vq).__name__} in transformers has no decoder: codes cannot be turned "
                "into pixels with it (keep the codes, or decode with the family's own VQ-GAN)"
            )
        c = codes.to(self._param().device)
        out = self.vq.decode(c.flatten(1) if self._flat else c)
        return denormalize(out.float().cpu(), self.spec)


def transformers_vq_tokenizer(spec, model, root) -> TransformersVQTokenizer:
    """The tokenizer kind ``transformers-vq``: the VQ module at ``tokenizer.module`` in ``model``."""
    if model is None:
        raise TokenizerError(
            "the transformers-vq tokenizer lives inside the model's checkpoint: load the model "
            "(--model / --export) to use it"
        )
    if not spec.module:
        raise TokenizerError("tokenizer.module: name the VQ model inside the checkpoint (e.g. model.vqmodel)")
    vq = resolve(model, spec.module, "tokenizer.module", None)
    return TransformersVQTokenizer(vq, spec)
