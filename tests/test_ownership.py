"""Ownership: the toolkit removes or replaces only what it can prove is its own (a marker it
wrote: kind, target, pid, host, time; or a name it generated in this process), never by a
pattern built from a user's name. The property test runs export, train, tokenize and
generate into folder names full of glob metacharacters, dots, spaces, leading dashes and
non-ASCII letters, beside foreign siblings named like our temp folders, and asserts that
every foreign byte is still there."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flashar_adapt as fa
from flashar_adapt.commands import main
from flashar_adapt.export import EXPORT_KIND, ExportError
from flashar_adapt.files import (
    HOST,
    HOST_TAG,
    OWNER_FILE,
    atomic_write_bytes,
    owned_temp_dir,
    process_alive,
    remove_dead_temp_dirs,
    remove_dead_temp_files,
    target_lock,
    target_lock_path,
)
from flashar_adapt.generation import GENERATE_KIND, GenerateError, generate_to_folder
from flashar_adapt.image_folders import list_class_folder, tokenize_dataset
from flashar_adapt.tokenizers import load_tokenizer
from flashar_adapt.training import LOG, RUN_MARKER, TrainConfig, TrainingError, claim_run_folder, train
from tests import tiny
from tests.train_helpers import llamagen_run

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
PIL = pytest.importorskip("PIL.Image")


def dead_pid() -> int:
    """The pid of a process that has exited (reaped): what a killed run leaves in its marker."""
    r = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(r.stdout)
    assert not process_alive(pid)
    return pid


def snapshot(root: Path, skip: Path | None = None) -> dict:
    """Every entry under ``root`` (``skip``'s subtree aside): file bytes, '<dir>', or the link target."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in sorted(dirnames + filenames):
            p = Path(dirpath) / n
            if skip is not None and (p == skip or skip in p.parents):
                continue
            rel = str(p.relative_to(root))
            out[rel] = f"-> {os.readlink(p)}" if p.is_symlink() else "<dir>" if p.is_dir() else p.read_bytes()
    return out


def _bait(name: str) -> str:
    """A different name that a glob built from ``name`` would match (or at least a neighbour)."""
    swapped = name.replace("*", "zz").replace("?", "q").replace("[", "").replace("]", "")
    return swapped if swapped != name else name + "x"


def plant_foreign(parent: Path, name: str, pid: int) -> None:
    """Siblings of ``parent/name`` that are not ours: named like our temp and old folders but
    without our marker, named like what a glob over ``name`` would match, holding a marker for
    another target or kind, or our exact marker of a process that is alive (a live export)."""
    bait = _bait(name)
    for d in (f".{name}.tmp-x", f".{name}.old-2024", f".{name}.tmp-{pid}", f".{bait}.tmp-x", f".{bait}.old-1", bait):
        (parent / d).mkdir(parents=True, exist_ok=True)
        (parent / d / "thesis.tex").write_text(f"years of work in {d}")
    (parent / f".{name}.tmp-file").write_text("a file, not a folder")
    (parent / f".{name}.tmp-{HOST_TAG}-{pid}-abcdefgh").write_text("named like our temp file, in the parent")
    marked = {
        f".{name}.tmp-other": {"kind": EXPORT_KIND, "target": bait, "pid": pid, "host": HOST, "created": 0},
        f".{name}.tmp-kind": {"kind": "someone else", "target": name, "pid": pid, "host": HOST, "created": 0},
        f".{name}.tmp-live": {"kind": EXPORT_KIND, "target": name, "pid": os.getpid(), "host": HOST, "created": 0},
        f".{name}.old-live": {"kind": GENERATE_KIND, "target": name, "pid": os.getpid(), "host": HOST, "created": 0},
        f".{name}.tmp-away": {"kind": EXPORT_KIND, "target": name, "pid": pid, "host": "another-host", "created": 0},
    }
    for d, rec in marked.items():
        (parent / d).mkdir()
        (parent / d / OWNER_FILE).write_text(json.dumps(rec))
        (parent / d / "data.bin").write_bytes(os.urandom(64))
    os.symlink(parent / bait, parent / f".{name}.tmp-link")  # a link named like ours: never followed


# Folder names a user might type: glob metacharacters, dots, spaces, dashes, non-ASCII.
NAMES = st.text(alphabet=st.sampled_from(list("ab*?[]!.-_ éü中")), min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..") and s.strip() == s and len(s.encode()) < 80
)
SETTINGS = settings(
    max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture], derandomize=True
)
EXAMPLES = ("*", "run[v2]", "a?", "-lead", "with space", "ünï中", ".hidden", "a.tmp-1", "[!a]*")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A trained tiny run (its config), a patched model to export, an image folder, a pid of a dead process."""
    root = tmp_path_factory.mktemp("own")
    cfg = llamagen_run(root / "proj", stage1=1, stage2=0)
    model = fa.patch(tiny.llamagen(grid=14, vocab=256, n_layer=3, dim=32), "fmnist-c2i")
    tiny.randomize(model.flashar, 1)
    imgs = root / "imgs"
    g = torch.Generator().manual_seed(0)
    for c in range(2):
        for k in range(2):
            (imgs / f"c{c}").mkdir(parents=True, exist_ok=True)
            x = torch.randint(0, 256, (28, 28), generator=g, dtype=torch.uint8)
            PIL.fromarray(x.numpy(), "L").save(imgs / f"c{c}" / f"{k}.png")
    return {"root": root, "cfg": cfg, "model": model, "imgs": imgs, "pid": dead_pid()}


def _fresh_parent(world) -> Path:
    return Path(tempfile.mkdtemp(dir=world["root"], prefix="p-"))


def _check_untouched(parent: Path, target: Path, before: dict) -> None:
    after = snapshot(parent, skip=target)
    assert after == before, sorted(set(before) ^ set(after)) or "contents changed"
    assert not target_lock_path(target).exists()  # our lock goes with us


def _export_into(world, name: str) -> None:
    parent = _fresh_parent(world)
    plant_foreign(parent, name, world["pid"])
    target = parent / name
    before = snapshot(parent, skip=target)
    fa.export_merged(world["model"], target)
    fa.export_merged(world["model"], target)  # replaces the first (through an old- folder of ours)
    _check_untouched(parent, target, before)
    assert fa.load_adapted(target).generate(torch.tensor([1]), top_k=1).shape == (1, 14, 14)


def _generate_into(world, name: str) -> None:
    parent = _fresh_parent(world)
    plant_foreign(parent, name, world["pid"])
    target = parent / name
    before = snapshot(parent, skip=target)
    generate_to_folder(world["model"], [1, 2], target, progress=False, top_k=1)
    _check_untouched(parent, target, before)
    assert (target / "codes.safetensors").is_file() and OWNER_FILE not in os.listdir(target)


def _tokenize_into(world, name: str) -> None:
    parent = _fresh_parent(world)
    plant_foreign(parent, name, world["pid"])
    target = parent / name
    before = snapshot(parent, skip=target)
    items, _ = list_class_folder(world["imgs"])
    recipe = fa.load_recipe("fmnist-c2i")
    rep = tokenize_dataset(items, target, load_tokenizer(recipe), recipe, shard_size=3, progress=False)
    assert rep["num_examples"] == 4
    _check_untouched(parent, target, before)


def _train_into(world, name: str) -> None:
    parent = _fresh_parent(world)
    plant_foreign(parent, name, world["pid"])
    target = parent / name
    target.mkdir()
    inner = {  # inside the run folder: a user's files, named like our temp files too
        "notes.txt": b"mine",
        ".checkpoint.pt.tmp-x": b"not a temp file of ours",
        ".checkpoint.pt.partial.tmp": b"nor this",
        f".{LOG}.tmp-{HOST_TAG}-x-abcdefgh": b"nor this",
    }
    for n, b in inner.items():
        (target / n).write_bytes(b)
    before = snapshot(parent, skip=target)
    cfg = TrainConfig.load(world["cfg"])
    cfg.out_dir = str(target)
    train(cfg, progress=False)
    _check_untouched(parent, target, before)
    assert {n: (target / n).read_bytes() for n in inner} == inner
    assert (target / "checkpoint.pt").is_file()


TOOLS = {"export": _export_into, "generate": _generate_into, "tokenize": _tokenize_into, "train": _train_into}


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_nothing_foreign_is_ever_touched(world, tool):
    @SETTINGS
    @given(name=NAMES)
    def run(name):
        TOOLS[tool](world, name)

    for name in EXAMPLES:  # the names of the reports, always
        TOOLS[tool](world, name)
    run()


# ---------------------------------------------------------------- what is ours is cleaned up


def test_dead_processes_temp_folders_are_removed_and_nothing_else(tmp_path):
    pid = dead_pid()
    target = tmp_path / "exp"
    dead = owned_temp_dir(target, EXPORT_KIND)
    rec = json.loads((dead / OWNER_FILE).read_text())
    assert rec["kind"] == EXPORT_KIND and rec["target"] == "exp" and rec["pid"] == os.getpid() and rec["host"] == HOST
    rec["pid"] = pid
    (dead / OWNER_FILE).write_text(json.dumps(rec))
    reused = owned_temp_dir(target, EXPORT_KIND, "old")  # a live pid, but started after the marker: reused
    rec2 = {**json.loads((reused / OWNER_FILE).read_text()), "pid": 1, "created": 0.0}
    (reused / OWNER_FILE).write_text(json.dumps(rec2))
    live = owned_temp_dir(target, EXPORT_KIND)  # this process: alive
    plant_foreign(tmp_path, "exp", pid)
    before = snapshot(tmp_path, skip=None)
    removed = remove_dead_temp_dirs(target, EXPORT_KIND)
    assert set(removed) == {dead, reused}
    after = snapshot(tmp_path)
    assert {k for k in before if k not in after} == {
        k for k in before if k.startswith((dead.name, reused.name))
    }  # only those two
    assert live.is_dir()


def test_temp_files_of_dead_writers_are_removed_and_nothing_else(tmp_path, monkeypatch):
    pid = dead_pid()
    ours_dead = tmp_path / f".checkpoint.pt.tmp-{HOST_TAG}-{pid}-abc_1234"
    ours_live = tmp_path / f".checkpoint.pt.tmp-{HOST_TAG}-{os.getpid()}-abc_1234"
    other_host = tmp_path / f".checkpoint.pt.tmp-00000000-{pid}-abc_1234"
    foreign = [tmp_path / n for n in (".checkpoint.pt.x.tmp", ".checkpoint.pt.tmp-", f".checkpoint.pt.tmp-{HOST_TAG}-")]
    for p in [ours_dead, ours_live, other_host, *foreign]:
        p.write_bytes(b"x")
    assert remove_dead_temp_files(tmp_path, "checkpoint.pt") == [ours_dead]
    assert all(p.exists() for p in [ours_live, other_host, *foreign])
    # and what atomic writes name their temp files is exactly that pattern
    seen = []
    real = os.replace

    def spy(src, dst):
        seen.append(Path(src).name)
        real(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    atomic_write_bytes(tmp_path / "checkpoint.pt", b"data")
    assert seen[0].startswith(f".checkpoint.pt.tmp-{HOST_TAG}-{os.getpid()}-")


# ---------------------------------------------------------------- two exports to one folder

_LOCK_HOLDER = """
import sys, time
from flashar_adapt.files import target_lock
with target_lock(sys.argv[1], RuntimeError):
    print("locked", flush=True)
    time.sleep(120)
