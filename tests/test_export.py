"""Export with LoRA merged, native backbone layouts, and reload without pickle or network."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import flashar_adapt as fa
from flashar_adapt.export import ExportError, load_flashar_weights
from flashar_adapt.training import TrainConfig, train
from tests.numerics import assert_same_math
from tests.train_helpers import hf_run, llamagen_run


def _inputs(model):
    ctx = model.flashar.ctx
    H, W = ctx.recipe.image.grid
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, ctx.recipe.image.codebook_size, (2, H, W), generator=g)
    if ctx.recipe.condition.kind == "class":
        return torch.tensor([1, 4]), None, codes
    cond = torch.randint(1, 90, (2, 5), generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    return cond, mask, codes


@pytest.mark.numerics
@pytest.mark.parametrize("family", ["llamagen", "transformers"])
@pytest.mark.parametrize("lora", [False, True])
def test_export_and_reload_are_identical(tmp_path, family, lora):
    cfg_path = (llamagen_run if family == "llamagen" else hf_run)(tmp_path, stage1=2, stage2=2, lora=lora)
    model = train(TrainConfig.load(cfg_path), progress=False)
    assert any("lora_" in n for n, _ in model.named_parameters()) == lora
    cond, mask, codes = _inputs(model)
    before = {m: fa.logits(model, cond, codes, mode=m, cond_mask=mask) for m in ("two_way", "raster")}
    gen = {m: model.generate(cond, mode=m, top_k=1, cond_mask=mask) for m in ("two_way", "raster")}
    out = fa.export_merged(model, tmp_path / "export")
    assert not any("lora_" in n for n, _ in model.named_parameters())  # merged in place
    cfg = json.loads((out / "flashar_config.json").read_text())
    assert cfg["lora_layers_merged"] == (25 if family == "llamagen" else 35) * lora
    if family == "llamagen":
        from flashar_adapt.integrations.llamagen import Transformer, config_from_state_dict, load_checkpoint

        sd = torch.load(out / "backbone" / "llamagen.pt", weights_only=True)["model"]  # official layout
        assert "layers.0.attention.wqkv.weight" in sd and not any("flashar" in k or "lora" in k for k in sd)
        plain = load_checkpoint(
            Transformer(config_from_state_dict(sd, block_size=16, multiple_of=16)), out / "backbone" / "llamagen.pt"
        )
        assert plain is not None
    else:
        assert (out / "backbone" / "config.json").is_file() and (out / "backbone" / "model.safetensors").is_file()
        from safetensors import safe_open

        with safe_open(str(out / "backbone" / "model.safetensors"), "pt") as f:
            assert not any("flashar" in k or "lora" in k for k in f.keys())
    again = fa.load_adapted(out)
    for m in ("two_way", "raster"):
        # merging LoRA into the weights sums W + BA once instead of per call: same math, other order
        assert_same_math(fa.logits(again, cond, codes, mode=m, cond_mask=mask), before[m], layers=5, width=96)
        assert torch.equal(again.generate(cond, mode=m, top_k=1, cond_mask=mask), gen[m])


def test_failed_export_keeps_the_previous_one(tmp_path, monkeypatch):
    model = train(TrainConfig.load(llamagen_run(tmp_path, stage1=2, stage2=0)), progress=False)
    out = fa.export_merged(model, tmp_path / "export")
    snapshot = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    from flashar_adapt import export

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export, "save_file", boom)
    with torch.no_grad():
        model.flashar.gate.net[2].bias.add_(1.0)
    with pytest.raises(OSError, match="No space"):
        fa.export_merged(model, tmp_path / "export")
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == snapshot
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".export")] == []


def test_bad_export_files_are_clear_errors(tmp_path):
    model = train(TrainConfig.load(llamagen_run(tmp_path, stage1=1, stage2=0)), progress=False)
    out = fa.export_merged(model, tmp_path / "export")
    st = out / "flashar.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(ExportError, match="truncated"):
        fa.load_adapted(out)
    st.write_bytes(data)
    fa.unpatch(model)
    fa.patch(model, model_recipe(out), branch_depth=2, branch_layer=-3)
    with pytest.raises(ExportError, match="do not fit"):
        load_flashar_weights(model, st)
    with pytest.raises(ExportError, match="no flashar_config.json"):
        fa.load_adapted(tmp_path)


def model_recipe(out):
    return fa.load_recipe(out / "recipe.yaml")


@pytest.mark.slow
def test_cli_train_then_export(tmp_path):
    cfg = llamagen_run(tmp_path, stage1=2, stage2=1)
    env = {"OMP_NUM_THREADS": "1", "PATH": ""}
    r = subprocess.run(
        [sys.executable, "-m", "flashar_adapt.commands", "train", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "flashar train" in r.stderr  # the progress bar
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "flashar_adapt.commands",
            "export",
            "--config",
            str(cfg),
            "--out",
            str(tmp_path / "exp"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    m = fa.load_adapted(tmp_path / "exp")
    assert m.generate(torch.tensor([3]), top_k=1).shape == (1, 4, 4)


def test_the_run_data_class_names_are_inside_the_export_when_it_appears(tmp_path, monkeypatch):
    from flashar_adapt import export as export_module
    from flashar_adapt.export import export_run

    cfg = llamagen_run(tmp_path, stage1=1, stage2=0)
    monkeypatch.chdir(tmp_path)
    train(TrainConfig.load(cfg), progress=False)
    names = ["tee", "coat", "bag"]
    (tmp_path / "data" / "classes.json").write_text(json.dumps(names))
    seen = []
    real_swap = export_module._swap_in  # noqa: SLF001 - observe the folder at the moment it appears

    def swap(tmp, out):
        seen.append(json.loads((tmp / "classes.json").read_text()))
        return real_swap(tmp, out)

    monkeypatch.setattr(export_module, "_swap_in", swap)
    out, _ = export_run(cfg, tmp_path / "exp", log=lambda *_: None)
    assert seen == [names] and json.loads((out / "classes.json").read_text()) == names
    model = fa.load_adapted(out)
    with pytest.raises(ExportError, match="extra_files: 'notes.txt' is not a file an export holds"):
        fa.export_merged(model, tmp_path / "exp2", extra_files={"notes.txt": b"x"})
    assert not (tmp_path / "exp2").exists()


def test_nan_weights_are_neither_exported_nor_loaded(tmp_path):
    from safetensors.torch import load_file, save_file

    from tests import tiny

    model = tiny.llamagen(grid=4)
    fa.patch(model, tiny.llamagen_recipe(grid=4))
    out = fa.export_merged(model, tmp_path / "good")
    name, p = next(iter(model.flashar.named_parameters()))
    with torch.no_grad():
        p.view(-1)[0] = float("nan")
    with pytest.raises(ExportError, match=f"NaN or infinite weights \\(flashar.{name}\\)"):
        fa.export_merged(model, tmp_path / "bad")
    assert not (tmp_path / "bad").exists() and sorted(x.name for x in tmp_path.iterdir()) == ["good"]
    # an export whose weights turned non-finite after it was written
    sd = load_file(str(out / "flashar.safetensors"))
    sd[name].view(-1)[0] = float("inf")
    save_file(sd, str(out / "flashar.safetensors"))
    with pytest.raises(ExportError, match="flashar.safetensors differs from what the export wrote"):
        fa.load_adapted(out)  # its file record sees it first
    cfg = json.loads((out / "flashar_config.json").read_text())
    for key in ("files", "config_sha256"):  # as an export written before file records
        del cfg[key]
    (out / "flashar_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ExportError, match="NaN or infinite values"):
        fa.load_adapted(out)
