"""Decoding plumbing that speed depends on (behaviour only; nothing here is timed):
caches are allocated once per generate() call, static LlamaGen caches are reused, the
per-layout schedule is computed once, and steps pass masks that are views of one row."""

from __future__ import annotations

import pytest
import torch

import flashar_adapt as fa
from flashar_adapt import decoding
from tests import tiny
from tests.numerics import assert_same_math, layer_width


def _llamagen():
    model, cond, _ = tiny.patched_family("llamagen-c2i")
    return model, cond


def _hf():
    model, cond, _ = tiny.patched_family("llama")
    return model, cond


def _fused_recorder(model):
    """(list, wrapper for ``model.flashar.fuse``): the wrapper appends every step's fused logits."""
    steps = []
    orig_fuse = model.flashar.fuse

    def record(*a, **k):
        out = orig_fuse(*a, **k)
        steps.append(out.fused.clone())
        return out

    return steps, record


class _Spy:
    def __init__(self, runner, names):
        self.runner, self.calls, self.saved = runner, {n: [] for n in names}, {}
        for n in names:
            orig = getattr(runner, n)
            self.saved[n] = orig

            def wrap(*a, _n=n, _orig=orig, **k):
                out = _orig(*a, **k)
                self.calls[_n].append((a, k, out))
                return out

            setattr(runner, n, wrap)

    def close(self):
        for n in self.saved:
            delattr(self.runner, n)


@pytest.mark.parametrize("make", [_llamagen, _hf])
@pytest.mark.parametrize("mode,cfg", [("two_way", 1.0), ("raster", 1.0), ("two_way", 2.0)])
def test_caches_allocated_once_per_call(make, mode, cfg):
    model, cond = make()
    runner = model.flashar.ctx.runner
    if cfg != 1.0 and not decoding.has_uncond(model.flashar.ctx):
        pytest.skip("no unconditional prefix")
    spy = _Spy(runner, ["new_cache", "new_branch_cache", "run", "run_with_branch"])
    try:
        model.generate(cond, mode=mode, top_k=1, cfg_scale=cfg)
    finally:
        spy.close()
    assert len(spy.calls["new_cache"]) == 1
    assert len(spy.calls["new_branch_cache"]) == (1 if mode == "two_way" else 0)
    H, W = model.flashar.ctx.recipe.image.grid
    # a backbone forward is either the runner's fused backbone+branch pass or a plain run; a
    # fused pass may itself run the stack through ``run`` (transformers: once, the same forward)
    fused = [c for c in spy.calls["run_with_branch"] if c[2] is not None]
    if make is _llamagen:  # its own layer loop: never the plain run as well
        assert not (fused and spy.calls["run"])
    else:
        assert not fused or len(spy.calls["run"]) == len(fused)
    runs = fused or spy.calls["run"]
    assert len(runs) == (H + W - 1 if mode == "two_way" else H * W)
    # every step after the prefill passes a mask that is a view of the decoder's one key row
    # per sequence (no per-step mask building), except raster steps that feed an end-of-line
    steps = [a for a, _, _ in runs[1:]]
    one_row = [a[5] for a in steps if a[5].shape[1] == 1]
    assert len(one_row) >= len(steps) - H
    assert len({m.untyped_storage().data_ptr() for m in one_row}) == 1
    for a in steps:  # key_slots: a prefix of one preallocated cache order
        assert a[4].untyped_storage().data_ptr() == steps[0][4].untyped_storage().data_ptr()
        assert a[5].shape[-1] == a[4].shape[0]


