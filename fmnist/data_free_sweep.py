"""Which teacher settings make data-free post-training work? (issue 27, item 3)

    python -m flashar_adapt.fmnist.data_free_sweep

For each teacher setting (CFG 1.0, 1.5, 2.0 at temperature 1, and CFG 1.0 at temperature
0.9): sample the shipped budget's worth of training examples from the raster base (8,640,
every class in turn, seed 0 for every setting), post-train the base on them with the shipped
recipe and budget (``build.post_config``: 135 + 135 steps of 32), then measure the two-way
student as ``flashar-adapt evaluate`` does: 2,000 samples at CFG 2.0 (seed 1), FID, precision,
recall and accuracy in the Fashion-MNIST classifier's feature space against the 10,000 test
images, and the exact NLL of the test set. The shipped model (post-trained on 8,640 real
images) and the raster base are measured the same way, in the same run.

Writes benchmarks/results/fmnist_data_free.{json,md} and the table of docs/fmnist.md
(between its ``data-free-sweep`` markers). Every stage resumes after an interruption
(teacher shards, training runs and sample folders all do), so the command can be run again
until it finishes. ``--teacher-samples``, ``--eval-samples``, ``--steps`` and
``--reference-count`` shrink it (the test runs it end to end at a tiny size).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from flashar_adapt.datafree import TeacherSampling, sample_dataset, uniform_classes
from flashar_adapt.evaluation import measure_set, reference_of
from flashar_adapt.extractors import load_extractor
from flashar_adapt.files import atomic_write_bytes
from flashar_adapt.sample_sets import sample_set
from flashar_adapt.tokenizers import tokenizer_of
from flashar_adapt.training import TrainConfig, build_model_from_run, train

from . import ASSETS
from .build import POST_BATCH, STAGE1_STEPS, STAGE2_STEPS, TEACHER_BATCH, TEACHER_SHARD, post_config
from .evaluate import load_base, load_flashar
from .reference import write_reference

ROOT = Path(__file__).resolve().parents[1]
# (CFG, temperature) of the teacher's samples
SETTINGS = ((1.0, 1.0), (1.5, 1.0), (2.0, 1.0), (1.0, 0.9))
STUDENT_CFG = 2.0  # the students are sampled as the benchmark samples every row
TEACHER_SEED, EVAL_SEED = 0, 1
MARKERS = ("<!-- data-free-sweep:begin -->", "<!-- data-free-sweep:end -->")


def teacher_data(work: Path, n: int, cfg: float, temperature: float, progress: bool) -> tuple[Path, dict]:
    """``n`` samples of the raster base at (cfg, temperature) as training shards (resumes)."""
    data = work / f"teacher_cfg{cfg}_t{temperature}_{n}"
    if not (data / "manifest.json").is_file():
        sample_dataset(
            load_base(),
            uniform_classes(n, 10),
            data,
            sampling=TeacherSampling(cfg, temperature=temperature),
            seed=TEACHER_SEED,
            batch_size=min(TEACHER_BATCH, n),
            shard_size=min(TEACHER_SHARD, n),
            progress=progress,
            extra=str((ASSETS / "base.safetensors").resolve()),
        )
    return data, json.loads((data / "teacher_report.json").read_text())


def student(work: Path, name: str, data: Path, steps: tuple[int, int]):
    """The base post-trained on ``data`` with the shipped recipe (resumes); (model, seconds)."""
    # a tiny sweep (fewer teacher samples than a batch) trains on batches of what there is
    n = json.loads((data / "manifest.json").read_text())["num_examples"]
    cfg_path = post_config(work, name, data=data, stage1=steps[0], stage2=steps[1], batch_size=min(POST_BATCH, n))
    done = work / "runs" / name / "sweep_done.json"
    if not done.is_file():
        t = time.perf_counter()
        train(cfg_path)
        atomic_write_bytes(done, json.dumps({"train_seconds": round(time.perf_counter() - t, 1)}).encode())
    model = build_model_from_run(TrainConfig.load(cfg_path)).float().eval()
    return model, json.loads(done.read_text())["train_seconds"]


def measure(model, mode: str, folder: Path, n: int, ref, ext, shards: Path, progress: bool) -> dict:
    """A model's row, as ``flashar-adapt evaluate`` measures one mode."""
    m = sample_set(
        model,
        list(range(10)),
        folder,
        num_samples=n,
        tok=tokenizer_of(model),
        mode=mode,
        cfg_scale=STUDENT_CFG,
        seed=EVAL_SEED,
        batch_size=250,
        progress=progress,
    )
    return measure_set(folder, m, ext, "fmnist-classifier", ref, model=model, shards=shards, progress=progress)


