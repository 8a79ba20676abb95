"""A new user's first hour (issue 29): loaders never guess a size, the shipped configs made
the shipped models, every wait prints a line (compiling, training, sampling, the demo), grids
are labelled by class name, the doctor counts the fused branch block's steps."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

import flashar_adapt as fa
from flashar_adapt.commands import main
from flashar_adapt.doctor import PASS
from flashar_adapt.fmnist import ASSETS
from flashar_adapt.fmnist import build as fbuild
from flashar_adapt.fmnist.base import base_args
from flashar_adapt.fmnist.config import CONFIGS, post_training_config, read_config, write_post_training_config
from flashar_adapt.fmnist.main import print_speed
from flashar_adapt.formats import FormatError
from flashar_adapt.generation import generate_codes
from flashar_adapt.inspection import load_model
from flashar_adapt.integrations.llamagen import find_multiple, infer_model_args
from flashar_adapt.shards import ShardDataset
from flashar_adapt.training import train
from tests import tiny
from tests.test_compile import static_path_uncompiled
from tests.train_helpers import llamagen_run

BASE = ASSETS / "base.safetensors"
pytestmark = pytest.mark.usefixtures("one_thread")


def _run(argv, capsys) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _sample(src: list, out: Path, capsys) -> torch.Tensor:
    """Two raster teacher samples of the shipped base, loaded as ``src`` says."""
    rc, _, err = _run(
        ["tokenize", "--from-model", *src, "--num-samples", 2, "--batch-size", 2, "--top-k", 5, "--out", out],
        capsys,
    )
    assert rc == 0, err
    return ShardDataset(out).get(torch.arange(2)).codes


# ---------------------------------------------------------------- sizes are never guessed


def test_shipped_base_by_model_gives_the_config_codes_and_without_its_sizes_is_refused(tmp_path, capsys):
    cfg = write_post_training_config(tmp_path / "cfg.yaml", tmp_path / "data", tmp_path / "run")
    by_config = _sample(["--config", cfg], tmp_path / "a", capsys)
    by_model = _sample(["--model", BASE, "--recipe", "fmnist-c2i"], tmp_path / "b", capsys)
    assert torch.equal(by_model, by_config)  # model_args.json beside the weights: the same model

    bare = tmp_path / "bare" / "base.safetensors"  # the weights alone: the head count is nowhere
    bare.parent.mkdir()
    shutil.copy(BASE, bare)
    rc, _, err = _run(
        [
            "tokenize",
            "--from-model",
            "--model",
            bare,
            "--recipe",
            "fmnist-c2i",
            "--num-samples",
            1,
            "--out",
            tmp_path / "c",
        ],
        capsys,
    )
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--set n_head=N" in err, err
    assert not (tmp_path / "c").exists()
    sized = ["--set", "n_head=4", "--set", "block_size=196"]
    assert torch.equal(_sample(["--model", bare, "--recipe", "fmnist-c2i", *sized], tmp_path / "d", capsys), by_config)
    # the head count alone leaves the grid at 16x16: refused at patch, naming the key and the fix
    rc, _, err = _run(
        [
            "generate",
            "--model",
            bare,
            "--recipe",
            "fmnist-c2i",
            "--mode",
            "raster",
            "--set",
            "n_head=4",
            "--out",
            tmp_path / "e",
        ],
        capsys,
    )
    assert rc == 2 and "image.grid" in err and "--set block_size=196" in err, err


def test_a_size_that_contradicts_the_weights_names_the_key(tmp_path, capsys):
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(BASE, folder / "base.safetensors")
    for key, bad, named in (("multiple_of", 64, "multiple_of"), ("dim", 64, "dim"), ("n_head", 3, "n_head")):
        args = json.loads((ASSETS / "model_args.json").read_text())
        (folder / "model_args.json").write_text(json.dumps({**args, key: bad}))
        with pytest.raises(FormatError, match=named):
            load_model(folder / "base.safetensors")
    (folder / "model_args.json").write_text(json.dumps({"dim": 128, "n_heads": 4}))
    with pytest.raises(FormatError, match="'n_heads' is not a LlamaGen ModelArgs field"):
        load_model(folder / "base.safetensors")
    # a training config whose sizes do not fit its checkpoint: one line, exit 2, the key named
    cfg = post_training_config(tmp_path / "data", tmp_path / "run", changes={"model.config": {"n_layer": 3}})
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    rc, _, err = _run(
        ["tokenize", "--from-model", "--config", tmp_path / "cfg.yaml", "--num-samples", 1, "--out", tmp_path / "x"],
        capsys,
    )
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "n_layer=3" in err and "Traceback" not in err, err


def test_official_sizes_give_the_head_count_and_set_wins():
    """GPT-B's shapes (12 layers of width 768, FFN rounded to 256), as empty tensors."""
    sd = {
        "tok_embeddings.weight": torch.empty(64, 768),
        "layers.11.attention_norm.weight": torch.empty(768),
        "layers.0.attention.wqkv.weight": torch.empty(3 * 768, 768),
        "layers.0.feed_forward.w1.weight": torch.empty(find_multiple(int(2 * 4 * 768 / 3), 256), 768),
        "cls_embedding.embedding_table.weight": torch.empty(5, 768),
    }
    args = infer_model_args(sd)
    assert (args.n_head, args.n_kv_head, args.multiple_of, args.block_size) == (12, 12, 256, 256)  # at 256 px
    assert (args.num_classes, args.vocab_size) == (4, 64)
    assert infer_model_args(sd, n_head=6).n_head == 6
    with pytest.raises(FormatError, match="--set n_head=N"):
        infer_model_args({**sd, "layers.12.attention_norm.weight": torch.empty(768)})  # 13 layers: no official size


