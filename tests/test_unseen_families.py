"""Model-agnostic for real: transformers causal-LM families that no other test builds.

For each family a tiny random model is built from its config; the recipe is exactly what
``inspect`` drafts, with only the token layout (name, prompt length, pad id, codebook,
first visual id, grid) filled in. Then either the model is served exactly -- ``check``
passes: raster logits equal the model's own forward within float32 round-off
(tests/numerics.py), every decoding step's logits equal one teacher-forced pass on values in
both modes, H+W-1 steps; an export reloads to the same logits -- or ``patch`` refuses it
with one sentence naming the reason. The table in docs/writing-a-recipe.md lists the same
families.
"""

from __future__ import annotations

import pytest
import torch

import flashar_adapt as fa
from flashar_adapt import exactness
from flashar_adapt.exactness import steps_match_teacher
from tests import tiny
from tests.numerics import assert_same_math, reorder_bound

V = 96  # vocabulary of every tiny model; the image codes are its last 32 ids
CODES = 32
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _build(cls_name: str, cfg_name: str, seed: int = 0, **cfg):
    import transformers

    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(getattr(transformers, cfg_name)(**cfg)).eval()
    tiny.randomize(model, seed)
    return model


# name -> (class, config class, config kwargs, what the test expects: "pass" or the refusal)
FAMILIES = {
    # rotary on a quarter of each head, parallel residual, the cache passed to layers as `layer_past`
    "gpt_neox": (
        "GPTNeoXForCausalLM",
        "GPTNeoXConfig",
        dict(vocab_size=V, **SMALL, rotary_pct=0.25, max_position_embeddings=64),
        "pass",
    ),
    # learned positions, project_in / project_out around a wider stack (word_embed_proj_dim != hidden)
    "opt": (
        "OPTForCausalLM",
        "OPTConfig",
        dict(
            vocab_size=V,
            hidden_size=64,
            word_embed_proj_dim=48,
            num_hidden_layers=2,
            ffn_dim=64,
            num_attention_heads=4,
            max_position_embeddings=64,
        ),
        "pass",
    ),
    # rotary, parallel attention + MLP, cache passed as `layer_past`
    "falcon": (
        "FalconForCausalLM",
        "FalconConfig",
        dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64),
        "pass",
    ),
    # partial rotary (half of each head), dense final projection with bias
    "phi": (
        "PhiForCausalLM",
        "PhiConfig",
        dict(vocab_size=V, **SMALL, partial_rotary_factor=0.5, max_position_embeddings=64),
        "pass",
    ),
    # grouped-query attention, q/k/v biases
    "qwen2": (
        "Qwen2ForCausalLM",
        "Qwen2Config",
        dict(vocab_size=V, **SMALL, num_key_value_heads=2, max_position_embeddings=64),
        "pass",
    ),
    # mixture of experts (4 experts, top 2)
    "mixtral": (
        "MixtralForCausalLM",
        "MixtralConfig",
        dict(
            vocab_size=V,
            **SMALL,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            max_position_embeddings=64,
        ),
        "pass",
    ),
    # rotary on the first dims, parallel residual
    "gptj": (
        "GPTJForCausalLM",
        "GPTJConfig",
        dict(
            vocab_size=V, n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=64, bos_token_id=0, eos_token_id=0
        ),
        "pass",
    ),
    # final logit soft-cap, alternating sliding / full layers (window longer than the sequence)
    "gemma2": (
        "Gemma2ForCausalLM",
        "Gemma2Config",
        dict(
            vocab_size=V,
            **SMALL,
            num_key_value_heads=2,
            head_dim=8,
            sliding_window=64,
            max_position_embeddings=64,
            final_logit_softcapping=3.0,
        ),
        "pass",
    ),
    # logit scale after the head, parallel residual
    "cohere": (
        "CohereForCausalLM",
        "CohereConfig",
        dict(
            vocab_size=V,
            **SMALL,
            num_key_value_heads=2,
            logit_scale=0.25,
            max_position_embeddings=64,
            bos_token_id=0,
            eos_token_id=0,
            pad_token_id=0,
        ),
        "pass",
    ),
    # a built-in causal mask buffer inside attention, mask flattened to 2D by the decoder,
    # cache and mask passed to blocks positionally; the real image AR model of the family
    "imagegpt": (
        "ImageGPTForCausalImageModeling",
        "ImageGPTConfig",
        dict(vocab_size=V + 1, n_embd=32, n_layer=2, n_head=4, n_positions=64),
        "pass",
    ),
    # rotary, cache passed as `layer_past`, fused qkv
    "codegen": (
        "CodeGenForCausalLM",
        "CodeGenConfig",
        dict(
            vocab_size=V,
            n_embd=32,
            n_layer=2,
            n_head=4,
            rotary_dim=4,
            n_positions=64,
            n_ctx=64,
            bos_token_id=0,
            eos_token_id=0,
        ),
        "pass",
    ),
    # partial rotary (a quarter), LayerNorm
    "stablelm": (
        "StableLmForCausalLM",
        "StableLmConfig",
        dict(vocab_size=V, **SMALL, num_key_value_heads=2, partial_rotary_factor=0.25, max_position_embeddings=64),
        "pass",
    ),
    # ALiBi biases built from the 2D mask, no position ids
    "bloom": (
        "BloomForCausalLM",
        "BloomConfig",
        dict(vocab_size=V, hidden_size=32, n_layer=2, n_head=4),
        ("modules.decoder", "takes no position_ids"),
    ),
    # global + local attention, the local window a banded built-in causal buffer (no config
    # field says so), the cache slot held as `layer_id`: the window (32) covers the 15 tokens fed
    "gpt_neo": (
        "GPTNeoForCausalLM",
        "GPTNeoConfig",
        dict(
            vocab_size=V,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            attention_types=[[["global", "local"], 1]],
            window_size=32,
            max_position_embeddings=64,
            bos_token_id=0,
            eos_token_id=0,
        ),
        "pass",
    ),
    # the same with a local window of 5: shorter than the 15 tokens a 3x4 grid feeds
    "gpt_neo_short_window": (
        "GPTNeoForCausalLM",
        "GPTNeoConfig",
        dict(
            vocab_size=V,
            hidden_size=32,
            num_layers=2,
            num_heads=4,
            attention_types=[[["global", "local"], 1]],
            window_size=5,
            max_position_embeddings=64,
            bos_token_id=0,
            eos_token_id=0,
        ),
        (
            "image.grid",
            "built-in causal mask ('bias' at transformer.h.1.attn.attention) lets a token attend only the last 5",
        ),
    ),
    # short causal convolutions over the sequence beside attention: mixes tokens in feeding order
    "lfm2": (
        "Lfm2ForCausalLM",
        "Lfm2Config",
        dict(
            vocab_size=V,
            **SMALL,
            num_key_value_heads=2,
            max_position_embeddings=64,
            layer_types=["conv", "full_attention"],
            conv_L_cache=3,
        ),
        ("modules.decoder", "in Lfm2ShortConv at model.layers.0.conv, gives other outputs"),
    ),
    # a linear recurrence (and a convolution) whose state lives on the module, beside local attention
    "recurrent_gemma": (
        "RecurrentGemmaForCausalLM",
        "RecurrentGemmaConfig",
        dict(
            vocab_size=V,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            lru_width=32,
            attention_window_size=64,
            conv1d_width=4,
            block_types=["recurrent", "attention"],
            final_logit_softcapping=30.0,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        ),
        ("modules.decoder", "in RecurrentGemmaRecurrentBlock at model.layers.0.temporal_block, gives other outputs"),
    ),
    # OPT with a recipe that forgets the projection its decoder applies after the final norm
    "opt_without_after_norm": (
        "OPTForCausalLM",
        "OPTConfig",
        dict(
            vocab_size=V,
            hidden_size=64,
            word_embed_proj_dim=48,
            num_hidden_layers=2,
            ffn_dim=64,
            num_attention_heads=4,
            max_position_embeddings=64,
        ),
        ("modules.after_norm", "the decoder has 'model.decoder.project_out' (64 -> 48): add it"),
    ),
    # a state-space model: no attention to mask
    "mamba": (
        "MambaForCausalLM",
        "MambaConfig",
        dict(vocab_size=V, hidden_size=32, state_size=4, num_hidden_layers=2, expand=2, conv_kernel=4),
        ("modules.decoder", "cannot run under an additive 4D attention mask"),
    ),
    # every layer attends only the last 8 tokens, fewer than the sequence
    "starcoder2_window": (
        "Starcoder2ForCausalLM",
        "Starcoder2Config",
        dict(
            vocab_size=V,
            **SMALL,
            num_key_value_heads=2,
            sliding_window=8,
            max_position_embeddings=64,
            bos_token_id=0,
            eos_token_id=0,
        ),
        ("image.grid", "sliding-window layers attend only the last 8"),
    ),
}


