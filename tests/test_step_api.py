"""The public decoding seam: fa.prefill / fa.step, the Sampling settings, and what the
benchmarks and peers may import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flashar_adapt as fa
from flashar_adapt.exactness import steps_match_teacher
from tests import tiny

ROOT = Path(__file__).resolve().parents[1]


def _llamagen(grid=4, seed=0):
    m = tiny.llamagen(grid=grid, seed=seed)
    fa.patch(m, tiny.llamagen_recipe(grid=grid))
    tiny.randomize(m.flashar, seed=11 + seed)
    return m, torch.tensor([3, 7])


def _hf():
    m = tiny.hf_llama()
    fa.patch(m, tiny.hf_llama_recipe(eol=99, before=[97, 98], grid=(3, 5)))
    tiny.randomize(m.flashar, seed=11)
    return m, torch.tensor([[0, 0, 5, 6, 7], [1, 8, 9, 10, 11]]), torch.tensor([[0, 0, 1, 1, 1], [1] * 5]).bool()


def _drive(model, cond, mode, **kw):
    state = fa.prefill(model, cond, mode=mode, **kw)
    seen = []
    while not state.done:
        cells = state.cells()
        out = fa.step(state)
        assert out.shape == (cond.shape[0], cells.numel())
        assert torch.equal(state.codes[:, cells], out)
        seen += cells.tolist()
    return state, seen


@pytest.mark.parametrize("mode", ["two_way", "raster"])
@pytest.mark.parametrize("make", ["llamagen", "hf"])
def test_prefill_and_step_by_hand_equal_generate(make, mode):
    if make == "llamagen":
        model, cond = _llamagen()
        mask = None
    else:
        model, cond, mask = _hf()
    for kw in (dict(top_k=1), dict(top_k=5, temperature=1.3), dict(top_k=1, cfg_scale=2.5, cfg_schedule="linear")):
        seeded = dict(kw, generator=torch.Generator().manual_seed(4))
        state, seen = _drive(model, cond, mode, cond_mask=mask, **seeded)
        H, W = state.layout.height, state.layout.width
        # every cell is sampled exactly once, in as many steps as the mode promises
        assert sorted(seen) == list(range(H * W))
        assert state.t == (H + W - 1 if mode == "two_way" else H * W)
        ref = model.generate(cond, mode=mode, cond_mask=mask, **dict(kw, generator=torch.Generator().manual_seed(4)))
        assert torch.equal(state.image(), ref)
        sampling = fa.Sampling(**dict(kw, generator=torch.Generator().manual_seed(4)))
        assert torch.equal(model.generate(cond, mode=mode, cond_mask=mask, sampling=sampling), ref)


@pytest.mark.numerics
@pytest.mark.parametrize("mode", ["two_way", "raster"])
@pytest.mark.parametrize("make", ["llamagen", "hf"])
def test_forced_steps_predict_the_teacher_forced_logits(make, mode):
    """Stepping with given codes is teacher forcing done incrementally: each step's logits
    equal fa.logits at its cells, with guidance, within the float32 reordering bound derived
    from the model's sizes (flashar_adapt.exactness: the same arithmetic over another split
    of the sequence, cached keys vs one pass, only changes summation order)."""
    model, cond, *mask = _llamagen() if make == "llamagen" else _hf()
    mask = mask[0] if mask else None
    im = fa.context(model).recipe.image
    codes = torch.randint(0, im.codebook_size, (2, *im.grid), generator=torch.Generator().manual_seed(2))
    found = steps_match_teacher(model, cond, codes, mode, cond_mask=mask, cfg_scale=2.0)
    assert found.ok, found.describe()
    assert len(found.errors) == (sum(codes.shape[1:]) - 1 if mode == "two_way" else codes[0].numel())
    # the bound is tight enough to see an error of 1e-3 of the logits' scale in one step
    assert found.bound < 1e-3 * found.scale


SETTINGS = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.mark.numerics
@SETTINGS
@given(
    grid=st.integers(1, 5),
    batch=st.integers(1, 3),
    cfg=st.sampled_from([1.0, 3.0]),
    mode=st.sampled_from(["two_way", "raster"]),
    seed=st.integers(0, 3),
)
def test_property_stepping_equals_generate_and_teacher_forcing(grid, batch, cfg, mode, seed):
    model, _ = _llamagen(grid=grid, seed=seed)
    cond = torch.arange(batch) % 10
    state, _ = _drive(model, cond, mode, top_k=1, cfg_scale=cfg)
    codes = state.image()
    assert torch.equal(codes, model.generate(cond, mode=mode, top_k=1, cfg_scale=cfg))
    found = steps_match_teacher(model, cond, codes, mode, cfg_scale=cfg)  # on values, not argmaxes
    assert found.ok, found.describe()


def test_step_misuse_is_refused():
    model, cond = _llamagen()
    state = fa.prefill(model, cond, top_k=1)
    with pytest.raises(ValueError, match=r"integer tensor \[2, 1\]"):
        fa.step(state, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="codebook"):
        fa.step(state, torch.full((2, 1), 48))
    with pytest.raises(ValueError, match="DecoderState"):
        fa.step("state")
    with pytest.raises(ValueError, match="not both"):
        fa.prefill(model, cond, sampling=fa.Sampling(), top_k=1)
    # a later prefill (or generate) reuses the static caches: the old state refuses to go on
    fa.step(state)
    model.generate(cond, top_k=1)
    with pytest.raises(RuntimeError, match="stale"):
        fa.step(state)
    fresh = fa.prefill(model, cond, top_k=1)
    while not fresh.done:
        fa.step(fresh)
    with pytest.raises(RuntimeError, match="all 7 steps"):
        fa.step(fresh)


def test_without_the_branch_two_way_takes_the_horizontal_head():
    model, cond = _llamagen()
    state = fa.prefill(model, cond, vertical=False, top_k=1)
    calls = []
    h = model.flashar.branch_layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        while not state.done:
            fa.step(state)
    finally:
        h.remove()
    assert calls == [] and state.decoder.bcache is None
    # cells (0, 0) and (0, 1) have only the horizontal head in both decoders (later cells
    # see the differently decoded column 0)
    assert torch.equal(state.image()[:, 0, :2], model.generate(cond, top_k=1)[:, 0, :2])


# ---------------------------------------------------------------- module hygiene


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            yield node.module or "", node.level, [a.name for a in node.names]


def test_no_benchmark_or_peer_imports_a_private_core_name():
    files = list((ROOT / "benchmarks").glob("*.py")) + list((ROOT / "fmnist").glob("*.py"))
    bad = [
        (f.name, mod, n)
        for f in files
        for mod, _, names in _imports(f)
        if mod.startswith("flashar_adapt") and not mod.startswith("flashar_adapt.integrations")
        for n in names
        if n.startswith("_")
    ]
    assert bad == []


def test_decoding_and_patching_do_not_import_each_other_in_a_cycle():
    core = ROOT / "flashar_adapt"
    dec = {mod for f in (core / "decoding").glob("*.py") for mod, level, _ in _imports(f) if level}
    assert "patching" not in dec and "context" in dec
    # patching imports decoding at module level now: no import is left inside its functions
    tree = ast.parse((core / "patching.py").read_text())
    inner = [
        n
        for f in ast.walk(tree)
        if isinstance(f, ast.FunctionDef)
        for n in ast.walk(f)
        if isinstance(n, (ast.Import, ast.ImportFrom))
    ]
    assert inner == []


def test_decoding_modules_talk_through_public_names():
    """No decoding module imports another module's private name or imports inside a function
    (but for torch._dynamo, which only compiled decoding pays a second to import), and no
    test reaches into a private name of the package."""
    pkg = ROOT / "flashar_adapt" / "decoding"
    private = [
        (f.name, mod, n) for f in pkg.glob("*.py") for mod, _, names in _imports(f) for n in names if n.startswith("_")
    ]
    assert private == []
    inner = [
        (f.name, ast.unparse(n))
        for f in pkg.glob("*.py")
        for fn in ast.walk(ast.parse(f.read_text()))
        if isinstance(fn, ast.FunctionDef)
        for n in ast.walk(fn)
        if isinstance(n, (ast.Import, ast.ImportFrom))
    ]
    assert inner == [("compiled.py", "import torch._dynamo")]
    names = {"decoding", *(f.stem for f in pkg.glob("*.py"))}

    def in_package(v) -> bool:  # decoding.x, fa.decoding.x, compiled.x, ...
        return (isinstance(v, ast.Name) and v.id in names) or (isinstance(v, ast.Attribute) and v.attr in names)

    reached = [
        (f.name, n.attr)
        for f in (ROOT / "tests").glob("*.py")
        for n in ast.walk(ast.parse(f.read_text()))
        if isinstance(n, ast.Attribute)
        and n.attr.startswith("_")
        and not n.attr.startswith("__")
        and in_package(n.value)
    ]
    assert reached == []


def test_decode_speed_benchmark_runs_on_the_public_seam():
    """The benchmark's own loops (built on fa.prefill / fa.step / Decoder.feed) still run."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import decode_speed as ds

    m = ds.build(2, 32, 2, 64, -1, 4, torch.device("cpu"), torch.float32)
    cond = torch.zeros(1, dtype=torch.long)
    assert ds.forward_growth(m, 2.0, torch.device("cpu"), reps=2) > 0
    calls = []
    h = m.flashar.ctx.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for branch in (True, False):
            assert ds.two_way_steps(m, cond, branch, 2.0).shape == (1, 4, 4)
    finally:
        h.remove()
    assert len(calls) == 2 * (4 + 4 - 1)


@pytest.mark.slow
def test_fused_branch_benchmark_runs_and_writes_its_results(tmp_path):
    """benchmarks/fused_branch_speed.py at its smallest: both phases compile and run, the fused
    path is taken, codes agree, and the results are written (times are not checked)."""
    import json
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import fused_branch_speed as fb

    res = fb.main(["--layers", "1", "--dim", "32", "--grid", "2", "--repeats", "1", "--out-dir", str(tmp_path)])
    assert res["fused_path_taken"] and res["greedy_codes_equal"] and res["sampled_codes_equal"]
    assert json.loads((tmp_path / "fused_branch_speed.json").read_text())["ms"].keys() == res["ms"].keys()
    assert "| branch layer fused |" in (tmp_path / "fused_branch_speed.md").read_text()
