"""Defaults are tested: every subcommand (the set is read from the parser, so a new one fails
here until it has a case) runs with only what it needs to know what to work on, never a
tuning option, on tiny data; and the size edges (0, 1, one less than a shard or batch, exactly
one, one more) of everything that batches or shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import flashar_adapt as fa
from flashar_adapt.commands import main, subcommands
from flashar_adapt.datafree import TeacherSampling, sample_batch, sample_dataset, uniform_classes
from flashar_adapt.generation import generate_to_folder
from flashar_adapt.shards import STATE, ShardDataset
from flashar_adapt.tokenizers import load_tokenizer
from tests import tiny
from tests.train_helpers import llamagen_run

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
PIL = pytest.importorskip("PIL.Image")
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}

# What a case may pass: the thing to work on (a file, a folder, a recipe, where to write), and
# for tokenize --from-model how many examples (it has no default). Never a tuning option.
WHAT_TO_WORK_ON = {"--out", "--config", "--recipe", "--export", "--model", "--from-model", "--num-samples", "--ref"}


def images(root: Path, per_class: tuple[int, ...], seed: int = 0, size=(28, 28)) -> dict[Path, torch.Tensor]:
    """Random 8-bit greyscale PNGs, one sub-folder per class; returns each as float [1, H, W]."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for c, n in enumerate(per_class):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
        for k in range(n):
            x = torch.randint(0, 256, (size[1], size[0]), generator=g, dtype=torch.uint8)
            p = root / f"class{c}" / f"{k:03d}.png"
            PIL.fromarray(x.numpy(), "L").save(p)
            out[p] = x[None].float() / 255
    return out


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("defaults")
    tiny.gpt2().save_pretrained(root / "my-gpt2", safe_serialization=True)
    # its recipe, as docs/writing-a-recipe.md makes it: inspect's draft with the token layout filled in
    assert main(["inspect", str(root / "my-gpt2"), "--out", str(root / "draft.yaml")]) == 0
    draft = yaml.safe_load((root / "draft.yaml").read_text())
    draft["name"] = "my-gpt2"
    draft["condition"].update(prefix_len=16, pad_id=0)
    draft["image"].update(codebook_size=64, visual_token_offset=100, grid=[3, 4], variable_grid=True, before=[190])
    (root / "recipes").mkdir()
    (root / "recipes" / "my-gpt2.yaml").write_text(yaml.safe_dump(draft, sort_keys=False))
    run = llamagen_run(root / "proj", stage1=2, stage2=0)
    model = fa.patch(tiny.llamagen(grid=14, vocab=256, n_layer=2, dim=32), "fmnist-c2i")
    tiny.randomize(model.flashar, 1)
    export = fa.export_merged(model, root / "export")
    images(root / "imgs12", (5, 4, 3))  # 12 images, far fewer than the default --shard-size
    return {"root": root, "run": run, "export": export, "model": model}


def _cases(d: dict, tmp: Path) -> dict[str, list[list[str]]]:
    """argv per command (several for a command with several modes)."""
    return {
        "recipes": [["recipes"]],
        "show": [["show", "llamagen-c2i-b"]],
        "inspect": [["inspect", str(d["root"] / "my-gpt2")]],
        "check": [["check", str(d["root"] / "my-gpt2")]],  # the recipe found by auto-match
        "train": [["train", "--config", str(d["run"])]],
        "export": [["export", "--config", str(d["run"]), "--out", str(tmp / "exp")]],
        "tokenize": [
            ["tokenize", str(d["root"] / "imgs12"), "--out", str(tmp / "shards"), "--recipe", "fmnist-c2i"],
            [
                "tokenize",
                "--from-model",
                "--model",
                str(d["export"] / "backbone" / "llamagen.pt"),
                "--recipe",
                "fmnist-c2i",
                "--out",
                str(tmp / "sampled"),
                "--num-samples",
                "3",
            ],
        ],
        "generate": [["generate", "--export", str(d["export"]), "--out", str(tmp / "gen")]],
        "sample": [["sample", "--export", str(d["export"]), "--out", str(tmp / "samples")]],
        # the samples against themselves (the reference need only be images); then both modes of the export
        "evaluate": [
            ["evaluate", str(tmp / "samples"), "--ref", str(tmp / "samples" / "samples.npz")],
            [
                "evaluate",
                "--export",
                str(d["export"]),
                "--ref",
                str(tmp / "samples" / "samples.npz"),
                "--out",
                str(tmp / "eval"),
            ],
        ],
        "demo": [["demo"]],  # the full demo: run in test_demo_at_its_defaults_starts_and_draws (slow)
    }


