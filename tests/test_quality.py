"""``flashar-adapt evaluate``: the Frechet distance against hand-computed values and against
torchmetrics, precision/recall against a brute-force loop, the Inception Score against
torchmetrics, the inputs it reads (sample folders, ADM .npz, image folders, statistics), and
the raster vs two-way report of an export, with a stand-in extractor."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import flashar_adapt as fa
from flashar_adapt.commands import main
from flashar_adapt.evaluation import evaluate_samples
from flashar_adapt.extractors import FeatureExtractor, register_extractor
from flashar_adapt.npz_images import NpzError, NpzImages, write_npz
from flashar_adapt.quality import (
    QualityError,
    frechet_distance,
    inception_score,
    knn_radii,
    mean_cov,
    precision_recall,
)
from flashar_adapt.shards import ShardDataset, ShardWriter
from tests import tiny

PIL = pytest.importorskip("PIL.Image")


@register_extractor("test-standin")
class StandIn(FeatureExtractor):
    """A fixed random conv net: 8 features and 5 logits of any image size."""

    num_features = 8

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.head = nn.Linear(8, 5)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, images):
        f = torch.tanh(self.conv(images.float() / 127.5 - 1)).mean((2, 3)) * 3
        return f, self.head(f)


# ---------------------------------------------------------------- the numbers


def test_frechet_distance_of_hand_computed_gaussians():
    """Feature sets whose mean and covariance are worked out by hand, then the closed form."""
    a = torch.tensor([[0.0, 0], [2, 0], [0, 2], [2, 2]])  # mean (1, 1), covariance 4/3 I
    b = a * 3 + torch.tensor([3.0, 1])  # mean (6, 4), covariance 12 I
    mu_a, s_a = mean_cov(a)
    assert torch.equal(mu_a, torch.tensor([1.0, 1], dtype=torch.float64))
    assert torch.allclose(s_a, torch.eye(2, dtype=torch.float64) * 4 / 3, rtol=0, atol=1e-15)
    mu_b, s_b = mean_cov(b)
    # |(1,1) - (6,4)|^2 = 34; tr(4/3 I + 12 I - 2 (16 I)^1/2) = 2 (4/3 + 12 - 8) = 32/3
    assert math.isclose(frechet_distance(mu_a, s_a, mu_b, s_b), 34 + 32 / 3, rel_tol=1e-14)
    assert frechet_distance(mu_a, s_a, mu_a, s_a) == pytest.approx(0, abs=1e-14)
    # non-commuting 2x2 covariances: tr (S1^1/2 S2 S1^1/2)^1/2 = sqrt(tr(S1 S2) + 2 sqrt(det S1 det S2))
    c = torch.tensor([[0.0, 0], [1, 0], [0, 1], [3, 3]])
    d = torch.tensor([[0.0, 1], [2, 0], [1, 1], [0, 4], [1, 3]])
    (mu_c, s_c), (mu_d, s_d) = mean_cov(c), mean_cov(d)
    cross = math.sqrt(float(torch.trace(s_c @ s_d)) + 2 * math.sqrt(float(torch.det(s_c) * torch.det(s_d))))
    want = float((mu_c - mu_d).square().sum() + torch.trace(s_c) + torch.trace(s_d)) - 2 * cross
    assert math.isclose(frechet_distance(mu_c, s_c, mu_d, s_d), want, rel_tol=1e-12)
    with pytest.raises(QualityError, match="at least 2 images"):
        mean_cov(a[:1])


def test_frechet_distance_agrees_with_torchmetrics(tmp_path):
    """Our streamed float64 statistics and distance vs torchmetrics' FID over the same stand-in
    extractor: torchmetrics returns the distance in the features' float32, so the two agree
    to float32's resolution (a few units of 6e-8, relative)."""
    tm = pytest.importorskip("torchmetrics.image.fid")
    g = torch.Generator().manual_seed(1)
    real = torch.randint(0, 256, (40, 3, 12, 12), generator=g, dtype=torch.uint8)
    fake = (real.float() * 0.7 + 30).clamp(0, 255).to(torch.uint8)
    net = StandIn().eval()

    class FeaturesOnly(nn.Module):
        num_features = 8

        def forward(self, x):
            return net(x)[0]

    fid = tm.FrechetInceptionDistance(feature=FeaturesOnly(), normalize=False)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    with torch.no_grad():
        (mr, sr), (mf, sf) = mean_cov(net(real)[0]), mean_cov(net(fake)[0])
    ours = frechet_distance(mf, sf, mr, sr)
    assert ours > 0.1 and math.isclose(ours, float(fid.compute()), rel_tol=1e-6)


