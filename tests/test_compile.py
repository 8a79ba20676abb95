"""generate(compile=True): the static-shape step (whole padded caches under a mask, steps
padded to bucket sizes) computes what eager decoding computes, compiled or not, and compiles
a bounded number of graphs."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch._dynamo.utils import counters

import flashar_adapt as fa
from flashar_adapt import decoding
from flashar_adapt.errors import InputError
from flashar_adapt.grid import Layout
from tests import tiny
from tests.numerics import assert_same_math

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
_HF = {}


@contextmanager
def static_path_uncompiled():
    """Run compile=True's static step eagerly: the padding, trash entries and whole-cache
    masks under test without paying inductor's compile time."""
    old = decoding.compiled.compiled_step
    decoding.compiled.compiled_step = lambda device_type, size: decoding.sampled_step
    try:
        yield
    finally:
        decoding.compiled.compiled_step = old


def _cell_logits(model, cond, mode, mask, **kw):
    """Decode greedily with compile=True through the step API; return the codes and every
    cell's logits as the compiled steps computed them [B, H*W, K]."""
    state = fa.prefill(model, cond, mode=mode, cond_mask=mask, top_k=1, compile=True, **kw)
    rows = {}
    while not state.done:
        cells = state.cells()
        fa.step(state)
        rows[tuple(cells.tolist())] = state.logits
    out = torch.empty(state.batch, state.codes.shape[1], state.logits.shape[-1])
    for cells, lg in rows.items():
        out[:, list(cells)] = lg
    return state.image(), out


# ---------------------------------------------------------------- properties (uncompiled static path)

SIZES = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128]


def test_bucket_is_the_smallest_size_that_holds_n():
    for n in range(1, 129):
        b = decoding.bucket(n)
        assert b in SIZES and b >= n and all(s < n for s in SIZES if s < b), n
        assert b - n < max(1, b / 3), n  # at most a third of a padded step is padding


@pytest.mark.numerics
@SETTINGS
@given(
    H=st.integers(1, 6),
    W=st.integers(1, 6),
    prefix=st.integers(1, 6),
    batch=st.integers(1, 3),
    eol=st.booleans(),
    meta=st.booleans(),
    cfg=st.sampled_from([1.0, 2.5]),
    mode=st.sampled_from(["two_way", "raster"]),
    seed=st.integers(0, 2**16),
)
def test_property_static_path_equals_teacher_forcing(H, W, prefix, batch, eol, meta, cfg, mode, seed):
    """Any grid, left-padded prompt, end-of-line tokens, meta tokens, batch and CFG: the
    padded static step decodes exactly what teacher forcing predicts."""
    if "m" not in _HF:
        _HF["m"] = tiny.hf_llama(max_pos=512)
    model = _HF["m"]
    fa.patch(model, tiny.hf_llama_recipe(eol=99 if eol else None, before=[97, 98] if meta else [], grid=(H, W)))
    try:
        tiny.randomize(model.flashar, seed)
        g = torch.Generator().manual_seed(seed)
        cond = torch.randint(1, 90, (batch, prefix), generator=g)
        lengths = torch.randint(1, prefix + 1, (batch,), generator=g)
        mask = torch.arange(prefix)[None] >= (prefix - lengths)[:, None]
        cond = cond.masked_fill(~mask, 0)
        with static_path_uncompiled():
            codes, got = _cell_logits(model, cond, mode, mask, cfg_scale=cfg)
        ref = fa.logits(model, cond, codes, mode=mode, cfg_scale=cfg, cond_mask=mask)
        assert torch.equal(ref.argmax(-1), codes)
        assert torch.equal(model.generate(cond, mode=mode, top_k=1, cfg_scale=cfg, cond_mask=mask), codes)
        if cfg == 1.0:  # guided logits amplify each side's round-off by the scale: compare the model's own
            assert_same_math(got, ref.flatten(1, 2), layers=5, width=32)
    finally:
        fa.unpatch(model)


