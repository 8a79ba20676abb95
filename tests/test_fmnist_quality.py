"""The Fashion-MNIST measurements that use ``flashar-adapt evaluate``: the shipped export's
raster vs two-way report (the classifier's features, the test set's NLL, the time of each
mode), and the data-free sweep end to end, both at tiny sizes."""

from __future__ import annotations

import json

import pytest

from flashar_adapt.commands import main
from flashar_adapt.fmnist import ASSETS
from flashar_adapt.fmnist import data_free_sweep as sweep
from flashar_adapt.fmnist.reference import write_reference


@pytest.mark.slow
def test_evaluate_the_shipped_export_writes_raster_and_two_way_columns(tmp_path, capsys):
    ref = write_reference(tmp_path / "ref", 300)
    out = tmp_path / "eval"
    argv = ["evaluate", "--export", str(ASSETS / "flashar"), "--ref", str(ref / "test.npz")]
    argv += ["--shards", str(ref / "test_shards"), "--num-samples", "20", "--cfg", "2.0", "--out", str(out)]
    assert main([*argv, "--no-progress"]) == 0
    r = json.loads((out / "report.json").read_text())
    for mode, steps in (("raster", 196), ("two_way", 27)):
        row = r["modes"][mode]
        assert row["extractor"] == "fmnist-classifier" and row["num_reference"] == 300 and row["nll_examples"] == 300
        assert row["steps_per_image"] == steps and row["fid"] > 0 and 0 <= row["accuracy"] <= 1
        assert 1.5 < row["nll_bits"] < 2.5 and row["seconds_per_image"] > 0 and row["inception_score"] >= 1
    md = (out / "report.md").read_text()
    for line in ("| | raster | two-way |", "| FID |", "| NLL of the held-out shards", "| model time per image"):
        assert line in md
    assert (out / "samples.png").is_file()


@pytest.mark.slow
def test_the_data_free_sweep_runs_end_to_end_at_a_tiny_size(tmp_path):
    docs = tmp_path / "fmnist.md"
    docs.write_text(f"intro\n{sweep.MARKERS[0]}\nold table\n{sweep.MARKERS[1]}\nrest\n")
    argv = ["--work", str(tmp_path / "w"), "--teacher-samples", "12", "--eval-samples", "12", "--steps", "1", "1"]
    argv += ["--reference-count", "60", "--results", str(tmp_path / "res"), "--docs", str(docs), "--no-progress"]
    assert sweep.main(argv) == 0
    rows = json.loads((tmp_path / "res" / "fmnist_data_free.json").read_text())["rows"]
    assert [r["row"] for r in rows[:2]] == ["raster base", "FlashAR, 8640 real images (shipped)"]
    assert [(r["teacher_cfg"], r["teacher_temperature"]) for r in rows[2:]] == list(sweep.SETTINGS)
    for r in rows:
        assert r["fid"] > 0 and 0 <= r["precision"] <= 1 and 0 <= r["accuracy"] <= 1 and r["nll_bits"] > 0
        assert r["num_samples"] == 12 and r["num_reference"] == 60
    for cfg, temp in sweep.SETTINGS:  # each teacher sampled with its own settings, the same seed
        rep = json.loads((tmp_path / "w" / f"teacher_cfg{cfg}_t{temp}_12" / "teacher_report.json").read_text())
        assert rep["sampling"]["cfg_scale"] == cfg and rep["sampling"]["temperature"] == temp and rep["seed"] == 0
    text = docs.read_text()
    assert text.startswith(f"intro\n{sweep.MARKERS[0]}\n") and text.endswith(f"{sweep.MARKERS[1]}\nrest\n")
    assert "old table" not in text and "| post-trained on | FID (x shipped) |" in text and "Lowest FID" in text
    assert (tmp_path / "res" / "fmnist_data_free.md").read_text() in text
    # everything resumes: a second run measures nothing new and writes the same table
    assert sweep.main(argv) == 0
    assert json.loads((tmp_path / "res" / "fmnist_data_free.json").read_text())["rows"] == rows