def sweep(work: Path, teacher_samples: int, eval_samples: int, steps: tuple[int, int], count, progress=True) -> list:
    """Every row of the table (resumes at the first unfinished stage)."""
    ref_dir = write_reference(work / "reference", count)
    ext = load_extractor("fmnist-classifier")
    ref = reference_of(ref_dir / "test.npz", ext, "fmnist-classifier", progress=progress)
    shards = ref_dir / "test_shards"
    evals = work / f"sweep_eval{eval_samples}"
    rows = [
        {
            "row": "raster base",
            **measure(load_base(), "raster", evals / "base", eval_samples, ref, ext, shards, progress),
        },
        {
            "row": f"FlashAR, {(STAGE1_STEPS + STAGE2_STEPS) * POST_BATCH} real images (shipped)",
            **measure(load_flashar(), "two_way", evals / "shipped", eval_samples, ref, ext, shards, progress),
        },
    ]
    for cfg, temp in SETTINGS:
        data, rep = teacher_data(work, teacher_samples, cfg, temp, progress)
        name = f"sweep_cfg{cfg}_t{temp}_{teacher_samples}_{steps[0]}x{steps[1]}"
        model, train_s = student(work, name, data, steps)
        row = measure(model, "two_way", evals / name, eval_samples, ref, ext, shards, progress)
        rows.append(
            {
                "row": f"FlashAR, data-free: teacher CFG {cfg}, temperature {temp}",
                "teacher_cfg": cfg,
                "teacher_temperature": temp,
                "teacher_samples": rep["num_examples"],
                "teacher_seconds": rep["seconds"],
                "train_seconds": train_s,
                **row,
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    shipped = rows[1]["fid"]
    lines = [
        "| post-trained on | FID (x shipped) | precision | recall | accuracy | NLL bits/token |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['row']} | {r['fid']:.2f} ({r['fid'] / shipped:.2f}x) | {r['precision']:.3f} | {r['recall']:.3f} "
            f"| {r['accuracy']:.3f} | {r['nll_bits']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def write_results(rows: list[dict], meta: dict, results: Path, docs: Path | None) -> str:
    results.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(results / "fmnist_data_free.json", json.dumps({**meta, "rows": rows}, indent=1).encode())
    free = [r for r in rows if "teacher_cfg" in r]
    best = min(free, key=lambda r: r["fid"])
    verdict = (
        f"Lowest FID: teacher CFG {best['teacher_cfg']}, temperature {best['teacher_temperature']} "
        f"({best['fid'] / rows[1]['fid']:.2f}x the real-data model's; target 1.3x)."
    )
    md = (
        f"{meta['eval_samples']} two-way samples per row at CFG {STUDENT_CFG} (seed {EVAL_SEED}; the raster "
        f"base: raster samples), classifier features, {meta['reference_images']} test images as the reference "
        f"and for the NLL; teachers: {meta['teacher_samples']} samples each (seed {TEACHER_SEED}), students: "
        f"{meta['steps'][0]} + {meta['steps'][1]} steps of {POST_BATCH}.\n\n{table(rows)}\n{verdict}\n"
    )
    atomic_write_bytes(results / "fmnist_data_free.md", md.encode())
    if docs is not None and docs.is_file():
        text = docs.read_text()
        a, b = text.find(MARKERS[0]), text.find(MARKERS[1])
        if a >= 0 and b > a:
            docs.write_text(text[: a + len(MARKERS[0])] + "\n" + md + text[b:])
    return verdict


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flashar_adapt.fmnist.data_free_sweep", description=__doc__)
    ap.add_argument("--work", type=Path, default=Path("runs/fmnist"))
    ap.add_argument("--teacher-samples", type=int, default=(STAGE1_STEPS + STAGE2_STEPS) * POST_BATCH)
    ap.add_argument("--eval-samples", type=int, default=2000)
    ap.add_argument("--steps", type=int, nargs=2, default=(STAGE1_STEPS, STAGE2_STEPS), help="stage 1 and 2 steps")
    ap.add_argument("--reference-count", type=int, default=None, help="the first N test images only")
    ap.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "fmnist.md")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    t0 = time.perf_counter()
    rows = sweep(a.work, a.teacher_samples, a.eval_samples, tuple(a.steps), a.reference_count, not a.no_progress)
    meta = {
        "teacher_samples": a.teacher_samples,
        "eval_samples": a.eval_samples,
        "steps": list(a.steps),
        "reference_images": rows[0]["num_reference"],
        "torch_threads": torch.get_num_threads(),
        "seconds": round(time.perf_counter() - t0, 1),
    }
    print(table(rows) + write_results(rows, meta, a.results, a.docs))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
