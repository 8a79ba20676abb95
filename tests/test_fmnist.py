"""The shipped Fashion-MNIST assets: real data, real tokenizer, real models."""

from __future__ import annotations

import json

import pytest
import torch

import flashar_adapt as fa
from flashar_adapt.fmnist import ASSETS

data = pytest.importorskip("flashar_adapt.fmnist.data")
try:
    X_TEST, Y_TEST = data.load_fmnist("test")
except data.DatasetMissing as e:  # pragma: no cover - CI installs it
    pytest.skip(str(e), allow_module_level=True)

if not (ASSETS / "flashar" / "flashar_config.json").is_file():  # pragma: no cover
    pytest.skip("Fashion-MNIST assets not built", allow_module_level=True)


def test_dataset_and_tokenizer():
    from flashar_adapt.fmnist.tokenizer import PatchVQ, psnr

    assert (
        X_TEST.shape == (10000, 28, 28)
        and X_TEST.dtype == torch.uint8
        and set(Y_TEST.unique().tolist()) == set(range(10))
    )
    vq = PatchVQ.load(ASSETS / "tokenizer.safetensors")
    codes = vq.encode(X_TEST[:500])
    assert codes.shape == (500, 14, 14) and int(codes.max()) < 256
    assert psnr(vq.decode(codes), X_TEST[:500].float() / 255) > 27.0  # 29.0 dB on the whole test set


def test_classifier_and_frechet():
    from flashar_adapt.fmnist.classifier import batched, frechet_distance, load_classifier

    net = load_classifier(ASSETS / "classifier.safetensors")
    x = X_TEST[:1000].float() / 255
    assert (batched(net, x).argmax(1) == Y_TEST[:1000]).float().mean() > 0.85
    f = batched(net.features, x)
    assert frechet_distance(f[:500], f[500:]) < frechet_distance(f[:500], f[500:] * 0.5)
    # In float64 the covariance's zero eigenvalues come out as +-eps64 * lambda_max, and their square
    # roots (clamped at 0) add up to F * sqrt(eps64 * lambda_max) ~ 1e-6 for these features: any CPU.
    assert abs(frechet_distance(f, f)) < 1e-4


def test_shipped_models_load_and_decode_exactly():
    from flashar_adapt.fmnist.evaluate import load_base, load_flashar

    base, flash = load_base(), load_flashar()
    y = torch.tensor([0, 7])
    for model, mode in ((base, "raster"), (flash, "two_way"), (flash, "raster")):
        codes = model.generate(y, mode=mode, top_k=1, cfg_scale=2.0)
        assert codes.shape == (2, 14, 14)
        assert torch.equal(fa.logits(model, y, codes, mode=mode, cfg_scale=2.0).argmax(-1), codes)
    sizes = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert sizes < 20 * 2**20
    info = json.loads((ASSETS / "info.json").read_text())
    assert info["flashar"]["images_seen"] <= 0.1 * info["base"]["images_seen"]
