"""The recipe registry as a user meets it: names, file stems, auto-match priority, TODOs,
and "did you mean" for every kind of override."""

from __future__ import annotations

import pytest
import yaml

import flashar_adapt as fa
from flashar_adapt.matching import candidates, match_recipe
from tests import tiny


def _write(folder, stem, data):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{stem}.yaml").write_text(yaml.safe_dump(data, sort_keys=False))


def _llama_draft(name: str) -> dict:
    """What `inspect` drafts for a transformers Llama, filled in (match: the class only)."""
    d = tiny.hf_llama_recipe(grid=(3, 4)).to_dict()
    return dict(d, name=name, match={"class": "LlamaForCausalLM"})


def test_user_recipe_beats_a_shipped_one_of_equal_specificity(tmp_path, monkeypatch):
    model = tiny.llamagen(grid=4)
    model.config.n_layer, model.config.dim = 12, 768  # the match conditions of llamagen-c2i-b; nothing is run
    assert match_recipe(model).name == "llamagen-c2i-b"
    mine = dict(fa.load_recipe("llamagen-c2i-b").to_dict(), name="my-b")  # same three conditions
    _write(tmp_path, "my-b", mine)
    monkeypatch.setenv("FLASHAR_RECIPE_PATH", str(tmp_path))
    assert match_recipe(model).name == "my-b"
    # a shipped recipe that is *more* specific still wins over a less specific user recipe
    _write(tmp_path, "my-b", dict(mine, match={"class": "Transformer"}))
    assert match_recipe(model).name == "llamagen-c2i-b"


def test_shipped_template_never_auto_matches_and_the_draft_does(tmp_path, monkeypatch):
    model = tiny.hf_llama()
    with pytest.raises(fa.RecipeError, match="no recipe matches LlamaForCausalLM"):
        match_recipe(model)
    assert fa.load_recipe("llama-image-ar").match == {}
    _write(tmp_path, "my-llama", _llama_draft("my-llama"))
    monkeypatch.setenv("FLASHAR_RECIPE_PATH", str(tmp_path))
    fa.patch(model)  # the guide's last step
    assert model.flashar.ctx.recipe.name == "my-llama"


def test_recipe_found_by_stem_and_by_declared_name(tmp_path, monkeypatch):
    _write(tmp_path, "file-stem", _llama_draft("declared-name"))
    monkeypatch.setenv("FLASHAR_RECIPE_PATH", str(tmp_path))
    assert fa.load_recipe("file-stem").name == "declared-name"
    assert fa.load_recipe("declared-name").source == str(tmp_path / "file-stem.yaml")
    # candidates (and so every match error) name recipes by the registry name recipe= accepts
    _write(tmp_path, "other-stem", _llama_draft("other-name"))
    with pytest.raises(fa.RecipeError, match=r"equally well \(file-stem, other-stem, all in ") as e:
        match_recipe(tiny.hf_llama())
    assert e.value.key == "<recipe>"
    for name in ("file-stem", "other-stem"):
        assert fa.load_recipe(name).match == {"class": "LlamaForCausalLM"}
    assert {c.name for c in candidates(tiny.hf_llama()) if c.matched} == {"file-stem", "other-stem"}


def test_a_folder_named_like_the_recipe_does_not_hide_it(tmp_path, monkeypatch):
    """The guide keeps the model in ./my-gpt2 and the recipe named my-gpt2."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-llama").mkdir()  # a save_pretrained folder, say
    _write(tmp_path / "recipes", "my-llama", _llama_draft("my-llama"))
    monkeypatch.setenv("FLASHAR_RECIPE_PATH", str(tmp_path / "recipes"))
    assert fa.load_recipe("my-llama").source == str(tmp_path / "recipes" / "my-llama.yaml")
    # a YAML file in the working folder but off the search path: the error says how to use it
    _write(tmp_path, "loose", _llama_draft("loose"))
    with pytest.raises(fa.RecipeError, match="'loose.yaml' is a file here but not on the search path") as e:
        fa.load_recipe("loose")
    assert e.value.key == "<name>"
    assert fa.load_recipe("loose.yaml").name == "loose"


def test_every_todo_is_refused_on_load_and_named():
    d = dict(_llama_draft("x"), name="TODO")
    d["condition"] = dict(d["condition"], pad_id="TODO")
    d["image"] = dict(d["image"], before=[190, "TODO"])
    with pytest.raises(fa.RecipeError) as e:
        fa.recipe_from_dict(d)
    assert e.value.key == "name"
    assert "name, condition.pad_id, image.before[1]" in str(e.value)
    d = dict(_llama_draft("x"), backend="TODO")  # a TODO string passes every type check
    with pytest.raises(fa.RecipeError, match="backend: is still 'TODO'"):
        fa.recipe_from_dict(d)


@pytest.mark.parametrize(
    "typo, suggestion",
    [
        ("branch_layr", "branch_layer"),
        ("gate_hiden", "gate_hidden"),
        ("gird", "grid"),
        ("flashr.branch_layer", "flashar"),
        ("image.codebok_size", "codebook_size"),
    ],
)
def test_override_typos_get_did_you_mean(typo, suggestion):
    r = fa.load_recipe("llamagen-c2i-b")
    with pytest.raises(fa.RecipeError, match=f"did you mean '{suggestion}'"):
        r.replace(**{typo: 1})
    with pytest.raises(fa.RecipeError, match=f"did you mean '{suggestion}'"):
        fa.patch(tiny.llamagen(grid=4), tiny.llamagen_recipe(), **{typo: 1})