def test_llamagen_static_caches_are_reused_and_fill_in_order():
    model, cond = _llamagen()
    model.generate(cond, top_k=1)
    # (the branch copy runs fused with its backbone block, on a joint cache made per call)
    layers = list(model.flashar.ctx.layers)
    first = [layer.attention.kv_cache for layer in layers]
    assert all(c is not None for c in first)
    ptrs = [c.k_cache.data_ptr() for c in first]
    model.generate(cond[:1], top_k=1)  # smaller batch: the same buffers
    model.generate(cond, mode="raster", top_k=1)
    assert [layer.attention.kv_cache.k_cache.data_ptr() for layer in layers] == ptrs
    model.generate(torch.tensor([1, 2, 3]), top_k=1)  # bigger batch: new buffers
    assert [layer.attention.kv_cache.k_cache.data_ptr() for layer in layers] != ptrs


def test_schedule_is_computed_once_per_layout():
    model, cond = _llamagen()
    first = fa.prefill(model, cond, top_k=1)
    sched = first.schedule
    again = fa.prefill(model, cond, top_k=1)
    assert again.schedule is sched  # the same object: built once per layout, mode and device
    assert decoding.schedule(first.layout, "two_way", cond.device) is sched
    H, W = model.flashar.ctx.recipe.image.grid
    # cache order: the prefix, then the anti-diagonals one after another, every slot once
    L = sched.order.shape[0]
    assert sorted(sched.order.tolist()) == list(range(L))
    assert len(sched.steps) == H + W - 1


def test_two_way_equals_teacher_forcing_after_cache_reuse():
    """Reused (stale) cache entries are never read: greedy decoding stays exact."""
    model, cond = _llamagen()
    model.generate(torch.tensor([1, 2, 3, 4]), top_k=0, generator=torch.Generator().manual_seed(0))
    for mode in ("two_way", "raster"):
        codes = model.generate(cond, mode=mode, top_k=1)
        assert torch.equal(fa.logits(model, cond, codes, mode=mode).argmax(-1), codes)


@pytest.mark.numerics
@pytest.mark.parametrize("n_kv_head,cfg,batch", [(None, 1.0, 1), (None, 3.0, 3), (2, 3.0, 2)])
def test_llamagen_fused_branch_block_equals_generic_path(monkeypatch, n_kv_head, cfg, batch):
    """The LlamaGen fast path (backbone block + branch copy as one batched block) must give
    the same logits at every step as the generic hook path, and be the path actually taken."""
    from flashar_adapt.integrations import llamagen

    m = tiny.llamagen(grid=4, n_kv_head=n_kv_head)
    fa.patch(m, tiny.llamagen_recipe(grid=4))
    tiny.randomize(m.flashar, seed=5)
    cond = torch.arange(batch) % 10
    steps, record = _fused_recorder(m)
    monkeypatch.setattr(m.flashar, "fuse", record)
    calls = []  # the decoding steps that ran the fused backbone+branch block
    fused_call = llamagen.FusedBranchBlock.__call__
    monkeypatch.setattr(llamagen.FusedBranchBlock, "__call__", lambda self, *a: calls.append(1) or fused_call(self, *a))
    fast = m.generate(cond, cfg_scale=cfg, generator=torch.Generator().manual_seed(1))
    fast_steps, steps[:] = list(steps), []
    assert len(calls) == 7  # prefill + one per fed anti-diagonal on a 4x4 grid
    # the runner's own loop without the fused block (blocks it may not fuse), and the core's
    # generic path (capture hook + branch_call), which a runner without fused_branch gets
    other = {}
    for name, owner, attr, value in (
        ("unfused", llamagen.FusedBranchBlock, "eligible", staticmethod(lambda *a: False)),
        ("generic", llamagen.LlamaGenRunner, "fused_branch", False),
    ):
        with monkeypatch.context() as mp:
            mp.setattr(owner, attr, value)
            codes = m.generate(cond, cfg_scale=cfg, generator=torch.Generator().manual_seed(1))
        other[name], steps[:] = (codes, list(steps)), []
    assert len(calls) == 7  # neither took the fused block
    # the same arithmetic in the same order: equal bit for bit
    assert torch.equal(other["unfused"][0], other["generic"][0])
    assert all(torch.equal(a, b) for a, b in zip(other["unfused"][1], other["generic"][1], strict=True))
    slow, slow_steps = other["generic"]
    # Sampled codes match exactly: the two paths' probabilities differ by float32 round-off, so
    # a draw flips only if it lands within ~1e-6 of a bin edge (odds ~1e-4 over these 48 draws).
    assert torch.equal(fast, slow)
    for a, b in zip(fast_steps, slow_steps, strict=True):  # the batched block sums in another order
        assert_same_math(a, b, layers=5, width=96)


