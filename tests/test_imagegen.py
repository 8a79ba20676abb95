"""``flashar-adapt tokenize`` (image folder / JSONL -> shards, resumable, bad images listed) and
``flashar-adapt generate`` (model -> PNG files, a labelled grid, codes), on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import flashar_adapt as fa
from flashar_adapt.commands import main
from flashar_adapt.image_folders import list_class_folder, read_jsonl, to_pil, tokenize_dataset
from flashar_adapt.shards import STATE, DataError, ShardDataset
from flashar_adapt.tokenizers import load_tokenizer
from tests import tiny
from tests.kill_switch import kill_tokenize_mid_run

PIL = pytest.importorskip("PIL.Image")


def _png(path: Path, seed: int, size=(28, 28), mode="L") -> torch.Tensor:
    """A random greyscale image saved losslessly; returns it as float [1, H, W] in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (size[1], size[0]), generator=g, dtype=torch.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.fromarray(x.numpy(), mode).save(path)
    return x[None].float() / 255


def _folder(root: Path, per_class=(4, 3, 5), bad=True) -> dict:
    """Class folders of random 28x28 PNGs, plus one bad image of each kind."""
    want = {}
    for c, n in enumerate(per_class):
        for k in range(n):
            p = root / f"class{c}" / f"{k:03d}.png"
            want[p] = (_png(p, 100 * c + k), c)
    if bad:
        (root / "class0" / "broken.png").write_bytes(b"not a png at all")
        PIL.fromarray(torch.zeros(28, 28).numpy().astype("float32"), "F").save(root / "class1" / "float.tif")
        _png(root / "class2" / "small.png", 7, size=(20, 20))
    return want


def _read(out: Path):
    ds = ShardDataset(out)
    b = ds.get(torch.arange(len(ds)))
    return b.codes, b.cond


# ---------------------------------------------------------------- tokenize


def test_tokenize_class_folder_equals_encoding_the_images_directly(tmp_path):
    want = _folder(tmp_path / "imgs")
    out = tmp_path / "shards"
    rc = main(
        [
            "tokenize",
            str(tmp_path / "imgs"),
            "--out",
            str(out),
            "--recipe",
            "fmnist-c2i",
            "--shard-size",
            "5",
            "--batch-size",
            "2",
            "--no-progress",
        ]
    )
    assert rc == 0
    codes, cond = _read(out)
    tok = load_tokenizer("fmnist-c2i")
    paths = sorted(want)  # class folders in order, files sorted within each
    assert torch.equal(codes, tok.encode(torch.stack([want[p][0] for p in paths])))
    assert cond.tolist() == [want[p][1] for p in paths]
    m = json.loads((out / "manifest.json").read_text())
    assert [s["num_examples"] for s in m["shards"]] == [5, 5, 2] and m["recipe"] == "fmnist-c2i"
    rep = json.loads((out / "tokenize_report.json").read_text())
    reasons = {Path(p).name: why for p, why in rep["bad"]}
    assert rep["num_bad"] == 3 and set(reasons) == {"broken.png", "float.tif", "small.png"}
    assert "unreadable" in reasons["broken.png"] and "wrong mode 'F'" in reasons["float.tif"]
    assert "too small (20x20" in reasons["small.png"]
    assert json.loads((out / "classes.json").read_text()) == ["class0", "class1", "class2"]
    assert not (out / STATE).exists()
    # a finished folder is never overwritten
    assert main(["tokenize", str(tmp_path / "imgs"), "--out", str(out), "--recipe", "fmnist-c2i", "--no-progress"]) == 2
    assert torch.equal(_read(out)[0], codes)


