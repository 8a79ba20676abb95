"""Core behaviour: exact two-way decoding, raster equivalence, unpatch, step counts."""
from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flashar_adapt as fa
import tiny
from numerics import assert_same_math

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------- families

def _llamagen():
    m = tiny.llamagen(grid=4)
    return m, tiny.llamagen_recipe(grid=4), torch.tensor([3, 7]), None


def _llamagen_t2i():
    m = tiny.llamagen_t2i(grid=4, prefix=5)
    feats = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(1))
    return m, tiny.llamagen_t2i_recipe(grid=4, prefix=5), feats, None


def _hf_llama():
    m = tiny.hf_llama()
    r = tiny.hf_llama_recipe(eol=99, before=[97, 98], grid=(3, 5))
    cond = torch.tensor([[0, 0, 5, 6, 7], [1, 8, 9, 10, 11]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    return m, r, cond, mask


def _emu3():
    m = tiny.emu3()
    r = fa.load_recipe("emu3-gen").replace(grid=[3, 4])
    return m, r, torch.tensor([[151849, 30, 31, 32], [151849, 40, 41, 42]]), None


def _janus():
    m = tiny.janus()
    r = fa.load_recipe("janus-pro-1b").replace(grid=[3, 3], **{"image.variable_grid": True})
    return m, r, torch.tensor([[1, 30, 31, 32], [1, 40, 41, 42]]), None


def _chameleon():
    m = tiny.chameleon()
    r = fa.load_recipe("chameleon").replace(grid=[3, 4], **{"image.variable_grid": True})
    return m, r, torch.tensor([[0, 30, 31, 8197], [0, 40, 41, 8197]]), None


FAMILIES = {"llamagen-c2i": _llamagen, "llamagen-t2i": _llamagen_t2i, "llama": _hf_llama, "emu3": _emu3,
            "janus": _janus, "chameleon": _chameleon}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    model, recipe, cond, mask = FAMILIES[request.param]()
    fa.patch(model, recipe)
    tiny.randomize(model.flashar, seed=11)
    return request.param, model, cond, mask


@pytest.mark.numerics
@pytest.mark.parametrize("mode", ["two_way", "raster"])
def test_greedy_generation_equals_teacher_forcing(family, mode):
    name, model, cond, mask = family
    codes = model.generate(cond, mode=mode, top_k=1, cond_mask=mask)
    H, W = model.flashar.ctx.recipe.image.grid
    assert codes.shape == (cond.shape[0], H, W) and codes.dtype == torch.long
    lg = fa.logits(model, cond, codes, mode=mode, cond_mask=mask)
    assert lg.shape == (cond.shape[0], H, W, model.flashar.ctx.recipe.image.codebook_size)
    # Exact, on any CPU: the cached and the full forward differ by round-off (numerics.reorder_bound,
    # ~1e-6 of the logits' scale), so an argmax flips only where the top two logits of these random
    # models lie within that of each other; such near-ties have odds of order 1e-6 per cell.
    assert torch.equal(lg.argmax(-1), codes)


@pytest.mark.numerics
@pytest.mark.parametrize("mode", ["two_way", "raster"])
def test_greedy_with_cfg_equals_guided_teacher_forcing(family, mode):
    name, model, cond, mask = family
    if not fa.decoding.has_uncond(model.flashar.ctx):
        with pytest.raises(ValueError, match="unconditional"):
            model.generate(cond, mode=mode, top_k=1, cfg_scale=3.0, cond_mask=mask)
        return
    for schedule in ("constant", "linear"):
        codes = model.generate(cond, mode=mode, top_k=1, cfg_scale=3.0, cfg_schedule=schedule, cond_mask=mask)
        lg = fa.logits(model, cond, codes, mode=mode, cfg_scale=3.0, cfg_schedule=schedule, cond_mask=mask)
        assert torch.equal(lg.argmax(-1), codes)


def test_sampled_codes_lie_in_top_k_of_teacher_forcing(family):
    name, model, cond, mask = family
    g = torch.Generator().manual_seed(0)
    codes = model.generate(cond, top_k=3, temperature=1.5, generator=g, cond_mask=mask)
    lg = fa.logits(model, cond, codes, cond_mask=mask)
    top3 = lg.topk(3, -1).indices
    assert (top3 == codes[..., None]).any(-1).all()
    again = model.generate(cond, top_k=3, temperature=1.5, generator=torch.Generator().manual_seed(0), cond_mask=mask)
    assert torch.equal(codes, again)


def test_score_is_sum_of_log_probs(family):
    name, model, cond, mask = family
    codes = model.generate(cond, mode="raster", top_k=0, generator=torch.Generator().manual_seed(3), cond_mask=mask)
    for mode in ("two_way", "raster"):
        s = fa.score(model, cond, codes, mode=mode, cond_mask=mask)
        lp = torch.log_softmax(fa.logits(model, cond, codes, mode=mode, cond_mask=mask), -1)
        ref = lp.gather(-1, codes[..., None]).flatten(1).sum(1)
        torch.testing.assert_close(s, ref)  # float32 defaults: the same ops, summed over H*W log-probs
        assert s.shape == (cond.shape[0],) and (s < 0).all()


@pytest.mark.parametrize("mode", ["two_way", "raster"])
def test_backbone_forward_count(family, mode):
    name, model, cond, mask = family
    ctx = model.flashar.ctx
    calls = []
    handle = ctx.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        model.generate(cond, mode=mode, top_k=1, cond_mask=mask)
    finally:
        handle.remove()
    H, W = ctx.recipe.image.grid
    assert len(calls) == (H + W - 1 if mode == "two_way" else H * W)


# ---------------------------------------------------------------- raster equals the original

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
        emb = torch.cat([m.model.language_model.embed_tokens(cond), m.prepare_embeddings_for_image_generation(codes.flatten(1))], 1)
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
        ref = m.lm_head(h[:, 2:-1])[..., 4:4 + 8192].view(1, 2, 3, -1)
    fa.patch(m, r)
    assert_same_math(fa.logits(m, cond, codes, mode="raster"), ref, layers=5, width=64)


@pytest.mark.parametrize("make", ["llamagen", "hf_llama"])
def test_unpatch_restores_the_model_bit_for_bit(make):
    if make == "llamagen":
        model, recipe = tiny.llamagen(grid=4), tiny.llamagen_recipe(grid=4)
        run = lambda: model(torch.randint(0, 48, (2, 15), generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2]))[0]  # noqa: E731
    else:
        model, recipe = tiny.hf_llama(), tiny.hf_llama_recipe()
        run = lambda: model(torch.randint(0, 160, (2, 9), generator=torch.Generator().manual_seed(0))).logits  # noqa: E731
    before_sd = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before_out = run()
    had_generate = "generate" in model.__dict__
    fa.patch(model, recipe)
    assert any(k.startswith("flashar.") for k in model.state_dict())
    with pytest.raises(RuntimeError, match="already patched"):
        fa.patch(model, recipe)
    model.generate(torch.tensor([1, 2]) if make == "llamagen" else torch.tensor([[3, 4], [5, 6]]), top_k=1)
    fa.unpatch(model)
    after_sd = model.state_dict()
    assert list(after_sd) == list(before_sd)
    assert all(torch.equal(before_sd[k], after_sd[k]) for k in before_sd)
    with torch.no_grad():
        assert torch.equal(run(), before_out)
    assert ("generate" in model.__dict__) == had_generate
    assert not hasattr(model, "flashar")
    with pytest.raises(RuntimeError, match="not patched"):
        fa.unpatch(model)


def test_gate_starts_at_half_and_branch_starts_as_copy():
    model = tiny.llamagen(grid=4)
    fa.patch(model, tiny.llamagen_recipe(grid=4))
    ctx = model.flashar.ctx
    b = ctx.branch_index
    assert b == len(ctx.layers) - 4
    for (n1, p1), (n2, p2) in zip(ctx.layers[b].named_parameters(), model.flashar.branch_layers[0].named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2) and p1.data_ptr() != p2.data_ptr()
    assert torch.equal(model.flashar.vertical_head.proj.weight, model.output.weight)
    codes = torch.randint(0, 48, (2, 4, 4))
    tf = fa.teacher_forward(model, torch.tensor([1, 2]), codes)
    assert torch.allclose(tf.gate, torch.full_like(tf.gate, 0.5))


def test_fixed_gate_is_the_plain_average():
    model = tiny.llamagen(grid=4)
    fa.patch(model, tiny.llamagen_recipe(grid=4), fixed_gate=0.5)
    tiny.randomize(model.flashar, 4)
    tf = fa.teacher_forward(model, torch.tensor([1, 2]), torch.randint(0, 48, (2, 4, 4)))
    inner = 0.5 * (tf.horizontal + tf.vertical)
    torch.testing.assert_close(tf.fused[:, 1:, 1:], inner[:, 1:, 1:])
    torch.testing.assert_close(tf.fused[:, 0], tf.horizontal[:, 0])
    torch.testing.assert_close(tf.fused[:, 1:, 0], tf.vertical[:, 1:, 0])


def test_proximity_mask_shape():
    lay = fa.Layout(prefix_len=2, height=2, width=3, eol=True)
    m = lay.attention("two_way")
    d = lay.slot_diagonal
    # cell (1,0) on diagonal 1 sees (0,1) (diagonal 1, later in raster order? no: earlier) and not (0,2)
    s10, s01, s02 = lay.slot(1, 0), lay.slot(0, 1), lay.slot(0, 2)
    assert m[s10, s01] and not m[s10, s02]
    # (0,1) sees (1,0): same diagonal, later in raster order
    assert m[s01, s10]
    # end-of-line of row 0 lives on diagonal W = 3
    assert d[lay.slot(0, 3)] == 3
    # the prefix stays causal
    assert m[1, 0] and not m[0, 1]
    assert lay.num_steps_two_way == 4 and lay.num_steps_raster == 6


# ---------------------------------------------------------------- property tests

_HF = {}


def _hf_model():
    if "m" not in _HF:
        _HF["m"] = tiny.hf_llama(max_pos=512)
    return _HF["m"]


@pytest.mark.numerics
@SETTINGS
@given(H=st.integers(1, 5), W=st.integers(1, 5), prefix=st.integers(1, 6), batch=st.integers(1, 3),
       eol=st.booleans(), meta=st.booleans(), cfg=st.sampled_from([1.0, 2.5]), mode=st.sampled_from(["two_way", "raster"]),
       seed=st.integers(0, 2**16))
def test_property_incremental_equals_teacher_forcing(H, W, prefix, batch, eol, meta, cfg, mode, seed):
    model = _hf_model()
    r = tiny.hf_llama_recipe(eol=99 if eol else None, before=[97, 98] if meta else [], grid=(H, W))
    fa.patch(model, r)
    try:
        tiny.randomize(model.flashar, seed)
        g = torch.Generator().manual_seed(seed)
        cond = torch.randint(1, 90, (batch, prefix), generator=g)
        lengths = torch.randint(1, prefix + 1, (batch,), generator=g)
        mask = torch.arange(prefix)[None] >= (prefix - lengths)[:, None]  # left padding
        cond = cond.masked_fill(~mask, 0)
        codes = model.generate(cond, mode=mode, top_k=1, cfg_scale=cfg, cond_mask=mask)
        lg = fa.logits(model, cond, codes, mode=mode, cfg_scale=cfg, cond_mask=mask)
        assert torch.equal(lg.argmax(-1), codes)
    finally:
        fa.unpatch(model)


_LG = {}


@pytest.mark.numerics
@SETTINGS
@given(grid=st.integers(1, 5), batch=st.integers(1, 4), cfg=st.sampled_from([1.0, 4.0]),
       mode=st.sampled_from(["two_way", "raster"]), depth=st.integers(1, 3), seed=st.integers(0, 2**16))
def test_property_llamagen(grid, batch, cfg, mode, depth, seed):
    if grid not in _LG:
        _LG[grid] = tiny.llamagen(grid=grid)
    model = _LG[grid]
    fa.patch(model, tiny.llamagen_recipe(grid=grid), branch_depth=depth, branch_layer=-3)
    try:
        tiny.randomize(model.flashar, seed)
        cond = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(seed))
        codes = model.generate(cond, mode=mode, top_k=1, cfg_scale=cfg)
        lg = fa.logits(model, cond, codes, mode=mode, cfg_scale=cfg)
        assert torch.equal(lg.argmax(-1), codes)
    finally:
        fa.unpatch(model)


