"""Recipes: every shipped one loads; every bad one is a RecipeError naming the key."""

from __future__ import annotations

import pytest
import torch
import yaml

import flashar_adapt as fa
from flashar_adapt.recipe import safe_yaml
from tests import tiny


def test_shipped_recipes_load_and_round_trip(tmp_path):
    names = fa.list_recipes()
    for expected in (
        "llamagen-c2i-b",
        "llamagen-c2i-l",
        "llamagen-c2i-xl",
        "llamagen-c2i-xxl",
        "llamagen-c2i-3b",
        "llamagen-t2i-xl",
        "emu3-gen",
        "janus-pro-1b",
        "janus-pro-7b",
        "chameleon",
        "llama-image-ar",
    ):
        assert expected in names
    for name in names:
        r = fa.load_recipe(name)
        assert r.name == name
        p = tmp_path / f"{name}.yaml"
        p.write_text(r.to_yaml())
        again = fa.load_recipe(p)
        assert again.to_dict() == r.to_dict()


def test_user_recipe_folders(tmp_path, monkeypatch):
    data = fa.load_recipe("llamagen-c2i-b").to_dict()
    data["name"] = "my-model"
    (tmp_path / "my-model.yaml").write_text(yaml.safe_dump(data))
    monkeypatch.setenv("FLASHAR_RECIPE_PATH", str(tmp_path))
    assert "my-model" in fa.list_recipes()
    assert fa.load_recipe("my-model").name == "my-model"
    monkeypatch.delenv("FLASHAR_RECIPE_PATH")
    assert fa.load_recipe("my-model", extra_dirs=[tmp_path]).name == "my-model"
    with pytest.raises(fa.RecipeError, match="no recipe named 'my-modle'"):
        fa.load_recipe("my-modle")


def _base() -> dict:
    return fa.load_recipe("llamagen-c2i-b").to_dict()


def _mutate(path: str, value):
    d = _base()
    node = d
    parts = path.split(".")
    for p in parts[:-1]:
        node = node[p]
    if value is _DELETE:
        del node[parts[-1]]
    else:
        node[parts[-1]] = value
    return d


_DELETE = object()

LOAD_ERRORS = [
    ("modules.layers", _DELETE, "modules.layers", "required"),
    ("image", _DELETE, "image", "required"),
    ("modules.layrs", "layers", "modules.layrs", "did you mean 'layers'"),
    ("flashar.branch_layr", 1, "flashar.branch_layr", "did you mean 'branch_layer'"),
    ("imagee", {}, "imagee", "did you mean 'image'"),
    ("image.grid", [16], "image.grid", "\\[H, W\\]"),
    ("image.grid", "16x16", "image.grid", "\\[H, W\\]"),
    ("image.codebook_size", "big", "image.codebook_size", "integer"),
    ("image.codebook_size", 1, "image.codebook_size", ">= 2"),
    ("image.before", [1, "{X}"], "image.before[1]", "token id"),
    ("image.before", [1, "{H}"], "image.digit_ids", "10 token ids"),
    ("image.eol_token", -3, "image.eol_token", ">= 0"),
    ("condition.kind", "audio", "condition.kind", "one of"),
    ("condition.uncond", "pad_inner", "condition.uncond", "for kind 'class'"),
    ("condition.null_class", 5, "condition.null_class", "outside the real classes 0..999"),
    ("condition.null_class", 999, "condition.null_class", "outside the real classes"),
    # a special token that is also a code: the decoder could not tell them apart
    ("image.eol_token", 16383, "image.eol_token", "inside the visual range 0..16383"),
    ("image.before", [16384, 7], "image.before", "id 7 is inside the visual range"),
    ("flashar.branch_depth", 0, "flashar.branch_depth", ">= 1"),
    ("flashar.branch_layer", True, "flashar.branch_layer", "integer"),
    ("lora.targets", ["all-linear"], "lora.targets", "all-linear"),
    ("image.variable_grid", "yes", "image.variable_grid", "true or false"),
]


@pytest.mark.parametrize("path,value,key,msg", LOAD_ERRORS)
def test_bad_recipe_on_load(path, value, key, msg):
    with pytest.raises(fa.RecipeError, match=msg) as e:
        fa.recipe_from_dict(_mutate(path, value))
    assert e.value.key == key
    assert key in str(e.value)