def _atol(model, layers: int = 4, width: int = 128) -> float:
    """check's tolerance: numerics.reorder_bound at this model's logit scale (these tiny models
    have at most 4 layers and no sum over more than 128 terms)."""
    ids = torch.randint(0, model.config.vocab_size - 1, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return reorder_bound(model(input_ids=ids).logits, layers, width)


# recipe keys a family's user forgot: removed from inspect's draft
FORGOTTEN = {"opt_without_after_norm": [("modules", "after_norm")]}


def family_model(name: str, randomized: bool = True, seed: int = 0):
    """The family's tiny model: weights from tests/tiny.randomize (logits of a few units), or
    with ``randomized=False`` transformers' own initialisation (std 0.02: tiny logits, where
    a wrong decoder rarely flips an argmax)."""
    import transformers

    cls, cfg_cls, cfg, _ = FAMILIES[name]
    if randomized:
        return _build(cls, cfg_cls, seed, **cfg)
    torch.manual_seed(seed)
    return getattr(transformers, cls)(getattr(transformers, cfg_cls)(**cfg)).eval()


def recipe_from_draft(name: str, model) -> tuple[fa.Recipe, dict]:
    """inspect's draft, with only the token layout filled in."""
    draft = fa.inspect_model(model).draft
    for section, key in FORGOTTEN.get(name, []):
        draft[section].pop(key)
    structure = {k: v for k, v in draft.items() if k not in ("name", "condition", "image")}
    draft["name"] = f"unseen-{name}"
    if name == "imagegpt":  # unconditional: a start token (the last id) then 6x6 codes = the whole head
        draft["condition"].update(prefix_len=1, uncond="none")
        draft["condition"].pop("pad_id")
        draft["image"].update(codebook_size=V, visual_token_offset=0, grid=[6, 6])
    else:
        draft["condition"].update(prefix_len=4, pad_id=0)
        draft["image"].update(codebook_size=CODES, visual_token_offset=V - CODES, grid=[3, 4])
    return fa.recipe_from_dict(draft), structure


def _cond(name: str) -> torch.Tensor | None:
    return torch.full((2, 1), V) if name == "imagegpt" else None  # ImageGPT's start-of-sequence id


PASSING = [n for n, f in FAMILIES.items() if f[3] == "pass"]
REFUSED = [n for n, f in FAMILIES.items() if f[3] != "pass"]


def test_families_are_diverse_and_unseen():
    import pathlib

    here = pathlib.Path(__file__).parent
    others = "".join(p.read_text() for p in here.glob("*.py") if p.name != pathlib.Path(__file__).name)
    assert len(FAMILIES) >= 10 and len(PASSING) >= 10
    for cls, _, _, _ in FAMILIES.values():
        assert cls not in others, f"{cls} is also built elsewhere in tests/"


@pytest.mark.numerics
@pytest.mark.parametrize("name", PASSING)
def test_inspect_draft_passes_check_and_exports(name, tmp_path):
    model = family_model(name)
    recipe, _ = recipe_from_draft(name, model)
    # The patched raster pass and the model's own forward run the same weights on the same
    # tokens; only the mask (our additive 4D mask vs the model's causal one) and the attention
    # kernel it selects differ, which changes float summation order: see _atol.
    rep = fa.check(model, recipe, atol=_atol(model), cond=_cond(name))
    assert rep.ok, str(rep)
    for item in ("patch", "raster", "two_way", "raster_dec", "steps"):
        assert rep.item(item).status == "pass", str(rep)
    H, W = recipe.image.grid
    assert f"{H + W - 1} backbone steps" in rep.item("steps").detail

    # export round trip: the reloaded model computes the same two-way logits and samples
    fa.patch(model, recipe)
    tiny.randomize(model.flashar, seed=1)  # a gate and branch that matter
    g = torch.Generator().manual_seed(0)
    cond = _cond(name) if name == "imagegpt" else torch.randint(1, V - CODES, (2, 4), generator=g)
    codes = torch.randint(0, recipe.image.codebook_size, (2, H, W), generator=g)
    before = fa.logits(model, cond, codes)
    gen = model.generate(cond, top_k=1)
    again = fa.load_adapted(fa.export_merged(model, tmp_path / "export"))
    # the same weights through the same code path: equal up to float summation order, which a
    # reloaded module can change only through a different memory layout
    assert_same_math(fa.logits(again, cond, codes), before, layers=4, width=128)
    assert torch.equal(again.generate(cond, top_k=1), gen)


def _inputs(name: str, recipe: fa.Recipe) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    cond = _cond(name) if name == "imagegpt" else torch.randint(1, V - CODES, (2, 4), generator=g)
    return cond, torch.randint(0, recipe.image.codebook_size, (2, *recipe.image.grid), generator=g)


@pytest.mark.numerics
@pytest.mark.parametrize("randomized", [True, False], ids=["randomized", "hf_init"])
@pytest.mark.parametrize("name", PASSING)
def test_every_step_equals_one_teacher_forced_pass(name, randomized):
    """Both weight scales: with transformers' own small initialisation a decoder that mixes
    tokens by feeding order stays below argmax flips, never below the value check."""
    model = family_model(name, randomized)
    recipe, _ = recipe_from_draft(name, model)
    fa.patch(model, recipe)
    tiny.randomize(model.flashar, seed=1)  # a gate and branch that matter
    cond, codes = _inputs(name, recipe)
    for mode in ("two_way", "raster"):
        found = steps_match_teacher(model, cond, codes, mode)
        assert found.ok, found.describe()
        assert found.bound < 1e-3 * found.scale  # an error of 1e-3 of the logits' scale is visible


@pytest.mark.numerics
@pytest.mark.parametrize("name", PASSING)
def test_an_error_of_1e3_in_one_step_fails_the_check(name, monkeypatch):
    """One step's logits moved by 1e-3 of the logits' scale: the doctor fails both decoding
    items (blaming the runner) and the value check fails; the bound is below the error, so
    this cannot pass by being loose."""
    model = family_model(name)
    recipe, _ = recipe_from_draft(name, model)
    cond, codes = _inputs(name, recipe)
    real = exactness.forced_steps

    def one_step_off(*args, **kwargs):
        run = real(*args, **kwargs)
        scale = max(float(lg.abs().max()) for lg in run.logits)
        t = len(run.logits) // 2
        run.logits[t] = run.logits[t] + 1e-3 * scale
        return run

    fa.patch(model, recipe)
    for mode in ("two_way", "raster"):
        found = steps_match_teacher(model, cond, codes, mode)
        assert found.ok and found.bound < 1e-3 * found.scale, found.describe()
    monkeypatch.setattr(exactness, "forced_steps", one_step_off)
    for mode in ("two_way", "raster"):
        assert not steps_match_teacher(model, cond, codes, mode).ok
    fa.unpatch(model)
    rep = fa.check(model, recipe, atol=_atol(model), cond=_cond(name))
    for item in ("two_way", "raster_dec"):
        assert rep.item(item).status == "fail" and rep.item(item).key == "backend", str(rep)
    assert "away from one teacher-forced pass" in rep.item("two_way").detail


@pytest.mark.parametrize("randomized", [True, False], ids=["randomized", "hf_init"])
@pytest.mark.parametrize("name", REFUSED)
def test_unsupported_families_are_refused_at_patch(name, randomized):
    model = family_model(name, randomized)
    recipe, _ = recipe_from_draft(name, model)
    key, phrase = FAMILIES[name][3]
    with pytest.raises(fa.RecipeError) as e:
        fa.patch(model, recipe)
    assert e.value.key == key and phrase in str(e.value), str(e.value)
    assert getattr(model, "flashar", None) is None  # nothing left behind
    rep = fa.check(model, recipe)
    assert not rep.ok and rep.failed_keys == [key]


@pytest.mark.numerics
@pytest.mark.parametrize("name", PASSING)
def test_half_precision_at_initialisation_is_served(name):
    """bfloat16 with transformers' small initialisation: masking a key moves an output by
    less than a bfloat16 step of its size, so patch's mask probe compares bitwise (a masked
    key gets exactly zero weight); the order probe and the step check use the bound with
    one bfloat16 rounding per layer."""
    model = family_model(name, randomized=False).to(torch.bfloat16)
    recipe, _ = recipe_from_draft(name, model)
    fa.patch(model, recipe)
    cond, codes = _inputs(name, recipe)
    found = steps_match_teacher(model, cond, codes)
    assert found.ok, found.describe()


@pytest.mark.parametrize("name", ["lfm2", "recurrent_gemma"])
def test_token_mixing_is_refused_in_half_precision(name):
    """The order probe's bound grows by one bfloat16 rounding per layer; mixing tokens still
    moves the module's output by O(1) of itself."""
    model = family_model(name).to(torch.bfloat16)
    recipe, _ = recipe_from_draft(name, model)
    with pytest.raises(fa.RecipeError) as e:
        fa.patch(model, recipe)
    assert e.value.key == "modules.decoder" and FAMILIES[name][3][1] in str(e.value), str(e.value)


@pytest.mark.numerics
@pytest.mark.parametrize("branch_layer", [0, -1])
def test_gpt_neo_cache_slots_are_observed_not_named(branch_layer):
    """GPT-Neo's attention hands its cache ``self.layer_id``: the runner sees which slot each
    layer uses during a probe forward, and the branch copy keeps its original's (the local
    layer with its band opened, or the global one)."""
    model = family_model("gpt_neo")
    recipe, _ = recipe_from_draft("gpt_neo", model)
    fa.patch(model, recipe.replace(branch_layer=branch_layer))
    assert fa.context(model).runner.cache_slots == {0: 0, 1: 1}
    cond, codes = _inputs("gpt_neo", recipe)
    for mode in ("two_way", "raster"):
        found = steps_match_teacher(model, cond, codes, mode)
        assert found.ok, found.describe()


def test_inspect_finds_the_head_chain():
    """OPT ends with a projection after the final norm; Gemma2 soft-caps and Cohere scales the
    head's output: inspect proposes each, from what the modules connect to and a probe forward."""
    _, opt = recipe_from_draft("opt", family_model("opt"))
    assert opt["modules"]["after_norm"] == ["model.decoder.project_out"]
    assert opt["modules"]["embed"] == "model.decoder.embed_tokens"
    assert fa.inspect_model(family_model("opt")).dim == 64  # what the layers read, not the 48-wide embedding
    assert recipe_from_draft("gemma2", family_model("gemma2"))[1]["logits"] == {"softcap": 3.0}
    assert recipe_from_draft("cohere", family_model("cohere"))[1]["logits"] == {"scale": 0.25}
    assert recipe_from_draft("recurrent_gemma", family_model("recurrent_gemma"))[1]["logits"] == {"softcap": 30.0}
    for name in ("qwen2", "gpt_neox", "imagegpt"):  # nothing between head and logits: no logits section
        assert "logits" not in recipe_from_draft(name, family_model(name))[1]


@pytest.mark.parametrize("randomized", [True, False], ids=["randomized", "hf_init"])
@pytest.mark.parametrize(
    "name, config, value, field",
    [
        ("gemma2", {"final_logit_softcapping": 30.0}, {"softcap": 30.0}, "final_logit_softcapping"),
        ("gemma2", {}, {"softcap": 3.0}, "final_logit_softcapping"),
        ("recurrent_gemma", {}, {"softcap": 30.0}, "logits_soft_cap"),
        ("cohere", {"logit_scale": 0.0625}, {"scale": 0.0625}, "logit_scale"),
    ],
)
def test_inspect_drafts_the_declared_logit_constants_exactly(name, config, value, field, randomized):
    """A cap of 30 is almost linear over a few units of logits: one probe fitted 29.9963, or a
    scale of 0.99999. Probes at several magnitudes pin the form; the config's own value, which
    the fit agrees with, is what the draft says, and a comment beside it says so."""
    import transformers

    cls, cfg_cls, cfg, _ = FAMILIES[name]
    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, cfg_cls)(**{**cfg, **config})).eval()
    if randomized:
        tiny.randomize(model, 0)
    ins = fa.inspect_model(model)
    assert ins.draft["logits"] == value
    (line,) = [line for line in ins.draft_yaml().splitlines() if line.startswith(f"  {next(iter(value))}:")]
    assert f"# = the config's {field}" in line, line