def test_llamagen_fused_branch_block_is_skipped_for_wrapped_or_training_layers():
    from flashar_adapt.integrations import llamagen

    m = tiny.llamagen(grid=4)
    fa.patch(m, tiny.llamagen_recipe(grid=4))
    ctx = fa.context(m)
    a, branch = ctx.layers[ctx.branch_index], ctx.flashar.branch_layers
    with torch.inference_mode():
        assert llamagen.FusedBranchBlock.eligible(a, branch)
        assert not llamagen.FusedBranchBlock.eligible(a, list(branch) * 2)  # branch_depth 2
        branch[0].train()
        assert not llamagen.FusedBranchBlock.eligible(a, branch)
        branch[0].eval()
        h = branch[0].feed_forward.w1.register_forward_hook(lambda *x: None)  # e.g. an adapter's hook
        assert not llamagen.FusedBranchBlock.eligible(a, branch)
        h.remove()
    assert not llamagen.FusedBranchBlock.eligible(a, branch)  # autograd on: training uses the generic path


def test_llamagen_fused_branch_block_is_kept_and_reloads_changed_weights():
    """The fused block's buffers live from one call to the next (a CUDA graph replays on
    them), and weights changed in between, even through ``.data`` (no version bump, as
    peft's merge does it), are the ones the next call uses."""
    model, cond = _llamagen()
    model.generate(cond, top_k=1)
    runner = model.flashar.ctx.runner
    pair = runner.pair
    ctx = model.flashar.ctx
    with torch.no_grad():
        model.flashar.branch_layers[0].attention.wqkv.weight.data.mul_(1.7)
        ctx.layers[ctx.branch_index].feed_forward.w2.weight.data.mul_(-0.6)
    for mode in ("two_way", "raster"):
        codes = model.generate(cond, mode=mode, top_k=1)
        assert torch.equal(fa.logits(model, cond, codes, mode=mode).argmax(-1), codes)
    assert runner.pair is pair
    model.generate(cond[:1], top_k=1)  # another batch: new buffers
    assert runner.pair is not pair


# ---------------------------------------------------------------- transformers runner