@pytest.mark.numerics
@SETTINGS
@given(
    grid=st.integers(1, 5),
    batch=st.integers(1, 4),
    cfg=st.sampled_from([1.0, 4.0]),
    mode=st.sampled_from(["two_way", "raster"]),
    depth=st.integers(1, 2),
    seed=st.integers(0, 2**16),
)
def test_property_static_path_llamagen(grid, batch, cfg, mode, depth, seed):
    """LlamaGen: the fused branch block (depth 1) and the generic branch (depth 2) on
    static caches, after an eager run left its (shorter) caches on the layers."""
    model = tiny.llamagen(grid=grid)
    fa.patch(model, tiny.llamagen_recipe(grid=grid), branch_depth=depth, branch_layer=-3)
    tiny.randomize(model.flashar, seed)
    cond = torch.randint(0, 10, (batch,), generator=torch.Generator().manual_seed(seed))
    eager = model.generate(cond, mode=mode, top_k=1, cfg_scale=cfg)
    with static_path_uncompiled():
        codes = model.generate(cond, mode=mode, top_k=1, cfg_scale=cfg, compile=True)
    assert torch.equal(codes, eager)
    assert torch.equal(fa.logits(model, cond, codes, mode=mode, cfg_scale=cfg).argmax(-1), codes)


@pytest.mark.parametrize("mode", ["two_way", "raster"])
@pytest.mark.parametrize("family", sorted(tiny.FAMILY_CASES))
def test_static_path_equals_eager_for_every_family(family, mode):
    """Every family of the suite (LlamaGen c2i/t2i, Llama, Emu3, Janus, Chameleon: masks
    through the decoder or at its layers, meta tokens, end-of-line tokens) decodes the same
    codes on static caches, with CFG."""
    model, cond, mask = tiny.patched_family(family)
    kw = dict(mode=mode, cond_mask=mask, top_k=1, cfg_scale=2.0)
    eager = model.generate(cond, **kw)
    with static_path_uncompiled():
        assert torch.equal(model.generate(cond, compile=True, **kw), eager)


@pytest.mark.parametrize("mode", ["two_way", "raster"])
@pytest.mark.parametrize("family", sorted(tiny.FAMILY_CASES))
def test_static_path_samples_the_eager_codes_for_every_family(family, mode):
    """Seeded sampling (temperature, top-k, top-p, CFG, one generator per image) through the
    static step, draw included (the function compile=True compiles, here run eagerly):
    the padded rows gather the right uniforms, so the codes are the eager ones."""
    model, cond, mask = tiny.patched_family(family)
    B = cond.shape[0]

    def kw():
        gens = [torch.Generator().manual_seed(100 + i) for i in range(B)]
        return dict(mode=mode, cond_mask=mask, cfg_scale=2.0, temperature=1.3, top_k=20, top_p=0.9, generator=gens)

    eager = model.generate(cond, **kw())
    with static_path_uncompiled():
        assert torch.equal(model.generate(cond, compile=True, **kw()), eager)


def test_static_padding_entries_are_never_seen():
    """Every padded token writes an entry past the sequence, which the key rows mask, and no
    two steps write the same real entry."""
    for grid, prefix in (((5, 7), 3), ((8, 8), 1), ((1, 6), 2)):
        model = tiny.hf_llama()
        fa.patch(model, tiny.hf_llama_recipe(eol=99, grid=grid))
        layout = model.flashar.ctx.layout(prefix, grid)
        for mode in ("two_way", "raster"):
            padded = decoding.padded_schedule(layout, mode, torch.device("cpu"))
            steps, pad = padded.steps, padded.pad
            written = []
            for st_ in steps[1:]:
                real = st_.entries[st_.entries < layout.seq_len]
                trash = st_.entries[st_.entries >= layout.seq_len]
                assert trash.numel() <= pad and bool((trash < layout.seq_len + pad).all())
                assert bool((real < st_.lim[: real.numel()]).all())
                written += real.tolist()
            assert written == list(range(prefix, prefix + len(written)))  # feeding order, each entry once