def test_upscaling_and_centre_crop(tmp_path):
    tok = load_tokenizer("fmnist-c2i")
    p = tmp_path / "a" / "wide.png"
    x = _png(p, 3, size=(56, 28))  # twice as wide: no scaling, the middle 28 columns are kept
    from flashar_adapt.image_folders import BadImage, load_image

    assert torch.equal(load_image(p, tok), x[:, :, 14:42])
    _png(p, 3, size=(14, 14))
    with pytest.raises(BadImage, match="too small"):
        load_image(p, tok)
    assert load_image(p, tok, allow_upscale=True).shape == (1, 28, 28)


@pytest.mark.parametrize(
    "orientation,turn", [(1, lambda x: x), (3, lambda x: x.rot90(2, (1, 2))), (6, None), (8, None)]
)
def test_exif_orientation_is_applied_when_reading(tmp_path, orientation, turn):
    """A camera stores the pixels as shot and the turn in EXIF (274): the image is read upright."""
    from flashar_adapt.image_folders import load_image

    tok = load_tokenizer("fmnist-c2i")
    g = torch.Generator().manual_seed(orientation)
    x = torch.randint(0, 256, (28, 28), generator=g, dtype=torch.uint8)
    exif = PIL.Exif()
    exif[274] = orientation
    PIL.fromarray(x.numpy(), "L").save(tmp_path / "cam.png", exif=exif.tobytes())
    want = x[None].float() / 255
    # 6: shown turned 90 degrees clockwise; 8: 90 degrees counter-clockwise
    turn = turn or (lambda t: t.rot90(-1 if orientation == 6 else 1, (1, 2)))
    assert torch.equal(load_image(tmp_path / "cam.png", tok), turn(want))


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("fail_at,shard", [(1, 2), (3, 2), (4, 3), (6, 4)])
def test_tokenize_resumes_after_a_failure_without_duplicates_or_losses(tmp_path, fail_at, shard):
    """An injected failure at encode call ``fail_at``; the same call again finishes the job, and
    the folder equals one written without interruption (same examples, order, bad list)."""
    _folder(tmp_path / "imgs", per_class=(5, 4, 4))
    items, _ = list_class_folder(tmp_path / "imgs")
    recipe = fa.load_recipe("fmnist-c2i")
    tok = load_tokenizer(recipe)
    ref = tmp_path / "ref"
    tokenize_dataset(items, ref, tok, recipe, batch_size=2, shard_size=shard, progress=False)

    class Failing:
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def __getattr__(self, name):
            return getattr(self.inner, name)

        def encode(self, images):
            self.calls += 1
            if self.calls == fail_at:
                raise _Boom("injected")
            return self.inner.encode(images)

    out = tmp_path / "out"
    with pytest.raises(_Boom):
        tokenize_dataset(items, out, Failing(tok), recipe, batch_size=2, shard_size=shard, progress=False)
    assert not (out / "manifest.json").exists()  # an interrupted folder never looks finished
    rep = tokenize_dataset(items, out, tok, recipe, batch_size=2, shard_size=shard, progress=False)
    for a, b in zip(_read(ref), _read(out)):
        assert torch.equal(a, b)
    assert rep == json.loads((ref / "tokenize_report.json").read_text())
    # the inputs changed under an interrupted run: refused, nothing touched
    fail_at = 5  # after at least one shard (5 encode calls = 10 images > any shard size here)
    with pytest.raises(_Boom):
        tokenize_dataset(items, tmp_path / "o2", Failing(tok), recipe, batch_size=2, shard_size=shard, progress=False)
    assert (tmp_path / "o2" / STATE).is_file()
    with pytest.raises(DataError, match="other inputs or settings"):
        tokenize_dataset(items[1:], tmp_path / "o2", tok, recipe, batch_size=2, shard_size=shard, progress=False)