@pytest.mark.parametrize("name", ["llama", "emu3", "janus", "chameleon"])
@pytest.mark.parametrize("mode,cfg", [("two_way", 1.0), ("raster", 1.0), ("two_way", 3.0)])
def test_transformers_caches_are_static_and_filled_in_feeding_order(name, mode, cfg):
    """Each layer's K/V buffers are allocated once (at the prefill), never grow or move, and
    every step attends exactly the entries filled so far; the mask is a view of one row."""
    model, cond, mask = tiny.patched_family(name)
    if cfg != 1.0 and not decoding.has_uncond(model.flashar.ctx):
        pytest.skip("no unconditional prefix")
    runner = model.flashar.ctx.runner
    spy = _Spy(runner, ["new_cache", "new_branch_cache"])
    seen = []  # per step: (cache, buffer addresses, filled length) after the step
    orig_run = runner.run

    def run(ctx, embeds, positions, slots, key_slots, allowed, cache):
        out = orig_run(ctx, embeds, positions, slots, key_slots, allowed, cache)
        seen.append(
            (
                cache,
                [(lay.keys.data_ptr(), lay.values.data_ptr()) for lay in cache.layers],
                [lay.length for lay in cache.layers],
                key_slots.shape[0],
            )
        )
        return out

    masks = []
    hook = model.flashar.ctx.decoder.register_forward_pre_hook(
        lambda mod, args, kwargs: masks.append(kwargs["attention_mask"]), with_kwargs=True
    )
    runner.run = run
    try:
        codes = model.generate(cond, mode=mode, cfg_scale=cfg, top_k=1, cond_mask=mask)
    finally:
        del runner.run
        hook.remove()
        spy.close()
    H = model.flashar.ctx.recipe.image.grid[0]
    # steps after the prefill: views of one additive key row (raster end-of-line steps excepted)
    ptrs = [m.untyped_storage().data_ptr() for m in masks[1:]]
    assert max(ptrs.count(p) for p in ptrs) >= len(ptrs) - H
    caches = [c[2] for c in spy.calls["new_cache"] + spy.calls["new_branch_cache"]]
    assert caches and all(getattr(c, "feed_order", False) for c in caches)
    backbone = caches[0]
    assert {id(s[0]) for s in seen} == {id(backbone)}
    assert all(s[1] == seen[0][1] for s in seen)  # no reallocation, no torch.cat growth
    assert all(s[2] == [s[3]] * len(backbone.layers) for s in seen)  # filled = keys attended
    L = model.flashar.ctx.layout(seen[0][3], model.flashar.ctx.recipe.image.grid).seq_len
    assert all(lay.keys.shape[2] == backbone.max_len >= L - 1 for lay in backbone.layers)
    if mode == "two_way":  # the branch's own cache follows the backbone's, entry for entry, at
        # the branch copies' slots (their originals' numbering); the other slots are never written
        lengths = [lay.length for lay in caches[1].layers]
        n_branch = len(model.flashar.branch_layers)
        assert sorted(lengths, reverse=True) == [seen[-1][3]] * n_branch + [0] * (len(lengths) - n_branch)
    # and decoding is still exact
    lg = fa.logits(model, cond, codes, mode=mode, cond_mask=mask, cfg_scale=cfg)
    assert torch.equal(lg.argmax(-1), codes)


def test_transformers_keeps_dynamic_cache_for_windowed_attention(monkeypatch):
    """Sliding-window / hybrid configs keep transformers' DynamicCache (exact, just slower)."""
    from transformers import DynamicCache, LlamaConfig, MistralConfig

    from flashar_adapt.integrations import hf

    assert hf.full_attention_only(LlamaConfig())
    assert not hf.full_attention_only(MistralConfig(sliding_window=8))
    model, cond, mask = tiny.patched_family("llama")
    monkeypatch.setattr(hf, "full_attention_only", lambda config: False)
    runner = model.flashar.ctx.runner
    spy = _Spy(runner, ["new_cache", "new_branch_cache"])
    try:
        codes = model.generate(cond, top_k=1, cond_mask=mask)
    finally:
        spy.close()
    assert all(isinstance(c[2], DynamicCache) for c in spy.calls["new_cache"] + spy.calls["new_branch_cache"])
    assert torch.equal(fa.logits(model, cond, codes, cond_mask=mask).argmax(-1), codes)


def test_transformers_mask_row_follows_a_changed_key_row():
    """The additive row is converted incrementally only while the bool rows come from the
    decoder's one key row; a row from another tensor (e.g. a peer decoder) is converted whole."""
    from flashar_adapt.integrations import hf

    cache = hf.FeedOrderCache(1, 6)
    keys = torch.tensor([[[False, True, True, True, True, True]]])
    neg = torch.finfo(torch.float32).min
    assert hf.mask_row(cache, keys[:, :, :3], torch.float32)[0, 0, 0, :3].tolist() == [neg, 0, 0]
    assert hf.mask_row(cache, keys[:, :, :5], torch.float32)[0, 0, 0, :5].tolist() == [neg, 0, 0, 0, 0]
    other = torch.tensor([[[True, True, False, True, True]]])
    assert hf.mask_row(cache, other, torch.float32)[0, 0, 0, :5].tolist() == [0, 0, neg, 0, 0]


