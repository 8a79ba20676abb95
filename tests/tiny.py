"""Tiny random models of each supported family, with matching recipes, for CPU tests."""

from __future__ import annotations

import torch

import flashar_adapt as fa
from flashar_adapt.integrations.llamagen import ModelArgs, Transformer


def randomize(module: torch.nn.Module, seed: int = 0, std: float = 0.3) -> None:
    """Give every weight (the gate's zero-initialised layer included) a random value so that
    greedy decoding has no ties and every head and the gate matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "norm" in name or "layernorm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def llamagen(
    grid: int = 4,
    n_layer: int = 5,
    dim: int = 32,
    n_head: int = 4,
    vocab: int = 48,
    classes: int = 10,
    seed: int = 0,
    model_type: str = "c2i",
    cls_token_num: int = 1,
    n_kv_head: int | None = None,
    std: float = 0.3,
):
    torch.manual_seed(seed)
    args = ModelArgs(
        dim=dim,
        n_layer=n_layer,
        n_head=n_head,
        n_kv_head=n_kv_head,
        multiple_of=16,
        vocab_size=vocab,
        num_classes=classes,
        block_size=grid * grid,
        cls_token_num=cls_token_num,
        token_dropout_p=0.0,
        resid_dropout_p=0.0,
        ffn_dropout_p=0.0,
        caption_dim=24,
        model_type=model_type,
    )
    model = Transformer(args).eval()
    randomize(model, seed, std)
    return model


def llamagen_recipe(grid: int = 4, vocab: int = 48, classes: int = 10, **over) -> fa.Recipe:
    r = fa.load_recipe("llamagen-c2i-b")
    return r.replace(
        **{
            "image.codebook_size": vocab,
            "condition.num_classes": classes,
            "condition.null_class": classes,
            "image.grid": [grid, grid],
            **over,
        }
    )


def llamagen_t2i(grid: int = 4, seed: int = 0, prefix: int = 5):
    return llamagen(grid=grid, seed=seed, model_type="t2i", cls_token_num=prefix)


def llamagen_t2i_recipe(grid: int = 4, vocab: int = 48, prefix: int = 5, **over) -> fa.Recipe:
    r = fa.load_recipe("llamagen-t2i-xl")
    return r.replace(
        **{"image.codebook_size": vocab, "condition.prefix_len": prefix, "image.grid": [grid, grid], **over}
    )


def hf_llama(vocab: int = 160, n_layer: int = 5, dim: int = 32, seed: int = 0, max_pos: int = 512, std: float = 0.3):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=dim,
        intermediate_size=64,
        num_hidden_layers=n_layer,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_pos,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(cfg).eval()
    randomize(model, seed, std)
    return model


def hf_llama_recipe(codebook: int = 40, offset: int = 100, eol: int | None = None, before=(), grid=(4, 4), **over):
    r = fa.load_recipe("llama-image-ar")
    return r.replace(
        **{
            "image.codebook_size": codebook,
            "image.visual_token_offset": offset,
            "image.eol_token": eol,
            "image.before": list(before),
            "image.grid": list(grid),
            "condition.prefix_len": 16,
            "condition.pad_id": 0,
            **over,
        }
    )


_TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=5,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=4096,
)


def emu3(seed: int = 0):
    """Emu3ForConditionalGeneration with the real vocabulary size (so the shipped recipe's ids fit)."""
    from transformers import Emu3Config, Emu3ForConditionalGeneration

    torch.manual_seed(seed)
    vq = dict(
        codebook_size=64,
        embed_dim=4,
        latent_channels=4,
        base_channels=32,
        channel_multiplier=[1, 1],
        num_res_blocks=1,
        attn_resolutions=[],
        hidden_size=32,
        num_attention_heads=1,
    )
    cfg = Emu3Config(
        vq_config=vq, text_config=dict(vocab_size=184622, **_TINY_TEXT), vocabulary_map={"<image>": 151855}
    )
    model = Emu3ForConditionalGeneration(cfg).eval()
    randomize(model.model.text_model, seed)
    randomize(model.lm_head, seed + 1)
    return model


def glm_image(seed: int = 0, attn: str = "eager"):
    """GlmImageForConditionalGeneration with the real vocabularies (16512 head outputs, 168064
    text ids: the shipped recipe's ids and the config's pad/image ids fit) and M-RoPE on
    (t, h, w): partial rotary 0.5 of head_dim 32, sections [2, 3, 3]."""
    from transformers import GlmImageConfig, GlmImageForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(
        vocab_size=168064,
        vision_vocab_size=16512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=4096,
        attention_bias=True,
        rope_parameters=dict(rope_type="default", rope_theta=1e4, partial_rotary_factor=0.5, mrope_section=[2, 3, 3]),
    )
    vision = dict(depth=1, hidden_size=32, num_heads=2, intermediate_size=64, image_size=64, patch_size=16)
    vq = dict(embed_dim=8, num_embeddings=16384, latent_channels=32)  # latent_channels = the vision width
    cfg = GlmImageConfig(text_config=text, vision_config=vision, vq_config=vq)
    cfg._attn_implementation = cfg.text_config._attn_implementation = attn
    model = GlmImageForConditionalGeneration(cfg).eval()
    randomize(model.model.language_model, seed)
    randomize(model.lm_head, seed + 1)
    return model


def glm_image_recipe(grid=(4, 6), preview=(2, 3), **over) -> fa.Recipe:
    """The shipped recipe at a small grid; ``preview`` None: no preview grid."""
    over = {"grid": list(grid), "flashar.branch_layer": -2, "flashar.branch_depth": 1, **over}
    r = fa.load_recipe("glm-image").replace(**over, **{"image.preview_side": None})
    return r.replace(**{"image.preview_grid": None if preview is None else list(preview)})


def janus(seed: int = 0):
    from transformers import JanusConfig, JanusForConditionalGeneration

    torch.manual_seed(seed)
    vq = dict(
        embed_dim=4,
        num_embeddings=16384,
        latent_channels=4,
        base_channels=32,
        channel_multiplier=[1, 1],
        num_res_blocks=1,
        projection_dim=32,
        image_token_embed_dim=32,
        num_patches=4,
    )
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=32,
        patch_size=16,
        projection_dim=32,
    )
    text = dict(model_type="llama", vocab_size=102400, **_TINY_TEXT)
    cfg = JanusConfig(text_config=text, vision_config=vision, vq_config=vq)
    model = JanusForConditionalGeneration(cfg).eval()
    for mod in (
        model.model.language_model,
        model.model.generation_embeddings,
        model.model.generation_aligner,
        model.model.generation_head,
    ):
        randomize(mod, seed)
    return model


