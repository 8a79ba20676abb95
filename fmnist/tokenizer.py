"""A real discrete tokenizer for 28x28 images: k-means VQ over non-overlapping 2x2 pixel
patches, so an image is a 14x14 grid of codebook indices (a tiny stand-in for a VQ-GAN)."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from flashar_adapt.files import atomic_save_safetensors
from flashar_adapt.tokenizers import ImageTokenizer, TokenizerError, resolve_checkpoint

from . import ASSETS

PATCH = 2


def to_patches(images: torch.Tensor) -> torch.Tensor:
    """uint8 [N, 28, 28] -> float [N, 14, 14, 4] in [0, 1]."""
    x = images.float().div(255.0)
    N, H, W = x.shape
    x = x.view(N, H // PATCH, PATCH, W // PATCH, PATCH).permute(0, 1, 3, 2, 4)
    return x.reshape(N, H // PATCH, W // PATCH, PATCH * PATCH)


def from_patches(p: torch.Tensor) -> torch.Tensor:
    N, h, w, _ = p.shape
    return p.view(N, h, w, PATCH, PATCH).permute(0, 1, 3, 2, 4).reshape(N, h * PATCH, w * PATCH)


class PatchVQ:
    def __init__(self, centroids: torch.Tensor):
        self.centroids = centroids.float()  # [K, 4]

    @property
    def codebook_size(self) -> int:
        return self.centroids.shape[0]

    @classmethod
    def fit(cls, images: torch.Tensor, K: int = 256, iters: int = 25, sample: int = 200_000, seed: int = 0) -> PatchVQ:
        """k-means++ initialisation, then Lloyd iterations, on a seeded sample of patches."""
        g = torch.Generator().manual_seed(seed)
        x = to_patches(images).reshape(-1, PATCH * PATCH)
        x = x[torch.randperm(x.shape[0], generator=g)[:sample]]
        c = x[torch.randint(0, x.shape[0], (1,), generator=g)]
        d = torch.cdist(x, c).pow(2).min(1).values
        for _ in range(K - 1):
            nxt = x[torch.multinomial(d / d.sum(), 1, generator=g)]
            c = torch.cat([c, nxt])
            d = torch.minimum(d, (x - nxt).pow(2).sum(1))
        for _ in range(iters):
            a = torch.cdist(x, c).argmin(1)
            s = torch.zeros_like(c).index_add_(0, a, x)
            n = torch.bincount(a, minlength=K).float()
            empty = n == 0
            c = torch.where(empty[:, None], c, s / n.clamp(min=1)[:, None])
        return cls(c)

    def encode(self, images: torch.Tensor, batch: int = 4096) -> torch.Tensor:
        p = to_patches(images)
        flat = p.reshape(-1, PATCH * PATCH)
        out = torch.cat(
            [
                torch.cdist(flat[i : i + batch * 196], self.centroids).argmin(1)
                for i in range(0, flat.shape[0], batch * 196)
            ]
        )
        return out.view(p.shape[:3])

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """LongTensor [N, 14, 14] -> float images [N, 28, 28] in [0, 1]."""
        return from_patches(self.centroids[codes.long()]).clamp(0, 1)

    def save(self, path) -> None:
        atomic_save_safetensors({"centroids": self.centroids}, Path(path), metadata={"patch": str(PATCH)})

    @classmethod
    def load(cls, path) -> PatchVQ:
        return cls(load_file(str(path))["centroids"])


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB between float images in [0, 1], over the whole set."""
    mse = (a.float() - b.float()).pow(2).mean()
    return float(10 * torch.log10(1.0 / mse))


# ---------------------------------------------------------------- the tokenizer interface


class PatchVQTokenizer(ImageTokenizer):
    """PatchVQ behind flashar_adapt's interface: float [N, 1, 28, 28] in [0, 1] <-> codes [N, 14, 14].
    Decoding paints each code's centroid patch, so re-encoding a decoded image returns the
    same codes (centroids are means of pixels in [0, 1], so clamping never moves them)."""

    exact_roundtrip = True
    channels = 1

    def __init__(self, vq: PatchVQ, image_size=(28, 28)):
        if image_size[0] % PATCH or image_size[1] % PATCH:
            raise TokenizerError(f"image size {list(image_size)} is not a multiple of the {PATCH}x{PATCH} patch")
        self.vq, self.codebook_size = vq, vq.codebook_size
        self.image_size = tuple(image_size)
        self.grid = (image_size[0] // PATCH, image_size[1] // PATCH)

    def _encode(self, images):
        p = _float_patches(images[:, 0]).reshape(-1, PATCH * PATCH)
        return torch.cdist(p, self.vq.centroids).argmin(1)

    def _decode(self, codes):
        return self.vq.decode(codes)[:, None]


def _float_patches(x: torch.Tensor) -> torch.Tensor:
    N, H, W = x.shape
    x = x.reshape(N, H // PATCH, PATCH, W // PATCH, PATCH).permute(0, 1, 3, 2, 4)
    return x.reshape(N, H // PATCH, W // PATCH, PATCH * PATCH)


def fmnist_patch_vq(spec, model, root) -> PatchVQTokenizer:
    """The tokenizer kind ``fmnist-patch-vq``: the shipped k-means tokenizer (or
    tokenizer.checkpoint, a PatchVQ.save file)."""
    if spec.channels != 1:
        raise TokenizerError(f"tokenizer.channels: the Fashion-MNIST tokenizer is greyscale (1), got {spec.channels}")
    if spec.downsample not in (None, PATCH):
        raise TokenizerError(
            f"tokenizer.downsample: the Fashion-MNIST tokenizer uses {PATCH}x{PATCH} patches, got {spec.downsample}"
        )
    path = resolve_checkpoint(spec, root) or ASSETS / "tokenizer.safetensors"
    if not path.is_file():
        raise TokenizerError(f"{path}: the Fashion-MNIST tokenizer file is missing")
    return PatchVQTokenizer(PatchVQ.load(path), tuple(spec.image_size))
