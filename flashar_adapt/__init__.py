"""flashar-adapt: turn a pre-trained raster AR image generator into a FlashAR two-way
parallel generator (H+W-1 decoding steps instead of H*W) with one call."""
from .backends import Backend, list_backends, register_backend
from .doctor import Report, check
from .decoding import generate, logits, sample, score, teacher_forward
from .export import adapters_disabled, export_merged, load_adapted
from .grid import Layout
from .heads import FlashARModules, FusionGate, ImageHead
from .inspection import inspect_model
from .patching import context, patch, unpatch
from .tokenizers import ImageTokenizer, decode_images, load_tokenizer, register_tokenizer
from .recipe import Recipe, RecipeError, list_recipes, load_recipe, recipe_from_dict

__version__ = "0.1.0"


def train(config, progress: bool = True):
    """Two-stage post-training from a YAML config (see flashar_adapt.training); needs accelerate."""
    from .training import train as _train

    return _train(config, progress=progress)


__all__ = [
    "Backend", "FlashARModules", "Report", "check", "inspect_model", "FusionGate", "ImageHead", "Layout", "Recipe", "RecipeError",
    "adapters_disabled", "context", "decode_images", "ImageTokenizer", "load_tokenizer", "register_tokenizer", "export_merged", "generate", "load_adapted", "train", "list_backends", "list_recipes", "load_recipe", "logits", "patch",
    "recipe_from_dict", "register_backend", "sample", "score", "teacher_forward", "unpatch",
]
