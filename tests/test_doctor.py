"""The recipe doctor and inspect: the docs/writing-a-recipe.md walk-through, end to end."""

from __future__ import annotations

import pytest
import torch
import yaml

import flashar_adapt as fa
from flashar_adapt import commands
from tests import tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _run(capsys, *argv) -> tuple[int, str]:
    rc = commands.main([str(a) for a in argv])
    return rc, capsys.readouterr().out


def test_walkthrough_gpt2_from_inspect_to_passing_check(tmp_path, capsys, monkeypatch):
    """docs/writing-a-recipe.md, step by step, on an architecture no shipped recipe covers."""
    src = tiny.gpt2()
    src.save_pretrained(tmp_path / "my-gpt2", safe_serialization=True)

    # 1. inspect: layer list, norms, embeddings, candidate heads, and a draft recipe
    rc, out = _run(capsys, "inspect", tmp_path / "my-gpt2", "--out", tmp_path / "draft.yaml")
    assert rc == 0
    assert "decoder layers: transformer.h  (4 x GPT2Block)" in out
    assert "decoder module (takes inputs_embeds): transformer" in out
    for line in ("transformer.ln_f", "transformer.wte", "transformer.wpe", "lm_head"):
        assert line in out
    draft = yaml.safe_load((tmp_path / "draft.yaml").read_text())
    assert draft["backend"] == "transformers" and draft["match"] == {"class": "GPT2LMHeadModel"}
    assert draft["modules"] == {
        "decoder": "transformer",
        "layers": "transformer.h",
        "norm": "transformer.ln_f",
        "head": "lm_head",
        "embed": "transformer.wte",
    }
    assert any("c_attn" in t for t in draft["lora"]["targets"])  # GPT-2's Conv1D projections are found too

    # 2. the draft is not a recipe yet: the loader names every TODO key (name first)
    with pytest.raises(fa.RecipeError) as e:
        fa.load_recipe(tmp_path / "draft.yaml")
    assert e.value.key == "name" and "condition.pad_id" in str(e.value) and "condition.prefix_len" in str(e.value)

    # 3. fill in the token layout (this model's ids: codes 100..163, one BOI 190, end-of-line 199)
    draft["name"] = "my-gpt2"
    draft["condition"].update(prefix_len=16, pad_id=0)
    draft["image"].update(
        codebook_size=64, visual_token_offset=100, grid=[3, 4], variable_grid=True, before=[190], eol_token=199
    )
    (tmp_path / "my-gpt2.yaml").write_text(yaml.safe_dump(draft, sort_keys=False))

    # 4. check: raster = the model's own forward, two-way = teacher forcing, H+W-1 steps
    rc, out = _run(capsys, "check", tmp_path / "my-gpt2", tmp_path / "my-gpt2.yaml")
    assert rc == 0, out
    assert "PASS  raster" in out and "PASS  two_way" in out and "6 backbone steps for a 3x4 grid" in out
    assert out.strip().endswith("RESULT: pass")

    # 5. keep it in a recipe folder: auto-match finds it (by the draft's match: class)
    monkeypatch.setenv("FLASHAR_RECIPE_PATH", str(tmp_path))
    rc, out = _run(capsys, "check", tmp_path / "my-gpt2", "--grid", 2, 5)
    assert rc == 0 and "recipe my-gpt2 on GPT2LMHeadModel, grid [2, 5]" in out
    model = fa.patch(tiny.gpt2())
    cond = torch.tensor([[0, 0, 5, 6, 190 - 1], [1, 8, 9, 10, 11]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)  # left padding, absolute positions
    codes = model.generate(cond, top_k=1, cond_mask=mask)
    assert torch.equal(fa.logits(model, cond, codes, cond_mask=mask).argmax(-1), codes)


def test_inspect_and_check_a_llamagen_checkpoint(tmp_path, capsys):
    torch.save({"model": tiny.llamagen(grid=4).state_dict()}, tmp_path / "c2i.pt")
    sizes = ["--set", "n_head=4", "--set", "block_size=16"]  # the head count is not in the weights
    rc, out = _run(capsys, "inspect", tmp_path / "c2i.pt", "--out", tmp_path / "draft.yaml", *sizes)
    assert rc == 0 and "decoder layers: layers  (5 x TransformerBlock)" in out and "backend: llamagen" in out
    draft = yaml.safe_load((tmp_path / "draft.yaml").read_text())
    assert draft["modules"] == {"layers": "layers", "norm": "norm", "head": "output", "embed": "tok_embeddings"}
    assert draft["condition"] == {
        "kind": "class",
        "embedding": "cls_embedding.embedding_table",
        "num_classes": 10,
        "null_class": 10,
        "prefix_len": 1,
    }
    draft["name"] = "tiny-c2i"
    draft["image"].update(codebook_size=48, visual_token_offset=0, grid=[4, 4])
    (tmp_path / "tiny-c2i.yaml").write_text(yaml.safe_dump(draft))
    rc, out = _run(capsys, "check", tmp_path / "c2i.pt", tmp_path / "tiny-c2i.yaml", *sizes)
    assert rc == 0, out
    assert "equal the model's own forward" in out and "7 backbone steps for a 4x4 grid" in out


def test_check_names_the_recipe_key_at_fault():
    model = tiny.hf_llama()
    # a head of the right shape that the model does not use: only the raster check can tell
    model.decoy = torch.nn.Linear(32, 160, bias=False)
    rep = fa.check(model, tiny.hf_llama_recipe(grid=(3, 4), **{"modules.head": "decoy"}))
    assert not rep.ok and rep.item("raster").status == "fail" and rep.failed_keys == ["modules.head"]
    assert "[recipe key: modules.head]" in str(rep) and "RESULT: FAIL (check modules.head)" in str(rep)
    assert not hasattr(model, "flashar")  # check leaves the model as it found it
    # problems patch() finds are reported with their key, not raised
    rep = fa.check(model, tiny.hf_llama_recipe(grid=(3, 4), **{"modules.layers": "model.layerz"}))
    assert not rep.ok and rep.failed_keys == ["modules.layers"] and "did you mean 'layers'" in str(rep)
    rep = fa.check(model, tiny.hf_llama_recipe(grid=(30, 30)))
    assert rep.failed_keys == ["image.grid"]
    # and the right recipe passes on the same model
    assert fa.check(model, tiny.hf_llama_recipe(grid=(3, 4))).ok


def test_check_reference_rules_per_family():
    # LlamaGen: the backend's own forward; Chameleon: its forward masks image logits, so the
    # head on last_hidden_state is the reference; Janus: separate image head, no input ids.
    cases = [
        (tiny.llamagen(grid=4), tiny.llamagen_recipe(grid=4), "model's own forward"),
        (tiny.chameleon(), fa.load_recipe("chameleon"), "forward masks"),
        (
            tiny.janus(),
            fa.load_recipe("janus-pro-1b").replace(**{"image.variable_grid": True}),
            "head(last_hidden_state)",
        ),
    ]
    for model, recipe, phrase in cases:
        rep = fa.check(model, recipe, grid=(3, 3) if recipe.image.variable_grid else None)
        assert rep.ok, str(rep)
        assert phrase in rep.item("raster").detail
        H, W = rep.grid
        assert rep.item("steps").detail.startswith(f"{H + W - 1} backbone steps")
    rep = fa.check(tiny.emu3(), grid=(2, 3))  # auto-matched
    assert rep.ok and rep.recipe == "emu3-gen"
