"""The backend contract: every registered runner and model format, found through the plugin
registries (never a list here), on tiny random models.

A runner binds to a model, runs with and without caches (dynamic and static) to the same
values as one uncached forward, declares its state in ``__init__`` and its optional abilities
as attributes that match what it does. A format saves and loads a model exactly, leaves the
FlashAR modules out, recognises its own files and only those a more specific format has not
claimed first. Then the registries themselves: entry points, aliases, in-process
registration, and a plugin whose optional dependency is missing.
"""

from __future__ import annotations

import functools
import inspect
import json
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import flashar_adapt as fa
from flashar_adapt import formats, plugins, runners
from flashar_adapt.formats import ModelFormat, format_of, get_format, load_spec, open_path, save_model
from flashar_adapt.runners import Runner, get_runner
from tests import tiny
from tests.numerics import assert_same_math, layer_width

RUNNERS = fa.list_runners()  # read at collection: a runner registered by a test below is not one to cover
FORMATS = fa.list_formats()


def _emu3p5_case(tmp_path):
    from flashar_adapt.integrations.emu3p5 import load_emu3p5

    cfg = tiny.emu3p5_official_config()
    tiny.write_emu3p5_official(tmp_path / "official", cfg, tiny.emu3p5_state_dict(cfg))
    return load_emu3p5(tmp_path / "official"), fa.load_recipe("emu3.5-image").replace(grid=[2, 3])


def _model_cases() -> dict:
    """Every tiny model the tests build, by case, as (model, recipe): the family cases of
    tests/tiny.py, and an Emu3.5 checkpoint in the official layout."""
    out = {name: (lambda tmp_path, _c=case: _c()[:2]) for name, case in tiny.FAMILY_CASES.items()}
    out["emu3p5"] = _emu3p5_case
    return out


@functools.cache
def _runner_of_case(case: str) -> type[Runner]:
    return get_runner(tiny.FAMILY_CASES[case]()[1].backend)


# ---------------------------------------------------------------- runners


@pytest.mark.parametrize("name", RUNNERS)
def test_every_runner_has_a_tiny_case(name):
    """The behaviour tests below run every family case; this one sees that they cover every runner."""
    assert any(_runner_of_case(case) is get_runner(name) for case in tiny.FAMILY_CASES), (
        f"no tiny model in tests/tiny.py FAMILY_CASES runs with runner {name!r}: add one"
    )


@pytest.mark.parametrize("name", RUNNERS)
def test_runner_declares_its_contract(name):
    cls = get_runner(name)
    assert issubclass(cls, Runner) and not inspect.isabstract(cls) and cls.name == name
    for method in ("run", "new_cache", "new_branch_cache", "branch_call"):  # required: abstract in the base
        assert method in Runner.__abstractmethods__ and getattr(cls, method) is not getattr(Runner, method)
    # an ability is declared exactly when its method is there
    assert cls.fused_branch == (cls.run_with_branch is not Runner.run_with_branch)
    assert cls.reference_forward == (cls.reference_logits is not Runner.reference_logits)
    assert cls.reference_generation == (cls.reference_generate is not Runner.reference_generate)
    for attr in ("static_caches", "fused_branch", "reference_forward", "reference_generation"):
        assert isinstance(getattr(cls, attr), bool)


def _chunks(T: int) -> list[tuple[int, int]]:
    """Uneven pieces of [0, T): a prefill, single tokens, a few at once."""
    bounds = [0, 3, 4, 6, 9, T]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if a < b <= T]


