"""Data-free post-training data: ``flashar-adapt tokenize --from-model`` samples the shards
from the raster model itself (flashar_adapt.datafree), reproducibly and resumably."""

from __future__ import annotations

import json

import pytest
import torch

import flashar_adapt as fa
from flashar_adapt import datafree
from flashar_adapt.commands import main
from flashar_adapt.datafree import TeacherSampling, batch_seed, cycled_prompts, sample_dataset, uniform_classes
from flashar_adapt.shards import STATE, DataError, ShardDataset
from tests import tiny
from tests.kill_switch import kill_tokenize_mid_run


def _read(out):
    ds = ShardDataset(out)
    b = ds.get(torch.arange(len(ds)))
    return b.codes, b.cond, b.cond_mask


def _by_hand(model, cond, batch_size, seed, mask=None, **kw):
    """What the shards must hold: raster ``generate`` batch by batch, batch b seeded batch_seed(seed, b)."""
    out = []
    for b, i in enumerate(range(0, cond.shape[0], batch_size)):
        g = torch.Generator().manual_seed(batch_seed(seed, b))
        out.append(
            model.generate(
                cond[i : i + batch_size],
                mode="raster",
                generator=g,
                cond_mask=None if mask is None else mask[i : i + batch_size],
                **kw,
            )
        )
    return torch.cat(out)


@pytest.fixture(scope="module")
def c2i():
    return fa.patch(tiny.llamagen(grid=4), tiny.llamagen_recipe())


@pytest.mark.parametrize(
    "n,batch,shard,cfg_scale,top_k,seed", [(7, 3, 2, 1.0, 0, 0), (10, 4, 4, 2.5, 5, 3), (5, 8, 3, 1.5, 0, 1)]
)
def test_shards_equal_raster_generate_with_the_same_seeds(c2i, tmp_path, n, batch, shard, cfg_scale, top_k, seed):
    s = TeacherSampling(cfg_scale=cfg_scale, top_k=top_k, temperature=0.9)
    rep = sample_dataset(
        c2i,
        uniform_classes(n, 10),
        tmp_path / "d",
        sampling=s,
        seed=seed,
        batch_size=batch,
        shard_size=shard,
        progress=False,
    )
    codes, cond, _ = _read(tmp_path / "d")
    assert rep["num_examples"] == n and torch.equal(cond, torch.arange(n) % 10)  # every class in turn
    want = _by_hand(c2i, torch.arange(n) % 10, batch, seed, cfg_scale=cfg_scale, top_k=top_k, temperature=0.9)
    assert torch.equal(codes, want)
    assert not (tmp_path / "d" / STATE).exists()
    assert json.loads((tmp_path / "d" / "teacher_report.json").read_text())["num_examples"] == n


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("fail_at,batch,shard", [(1, 2, 3), (2, 2, 3), (3, 3, 2), (4, 2, 4), (3, 4, 5)])
def test_resume_after_a_failure_equals_an_uninterrupted_run(c2i, tmp_path, monkeypatch, fail_at, batch, shard):
    """The failure lands in every position relative to shard and batch ends (shards that end
    inside a batch included); the resumed folder equals the uninterrupted one exactly."""
    conds, s = uniform_classes(11, 10), TeacherSampling(cfg_scale=2.0)
    sample_dataset(c2i, conds, tmp_path / "ref", sampling=s, seed=4, batch_size=batch, shard_size=shard, progress=False)
    calls = {"n": 0}
    orig = datafree.sample_batch

    def failing(*a, **k):
        calls["n"] += 1
        if calls["n"] == fail_at:
            raise _Boom()
        return orig(*a, **k)

    monkeypatch.setattr(datafree, "sample_batch", failing)
    with pytest.raises(_Boom):
        sample_dataset(
            c2i, conds, tmp_path / "out", sampling=s, seed=4, batch_size=batch, shard_size=shard, progress=False
        )
    assert (tmp_path / "out" / STATE).is_file() and not (tmp_path / "out" / "manifest.json").exists()
    monkeypatch.setattr(datafree, "sample_batch", orig)
    sample_dataset(c2i, conds, tmp_path / "out", sampling=s, seed=4, batch_size=batch, shard_size=shard, progress=False)
    for a, b in zip(_read(tmp_path / "ref"), _read(tmp_path / "out")):
        assert (a is None and b is None) or torch.equal(a, b)
    ref = json.loads((tmp_path / "ref" / "manifest.json").read_text())
    assert json.loads((tmp_path / "out" / "manifest.json").read_text()) == ref
    # an interrupted run is only continued with the same settings
    monkeypatch.setattr(datafree, "sample_batch", failing)
    calls["n"] = fail_at - 1
    with pytest.raises(_Boom):
        sample_dataset(
            c2i, conds, tmp_path / "o2", sampling=s, seed=4, batch_size=batch, shard_size=shard, progress=False
        )
    with pytest.raises(DataError, match="other conditions, settings or model"):
        sample_dataset(
            c2i, conds, tmp_path / "o2", sampling=s, seed=5, batch_size=batch, shard_size=shard, progress=False
        )