@pytest.mark.slow
def test_tokenize_resumes_after_sigkill(tmp_path):
    """A real kill -9 in the middle of a run (images load slowly in the child so the kill
    lands between shards); the restarted command finishes with exactly the reference data."""
    _folder(tmp_path / "imgs", per_class=(6, 6), bad=False)
    args = [str(tmp_path / "imgs"), "--recipe", "fmnist-c2i", "--shard-size", "2", "--batch-size", "1", "--no-progress"]
    assert main(["tokenize", *args, "--out", str(tmp_path / "ref")]) == 0
    out = tmp_path / "out"
    kill_tokenize_mid_run(
        [*args, "--out", str(out)], out / STATE, done=3, slow="flashar_adapt.image_folders.load_image"
    )
    assert not (out / "manifest.json").exists()
    assert main(["tokenize", *args, "--out", str(out)]) == 0
    for a, b in zip(_read(tmp_path / "ref"), _read(out)):
        assert torch.equal(a, b)


def test_tokenize_bad_sources_are_clear_errors(tmp_path, capsys):
    (tmp_path / "empty" / "class0").mkdir(parents=True)
    (tmp_path / "empty" / "class0" / "notes.txt").write_text("x")
    base = ["--recipe", "fmnist-c2i", "--no-progress"]
    assert main(["tokenize", str(tmp_path / "empty"), "--out", str(tmp_path / "o"), *base]) == 2
    assert "no images in its 1 class sub-folder" in capsys.readouterr().err
    (tmp_path / "flat").mkdir()
    _png(tmp_path / "flat" / "a.png", 0)
    assert main(["tokenize", str(tmp_path / "flat"), "--out", str(tmp_path / "o"), *base]) == 2
    assert "no class sub-folders" in capsys.readouterr().err
    _folder(tmp_path / "ok", per_class=(1,), bad=False)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("mine")
    assert main(["tokenize", str(tmp_path / "ok"), "--out", str(tmp_path / "busy"), *base]) == 2
    assert "is not an interrupted tokenize run" in capsys.readouterr().err
    assert (tmp_path / "busy" / "keep.txt").read_text() == "mine"
    jl = tmp_path / "data.jsonl"
    jl.write_text('{"image": "a.png", "class": 1}\n\n{"image": "b.png"}\n')
    with pytest.raises(DataError, match=r"data.jsonl:3: each line must be an object with 'image'"):
        read_jsonl(jl, "class")
    assert main(["tokenize", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), *base]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_tokenize_jsonl_prompts_with_the_models_text_tokenizer(tmp_path):
    """Prompt-conditioned data: ids from the given text tokenizer, left-padded to prefix_len,
    too-long prompts counted as bad, not fatal."""
    from safetensors.torch import save_file

    save_file({"clusters": torch.linspace(-1, 1, 8)[:, None].repeat(1, 3)}, str(tmp_path / "pal.safetensors"))
    recipe = tiny.hf_llama_recipe(codebook=8, grid=(4, 4)).replace(
        tokenizer={"kind": "color-clusters", "checkpoint": str(tmp_path / "pal.safetensors")}
    )
    tok = load_tokenizer(recipe)
    lines = []
    for k in range(5):
        PIL.fromarray(
            (torch.rand(4, 4, 3, generator=torch.Generator().manual_seed(k)) * 255).byte().numpy(), "RGB"
        ).save(tmp_path / f"{k}.png")
        lines.append(json.dumps({"image": f"{k}.png", "prompt": "a " * (k * 4 + 1)}))
    (tmp_path / "d.jsonl").write_text("\n".join(lines) + "\n")
    items = read_jsonl(tmp_path / "d.jsonl", "tokens")
    text = lambda s: [3 + len(w) for w in s.split()]  # noqa: E731 - one id per word
    rep = tokenize_dataset(items, tmp_path / "out", tok, recipe, text_tokenizer=text, shard_size=2, progress=False)
    assert rep["num_examples"] == 4 and rep["num_bad"] == 1 and "17 tokens" in rep["bad"][0][1]  # prefix_len 16
    ds = ShardDataset(tmp_path / "out")
    b = ds.get(torch.arange(4))
    for k in range(4):
        n = k * 4 + 1
        assert b.cond_mask[k].sum() == n and b.cond[k, -n:].tolist() == [4] * n


