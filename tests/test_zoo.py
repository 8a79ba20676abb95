"""Model zoo: every shipped recipe on a tiny random model of the same class and file layout.

Each family test writes a checkpoint in the family's own layout (save_pretrained folder,
official LlamaGen .pt, Emu3.5's config.json + safetensors shards), loads it the way a user
would (``flashar_adapt.inspection.load_model``: local files only, no remote code), patches
with the shipped recipe, checks greedy two-way decoding against teacher forcing, exports
and reloads. Also: the size-token schema extension, auto-match, and recipe entry points.
"""

from __future__ import annotations

import json

import pytest
import torch
import yaml

import flashar_adapt as fa
from flashar_adapt.inspection import load_model
from flashar_adapt.matching import match_recipe
from tests import tiny
from tests.numerics import assert_same_math

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _greedy_equals_teacher_forcing(model, cond, mask=None):
    codes = model.generate(cond, top_k=1, cond_mask=mask)
    assert torch.equal(fa.logits(model, cond, codes, cond_mask=mask).argmax(-1), codes)
    return codes


def _export_and_reload(model, cond, codes, out, mask=None):
    pytest.importorskip("flashar_adapt.export")  # written in parallel; lights up when present
    before = fa.logits(model, cond, codes, cond_mask=mask)
    path = fa.export_merged(model, out)
    again = fa.load_adapted(path)
    # the reloaded model runs the same math; only the load path (dtype casts, fused qkv) may reorder sums
    assert_same_math(fa.logits(again, cond, codes, cond_mask=mask), before, layers=5, width=96)
    assert torch.equal(again.generate(cond, top_k=1, cond_mask=mask), model.generate(cond, top_k=1, cond_mask=mask))
    return path


# ---------------------------------------------------------------- LlamaGen

LLAMAGEN_SIZES = {
    "b": (12, 768, 12),
    "l": (24, 1024, 16),
    "xl": (36, 1280, 20),
    "xxl": (48, 1536, 24),
    "3b": (24, 3200, 32),
}


@pytest.mark.parametrize("size", list(LLAMAGEN_SIZES))
def test_llamagen_recipes_match_the_official_sizes_and_branch_placement(size):
    from flashar_adapt.integrations.llamagen import GPT_models

    n_layer, dim, n_head = LLAMAGEN_SIZES[size]
    r = fa.load_recipe(f"llamagen-c2i-{size}")
    assert r.match == {"class": "Transformer", "config": {"model_type": "c2i", "n_layer": n_layer, "dim": dim}}
    gpt = GPT_models[{"b": "GPT-B", "l": "GPT-L", "xl": "GPT-XL", "xxl": "GPT-XXL", "3b": "GPT-3B"}[size]]
    assert gpt.__closure__[0].cell_contents == {"n_layer": n_layer, "n_head": n_head, "dim": dim}
    # FlashAR (arXiv 2605.09430): LlamaGen branches k = 1 layer from an intermediate depth, ablated over L-1..L-8
    assert r.flashar.branch_depth == 1 and -8 <= r.flashar.branch_layer <= -1
    assert (r.image.codebook_size, r.image.grid, r.condition.num_classes, r.condition.null_class) == (
        16384,
        (16, 16),
        1000,
        1000,
    )
    t2i = fa.load_recipe("llamagen-t2i-xl")
    assert t2i.match["config"] == {"model_type": "t2i", "n_layer": 36, "dim": 1280}
    assert (t2i.condition.prefix_len, t2i.flashar.branch_depth) == (120, 1) and -8 <= t2i.flashar.branch_layer <= -1


