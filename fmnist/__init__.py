"""The embedded default: Fashion-MNIST, a real k-means VQ tokenizer, a small LlamaGen-architecture
raster model and its FlashAR version. Installed as ``flashar_adapt.fmnist``."""

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