def test_precision_recall_equals_a_brute_force_loop():
    g = torch.Generator().manual_seed(2)
    real, fake = torch.randn(30, 4, generator=g), torch.randn(25, 4, generator=g) * 1.5 + 0.3

    def radius(x, i, k=3):
        return sorted(float(((x[i] - x[j]) ** 2).sum()) for j in range(len(x)) if j != i)[k - 1]

    def covered(p, centres):
        return sum(
            any(float(((p[i] - centres[j]) ** 2).sum()) <= radius(centres, j) for j in range(len(centres)))
            for i in range(len(p))
        ) / len(p)

    p, r = precision_recall(real, fake)
    assert math.isclose(p, covered(fake, real), abs_tol=1e-12) and math.isclose(r, covered(real, fake), abs_tol=1e-12)
    assert torch.allclose(knn_radii(real)[:3], torch.tensor([radius(real, i) for i in range(3)], dtype=torch.float64))
    assert precision_recall(real, real) == (1.0, 1.0)
    with pytest.raises(QualityError, match="more than 3 images"):
        knn_radii(real[:3])


def test_inception_score_agrees_with_torchmetrics_and_its_bounds():
    tmi = pytest.importorskip("torchmetrics.image.inception")
    logits = torch.randn(64, 5, generator=torch.Generator().manual_seed(3)) * 2
    metric = tmi.InceptionScore(feature=nn.Identity(), splits=1)
    metric.update(logits)
    assert math.isclose(inception_score(logits)[0], float(metric.compute()[0]), rel_tol=1e-5)
    assert inception_score(torch.zeros(10, 5))[0] == pytest.approx(1.0, abs=1e-12)  # no confidence: 1
    sure = torch.eye(5).repeat(4, 1) * 100  # confident and balanced: the number of classes
    assert inception_score(sure)[0] == pytest.approx(5.0, rel=1e-9)
    mean, std = inception_score(logits, split_size=16)
    assert std > 0 and 1 < mean < 5


# ---------------------------------------------------------------- inputs


def _image_folder(folder: Path, n: int, seed: int, size=12) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, size, size, 3), generator=g, dtype=torch.uint8).numpy()
    folder.mkdir(parents=True)
    for i in range(n):
        PIL.fromarray(x[i], "RGB").save(folder / f"{i:03d}.png")
    return x


def test_folder_npz_and_statistics_give_the_same_fid(tmp_path):
    ref = _image_folder(tmp_path / "ref", 20, 0)
    _image_folder(tmp_path / "fake", 12, 1)
    write_npz(tmp_path / "ref.npz", iter(ref), (20, 12, 12))
    kw = dict(extractor="test-standin", progress=False)
    a = evaluate_samples(tmp_path / "fake", tmp_path / "ref", save_reference_stats=tmp_path / "stats.npz", **kw)
    b = evaluate_samples(tmp_path / "fake", tmp_path / "ref.npz", **kw)
    c = evaluate_samples(tmp_path / "fake", tmp_path / "stats.npz", **kw)
    assert a["fid"] == b["fid"] == c["fid"] and a["fid"] > 0
    assert a["precision"] == b["precision"] and "precision" not in c  # statistics alone: FID only
    assert "inception_score" in a and "accuracy" not in a  # no recipe: no classes to check
    with pytest.raises(QualityError, match="of the 'test-standin' extractor, not 'other'"):
        register_extractor("other")(type("Other", (StandIn,), {}))
        evaluate_samples(tmp_path / "fake", tmp_path / "stats.npz", extractor="other", progress=False)
    PIL.fromarray(np.zeros((10, 12, 3), np.uint8)).save(tmp_path / "fake" / "odd.png")
    with pytest.raises(QualityError, match="odd.png: 12x10 px, the first image is 12x12"):
        evaluate_samples(tmp_path / "fake", tmp_path / "ref.npz", **kw)