# ---------------------------------------------------------------- the transformers fused branch layer


def _decode_static(model, cond, mask, cfg, seed, monkeypatch):
    """compile=True's static path run eagerly (no inductor): (codes, every step's fused logits)."""
    from tests.test_compile import static_path_uncompiled

    steps, record = _fused_recorder(model)
    with monkeypatch.context() as mp, static_path_uncompiled():
        mp.setattr(model.flashar, "fuse", record)
        # the steps run the pair as compiled steps do (eagerly here: the same vmapped call)
        mp.setattr("flashar_adapt.integrations.hf.in_graph", lambda: True)
        codes = model.generate(
            cond, cond_mask=mask, cfg_scale=cfg, top_k=20, generator=torch.Generator().manual_seed(seed), compile=True
        )
    return codes, steps


@pytest.mark.numerics
@pytest.mark.parametrize("family", ["llama", "janus", "chameleon", "glm-image"])
@pytest.mark.parametrize("cfg", [1.0, 2.5])
def test_transformers_fused_branch_layer_equals_the_separate_layers(family, cfg, monkeypatch):
    """The decoder layer at the branch index and its copy run as one vmapped call in compiled
    decoding: every step's logits equal those of the two separate calls up to float32 summation
    order, the seeded sampled codes are equal, and the fused call is the path taken (once to
    check it at the prefill, then every step)."""
    from flashar_adapt.integrations import hf_fused

    model, cond, mask = tiny.patched_family(family)
    ctx = fa.context(model)
    ctx.runner.fuse_branch_layer = True  # opt-in (docs/speed.md)
    if cfg != 1.0 and not decoding.has_uncond(ctx):
        pytest.skip("no unconditional prefix")
    calls = []
    fused_call = hf_fused.PairedLayer.__call__
    monkeypatch.setattr(hf_fused.PairedLayer, "__call__", lambda s, *a, **k: calls.append(1) or fused_call(s, *a, **k))
    fast, fast_steps = _decode_static(model, cond, mask, cfg, 3, monkeypatch)
    H, W = ctx.recipe.image.grid
    # the check at the prefill (which runs the layers apart), then one per fed diagonal (all but the last)
    assert len(calls) == 1 + (H + W - 2)
    assert ctx.runner.pair is not None and hf_fused.is_installed(ctx.layers[ctx.branch_index])
    with monkeypatch.context() as mp:
        mp.setattr(ctx.runner, "fuse_branch_layer", False)
        slow, slow_steps = _decode_static(model, cond, mask, cfg, 3, monkeypatch)
    assert len(calls) == 1 + (H + W - 2)  # not taken
    assert torch.equal(fast, slow)  # draws flip only within ~1e-6 of a bin edge
    assert len(fast_steps) == len(slow_steps) == H + W - 1
    for a, b in zip(fast_steps, slow_steps, strict=True):
        assert_same_math(a, b, layers=len(ctx.layers), width=layer_width(ctx))