@pytest.mark.numerics
@pytest.mark.parametrize("case", list(tiny.FAMILY_CASES))
def test_runner_runs_with_and_without_caches_to_the_same_values(case):
    """``run`` on a whole causal sequence without a cache, then piece by piece through
    ``new_cache`` (in feeding order) and, with ``static_caches``, through a static cache
    written at tensor entries: the same hidden states."""
    model, cond, _ = tiny.patched_family(case)
    ctx = fa.context(model)
    runner = ctx.runner
    assert type(runner) is _runner_of_case(case)
    p = next(ctx.layers.parameters())
    B, T = 2, min(10, runner.max_positions(ctx) or 10)
    embeds = torch.randn(B, T, ctx.dim, generator=torch.Generator().manual_seed(0)).to(p)
    slots = torch.arange(T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()[None].expand(B, -1, -1)
    pos = slots[None].expand(B, -1)
    with torch.inference_mode():
        ref = runner.run(ctx, embeds, pos, slots, slots, causal, None)
        cache = runner.new_cache(ctx, B, T)
        parts = [
            runner.run(ctx, embeds[:, a:b], pos[:, a:b], slots[a:b], slots[:b], causal[:, a:b, :b], cache)
            for a, b in _chunks(T)
        ]
        assert_same_math(torch.cat(parts, 1), ref, layers=len(ctx.layers), width=layer_width(ctx))
        if runner.static_caches:
            n = T + 2  # two entries never written: masked, and zero
            cache = runner.new_cache(ctx, B, n, static=True)
            full = torch.zeros(B, T, n, dtype=torch.bool)
            full[:, :, :T] = causal
            parts = [
                runner.run(ctx, embeds[:, a:b], pos[:, a:b], slots[a:b], None, full[:, a:b], cache, entries=slots[a:b])
                for a, b in _chunks(T)
            ]
            assert_same_math(torch.cat(parts, 1), ref, layers=len(ctx.layers), width=layer_width(ctx))


@pytest.mark.numerics
@pytest.mark.parametrize("case", list(tiny.FAMILY_CASES))
def test_runner_abilities_match_what_it_does(case, monkeypatch):
    """Greedy two-way decoding equals teacher forcing on the path the runner declares (its
    fused backbone+branch pass when ``fused_branch``) and on the core's generic path; the
    reference forward, when declared, equals the patched raster logits, and the reference
    generation the patched greedy raster codes; a runner without
    static caches is refused compile=True. Whatever the calls, the runner's state is what its
    ``__init__`` declared."""
    model, cond, mask = tiny.patched_family(case)
    ctx = fa.context(model)
    runner, cls = ctx.runner, type(ctx.runner)
    declared = set(vars(cls()))
    codes = model.generate(cond, top_k=1, cond_mask=mask)
    assert torch.equal(fa.logits(model, cond, codes, cond_mask=mask).argmax(-1), codes)
    model.generate(cond, top_k=1, cond_mask=mask, mode="raster")
    if cls.fused_branch:
        with monkeypatch.context() as mp:
            mp.setattr(cls, "fused_branch", False)  # the generic path: capture hook + branch_call
            assert torch.equal(model.generate(cond, top_k=1, cond_mask=mask), codes)
    if cls.reference_forward:
        with torch.no_grad():
            ref = runner.reference_logits(ctx, cond, codes)
        raster = fa.logits(model, cond, codes, cond_mask=mask, mode="raster")
        assert_same_math(raster, ref, layers=len(ctx.layers), width=layer_width(ctx))
    if cls.reference_generation:  # the model's own greedy generation: the patched greedy raster codes
        grid = tuple(codes.shape[1:])
        with torch.no_grad():
            theirs = runner.reference_generate(ctx, cond, grid, cond_mask=mask)[-1]
        ours = model.generate(cond, top_k=1, cond_mask=mask, mode="raster", grid=grid)
        assert bool((theirs >= 0).all()), "the tiny model chose an id outside the codebook: pick another seed"
        assert torch.equal(ours, theirs)
    if not cls.static_caches:
        with pytest.raises(fa.FlashARError, match="static caches"):
            model.generate(cond, top_k=1, cond_mask=mask, compile=True)
    assert set(vars(runner)) == declared, f"{cls.__name__} keeps state its __init__ does not declare"


def test_a_runner_without_its_required_methods_is_refused():
    with pytest.raises(TypeError, match="branch_call, new_branch_cache, new_cache, run"):

        @fa.register_runner("contract-incomplete")
        class Incomplete(Runner):
            pass

    assert "contract-incomplete" not in fa.list_runners()


def test_runner_names_are_unique_and_unknown_ones_name_the_key():
    with pytest.raises(ValueError, match="already taken"):

        @fa.register_runner("transformers")
        class Impostor(get_runner("llamagen")):
            pass

    assert get_runner("transformers").__name__ == "TransformersRunner"
    with pytest.raises(fa.RecipeError, match=r"backend: unknown backend 'llamagenn' \(did you mean 'llamagen'\?\)"):
        get_runner("llamagenn")


# ---------------------------------------------------------------- model formats


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Every tiny model, saved by the format that owns it, the first one per format:
    {format: (model, recipe, folder, spec)}."""
    root = tmp_path_factory.mktemp("formats")
    out = {}
    for case, build in _model_cases().items():
        (root / case).mkdir()
        model, recipe = build(root / case)
        cls = format_of(model)
        if cls.name not in out:
            folder = root / f"saved-{cls.name}"
            folder.mkdir()
            out[cls.name] = (model, recipe, folder, cls.save(model, folder))
    return out


@pytest.mark.parametrize("name", FORMATS)
def test_format_declares_its_contract(name):
    cls = get_format(name)
    assert issubclass(cls, ModelFormat) and not inspect.isabstract(cls) and cls.name == name
    assert cls.runner in fa.list_runners() and isinstance(cls.priority, int)
    for method in ("owns", "sniff", "load", "save"):  # defined in the class body, as class methods
        assert isinstance(inspect.getattr_static(cls, method), classmethod)


@pytest.mark.parametrize("name", FORMATS)
def test_format_round_trip_is_exact(name, saved, tmp_path):
    """save -> load gives the same class and the same weights, bit for bit, and owns the
    result; the spec is JSON; a patched model saves its backbone alone, under a spec that
    names the format."""
    assert name in saved, f"no tiny model the tests build is owned by format {name!r}: add one"
    model, recipe, folder, spec = saved[name]
    cls = get_format(name)
    json.dumps(spec)
    again = cls.load(spec, folder)
    assert type(again) is type(model) and not again.training and format_of(again) is cls
    want, got = model.state_dict(), again.state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    fa.patch(model, recipe)
    try:
        full = save_model(model, tmp_path)
    finally:
        fa.unpatch(model)
    assert full["format"] == name
    got = load_spec(full, tmp_path).state_dict()
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("name", FORMATS)
def test_format_sniffs_its_own_files_first(name, saved):
    """The format recognises what it saved (the folder, or a file in it), loads the same
    weights from there, and ``open_path`` picks it; any other format that also recognises
    those files is a more generic one (a higher priority number: asked later)."""
    model, _, folder, _ = saved[name]
    cls = get_format(name)
    paths = [folder, *sorted(folder.iterdir())]
    mine = [p for p in paths if cls.sniff(p) is not None]
    assert mine, f"{name} recognises none of {[p.name for p in paths]}"
    for p in mine:
        loaded, found = open_path(p)
        assert found is cls and type(loaded) is type(model)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    for other, (_, _, other_folder, _) in saved.items():
        if other == name:
            continue
        for p in [other_folder, *other_folder.iterdir()]:
            if cls.sniff(p) is not None:
                assert cls.priority > get_format(other).priority, f"{name} claims {other}'s {p.name}"


def test_model_specs_name_their_format_and_accept_the_old_key(tmp_path):
    model = tiny.llamagen()
    spec = save_model(model, tmp_path)
    assert spec["format"] == "llamagen"
    old = {("backend" if k == "format" else k): v for k, v in spec.items()}  # a config written before formats
    for s in (spec, old):
        assert all(
            torch.equal(a, b)
            for a, b in zip(load_spec(s, tmp_path).state_dict().values(), model.state_dict().values(), strict=True)
        )
    with pytest.raises(formats.FormatError, match="unknown model format 'llamagem' \\(did you mean 'llamagen'"):
        load_spec({**spec, "format": "llamagem"}, tmp_path)
    with pytest.raises(formats.FormatError, match="needs 'format'"):
        load_spec({"checkpoint": "llamagen.pt"}, tmp_path)


def test_an_export_written_before_formats_still_loads(tmp_path):
    """Old exports record the format as a top-level ``backend`` and the backbone spec without
    ``format``; Emu3.5 recipes said ``backend: emu3p5`` (now an alias of the transformers runner)."""
    model, cond, _ = tiny.patched_family("llamagen-c2i")
    out = fa.export_merged(model, tmp_path / "exp")
    cfg = json.loads((out / "flashar_config.json").read_text())
    cfg["backend"] = cfg["backbone"].pop("format")
    for key in ("backbone_files", "files", "config_sha256"):  # recorded by later exports
        del cfg[key]
    (out / "flashar_config.json").write_text(json.dumps(cfg))
    again = fa.load_adapted(out)
    codes = model.generate(cond, top_k=1)
    assert torch.equal(again.generate(cond, top_k=1), codes)
    assert get_runner("emu3p5") is get_runner("transformers") and "emu3p5" not in fa.list_runners()


# ---------------------------------------------------------------- the registries


def _fake_distribution(root, name: str, group: str, entries: dict[str, str], modules: dict[str, str]) -> None:
    """An installed distribution, as importlib.metadata finds one on sys.path: a dist-info
    folder with entry_points.txt, and its modules beside it."""
    info = root / f"{name}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in entries.items()))
    for name, text in modules.items():
        (root / f"{name}.py").write_text(textwrap.dedent(text))


def test_a_plugin_whose_dependency_is_missing_is_hidden_and_a_broken_one_raises(tmp_path, monkeypatch):
    group = "flashar_adapt_contract.runners"
    _fake_distribution(
        tmp_path,
        "contract_fake_a",
        group,
        {
            "fine": "contract_fine:FineRunner",
            "needs-pkg": "contract_needs:NeedsRunner",
            "broken": "contract_broken:BrokenRunner",
            "old-name": "contract_fine:FineRunner",
        },
        {
            "contract_fine": """
            from flashar_adapt.integrations.llamagen.runner import LlamaGenRunner

            class FineRunner(LlamaGenRunner):
                name = "fine"
        """,
            "contract_needs": "import contract_package_not_installed  # an optional dependency\n",
            "contract_broken": "from contract_fine import NoSuchName  # a bug in the plugin itself\n",
        },
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = plugins.Registry(group, "runner")
    assert reg.get("fine").__name__ == "FineRunner" and reg.get("nothing") is None
    assert reg.get("old-name") is reg.get("fine")  # an alias: another name for the same class
    with pytest.raises(plugins.MissingDependency, match="needs the package 'contract_package_not_installed'"):
        reg.get("needs-pkg")
    with pytest.raises(ImportError, match="NoSuchName"):
        reg.get("broken")
    group = "flashar_adapt_contract.listed"  # without the broken one, which would stop the listing
    _fake_distribution(
        tmp_path / "b",
        "contract_fake_b",
        group,
        {
            "fine": "contract_fine:FineRunner",
            "old-name": "contract_fine:FineRunner",
            "needs-pkg": "contract_needs:NeedsRunner",
        },
        {},
    )
    monkeypatch.syspath_prepend(str(tmp_path / "b"))
    reg = plugins.Registry(group, "runner")
    with pytest.warns(
        plugins.PluginHidden, match="'needs-pkg' is unavailable: it needs the package 'contract_package_not_installed'"
    ):
        names = reg.names()
    assert names == ["fine"]  # the alias and the hidden one left out
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert reg.names() == ["fine"]  # warned once
    # two packages declaring one name for different objects: refused, naming both
    group = "flashar_adapt_contract.clash"
    for d, target in (("c", "contract_fine:FineRunner"), ("d", "contract_needs:NeedsRunner")):
        _fake_distribution(tmp_path / d, f"contract_fake_{d}", group, {"same": target}, {})
        monkeypatch.syspath_prepend(str(tmp_path / d))
    with pytest.raises(fa.FlashARError, match="two installed packages declare the runner 'same'"):
        plugins.Registry(group, "runner").get("same")


def test_shipped_plugins_come_from_entry_points():
    """The core imports no integration: the shipped runners, formats and tokenizer kinds are
    the ones pyproject.toml declares (in-process registrations come on top)."""
    from importlib.metadata import entry_points

    for registry in (runners.REGISTRY, formats.REGISTRY, fa.tokenizers.REGISTRY):
        declared = {ep.name for ep in entry_points(group=registry.group)}
        assert declared and declared <= set(registry.items())
    assert {"llamagen", "transformers"} <= set(RUNNERS) and {"llamagen", "transformers", "emu3p5"} <= set(FORMATS)
    assert {"llamagen-vq", "transformers-vq", "fmnist-patch-vq"} <= set(fa.tokenizers.list_tokenizers())


def test_in_process_registration_keeps_working(tmp_path):
    @fa.register_tokenizer("contract-kind")
    def factory(spec, model, root):
        raise AssertionError("never built here")

    assert "contract-kind" in fa.tokenizers.list_tokenizers() and fa.tokenizers.REGISTRY.get("contract-kind") is factory
    with pytest.raises(ValueError, match="already taken"):
        fa.register_tokenizer("contract-kind")(lambda spec, model, root: None)

    @fa.register_format("contract-format")
    class ContractFormat(get_format("llamagen")):
        priority = 99  # never asked before the real one

    assert ContractFormat.name == "contract-format" and "contract-format" in fa.list_formats()
    model = tiny.llamagen()
    assert format_of(model) is get_format("llamagen")  # the shipped format owns it first
    spec = {"format": "contract-format", **ContractFormat.save(model, tmp_path)}
    assert type(load_spec(spec, tmp_path)) is type(model)


@pytest.mark.slow
def test_without_transformers_its_plugins_are_hidden_and_the_rest_works():
    """transformers is an optional dependency of the core: in a process where it cannot be
    imported, the plugins that need it are listed as unavailable (naming the package), asking
    for them says what to install, and a LlamaGen model patches and decodes."""
    import subprocess
    import sys

    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["transformers"] = None  # import transformers now fails as if it were not installed
        import torch
        import flashar_adapt as fa
        from tests import tiny
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            print(fa.list_runners(), fa.list_formats(), "transformers-vq" in fa.tokenizers.list_tokenizers())
        print(sorted({str(w.message) for w in seen}))
        try:
            fa.runners.get_runner("transformers")
        except fa.RecipeError as e:
            print(e)
        model = tiny.llamagen()
        fa.patch(model, tiny.llamagen_recipe())
        print(tuple(model.generate(torch.tensor([1, 2]), top_k=1).shape))
    """)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(Path(__file__).resolve().parent.parent),
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "['llamagen'] ['llamagen'] True", lines
    assert "runner 'transformers' is unavailable: it needs the package 'transformers'" in lines[1]
    assert "model format 'emu3p5' is unavailable: it needs the package 'transformers'" in lines[1]
    assert lines[2].startswith("backend: the runner 'transformers'") and "needs the package 'transformers'" in lines[2]
    assert lines[3] == "(2, 4, 4)"
