"""Run identity by content: a checkpoint records the config and the resolved recipe that made
it; resuming it, exporting it and generating from it compare both with what is given now and
name every difference (a checkpoint that records neither is refused the same way), unless
``--allow-config-change``. ``export`` says which step and stage it exports and refuses a run
that is training now or stopped short of its config (``--allow-unfinished``)."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import pytest
import torch
import yaml

import flashar_adapt as fa
from flashar_adapt.commands import main
from flashar_adapt.export import ExportError, export_run
from flashar_adapt.files import exclusive_lock
from flashar_adapt.training import (
    TrainConfig,
    TrainingError,
    build_model_from_run,
    load_checkpoint,
    load_run,
    save_checkpoint,
    train,
)
from tests.train_helpers import LLAMAGEN_OVERRIDES, llamagen_run

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A 2-step stage-1 run whose recipe is a YAML file beside its config (edited in place below)."""
    root = tmp_path_factory.mktemp("ident")
    recipe = fa.load_recipe("llamagen-c2i-b").replace(**LLAMAGEN_OVERRIDES).to_dict()
    recipe["name"] = "my-c2i"
    recipe["flashar"]["branch_layer"] = -1
    (root / "my-c2i.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    cfg = llamagen_run(root, stage1=2, stage2=0, recipe="my-c2i.yaml", recipe_overrides={})
    train(TrainConfig.load(cfg), progress=False)
    return root


def _copy(root: Path, dst: Path) -> Path:
    shutil.copytree(root, dst, ignore=shutil.ignore_patterns(".flashar.lock"))
    return dst / "cfg.yaml"


def _edit_recipe(cfg_path: Path, **flashar) -> None:
    path = cfg_path.parent / "my-c2i.yaml"
    r = yaml.safe_load(path.read_text())
    r["flashar"].update(flashar)
    path.write_text(yaml.safe_dump(r, sort_keys=False))


def test_a_recipe_edited_in_place_is_named_on_resume_export_and_generate(finished, tmp_path, capsys):
    cfg_path = _copy(finished, tmp_path / "r")
    ckpt = tmp_path / "r" / "run" / "checkpoint.pt"
    before = ckpt.read_bytes()
    _edit_recipe(cfg_path, branch_layer=-2)  # same file, same config: only its content changed
    cfg = TrainConfig.load(cfg_path)
    with pytest.raises(TrainingError, match=r"differs at recipe\.flashar\.branch_layer: -1 -> -2"):
        train(cfg, progress=False)
    assert ckpt.read_bytes() == before
    with pytest.raises(TrainingError, match=r"recipe\.flashar\.branch_layer: -1 -> -2"):
        build_model_from_run(cfg)
    for argv in (
        ["export", "--config", str(cfg_path), "--out", str(tmp_path / "exp")],
        ["generate", "--config", str(cfg_path), "--out", str(tmp_path / "gen"), "--no-progress"],
    ):
        rc = main(argv)
        err = capsys.readouterr().err
        assert rc == 2 and "recipe.flashar.branch_layer: -1 -> -2" in err and "--allow-config-change" in err, err
        assert not Path(argv[4]).exists()
    # told to, each goes on and says what differs
    with pytest.warns(UserWarning, match=r"recipe\.flashar\.branch_layer"):
        rc = main(["export", "--config", str(cfg_path), "--out", str(tmp_path / "exp"), "--allow-config-change"])
    assert rc == 0
    # description, name, match: free (they do not change what the run computes)
    _edit_recipe(cfg_path, branch_layer=-1)
    r = yaml.safe_load((cfg_path.parent / "my-c2i.yaml").read_text())
    r["description"] = "edited"
    (cfg_path.parent / "my-c2i.yaml").write_text(yaml.safe_dump(r, sort_keys=False))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        build_model_from_run(TrainConfig.load(cfg_path))
    assert not [w for w in seen if "changed config" in str(w.message)]


def test_export_config_after_recipe_overrides_changed_is_refused(finished, tmp_path, capsys):
    cfg_path = _copy(finished, tmp_path / "r")
    d = yaml.safe_load(cfg_path.read_text())
    d["recipe_overrides"] = {"flashar.branch_layer": -3}
    cfg_path.write_text(yaml.safe_dump(d))
    rc = main(["export", "--config", str(cfg_path), "--out", str(tmp_path / "exp")])
    err = capsys.readouterr().err
    assert rc == 2 and not (tmp_path / "exp").exists()
    assert (
        "recipe_overrides.flashar.branch_layer: <unset> -> -3" in err and "recipe.flashar.branch_layer: -1 -> -3" in err
    )


def test_a_checkpoint_without_a_record_is_refused_unless_allowed(finished, tmp_path, capsys):
    cfg_path = _copy(finished, tmp_path / "r")
    ckpt = tmp_path / "r" / "run" / "checkpoint.pt"
    state = load_checkpoint(ckpt)
    del state["config"], state["recipe_config"]  # what a checkpoint of an older version holds
    save_checkpoint(ckpt, state)
    cfg = TrainConfig.load(cfg_path)
    for call in (lambda: train(cfg, progress=False), lambda: build_model_from_run(cfg)):
        with pytest.raises(TrainingError, match="config: not recorded in the checkpoint; recipe content: not recorded"):
            call()
    rc = main(["export", "--config", str(cfg_path), "--out", str(tmp_path / "exp")])
    assert rc == 2 and "not recorded" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="not recorded"):
        model, point = load_run(cfg, allow_config_change=True)
    assert point.step == 2 and point.finished
    cfg.stage1.steps = 3
    with pytest.warns(UserWarning, match="not recorded"):
        train(cfg, progress=False, allow_config_change=True)
    assert load_checkpoint(ckpt)["recipe_config"]["flashar"]["branch_layer"] == -1  # recorded from now on


