"""The Fashion-MNIST classifier as a feature extractor (``--extractor fmnist-classifier``, the
default for samples of the shipped recipe): its 64-d feature layer for FID and precision/
recall, its 10 logits for the Inception Score and the accuracy of class-conditional samples.
Inception weights cannot be fetched everywhere, and on 28x28 greyscale clothes a classifier
trained on them is the more telling space anyway."""

from __future__ import annotations

import torch

from flashar_adapt.extractors import ExtractorError, FeatureExtractor
from flashar_adapt.recipe import Recipe

from . import ASSETS
from .classifier import load_classifier


class ClassifierFeatures(FeatureExtractor):
    num_features = 64

    def __init__(self):
        super().__init__()
        self.net = load_classifier(ASSETS / "classifier.safetensors")

    def forward(self, images: torch.Tensor):
        if tuple(images.shape[1:]) != (3, 28, 28):
            raise ExtractorError(
                f"the fmnist-classifier extractor takes 28x28 images, got {images.shape[3]}x{images.shape[2]}"
            )
        grey = images.float().mean(1) / 255  # the channels of a greyscale sample are equal: exact
        feats = self.net.features(grey)
        return feats, self.net.out(feats)

    @classmethod
    def suits(cls, recipe: Recipe) -> bool:
        return (
            recipe.tokenizer is not None and recipe.tokenizer.kind == "fmnist-patch-vq"
        )  # the shipped tokenizer's images

    @classmethod
    def classifies(cls, recipe: Recipe) -> bool:
        return cls.suits(recipe) and recipe.condition.kind == "class" and recipe.condition.num_classes == 10