def chameleon(seed: int = 0, vocab_size: int = 8200):
    from transformers import ChameleonConfig, ChameleonForConditionalGeneration

    torch.manual_seed(seed)
    vq = dict(
        embed_dim=4,
        num_embeddings=8192,
        latent_channels=4,
        base_channels=32,
        channel_multiplier=[1, 1],
        num_res_blocks=1,
        resolution=32,
    )
    cfg = ChameleonConfig(
        vocab_size=vocab_size, vq_config=vq, vocabulary_map={"<image>": 8199, "IMGIMGBS": 4}, **_TINY_TEXT
    )
    model = ChameleonForConditionalGeneration(cfg).eval()
    randomize(model.model.layers, seed)
    randomize(model.model.embed_tokens, seed + 1)
    randomize(model.model.norm, seed + 2)
    randomize(model.lm_head, seed + 3)
    return model


# ---------------------------------------------------------------- model zoo / recipe doctor (tests/test_zoo.py,
# tests/test_doctor.py)


def gpt2(seed: int = 0, vocab: int = 200, n_positions: int = 128, attn: str = "sdpa"):
    """A transformers architecture no shipped recipe covers (transformer.h / ln_f / wte, learned
    absolute positions, Conv1D projections, the cache passed to blocks positionally)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab,
        n_positions=n_positions,
        n_embd=32,
        n_layer=4,
        n_head=4,
        bos_token_id=0,
        eos_token_id=0,
        attn_implementation=attn,
    )
    model = GPT2LMHeadModel(cfg).eval()
    randomize(model, seed)
    return model


EMU3P5_VOCAB = 151854 + 131072  # first visual id + codebook size (the recipe's ids must fit)


def emu3p5_official_config(**over) -> dict:
    """A tiny config.json in the official Emu3.5 layout (keys of Emu3Config in baaivision/Emu3.5)."""
    cfg = dict(
        architectures=["Emu3ForCausalLM"],
        model_type="Emu3",
        auto_map={
            "AutoConfig": "configuration_emu3.Emu3Config",
            "AutoModelForCausalLM": "modeling_emu3.Emu3ForCausalLM",
        },
        vocab_size=EMU3P5_VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=5,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        hidden_act="silu",
        max_position_embeddings=2048,
        rms_norm_eps=1e-5,
        rope_theta=1000000.0,
        rope_scaling=None,
        attention_dropout=0.1,
        pretraining_tp=1,
        tie_word_embeddings=False,
        pad_token_id=151643,
        bos_token_id=151849,
        eos_token_id=151850,
        img_token_id=151851,
        boi_token_id=151852,
        eoi_token_id=151853,
        eol_token_id=151846,
        eof_token_id=151847,
        image_area=518400,
        torch_dtype="float32",
    )
    cfg.update(over)
    return cfg


def emu3p5_state_dict(cfg: dict, seed: int = 0) -> dict:
    """Random weights keyed exactly like the official Emu3ForCausalLM state dict."""
    g = torch.Generator().manual_seed(seed)
    d, hd, nh, nkv, ff, V = (
        cfg["hidden_size"],
        cfg["head_dim"],
        cfg["num_attention_heads"],
        cfg["num_key_value_heads"],
        cfg["intermediate_size"],
        cfg["vocab_size"],
    )

    def w(*shape, norm=False):
        return (1.0 + 0.1 * torch.randn(shape, generator=g)) if norm else 0.3 * torch.randn(shape, generator=g)

    sd = {"model.embed_tokens.weight": w(V, d), "model.norm.weight": w(d, norm=True), "lm_head.weight": w(V, d)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        sd.update(
            {
                p + "input_layernorm.weight": w(d, norm=True),
                p + "post_attention_layernorm.weight": w(d, norm=True),
                p + "self_attn.q_proj.weight": w(nh * hd, d),
                p + "self_attn.k_proj.weight": w(nkv * hd, d),
                p + "self_attn.v_proj.weight": w(nkv * hd, d),
                p + "self_attn.o_proj.weight": w(d, nh * hd),
                p + "self_attn.q_norm.weight": w(hd, norm=True),
                p + "self_attn.k_norm.weight": w(hd, norm=True),
                p + "mlp.gate_proj.weight": w(ff, d),
                p + "mlp.up_proj.weight": w(ff, d),
                p + "mlp.down_proj.weight": w(d, ff),
            }
        )
    return sd


def write_emu3p5_official(out_dir, cfg: dict, sd: dict) -> None:
    """The official checkpoint layout, written by hand: config.json, two safetensors shards and
    model.safetensors.index.json (as from_pretrained / the BAAI release expect)."""
    import json
    from pathlib import Path

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keys = sorted(sd)
    half = len(keys) // 2
    weight_map = {}
    for n, part in enumerate((keys[:half], keys[half:]), 1):
        name = f"model-{n:05d}-of-00002.safetensors"
        save_file({k: sd[k].contiguous() for k in part}, str(out / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg))


def lumina_mgpt(seed: int = 0):
    """Chameleon architecture with Lumina-mGPT's extra ids in range (size tokens 8804 + n, new line 8803)."""
    return chameleon(seed, vocab_size=8840)


