"""Nothing lost, nothing silent (round two): the one validation layer for configs, the
safe-path helper, the CLI error boundary, export/resume/lock rules, hostile recipes, and
hypothesis fuzzing of training configs, export folders and shard manifests.

Training here is tiny (a 5-layer dim-32 LlamaGen, 2 steps, trained once per module), so the
file stays cheap."""

from __future__ import annotations

import json
import math
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import flashar_adapt as fa
from flashar_adapt import commands
from flashar_adapt.errors import FlashARError
from flashar_adapt.export import ExportError
from flashar_adapt.files import exclusive_lock, inside
from flashar_adapt.shards import DataError, ShardDataset, ShardWriter
from flashar_adapt.training import TrainConfig, TrainingError, train
from tests import tiny
from tests.train_helpers import llamagen_run, structured_codes

# subprocesses import `tests.*` (a package) from the repository root
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(root, trained model, a pristine export of it): one 2-step run for the whole module."""
    root = tmp_path_factory.mktemp("trained")
    cfg = llamagen_run(root, stage1=2, stage2=0)
    model = train(TrainConfig.load(cfg), progress=False)
    exp = fa.export_merged(model, root / "pristine-export")
    return root, model, exp


def _copy_run(root: Path, dst: Path) -> Path:
    shutil.copytree(root, dst, ignore=shutil.ignore_patterns("*export*", ".flashar.lock"))
    return dst / "cfg.yaml"


def _tree(p: Path) -> dict:
    return {str(q.relative_to(p)): q.read_bytes() for q in sorted(p.rglob("*")) if q.is_file()}


# ---------------------------------------------------------------- export


def test_export_refuses_to_replace_what_is_not_an_export(trained, tmp_path):
    root, model, _ = trained
    thesis = tmp_path / "p"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("years of work")
    run = _copy_run(root, tmp_path / "proj").parent
    a_file = tmp_path / "notes.txt"
    a_file.write_text("keep me")
    for target, named in [
        (thesis, "thesis.tex"),
        (run, "cfg.yaml"),
        (run / "run", "checkpoint.pt"),
        (a_file, "not a folder"),
    ]:
        before = _tree(target) if target.is_dir() else target.read_bytes()
        with pytest.raises(ExportError, match=named):
            fa.export_merged(model, target)
        assert (_tree(target) if target.is_dir() else target.read_bytes()) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "p", "proj"]  # no temp or .old left
    # a previous export is replaced; an empty folder is used; an export someone added to is not
    out = fa.export_merged(model, tmp_path / "exp")
    fa.export_merged(model, out)
    (tmp_path / "empty").mkdir()
    fa.export_merged(model, tmp_path / "empty")
    (out / "my-notes.md").write_text("mine")
    with pytest.raises(ExportError, match="my-notes.md"):
        fa.export_merged(model, out)
    assert (out / "my-notes.md").read_text() == "mine"


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_export_files_follow_the_umask(trained, tmp_path, mask):
    _, model, _ = trained
    old = os.umask(mask)
    try:
        out = fa.export_merged(model, tmp_path / "exp")
    finally:
        os.umask(old)
    for p in [out, *out.rglob("*")]:
        want = (0o777 if p.is_dir() else 0o666) & ~mask
        assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode))


def test_edited_export_recipe_is_refused(trained, tmp_path):
    _, _, exp = trained
    out = tmp_path / "exp"
    shutil.copytree(exp, out)
    r = yaml.safe_load((out / "recipe.yaml").read_text())
    r["description"] = "my own words"  # does not change what the weights compute
    (out / "recipe.yaml").write_text(yaml.safe_dump(r))
    fa.load_adapted(out)
    old = r["flashar"]["branch_layer"]
    r["flashar"]["branch_layer"] = old - 1  # same shapes, different model: the weights no longer fit
    (out / "recipe.yaml").write_text(yaml.safe_dump(r))
    with pytest.raises(ExportError, match=rf"flashar.branch_layer \({old} -> {old - 1}\)"):
        fa.load_adapted(out)


def _set_cfg(key, value):
    def f(out):
        cfg = json.loads((out / "flashar_config.json").read_text())
        node = cfg
        *path, last = key.split(".")
        for k in path:
            node = node[k]
        node[last] = value
        (out / "flashar_config.json").write_text(json.dumps(cfg))

    return f


def _drop_cfg(*keys):
    def f(out):
        cfg = json.loads((out / "flashar_config.json").read_text())
        for key in keys:
            del cfg[key]
        (out / "flashar_config.json").write_text(json.dumps(cfg))

    return f


_OLD_EXPORT = ("backbone_files", "files", "config_sha256")  # what exports written before file records lack


def _truncate_biggest(out):
    p = max((q for q in (out / "backbone").rglob("*") if q.is_file()), key=lambda q: q.stat().st_size)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _link_outside(out):
    outside = out.parent / "elsewhere.safetensors"
    shutil.copy(out / "flashar.safetensors", outside)
    (out / "flashar.safetensors").unlink()
    (out / "flashar.safetensors").symlink_to(outside)


BROKEN_EXPORTS = {
    "missing recipe.yaml": (lambda out: (out / "recipe.yaml").unlink(), "recipe.yaml: missing"),
    "config not JSON": (lambda out: (out / "flashar_config.json").write_text("{not json"), "not valid JSON"),
    "config a list": (lambda out: (out / "flashar_config.json").write_text("[]"), "JSON object"),
    "config not UTF-8": (lambda out: (out / "flashar_config.json").write_bytes(b"\xff\xfe{"), "not valid JSON"),
    "format a number": (_set_cfg("backbone.format", 5), "backbone.format: must be a model format name"),
    "unknown format": (_set_cfg("backbone.format", "nope"), "unknown model format 'nope'"),
    "old backend key a number": (_set_cfg("backend", 5), "backend: must be a model format name"),
    "fixed_gate NaN": (_set_cfg("fixed_gate", float("nan")), "fixed_gate: must be a finite number"),
    "backbone file escapes": (_set_cfg("backbone.checkpoint", "../../../base.pt"), "outside the folder"),
    "backbone file absolute": (_set_cfg("backbone.checkpoint", "/etc/passwd"), "absolute path"),
    "truncated backbone": (_truncate_biggest, "llamagen.pt differs from what the export wrote"),
    "truncated backbone of an export without a file record": (
        lambda out: (_truncate_biggest(out), _drop_cfg(*_OLD_EXPORT)(out)),
        "cannot load the backbone",
    ),
    "symlink to a file outside": (_link_outside, "outside"),
    "recipe not UTF-8": (lambda out: (out / "recipe.yaml").write_bytes(b"name: \xff"), "not UTF-8"),
    "recipe invalid": (lambda out: (out / "recipe.yaml").write_text("name: x\n"), "is required"),
    "weights not float": (
        lambda out: (
            save_file(
                {
                    k: torch.zeros(v.shape, dtype=torch.int32)
                    for k, v in load_file(str(out / "flashar.safetensors")).items()
                },
                str(out / "flashar.safetensors"),
            ),
            _drop_cfg(*_OLD_EXPORT)(out),
        ),
        "floating point",
    ),
    "FlashAR weights swapped for others of the same shapes": (
        lambda out: save_file(
            {k: v + 1 for k, v in load_file(str(out / "flashar.safetensors")).items()},
            str(out / "flashar.safetensors"),
        ),
        "flashar.safetensors differs from what the export wrote",
    ),
    "a valid value edited": (_set_cfg("fixed_gate", 0.5), "flashar_config.json was edited after the export"),
    "lora_layers_merged negative": (_set_cfg("lora_layers_merged", -1), "lora_layers_merged: must be"),
}


@pytest.mark.parametrize("case", list(BROKEN_EXPORTS))
def test_broken_export_folders_are_export_errors(trained, tmp_path, case):
    _, _, exp = trained
    out = tmp_path / "exp"
    shutil.copytree(exp, out)
    breaker, msg = BROKEN_EXPORTS[case]
    breaker(out)
    with pytest.raises(ExportError, match=msg):
        fa.load_adapted(out)


_JSON_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**6), 10**6),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.sampled_from(["..", "../x", "/etc/passwd", "llamagen.pt", ""]),
    st.lists(st.integers(-3, 3), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_fuzzed_export_folders_fail_only_with_export_error(trained, data):
    """Random damage to an export folder (files deleted, truncated, overwritten, linked out;
    config values replaced): load_adapted either loads or raises ExportError."""
    _, _, exp = trained
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "exp"
        shutil.copytree(exp, out)
        files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
        for _ in range(data.draw(st.integers(1, 2))):
            action = data.draw(st.sampled_from(["delete", "truncate", "garbage", "link", "config", "spec"]))
            name = data.draw(st.sampled_from(files))
            p = out / name
            if action in ("config", "spec"):
                try:
                    cfg = json.loads((out / "flashar_config.json").read_text())
                    node = cfg if action == "config" else cfg["backbone"]
                    node[data.draw(st.sampled_from(sorted(node) + ["extra"]))] = data.draw(_JSON_VALUES)
                except (ValueError, KeyError, TypeError, FileNotFoundError):
                    continue  # already damaged beyond reading
                (out / "flashar_config.json").write_text(json.dumps(cfg))
            elif not p.is_file():
                continue
            elif action == "delete":
                p.unlink()
            elif action == "truncate":
                p.write_bytes(p.read_bytes()[: data.draw(st.integers(0, max(0, p.stat().st_size - 1)))])
            elif action == "garbage":
                p.write_bytes(data.draw(st.binary(max_size=64)))
            else:
                outside = Path(d) / "outside"
                outside.write_bytes(p.read_bytes())
                p.unlink()
                p.symlink_to(outside)
        try:
            fa.load_adapted(out)
        except ExportError:
            pass


# ---------------------------------------------------------------- resume and lock

CHANGES = {
    "stage1.lr": lambda c: setattr(c.stage1, "lr", c.stage1.lr * 100),
    "batch_size": lambda c: setattr(c, "batch_size", 4),
    "seed": lambda c: setattr(c, "seed", 7),
    "data": lambda c: setattr(c, "data", str(Path(c.data).with_name("data2"))),
    "stage1.steps": lambda c: setattr(c.stage1, "steps", 1),  # below the checkpoint's step
    "recipe_overrides.flashar.branch_layer": lambda c: c.recipe_overrides.update({"flashar.branch_layer": -2}),
}


def test_resume_with_a_changed_config_is_refused(trained, tmp_path):
    cfg_path = _copy_run(trained[0], tmp_path / "r")
    shutil.copytree(tmp_path / "r" / "data", tmp_path / "r" / "data2")
    ckpt = tmp_path / "r" / "run" / "checkpoint.pt"
    before = ckpt.read_bytes()
    for key, change in CHANGES.items():
        cfg = TrainConfig.load(cfg_path)
        change(cfg)
        with pytest.raises(TrainingError, match="differs at " + key.replace(".", r"\.")):
            train(cfg, progress=False)
    assert ckpt.read_bytes() == before
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(ckpt.stat().st_mode) == 0o666 & ~mask  # run files follow the umask too
    cfg = TrainConfig.load(cfg_path)
    cfg.log_every = 5  # changes nothing the run computes: no complaint
    train(cfg, progress=False)
    rc = subprocess.run(
        [sys.executable, "-m", "flashar_adapt.commands", "train", "--help"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "--allow-config-change" in rc.stdout


def test_allowed_config_change_is_listed_and_a_torn_metrics_line_is_dropped(trained, tmp_path):
    cfg_path = _copy_run(trained[0], tmp_path / "r")
    log = tmp_path / "r" / "run" / "metrics.jsonl"
    whole = log.read_text()
    log.write_text(whole + '{"step": 3, "stage": 1, "lo')  # what a kill mid-append leaves
    cfg = TrainConfig.load(cfg_path)
    cfg.stage1.steps = 3
    with pytest.warns(UserWarning) as w:
        train(cfg, progress=False, allow_config_change=True)
    msgs = " | ".join(str(x.message) for x in w)
    assert "stage1.steps: 2 -> 3" in msgs and "dropped 1 line(s) that are not whole records (line 3)" in msgs
    assert [json.loads(ln)["step"] for ln in log.read_text().splitlines()] == [1, 2, 3]


def test_runs_sharing_stage_1_may_differ_in_stage_2(trained, tmp_path):
    """The checkpoint sits at the stage boundary (stage 1 done, no stage-2 step yet): stage-2
    settings are still free, so one stage-1 run can be copied and resumed into variants."""
    import warnings

    cfg = TrainConfig.load(_copy_run(trained[0], tmp_path / "r"))
    cfg.stage2.steps, cfg.stage2.lr, cfg.stage2.backbone_lr_scale = 1, 1e-3, 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "changed config" warning either
        train(cfg, progress=False)
    cfg.stage2.steps = 2  # the run is now past the boundary: stage 2 is fixed
    with pytest.raises(TrainingError, match="differs at stage2.steps"):
        train(cfg, progress=False)


_LOCKER = """
import sys, time
from flashar_adapt.files import exclusive_lock
with exclusive_lock(sys.argv[1], RuntimeError):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_two_runs_cannot_share_an_out_dir(trained, tmp_path):
    cfg_path = _copy_run(trained[0], tmp_path / "r")
    cfg = TrainConfig.load(cfg_path)
    holder = subprocess.Popen([sys.executable, "-c", _LOCKER, cfg.out_dir], stdout=subprocess.PIPE, env=ENV, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TrainingError, match=f"in use by another train run \\(pid {holder.pid}\\)"):
            train(cfg, progress=False)
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock, nothing stale is left
        holder.wait()
    train(cfg, progress=False)
    with exclusive_lock(cfg.out_dir, TrainingError):  # and in one process, a second holder is refused too
        with pytest.raises(TrainingError, match="in use"):
            train(cfg, progress=False)