def test_set_belongs_to_a_model_loaded_by_path(capsys):
    export = ASSETS / "flashar"
    rc, _, err = _run(["generate", "--export", export, "--set", "n_head=4", "--out", "never"], capsys)
    assert rc == 2 and "--set gives sizes for a checkpoint loaded with --model" in err


# ---------------------------------------------------------------- the shipped configs


def test_the_build_reads_the_shipped_configs():
    post = read_config("flashar")
    assert (fbuild.STAGE1_STEPS, fbuild.STAGE2_STEPS, fbuild.POST_BATCH, fbuild.W_KD_FUSED) == (
        post["stage1"]["steps"],
        post["stage2"]["steps"],
        post["batch_size"],
        post["w_kd_fused"],
    )
    args = json.loads((ASSETS / "model_args.json").read_text())
    assert vars(base_args()) == args  # the shipped weights' sizes are configs/base.yaml's
    assert (CONFIGS / post["model"]["checkpoint"]).resolve() == BASE.resolve()
    info = json.loads((ASSETS / "info.json").read_text())["flashar"]
    assert (info["stage1_steps"], info["batch"], info["w_kd_fused"]) == (fbuild.STAGE1_STEPS, 32, 3.0)


def test_post_config_is_the_shipped_file_with_the_variant_and_paths(tmp_path):
    path = fbuild.post_config(tmp_path, "v", lora=False, fixed_gate=0.5)
    got = yaml.safe_load(path.read_text())
    want = read_config("flashar")
    assert got["model"]["checkpoint"] == str(BASE.resolve()) and got["data"] == str(tmp_path / "shards")
    assert got["stage2"] == {**want["stage2"], "lora": False} and got["fixed_gate"] == 0.5
    for key in ("recipe", "stage1", "w_kd_fused", "batch_size", "seed"):
        assert got[key] == want[key]


def test_written_config_is_relative_to_itself_and_refuses_to_overwrite(tmp_path):
    out = write_post_training_config(tmp_path / "cfg.yaml", tmp_path / "data", tmp_path / "run", {"stage2.steps": 7})
    cfg = yaml.safe_load(out.read_text())
    assert (cfg["data"], cfg["out_dir"], cfg["stage2"]["steps"]) == ("data", "run", 7)
    assert fa.TrainConfig.load(out).data == str(tmp_path / "data")
    write_post_training_config(tmp_path / "cfg.yaml", tmp_path / "data", tmp_path / "run", {"stage2.steps": 7})
    with pytest.raises(fa.FlashARError, match="exists with other content"):
        write_post_training_config(tmp_path / "cfg.yaml", tmp_path / "other", tmp_path / "run")


# ---------------------------------------------------------------- feedback while waiting