@SETTINGS
@given(
    P=st.integers(1, 4),
    H=st.integers(1, 7),
    W=st.integers(1, 7),
    eol=st.booleans(),
    eol_last=st.booleans(),
    mode=st.sampled_from(["two_way", "raster"]),
)
def test_padded_steps_are_the_eager_steps_padded(P, H, W, eol, eol_last, mode):
    """One Step type for both paths: a padded step's real part is the eager step, every field."""
    layout = Layout(P, H, W, eol, eol_last)
    cpu = torch.device("cpu")
    eager, padded = decoding.schedule(layout, mode, cpu), decoding.padded_schedule(layout, mode, cpu)
    assert len(eager.steps) == len(padded.steps) == (H + W - 1 if mode == "two_way" else H * W)
    assert padded.order is eager.order and padded.steps[0] is eager.steps[0]

    def ids(x, n):
        return list(range(x.start, x.stop)) if isinstance(x, slice) else x[:n].tolist()

    for e, p in zip(eager.steps[1:], padded.steps[1:]):
        T = e.entries.stop - e.entries.start
        assert p.entries.numel() == p.cells.numel() == p.h_idx.numel() == decoding.bucket(max(T, e.n))
        assert ids(p.entries, T) == ids(e.entries, T) and ids(p.cells, T) == ids(e.cells, T)
        assert (p.eol is None) == (not eol)
        assert p.eol is None or p.eol[:T].tolist() == ([False] * T if e.eol is None else e.eol.tolist())
        assert p.lim[:T].tolist() == e.lim.tolist() and p.causal == e.causal
        for f in ("h_idx", "v_idx", "has_h", "has_v"):
            assert ids(getattr(p, f), e.n) == ids(getattr(e, f), e.n), f
        assert p.out is e.out and p.n == e.n and e.out_rows is None
        # each row's uniform: the cell it draws, then cell 0 for the padding rows (ignored)
        assert p.out_rows.tolist() == ids(e.out, e.n) + [0] * (p.h_idx.numel() - e.n)


def test_static_caches_live_between_calls_and_stale_entries_stay_unseen():
    """The transformers runner keeps its static caches from one call to the next (a CUDA
    graph replays on their buffers); what an earlier run left in them is never attended."""
    model, cond, mask = tiny.patched_family("llama")
    runner = model.flashar.ctx.runner
    with static_path_uncompiled():
        first = model.generate(cond, cond_mask=mask, top_k=1, compile=True)
        held = {k: v[1] for k, v in runner.static_held.items()}
        other = model.generate(cond.flip(0), cond_mask=mask.flip(0), top_k=1, compile=True)  # fills them differently
        again = model.generate(cond, cond_mask=mask, top_k=1, compile=True)
    assert set(held) == {"backbone", "branch"}
    assert all(runner.static_held[k][1] is c for k, c in held.items())
    assert torch.equal(first, again) and torch.equal(other, first.flip(0))


def test_compiled_call_reruns_a_step_to_its_values_and_refuses_misuse():
    """The seam benchmarks time graphs alone with: step t of a compiled state as a call of no
    arguments. On a decoded state it feeds what step t fed, so it gives step t's logits and
    codes again, bit for bit; step 0 (eager), a step past the end, an eager state and a
    stale one are refused."""
    model, cond, _ = _llamagen()
    with static_path_uncompiled():
        state = fa.prefill(model, cond, cfg_scale=2.0, compile=True, generator=torch.Generator().manual_seed(5))
        seen = {}
        while not state.done:
            t = state.t
            fa.step(state)
            seen[t] = (state.logits, state.codes[:, state.cells(t)].clone())
        with torch.inference_mode():
            for t in range(1, state.num_steps):
                lg, tok = state.compiled_call(t)()
                n = seen[t][0].shape[1]
                assert torch.equal(lg[:, :n], seen[t][0]) and torch.equal(tok[:, :n], seen[t][1]), t
        for t in (0, state.num_steps):
            with pytest.raises(IndexError):
                state.compiled_call(t)
        eager = fa.prefill(model, cond, top_k=1)
        with pytest.raises(InputError, match="compile=True"):
            eager.compiled_call(1)
        with pytest.raises(RuntimeError, match="stale"):
            state.compiled_call(1)  # the eager prefill reused its caches


def test_step_scales_are_made_once_per_schedule_and_device():
    """Per-step guidance scales as tensors (a compiled step would specialise on a float),
    built once per set of values: a raster run has hundreds of steps."""
    lin = fa.Sampling(cfg_scale=3.0, cfg_schedule="linear")
    scales = decoding.compiled.step_scales(lin, 5, "cpu")
    assert [float(x) for x in scales] == [lin.scale_at(t, 5) for t in range(5)] == [1.0, 1.5, 2.0, 2.5, 3.0]
    assert decoding.compiled.step_scales(lin, 5, torch.device("cpu")) is scales
    const = decoding.compiled.step_scales(fa.Sampling(cfg_scale=3.0), 5, "cpu")
    assert const is not scales and [float(x) for x in const] == [3.0] * 5


# ---------------------------------------------------------------- compiled (inductor)


def _llamagen():
    model = tiny.llamagen(grid=3, seed=0)
    fa.patch(model, tiny.llamagen_recipe(grid=3))
    tiny.randomize(model.flashar, seed=11)
    return model, torch.tensor([3, 7]), None