# ---------------------------------------------------------------- training config values


def _base_cfg(**extra) -> dict:
    d = {
        "model": {"backend": "llamagen", "checkpoint": "base.pt"},
        "recipe": "llamagen-c2i-b",
        "data": "d",
        "out_dir": "o",
    }
    d.update(extra)
    return d


BAD_VALUES = [
    ({"stage1": {"lr": -1e-3}}, "stage1.lr must be a number > 0"),
    ({"stage2": {"lr": float("nan")}}, "stage2.lr must be a finite number"),
    ({"grad_clip": -1.0}, "grad_clip must be a number >= 0"),
    ({"cond_dropout": 5}, r"cond_dropout must be a number in \[0, 1\]"),
    ({"stage1": {"min_lr_ratio": 7}}, r"stage1.min_lr_ratio must be a number in \[0, 1\]"),
    ({"save_every": 0}, "save_every must be an integer >= 1"),
    ({"fixed_gate": float("nan")}, "fixed_gate must be a finite number"),
    ({"fixed_gate": 7.0}, r"fixed_gate must be a number in \[0, 1\]"),
    ({"betas": [0.9]}, "betas must have 2 entries"),
    ({"betas": [0.9, 1.5]}, r"betas\[1\] must be a number in \[0, 1\)"),
    ({"stage1": {"steps": 1.5}}, "stage1.steps must be an integer"),
    ({"stage2": {"lora": "yes"}}, "stage2.lora must be true or false"),
    ({"mixed_precision": "fp8"}, "mixed_precision must be one of"),
    ({"seed": -1}, "seed must be an integer"),
    ({"batch_size": True}, "batch_size must be an integer"),
    ({"stage1": [1, 2]}, "stage1 must be a mapping"),
    ({"recipe_overrides": [1]}, "recipe_overrides must be a mapping"),
]