@pytest.mark.parametrize("name, key, value", [("cohere", "logits.scale", "0.25"), ("gemma2", "logits.softcap", "3")])
def test_check_names_a_logit_map_the_recipe_misses(name, key, value):
    model = family_model(name)
    recipe, _ = recipe_from_draft(name, model)
    plain = recipe.replace(**{"logits.scale": 1.0, "logits.softcap": None})
    rep = fa.check(model, plain, atol=_atol(model))
    assert rep.item("raster").status == "fail" and rep.item("raster").key == key
    assert f"set {key}: {value}" in rep.item("raster").detail, str(rep)


def test_imagegpt_token_table_is_the_one_the_ids_index():
    """With the released configs' sizes the position table (n_positions rows) is bigger than
    the token table (vocab_size rows): inspect must pick the table the input ids look up."""
    model = _build(
        "ImageGPTForCausalImageModeling",
        "ImageGPTConfig",
        vocab_size=17,
        n_embd=16,
        n_layer=1,
        n_head=2,
        n_positions=36,
    )
    ins = fa.inspect_model(model)
    assert ins.draft["modules"]["embed"] == "transformer.wte" and ins.draft["modules"]["head"] == "lm_head"


@pytest.mark.numerics
def test_positions_count_the_tokens_fed():
    """A start token + H*W codes feeds 1 + H*W - 1 tokens: a 6x6 grid fits 36 positions exactly
    (and passes check); 6x7 does not, and the grid is blamed. A prompt too long for the room
    left beside the grid blames condition.prefix_len, with the number that fits."""
    model = _build(
        "ImageGPTForCausalImageModeling",
        "ImageGPTConfig",
        vocab_size=V + 1,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=36,
    )
    recipe, _ = recipe_from_draft("imagegpt", model)
    rep = fa.check(model, recipe, atol=_atol(model), cond=_cond("imagegpt"))
    assert rep.ok, str(rep)
    with pytest.raises(fa.RecipeError) as e:
        fa.patch(model, recipe, grid=[6, 7])
    assert e.value.key == "image.grid" and "feeds 42 tokens" in str(e.value)

    qwen = family_model("qwen2")  # 64 positions; a 3x4 grid feeds prompt + 11 tokens
    recipe, _ = recipe_from_draft("qwen2", qwen)
    fa.patch(qwen, recipe.replace(**{"condition.prefix_len": 53}))  # 53 + 11 = 64: fits (the prompt is the big part)
    fa.unpatch(qwen)
    with pytest.raises(fa.RecipeError) as e:
        fa.patch(qwen, recipe.replace(**{"condition.prefix_len": 54}))
    assert e.value.key == "condition.prefix_len" and "at most 53 prompt tokens fit" in str(e.value)


