"""What an adversarial pass found one step off the tested path, each closed by a mechanism
and tested here by the class it belongs to: a value of the wrong type reaching a model
constructor, a file of the user's replaced, an option a mode would ignore, a file edited
behind an export's back, YAML 1.1's surprising numbers, inputs a tokenize run would drop
or mislabel without a word."""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import flashar_adapt as fa
from flashar_adapt.commands import main
from flashar_adapt.evaluation import report_folder_problem, write_samples_report
from flashar_adapt.export import ExportError
from flashar_adapt.formats import FormatError
from flashar_adapt.image_folders import BadImage, list_class_folder, load_image, read_jsonl
from flashar_adapt.integrations.llamagen.checkpoints import model_args_of
from flashar_adapt.quality import QualityError, save_stats
from flashar_adapt.recipe import RecipeError, safe_yaml
from flashar_adapt.shards import DataError
from flashar_adapt.training import TrainConfig, TrainingError
from tests import tiny

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "fmnist" / "assets" / "flashar"


def _cli(capsys, *argv) -> tuple[int, str]:
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 1, err
    return rc, err


@pytest.fixture
def export(tmp_path):
    model = tiny.llamagen(grid=4)
    fa.patch(model, tiny.llamagen_recipe(grid=4))
    return fa.export_merged(model, tmp_path / "export")


# ---------------------------------------------------------------- values reaching a constructor


@pytest.mark.parametrize(
    "values,msg",
    [
        ({"rope_base": "1e4"}, "rope_base must be a number"),
        ({"norm_eps": None}, "norm_eps is required"),
        ({"n_head": 4.0}, "n_head must be an integer"),
        ({"n_head": "four"}, "n_head must be an integer"),
        ({"n_head": 0}, "n_head must be an integer >= 1"),
        ({"model_type": "t2v"}, "model_type must be one of"),
        ({"dimm": 8}, "did you mean 'dim'"),
    ],
)
def test_model_args_are_typed_before_the_model_is_built(values, msg):
    with pytest.raises(FormatError, match=msg):
        model_args_of(values, "--set")
    assert model_args_of({"rope_base": 10000}, "x").rope_base == 10000.0


def test_set_reads_numbers_as_yaml_1_2_and_a_wrong_type_is_one_line(capsys, tmp_path):
    base = ROOT / "fmnist" / "assets" / "base.safetensors"
    argv = ("generate", "--model", base, "--recipe", "fmnist-c2i", "--mode", "raster", "--out", tmp_path / "g")
    rc, err = _cli(capsys, *argv, "--classes", "0", "--set", "n_head=four")
    assert rc == 2 and "n_head must be an integer" in err and not (tmp_path / "g").exists()
    rc, err = _cli(capsys, *argv, "--classes", "0", "--set", "norm_eps=abc")
    assert rc == 2 and "norm_eps must be a number" in err