@pytest.mark.parametrize("extra,msg", BAD_VALUES, ids=[m.split(" ")[0] for _, m in BAD_VALUES])
def test_training_config_values_are_checked_on_load(extra, msg):
    with pytest.raises(TrainingError, match=msg):
        TrainConfig.from_dict(_base_cfg(**extra), source="cfg.yaml")


def test_training_config_yaml_reads_like_a_user_writes_it(tmp_path):
    (tmp_path / "cfg.yaml").write_text(
        "model: {backend: llamagen}\nrecipe: my.yaml\ndata: d\nout_dir: o\n"
        "stage1: {lr: 5e-5, steps: 3}\nmixed_precision: no\n"
    )
    cfg = TrainConfig.load(tmp_path / "cfg.yaml")
    assert cfg.stage1.lr == 5e-5 and cfg.mixed_precision == "no"
    assert cfg.recipe == str((tmp_path / "my.yaml").resolve())  # a recipe file beside the config
    (tmp_path / "bad.yaml").write_bytes(b"recipe: \xff\n")
    with pytest.raises(TrainingError, match="not UTF-8"):
        TrainConfig.load(tmp_path / "bad.yaml")


_CFG_KEYS = [
    "model",
    "recipe",
    "data",
    "out_dir",
    "recipe_overrides",
    "stage1",
    "stage2",
    "batch_size",
    "grad_accum",
    "weight_decay",
    "betas",
    "grad_clip",
    "w_v",
    "w_kd",
    "kd_temperature",
    "w_kd_fused",
    "kd_fused_temperature",
    "cond_dropout",
    "mixed_precision",
    "gradient_checkpointing",
    "fixed_gate",
    "save_every",
    "log_every",
    "seed",
    "cpu",
    "stage1.steps",
    "stage1.lr",
    "stage1.warmup_steps",
    "stage1.min_lr_ratio",
    "stage2.backbone_lr_scale",
    "stage2.lora",
    "stage2.lora_lr_scale",
    "bogus",
    "stage2.bogus",
]
_CFG_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=True),
    st.text(max_size=6),
    st.sampled_from(["no", "bf16", "5e-5", "1e400"]),
    st.lists(st.floats(-2, 2), max_size=3),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(edits=st.lists(st.tuples(st.sampled_from(_CFG_KEYS), _CFG_VALUES, st.booleans()), min_size=1, max_size=4))
