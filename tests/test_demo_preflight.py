"""The main job fails fast and in one line when an input is missing (a fresh machine)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

main = pytest.importorskip("flashar_adapt.fmnist.main")
from flashar_adapt.fmnist import ASSETS  # noqa: E402

pytestmark = pytest.mark.skipif(
    not (ASSETS / "flashar" / "flashar_config.json").is_file(), reason="Fashion-MNIST assets not built"
)


def _preflight(tmp_path, **kw):
    a = dict(out=str(tmp_path / "out"), retrain=False, samples=10, nll_images=10, repeat=1)
    a.update(kw)
    return main.missing_inputs(a.pop("out"), **a)


def test_missing_dataset_is_one_line_before_any_work(tmp_path):
    env = {**os.environ, "FMNIST_DIR": str(tmp_path / "nowhere")}
    r = subprocess.run(
        [sys.executable, "-m", "flashar_adapt.commands", "demo", "--out", str(tmp_path / "o")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "apt-get install -y dataset-fashion-mnist" in lines[0], r.stderr
    assert "nowhere" in lines[0]
    assert r.stdout == ""  # nothing was timed or sampled before the refusal


def test_retrain_without_training_extras_names_the_install(tmp_path, monkeypatch):
    import flashar_adapt.fmnist.data as data

    monkeypatch.setattr(data, "DEFAULT_DIR", tmp_path)
    for f in data.dataset_files(tmp_path):
        f.write_bytes(b"")
    real = main.importlib.util.find_spec
    monkeypatch.setattr(main.importlib.util, "find_spec", lambda name: None if name == "accelerate" else real(name))
    assert _preflight(tmp_path) is None  # no retrain: training extras not needed
    msg = _preflight(tmp_path, retrain=True)
    assert "accelerate" in msg and ".[train]" in msg


def test_bad_counts_and_unwritable_out_are_refused(tmp_path, monkeypatch):
    import flashar_adapt.fmnist.data as data

    monkeypatch.setattr(data, "DEFAULT_DIR", tmp_path)
    for f in data.dataset_files(tmp_path):
        f.write_bytes(b"")
    assert "--samples must be at least 1" in _preflight(tmp_path, samples=0)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "cannot create the output folder" in _preflight(tmp_path, out=str(blocker / "sub"))