"""


def test_two_exports_to_one_folder(world, tmp_path):
    out = tmp_path / "exports" / "thesis"
    (tmp_path / "exports").mkdir()
    holder = subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, out], stdout=subprocess.PIPE, env=ENV, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ExportError, match=f"being written by another export \\(pid {holder.pid} host"):
            fa.export_merged(world["model"], out)
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock; the lock file it leaves is ours
        holder.wait()
    fa.export_merged(world["model"], out)
    assert sorted(os.listdir(tmp_path / "exports")) == ["thesis"]
    # two threads at once (each its own model): each exports whole or is refused naming the other
    results = []
    barrier = threading.Barrier(2)

    def export():
        model = copy.deepcopy(world["model"])
        barrier.wait()
        try:
            fa.export_merged(model, out)
            results.append("ok")
        except ExportError as e:
            results.append(str(e))

    threads = [threading.Thread(target=export) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert "ok" in results and all(r == "ok" or "being written by another export" in r for r in results), results
    assert sorted(os.listdir(tmp_path / "exports")) == ["thesis"]
    assert fa.load_adapted(out).generate(torch.tensor([1]), top_k=1).shape == (1, 14, 14)


def test_a_foreign_file_where_the_lock_goes_is_refused_and_kept(tmp_path):
    out = tmp_path / "exp"
    target_lock_path(out).write_text("my notes")
    with pytest.raises(RuntimeError, match="is not a flashar-adapt lock"):
        with target_lock(out, RuntimeError):
            pass
    assert target_lock_path(out).read_text() == "my notes"


def test_cli_export_to_a_glob_name_keeps_the_users_folders(world, tmp_path, capsys):
    exports = tmp_path / "exports"
    pid = world["pid"]
    plant_foreign(exports, "*", pid)
    (exports / ".thesis.old-2024").mkdir()
    (exports / ".thesis.old-2024" / "ch1.tex").write_text("chapter one")
    (exports / ".ab.tmp-x").mkdir()
    before = snapshot(exports)
    cfg = world["cfg"]
    train(TrainConfig.load(cfg), progress=False)
    for name in ("*", "run[v2]", "a?"):
        rc = main(["export", "--config", str(cfg), "--out", str(exports / name)])
        assert rc == 0, capsys.readouterr().err
        assert "at step 1 of 1 (stage 1, finished)" in capsys.readouterr().out
        shutil.rmtree(exports / name)
    assert snapshot(exports) == before


# ---------------------------------------------------------------- train: a foreign metrics.jsonl


def test_train_refuses_a_foreign_metrics_log_and_keeps_it(world, tmp_path):
    cfg = TrainConfig.load(world["cfg"])
    cfg.out_dir = str(tmp_path / "run")
    Path(cfg.out_dir).mkdir()
    log = Path(cfg.out_dir) / LOG
    theirs = '{"epoch": 1, "loss": 0.3}\n{"step": 1, "acc": 0.9}\n'
    log.write_text(theirs)
    with pytest.raises(TrainingError, match="metrics.jsonl exists, but .* holds no checkpoint .* left as it was"):
        train(cfg, progress=False)
    assert log.read_text() == theirs and sorted(os.listdir(cfg.out_dir)) == [".flashar.lock", LOG]
    rc = main(["train", "--config", str(_config_file(tmp_path, cfg)), "--no-progress"])
    assert rc == 2 and log.read_text() == theirs
    # a run of ours killed before its first checkpoint: its log is ours, redone from step 0
    cfg.out_dir = str(tmp_path / "ours")
    Path(cfg.out_dir).mkdir()
    claim_run_folder(Path(cfg.out_dir), has_checkpoint=False)
    (Path(cfg.out_dir) / LOG).write_text('{"step": 1, "loss": 9.0}\n')
    train(cfg, progress=False)
    steps = [json.loads(ln) for ln in (Path(cfg.out_dir) / LOG).read_text().splitlines()]
    assert [s["step"] for s in steps] == [1] and steps[0]["loss"] != 9.0
    assert json.loads((Path(cfg.out_dir) / RUN_MARKER).read_text())["kind"] == "flashar-adapt train run"


def _config_file(tmp_path: Path, cfg: TrainConfig) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(yaml.safe_dump(cfg.to_dict()))
    return p


# ---------------------------------------------------------------- tokenize --out inside the source


def test_tokenize_out_inside_the_source_is_refused(world, tmp_path, capsys):
    src = tmp_path / "imgs"
    shutil.copytree(world["imgs"], src)
    before = snapshot(src)
    for out in (src / "shards", src / "c0" / "shards", src):
        rc = main(["tokenize", str(src), "--out", str(out), "--recipe", "fmnist-c2i", "--no-progress"])
        err = capsys.readouterr().err
        assert rc == 2 and "inside the image folder" in err, err
    assert snapshot(src) == before
    # a data folder that got there anyway (an older version, by hand) is named, not made a class
    rc = main(["tokenize", str(src), "--out", str(tmp_path / "d"), "--recipe", "fmnist-c2i", "--no-progress"])
    assert rc == 0
    shutil.copytree(tmp_path / "d", src / "d")
    rc = main(["tokenize", str(src), "--out", str(tmp_path / "d2"), "--recipe", "fmnist-c2i", "--no-progress"])
    assert rc == 2 and "would be read as a class" in capsys.readouterr().err


def test_generate_refuses_an_out_that_is_a_dangling_link(world, tmp_path):
    link = tmp_path / "gen"
    os.symlink(tmp_path / "nowhere", link)
    with pytest.raises(GenerateError, match="exists"):
        generate_to_folder(world["model"], [1], link, progress=False)
    assert os.readlink(link) == str(tmp_path / "nowhere") and sorted(os.listdir(tmp_path)) == ["gen"]