def test_fuzzed_training_configs_fail_only_with_training_error(edits):
    """Random values, deletions and unknown keys: TrainingError naming a key, or a config whose
    every number is finite and in range (so the loop never sees a value it cannot use)."""
    d = _base_cfg(stage1={"steps": 2, "lr": 1e-3}, stage2={"steps": 0})
    for key, value, delete in edits:
        node, *rest = key.split(".")
        target, name = (d, node) if not rest else (d.setdefault(node, {}), rest[0])
        if not isinstance(target, dict):
            continue
        if delete:
            target.pop(name, None)
        else:
            target[name] = value
    try:
        cfg = TrainConfig.from_dict(d, source="cfg.yaml")
    except TrainingError as e:
        assert str(e).startswith("cfg.yaml: ")
        return
    for st_ in (cfg.stage1, cfg.stage2):
        assert st_.lr > 0 and math.isfinite(st_.lr) and 0 <= st_.min_lr_ratio <= 1 and st_.steps >= 0
    assert 0 <= cfg.cond_dropout <= 1 and cfg.grad_clip >= 0 and cfg.save_every >= 1 and cfg.batch_size >= 1
    assert cfg.fixed_gate is None or 0 <= cfg.fixed_gate <= 1
    assert all(0 <= b < 1 for b in cfg.betas) and cfg.mixed_precision in ("no", "bf16", "fp16")


