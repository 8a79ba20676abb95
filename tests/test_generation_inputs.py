"""Generation under misuse: threads and copies of one model, a model left in train mode,
and bad generation inputs refused up front (issue 17, items 2, 7, 8, 10)."""

from __future__ import annotations

import copy
import threading

import pytest
import torch

import flashar_adapt as fa
from tests import tiny


def _llamagen(dropout: float = 0.0):
    torch.manual_seed(0)
    from flashar_adapt.integrations.llamagen import ModelArgs, Transformer

    args = ModelArgs(
        dim=32,
        n_layer=5,
        n_head=4,
        multiple_of=16,
        vocab_size=48,
        num_classes=10,
        block_size=16,
        cls_token_num=1,
        token_dropout_p=dropout,
        resid_dropout_p=dropout,
        ffn_dropout_p=dropout,
    )
    m = Transformer(args).eval()
    tiny.randomize(m, 0)
    fa.patch(m, tiny.llamagen_recipe(grid=4))
    tiny.randomize(m.flashar, seed=11)
    return m


def _hf():
    m = tiny.hf_llama()
    fa.patch(m, tiny.hf_llama_recipe(grid=(3, 4)))
    tiny.randomize(m.flashar, seed=11)
    return m


CONDS = {
    "llamagen": [torch.tensor([c, (c + 3) % 10]) for c in range(4)],
    "hf": [torch.tensor([[1, 2 + c, 3], [4, 5, 6 + c]]) for c in range(4)],
}


# ---------------------------------------------------------------- item 2: threads and copies


@pytest.mark.parametrize("name", ["llamagen", "hf"])
def test_threads_on_one_model_equal_sequential_runs(name):
    model = _llamagen() if name == "llamagen" else _hf()
    conds = CONDS[name]
    kw = [dict(mode=m, top_k=1) for m in ("two_way", "raster")]
    want = {(i, j): model.generate(c, **k) for i, c in enumerate(conds) for j, k in enumerate(kw)}
    got, errors = {}, []

    def work(i, j):
        try:
            got[i, j] = model.generate(conds[i], **kw[j])
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=key) for key in want for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_reentrant_generate_from_a_hook_is_refused():
    model = _llamagen()
    inner = []

    def hook(*a):
        if not inner:
            inner.append(1)
            model.generate(torch.tensor([1]), top_k=1)

    h = model.flashar.ctx.layers[0].register_forward_pre_hook(hook)
    try:
        with pytest.raises(RuntimeError, match="re-entrant"):
            model.generate(torch.tensor([1]), top_k=1)
    finally:
        h.remove()
    model.generate(torch.tensor([1]), top_k=1)  # the lock was released


@pytest.mark.parametrize("name", ["llamagen", "hf"])
def test_deepcopy_of_a_patched_model_is_independent(name):
    model = _llamagen() if name == "llamagen" else _hf()
    cond = CONDS[name][0]
    ref = model.generate(cond, top_k=1)
    twin = copy.deepcopy(model)
    assert twin.flashar.ctx.model is twin and twin.flashar.ctx.layers is not model.flashar.ctx.layers
    assert torch.equal(twin.generate(cond, top_k=1), ref)
    # the copy's branch reads the copy's backbone: change the copy's backbone, not the original's
    with torch.no_grad():
        for p in twin.flashar.ctx.layers[twin.flashar.ctx.branch_index].parameters():
            p.mul_(-1)
    assert not torch.equal(twin.generate(cond, top_k=1), ref)
    assert torch.equal(model.generate(cond, top_k=1), ref)
    # threads on the original and the copy at once, and unpatching the copy leaves the original patched
    out = {}
    ts = [
        threading.Thread(target=lambda k=k, m=m: out.__setitem__(k, m.generate(cond, top_k=1)))
        for k, m in (("a", model), ("b", twin))
    ]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert torch.equal(out["a"], ref)
    fa.unpatch(twin)
    assert torch.equal(model.generate(cond, top_k=1), ref)


# ---------------------------------------------------------------- item 8: train mode


def test_generation_runs_in_eval_behaviour_and_restores_the_mode():
    model = _llamagen(dropout=0.3)
    cond = torch.tensor([2, 5])
    model.train()
    model.flashar.gate.eval()  # a mixed state must come back exactly
    before = {n: m.training for n, m in model.named_modules()}
    a = model.generate(cond, top_k=1)
    b = model.generate(cond, top_k=1)
    assert torch.equal(a, b)
    assert torch.equal(fa.logits(model, cond, a).argmax(-1), a)
    state = fa.prefill(model, cond, mode="raster", top_k=1)
    fa.step(state)
    # (generate adds the static KV cache modules; every module that was there keeps its flag)
    assert {n: m.training for n, m in model.named_modules() if n in before} == before
    model.eval()
    assert torch.equal(model.generate(cond, top_k=1), a)