def _hf():
    return tiny.patched_family("llama")  # 3x5 grid, end-of-line and meta tokens, a left-padded prompt


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["two_way", "raster"])
@pytest.mark.parametrize("make", [_llamagen, _hf], ids=["llamagen", "transformers"])
def test_compiled_greedy_equals_eager_and_teacher_forcing(make, mode):
    model, cond, mask = make()
    eager = model.generate(cond, mode=mode, top_k=1, cond_mask=mask)
    codes, got = _cell_logits(model, cond, mode, mask)
    assert torch.equal(codes, eager)
    ref = fa.logits(model, cond, codes, mode=mode, cond_mask=mask)
    assert torch.equal(ref.argmax(-1), codes)
    assert_same_math(got, ref.flatten(1, 2), layers=5, width=32)


@pytest.mark.slow
def test_compiled_fused_branch_layer_equals_eager_and_teacher_forcing():
    """The transformers runner's fused branch layer (opt-in) inside compiled steps: greedy
    codes equal eager decoding, every step's logits equal teacher forcing up to float32
    summation order, seeded sampled codes with CFG equal eager ones, and the fused call is
    what the steps ran."""
    from flashar_adapt.integrations import hf_fused

    model, cond, mask = _hf()
    runner = model.flashar.ctx.runner
    runner.fuse_branch_layer = True
    eager = model.generate(cond, top_k=1, cond_mask=mask)
    calls = []  # Python runs the fused call once at the prefill's check, then while dynamo traces each step
    fused_call = hf_fused.PairedLayer.__call__
    hf_fused.PairedLayer.__call__ = lambda s, *a, **k: calls.append(1) or fused_call(s, *a, **k)
    try:
        codes, got = _cell_logits(model, cond, "two_way", mask)
    finally:
        hf_fused.PairedLayer.__call__ = fused_call
    assert len(calls) >= 2 and runner.pair.holds(*_held_caches(runner))
    assert torch.equal(codes, eager)
    ref = fa.logits(model, cond, codes, cond_mask=mask)
    assert_same_math(got, ref.flatten(1, 2), layers=5, width=32)
    B = cond.shape[0]

    def kw():
        gens = [torch.Generator().manual_seed(3 + i) for i in range(B)]
        return dict(cond_mask=mask, cfg_scale=2.0, temperature=1.3, top_k=20, top_p=0.9, generator=gens)

    assert torch.equal(model.generate(cond, compile=True, **kw()), model.generate(cond, **kw()))


def _held_caches(runner):
    return runner.static_held["backbone"][1], runner.static_held["branch"][1]


@pytest.mark.slow
def test_compiled_cfg_and_sampling_equal_eager_with_bounded_graphs():
    """CFG (a linear schedule: the scale changes every step) and seeded sampling give the
    eager codes; the first call of a sampling setting compiles at most one graph per bucket
    size (greedy and sampled steps are graphs of their own: the draw is inside), a second
    call none, whatever its seed."""
    model, cond, _ = _llamagen()
    kw = dict(cfg_scale=3.0, cfg_schedule="linear")
    layout = model.flashar.ctx.layout(1, (3, 3))
    steps = decoding.padded_schedule(layout, "two_way", torch.device("cpu")).steps
    sizes = {s.entries.numel() for s in steps[1:]}
    before = counters["stats"]["unique_graphs"]
    assert torch.equal(model.generate(cond, top_k=1, compile=True, **kw), model.generate(cond, top_k=1, **kw))
    greedy = counters["stats"]["unique_graphs"] - before
    assert 1 <= greedy <= len(sizes)
    for seed in (0, 1, 2):
        a = model.generate(cond, top_k=5, temperature=1.5, generator=torch.Generator().manual_seed(seed), **kw)
        b = model.generate(
            cond, top_k=5, temperature=1.5, generator=torch.Generator().manual_seed(seed), compile=True, **kw
        )
        assert torch.equal(a, b)
        if seed == 0:
            sampled = counters["stats"]["unique_graphs"] - before - greedy
            assert 1 <= sampled <= len(sizes)
    assert counters["stats"]["unique_graphs"] - before == greedy + sampled  # other seeds: nothing recompiled
    model.generate(cond, top_k=1, compile=True, **kw)
    assert counters["stats"]["unique_graphs"] - before == greedy + sampled