def test_every_command_has_a_case_at_its_defaults(data, tmp_path):
    assert set(_cases(data, tmp_path)) == set(subcommands()), "a new command needs a case here"
    for argv_list in _cases(data, tmp_path).values():
        for argv in argv_list:
            options = {a for a in argv if a.startswith("--")}
            assert options <= WHAT_TO_WORK_ON, (argv, options - WHAT_TO_WORK_ON)


# train before export: export reads the run that train finished
ORDER = ["recipes", "show", "inspect", "check", "train", "export", "tokenize", "generate", "sample", "evaluate"]


def test_every_command_runs_at_its_defaults(data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FLASHAR_RECIPE_PATH", str(data["root"] / "recipes"))
    cases = _cases(data, tmp_path)
    assert set(ORDER) | {"demo"} == set(cases)
    for name in ORDER:
        for argv in cases[name]:
            rc = main(argv)
            out, err = capsys.readouterr()
            assert rc == 0, (argv, out[-2000:], err[-2000:])
            assert "Traceback" not in err
    # what each wrote is whole
    assert (tmp_path / "exp" / "flashar_config.json").is_file()
    assert json.loads((tmp_path / "shards" / "classes.json").read_text()) == ["class0", "class1", "class2"]
    assert ShardDataset(tmp_path / "shards").manifest["num_examples"] == 12
    assert len(ShardDataset(tmp_path / "sampled")) == 3
    assert len(list((tmp_path / "gen" / "images").iterdir())) == 10  # every class, once
    assert (tmp_path / "gen" / "grid.png").is_file()
    assert json.loads((tmp_path / "samples" / "manifest.json").read_text())["num_samples"] == 10  # one per class
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["modes"].keys() == {"raster", "two_way"}


@pytest.mark.slow
def test_demo_at_its_defaults_starts_and_draws(tmp_path):
    """``flashar-adapt demo`` with nothing else: the shipped models load and the sample grid is
    drawn (the speed and quality measurements after it take many minutes on a CPU; the process
    is stopped once the PNG is written)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "flashar_adapt.commands", "demo"],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    png = tmp_path / "out" / "demo" / "fmnist_samples.png"
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None and not png.is_file():
            time.sleep(0.5)
        assert png.is_file(), proc.communicate(timeout=5) if proc.poll() is not None else "no PNG in 600 s"
        assert PIL.open(png).size[0] > 100
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


# ---------------------------------------------------------------- size edges

SHARD = 4


@pytest.mark.parametrize("n", [0, 1, SHARD - 1, SHARD, SHARD + 1, 2 * SHARD + 1])
@pytest.mark.parametrize("batch", [SHARD - 1, SHARD, SHARD + 1])
def test_tokenize_size_edges(tmp_path, capsys, n, batch):
    want = images(tmp_path / "imgs", (n,)) if n else {}
    if n == 0:
        (tmp_path / "imgs" / "class0").mkdir(parents=True)
    out = tmp_path / "shards"
    argv = ["tokenize", str(tmp_path / "imgs"), "--out", str(out), "--recipe", "fmnist-c2i", "--no-progress"]
    rc = main([*argv, "--shard-size", str(SHARD), "--batch-size", str(batch)])
    if n == 0:
        assert rc == 2 and "no images" in capsys.readouterr().err
        assert not out.exists()
        return
    assert rc == 0, capsys.readouterr().err
    m = json.loads((out / "manifest.json").read_text())
    assert [s["num_examples"] for s in m["shards"]] == [SHARD] * (n // SHARD) + ([n % SHARD] if n % SHARD else [])
    ds = ShardDataset(out)
    b = ds.get(torch.arange(len(ds)))
    tok = load_tokenizer("fmnist-c2i")
    assert torch.equal(b.codes, tok.encode(torch.stack([want[p] for p in sorted(want)])))
    assert not (out / STATE).exists() and (out / "classes.json").is_file()


def test_tokenize_with_no_usable_image_writes_no_data_folder_and_can_be_run_again(tmp_path, capsys):
    images(tmp_path / "imgs", (2,), size=(14, 14))  # smaller than the tokenizer's input
    out = tmp_path / "shards"
    argv = ["tokenize", str(tmp_path / "imgs"), "--out", str(out), "--recipe", "fmnist-c2i", "--no-progress"]
    assert main(argv) == 2 and "none of the 2 images could be used" in capsys.readouterr().err
    assert not (out / "manifest.json").exists()
    assert main([*argv, "--allow-upscale"]) == 0  # other settings: nothing was written, so it starts over
    assert len(ShardDataset(out)) == 2
    argv[3] = str(tmp_path / "again")
    assert main(argv) == 2
    for p in (tmp_path / "imgs" / "class0").iterdir():  # fixed in place: the same command goes on
        PIL.fromarray(torch.zeros(28, 28, dtype=torch.uint8).numpy(), "L").save(p)
    assert main(argv) == 0, capsys.readouterr().err
    assert len(ShardDataset(tmp_path / "again")) == 2


@pytest.fixture(scope="module")
def c2i():
    return fa.patch(tiny.llamagen(grid=4), tiny.llamagen_recipe())


@pytest.mark.parametrize("n", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("batch", [2, 3, 4])
def test_from_model_size_edges(c2i, tmp_path, n, batch):
    """Shards of 3 sampled in batches around it: the examples are those of sampling each batch
    on its own (shard boundaries change nothing), every condition once, in turn."""
    s = TeacherSampling(top_k=5)
    conds = uniform_classes(n, 10)
    rep = sample_dataset(c2i, conds, tmp_path / "d", sampling=s, seed=2, batch_size=batch, shard_size=3, progress=False)
    assert rep["num_examples"] == n
    ds = ShardDataset(tmp_path / "d")
    assert ds.sizes == [3] * (n // 3) + ([n % 3] if n % 3 else [])
    got = ds.get(torch.arange(n))
    want = torch.cat(
        [sample_batch(c2i, conds[i : i + batch], b, seed=2, sampling=s)[0] for b, i in enumerate(range(0, n, batch))]
    )
    assert torch.equal(got.codes, want) and got.cond.tolist() == conds


def test_from_model_zero_samples_is_a_usage_error(data, tmp_path, capsys):
    ckpt = str(data["export"] / "backbone" / "llamagen.pt")
    argv = ["tokenize", "--from-model", "--model", ckpt, "--recipe", "fmnist-c2i", "--out", str(tmp_path / "d")]
    with pytest.raises(SystemExit) as e:
        main([*argv, "--num-samples", "0"])
    assert e.value.code == 2 and "--num-samples" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_generate_batch_edges(data, tmp_path, n):
    """Batches of 3 around n images: every condition once, in order, a PNG and a grid cell each;
    the first batch's codes do not depend on how many follow."""
    conds = list(range(n))
    out = tmp_path / "gen"
    generate_to_folder(data["model"], conds, out, tok=load_tokenizer("fmnist-c2i"), batch_size=3, top_k=1)
    codes = load_file(str(out / "codes.safetensors"))["codes"]
    assert codes.shape == (n, 14, 14)
    meta = json.loads((out / "generate.json").read_text())
    assert meta["conditions"] == [str(c) for c in conds]
    assert [b["images"] for b in meta["batches"]] == [3] * (n // 3) + ([n % 3] if n % 3 else [])
    assert len(list((out / "images").iterdir())) == n
    first = data["model"].generate(torch.tensor(conds[:3]), top_k=1, generator=torch.Generator().manual_seed(0))
    assert torch.equal(codes[: min(3, n)], first.to(codes.dtype))