@SETTINGS
@given(K=st.integers(2, 30), top_k=st.integers(0, 30), top_p=st.floats(0.05, 1.0), seed=st.integers(0, 2**16))
def test_property_sampling_support(K, top_k, top_p, seed):
    g = torch.Generator().manual_seed(seed)
    lg = torch.randn(64, K, generator=g) * 3
    tok = fa.sample(lg, temperature=1.0, top_k=top_k, top_p=top_p, generator=g)
    assert tok.shape == (64,) and (tok >= 0).all() and (tok < K).all()
    order = lg.argsort(-1, descending=True)
    rank = (order == tok[:, None]).float().argmax(-1)
    if 0 < top_k:
        assert (rank < top_k).all()
    probs = torch.softmax(lg, -1).gather(-1, order).cumsum(-1)
    mass_before = torch.cat([torch.zeros(64, 1), probs[:, :-1]], 1).gather(-1, rank[:, None])[:, 0]
    assert (mass_before <= top_p + 1e-6).all()  # a token is kept only while the mass before it is below top_p


# ---------------------------------------------------------------- input errors

def test_generation_input_errors():
    model = tiny.llamagen(grid=4)
    fa.patch(model, tiny.llamagen_recipe(grid=4))
    ok = torch.tensor([1])
    cases = [
        (dict(cond=torch.tensor([10])), "class ids"),
        (dict(cond=torch.tensor([-1])), "class ids"),
        (dict(cond=torch.tensor([[1]])), "LongTensor \\[B\\]"),
        (dict(cond=ok, top_k=-1), "top_k"),
        (dict(cond=ok, top_p=0.0), "top_p"),
        (dict(cond=ok, temperature=-1.0), "temperature"),
        (dict(cond=ok, cfg_scale=float("nan")), "cfg_scale"),
        (dict(cond=ok, grid=(5, 5)), "fixed grid"),
        (dict(cond=ok, mode="zigzag"), "mode"),
        (dict(cond=ok, cfg_schedule="cosine"), "cfg_schedule"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(ValueError, match=msg):
            model.generate(**kwargs)


def test_prompt_errors_and_positions_limit():
    model = tiny.hf_llama(max_pos=40)
    fa.patch(model, tiny.hf_llama_recipe(grid=(4, 4)))
    with pytest.raises(ValueError, match="at most 16"):
        model.generate(torch.ones(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        model.generate(torch.ones(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="positions"):
        model.generate(torch.ones(1, 3, dtype=torch.long), grid=(7, 7))
    with pytest.raises(ValueError, match="vocabulary|\\[0, 160\\)"):
        model.generate(torch.full((1, 3), 500))


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