def test_prompts_from_a_file_left_padded_as_training_reads_them(tmp_path):
    """Prompt recipe: each prompt is sampled exactly as the shards store it (left-padded to
    prefix_len with its mask), and the shards give training the same ids and mask back."""
    recipe = tiny.hf_llama_recipe(codebook=40, offset=100, grid=(3, 4))
    model = fa.patch(tiny.hf_llama(), recipe)
    text = lambda p: [3 + len(w) for w in p.split()]  # noqa: E731 - one id per word
    prompts = cycled_prompts(["a red car", "sky", "a b c d e"], 7)
    assert prompts[3:6] == ["a red car", "sky", "a b c d e"]
    rep = sample_dataset(
        model,
        prompts,
        tmp_path / "d",
        sampling=TeacherSampling(cfg_scale=3.0),
        seed=2,
        text=text,
        batch_size=3,
        shard_size=4,
        progress=False,
    )
    assert rep["num_examples"] == 7
    codes, cond, mask = _read(tmp_path / "d")
    T = recipe.condition.prefix_len
    for k, p in enumerate(prompts):
        ids = text(p)
        assert mask[k].sum() == len(ids) and cond[k, T - len(ids) :].tolist() == ids
    assert torch.equal(codes, _by_hand(model, cond, 3, 2, mask=mask, cfg_scale=3.0))
    with pytest.raises(DataError, match="prefix_len allows"):
        sample_dataset(model, ["w " * (T + 1)], tmp_path / "long", text=text, progress=False)


