"""flashar-adapt: turn a pre-trained raster AR image generator into a FlashAR two-way
parallel generator (H+W-1 decoding steps instead of H*W) with one call."""

from .adapters import adapters_disabled
from .decoding import DecoderState, generate, logits, prefill, score, step, teacher_forward
from .doctor import Report, check
from .errors import FlashARError
from .export import export_merged, load_adapted
from .formats import ModelFormat, list_formats, register_format
from .grid import Layout
from .heads import FlashARModules, FusionGate, ImageHead
from .inspection import inspect_model
from .patching import context, patch, unpatch
from .recipe import Recipe, RecipeError, list_recipes, load_recipe, recipe_from_dict
from .runners import Runner, list_runners, register_runner
from .sampling import Sampling, sample
from .tokenizers import ImageTokenizer, decode_images, load_tokenizer, register_tokenizer
from .training import StageConfig, TrainConfig, TrainingError, train
from .version import __version__ as __version__

__all__ = [
    "DecoderState",
    "FlashARError",
    "FlashARModules",
    "ImageTokenizer",
    "Report",
    "Sampling",
    "check",
    "inspect_model",
    "FusionGate",
    "ImageHead",
    "Layout",
    "Recipe",
    "RecipeError",
    "adapters_disabled",
    "context",
    "decode_images",
    "export_merged",
    "generate",
    "load_adapted",
    "load_tokenizer",
    "register_tokenizer",
    "train",
    "list_formats",
    "list_recipes",
    "list_runners",
    "ModelFormat",
    "register_format",
    "register_runner",
    "Runner",
    "load_recipe",
    "logits",
    "patch",
    "prefill",
    "recipe_from_dict",
    "sample",
    "score",
    "step",
    "teacher_forward",
    "unpatch",
    "StageConfig",
    "TrainConfig",
    "TrainingError",
]