# ---------------------------------------------------------------- generate


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A tiny random LlamaGen under the Fashion-MNIST recipe (so the shipped tokenizer decodes it)."""
    model = fa.patch(tiny.llamagen(grid=14, vocab=256, n_layer=3, dim=32), "fmnist-c2i")
    tiny.randomize(model.flashar, 1)
    return fa.export_merged(model, tmp_path_factory.mktemp("exp") / "export")


def test_generate_writes_pngs_a_grid_and_the_codes(export_dir, tmp_path, capsys):
    out = tmp_path / "gen"
    rc = main(
        [
            "generate",
            "--export",
            str(export_dir),
            "--out",
            str(out),
            "--classes",
            "3",
            "7",
            "--per-cond",
            "3",
            "--batch-size",
            "4",
            "--seed",
            "5",
            "--cfg",
            "2.0",
            "--top-k",
            "50",
            "--no-progress",
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "batch 1/2: 4 images, 27 steps" in printed and "batch 2/2: 2 images, 27 steps" in printed
    codes = load_file(str(out / "codes.safetensors"))["codes"].long()
    # the same calls by hand: same seed, same batches
    model = fa.load_adapted(export_dir)
    g = torch.Generator().manual_seed(5)
    y = torch.tensor([3, 3, 3, 7, 7, 7])
    want = torch.cat([model.generate(y[i : i + 4], cfg_scale=2.0, top_k=50, generator=g) for i in (0, 4)])
    assert torch.equal(codes, want)
    pngs = sorted((out / "images").iterdir())
    assert [p.name for p in pngs] == [f"{k:05d}_{c}.png" for k, c in enumerate([3, 3, 3, 7, 7, 7])]
    img = torch.from_numpy(np.array(PIL.open(pngs[4]))).float()[None] / 255
    assert torch.equal(img, (fa.decode_images(model, codes[4:5])[0] * 255).round() / 255)
    grid = PIL.open(out / "grid.png")
    assert grid.size[1] == 2 * (84 + 2)  # two labelled rows of 3 (28 px cells zoomed to 84)
    meta = json.loads((out / "generate.json").read_text())
    assert meta["conditions"] == ["3", "3", "3", "7", "7", "7"] and len(meta["batches"]) == 2
    assert not any(p.name.startswith(".gen.tmp") for p in tmp_path.iterdir())


def test_generate_raster_from_checkpoint_plus_recipe_and_codes_only(export_dir, tmp_path):
    rc = main(
        [
            "generate",
            "--model",
            str(export_dir / "backbone" / "llamagen.pt"),
            "--recipe",
            "fmnist-c2i",
            "--out",
            str(tmp_path / "r"),
            "--mode",
            "raster",
            "--classes",
            "1",
            "--no-progress",
        ]
    )
    assert rc == 0 and len(list((tmp_path / "r" / "images").iterdir())) == 1
    rec = fa.load_recipe("fmnist-c2i").replace(tokenizer=None)
    (tmp_path / "plain.yaml").write_text(rec.to_yaml())
    rc = main(
        [
            "generate",
            "--model",
            str(export_dir / "backbone" / "llamagen.pt"),
            "--recipe",
            str(tmp_path / "plain.yaml"),
            "--flashar-weights",
            str(export_dir / "flashar.safetensors"),
            "--out",
            str(tmp_path / "c"),
            "--classes",
            "1",
            "2",
            "--no-progress",
        ]
    )
    assert rc == 0 and not (tmp_path / "c" / "images").exists()
    assert load_file(str(tmp_path / "c" / "codes.safetensors"))["codes"].shape == (2, 14, 14)


@pytest.mark.slow
def test_generate_compile_flag_gives_the_eager_codes(export_dir, tmp_path):
    """--compile reaches generate(compile="auto"), which compiles a CPU batch of 2 (raster:
    one compiled graph), and changes no code."""
    base = [
        "generate",
        "--export",
        str(export_dir),
        "--mode",
        "raster",
        "--classes",
        "2",
        "5",
        "--top-k",
        "1",
        "--no-progress",
    ]
    from torch._dynamo.utils import counters

    assert main(base + ["--out", str(tmp_path / "eager")]) == 0
    frames = counters["frames"]["ok"]
    assert main(base + ["--out", str(tmp_path / "compiled"), "--compile"]) == 0
    assert counters["frames"]["ok"] > frames  # the step was compiled
    codes = [load_file(str(tmp_path / d / "codes.safetensors"))["codes"] for d in ("eager", "compiled")]
    assert torch.equal(*codes)
    assert json.loads((tmp_path / "compiled" / "generate.json").read_text())["compile"] == "auto"
    assert json.loads((tmp_path / "eager" / "generate.json").read_text())["compile"] is False


def test_generate_bad_input_is_refused_before_any_work(export_dir, tmp_path, capsys):
    base = ["generate", "--export", str(export_dir), "--no-progress"]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "mine.png").write_text("keep")
    assert main([*base, "--out", str(tmp_path / "taken")]) == 2
    assert "exists; choose a new --out" in capsys.readouterr().err
    assert (tmp_path / "taken" / "mine.png").read_text() == "keep"
    assert main([*base, "--out", str(tmp_path / "o"), "--classes", "10"]) == 2
    assert "outside 0..9" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "o"), "--prompts", "a cat"]) == 2
    assert "class-conditional" in capsys.readouterr().err
    assert (
        main(
            [
                "generate",
                "--model",
                str(export_dir / "backbone" / "llamagen.pt"),
                "--recipe",
                "fmnist-c2i",
                "--out",
                str(tmp_path / "o"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "needs trained FlashAR weights" in capsys.readouterr().err
    # a tokenizer whose grid disagrees with the recipe: 28x28 pixels in 2x2 patches is 14x14, not 16x16
    data = fa.load_recipe("fmnist-c2i").to_dict()
    data["image"]["grid"] = [16, 16]
    data["tokenizer"]["image_size"] = [28, 28]
    import yaml

    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(data))
    assert (
        main(
            [
                "generate",
                "--model",
                str(export_dir / "backbone" / "llamagen.pt"),
                "--recipe",
                str(tmp_path / "bad.yaml"),
                "--mode",
                "raster",
                "--out",
                str(tmp_path / "o"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert (
        "tokenizer.image_size: [28, 28] gives a 14x14 grid of codes, but image.grid is [16, 16]"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "o").exists()


def test_prompts_file_with_empty_lines_is_an_error(tmp_path):
    from flashar_adapt.generation import GenerateError, read_prompts

    p = tmp_path / "p.txt"
    p.write_text("a red car\n\na blue sky\n\n")
    with pytest.raises(GenerateError, match="line 2 is empty"):
        read_prompts(p)
    p.write_text("a red car\na blue sky\n\n")
    assert read_prompts(p) == ["a red car", "a blue sky"]
    p.write_text("\n")
    with pytest.raises(GenerateError, match="no prompts"):
        read_prompts(p)


def test_to_pil_round_trips_8bit_images():
    x = torch.randint(0, 256, (3, 5, 7), generator=torch.Generator().manual_seed(0)).float() / 255
    im = to_pil(x)
    assert im.mode == "RGB" and im.size == (7, 5)
    back = torch.from_numpy(np.array(im)).float().permute(2, 0, 1) / 255
    assert torch.equal(back, x)


def _word_tokenizer(folder: Path) -> dict:
    """A real transformers tokenizer (word level) saved the way checkpoints ship theirs."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "a": 5, "red": 6, "blue": 7, "car": 8, "sky": 9, "boi": 10}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]").save_pretrained(str(folder))
    return vocab