def test_bad_input_is_refused(c2i, tmp_path):
    with pytest.raises(DataError, match="outside the recipe's 10 classes"):
        sample_dataset(c2i, [0, 10], tmp_path / "a", progress=False)
    with pytest.raises(DataError, match="no conditions"):
        sample_dataset(c2i, [], tmp_path / "a", progress=False)
    with pytest.raises(DataError, match="condition.kind 'class'"):
        sample_dataset(c2i, ["a cat"], tmp_path / "a", text=lambda p: [1], progress=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    with pytest.raises(DataError, match="not an interrupted tokenize run"):
        sample_dataset(c2i, [1], tmp_path / "busy", progress=False)
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random LlamaGen checkpoint under the Fashion-MNIST recipe."""
    model = fa.patch(tiny.llamagen(grid=14, vocab=256, n_layer=2, dim=32), "fmnist-c2i")
    exp = fa.export_merged(model, tmp_path_factory.mktemp("exp") / "export")
    return exp


def test_cli_from_model_equals_raster_generate_of_the_checkpoint(checkpoint, tmp_path, capsys):
    ckpt = str(checkpoint / "backbone" / "llamagen.pt")
    rc = main(
        [
            "tokenize",
            "--from-model",
            "--model",
            ckpt,
            "--recipe",
            "fmnist-c2i",
            "--out",
            str(tmp_path / "d"),
            "--num-samples",
            "5",
            "--batch-size",
            "2",
            "--shard-size",
            "3",
            "--cfg",
            "2",
            "--top-k",
            "20",
            "--seed",
            "3",
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert "wrote 5 examples" in capsys.readouterr().out
    from flashar_adapt.inspection import load_model

    raw, _ = load_model(ckpt)  # the checkpoint's own decoding: patched here only to call generate
    model = fa.patch(raw, "fmnist-c2i")
    codes, cond, _ = _read(tmp_path / "d")
    assert torch.equal(cond, torch.tensor([0, 1, 2, 3, 4]))
    assert torch.equal(codes, _by_hand(model, cond, 2, 3, cfg_scale=2.0, top_k=20))


def test_cli_from_model_bad_input(checkpoint, tmp_path, capsys):
    ckpt = str(checkpoint / "backbone" / "llamagen.pt")
    base = ["tokenize", "--from-model", "--out", str(tmp_path / "o"), "--no-progress"]
    assert main([*base, "--export", str(checkpoint), "--num-samples", "2"]) == 2
    assert "an export's raster mode is the post-trained model" in capsys.readouterr().err
    assert main([*base, "--model", ckpt, "--recipe", "fmnist-c2i"]) == 2
    assert "needs --num-samples" in capsys.readouterr().err
    assert main([*base, "--recipe", "fmnist-c2i", "--num-samples", "2"]) == 2
    assert "needs the raster model" in capsys.readouterr().err
    (tmp_path / "p.txt").write_text("a cat\n")
    assert (
        main(
            [
                *base,
                "--model",
                ckpt,
                "--recipe",
                "fmnist-c2i",
                "--num-samples",
                "2",
                "--prompts-file",
                str(tmp_path / "p.txt"),
            ]
        )
        == 2
    )
    assert "class-conditional" in capsys.readouterr().err
    assert (
        main(["tokenize", str(tmp_path), *base[1:], "--model", ckpt, "--recipe", "fmnist-c2i", "--num-samples", "2"])
        == 2
    )
    assert "takes no images" in capsys.readouterr().err
    assert main(["tokenize", "--out", str(tmp_path / "o"), "--recipe", "fmnist-c2i"]) == 2
    assert "or --from-model" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_cli_from_model_resumes_after_sigkill(checkpoint, tmp_path):
    """A real kill -9 between shards (sampling slowed in the child so the kill lands there);
    the same command again finishes with exactly the uninterrupted run's shards."""

    args = [
        "--from-model",
        "--model",
        str(checkpoint / "backbone" / "llamagen.pt"),
        "--recipe",
        "fmnist-c2i",
        "--num-samples",
        "6",
        "--batch-size",
        "1",
        "--shard-size",
        "2",
        "--cfg",
        "2",
        "--no-progress",
    ]
    assert main(["tokenize", *args, "--out", str(tmp_path / "ref")]) == 0
    out = tmp_path / "out"
    kill_tokenize_mid_run([*args, "--out", str(out)], out / STATE, done=2, slow="flashar_adapt.datafree.sample_batch")
    assert not (out / "manifest.json").exists()
    assert main(["tokenize", *args, "--out", str(out)]) == 0
    for a, b in zip(_read(tmp_path / "ref"), _read(out)):
        assert (a is None and b is None) or torch.equal(a, b)


def test_batch_seeds_differ_by_seed_on_a_cpu_generator(c2i, tmp_path):
    """A CPU generator keeps only the low 32 bits of its seed: seeds 0 and 1 used to give the
    very same batches. Now every seed samples other codes, and the 32-bit fold is collision
    free over seeds < 1024 and batches < 2**20 (checked exhaustively through its multiples)."""
    runs = []
    for seed in (0, 1):
        sample_dataset(c2i, uniform_classes(4, 10), tmp_path / f"s{seed}", seed=seed, batch_size=2, progress=False)
        runs.append(_read(tmp_path / f"s{seed}")[0])
    assert not torch.equal(*runs)
    assert all(batch_seed(s, b) < 2**32 for s in (0, 2**31 - 1) for b in (0, 2**32 - 1))
    assert len({batch_seed(s, b) for s in range(64) for b in range(64)}) == 64 * 64
    # (s1, b1) and (s2, b2) collide iff (s1 - s2) * M = b2 - b1 (mod 2**32)
    m = batch_seed(1, 0)
    gaps = [(k * m) % 2**32 for k in range(1, 1024)]
    assert min(min(g, 2**32 - g) for g in gaps) >= 2**20


def test_sampling_progress_moves_every_step(c2i, tmp_path, monkeypatch):
    """The bar moves within a batch (per step), not once per batch."""
    seen = []
    orig = datafree.sample_batch

    def spy(*a, on_step=None, **k):
        return orig(*a, on_step=lambda t, n: (seen.append((t, n)), on_step(t, n)), **k)

    monkeypatch.setattr(datafree, "sample_batch", spy)
    sample_dataset(c2i, uniform_classes(3, 10), tmp_path / "d", batch_size=2, progress=True)
    assert seen.count((16, 16)) == 2 and len(seen) == 32  # a 4x4 grid: 16 raster steps per batch
