"""flashar-adapt: turn a pre-trained raster AR image generator into a FlashAR two-way
parallel generator (H+W-1 decoding steps instead of H*W) with one call."""
from .backends import Backend, list_backends, register_backend
from .doctor import Report, check
from .errors import FlashARError
from .decoding import generate, logits, sample, score, teacher_forward
from .export import export_merged, load_adapted
from .grid import Layout
from .heads import FlashARModules, FusionGate, ImageHead
from .inspection import inspect_model
from .patching import context, patch, unpatch
from .recipe import Recipe, RecipeError, list_recipes, load_recipe, recipe_from_dict
from .training import StageConfig, TrainConfig, TrainingError

__version__ = "0.1.0"


def train(config, progress: bool = True, allow_config_change: bool = False):
    """Two-stage post-training from a YAML config (see flashar_adapt.training); needs accelerate."""
    from .training import train as _train

    return _train(config, progress=progress, allow_config_change=allow_config_change)


__all__ = [
    "Backend", "FlashARError", "FlashARModules", "Report", "check", "inspect_model", "FusionGate", "ImageHead", "Layout", "Recipe", "RecipeError",
    "context", "export_merged", "generate", "load_adapted", "train", "list_backends", "list_recipes", "load_recipe", "logits", "patch",
    "recipe_from_dict", "register_backend", "sample", "score", "teacher_forward", "unpatch",
    "StageConfig", "TrainConfig", "TrainingError",
]
