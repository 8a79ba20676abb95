"""A killed compile never breaks the next one: compiled decoding keeps inductor's cache in a
folder the tool owns, and a library there that fails to load (what a compile killed while it
builds leaves) is removed and built again, or the step decodes eagerly."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flashar_adapt.decoding import compiled
from flashar_adapt.files import OWNER_FILE

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    d = tmp_path / "cache"
    monkeypatch.setenv(compiled.CACHE_ENV, str(d))
    return d


def test_cache_folder_is_the_env_var_else_the_users_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(compiled.CACHE_ENV, str(tmp_path / "c"))
    assert compiled.compile_cache_dir() == tmp_path / "c"
    monkeypatch.delenv(compiled.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert compiled.compile_cache_dir() == tmp_path / "x" / "flashar-adapt" / "inductor"


def test_new_cache_folder_is_marked_ours_an_existing_one_is_not(tmp_path, monkeypatch, cache):
    assert compiled.ensure_cache_dir() == cache and compiled.owns_cache(cache)
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("x")
    monkeypatch.setenv(compiled.CACHE_ENV, str(theirs))
    compiled.ensure_cache_dir()
    assert not compiled.owns_cache(theirs) and not (theirs / OWNER_FILE).exists()


def test_inductor_uses_our_folder_only_inside_the_compiled_run(cache, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/somewhere/else")
    with compiled.recompile_room(True):
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(cache)
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/somewhere/else"


def _broken_so(folder: Path, name="ab/cxyz.main.so") -> Path:
    p = folder / name
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"")  # what a compile killed mid-build leaves
    return p


def test_libraries_without_an_elf_header_are_removed_unless_being_built(cache):
    from filelock import FileLock

    compiled.ensure_cache_dir()
    empty, cut = _broken_so(cache, "ab/cone.main.so"), _broken_so(cache, "cd/ctwo.so")
    cut.write_bytes(b"\0" * 100)
    good = _broken_so(cache, "ef/cthree.main.so")
    good.write_bytes(b"\x7fELF" + b"\0" * 60)
    busy = _broken_so(cache, "gh/cfour.main.so")
    with FileLock(str(cache / "locks" / "cfour.lock")):
        assert compiled.remove_broken_libraries(cache) == sorted([empty, cut])
    assert good.exists() and busy.exists() and not empty.exists() and not cut.exists()


def test_a_folder_without_our_marker_is_never_swept(tmp_path):
    so = _broken_so(tmp_path)
    assert compiled.remove_broken_libraries(tmp_path) == [] and so.exists()


def _failing(path: Path, times: int):
    calls = []

    def fn(x):
        calls.append(x)
        if len(calls) <= times:
            try:
                raise ImportError(f"{path}: file too short")
            except ImportError as e:
                raise RuntimeError("InductorError: compiling the graph failed") from e  # as dynamo wraps it
        return x + 1

    return fn, calls


def test_a_library_that_fails_to_load_is_removed_and_compiled_again(cache, capsys):
    compiled.ensure_cache_dir()
    so = _broken_so(cache)
    fn, calls = _failing(so, times=1)
    assert compiled.run_step(("cpu", 3), fn, lambda x: -1, 41) == 42
    assert len(calls) == 2 and not so.exists()
    assert f"removed {so} from the compile cache" in capsys.readouterr().err


def test_a_library_that_keeps_failing_leaves_that_step_size_eager(cache, capsys):
    compiled.ensure_cache_dir()
    so = _broken_so(cache)

    def fn(x):
        _broken_so(cache)  # rebuilt broken every time
        raise ImportError(f"{so}: file too short")

    key = ("cpu", 12345)  # a step size no decoding reaches
    assert compiled.run_step(key, fn, lambda x: -x, 5) == -5
    assert compiled.compiled_step(*key) is compiled.sampled_step
    assert "decodes eagerly" in capsys.readouterr().err


def test_errors_naming_no_library_of_our_folder_are_raised(cache, tmp_path):
    compiled.ensure_cache_dir()
    elsewhere = _broken_so(tmp_path / "other")
    fn, calls = _failing(elsewhere, times=1)
    with pytest.raises(RuntimeError):
        compiled.run_step(("cpu", 3), fn, lambda x: -1, 1)
    assert elsewhere.exists() and len(calls) == 1


def test_a_folder_without_our_marker_is_never_touched(cache, tmp_path, monkeypatch):
    theirs = tmp_path / "theirs"
    so = _broken_so(theirs)
    monkeypatch.setenv(compiled.CACHE_ENV, str(theirs))
    fn, _ = _failing(so, times=1)
    with pytest.raises(RuntimeError):
        compiled.run_step(("cpu", 3), fn, lambda x: -1, 1)
    assert so.exists()


# ---------------------------------------------------------------- real compiles, in fresh processes

CHILD = """
import torch, flashar_adapt as fa
from tests import tiny
model = tiny.llamagen(grid=2)
fa.patch(model, tiny.llamagen_recipe(grid=2))
cond = torch.tensor([3])
got = model.generate(cond, mode="raster", top_k=1, compile=True)
assert torch.equal(got, model.generate(cond, mode="raster", top_k=1)), "compiled codes differ"
print("DECODED")
"""


def _child(cache: Path, **kw):
    env = {**os.environ, compiled.CACHE_ENV: str(cache), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", CHILD],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **kw,
    )


def _decodes(cache: Path) -> str:
    out, err = _child(cache).communicate(timeout=1200)
    assert "DECODED" in out, err[-3000:]
    return err


@pytest.mark.slow
def test_truncated_libraries_of_a_killed_compile_are_rebuilt(tmp_path):
    """What a compile killed while linking leaves: the next process decodes, removing and
    rebuilding the libraries. Empty ones (the CPU probes' too) are swept before compiling;
    the graphs' libraries are cut short after their ELF header, so only failing to load
    tells them (the issue's ``...main.so: file too short``)."""
    cache = tmp_path / "cache"
    _decodes(cache)
    libs = sorted(cache.rglob("*.so"))
    graphs = [p for p in libs if p.name.endswith(".main.so")]
    assert graphs and len(graphs) < len(libs)
    for p in libs:
        p.write_bytes(p.read_bytes()[:64] if p in graphs else b"")
    err = _decodes(cache)
    assert f"removed {len(libs) - len(graphs)} broken file(s) an interrupted compile left" in err
    rebuilt = re.findall(r"removed (\S+\.main\.so) from the compile cache", err)
    assert rebuilt
    # each removed library is gone or built again whole (the retry may compile through other keys)
    assert all(not Path(p).exists() or Path(p).stat().st_size > 64 for p in rebuilt)


@pytest.mark.slow
def test_a_compile_killed_mid_build_never_breaks_the_next_one(tmp_path):
    """SIGKILL to the whole process group (the compiler too) once inductor has written the
    first source it builds; whatever that leaves, the next process decodes."""
    cache = tmp_path / "cache"
    proc = _child(cache, start_new_session=True)
    deadline = time.monotonic() + 900
    while not any(cache.rglob("*.cpp")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)  # into the build
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    _decodes(cache)