@pytest.fixture
def c2i():
    model = tiny.llamagen(grid=3, seed=0)
    fa.patch(model, tiny.llamagen_recipe(grid=3))
    tiny.randomize(model.flashar, seed=11)
    return model


def test_compiling_prints_a_start_and_an_end_line_once_per_shape(c2i, capsys):
    cond = torch.tensor([3, 7])
    with static_path_uncompiled():
        c2i.generate(cond, compile=True)
        err = capsys.readouterr().err
        assert "compiling two_way decoding of a batch of 2 at 3x3" in err and "new graph(s)" in err
        assert "compiled" in err.splitlines()[-1] and " s (later calls reuse them)" in err
        c2i.generate(cond, compile=True)
        assert capsys.readouterr().err == ""  # the same shapes: nothing to compile, nothing said
        c2i.generate(cond, compile=True, mode="raster")
        assert "compiling raster decoding" in capsys.readouterr().err


@pytest.mark.parametrize("kw", [dict(top_k=5, temperature=1.5, cfg_scale=2.0), dict(top_p=0.9), dict(top_k=1)])
def test_a_short_last_batch_is_padded_to_the_compiled_size_with_the_same_codes(c2i, kw):
    conds, logs = [1, 2, 3, 4, 5, 6, 7], []
    eager, _ = generate_codes(c2i, conds, batch_size=3, progress=False, log=lambda m: None, seed=3, **kw)
    with static_path_uncompiled():
        padded, timings = generate_codes(
            c2i, conds, batch_size=3, progress=False, log=logs.append, seed=3, compile=True, **kw
        )
    assert torch.equal(padded, eager)
    assert "1 images (padded to 3: the compiled size)" in logs[-1] and timings[-1]["images"] == 1


def test_train_says_where_it_resumes_and_sums_up_at_the_end(tmp_path, capsys):
    cfg = llamagen_run(tmp_path, stage1=2, stage2=1)
    train(cfg, progress=False)
    out = capsys.readouterr().out
    assert "train: done, 3 steps (3 in this run)" in out and "gate mean 0." in out
    assert f"checkpoint {tmp_path / 'run' / 'checkpoint.pt'}" in out
    assert f"next: flashar-adapt export --config {cfg} --out EXPORT_DIR" in out
    train(cfg, progress=False)
    assert "is complete (3/3 steps), nothing to train" in capsys.readouterr().out
    more = llamagen_run(tmp_path, stage1=2, stage2=2)
    with pytest.warns(UserWarning, match="changed config"):
        train(more, progress=False, allow_config_change=True)
    out = capsys.readouterr().out
    assert "resuming" in out and "at step 3/4 (stage 2)" in out and "4 steps (1 in this run)" in out


def test_demo_flags_timings_of_a_busy_machine(capsys):
    quiet = {
        "raster": {"latency_s": 1.0, "throughput": 10.0, "spread": 1.05},
        "two_way": {"latency_s": 0.2, "throughput": 15.0, "spread": 1.1},
    }
    print_speed(quiet)
    assert "NOT a measurement" not in capsys.readouterr().out
    print_speed({**quiet, "raster": {**quiet["raster"], "spread": 1.6}})
    out = capsys.readouterr().out
    assert "NOT a measurement" in out and "differ by up to 1.60x" in out


# ---------------------------------------------------------------- labels and the doctor


def test_generated_grid_and_files_carry_the_class_names(tmp_path, capsys):
    rc, _, err = _run(
        ["generate", "--export", ASSETS / "flashar", "--out", tmp_path / "s", "--classes", 3, 9, "--no-progress"],
        capsys,
    )
    assert rc == 0, err
    meta = json.loads((tmp_path / "s" / "generate.json").read_text())
    assert meta["labels"] == ["Dress", "Boot"] and meta["conditions"] == ["3", "9"]
    assert sorted(p.name for p in (tmp_path / "s" / "images").iterdir()) == ["00000_Dress.png", "00001_Boot.png"]


def test_doctor_counts_the_steps_of_a_branch_at_layer_zero():
    model = tiny.llamagen(grid=4, n_layer=2)
    rep = fa.check(model, tiny.llamagen_recipe(grid=4, **{"flashar.branch_layer": 0}))
    steps = next(i for i in rep.items if i.name == "steps")
    assert steps.status == PASS and steps.detail.startswith("7 backbone steps"), str(rep)
