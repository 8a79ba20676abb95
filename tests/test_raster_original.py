"""Raster mode of a patched model gives the logits of the original, unpatched model."""

from __future__ import annotations

import pytest
import torch

import flashar_adapt as fa
from tests import tiny
from tests.numerics import assert_same_math


def _own_logits_llamagen(model, cond, codes):
    B = codes.shape[0]
    return model(codes.view(B, -1)[:, :-1], cond)[0].view(*codes.shape, -1)


@pytest.mark.numerics
def test_raster_logits_equal_original_llamagen():
    model = tiny.llamagen(grid=4)
    cond = torch.tensor([1, 9, 0])
    codes = torch.randint(0, 48, (3, 4, 4), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = _own_logits_llamagen(model, cond, codes)
    fa.patch(model, tiny.llamagen_recipe(grid=4))
    got = fa.logits(model, cond, codes, mode="raster")
    assert_same_math(got, ref, layers=5, width=96)  # 5 blocks, FFN hidden 96


def _vocab_ids(recipe, codes):
    return codes + recipe.image.visual_token_offset


@pytest.mark.numerics
@pytest.mark.parametrize("eol,before", [(None, []), (99, []), (None, [97, 98]), (99, [97, 98])])
def test_raster_logits_equal_original_hf_llama(eol, before):
    model = tiny.hf_llama()
    r = tiny.hf_llama_recipe(eol=eol, before=before, grid=(3, 4))
    cond = torch.tensor([[3, 4, 5], [6, 7, 8]])
    codes = torch.randint(0, 40, (2, 3, 4), generator=torch.Generator().manual_seed(0))
    ids = _vocab_ids(r, codes)
    if eol is not None:
        ids = torch.cat([ids, torch.full((2, 3, 1), eol)], 2)
    seq = torch.cat([cond, torch.tensor(before, dtype=torch.long).expand(2, -1), ids.flatten(1)], 1)
    with torch.no_grad():
        full = model(seq).logits[..., 100:140]
    P = cond.shape[1] + len(before)
    rowlen = 4 + (eol is not None)
    slots = P + torch.arange(3)[:, None] * rowlen + torch.arange(4)[None]
    ref = full[:, (slots - 1).flatten()].view(2, 3, 4, -1)
    fa.patch(model, r)
    got = fa.logits(model, cond, codes, mode="raster")
    assert_same_math(got, ref, layers=5, width=64)  # 5 layers, MLP hidden 64


@pytest.mark.numerics
def test_raster_logits_equal_original_janus_and_chameleon():
    # Janus: image codes enter through generation_embeddings/aligner, leave through generation_head.
    m = tiny.janus()
    r = fa.load_recipe("janus-pro-1b").replace(grid=[2, 3], **{"image.variable_grid": True})
    cond = torch.tensor([[1, 30, 31]])
    codes = torch.randint(0, 16384, (1, 2, 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        emb = torch.cat(
            [m.model.language_model.embed_tokens(cond), m.prepare_embeddings_for_image_generation(codes.flatten(1))], 1
        )
        h = m.model.language_model(inputs_embeds=emb).last_hidden_state
        ref = m.model.generation_head(h[:, 2:-1]).view(1, 2, 3, -1)
    fa.patch(m, r)
    assert_same_math(fa.logits(m, cond, codes, mode="raster"), ref, layers=5, width=64)
    # Chameleon: its forward masks image-token logits, so compare to the head on hidden states.
    m = tiny.chameleon()
    r = fa.load_recipe("chameleon").replace(grid=[2, 3], **{"image.variable_grid": True})
    cond = torch.tensor([[0, 30, 8197]])
    codes = torch.randint(0, 8192, (1, 2, 3), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        h = m.model(torch.cat([cond, codes.flatten(1) + 4], 1)).last_hidden_state
        ref = m.lm_head(h[:, 2:-1])[..., 4 : 4 + 8192].view(1, 2, 3, -1)
    fa.patch(m, r)
    assert_same_math(fa.logits(m, cond, codes, mode="raster"), ref, layers=5, width=64)


def test_llamagen_official_checkpoint_layouts(tmp_path):
    from flashar_adapt.integrations.llamagen import config_from_state_dict, load_checkpoint

    src = tiny.llamagen(grid=4, seed=1)
    sd = src.state_dict()
    torch.save({"model": sd, "optimizer": {}, "steps": 10}, tmp_path / "c2i_B.pt")
    torch.save(dict(sd), tmp_path / "consolidated.pth")
    cond = torch.tensor([1, 2])
    codes = torch.randint(0, 48, (2, 4, 4))
    ref = _own_logits_llamagen(src, cond, codes)
    for name in ("c2i_B.pt", "consolidated.pth"):
        dst = tiny.llamagen(grid=4, seed=2)
        load_checkpoint(dst, tmp_path / name)
        assert torch.equal(_own_logits_llamagen(dst, cond, codes), ref)
    cfg = config_from_state_dict(sd)
    assert (cfg.n_layer, cfg.dim, cfg.num_classes, cfg.vocab_size) == (5, 32, 10, 48)
    with pytest.raises(ValueError, match="does not match"):
        load_checkpoint(tiny.llamagen(grid=4, dim=64, n_head=4), tmp_path / "c2i_B.pt")