def test_an_edited_model_args_json_is_named_on_load(export):
    args = export / "backbone" / "model_args.json"
    values = json.loads(args.read_text())
    values["n_head"] = values["n_head"] * 2
    args.write_text(json.dumps(values))
    with pytest.raises(ExportError, match="model_args.json differs from what the export wrote"):
        fa.load_adapted(export)
    # an export written before files were recorded still has its values typed
    cfg = json.loads((export / "flashar_config.json").read_text())
    for key in ("backbone_files", "files", "config_sha256"):
        del cfg[key]
    (export / "flashar_config.json").write_text(json.dumps(cfg))
    args.write_text(json.dumps({**values, "n_head": values["n_head"] // 2, "norm_eps": None}))
    with pytest.raises(ExportError, match="norm_eps is required"):
        fa.load_adapted(export)


def test_unknown_keys_in_an_export_config_and_a_model_spec_are_named(export, tmp_path):
    cfg = json.loads((export / "flashar_config.json").read_text())
    (export / "flashar_config.json").write_text(json.dumps({**cfg, "fixed_gat": 0.5}))
    with pytest.raises(ExportError, match="unknown key 'fixed_gat'.*did you mean 'fixed_gate'"):
        fa.load_adapted(export)
    spec = {"model": {"format": "llamagen", "checkpoint": "x.pt", "dtyp": "float16"}}
    with pytest.raises(TrainingError, match="'dtyp' is not a key of a llamagen model spec.*did you mean 'dtype'"):
        TrainConfig.from_dict({**spec, "recipe": "fmnist-c2i", "data": "d", "out_dir": "o"})


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_a_device_this_machine_lacks_is_refused_before_loading():
    with pytest.raises(fa.FlashARError, match="no CUDA device"):
        fa.load_adapted(SHIPPED, device="cuda")


# ---------------------------------------------------------------- nothing of the user's replaced


def test_reference_statistics_replace_only_statistics_written_here(tmp_path):
    feats = torch.randn(20, 4)
    mine = tmp_path / "mine.npz"
    mine.write_bytes(b"keep")
    with pytest.raises(QualityError, match="not statistics this toolkit wrote"):
        save_stats(mine, feats, "x")
    assert mine.read_bytes() == b"keep"
    ours = tmp_path / "ours.npz"
    save_stats(ours, feats, "x")
    save_stats(ours, feats * 2, "x")  # ours: replaced
    with np.load(ours) as z:
        assert np.allclose(z["mu"], (feats * 2).mean(0).numpy(), atol=1e-5)


def test_a_report_goes_only_into_a_new_empty_or_earlier_report_folder(tmp_path):
    out = tmp_path / "ev"
    assert report_folder_problem(out, with_samples=True) is None
    write_samples_report(out, {"fid": 1.0})
    assert report_folder_problem(out, with_samples=False) is None  # our own report: replaced
    write_samples_report(out, {"fid": 2.0})
    assert json.loads((out / "report.json").read_text())["fid"] == 2.0
    (out / "notes.txt").write_text("keep")
    assert "notes.txt" in report_folder_problem(out, with_samples=False)
    other = tmp_path / "other"
    other.mkdir()
    (other / "report.json").write_text('{"mine": 1}')
    with pytest.raises(QualityError, match="did not write"):
        write_samples_report(other, {"fid": 1.0})
    assert (other / "report.json").read_text() == '{"mine": 1}'
    (out / "notes.txt").unlink()
    (out / "raster").mkdir()
    assert report_folder_problem(out, with_samples=True) is None
    assert "raster" in report_folder_problem(out, with_samples=False)


def test_keep_adapters_without_adapters_is_refused(tmp_path):
    model = tiny.llamagen(grid=4)
    fa.patch(model, tiny.llamagen_recipe(grid=4))
    with pytest.raises(ExportError, match="has none"):
        fa.export_merged(model, tmp_path / "e", merge=False)
    assert not (tmp_path / "e").exists()


# ---------------------------------------------------------------- options a mode would ignore


def test_an_option_the_chosen_mode_ignores_is_refused_naming_it(capsys, tmp_path, export):
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    cases = [
        (("tokenize", tmp_path / "imgs", "--out", tmp_path / "d", "--recipe", "fmnist-c2i", "--cfg", "3"), "--cfg"),
        (
            ("tokenize", tmp_path / "imgs", "--out", tmp_path / "d", "--recipe", "fmnist-c2i", "--num-samples", "3"),
            "--num-samples",
        ),
        (("evaluate", tmp_path / "imgs", "--ref", tmp_path / "imgs", "--classes", "1"), "--classes"),
        (("evaluate", tmp_path / "imgs", "--ref", tmp_path / "imgs", "--shards", tmp_path), "--shards"),
        (("demo", "--tiny", "--out", tmp_path / "o"), "--out"),
        (("demo", "--tiny", "--samples", "3"), "--samples"),
        (("generate", "--export", export, "--recipe", "fmnist-c2i", "--out", tmp_path / "g"), "--recipe"),
        (("generate", "--export", export, "--model", export, "--out", tmp_path / "g"), "--export and --model"),
        (("generate", "--export", export, "--flashar-weights", export, "--out", tmp_path / "g"), "--flashar-weights"),
    ]
    for argv, option in cases:
        rc, err = _cli(capsys, *argv)
        assert rc == 2 and option in err, (argv, err)
    assert not (tmp_path / "d").exists() and not (tmp_path / "g").exists() and not (tmp_path / "o").exists()


def test_recipe_search_path_and_ambiguous_names(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHAR_RECIPE_PATH", str(tmp_path / "nope"))
    with pytest.raises(RecipeError, match="nope: no such folder"):
        fa.load_recipe("fmnist-c2i")
    monkeypatch.delenv("FLASHAR_RECIPE_PATH")
    d = tmp_path / "mine"
    d.mkdir()
    text = fa.load_recipe("fmnist-c2i").to_dict() | {"name": "foo"}
    for stem in ("a", "b"):
        (d / f"{stem}.yaml").write_text(json.dumps(text))
    with pytest.raises(RecipeError, match="2 recipes declare name 'foo'"):
        fa.load_recipe("foo", [d])
    assert fa.load_recipe("a", [d]).name == "foo"  # a file stem is unambiguous


# ---------------------------------------------------------------- YAML numbers as they look


def test_yaml_numbers_read_as_yaml_1_2(tmp_path):
    assert safe_yaml("a: 010\nb: 0o10\nc: 0x10\nd: 5e-5\ne: 1:30\n") == {
        "a": 10,
        "b": 8,
        "c": 16,
        "d": 5e-5,
        "e": "1:30",
    }
    (tmp_path / "t.yaml").write_text(
        "model: {format: llamagen}\nrecipe: fmnist-c2i\ndata: d\nout_dir: o\nstage1: {steps: 1:30}\n"
    )  # YAML 1.1 reads 1:30 as 90 (sexagesimal): silently 90 steps
    with pytest.raises(TrainingError, match="stage1.steps"):
        TrainConfig.load(tmp_path / "t.yaml")


# ---------------------------------------------------------------- tokenize: nothing dropped unseen


def _png(path: Path, mode: str = "L", alpha: int | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new(mode, (28, 28), 255 if mode != "RGBA" else (255, 255, 255, 255))
    if alpha is not None:
        im.putalpha(Image.new("L", (28, 28), alpha))
    im.save(path)


def test_class_folders_refuse_what_would_be_dropped_or_mislabelled(tmp_path):
    root = tmp_path / "imgs"
    _png(root / "8_Bag" / "a.png")
    _png(root / "9_Boot" / "a.png")
    with pytest.raises(DataError, match="this folder is class 0, not 8"):
        list_class_folder(root)
    root = tmp_path / "imgs2"
    _png(root / "0_T-shirt" / "a.png")
    _png(root / "1_Trouser" / "a.png")
    assert [i.cond for i in list_class_folder(root)[0]] == [0, 1]
    _png(root / "loose.png")
    with pytest.raises(DataError, match="belong to no class"):
        list_class_folder(root)
    (root / "loose.png").unlink()
    (root / "1_Trouser" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    with pytest.raises(DataError, match="a link to nothing"):
        list_class_folder(root)
    (root / "1_Trouser" / "gone.png").unlink()
    _png(tmp_path / "elsewhere" / "b.png")
    (root / "1_Trouser" / "more").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (tmp_path / "elsewhere" / "loop").symlink_to(root, target_is_directory=True)  # a link back up: walked once
    items, _ = list_class_folder(root)
    assert sorted(i.image.name for i in items) == ["a.png", "a.png", "b.png"]


def test_transparent_images_are_listed_not_flattened_to_their_background(tmp_path):
    from flashar_adapt.tokenizers import load_tokenizer

    tok = load_tokenizer(fa.load_recipe("fmnist-c2i"))
    _png(tmp_path / "cut.png", "RGBA", alpha=0)
    with pytest.raises(BadImage, match="transparent pixels"):
        load_image(tmp_path / "cut.png", tok)
    _png(tmp_path / "opaque.png", "RGBA", alpha=255)  # an alpha channel that is all opaque is fine
    assert load_image(tmp_path / "opaque.png", tok).shape == (1, 28, 28)


def test_a_jsonl_that_is_not_utf8_is_a_data_error(tmp_path, capsys):
    bad = tmp_path / "x.jsonl"
    bad.write_bytes(b'\xff\xfe{"image": "x"}')
    with pytest.raises(DataError, match="not UTF-8"):
        read_jsonl(bad, "class")
    rc, err = _cli(capsys, "tokenize", bad, "--out", tmp_path / "d", "--recipe", "fmnist-c2i")
    assert rc == 2 and "not UTF-8" in err and not os.path.exists(tmp_path / "d" / "manifest.json")


# ---------------------------------------------------------------- errors that blame the right thing


def test_refusals_name_the_real_cause(tmp_path):
    from flashar_adapt.sampling import Sampling

    s = Sampling(cfg_scale=np.float32(2.0), temperature=np.float64(0.5), top_k=np.int64(3))
    assert (s.cfg_scale, s.temperature, s.top_k) == (2.0, 0.5, 3) and type(s.top_k) is int
    with pytest.raises(fa.FlashARError, match="cfg_scale must be a Python number, got a tensor"):
        Sampling(cfg_scale=torch.tensor(2.0))
    with pytest.raises(TrainingError, match="a folder, not a training config file"):
        TrainConfig.load(tmp_path)
    (tmp_path / "file.txt").write_text("keep")
    model = tiny.llamagen(grid=4)
    fa.patch(model, tiny.llamagen_recipe(grid=4))
    with pytest.raises(ExportError, match="file.txt is a file, not a folder"):
        fa.export_merged(model, tmp_path / "file.txt" / "sub")
    assert (tmp_path / "file.txt").read_text() == "keep"
    with pytest.raises(QualityError, match="does not exist"):
        save_stats(tmp_path / "nodir" / "x.npz", torch.randn(5, 2), "x")


# ---------------------------------------------------------------- a second pass: the API and resumes


def test_prompts_files_read_as_an_editor_writes_them(tmp_path):
    from flashar_adapt.generation import GenerateError, read_prompts

    f = tmp_path / "p.txt"
    f.write_bytes("\ufeffa red car\r\na blue\x0csky\n".encode())  # BOM, CRLF, a form feed inside a prompt
    assert read_prompts(f) == ["a red car", "a blue\x0csky"]
    f.write_bytes(b"a red caf\xe9\n")
    with pytest.raises(GenerateError, match="not UTF-8 text"):
        read_prompts(f)
    with pytest.raises(GenerateError, match="a folder, not a prompts file"):
        read_prompts(tmp_path)


def test_sample_refuses_logits_it_cannot_draw_from_and_mixed_settings():
    from flashar_adapt.sampling import Sampling

    for bad in (torch.empty(0, 5), torch.empty(2, 0), torch.tensor([[0.0, float("nan"), 1.0]])):
        with pytest.raises(fa.FlashARError, match="logits"):
            fa.sample(bad)
    with pytest.raises(fa.FlashARError, match=r"\+inf"):
        fa.sample(torch.tensor([[0.0, float("inf"), 0.0]]))
    x = torch.randn(2, 3, 7)
    assert fa.sample(x, top_k=1).shape == (2, 3) and torch.equal(fa.sample(x, top_k=1), x.argmax(-1))
    assert fa.sample(x[0, 0], top_k=1).shape == ()
    with pytest.raises(fa.FlashARError, match="not both"):
        fa.sample(x, Sampling(top_k=1), top_k=0)
    with pytest.raises(fa.FlashARError, match=r"cfg_scale must be a number in \[0, 10000\]"):
        Sampling(cfg_scale=1e30)  # float32 logits overflow: every code would be 0


def test_api_arguments_of_the_wrong_type_are_named(tmp_path):
    model = tiny.llamagen(grid=4)
    for bad in (5, {"name": "x"}):
        with pytest.raises(fa.FlashARError, match="recipe must be a Recipe"):
            fa.patch(model, bad)
    assert not hasattr(model, "flashar")
    fa.patch(model, tiny.llamagen_recipe(grid=4))
    for kw, msg in (
        (dict(out_dir=5), "out_dir must be a folder path"),
        (dict(out_dir=tmp_path / "a", merge="no"), "merge must be True or False"),
        (dict(out_dir=tmp_path / "b", extra_files={"classes.json": "[]"}), "must be bytes"),
    ):
        with pytest.raises(ExportError, match=msg):
            fa.export_merged(model, **kw)
    assert list(tmp_path.iterdir()) == []


def test_a_sample_run_resumes_only_with_the_same_weights(tmp_path):
    from flashar_adapt.quality import open_images
    from flashar_adapt.sample_sets import SampleSetError, sample_set

    a, b = tiny.llamagen(grid=4, seed=0), tiny.llamagen(grid=4, seed=1)
    for m in (a, b):
        fa.patch(m, tiny.llamagen_recipe(grid=4))
    out = tmp_path / "s"
    m = sample_set(a, torch.tensor([1, 2]), out, num_samples=2, progress=False)  # class ids as a tensor
    assert m["num_samples"] == 2
    with pytest.raises(SampleSetError, match="weights_sha256"):  # same path, other weights (an export replaced)
        sample_set(b, [1, 2], out, num_samples=2, progress=False)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "run.json").write_text("{}")
    with pytest.raises(QualityError, match="an unfinished sample run"):
        open_images(tmp_path / "half")


def test_a_recipe_declaring_a_shipped_name_in_a_user_folder_is_not_silently_shadowed(tmp_path):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "custom.yaml").write_text(json.dumps(fa.load_recipe("fmnist-c2i").to_dict()))
    with pytest.raises(RecipeError, match="names both"):
        fa.load_recipe("fmnist-c2i", [d])
    assert fa.load_recipe("custom", [d]).name == "fmnist-c2i"


def test_a_raster_sample_run_of_a_freshly_patched_model_resumes(tmp_path):
    # raster decoding never reads the FlashAR modules, which each patch initialises at random
    from flashar_adapt.sample_sets import sample_set

    out = tmp_path / "s"
    for seed in (0, 1):
        m = tiny.llamagen(grid=4, seed=0)
        fa.patch(m, tiny.llamagen_recipe(grid=4))
        with torch.no_grad():  # another patch, another random gate and branch
            for p in m.flashar.parameters():
                p.add_(seed)
        assert sample_set(m, [1, 2], out, mode="raster", num_samples=2, progress=False)["num_samples"] == 2


# ---------------------------------------------------------------- a third pass: damaged model folders


def test_a_damaged_model_folder_is_one_line_naming_it(tmp_path, capsys):
    cfg = {"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 8, "intermediate_size": 8}
    cfg |= {"num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 16}
    cases = {
        "typed": ({**cfg, "hidden_size": "big"}, None, "hidden_size"),
        "list": ([1, 2], None, "must hold a JSON object"),
        "garbage weights": (cfg, b"garbage", "SafetensorError"),
        "not a model class": ({**cfg, "architectures": ["AutoConfig"]}, b"garbage", "cannot load it"),
    }
    for name, (config, weights, msg) in cases.items():
        d = tmp_path / name.replace(" ", "_")
        d.mkdir()
        (d / "config.json").write_text(json.dumps(config))
        if weights is not None:
            (d / "model.safetensors").write_bytes(weights)
        for argv in (("inspect", d), ("check", d, "fmnist-c2i")):
            rc, err = _cli(capsys, *argv)
            assert rc == 2 and msg in err and d.name in err, (name, argv, err)
    # a config cut short or not UTF-8: the decode error names a line, the message the file
    for name, raw in {"cut": json.dumps(cfg).encode()[:40], "not utf-8": b"\xff\xfe{}"}.items():
        d = tmp_path / name.replace(" ", "_")
        d.mkdir()
        (d / "config.json").write_bytes(raw)
        rc, err = _cli(capsys, "inspect", d)
        assert rc == 2 and f"{d.name}: the transformers format cannot load it (config.json is not UTF-8 JSON" in err


def test_yml_recipes_are_listed_and_found(tmp_path, capsys):
    d = tmp_path / "mine"
    d.mkdir()
    (d / "fm.yml").write_text(json.dumps(fa.load_recipe("fmnist-c2i").to_dict() | {"name": "fm"}))
    assert "fm" in fa.list_recipes([d]) and fa.load_recipe("fm", [d]).name == "fm"


def test_a_condition_that_is_not_ids_is_named():
    model = tiny.llamagen(grid=4)
    fa.patch(model, tiny.llamagen_recipe(grid=4))
    with pytest.raises(fa.FlashARError, match="cond must be a tensor of class ids"):
        fa.prefill(model, cond=["1"])


def test_data_tokenized_for_another_recipe_is_said(tmp_path):
    from flashar_adapt.shards import ShardDataset, ShardWriter
    from flashar_adapt.training.loop import check_data

    recipe = tiny.llamagen_recipe(grid=4)
    w = ShardWriter(tmp_path / "d", (4, 4), 48, "class", "another-recipe", num_classes=10)
    w.add(torch.zeros(2, 4, 4, dtype=torch.long), torch.tensor([1, 2]))
    w.close()
    with pytest.warns(UserWarning, match="tokenized for recipe 'another-recipe'"):
        check_data(ShardDataset(tmp_path / "d"), recipe)


def test_meta_device_weights_or_condition_are_refused_in_one_sentence():
    """A model built on the meta device has shapes and no values: patching it, or decoding
    after moving it there, is refused naming a weight; so is a condition on the meta device
    (it decoded nothing and returned a meta tensor, or failed deep inside torch)."""
    with pytest.raises(fa.FlashARError, match="on the meta device .* load the weights first"):
        fa.patch(tiny.llamagen(grid=4).to("meta"), tiny.llamagen_recipe(grid=4))
    model = tiny.llamagen(grid=4)
    fa.patch(model, tiny.llamagen_recipe(grid=4))
    with pytest.raises(fa.FlashARError, match="cond is on the meta device"):
        model.generate(torch.tensor([1], device="meta"))
    model.to("meta")
    for call in (lambda: model.generate(torch.tensor([1])), lambda: fa.prefill(model, torch.tensor([1]))):
        with pytest.raises(fa.FlashARError, match="the model's .* is on the meta device"):
            call()


# ---------------------------------------------------------------- a fourth pass: the Python API


def test_a_torch_compile_wrapper_is_refused_and_nothing_is_left_behind():
    model = tiny.llamagen(grid=4)
    hooks = [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()]
    with pytest.raises(fa.FlashARError, match="not the OptimizedModule torch.compile wrapped it in"):
        fa.patch(torch.compile(model), tiny.llamagen_recipe(grid=4))
    assert [len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()] == hooks
    fa.patch(model, tiny.llamagen_recipe(grid=4))  # the model itself still patches


def test_logits_nothing_can_be_drawn_from_are_refused_not_decoded_as_code_0():
    """NaN weights, a hook returning NaN, a low-precision overflow: decoding drew code 0 from
    every cell without a word; now the first step's logits are checked (one sync per run).
    fa.sample refuses a row masked whole, and names a dtype that is not float."""
    model = tiny.llamagen(grid=4)
    fa.patch(model, tiny.llamagen_recipe(grid=4))
    hook = model.output.register_forward_hook(lambda mod, args, out: out * float("nan"))
    for mode in ("two_way", "raster"):
        with pytest.raises(fa.FlashARError, match="logits at the first step hold NaN"):
            model.generate(torch.tensor([1, 2]), mode=mode)
    hook.remove()
    assert model.generate(torch.tensor([1, 2]), top_k=1).shape == (2, 4, 4)
    with pytest.raises(fa.FlashARError, match="a row with no finite entry"):
        fa.sample(torch.tensor([[0.0, 1.0], [float("-inf"), float("-inf")]]))
    with pytest.raises(fa.FlashARError, match="got a torch.int64 tensor"):
        fa.sample(torch.ones(4, 10, dtype=torch.long))


def test_a_model_cast_or_moved_apart_from_its_state_or_its_flashar_modules_is_said():
    model = tiny.llamagen(grid=4)
    fa.patch(model, tiny.llamagen_recipe(grid=4))
    cond = torch.tensor([1, 2])
    state = fa.prefill(model, cond, top_k=1)
    model.half()
    with pytest.raises(RuntimeError, match="stale: the model is now torch.float16"):
        fa.step(state)
    model.float()
    model.flashar.half()
    with pytest.raises(fa.FlashARError, match="FlashAR modules are torch.float16 .* the model torch.float32"):
        model.generate(cond)
    model.float()
    with pytest.raises(fa.FlashARError, match="vertical must be True or False"):
        fa.prefill(model, cond, vertical="no")
    with pytest.raises(fa.FlashARError, match="uncond must be True or False"):
        fa.teacher_forward(model, cond, torch.zeros(2, 4, 4, dtype=torch.long), uncond="no")


def test_recipe_module_paths_that_cannot_play_their_part_are_named_at_patch():
    for key, path, msg in (
        ("modules.norm", "layers", "a container that cannot be called"),
        ("modules.embed", "output", "does not map token ids to vectors"),
    ):
        with pytest.raises(fa.RecipeError, match=f"{key}: path '{path}'.*{msg}"):
            fa.patch(tiny.llamagen(grid=4), tiny.llamagen_recipe(grid=4), **{key: path})


def test_api_arguments_of_the_wrong_kind_are_one_sentence(tmp_path):
    for bad in ("", None, 5):
        with pytest.raises(fa.RecipeError, match="a registry name or a YAML file path"):
            fa.load_recipe(bad)
    assert fa.load_recipe("fmnist-c2i", str(tmp_path)).name == "fmnist-c2i"  # one folder, not walked per letter
    with pytest.raises(fa.FlashARError, match="out_dir must be the path of an export folder"):
        fa.load_adapted(5)
    with pytest.raises(fa.FlashARError, match="model must be a torch.nn.Module or the path"):
        fa.inspect_model(5)
    with pytest.raises(fa.FlashARError, match="overrides must be a dict"):
        fa.inspect_model(tmp_path, overrides=[1])
    export = fa.export_merged(_patched_tiny(), tmp_path / "exp")
    with pytest.raises(fa.FlashARError, match="a flashar-adapt export: load it with fa.load_adapted"):
        fa.inspect_model(export)


def _patched_tiny():
    model = tiny.llamagen(grid=4)
    fa.patch(model, tiny.llamagen_recipe(grid=4))
    return model


def test_decode_images_takes_integer_codes_and_a_tokenizer_of_the_current_patch():
    tok = fa.load_tokenizer("fmnist-c2i")
    model = tiny.llamagen(grid=14, vocab=256)
    fa.patch(model, "fmnist-c2i", **{"condition.num_classes": 10})
    codes = torch.randint(0, 256, (2, 14, 14), generator=torch.Generator().manual_seed(0))
    assert torch.equal(fa.decode_images(model, codes.tolist()), tok.decode(codes))  # a list of ids is ids
    for bad in (codes.float() + 0.5, codes.bool()):
        with pytest.raises(fa.FlashARError, match="codes must be integer code ids"):
            fa.decode_images(model, bad)
    with pytest.raises(fa.FlashARError, match="tokenizer must be an ImageTokenizer"):
        fa.decode_images(model, codes, tokenizer="x")
    fa.unpatch(model)
    fa.patch(model, "fmnist-c2i", **{"condition.num_classes": 10, "image.codebook_size": 128})
    with pytest.raises(fa.FlashARError, match="image.codebook_size is 128"):  # the old patch's tokenizer was kept
        fa.decode_images(model, codes % 128)


def test_a_weight_file_swapped_for_another_of_the_same_size_is_seen(tmp_path):
    """Weight files are recorded by size and the hash of both ends (not read whole on load):
    another model's file of the same size differs there."""
    from flashar_adapt.files import HASHED_BYTES, file_record

    f = tmp_path / "w.bin"
    data = bytearray(torch.randn(3 * HASHED_BYTES // 4, generator=torch.Generator().manual_seed(0)).numpy().tobytes())
    f.write_bytes(bytes(data))
    rec = file_record(f)
    assert rec["bytes"] == len(data) and "sha256_ends" in rec
    for at in (10, len(data) - 10):
        changed = bytearray(data)
        changed[at] ^= 1
        f.write_bytes(bytes(changed))
        assert file_record(f) != rec, at


# ---------------------------------------------------------------- a fourth pass: the command line


@contextmanager
def _file_size_limit(nbytes: int):
    """``ulimit -f`` for this process (Python ignores SIGXFSZ: a write past it fails EFBIG)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_a_write_that_runs_out_of_room_names_the_file_and_replaces_nothing(tmp_path):
    """A full disk or `ulimit -f`: the serialisers said it in their own types (SafetensorError,
    torch.save's RuntimeError: a traceback) or as an OSError without the file's name."""
    from flashar_adapt.files import atomic_save_safetensors, atomic_write_bytes

    big = {"x": torch.zeros(100_000)}
    model = _patched_tiny()
    export = fa.export_merged(model, tmp_path / "exp")
    before = {p.name: p.read_bytes() for p in export.rglob("*") if p.is_file()}
    with _file_size_limit(50_000):
        with pytest.raises(OSError, match="shard.safetensors"):
            atomic_save_safetensors(big, tmp_path / "shard.safetensors")
        with pytest.raises(OSError, match="state.json"):
            atomic_write_bytes(tmp_path / "state.json", b"x" * 100_000)
        with pytest.raises(OSError, match="writing the export: nothing was replaced"):
            fa.export_merged(model, export)
    assert {p.name: p.read_bytes() for p in export.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exp"]  # no temp file or folder left


def _noise_png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    x = torch.randint(0, 256, (28, 28), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)
    Image.fromarray(x.numpy(), "L").save(path)


def test_tokenize_resumes_only_what_it_can_and_reads_its_own_state_carefully(tmp_path, capsys):
    """A run state that is not an object (or not UTF-8) is named; a folder of another command
    is not called a data folder; a run that wrote nothing starts over with new inputs (the
    same command could never succeed); an image replaced after it was encoded (another size)
    makes the inputs other inputs; a --out that links to nothing is a usage error."""
    imgs = tmp_path / "imgs"
    for i in range(3):
        _noise_png(imgs / "0" / f"{i}.png", i)
    args = ("tokenize", imgs, "--recipe", "fmnist-c2i", "--out")
    for name, raw in (("list", b"[]"), ("text", b'"x"'), ("latin1", b"\xff\xfe{")):
        out = tmp_path / name
        out.mkdir()
        (out / ".tokenize_state.json").write_bytes(raw)
        rc, err = _cli(capsys, *args, out)
        assert rc == 2 and ".tokenize_state.json" in err, (name, err)
    other = tmp_path / "sampled"
    other.mkdir()
    (other / "manifest.json").write_text(json.dumps({"format": "flashar-adapt sample set 1"}))
    rc, err = _cli(capsys, *args, other)
    assert rc == 2 and "is not an interrupted tokenize run" in err
    # every image bad: nothing written, the state kept; new inputs start over
    bad = tmp_path / "bad"
    (bad / "0").mkdir(parents=True)
    (bad / "0" / "x.png").write_bytes(b"not a png")
    out = tmp_path / "d"
    run = ("tokenize", bad, "--recipe", "fmnist-c2i", "--out", out)
    assert main([str(a) for a in run]) == 2
    assert "none of the 1 images could be used" in capsys.readouterr().err
    _noise_png(bad / "0" / "y.png", 7)
    (bad / "0" / "x.png").unlink()
    rc = main([str(a) for a in run])
    err = capsys.readouterr().err
    assert rc == 0 and (out / "manifest.json").is_file(), err
    dangling = tmp_path / "dang"
    dangling.symlink_to(tmp_path / "nowhere")
    rc, err = _cli(capsys, *args, dangling)
    assert rc == 2 and "symbolic link to a missing target" in err


def test_a_replaced_image_is_another_input_on_resume(tmp_path):
    from flashar_adapt.image_folders import Item, inputs_fingerprint

    p = tmp_path / "a.png"
    _noise_png(p, 0)
    recipe = fa.load_recipe("fmnist-c2i")
    before = inputs_fingerprint([Item(p, 0)], recipe, 16, "")
    Image.new("L", (28, 28), 0).save(p)  # black: another image, another size
    assert inputs_fingerprint([Item(p, 0)], recipe, 16, "") != before


def test_damaged_sample_parts_images_and_npz_members_are_named(tmp_path):
    import zipfile

    from flashar_adapt.npz_images import NpzImages, write_npz
    from flashar_adapt.sample_sets import SampleSetError, read_parts, read_rgb

    (tmp_path / "parts").mkdir()
    (tmp_path / "parts" / "000000.safetensors").write_bytes(b"\x10\x00")
    with pytest.raises(SampleSetError, match=r"000000.safetensors: damaged .*run the same command again"):
        read_parts(tmp_path, 2, 2)
    png = tmp_path / "000003.png"
    Image.new("RGB", (8, 8)).save(png)
    png.write_bytes(png.read_bytes()[:30])
    with pytest.raises(SampleSetError, match="000003.png: damaged"):
        read_rgb(png)
    npz = tmp_path / "s.npz"
    write_npz(npz, (np.full((64, 64, 3), i, np.uint8) for i in range(40)), (40, 64, 64), None)
    with zipfile.ZipFile(npz) as zf:
        info = zf.getinfo("arr_0.npy")
    data = bytearray(npz.read_bytes())
    data[info.header_offset + 30 + len(info.filename) + info.file_size - 10] ^= 0xFF  # late in the array: CRC fails
    npz.write_bytes(bytes(data))
    with pytest.raises(fa.FlashARError, match="arr_0 is damaged"):
        list(NpzImages(npz).batches(8))


def test_check_and_patch_refuse_settings_they_would_ignore_or_overrule(tmp_path):
    model = _patched_tiny()
    with pytest.raises(fa.FlashARError, match="already patched: check it as it is"):
        fa.check(model, tiny.llamagen_recipe(grid=4), branch_layer=-1)
    with pytest.raises(fa.FlashARError, match="grid must be two positive integers"):
        fa.check(tiny.llamagen(grid=4), tiny.llamagen_recipe(grid=4), grid=(0, 1))
    with pytest.raises(fa.RecipeError, match=r"image.grid: given twice, as grid= and as image.grid="):
        fa.patch(tiny.llamagen(grid=4), tiny.llamagen_recipe(grid=4), grid=(4, 4), **{"image.grid": [2, 2]})
    with pytest.raises(fa.RecipeError, match="unknown backend 'bogus'"):
        fa.inspect_model(tiny.llamagen(grid=4), backend="bogus")
    state = fa.prefill(model, torch.tensor([1]), top_k=1)
    fa.unpatch(model)
    fa.patch(model, tiny.llamagen_recipe(grid=4))
    with pytest.raises(RuntimeError, match="patch was removed .* prefill again"):
        fa.step(state)


# ---------------------------------------------------------------- a fifth pass: training


def test_a_run_resumes_only_on_the_data_and_base_model_it_trained_on(tmp_path, capsys):
    """A data folder or a base model file replaced under the same names resumed without a word
    (steps 1-2 on one, the rest on the other); the checkpoint now records both, and resuming,
    exporting or generating from it names what changed."""
    import shutil

    from flashar_adapt.shards import ShardWriter
    from flashar_adapt.training import TrainConfig, TrainingError, train
    from flashar_adapt.training.checkpoints import load_run
    from tests.train_helpers import llamagen_run, structured_codes

    cfg_path = llamagen_run(tmp_path, stage1=2, stage2=0, save_every=1)
    cfg = TrainConfig.load(cfg_path)
    train(cfg, progress=False)
    log = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert json.loads(log[0])["lr"] == 3e-3 / 2  # step 1 runs at warmup 1/2 and logs that rate
    more = TrainConfig.load(llamagen_run(tmp_path, stage1=3, stage2=0, save_every=1))
    # the same manifest shape, other codes
    shutil.rmtree(tmp_path / "data")
    w = ShardWriter(tmp_path / "data", (4, 4), 48, "class", recipe="llamagen-c2i-b", shard_size=24)
    codes, cls = structured_codes(64, 4, 48, seed=1)
    w.add(codes, cls)
    w.close()
    with pytest.raises(TrainingError, match="data: the files in .* are not those the run trained on"):
        train(more, progress=False)
    with pytest.raises(TrainingError, match="data: the files"):
        load_run(cfg)
    base = torch.load(tmp_path / "base.pt", weights_only=True)
    shutil.rmtree(tmp_path / "data")
    llamagen_run(tmp_path, stage1=3, stage2=0)  # the original data again
    base["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in base["model"].items()}
    torch.save(base, tmp_path / "base.pt")
    with pytest.raises(TrainingError, match="model: the base model's weights are not those the run started from"):
        train(more, progress=False)
    capsys.readouterr()


def test_training_configs_that_cannot_mean_what_they_say(tmp_path, capsys):
    from flashar_adapt.training import TrainConfig, TrainingError, train
    from tests.train_helpers import llamagen_run

    with pytest.raises(TrainingError, match="stage1.steps \\+ stage2.steps is 0: there is nothing to train"):
        TrainConfig.load(llamagen_run(tmp_path / "a", stage1=0, stage2=0))
    with pytest.raises(TrainingError, match="out_dir 'data' is inside the data folder"):
        TrainConfig.load(llamagen_run(tmp_path / "b", out_dir="data"))
    (tmp_path / "f").mkdir()
    (tmp_path / "f" / "run").write_text("a user's file")
    with pytest.raises(TrainingError, match="out_dir '.*run' is a file, not a folder"):
        train(TrainConfig.load(llamagen_run(tmp_path / "f")), progress=False)
    with pytest.raises(TrainingError, match="out_dir '.*run/sub': cannot make the run folder"):
        train(TrainConfig.load(llamagen_run(tmp_path / "f", out_dir="run/sub")), progress=False)
    assert (tmp_path / "f" / "run").read_text() == "a user's file"
    cfg = TrainConfig.load(llamagen_run(tmp_path / "c", stage1=1, stage2=0))
    train(cfg, progress=False)
    out = capsys.readouterr().out
    assert "stage1.warmup_steps (2) is longer than the stage (1 steps)" in out
    (tmp_path / "c" / "run" / "checkpoint.pt").unlink()
    train(cfg, progress=False)
    assert (
        "holds no checkpoint (checkpoint.pt): starting from step 0, metrics.jsonl begins again"
        in capsys.readouterr().out
    )


# ---------------------------------------------------------------- a fifth pass: generate and recipes


def test_generate_and_inspect_refuse_labels_and_writes_they_would_get_wrong(tmp_path, capsys):
    import shutil

    from flashar_adapt.fmnist import ASSETS

    fm = tmp_path / "fm"
    shutil.copytree(ASSETS / "flashar", fm)  # written before file records: its classes.json may change
    for names, msg in ((["x"] * 10, "classes 0 and 1 are both named 'x'"), ([str(i) for i in range(12)], "names 12")):
        (fm / "classes.json").write_text(json.dumps(names))
        rc, err = _cli(capsys, "generate", "--export", fm, "--out", tmp_path / "o", "--classes", "3", "4")
        assert rc == 2 and msg in err and "classes.json" in err, err
    model = _patched_tiny()
    export = fa.export_merged(model, tmp_path / "exp", extra_files={"classes.json": json.dumps(["a"] * 1).encode()})
    (export / "classes.json").write_text(json.dumps(["b"]))  # recorded by the export: now it differs
    rc, err = _cli(capsys, "generate", "--export", export, "--out", tmp_path / "o", "--classes", "3")
    assert rc == 2 and "classes.json differs from what the export wrote" in err
    rc, err = _cli(capsys, "generate", "--export", export, "--out", tmp_path / "o", "--prompt-template", "fox")
    assert rc == 2 and "--prompt-template" in err and "must hold {prompt} once" in err
    mine = tmp_path / "mine.yaml"
    mine.write_text("keep me\n")
    for out, msg in ((mine, "exists; choose a new path"), (tmp_path, "is a folder")):
        rc, err = _cli(capsys, "inspect", export / "backbone" / "llamagen.pt", "--out", out)
        assert rc == 2 and msg in err, err
    assert mine.read_text() == "keep me\n"
    with pytest.raises(fa.RecipeError, match="modules.norm: path 'layers.0.attention_norm' is inside modules.layers"):
        fa.patch(tiny.llamagen(grid=4), tiny.llamagen_recipe(grid=4), **{"modules.norm": "layers.0.attention_norm"})


def test_a_lora_rank_wider_than_the_layers_is_said(capsys):
    pytest.importorskip("peft")
    from flashar_adapt.training.model import add_lora

    model = _patched_tiny()
    add_lora(model, r=4096)
    assert "lora.r 4096 is larger than the narrowest adapted layer" in capsys.readouterr().out
    model = _patched_tiny()
    add_lora(model, r=2)
    assert "lora.r" not in capsys.readouterr().out
