"""Export with LoRA adapters kept apart: one model serves both modes, two-way with adapters
and raster with adapters off, the latter equal to the original model exactly."""

from __future__ import annotations

import json

import pytest
import torch

import flashar_adapt as fa
from flashar_adapt.training import TrainConfig, build_model, train
from tests.train_helpers import hf_run, llamagen_run

pytest.importorskip("peft")


def _inputs(model):
    ctx = fa.context(model)
    g = torch.Generator().manual_seed(3)
    H, W = ctx.recipe.image.grid
    codes = torch.randint(0, ctx.recipe.image.codebook_size, (2, H, W), generator=g)
    if ctx.recipe.condition.kind == "class":
        return torch.tensor([1, 7]), None, codes
    cond = torch.randint(1, 90, (2, 5), generator=g)
    return cond, torch.tensor([[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool), codes


@pytest.mark.parametrize("family", ["llamagen", "transformers"])
def test_unmerged_export_serves_both_modes(tmp_path, family):
    cfg_path = (llamagen_run if family == "llamagen" else hf_run)(tmp_path, stage1=2, stage2=2, lora=True)
    cfg = TrainConfig.load(cfg_path)
    model = train(cfg, progress=False)
    cond, mask, codes = _inputs(model)
    adapted = {m: fa.logits(model, cond, codes, mode=m, cond_mask=mask) for m in ("two_way", "raster")}
    gen = model.generate(cond, top_k=1, cond_mask=mask)

    out = fa.export_merged(model, tmp_path / "export", merge=False)
    meta = json.loads((out / "flashar_config.json").read_text())
    assert meta["lora_layers_merged"] == 0 and meta["lora_adapters"]["layers"] == (25 if family == "llamagen" else 35)
    assert any("lora_" in n for n, _ in model.named_parameters())  # the trained model is left as it was

    original = build_model(cfg)  # the base checkpoint, freshly loaded and patched: no training, no LoRA
    again = fa.load_adapted(out)
    # with adapters: the post-trained model (same ops, same weights: identical)
    for m in ("two_way", "raster"):
        assert torch.equal(fa.logits(again, cond, codes, mode=m, cond_mask=mask), adapted[m])
    assert torch.equal(again.generate(cond, top_k=1, cond_mask=mask), gen)
    # adapters off: raster decoding is the original model's, bit for bit
    with fa.adapters_disabled(again):
        raster = fa.logits(again, cond, codes, mode="raster", cond_mask=mask)
        g1 = again.generate(cond, mode="raster", cond_mask=mask, generator=torch.Generator().manual_seed(1))
    assert torch.equal(raster, fa.logits(original, cond, codes, mode="raster", cond_mask=mask))
    g2 = original.generate(cond, mode="raster", cond_mask=mask, generator=torch.Generator().manual_seed(1))
    assert torch.equal(g1, g2)
    assert not torch.equal(raster, adapted["raster"])  # stage 2 did change the backbone
    # and back on
    assert torch.equal(fa.logits(again, cond, codes, mode="raster", cond_mask=mask), adapted["raster"])


def test_unmerged_export_without_adapters_file_is_a_clear_error(tmp_path):
    model = train(TrainConfig.load(llamagen_run(tmp_path, stage1=1, stage2=1, lora=True)), progress=False)
    out = fa.export_merged(model, tmp_path / "export", merge=False)
    adapters = (out / "adapters.safetensors").read_bytes()
    (out / "adapters.safetensors").write_bytes(b"truncated")
    from flashar_adapt.export import ExportError

    with pytest.raises(ExportError, match="adapters"):
        fa.load_adapted(out)
    # a damaged record of the adapters is an ExportError naming the key, not a KeyError
    import json

    (out / "adapters.safetensors").write_bytes(adapters)

    cfg = json.loads((out / "flashar_config.json").read_text())
    for bad, key in (
        (dict(cfg["lora_adapters"], r=0), "lora_adapters.r"),
        ({"file": 3}, "lora_adapters.file"),
        (dict(cfg["lora_adapters"], file="../x"), "outside"),
    ):
        (out / "flashar_config.json").write_text(json.dumps(dict(cfg, lora_adapters=bad)))
        with pytest.raises(ExportError, match=key):
            fa.load_adapted(out)