def test_transformers_fused_branch_layer_is_kept_reloads_weights_and_leaves_with_unpatch(monkeypatch):
    """The pair and its stacked caches live from one compiled run to the next; weights changed
    in between (through ``.data``, as peft's merge does) are the ones used; a deep copy fuses
    its own layers; ``unpatch`` removes the layer's forward it installed, and nothing else."""
    from flashar_adapt.integrations import hf_fused

    model, cond, mask = tiny.patched_family("llama")
    ctx = fa.context(model)
    ctx.runner.fuse_branch_layer = True
    layer = ctx.layers[ctx.branch_index]
    assert "forward" not in layer.__dict__
    adopted = []
    adopt = hf_fused.PairedLayer.adopt
    monkeypatch.setattr(hf_fused.PairedLayer, "adopt", lambda s, *a: adopted.append(1) or adopt(s, *a))
    _decode_static(model, cond, mask, 1.0, 0, monkeypatch)
    pair = ctx.runner.pair
    stacked = pair.keys
    with torch.no_grad():
        model.flashar.branch_layers[0].mlp.down_proj.weight.data.mul_(-1.3)
    codes, steps = _decode_static(model, cond, mask, 1.0, 0, monkeypatch)
    assert ctx.runner.pair is pair and pair.keys is stacked and len(adopted) == 1  # no new buffers, no second check
    with monkeypatch.context() as mp:
        mp.setattr(ctx.runner, "fuse_branch_layer", False)
        ref, ref_steps = _decode_static(model, cond, mask, 1.0, 0, monkeypatch)
    assert torch.equal(codes, ref)
    for a, b in zip(steps, ref_steps, strict=True):
        assert_same_math(a, b, layers=len(ctx.layers), width=layer_width(ctx))
    _decode_static(model, cond, mask, 1.0, 0, monkeypatch)
    import copy

    twin = copy.deepcopy(model)
    tctx = fa.context(twin)
    assert hf_fused.is_installed(tctx.layers[tctx.branch_index])  # bound to the copy's own layer
    assert torch.equal(_decode_static(twin, cond, mask, 1.0, 0, monkeypatch)[0], codes)
    assert tctx.runner.pair.layer is tctx.layers[tctx.branch_index]
    fa.unpatch(model)
    assert "forward" not in layer.__dict__
    fa.unpatch(twin)
    assert "forward" not in tctx.layers[tctx.branch_index].__dict__


