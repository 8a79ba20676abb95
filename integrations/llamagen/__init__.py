"""LlamaGen: the model definition with the official names, checkpoint reading, the runner and
model format, the fused branch block, and the VQ image tokenizer.

    model.py        ModelArgs, Transformer, GPT_models (official module/parameter names)
    checkpoints.py  load_checkpoint, read_state_dict, infer_model_args (sizes from weights)
    runner.py       LlamaGenRunner (recipes' ``backend: llamagen``), LlamaGenFormat
    fused.py        FusedBranchBlock: the branch block and its backbone block as one
    vq.py           VQModel, load_vq, the tokenizer kind ``llamagen-vq``
"""

from .checkpoints import config_from_state_dict, extract_state_dict, infer_model_args, load_checkpoint, read_state_dict
from .fused import FusedBranchBlock
from .model import (
    GPT_3B,
    GPT_7B,
    GPT_B,
    GPT_L,
    GPT_XL,
    GPT_XXL,
    GPT_XXXL,
    Attention,
    CaptionEmbedder,
    FeedForward,
    GPT_models,
    KVCache,
    LabelEmbedder,
    ModelArgs,
    RMSNorm,
    Transformer,
    TransformerBlock,
    apply_rotary_emb,
    find_multiple,
    precompute_freqs_cis_2d,
    setup_kv_caches,
)
from .runner import LlamaGenFormat, LlamaGenRunner
from .vq import (
    VQ_8,
    VQ_16,
    LlamaGenVQTokenizer,
    VQModel,
    VQModelArgs,
    llamagen_vq_tokenizer,
    load_vq,
    vq_args_from_state_dict,
)

__all__ = [
    "GPT_3B",
    "GPT_7B",
    "GPT_B",
    "GPT_L",
    "GPT_XL",
    "GPT_XXL",
    "GPT_XXXL",
    "Attention",
    "CaptionEmbedder",
    "FeedForward",
    "FusedBranchBlock",
    "GPT_models",
    "KVCache",
    "LabelEmbedder",
    "LlamaGenFormat",
    "LlamaGenRunner",
    "LlamaGenVQTokenizer",
    "ModelArgs",
    "RMSNorm",
    "Transformer",
    "TransformerBlock",
    "VQModel",
    "VQModelArgs",
    "VQ_8",
    "VQ_16",
    "apply_rotary_emb",
    "config_from_state_dict",
    "extract_state_dict",
    "find_multiple",
    "infer_model_args",
    "llamagen_vq_tokenizer",
    "load_checkpoint",
    "load_vq",
    "precompute_freqs_cis_2d",
    "read_state_dict",
    "setup_kv_caches",
    "vq_args_from_state_dict",
]