@pytest.mark.numerics
@pytest.mark.parametrize("kind", ["c2i", "t2i"])
def test_llamagen_official_checkpoint_to_export(tmp_path, kind):
    if kind == "c2i":
        src, cond = tiny.llamagen(grid=4, seed=3), torch.tensor([2, 7])
        recipes = [f"llamagen-c2i-{s}" for s in LLAMAGEN_SIZES]
        over = {
            "image.codebook_size": 48,
            "condition.num_classes": 10,
            "condition.null_class": 10,
            "image.grid": [4, 4],
        }
    else:
        src = tiny.llamagen_t2i(grid=4, seed=3, prefix=5)
        cond = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(0))
        recipes = ["llamagen-t2i-xl"]
        over = {"image.codebook_size": 48, "condition.prefix_len": 5, "image.grid": [4, 4]}
    torch.save({"model": src.state_dict(), "steps": 1}, tmp_path / "ckpt.pt")  # the official DDP layout
    for i, name in enumerate(recipes):
        model, backend = load_model(tmp_path / "ckpt.pt", {"n_head": 4, "block_size": 16})
        assert backend == "llamagen" and type(model).__name__ == "Transformer"
        fa.patch(model, fa.load_recipe(name).replace(**over))
        codes = _greedy_equals_teacher_forcing(model, cond)
        if i == 0:  # the layout is the same for every size: export one
            out = _export_and_reload(model, cond, codes, tmp_path / "export")
            assert (out / "backbone" / "llamagen.pt").is_file()


# ---------------------------------------------------------------- transformers families (save_pretrained folders)


def _emu3():
    return tiny.emu3(), "emu3-gen", {"image.grid": [3, 4]}, torch.tensor([[151849, 30, 31, 32], [151849, 40, 41, 42]])


def _janus(name):
    over = {"image.grid": [3, 3], "image.variable_grid": True}
    return tiny.janus(), name, over, torch.tensor([[1, 30, 31, 32], [1, 40, 41, 42]])


def _chameleon():
    over = {"image.grid": [3, 4], "image.variable_grid": True}
    return tiny.chameleon(), "chameleon", over, torch.tensor([[0, 30, 31, 8197], [0, 40, 41, 8197]])


def _lumina():
    return tiny.lumina_mgpt(), "lumina-mgpt-7b-768", {"image.grid": [4, 2]}, torch.tensor([[0, 30, 31], [0, 40, 41]])


ZOO = {
    "emu3-gen": _emu3,
    "janus-pro-1b": lambda: _janus("janus-pro-1b"),
    "janus-pro-7b": lambda: _janus("janus-pro-7b"),
    "chameleon": _chameleon,
    "lumina-mgpt-7b-768": _lumina,
}


@pytest.mark.numerics
@pytest.mark.parametrize("family", list(ZOO))
def test_transformers_family_from_save_pretrained_to_export(tmp_path, family):
    src, name, over, cond = ZOO[family]()
    src.save_pretrained(tmp_path / "ckpt", safe_serialization=True)
    model, backend = load_model(tmp_path / "ckpt")
    assert backend == "transformers" and type(model).__name__ == type(src).__name__
    recipe = fa.load_recipe(name).replace(**over)
    fa.patch(model, recipe)
    codes = _greedy_equals_teacher_forcing(model, cond)
    _export_and_reload(model, cond, codes, tmp_path / "export")


def test_janus_recipes_auto_match_by_hidden_size():
    m = tiny.janus()
    for hidden, name in ((2048, "janus-pro-1b"), (4096, "janus-pro-7b")):
        m.config.text_config.hidden_size = hidden  # only the match condition; nothing is run
        assert match_recipe(m).name == name


# ---------------------------------------------------------------- Lumina-mGPT: size tokens


@pytest.mark.numerics
def test_lumina_size_tokens_and_raster_equivalence():
    model = tiny.lumina_mgpt()
    recipe = fa.load_recipe("lumina-mgpt-7b-768").replace(**{"image.grid": [4, 6]})
    fa.patch(model, recipe)
    ctx = model.flashar.ctx
    # <racm3:break>, then height and width size tokens 8804 + n with n = H / 2 (Lumina's 32-px patches)
    assert ctx.meta_ids((4, 6)) == [8197, 8806, 8807]
    assert ctx.meta_ids((48, 48)) == [8197, 8828, 8828]
    with pytest.raises(ValueError, match="size_token_divisor"):
        ctx.meta_ids((3, 4))
    cond = torch.tensor([[0, 30, 31]])
    codes = torch.randint(0, 8192, (1, 4, 6), generator=torch.Generator().manual_seed(0))
    rows = torch.cat([codes + 4, torch.full((1, 4, 1), 8803)], 2).flatten(1)  # every row closed by 8803
    seq = torch.cat([cond, torch.tensor([[8197, 8806, 8807]]), rows], 1)
    with torch.no_grad():  # Chameleon's forward masks image logits: apply the head to hidden states
        h = model.model(seq).last_hidden_state
    P = 6
    idx = (P + torch.arange(4)[:, None] * 7 + torch.arange(6)[None] - 1).flatten()
    ref = model.lm_head(h[:, idx])[..., 4 : 4 + 8192].view(1, 4, 6, -1)
    assert_same_math(fa.logits(model, cond, codes, mode="raster"), ref, layers=5, width=64)
    assert fa.check(model).ok  # already patched: checked as it is