def test_export_prints_the_step_and_stage_and_refuses_an_unfinished_run(finished, tmp_path, capsys):
    cfg_path = _copy(finished, tmp_path / "r")
    rc = main(["export", "--config", str(cfg_path), "--out", str(tmp_path / "e1")])
    out = capsys.readouterr().out
    assert rc == 0 and f"exporting run {tmp_path / 'r' / 'run'} at step 2 of 2 (stage 1, finished)" in out
    # stage 2 configured, never run: the checkpoint is stage 1's last
    d = yaml.safe_load(cfg_path.read_text())
    d["stage2"]["steps"] = 3
    cfg_path.write_text(yaml.safe_dump(d))
    rc = main(["export", "--config", str(cfg_path), "--out", str(tmp_path / "e2")])
    err = capsys.readouterr().err
    assert rc == 2 and not (tmp_path / "e2").exists()
    assert "is at step 2 of 5 (stage 1 done; stage 2, 3 steps, not started)" in err and "--allow-unfinished" in err
    rc = main(["export", "--config", str(cfg_path), "--out", str(tmp_path / "e2"), "--allow-unfinished"])
    assert rc == 0 and "at step 2 of 5 (stage 1 done; stage 2, 3 steps, not started)" in capsys.readouterr().out
    # stopped inside stage 2
    cfg = TrainConfig.load(cfg_path)
    cfg.stage2.steps = 1
    train(cfg, progress=False)
    cfg.stage2.steps = 3  # more steps planned: a changed config past the boundary, and unfinished
    with pytest.raises(ExportError, match=r"differs at stage2\.steps: 1 -> 3"):
        export_run(cfg, tmp_path / "e3", log=lambda s: None)
    said = []
    with pytest.warns(UserWarning, match=r"stage2\.steps"):
        export_run(cfg, tmp_path / "e3", log=said.append, allow_config_change=True, allow_unfinished=True)
    assert said == [f"exporting run {cfg.out_dir} at step 3 of 5 (stage 2, unfinished: 2 steps to go)"]


def test_export_of_a_run_that_is_training_now_is_refused(finished, tmp_path, capsys):
    cfg_path = _copy(finished, tmp_path / "r")
    cfg = TrainConfig.load(cfg_path)
    with exclusive_lock(cfg.out_dir, TrainingError, "train run"):  # what a running `train` holds
        rc = main(["export", "--config", str(cfg_path), "--out", str(tmp_path / "exp")])
        err = capsys.readouterr().err
        assert rc == 2 and "is being trained now (pid" in err and "--allow-unfinished" in err
        assert not (tmp_path / "exp").exists()
        rc = main(["export", "--config", str(cfg_path), "--out", str(tmp_path / "exp"), "--allow-unfinished"])
        assert rc == 0 and "(still training)" in capsys.readouterr().out
    assert fa.load_adapted(tmp_path / "exp").generate(torch.tensor([1]), top_k=1).shape == (1, 4, 4)


def test_the_same_recipe_and_model_spelled_another_way_are_the_same_run(finished, tmp_path):
    """The recipe is compared by its resolved content, so the same recipe read from another
    file is the same run; the model spec's old key ``backend:`` is ``format:``. Content that
    differs is still named."""
    cfg_path = _copy(finished, tmp_path / "r")
    d = yaml.safe_load(cfg_path.read_text())
    (cfg_path.parent / "copy").mkdir()
    shutil.copy(cfg_path.parent / "my-c2i.yaml", cfg_path.parent / "copy" / "my-c2i.yaml")
    d["recipe"] = "copy/my-c2i.yaml"  # was "my-c2i.yaml": the same recipe from another file
    d["model"]["backend"] = d["model"].pop("format")
    cfg_path.write_text(yaml.safe_dump(d))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        build_model_from_run(TrainConfig.load(cfg_path))
    assert not [w for w in seen if "changed config" in str(w.message)]
    path = cfg_path.parent / "copy" / "my-c2i.yaml"
    r = yaml.safe_load(path.read_text())
    r["flashar"]["branch_layer"] = -2
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    with pytest.raises(TrainingError, match=r"recipe\.flashar\.branch_layer: -1 -> -2"):
        build_model_from_run(TrainConfig.load(cfg_path))