# ---------------------------------------------------------------- hostile recipes


def _recipe_dict(**lora) -> dict:
    d = fa.load_recipe("llamagen-c2i-b").to_dict()
    d["lora"].update(lora)
    return d


def test_yaml_aliases_that_expand_are_refused(tmp_path):
    lines = ["name: x", "match:", '  a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(1, 9):
        lines.append(f"  a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * 9) + "]")
    (tmp_path / "laughs.yaml").write_text("\n".join(lines) + "\n")
    assert (tmp_path / "laughs.yaml").stat().st_size < 1500
    # refused while parsing, before anything expands (it used to take 27 s, then MemoryError)
    with pytest.raises(fa.RecipeError, match="aliases that expand are refused") as e:
        fa.load_recipe(tmp_path / "laughs.yaml")
    assert e.value.key == "<yaml>"
    # an alias to a plain value expands to nothing bigger: allowed
    d = _recipe_dict()
    d["match"] = {"codes": "ALIAS"}
    text = yaml.safe_dump(d, sort_keys=False).replace("codebook_size: 16384", "codebook_size: &k 16384")
    text = text.replace("codes: ALIAS", "codes: *k")
    (tmp_path / "ok.yaml").write_text(text)
    assert fa.load_recipe(tmp_path / "ok.yaml").match == {"codes": 16384}


@pytest.mark.parametrize(
    "pattern,msg",
    [
        (r"(?:[a-z0-9_.]+)+X", "nested quantifiers"),
        (r"(a|aa)+X", "repeats an alternation"),
        (r"layers\.(\d+", "not a valid regular expression"),
        (r"(\w+)\1", "back-reference"),
        (r".*.*.*.*X", "holds 4 repeats"),
        ("x" * 201, "longer than 200"),
    ],
)
def test_bad_lora_target_regexes_are_refused_on_load(pattern, msg):
    # refused from the pattern's shape, before it is ever matched against a module name
    with pytest.raises(fa.RecipeError, match=msg) as e:
        fa.recipe_from_dict(_recipe_dict(targets=[r"layers\.\d+\.attention\.wo", pattern]))
    assert e.value.key == "lora.targets[1]"


def test_every_shipped_lora_target_passes_the_bound():
    for name in fa.list_recipes():
        fa.load_recipe(name)  # would raise on a refused pattern


def test_absurd_gate_hidden_is_refused_and_non_utf8_recipe_is_a_recipe_error(tmp_path):
    d = _recipe_dict()
    d["flashar"]["gate_hidden"] = 10**12
    with pytest.raises(fa.RecipeError, match="must be <= 65536") as e:
        fa.recipe_from_dict(d)
    assert e.value.key == "flashar.gate_hidden"
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    with pytest.raises(fa.RecipeError, match=r"not UTF-8 text \(byte 0xe9"):
        fa.load_recipe(tmp_path / "latin1.yaml")


# ---------------------------------------------------------------- shards


def test_shard_writer_refuses_what_it_would_corrupt(tmp_path):
    w = ShardWriter(tmp_path / "d", (4, 4), 48, "class", num_classes=10)
    codes, cls = structured_codes(4, 4, 48)
    for bad_codes, bad_cls, msg in [
        (codes.float() + 0.5, cls, "codes must be integers"),
        (codes.bool(), cls, "codes must be integers"),
        (codes, cls.float(), "class ids must be integers"),
        (codes, torch.tensor([0, 1, -5, 2]), "must be >= 0"),
        (codes, torch.tensor([0, 1, 999, 2]), r"must lie in \[0, 10\]"),
    ]:
        with pytest.raises(DataError, match=msg):
            w.add(bad_codes, bad_cls)
    w.add(codes, cls)
    w.close()
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["num_classes"] == 10
    with pytest.raises(DataError, match="codebook_size"):
        ShardWriter(tmp_path / "e", (4, 4), 0)


def test_class_ids_the_model_lacks_are_named_with_their_file(tmp_path):
    w = ShardWriter(tmp_path / "d", (4, 4), 48, "class", shard_size=4)  # no num_classes: not checked here
    codes, cls = structured_codes(8, 4, 48)
    cls[6] = 999
    w.add(codes, cls)
    w.close()
    ds = ShardDataset(tmp_path / "d")
    ds.limit_classes(10, 10)  # what training does with the recipe's classes (+ the null class)
    ds.get(torch.arange(4))
    with pytest.raises(DataError, match=r"shard-00001.safetensors: class ids outside \[0, 10\]"):
        ds.get(torch.arange(4, 8))
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    m["num_classes"] = 1000
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match="1000 classes"):
        ShardDataset(tmp_path / "d").limit_classes(10, 10)


