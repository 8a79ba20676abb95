"""``flashar-adapt sample``: N samples into a folder, the same files whatever the number of
processes (1 vs 2, threads and torchrun) or the batch size, resumable after a kill -9, with
the ADM ``.npz`` layout and a manifest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import flashar_adapt as fa
from flashar_adapt.commands import main
from flashar_adapt.npz_images import NpzImages
from flashar_adapt.sample_sets import Processes, SampleSetError, sample_set
from flashar_adapt.tokenizers import tokenizer_of
from tests import tiny
from tests.kill_switch import kill_cli_when

PIL = pytest.importorskip("PIL.Image")
ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A tiny random LlamaGen under the Fashion-MNIST recipe (the shipped tokenizer decodes it)."""
    model = fa.patch(tiny.llamagen(grid=14, vocab=256, n_layer=3, dim=32), "fmnist-c2i")
    tiny.randomize(model.flashar, 1)
    return fa.export_merged(model, tmp_path_factory.mktemp("exp") / "export")


@pytest.fixture(scope="module")
def model64(export_dir):
    """In float64: the round-off of batched products (which a batch size changes) is ~1e-16 of
    the logits, so a code flips between batch sizes only for a uniform within ~1e-16 of a
    boundary of its cumulative distribution; never, in practice."""
    return fa.load_adapted(export_dir).double()


def _files(folder: Path) -> dict[str, bytes]:
    """The sample files (images, codes, .npz) by name; run records and timings left out."""
    names = ["codes.safetensors", "samples.npz"] + [f"images/{p.name}" for p in (folder / "images").iterdir()]
    return {n: (folder / n).read_bytes() for n in sorted(names) if not Path(n).name.startswith(".")}


def _in_threads(world: int, fn) -> list:
    """``fn(procs)`` for every rank of ``world``, each in a thread, sharing a barrier: the
    processes of a launch, in one process."""
    barrier = threading.Barrier(world, timeout=300)
    out, errors = [None] * world, []

    def run(r):
        try:
            out[r] = fn(Processes(r, world, barrier.wait))
        except BaseException as e:  # noqa: BLE001 - re-raised below in the test's thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return out


@pytest.mark.parametrize("n", [1, 2, 3, 4])  # batch 3: 1, batch-1, batch, batch+1
def test_same_samples_for_any_batch_size_and_number_of_processes(model64, tmp_path, n):
    kw = dict(tok=tokenizer_of(model64), cfg_scale=2.0, top_k=40, seed=3, progress=False, num_samples=n)
    conds = list(range(10))
    one_by_one = sample_set(model64, conds, tmp_path / "b1", batch_size=1, **kw)
    alone = sample_set(model64, conds, tmp_path / "w1", batch_size=3, **kw)
    two = _in_threads(2, lambda procs: sample_set(model64, conds, tmp_path / "w2", batch_size=3, procs=procs, **kw))
    assert two[1] is None and two[0]["processes"] == 2 and alone["processes"] == 1
    assert _files(tmp_path / "w1") == _files(tmp_path / "w2")  # byte for byte
    codes = {d: load_file(str(tmp_path / d / "codes.safetensors")) for d in ("b1", "w1")}
    assert torch.equal(codes["b1"]["codes"], codes["w1"]["codes"]) and codes["w1"]["codes"].shape == (n, 14, 14)
    assert codes["w1"]["cond"].tolist() == conds[:n]
    assert one_by_one["num_samples"] == n and len(list((tmp_path / "b1" / "parts").iterdir())) == n


def test_sample_is_independent_of_the_other_samples(model64, tmp_path):
    """Sample i of a run of 4 is sample i of a run of 2: a run's first samples are a shorter run."""
    kw = dict(tok=None, temperature=1.2, seed=9, progress=False, batch_size=3)
    sample_set(model64, [4, 7], tmp_path / "four", num_samples=4, **kw)
    sample_set(model64, [4, 7], tmp_path / "two", num_samples=2, **kw)
    four, two = (load_file(str(tmp_path / d / "codes.safetensors"))["codes"] for d in ("four", "two"))
    assert torch.equal(four[:2], two) and four[2:].tolist() != four[:2].tolist()
    assert not (tmp_path / "four" / "images").exists()  # no tokenizer: codes only