def test_inspect_leaves_prefix_len_for_the_user():
    ins = fa.inspect_model(family_model("qwen2"))
    assert ins.draft["condition"]["prefix_len"] == "TODO"
    assert any(t.startswith("condition.prefix_len") and "64 positions" in t for t in ins.todo)


# ---------------------------------------------------------------- shipped ImageGPT recipes


@pytest.mark.numerics
@pytest.mark.parametrize("size, width", [("small", 512), ("medium", 1024), ("large", 1536)])
def test_imagegpt_recipes_on_a_tiny_model_of_the_same_layout(size, width, tmp_path):
    """The shipped recipe as is, except the grid (a tiny model has few positions): auto-matched
    by the released config's width, and the doctor passes."""
    from flashar_adapt.matching import match_recipe

    r = fa.load_recipe(f"imagegpt-{size}")
    assert r.image.grid == (32, 32) and r.image.codebook_size == 512 and r.condition.prefix_len == 1
    model = _build(
        "ImageGPTForCausalImageModeling",
        "ImageGPTConfig",
        vocab_size=513,
        n_embd=width // 16,
        n_layer=4,
        n_head=2,
        n_positions=1 + 5 * 6 - 1,
    )
    model.config.n_embd = width  # only what match: reads; the weights stay tiny
    assert match_recipe(model).name == f"imagegpt-{size}"
    model.config.n_embd = width // 16
    rep = fa.check(model, r.replace(grid=[5, 6]), atol=_atol(model), cond=torch.full((2, 1), 512))
    assert rep.ok, str(rep)
    assert fa.inspect_model(model).draft["lora"]["targets"] == list(r.lora.targets)


