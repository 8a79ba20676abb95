"""Feature extractors for sample quality (FID, Inception Score, precision/recall): plugins
found by name, like runners and model formats.

An extractor is a ``FeatureExtractor`` subclass: an ``nn.Module`` that maps uint8 images
[N, 3, H, W] to features [N, F] and, when it classifies, logits [N, C]. Packages declare
theirs as entry points of the group ``flashar_adapt.extractors`` (the Fashion-MNIST demo
declares ``fmnist-classifier``); a script registers one with ``@register_extractor(name)``.

``inception`` is the default: the Inception-v3 of the TensorFlow FID code (torch-fidelity's
port of its weights, through torchmetrics: the numbers ADM's evaluator and LlamaGen report),
which needs ``pip install torchmetrics torch-fidelity`` and downloads its weights once. An
extractor whose ``suits(recipe)`` is True is the default for that recipe's samples instead.
"""

from __future__ import annotations

import torch
from torch import nn

from .errors import InputError
from .plugins import EXTRACTORS, Registry
from .recipe import Recipe
from .validate import did_you_mean

DEFAULT = "inception"


class ExtractorError(InputError):
    """A feature extractor cannot be found or built, or its input does not fit it."""


class FeatureExtractor(nn.Module):
    """Base class: ``forward(images)`` takes uint8 [N, 3, H, W] and returns (features [N, F],
    logits [N, C] or None). ``num_features`` is F."""

    num_features: int

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise NotImplementedError

    @classmethod
    def suits(cls, recipe: Recipe) -> bool:
        """True when this extractor is the natural one for ``recipe``'s images (the default
        over ``inception`` for its samples)."""
        return False

    @classmethod
    def classifies(cls, recipe: Recipe) -> bool:
        """True when the logits' classes are ``recipe``'s class ids (sample accuracy is then
        measured)."""
        return False


REGISTRY = Registry(EXTRACTORS, "feature extractor")


def register_extractor(name: str):
    """Decorator: make a ``FeatureExtractor`` subclass available as ``name``."""

    def deco(cls):
        return REGISTRY.register(name, cls)

    return deco


def list_extractors() -> list[str]:
    return REGISTRY.names()


def extractor_name(name: str | None, recipe: Recipe | None) -> str:
    """``name`` when given; else the first extractor that suits ``recipe``; else ``inception``."""
    if name:
        return name
    if recipe is not None:
        for n, cls in REGISTRY.items().items():
            if isinstance(cls, type) and issubclass(cls, FeatureExtractor) and cls.suits(recipe):
                return n
    return DEFAULT


def load_extractor(name: str, device="cpu") -> FeatureExtractor:
    """An instance of the extractor ``name``, in eval mode on ``device``."""
    cls = REGISTRY.get(name)
    if cls is None:
        raise ExtractorError(
            f"unknown feature extractor {name!r}{did_you_mean(name, list_extractors())}; "
            f"known: {', '.join(list_extractors())}"
        )
    if not (isinstance(cls, type) and issubclass(cls, FeatureExtractor)):
        raise ExtractorError(f"feature extractor {name!r} is {cls!r}, not a FeatureExtractor subclass")
    return cls().to(device).eval()


@register_extractor(DEFAULT)
class InceptionV3(FeatureExtractor):
    """Pool features (2048) and the 1008 logits of the TF-FID Inception-v3 (torchmetrics'
    ``NoTrainInceptionV3`` over torch-fidelity's weights); images of any size, resized inside."""

    num_features = 2048

    def __init__(self):
        super().__init__()
        try:
            # optional dependencies (the "eval" extra): only this extractor needs them
            from torchmetrics.image.fid import NoTrainInceptionV3

            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048", "logits_unbiased"])
        except Exception as e:  # noqa: BLE001 - a missing package, or a torchvision built for another torch
            raise ExtractorError(
                "the inception extractor needs torchmetrics and torch-fidelity (with a torchvision that matches "
                f"torch): pip install 'flashar-adapt[eval]' ({type(e).__name__}: {' '.join(str(e).split())}); "
                "or choose another --extractor"
            ) from None

    def forward(self, images):
        # torchmetrics' forward returns the first listed feature only; this is the same pass
        # returning every listed one
        feats, logits = self.net._torch_fidelity_forward(images)
        return feats.reshape(images.shape[0], -1), logits