def test_npz_is_the_adm_layout_and_matches_the_pngs(export_dir, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sample", "--export", str(export_dir), "--out", str(out), "--num-samples", "5", "--no-progress"]) == 0
    assert "5 samples (two_way, 1 process(es)" in capsys.readouterr().out
    with np.load(out / "samples.npz") as z:
        assert sorted(z.files) == ["arr_0", "arr_1"]  # never "mu": ADM would read it as statistics
        arr, labels = z["arr_0"], z["arr_1"]
    assert arr.dtype == np.uint8 and arr.shape == (5, 28, 28, 3) and labels.tolist() == [0, 1, 2, 3, 4]
    for i in range(5):
        png = np.asarray(PIL.open(out / "images" / f"{i:06d}.png"))
        assert png.shape == (28, 28) and (arr[i] == png[..., None]).all()  # greyscale, replicated
    streamed = np.concatenate(list(NpzImages(out / "samples.npz").batches(2)))
    assert np.array_equal(streamed, arr)
    m = json.loads((out / "manifest.json").read_text())
    assert m["num_samples"] == 5 and m["mode"] == "two_way" and m["seed"] == 0 and m["model"]["export"]
    assert m["sampling"]["cfg_scale"] == 1.0 and m["files"]["npz"] == "samples.npz" and m["model_seconds"] > 0
    codes = load_file(str(out / "codes.safetensors"))["codes"]
    model = fa.load_adapted(export_dir)
    decoded = fa.decode_images(model, codes[:1].long())[0, 0].mul(255).round().byte()
    assert torch.equal(decoded, torch.from_numpy(arr[0, ..., 0]))


def test_only_required_arguments_and_the_size_edges_of_the_cli(export_dir, tmp_path, capsys):
    out = tmp_path / "d"
    assert main(["sample", "--export", str(export_dir), "--out", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["num_samples"] == 10  # one per class
    # the same command again: nothing to do, nothing rewritten
    before = _files(out)
    assert main(["sample", "--export", str(export_dir), "--out", str(out), "--no-progress"]) == 0
    assert _files(out) == before
    capsys.readouterr()
    for bad, msg in (
        ("0", "--num-samples: must be an integer in [1, 1000000000], got 0"),
        ("x", "expected an integer"),
    ):
        with pytest.raises(SystemExit) as e:
            main(["sample", "--export", str(export_dir), "--out", str(tmp_path / "z"), "--num-samples", bad])
        assert e.value.code == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "z").exists()


def test_a_folder_of_another_run_or_of_other_files_is_refused(export_dir, tmp_path, capsys):
    base = ["sample", "--export", str(export_dir), "--num-samples", "2", "--no-progress"]
    assert main([*base, "--out", str(tmp_path / "a")]) == 0
    assert main([*base, "--out", str(tmp_path / "a"), "--cfg", "2"]) == 2
    assert "holds a sample run with other sampling" in capsys.readouterr().err
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main([*base, "--out", str(tmp_path / "mine")]) == 2
    assert "not empty and not a sample folder" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]
    for extra, msg in (
        (["--seed", str(2**32)], "--seed: must be an integer in [0, 4294967295]"),
        (["--classes", "10"], "outside 0..9"),
    ):
        try:
            rc = main([*base, "--out", str(tmp_path / "b"), *extra])
        except SystemExit as e:  # refused by the parser, before anything is loaded
            rc = e.code
        assert rc == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    model = fa.load_adapted(export_dir)
    with pytest.raises(SampleSetError, match="integers >= 1"):
        sample_set(model, [1], tmp_path / "c", num_samples=0)
    with pytest.raises(SampleSetError, match="no conditions"):
        sample_set(model, [], tmp_path / "c")


@pytest.mark.slow
def test_sigkill_mid_run_then_the_same_command_finishes_the_same_files(export_dir, tmp_path):
    argv = ["sample", "--export", str(export_dir), "--num-samples", "9", "--batch-size", "2", "--cfg", "2"]
    argv += ["--top-k", "30", "--no-progress"]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert (
        subprocess.run([sys.executable, "-m", "flashar_adapt.commands", *argv, "--out", str(ref)], env=ENV).returncode
        == 0
    )
    parts = out / "parts"
    # every PNG write sleeps: the kill lands while a batch's images are half written
    kill_cli_when(
        [*argv, "--out", str(out)],
        lambda: parts.is_dir() and len(list(parts.glob("*.safetensors"))) >= 2,
        slow="flashar_adapt.sample_sets.atomic_write_bytes",
    )
    done = sorted(p.name for p in parts.glob("*.safetensors"))
    assert 2 <= len(done) < 5 and not (out / "manifest.json").exists()
    r = subprocess.run([sys.executable, "-m", "flashar_adapt.commands", *argv, "--out", str(out)], env=ENV)
    assert r.returncode == 0
    assert _files(out) == _files(ref)


@pytest.mark.slow
def test_two_processes_under_torchrun_write_the_files_of_one(export_dir, tmp_path):
    argv = ["sample", "--export", str(export_dir), "--num-samples", "7", "--batch-size", "2", "--cfg", "2"]
    argv += ["--top-k", "30", "--no-progress"]
    one = subprocess.run(
        [sys.executable, "-m", "flashar_adapt.commands", *argv, "--out", str(tmp_path / "one")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        + ["-m", "flashar_adapt.commands", *argv, "--out", str(tmp_path / "two")],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert "7 samples (two_way, 2 process(es)" in two.stdout
    assert _files(tmp_path / "one") == _files(tmp_path / "two")
    m = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert m["processes"] == 2 and len(list((tmp_path / "two" / "parts").iterdir())) == 4


def test_prompt_samples_are_padded_to_the_prefix_not_to_their_batchmates(tmp_path):
    """Prompts of different lengths in one batch: each sample equals its prompt sampled alone."""
    recipe = tiny.hf_llama_recipe(codebook=40, offset=100, grid=(3, 4))
    model = fa.patch(tiny.hf_llama(), recipe).double()
    text = lambda p: [5 + len(w) for w in p.split()]  # noqa: E731 - one id per word
    prompts = ["a red car", "a very long blue sky at noon", "x"]
    kw = dict(text=text, cfg_scale=3.0, seed=1, progress=False)
    sample_set(model, prompts, tmp_path / "all", batch_size=3, **kw)
    together = load_file(str(tmp_path / "all" / "codes.safetensors"))["codes"]
    for i in range(3):
        sample_set(model, prompts, tmp_path / f"p{i}", batch_size=1, num_samples=i + 1, **kw)
        assert torch.equal(load_file(str(tmp_path / f"p{i}" / "codes.safetensors"))["codes"][i], together[i])