# ---------------------------------------------------------------- items 7 and 10: bad inputs


def test_sampling_settings_are_validated_in_one_place():
    bad = [
        dict(cfg_scale=float("nan")),
        dict(cfg_scale=-1),
        dict(cfg_scale=True),
        dict(cfg_schedule="bogus"),
        dict(temperature=float("inf")),
        dict(temperature=-0.1),
        dict(top_k=1.5),
        dict(top_k=True),
        dict(top_p=0),
        dict(top_p=1.5),
        dict(generator=42),
    ]
    model = _llamagen()
    for kw in bad:
        key = next(iter(kw))
        with pytest.raises(ValueError, match=key):
            fa.Sampling(**kw)
        with pytest.raises(ValueError, match=key):
            model.generate(torch.tensor([1]), **kw)
    codes = model.generate(torch.tensor([1]), top_k=1)
    for kw in (dict(cfg_scale=float("nan")), dict(cfg_scale=2.0, cfg_schedule="bogus")):
        with pytest.raises(ValueError, match=next(iter(kw)) if len(kw) == 1 else "cfg_schedule"):
            fa.logits(model, torch.tensor([1]), codes, **kw)


def test_a_tiny_temperature_is_the_greedy_limit():
    model = _llamagen()
    cond = torch.tensor([1, 4])
    greedy = model.generate(cond, top_k=1)
    for t in (1e-300, 1e-30):
        assert torch.equal(model.generate(cond, temperature=t, generator=torch.Generator().manual_seed(0)), greedy)


def test_codes_of_any_integer_dtype_and_refused_float_codes():
    model = _llamagen()
    cond = torch.tensor([1, 4])
    codes = model.generate(cond, top_k=1)
    ref = fa.logits(model, cond, codes)
    for dt in (torch.int16, torch.int32, torch.uint8):
        assert torch.equal(fa.logits(model, cond, codes.to(dt)), ref)
    with pytest.raises(ValueError, match="integer tensor"):
        fa.logits(model, cond, codes.float())


def test_feature_conditions_are_checked():
    model = tiny.llamagen_t2i(grid=4, prefix=5)
    fa.patch(model, tiny.llamagen_t2i_recipe(grid=4, prefix=5))
    feats = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(1))
    ref = model.generate(feats, top_k=1)
    # another float dtype enters in the model's dtype (float64 -> float32 is exact for these values)
    assert torch.equal(model.generate(feats.double(), top_k=1), ref)
    cases = [
        (torch.randn(2, 5, 23), "24 channels"),
        (feats.int(), "FloatTensor"),
        (feats.masked_fill(torch.rand(2, 5, 24) < 0.1, float("nan")), "NaN or inf"),
        (feats.masked_fill(torch.rand(2, 5, 24) < 0.1, float("inf")), "NaN or inf"),
    ]
    for bad, msg in cases:
        with pytest.raises(ValueError, match=msg):
            model.generate(bad, top_k=1)


def test_prompt_masks_must_be_left_padding():
    model = _hf()
    cond = torch.tensor([[1, 2, 3, 0], [4, 5, 6, 7]])
    for mask, msg in (
        ([[1, 1, 1, 0], [1, 1, 1, 1]], "left padding"),
        ([[0, 1, 0, 1], [1, 1, 1, 1]], "left padding"),
        ([[0, 2, 1, 1], [1, 1, 1, 1]], "0/1"),
    ):
        with pytest.raises(ValueError, match=msg):
            model.generate(cond, cond_mask=torch.tensor(mask), top_k=1)
        with pytest.raises(ValueError, match=msg):
            fa.logits(model, cond, torch.zeros(2, 3, 4, dtype=torch.long), cond_mask=torch.tensor(mask))
    model.generate(cond, cond_mask=torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]), top_k=1)


def test_fixed_gate_outside_the_unit_interval_is_refused():
    for g in (float("nan"), 7.0, -0.1, True):
        m = tiny.llamagen(grid=4)
        with pytest.raises(ValueError, match="fixed_gate"):
            fa.patch(m, tiny.llamagen_recipe(grid=4), fixed_gate=g)
        assert getattr(m, "flashar", None) is None