# ---------------------------------------------------------------- one case per family
# Each returns (model, recipe, cond, cond_mask): a tiny random model, the recipe that adapts it,
# and a batch of two conditions (left-padded where the family takes prompts).


def _llamagen_case():
    return llamagen(grid=4), llamagen_recipe(grid=4), torch.tensor([3, 7]), None


def _llamagen_t2i_case():
    feats = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(1))
    return llamagen_t2i(grid=4, prefix=5), llamagen_t2i_recipe(grid=4, prefix=5), feats, None


def _hf_llama_case():
    cond = torch.tensor([[0, 0, 5, 6, 7], [1, 8, 9, 10, 11]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    return hf_llama(), hf_llama_recipe(eol=99, before=[97, 98], grid=(3, 5)), cond, mask


def _emu3_case():
    r = fa.load_recipe("emu3-gen").replace(grid=[3, 4])
    return emu3(), r, torch.tensor([[151849, 30, 31, 32], [151849, 40, 41, 42]]), None


def _janus_case():
    r = fa.load_recipe("janus-pro-1b").replace(grid=[3, 3], **{"image.variable_grid": True})
    return janus(), r, torch.tensor([[1, 30, 31, 32], [1, 40, 41, 42]]), None


def _chameleon_case():
    r = fa.load_recipe("chameleon").replace(grid=[3, 4], **{"image.variable_grid": True})
    return chameleon(), r, torch.tensor([[0, 30, 31, 8197], [0, 40, 41, 8197]]), None


def _glm_image_case():
    # grid positions without the preview grid (teacher forcing here takes no preview codes), and
    # an unconditional prompt of pads (upstream has none) so the CFG tests cover it too
    r = glm_image_recipe(grid=(3, 4), preview=None, **{"condition.uncond": "pad_inner", "condition.pad_id": 167841})
    cond = torch.tensor([[0, 0, 170, 171, 172], [180, 181, 182, 183, 184]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    return glm_image(), r, cond, mask


FAMILY_CASES = {
    "llamagen-c2i": _llamagen_case,
    "llamagen-t2i": _llamagen_t2i_case,
    "llama": _hf_llama_case,
    "emu3": _emu3_case,
    "janus": _janus_case,
    "chameleon": _chameleon_case,
    "glm-image": _glm_image_case,
}


def patched_family(name: str, seed: int = 11):
    """The case `name` patched, with its FlashAR weights randomized: (model, cond, cond_mask)."""
    model, recipe, cond, mask = FAMILY_CASES[name]()
    fa.patch(model, recipe)
    randomize(model.flashar, seed=seed)
    return model, cond, mask