def test_generate_from_prompts_file_with_the_models_own_text_tokenizer(tmp_path, capsys):
    """Prompt-conditioned export (transformers Llama, colour-cluster tokenizer): prompts from a
    file, tokenised by the tokenizer saved in the export's backbone folder, through a template."""
    from safetensors.torch import save_file

    save_file(
        {"clusters": torch.rand(40, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1},
        str(tmp_path / "pal.safetensors"),
    )
    recipe = tiny.hf_llama_recipe(codebook=40, offset=100, grid=(3, 4)).replace(
        tokenizer={"kind": "color-clusters", "checkpoint": str(tmp_path / "pal.safetensors")}
    )
    model = fa.patch(tiny.hf_llama(), recipe)
    exp = fa.export_merged(model, tmp_path / "export")
    vocab = _word_tokenizer(exp / "backbone")
    (tmp_path / "p.txt").write_text("a red car\na blue sky\n")
    rc = main(
        [
            "generate",
            "--export",
            str(exp),
            "--out",
            str(tmp_path / "g"),
            "--prompts-file",
            str(tmp_path / "p.txt"),
            "--prompt-template",
            "{prompt} boi",
            "--per-cond",
            "2",
            "--cfg",
            "3",
            "--no-progress",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    codes = load_file(str(tmp_path / "g" / "codes.safetensors"))["codes"].long()
    m = fa.load_adapted(exp)
    ids = [[vocab[w] for w in p.split()] + [10] for p in ("a red car", "a red car", "a blue sky", "a blue sky")]
    cond = torch.tensor(ids)  # all four prompts are 4 tokens: no padding
    want = m.generate(
        cond,
        cond_mask=torch.ones_like(cond, dtype=torch.bool),
        cfg_scale=3.0,
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.equal(codes, want)
    assert len(list((tmp_path / "g" / "images").iterdir())) == 4 and (tmp_path / "g" / "grid.png").is_file()
    # a negative prompt, through the template like the prompts: the unconditional branch of every image
    neg_run = ["generate", "--export", str(exp), "--prompts-file", str(tmp_path / "p.txt")]
    neg_run += ["--prompt-template", "{prompt} boi", "--negative-prompt", "blue car", "--no-progress"]
    assert main([*neg_run, "--out", str(tmp_path / "gn"), "--cfg", "3"]) == 0, capsys.readouterr().err
    got = load_file(str(tmp_path / "gn" / "codes.safetensors"))["codes"].long()
    neg = [vocab["blue"], vocab["car"], 10]
    assert json.loads((tmp_path / "gn" / "generate.json").read_text())["negative"] == neg
    want_neg = m.generate(cond[::2], cfg_scale=3.0, negative=neg, generator=torch.Generator().manual_seed(0))
    plain = m.generate(cond[::2], cfg_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(got, want_neg) and not torch.equal(got, plain)
    assert main([*neg_run, "--out", str(tmp_path / "gn1")]) == 2  # --cfg 1: the branch would not run
    assert "classifier-free guidance" in capsys.readouterr().err and not (tmp_path / "gn1").exists()
    (tmp_path / "bad.txt").write_text("a red car\n\na blue sky\n")
    assert (
        main(
            [
                "generate",
                "--export",
                str(exp),
                "--out",
                str(tmp_path / "g2"),
                "--prompts-file",
                str(tmp_path / "bad.txt"),
                "--no-progress",
            ]
        )
        == 2
    )
    assert "line 2 is empty" in capsys.readouterr().err and not (tmp_path / "g2").exists()
    # a prompt longer than condition.prefix_len (16 tokens) fails in generation: nothing is left behind
    assert (
        main(["generate", "--export", str(exp), "--out", str(tmp_path / "g3"), "--prompts", "a " * 20, "--no-progress"])
        == 2
    )
    assert "condition.prefix_len allows 1..16" in capsys.readouterr().err
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith((".g3", "g3"))]