@pytest.mark.parametrize(
    "name,msg",
    [
        ("../outside.safetensors", "outside the folder"),
        ("/tmp/x.safetensors", "absolute path"),
        ("link.safetensors", "outside"),
        (7, "must be a file name"),
    ],
)
def test_manifest_file_names_stay_inside_the_folder(tmp_path, name, msg):
    w = ShardWriter(tmp_path / "d", (4, 4), 48, "class")
    w.add(*structured_codes(4, 4, 48))
    w.close()
    shutil.copy(tmp_path / "d" / "shard-00000.safetensors", tmp_path / "outside.safetensors")
    (tmp_path / "d" / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    m["shards"][0]["file"] = name
    (tmp_path / "d" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DataError, match=msg):
        ShardDataset(tmp_path / "d")


def test_a_manifest_listing_a_shard_twice_is_refused(tmp_path):
    w = ShardWriter(tmp_path / "d", (4, 4), 48, "class", shard_size=2)
    w.add(*structured_codes(4, 4, 48))
    w.close()
    m = json.loads((tmp_path / "d" / "manifest.json").read_text())
    for second in ("shard-00000.safetensors", "./shard-00000.safetensors", "sub/../shard-00000.safetensors"):
        m["shards"][1]["file"] = second
        (tmp_path / "d" / "manifest.json").write_text(json.dumps(m))
        with pytest.raises(DataError, match=r"shard .* is listed twice \(first as 'shard-00000.safetensors'\)"):
            ShardDataset(tmp_path / "d")


def test_inside_is_the_one_path_rule(tmp_path):
    (tmp_path / "a").mkdir()
    assert inside(tmp_path / "a", "b/c.txt", ValueError) == tmp_path / "a" / "b" / "c.txt"
    for bad in ("../b", "/abs", "", "b/../../c", None):
        with pytest.raises(ValueError):
            inside(tmp_path / "a", bad, ValueError)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards") / "d"
    w = ShardWriter(d, (4, 4), 48, "class", shard_size=3, num_classes=10)
    w.add(*structured_codes(7, 4, 48))
    w.close()
    return d


_MANIFEST_KEYS = [
    "format",
    "grid",
    "codebook_size",
    "cond_kind",
    "num_examples",
    "num_classes",
    "shards",
    "recipe",
    "shards.0.file",
    "shards.0.num_examples",
    "shards.1",
    "shards.2.file",
    "extra",
]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_data_folders_fail_only_with_data_error(shards, data):
    """Random manifest values and damaged shard files: opening the folder and reading every
    example either works or raises DataError."""
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "d"
        shutil.copytree(shards, root)
        m = json.loads((root / "manifest.json").read_text())
        for _ in range(data.draw(st.integers(1, 3))):
            key = data.draw(st.sampled_from(_MANIFEST_KEYS + ["shard-file"]))
            if key == "shard-file":
                p = root / data.draw(st.sampled_from(["shard-00000.safetensors", "shard-00002.safetensors"]))
                if p.exists():
                    p.write_bytes(p.read_bytes()[: data.draw(st.integers(0, p.stat().st_size))])
                continue
            parts = key.split(".")
            node = m
            for k in parts[:-1]:
                node = (
                    node[int(k)]
                    if isinstance(node, list) and k.isdigit() and int(k) < len(node)
                    else node.get(k)
                    if isinstance(node, dict)
                    else None
                )
                if node is None:
                    break
            last = parts[-1]
            if isinstance(node, list) and last.isdigit() and int(last) < len(node):
                node[int(last)] = data.draw(_JSON_VALUES)
            elif isinstance(node, dict):
                node[last] = data.draw(_JSON_VALUES)
        (root / "manifest.json").write_text(json.dumps(m))
        try:
            ds = ShardDataset(root)
            ds.limit_classes(10, 10)
            if len(ds):
                ds.get(torch.arange(len(ds)))
        except DataError:
            pass


# ---------------------------------------------------------------- the CLI error boundary


def _cli(capsys, *argv) -> tuple[int, str, str]:
    try:
        rc = commands.main([str(a) for a in argv])
    except SystemExit as e:  # argparse usage errors
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


def _one_line(err: str, *words: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_cli_turns_bad_input_into_one_line_and_exit_2(tmp_path, capsys):
    cfg = llamagen_run(tmp_path / "proj", stage1=1, stage2=0)  # written, never trained
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    unknown_format = tmp_path / "unknown_format.yaml"
    unknown_format.write_text("model: {format: llamagenn}\nrecipe: fmnist-c2i\ndata: missing\nout_dir: run\n")
    cases = [
        (("train", "--config", tmp_path / "missing.yaml"), ["error:", "training config not found"]),
        (("export", "--config", cfg, "--out", tmp_path / "exp"), ["error:", "no checkpoint yet"]),
        (("inspect", tmp_path / "nonexistent"), ["error:", "no such file or folder"]),
        (("inspect", tmp_path / "latin1.yaml"), ["error:", "no model format recognises it"]),
        (("check", tmp_path / "nonexistent", "llamagen-c2i-b"), ["error:", "no such file or folder"]),
        (("show", tmp_path / "latin1.yaml"), ["recipe error:", "not UTF-8"]),
        (("show", "no-such-recipe"), ["recipe error:", "no recipe named"]),
        # a folder the user named is never silently skipped (the shipped recipe would be used)
        (("--recipe-dir", tmp_path / "nope", "show", "fmnist-c2i"), ["recipe error:", "nope: no such folder"]),
        (("recipes", "--recipe-dir", tmp_path / "latin1.yaml"), ["recipe error:", "not a folder"]),
        # the model's format is checked when the config is read, before data or weights
        (("train", "--config", unknown_format), ["error:", "unknown model format 'llamagenn'", "did you mean"]),
    ]
    for argv, words in cases:
        rc, _, err = _cli(capsys, *argv)
        assert rc == 2, (argv, err)
        _one_line(err, *words)
    for argv, option in (
        (("demo", "--tiny", "--batch", "0"), "--batch"),
        (("check", tmp_path, "--atol", "-1"), "--atol"),
    ):
        rc, _, err = _cli(capsys, *argv)
        assert rc == 2, (argv, err)
        _one_line(err, f"argument {option}: must be")  # a usage error too: one line, not the usage
    rc, _, err = _cli(capsys, "--debug", "train", "--config", tmp_path / "missing.yaml")
    assert rc == 2 and "Traceback" in err and "TrainingError" in err
    rc, _, err = _cli(capsys, "train", "--config", tmp_path / "missing.yaml", "--debug")
    assert rc == 2 and "Traceback" in err


def test_cli_keeps_the_traceback_of_a_bug(capsys, monkeypatch):
    monkeypatch.setattr(commands.recipes, "load_recipe", lambda *a: {}["a bug"])
    with pytest.raises(KeyError):
        commands.main(["show", "x"])


COMMANDS = (
    "recipes",
    "show",
    "demo",
    "inspect",
    "check",
    "train",
    "export",
    "tokenize",
    "generate",
    "sample",
    "evaluate",
)
# A child process in which the optional dependencies are not importable.
_WITHOUT_EXTRAS = (
    "import sys; sys.modules.update(dict.fromkeys(['accelerate', 'peft', 'transformers', 'matplotlib'])); "
    "from flashar_adapt.commands import main; sys.exit(main(sys.argv[1:]))"
)


def test_every_command_is_listed_and_a_missing_optional_dependency_is_one_line(tmp_path):
    def cli(*argv):
        return subprocess.run(
            [sys.executable, "-c", _WITHOUT_EXTRAS, *map(str, argv)],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )

    r = cli("--help")
    assert r.returncode == 0 and all(c in r.stdout for c in COMMANDS), r.stdout
    cfg = tmp_path / "run.yaml"
    cfg.write_text(
        yaml.safe_dump({"model": {"backend": "llamagen"}, "recipe": "llamagen-c2i-b", "data": "data", "out_dir": "run"})
    )
    r = cli("train", "--config", cfg)
    assert r.returncode == 2 and r.stdout == "", r.stderr
    _one_line(r.stderr, "error: flashar-adapt train needs accelerate", "pip install 'flashar-adapt[train]'")
    r = cli("--debug", "train", "--config", cfg)
    assert r.returncode == 2 and "ModuleNotFoundError" in r.stderr


def test_recipes_lists_the_good_ones_beside_a_broken_one(tmp_path, capsys):
    d = tmp_path / "mine"
    d.mkdir()
    good = fa.load_recipe("llamagen-c2i-b").to_dict()
    good["name"] = "mine-good"
    (d / "mine-good.yaml").write_text(yaml.safe_dump(good))
    (d / "mine-broken.yaml").write_text("name: [unclosed\n")
    for argv in (("--recipe-dir", d, "recipes"), ("recipes", "--recipe-dir", d)):  # either side of the subcommand
        rc, out, err = _cli(capsys, *argv)
        assert rc == 2 and "mine-good" in out and "llamagen-c2i-b" in out
        _one_line(err, "mine-broken", "BROKEN", "not valid YAML")
    rc, out, _ = _cli(capsys, "show", "mine-good", "--recipe-dir", d)
    assert rc == 0 and "name: mine-good" in out


def test_check_exits_2_when_the_recipe_does_not_fit(tmp_path, capsys):
    torch.save({"model": tiny.llamagen(grid=4).state_dict()}, tmp_path / "c2i.pt")
    d = fa.load_recipe("llamagen-c2i-b").to_dict()
    d.update(name="tiny")
    d["image"].update(codebook_size=48, grid=[4, 4])
    d["condition"].update(num_classes=10, null_class=10)
    d["flashar"]["branch_layer"] = 40  # the model has 5 layers
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(d))
    sizes = ["--set", "n_head=4", "--set", "block_size=16"]
    rc, out, err = _cli(capsys, "check", tmp_path / "c2i.pt", tmp_path / "tiny.yaml", *sizes)
    assert rc == 2 and "flashar.branch_layer" in out
    _one_line(err, "recipe error: flashar.branch_layer:")  # the refusal on stderr, as every other
    d["flashar"]["branch_layer"] = -1
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(d))
    rc, out, _ = _cli(capsys, "check", tmp_path / "c2i.pt", tmp_path / "tiny.yaml", *sizes)
    assert rc == 0, out
    from flashar_adapt.errors import InputError

    with pytest.raises(InputError, match="atol must be a finite number >= 0"):
        fa.check(tiny.llamagen(grid=4), fa.load_recipe(tmp_path / "tiny.yaml"), atol=-1)


def test_every_error_the_toolkit_raises_on_purpose_is_a_flashar_error():
    from flashar_adapt.errors import InputError

    for cls in (fa.RecipeError, DataError, ExportError, TrainingError, InputError):
        assert issubclass(cls, FlashARError)
    assert issubclass(TrainingError, RuntimeError) and issubclass(DataError, ValueError)  # old catches still work


def test_a_reader_that_stops_early_is_not_an_error():
    # `flashar-adapt recipes | head -1`: the pipe closes before the listing is written
    p = subprocess.Popen(
        [sys.executable, "-m", "flashar_adapt.commands", "recipes"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    p.stdout.close()  # before the child (still importing torch) writes a byte
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 0 and "Broken pipe" not in err and "Traceback" not in err, err