def test_bad_yaml_and_missing_file(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("name: [unclosed\n")
    with pytest.raises(fa.RecipeError, match="not valid YAML"):
        fa.load_recipe(p)
    with pytest.raises(fa.RecipeError, match="does not exist"):
        fa.load_recipe(tmp_path / "nope.yaml")
    p.write_text("!!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(fa.RecipeError):
        fa.load_recipe(p)


def test_a_key_given_twice_is_refused_naming_key_and_lines(tmp_path):
    # PyYAML keeps the last one: a second `flashar:` block would silently replace the first
    text = fa.load_recipe("llamagen-c2i-b").to_yaml() + "flashar:\n  branch_layer: -2\n"
    p = tmp_path / "twice.yaml"
    p.write_text(text)
    first = 1 + text.splitlines().index("flashar:")
    last = len(text.splitlines()) - 1
    with pytest.raises(fa.RecipeError, match=f"given twice \\(line {last}, first at line {first}\\)") as e:
        fa.load_recipe(p)
    assert e.value.key == "flashar"
    p.write_text("image:\n  grid: [4, 4]\n  grid: [8, 8]\n")
    with pytest.raises(fa.RecipeError, match="'grid' is given twice"):
        fa.load_recipe(p)
    # equal keys in two mappings are fine
    assert safe_yaml("a: &x 1\nb: {c: *x}\nd: {c: 2}\n") == {"a": 1, "b": {"c": 1}, "d": {"c": 2}}


PATCH_ERRORS = [
    ({"modules.layers": "blocks"}, "modules.layers", "has no attribute 'blocks'"),
    ({"modules.head": "outptu"}, "modules.head", "did you mean 'output'"),
    ({"modules.layers": "norm"}, "modules.layers", "expected ModuleList"),
    ({"flashar.branch_layer": 5}, "flashar.branch_layer", "out of range for 5"),
    ({"flashar.branch_layer": -6}, "flashar.branch_layer", "out of range"),
    ({"flashar.branch_layer": 3, "flashar.branch_depth": 3}, "flashar.branch_depth", "run past"),
    ({"image.codebook_size": 49}, "image.codebook_size", "outside the vocabulary"),
    ({"image.before": [48]}, "image.before", "outside the vocabulary"),
    ({"image.eol_token": 100}, "image.eol_token", "outside the vocabulary"),
    ({"image.grid": [5, 5]}, "image.grid", "positions"),
    ({"condition.num_classes": 20, "condition.null_class": 20}, "condition.num_classes", "rows"),
    ({"condition.embedding": "cls_embedding.missing"}, "condition.embedding", "no attribute"),
    ({"backend": "llamagenn"}, "backend", "did you mean 'llamagen'"),
]


@pytest.mark.parametrize("over,key,msg", PATCH_ERRORS)
def test_bad_recipe_on_patch(over, key, msg):
    model = tiny.llamagen(grid=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = tiny.llamagen_recipe(grid=4, **over)
    with pytest.raises(fa.RecipeError, match=msg) as e:
        fa.patch(model, recipe)
    assert e.value.key == key
    assert not hasattr(model, "flashar")  # nothing half-attached
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_hf_recipe_errors():
    model = tiny.hf_llama(max_pos=64)
    with pytest.raises(fa.RecipeError, match="inputs_embeds") as e:
        fa.patch(model, tiny.hf_llama_recipe(**{"modules.decoder": "model.norm"}))
    assert e.value.key == "modules.decoder"
    with pytest.raises(fa.RecipeError) as e:
        fa.patch(model, tiny.hf_llama_recipe(**{"condition.pad_id": 1000}))
    assert e.value.key == "condition.pad_id"
    with pytest.raises(fa.RecipeError) as e:
        fa.patch(model, tiny.hf_llama_recipe(grid=(8, 8)))
    assert e.value.key == "image.grid"


def test_overrides_through_patch():
    model = tiny.llamagen(grid=4)
    fa.patch(model, tiny.llamagen_recipe(grid=4), branch_layer=1, branch_depth=2, gate_hidden=8)
    ctx = model.flashar.ctx
    assert ctx.branch_index == 1 and len(model.flashar.branch_layers) == 2
    assert model.flashar.gate.net[0].out_features == 8
    fa.unpatch(model)
    with pytest.raises(fa.RecipeError, match="not a recipe key"):
        fa.patch(model, tiny.llamagen_recipe(grid=4), branch_lyer=1)


def test_a_null_value_takes_the_default_and_sizes_are_bounded():
    d = _mutate("flashar.branch_layer", None)
    d["modules"]["image_embed"] = None
    r = fa.recipe_from_dict(d)
    assert r.flashar.branch_layer == -1 and r.modules.image_embed == ()
    with pytest.raises(fa.RecipeError, match="is required") as e:
        fa.recipe_from_dict(_mutate("image.grid", None))
    assert e.value.key == "image.grid"
    d = _base()
    d["tokenizer"] = {"kind": "color-clusters", "channels": 10**12}  # its default mean/std would not fit in memory
    with pytest.raises(fa.RecipeError) as e:
        fa.recipe_from_dict(d)
    assert e.value.key == "tokenizer.channels"


@pytest.mark.parametrize("data", [b"\x00", "name: a\x00b\n", "a: 1\n\x07"])
def test_control_characters_in_yaml_are_a_recipe_error(data):
    """PyYAML's reader refuses them while the loader is built, before parsing starts."""
    from flashar_adapt.recipe import RecipeError, safe_yaml

    with pytest.raises(RecipeError, match="not valid YAML: unacceptable character"):
        safe_yaml(data, "cfg.yaml")