def test_npz_reader_refuses_what_is_not_the_adm_layout(tmp_path):
    np.savez(tmp_path / "f.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(NpzError, match="must be uint8 images"):
        NpzImages(tmp_path / "f.npz")
    (tmp_path / "t.npz").write_bytes(b"PK not really")
    with pytest.raises(NpzError, match="not a readable .npz"):
        NpzImages(tmp_path / "t.npz")
    grey = np.arange(2 * 4 * 4, dtype=np.uint8).reshape(2, 4, 4)
    np.savez_compressed(tmp_path / "g.npz", arr_0=grey)
    (batch,) = list(NpzImages(tmp_path / "g.npz").batches(8))
    assert batch.shape == (2, 4, 4, 3) and (batch == grey[..., None]).all()


# ---------------------------------------------------------------- raster vs two-way, one report


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    model = fa.patch(tiny.llamagen(grid=14, vocab=256, n_layer=3, dim=32), "fmnist-c2i")
    tiny.randomize(model.flashar, 1)
    return fa.export_merged(model, tmp_path_factory.mktemp("exp") / "export")


def _shards(path: Path, n: int = 6) -> Path:
    g = torch.Generator().manual_seed(4)
    w = ShardWriter(path, (14, 14), 256, "class", recipe="fmnist-c2i", shard_size=4, num_classes=10)
    w.add(torch.randint(0, 256, (n, 14, 14), generator=g), torch.arange(n) % 10)
    w.close()
    return path


def test_evaluate_an_export_writes_raster_and_two_way_side_by_side(export_dir, tmp_path, capsys):
    ref = tmp_path / "ref"
    _image_folder(ref, 12, 5, size=28)
    out = tmp_path / "eval"
    argv = ["evaluate", "--export", str(export_dir), "--ref", str(ref), "--out", str(out)]
    argv += [
        "--extractor",
        "test-standin",
        "--num-samples",
        "8",
        "--cfg",
        "2",
        "--shards",
        str(_shards(tmp_path / "d")),
    ]
    assert main([*argv, "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "raster: fid" in printed and "two_way: fid" in printed and "speed-up" in printed
    r = json.loads((out / "report.json").read_text())
    assert set(r["modes"]) == {"raster", "two_way"}
    model = fa.load_adapted(export_dir)
    b = _shards_batch(tmp_path / "d")
    for mode, steps in (("raster", 196), ("two_way", 27)):
        row = r["modes"][mode]
        assert row["steps_per_image"] == steps and row["num_samples"] == 8 and row["seconds_per_image"] > 0
        assert row["fid"] > 0 and 0 <= row["precision"] <= 1 and row["nll_examples"] == 6
        # the NLL is fa.score's, in bits per token
        want = -float(fa.score(model, b.cond, b.codes, mode=mode).double().sum()) / (6 * 196) / math.log(2)
        assert math.isclose(row["nll_bits"], want, rel_tol=1e-9)
    # same seeds, same settings: the two sample sets differ only in mode (and so in the weights
    # their identity covers: raster decoding never reads the FlashAR modules)
    m = {k: json.loads((out / k / "manifest.json").read_text()) for k in ("raster", "two_way")}
    mode_bound = ("mode", "model_seconds", "weights_sha256")
    assert {k: v for k, v in m["raster"].items() if k not in mode_bound} == {
        k: v for k, v in m["two_way"].items() if k not in mode_bound
    }
    assert m["raster"]["weights_sha256"] != m["two_way"]["weights_sha256"]
    md = (out / "report.md").read_text()
    assert "| | raster | two-way |" in md and "| FID |" in md and "| decoding steps per image | 196 | 27 |" in md
    assert "NLL of the held-out shards" in md
    # 8 samples of 10 classes: one labelled row per class drawn, a 28 px sample zoomed to 84 (+2),
    # under a title line, for each mode
    w, h = PIL.open(out / "samples.png").size
    assert h == 20 + 8 * 86 and w > 2 * 86


def _shards_batch(path):
    ds = ShardDataset(path)
    return ds.get(torch.arange(len(ds)))


def test_evaluate_samples_with_only_required_arguments_uses_the_recipes_extractor(export_dir, tmp_path, capsys):
    """A sample folder of the fmnist recipe is measured with the Fashion-MNIST classifier (it
    suits the recipe), which also checks the classes: accuracy."""
    assert main(["sample", "--export", str(export_dir), "--out", str(tmp_path / "s"), "--num-samples", "12"]) == 0
    ref = tmp_path / "ref.npz"
    x = torch.randint(0, 256, (12, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8).numpy()
    write_npz(ref, iter(np.repeat(x[..., None], 3, 3)), (12, 28, 28), np.arange(12) % 10)
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "s"), "--ref", str(ref)]) == 0
    out = capsys.readouterr().out
    assert "12 samples vs" in out and "(fmnist-classifier features)" in out and "accuracy" in out


def test_evaluate_bad_input_is_one_line(export_dir, tmp_path, capsys):
    _image_folder(tmp_path / "imgs", 4, 0)
    base = ["evaluate", str(tmp_path / "imgs"), "--ref", str(tmp_path / "imgs"), "--no-progress"]
    assert main([*base, "--extractor", "nope"]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "unknown feature extractor 'nope'" in err and "test-standin" in err
    if importlib.util.find_spec("torch_fidelity") is None:  # the default, Inception, needs it
        assert main(base) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "pip install 'flashar-adapt[eval]'" in err
    assert main([*base, "--extractor", "test-standin", "--export", str(export_dir)]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["evaluate", "--export", str(export_dir), "--ref", str(tmp_path / "imgs")]) == 2
    assert "give --out DIR" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "nothing"), "--ref", str(tmp_path / "imgs")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