SIZE_ERRORS = [
    ({"before": [8197, "{size_H}"], "size_token_offset": None}, "image.size_token_offset", "required"),
    ({"before": [8197, "{size_X}"], "size_token_offset": 8804}, "image.before[1]", "token id or one of"),
    ({"size_token_offset": 8804, "size_token_divisor": 0}, "image.size_token_divisor", ">= 1"),
    ({"size_token_offset": 8804, "size_token_divisor": 2, "grid": [3, 4]}, "image.grid", "divisible"),
    ({"size_token_offset": -1}, "image.size_token_offset", ">= 0"),
]


@pytest.mark.parametrize("image,key,msg", SIZE_ERRORS)
def test_size_token_schema_errors(image, key, msg):
    d = fa.load_recipe("lumina-mgpt-7b-768").to_dict()
    d["image"].update(image)
    with pytest.raises(fa.RecipeError, match=msg) as e:
        fa.recipe_from_dict(d)
    assert e.value.key == key


def test_size_token_outside_vocabulary_on_patch():
    model = tiny.chameleon()  # vocabulary 8200: Lumina's size tokens 8804 + n do not exist
    recipe = fa.load_recipe("lumina-mgpt-7b-768").replace(**{"image.grid": [4, 4], "image.eol_token": 8198})
    with pytest.raises(fa.RecipeError, match="outside the vocabulary") as e:
        fa.patch(model, recipe)
    assert e.value.key == "image.size_token_offset"


# ---------------------------------------------------------------- Emu3 / Emu3.5 token ids and Emu3.5 loading


def test_emu3_token_ids_follow_the_public_tokenizer_numbering():
    # Emu3 tokenizer: special ids from 151643 = <|endoftext|>, <|im_start|>, <|im_end|>, <|extra_0..204|>,
    # then <|image token|>, <|image start|>, <|image end|>, <|visual token 000000|>, ...
    extra = lambda n: 151646 + n  # noqa: E731
    for name, K in (("emu3-gen", 32768), ("emu3.5-image", 131072)):
        im = fa.load_recipe(name).image
        assert im.eol_token == extra(200) == 151846
        assert im.before == (151852, "{H}", 9, "{W}", 151851)  # <|image start|> H * W <|image token|>
        assert im.visual_token_offset == 151853 + 1 and im.codebook_size == K  # eoi + 1 (FlashAR fork)
        assert im.digit_ids == tuple(range(15, 25))  # Qwen byte-level ranks of '0'..'9' ('!' = 0)
    assert 151854 + 32768 == 184622  # Emu3Config.vocab_size: the visual ids end the vocabulary
    assert fa.load_recipe("emu3-gen").condition.uncond_ids == (extra(203),)  # BOS <|extra_203|>


@pytest.mark.numerics
def test_emu3p5_official_layout_to_export(tmp_path):
    from tests.test_emu3p5 import reference_logits  # the official decoder math, written out by hand

    cfg = tiny.emu3p5_official_config()
    sd = tiny.emu3p5_state_dict(cfg)
    tiny.write_emu3p5_official(tmp_path / "Emu3.5-Image", cfg, sd)
    model, runner = load_model(tmp_path / "Emu3.5-Image")  # the Emu3.5 format; its model runs with transformers
    assert runner == "transformers" and type(model).__name__ == "Emu3p5ForCausalLM"
    assert model.config.eoi_token_id == 151853
    assert set(model.state_dict()) == set(sd)  # the official module names, nothing more
    ids = torch.tensor([[151849, 30, 31, 151852, 17, 9, 18, 151851, 151854 + 7, 151854 + 99, 151846]])
    with torch.no_grad():
        ref = reference_logits(cfg, sd, ids)
        own = model(input_ids=ids).logits
    assert_same_math(own, ref, layers=5, width=32)  # same math as the official modelling file, other op order
    fa.patch(model, grid=[2, 3])  # no recipe: auto-matched
    assert model.flashar.ctx.recipe.name == "emu3.5-image" and len(model.flashar.branch_layers) == 4
    cond = torch.tensor([[151849, 30, 31, 151746]])
    assert model.flashar.ctx.meta_ids((2, 3)) == [151852, 17, 9, 18, 151851]
    codes = _greedy_equals_teacher_forcing(model, cond)
    out = _export_and_reload(model, cond, codes, tmp_path / "export")
    exported = json.loads((out / "backbone" / "config.json").read_text())
    assert exported["architectures"] == ["Emu3ForCausalLM"] and exported["model_type"] == "Emu3"
    assert exported["eoi_token_id"] == 151853 and (out / "backbone" / "model.safetensors.index.json").is_file()