@pytest.mark.slow
@pytest.mark.parametrize("make", [_llamagen, _hf], ids=["llamagen", "transformers"])
def test_compiled_sampled_codes_equal_eager_for_every_runner(make):
    """Guidance, temperature, top-k/top-p and the draw run inside the compiled graph, from
    the uniforms drawn at prefill: seeded sampled codes equal the eager ones, for each
    runner (LlamaGen's own, and transformers: Llama, Emu3, Emu3.5, Janus, Chameleon)."""
    model, cond, mask = make()
    B = cond.shape[0]

    def kw():
        gens = [torch.Generator().manual_seed(7 + i) for i in range(B)]
        return dict(cond_mask=mask, cfg_scale=2.0, temperature=1.3, top_k=20, top_p=0.9, generator=gens)

    for _ in range(2):  # the second call runs graphs already built
        assert torch.equal(model.generate(cond, compile=True, **kw()), model.generate(cond, **kw()))


# ---------------------------------------------------------------- refusals


def test_compile_flag_must_be_a_bool_or_auto():
    model, cond, _ = _llamagen()
    for bad in ("yes", "AUTO", 1, None, torch.tensor(1)):
        with pytest.raises(InputError, match='compile must be True, False or "auto"'):
            model.generate(cond, compile=bad)
        with pytest.raises(InputError, match='compile must be True, False or "auto"'):
            fa.prefill(model, cond, compile=bad)


def test_auto_compiles_on_cuda_and_on_a_cpu_up_to_the_measured_rows():
    """compile="auto": the rule derived from benchmarks/results/compile_speed_cpu.md (compiled
    steps faster at 2 rows, slower at 128: compile up to 8 rows on a CPU), graphs on CUDA,
    never where the runner cannot; an explicit bool is kept, anything else left to the check."""
    limit = decoding.AUTO_CPU_MAX_ROWS
    assert limit == 8
    for rows in (1, 2, limit):
        assert decoding.use_compile("auto", "cpu", rows) is True
    for rows in (limit + 1, 64, 128):
        assert decoding.use_compile("auto", "cpu", rows) is False
    assert decoding.use_compile("auto", "cuda", 4096) is True
    assert decoding.use_compile("auto", "mps", 1) is False
    assert decoding.use_compile("auto", "cpu", 1, able=False) is False
    assert decoding.use_compile(True, "cpu", 4096) is True and decoding.use_compile(False, "cuda", 1) is False
    assert decoding.use_compile("yes", "cpu", 1) == "yes"


def test_auto_decides_by_the_rows_a_run_decodes(monkeypatch):
    """CFG doubles the rows: 4 guided images compile, 5 do not; 8 unguided compile. A runner
    without static caches decodes eagerly under "auto" instead of refusing."""
    model, _, _ = _llamagen()
    for batch, cfg, want in ((4, 2.0, True), (5, 2.0, False), (8, 1.0, True), (9, 1.0, False)):
        cond = torch.arange(batch) % 10
        assert fa.prefill(model, cond, cfg_scale=cfg, top_k=1, compile="auto").compiled is want
    monkeypatch.setattr(type(model.flashar.ctx.runner), "static_caches", False)
    state = fa.prefill(model, torch.tensor([1]), top_k=1, compile="auto")
    assert state.compiled is False


def test_compile_refused_for_a_runner_without_static_caches(monkeypatch):
    model, cond, _ = _llamagen()
    monkeypatch.setattr(type(model.flashar.ctx.runner), "static_caches", False)
    with pytest.raises(InputError, match="compile=True needs static caches"):
        model.generate(cond, compile=True)
    assert model.generate(cond, top_k=1).shape == (2, 3, 3)  # eager decoding is unaffected


def test_compile_refused_where_the_mask_needs_per_call_module_state():
    """ImageGPT flattens the 4D mask (it goes in by layer hooks) and applies a built-in causal
    buffer (opened around each forward): refused with one sentence, eager decoding unaffected."""
    from tests.test_unseen_families import family_model, recipe_from_draft

    model = family_model("imagegpt")
    fa.patch(model, recipe_from_draft("imagegpt", model)[0])
    cond = torch.tensor([[0]])
    with pytest.raises(InputError, match="compile=True is not available for ImageGPT"):
        model.generate(cond, top_k=1, compile=True)
    assert model.generate(cond, top_k=1).shape[0] == 1


def test_compile_refused_for_windowed_transformers_attention(monkeypatch):
    from flashar_adapt.integrations import hf

    model, cond, mask = _hf()
    monkeypatch.setattr(hf, "full_attention_only", lambda config: False)
    with pytest.raises(InputError, match="compile=True needs static caches"):
        model.generate(cond, cond_mask=mask, compile=True)