def test_transformers_fused_branch_layer_refusals_say_why(monkeypatch, caplog):
    """Layers that cannot run as one run separately, with one line saying why: a branch of
    two layers, a layer in training mode, a hook, a forward replaced by someone else, a
    branch layer with other modules (an adapter), and a fused call that fails or differs
    from the separate calls at its check (never retried)."""
    import logging

    from flashar_adapt.integrations import hf_fused

    model, cond, mask = tiny.patched_family("llama")
    ctx = fa.context(model)
    ctx.runner.fuse_branch_layer = True
    b = ctx.branch_index
    layer, branch = ctx.layers[b], list(ctx.flashar.branch_layers)
    slot = ctx.runner.cache_slots[b]
    assert hf_fused.why_not(layer, branch, slot) is None
    assert "2 layers deep" in hf_fused.why_not(layer, branch * 2, slot)
    assert "no cache slot" in hf_fused.why_not(layer, branch, None)
    branch[0].train()
    assert "training" in hf_fused.why_not(layer, branch, slot)
    branch[0].eval()
    h = layer.mlp.register_forward_hook(lambda *a: None)
    assert "hooks on mlp" in hf_fused.why_not(layer, branch, slot)
    h.remove()
    layer.forward = lambda *a, **k: None  # e.g. accelerate's offloading
    assert "replaced" in hf_fused.why_not(layer, branch, slot)
    del layer.forward
    old = branch[0].mlp.act_fn
    branch[0].mlp.act_fn = torch.nn.GELU()
    assert "different modules" in hf_fused.why_not(layer, branch, slot)
    branch[0].mlp.act_fn = old
    with monkeypatch.context() as mp:
        mp.setattr(hf_fused, "functional_call", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no batching")))
        with caplog.at_level(logging.INFO, logger="flashar_adapt.compile"):
            codes, _ = _decode_static(model, cond, mask, 1.0, 0, monkeypatch)
            _decode_static(model, cond, mask, 1.0, 0, monkeypatch)  # never retried, said once
    said = [r.getMessage() for r in caplog.records if "not fused" in r.getMessage()]
    assert said == [
        f"flashar-adapt: the vertical branch runs beside decoder layer {b}, not fused: "
        "the fused call fails (RuntimeError: no batching)"
    ]
    assert ctx.runner.pair is None and not hf_fused.is_installed(layer)
    assert torch.equal(
        codes, model.generate(cond, cond_mask=mask, top_k=20, generator=torch.Generator().manual_seed(0))
    )


def test_transformers_fused_branch_layer_that_differs_is_refused(monkeypatch, caplog):
    import logging

    from flashar_adapt.integrations import hf_fused

    model, cond, mask = tiny.patched_family("llama")
    ctx = fa.context(model)
    ctx.runner.fuse_branch_layer = True
    call = hf_fused.PairedLayer.__call__

    def off(self, args, kwargs, keys=None, values=None):  # a fused call that is another function
        out = call(self, args, kwargs, keys, values)
        hf_fused.ACTIVE.branch_out = hf_fused.ACTIVE.branch_out * 1.5
        return out

    monkeypatch.setattr(hf_fused.PairedLayer, "__call__", off)
    with caplog.at_level(logging.INFO, logger="flashar_adapt.compile"):
        codes, steps = _decode_static(model, cond, mask, 1.0, 0, monkeypatch)
    assert any("differs from the two separate calls" in r.getMessage() for r in caplog.records)
    assert ctx.runner.pair is None
    monkeypatch.setattr(hf_fused.PairedLayer, "__call__", call)
    with monkeypatch.context() as mp:
        mp.setattr(ctx.runner, "fuse_branch_layer", False)
        ref, ref_steps = _decode_static(model, cond, mask, 1.0, 0, monkeypatch)
    assert torch.equal(codes, ref)
    assert all(torch.equal(a, b) for a, b in zip(steps, ref_steps, strict=True))  # the same separate calls


def test_transformers_fused_branch_layer_is_used_only_by_runs_it_was_loaded_for(monkeypatch):
    """Switched on in the middle of a run (after its prefill), the pair waits for the next
    run, which checks the layers and loads their weights first: weights changed in between
    are never run stale."""
    from flashar_adapt.integrations import hf_fused
    from tests.test_compile import static_path_uncompiled

    model, cond, mask = tiny.patched_family("llama")
    ctx = fa.context(model)
    ctx.runner.fuse_branch_layer = True
    _decode_static(model, cond, mask, 1.0, 0, monkeypatch)  # a pair, kept
    ctx.runner.fuse_branch_layer = False
    calls = []
    fused_call = hf_fused.PairedLayer.__call__
    monkeypatch.setattr(hf_fused.PairedLayer, "__call__", lambda s, *a, **k: calls.append(1) or fused_call(s, *a, **k))
    with monkeypatch.context() as mp, static_path_uncompiled():
        mp.setattr("flashar_adapt.integrations.hf.in_graph", lambda: True)
        state = fa.prefill(model, cond, cond_mask=mask, top_k=1, compile=True)
        with torch.no_grad():
            model.flashar.branch_layers[0].mlp.down_proj.weight.data.mul_(-3.0)
        ctx.runner.fuse_branch_layer = True
        while not state.done:
            fa.step(state)
    assert calls == []  # the separate calls, with the weights as they are now
    assert torch.equal(state.image(), model.generate(cond, cond_mask=mask, top_k=1))


def test_transformers_fused_call_that_writes_no_keys_is_refused(monkeypatch, caplog):
    """The check at the prefill runs the fused call on empty buffers: a call that attends
    keys it did not write differs from the separate calls, and the pair is dropped."""
    import logging

    from flashar_adapt.integrations import hf_fused

    model, cond, mask = tiny.patched_family("llama")
    ctx = fa.context(model)
    ctx.runner.fuse_branch_layer = True
    monkeypatch.setattr(hf_fused.SlotCache, "update", lambda self, k, v, *a, **kw: (self.keys, self.values))
    with caplog.at_level(logging.INFO, logger="flashar_adapt.compile"):
        _decode_static(model, cond, mask, 1.0, 0, monkeypatch)
    assert any("differs from the two separate calls" in r.getMessage() for r in caplog.records)
    assert ctx.runner.pair is None