def test_emu3p5_loader_rejects_foreign_weights(tmp_path):
    from flashar_adapt.integrations.emu3p5 import load_emu3p5

    cfg = tiny.emu3p5_official_config(num_hidden_layers=2)
    sd = tiny.emu3p5_state_dict(cfg)
    del sd["model.layers.1.self_attn.q_norm.weight"]  # an Emu3 (not 3.5) layer has no q_norm
    tiny.write_emu3p5_official(tmp_path / "ck", cfg, sd)
    with pytest.raises(ValueError, match="missing .*q_norm"):
        load_emu3p5(tmp_path / "ck")


# ---------------------------------------------------------------- auto-match and entry points


def test_auto_match_picks_the_registry_entry():
    emu3 = tiny.emu3()
    assert match_recipe(emu3).name == "emu3-gen"
    fmnist_like = tiny.llamagen(grid=4, n_layer=4, dim=128, vocab=256, n_head=4)
    assert match_recipe(fmnist_like).name == "fmnist-c2i"  # class + 4 config fields beat any other
    fa.patch(emu3, grid=[2, 2])
    assert emu3.flashar.ctx.recipe.name == "emu3-gen"


def test_auto_match_explains_why_nothing_fits(tmp_path, monkeypatch):
    with pytest.raises(fa.RecipeError) as e:
        fa.patch(tiny.llamagen(grid=4))  # LlamaGen class, but no shipped size has 5 layers of dim 32
    assert e.value.key == "<recipe>"
    msg = str(e.value)
    assert "llamagen-c2i-b: config n_layer = 5, recipe wants 12" in msg
    assert "janus-pro-1b: class Transformer is not JanusForConditionalGeneration" in msg
    # two user recipes matching equally well: refuse to guess
    base = fa.load_recipe("llamagen-c2i-b").to_dict()
    for name in ("mine-a", "mine-b"):
        d = dict(base, name=name, match={"class": "Transformer", "config": {"n_layer": 5, "dim": 32}})
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(d))
    monkeypatch.setenv("FLASHAR_RECIPE_PATH", str(tmp_path))
    with pytest.raises(fa.RecipeError, match="several recipes equally well .*mine-a, mine-b"):
        fa.patch(tiny.llamagen(grid=4))
    (tmp_path / "mine-b.yaml").unlink()
    assert match_recipe(tiny.llamagen(grid=4)).name == "mine-a"


class _EntryPoint:
    def __init__(self, name, obj):
        self.name, self.value, self._obj = name, f"pkg:{name}", obj

    def load(self):
        if isinstance(self._obj, Exception):
            raise self._obj
        return self._obj


def test_recipe_entry_points(tmp_path, monkeypatch):
    import importlib.metadata

    base = fa.load_recipe("llamagen-c2i-b").to_dict()
    for sub in ("plugin_a", "plugin_b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / f"{sub}.yaml").write_text(yaml.safe_dump(dict(base, name=sub)))
    eps = [
        _EntryPoint("a", str(tmp_path / "plugin_a")),  # a folder path
        _EntryPoint("b", lambda: tmp_path / "plugin_b"),  # a callable returning one
        _EntryPoint("broken", ImportError("no module named pkg")),
    ]  # skipped with a warning
    monkeypatch.setattr(
        importlib.metadata, "entry_points", lambda group=None: [e for e in eps if group == "flashar_adapt.recipes"]
    )
    with pytest.warns(UserWarning, match="broken"):
        names = fa.list_recipes()
    assert {"plugin_a", "plugin_b", "llamagen-c2i-b"} <= set(names)
    with pytest.warns(UserWarning):
        assert fa.load_recipe("plugin_b").name == "plugin_b"
