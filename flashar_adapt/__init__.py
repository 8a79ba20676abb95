"""flashar-adapt: turn a pre-trained raster AR image generator into a FlashAR two-way
parallel generator (H+W-1 decoding steps instead of H*W) with one call."""
from .backends import Backend, list_backends, register_backend
from .decoding import generate, logits, sample, score, teacher_forward
from .grid import Layout
from .heads import FlashARModules, FusionGate, ImageHead
from .patching import context, patch, unpatch
from .recipe import Recipe, RecipeError, list_recipes, load_recipe, recipe_from_dict

__version__ = "0.1.0"

__all__ = [
    "Backend", "FlashARModules", "FusionGate", "ImageHead", "Layout", "Recipe", "RecipeError",
    "context", "generate", "list_backends", "list_recipes", "load_recipe", "logits", "patch",
    "recipe_from_dict", "register_backend", "sample", "score", "teacher_forward", "unpatch",
]