def test_imagegpt_clusters_turn_codes_into_pixels(tmp_path):
    """The recipes' tokenizer reads the release's preprocessor_config.json: one code per pixel,
    the nearest of the 512 colour clusters, which are stored in [-1, 1]."""
    import json

    clusters = torch.rand(512, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    clusters[:3] = torch.tensor([[-1.0, -1.0, -1.0], [1.0, 1.0, 1.0], [0.0, -1.0, 1.0]])
    path = tmp_path / "preprocessor_config.json"
    path.write_text(json.dumps({"clusters": clusters.tolist()}))
    tok = fa.load_tokenizer(fa.load_recipe("imagegpt-small"), checkpoint=str(path))
    assert tok.grid == (32, 32) and tok.codebook_size == 512
    codes = torch.randint(0, 512, (2, 32, 32), generator=torch.Generator().manual_seed(1))
    codes[0, 0, :3] = torch.tensor([0, 1, 2])
    img = tok.decode(codes)
    assert img.shape == (2, 3, 32, 32)
    assert img[0, :, 0, 0].tolist() == [0.0, 0.0, 0.0] and img[0, :, 0, 1].tolist() == [1.0, 1.0, 1.0]
    assert img[0, :, 0, 2].tolist() == [0.5, 0.0, 1.0]
    assert torch.equal(tok.encode(img), codes)  # each pixel is its cluster: the nearest one is itself


def test_mask_goes_to_the_layers_only_when_the_decoder_rewrites_it():
    """ImageGPT flattens the 4D mask to 2D: the runner delivers it at the layer boundary
    instead. Qwen2 passes a 4D mask through: the decoder gets it directly (no hooks)."""
    for name, at_layers in (("imagegpt", True), ("qwen2", False)):
        model = family_model(name)
        fa.patch(model, recipe_from_draft(name, model)[0])
        assert fa.context(model).runner.mask_at_layers is at_layers
        fa.unpatch(model)


# ---------------------------------------------------------------- shipped Liquid (Gemma) recipe


@pytest.mark.numerics
def test_liquid_recipe_on_a_tiny_gemma_of_the_same_layout():
    """GemmaForCausalLM with Liquid's extended vocabulary (256000 text ids + 8192 codes): the
    shipped recipe auto-matches, inspect drafts the same structure, and the doctor passes at a
    small grid, with CFG through the recipe's unconditional ids."""
    from flashar_adapt.matching import match_recipe

    model = _build(
        "GemmaForCausalLM",
        "GemmaConfig",
        vocab_size=256000 + 8192,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=4,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=1,
    )
    r = match_recipe(model)
    assert r.name == "liquid-7b" and r.image.visual_token_offset == 256000 and r.image.codebook_size == 8192
    draft = fa.inspect_model(model).draft
    assert draft["modules"] == {k: getattr(r.modules, k) for k in draft["modules"]}
    assert draft["lora"]["targets"] == list(r.lora.targets) and "logits" not in draft
    small = r.replace(grid=[3, 4], **{"condition.prefix_len": 8})
    prompt = torch.tensor([[2, 100, 200, 300, 7], [2, 400, 500, 600, 7]])  # <bos> text ... <boi>
    rep = fa.check(model, small, atol=_atol(model), cond=prompt)
    assert rep.ok, str(rep)
    fa.patch(model, small)
    out = model.generate(prompt, cfg_scale=7.0, top_k=1)
    assert out.shape == (2, 3, 4) and int(out.max()) < 8192


def test_builtin_causal_mask_refuses_gradient_checkpointing():
    """ImageGPT's attention applies its own causal buffer; FlashAR opens it during its forwards.
    A checkpointed layer would be recomputed in backward with the buffer closed (silently wrong
    gradients), so that combination is an error, not a wrong result."""
    model = family_model("imagegpt")
    recipe, _ = recipe_from_draft("imagegpt", model)
    fa.patch(model, recipe)
    codes = torch.randint(0, V, (1, 6, 6), generator=torch.Generator().manual_seed(0))
    fa.teacher_forward(model, _cond("imagegpt")[:1], codes).fused.sum().backward()  # fine without checkpointing
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.train()
    with pytest.raises(RuntimeError, match="disable gradient checkpointing"):
        fa.teacher_forward(model, _cond("imagegpt")[:1], codes)
    with torch.no_grad():  # no backward, no recompute: allowed
        fa.teacher_forward(model, _cond("imagegpt")[:1], codes)
