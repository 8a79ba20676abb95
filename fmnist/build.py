"""Rebuild the shipped Fashion-MNIST assets, one documented command each (all resumable):

    python -m flashar_adapt.fmnist.build tokenizer     # k-means VQ, reports test PSNR
    python -m flashar_adapt.fmnist.build classifier    # feature network for the Frechet distance
    python -m flashar_adapt.fmnist.build base          # raster base model, from scratch
    python -m flashar_adapt.fmnist.build flashar       # two-stage post-training of the base
    python -m flashar_adapt.fmnist.build variants      # the benchmark's ablations (not shipped)
    python -m flashar_adapt.fmnist.build data_free     # post-training on the base's own samples (not shipped)

Assets go to ``--assets`` (default: the package's assets folder); scratch to ``--work``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from flashar_adapt.datafree import TeacherSampling, sample_dataset, uniform_classes
from flashar_adapt.export import export_merged
from flashar_adapt.files import atomic_save_safetensors
from flashar_adapt.generation import CLASSES
from flashar_adapt.integrations.llamagen import read_state_dict
from flashar_adapt.shards import ShardWriter
from flashar_adapt.training import TrainConfig, build_model_from_run, train

from . import ASSETS
from .base import train_base
from .classifier import train_classifier
from .config import base_config, post_training_config, read_config
from .data import CLASS_NAMES, load_fmnist
from .evaluate import Judge, decoder, load_base, load_flashar, nll_bits, sample_codes
from .tokenizer import PatchVQ, psnr

# The configs that made the shipped models (fmnist/configs/*.yaml): read here, so the build and
# the shipped files cannot drift apart.
_POST = read_config("flashar")
# Post-training budget: stage 1 and stage 2 steps at a batch of POST_BATCH images, 9.6% of
# the images the 1400-step base model saw (the issue allows at most 10%).
STAGE1_STEPS = _POST["stage1"]["steps"]
STAGE2_STEPS = _POST["stage2"]["steps"]
POST_BATCH = _POST["batch_size"]
# Stage 2 with LoRA and distillation of the fused prediction toward the raster base: on this
# budget both beat the paper's full fine-tuning with one-hot targets (docs/fmnist.md).
STAGE2_LORA = _POST["stage2"]["lora"]
W_KD_FUSED = _POST["w_kd_fused"]
BASE_TRAIN = base_config()["train"]
BASE_BATCH = BASE_TRAIN["batch"]


def tokenize(assets: Path, work: Path) -> dict:
    """Codes of both splits, cached in the work folder."""
    cache = work / "codes.pt"
    if cache.is_file():
        return torch.load(cache, weights_only=True)
    vq = PatchVQ.load(assets / "tokenizer.safetensors")
    x, y = load_fmnist("train")
    xt, yt = load_fmnist("test")
    out = {"train": vq.encode(x).short(), "train_labels": y, "test": vq.encode(xt).short(), "test_labels": yt}
    work.mkdir(parents=True, exist_ok=True)
    torch.save(out, cache)
    return out


def build_tokenizer(assets: Path, work: Path) -> None:
    x, _ = load_fmnist("train")
    xt, _ = load_fmnist("test")
    vq = PatchVQ.fit(x, K=256, iters=25)
    vq.save(assets / "tokenizer.safetensors")
    p = psnr(vq.decode(vq.encode(xt)), xt.float() / 255)
    _update_info(
        assets,
        tokenizer={
            "kind": "k-means VQ, 2x2 patches",
            "grid": [14, 14],
            "codebook_size": 256,
            "test_psnr_db": round(p, 2),
        },
    )
    print(f"tokenizer: test-set reconstruction PSNR {p:.2f} dB")


def build_classifier(assets: Path, work: Path) -> None:
    x, y = load_fmnist("train")
    xt, yt = load_fmnist("test")
    acc = train_classifier(x, y, xt, yt, assets / "classifier.safetensors")
    _update_info(assets, classifier={"test_accuracy": round(acc, 4)})
    print(f"classifier: test accuracy {acc:.4f}")


def build_base(assets: Path, work: Path, steps: int) -> None:
    c = tokenize(assets, work)
    g = torch.Generator().manual_seed(0)
    sub = torch.randperm(10_000, generator=g)[:2000]  # fixed test subset for the learning curve
    state = train_base(
        c["train"].long(),
        c["train_labels"],
        c["test"][sub].long(),
        c["test_labels"][sub],
        work / "base",
        **{**BASE_TRAIN, "steps": steps},
    )
    for name in ("base.safetensors", "model_args.json", "base_train_log.jsonl"):
        shutil.copy(work / "base" / name, assets / name)
    _write_class_names(assets)
    _update_info(
        assets,
        base={
            "steps": state["step"],
            "best_step": state["best_step"],
            "best_test_bits_per_token_2k": round(state["best"], 4),
            "images_seen": state["step"] * BASE_BATCH,
        },
    )
    print(f"base: best test NLL {state['best']:.4f} bits/token at step {state['best_step']}")


def write_shards(assets: Path, work: Path) -> Path:
    out = work / "shards"
    if (out / "manifest.json").is_file():
        return out
    c = tokenize(assets, work)
    w = ShardWriter(out, (14, 14), 256, "class", recipe="fmnist-c2i", shard_size=10_000)
    w.add(c["train"].long(), c["train_labels"])
    w.close()
    return out


def post_config(
    work: Path,
    name: str,
    *,
    stage1=STAGE1_STEPS,
    stage2=STAGE2_STEPS,
    lora=STAGE2_LORA,
    fixed_gate=None,
    branch_layer=None,
    w_kd_fused=W_KD_FUSED,
    base: Path | None = None,
    data: Path | None = None,
    batch_size: int | None = None,
) -> Path:
    """A training config for one variant; written to work/<name>.yaml. ``data``: the shards
    (default: the real training images, work/shards); ``batch_size``: default the shipped one."""
    work = work.resolve()  # the config's relative paths would resolve against its own folder
    changes = {"stage1.steps": stage1, "stage2.steps": stage2, "stage2.lora": lora, "w_kd_fused": w_kd_fused}
    if base is not None:
        changes["model.checkpoint"] = str(Path(base).resolve() / "base.safetensors")
    if fixed_gate is not None:
        changes["fixed_gate"] = fixed_gate
    if batch_size is not None:
        changes["batch_size"] = batch_size
    if branch_layer is not None:
        changes["recipe_overrides"] = {"flashar.branch_layer": branch_layer}
    data = Path(data).resolve() if data else work / "shards"
    cfg = post_training_config(data, work / "runs" / name, changes=changes)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _stage1(work: Path) -> Path:
    """Stage 1 of the main recipe, trained once and shared by the runs that differ only in
    stage 2 (resuming at the stage boundary is exact, so this equals training each alone)."""
    run = work / "runs" / "flashar_stage1"
    if not (run / "checkpoint.pt").is_file():
        train(post_config(work, "flashar_stage1", stage2=0))
    return run


def _from_stage1(work: Path, name: str) -> None:
    run = work / "runs" / name
    if not run.exists():
        shutil.copytree(_stage1(work), run)


def build_flashar(assets: Path, work: Path) -> None:
    imgs = (STAGE1_STEPS + STAGE2_STEPS) * POST_BATCH
    base_imgs = json.loads((assets / "info.json").read_text())["base"]["images_seen"]
    if imgs > 0.1 * base_imgs:
        raise SystemExit(f"post-training would see {imgs} images, over 10% of the base model's {base_imgs}")
    write_shards(assets, work)
    _from_stage1(work, "flashar")
    model = train(post_config(work, "flashar"))
    export_merged(model, work / "flashar_export")
    _ship_export(work / "flashar_export", assets / "flashar")
    _update_info(
        assets,
        flashar={
            "stage1_steps": STAGE1_STEPS,
            "stage2_steps": STAGE2_STEPS,
            "batch": POST_BATCH,
            "images_seen": imgs,
            "stage2_lora": STAGE2_LORA,
            "w_kd_fused": W_KD_FUSED,
        },
    )
    print(f"flashar: post-trained on {imgs} images")


def _ship_export(src: Path, dst: Path) -> None:
    """Ship the export with the backbone in fp16 safetensors (half the size of the .pt)."""
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    sd = read_state_dict(tmp / "backbone" / "llamagen.pt")
    atomic_save_safetensors({k: v.half() for k, v in sd.items()}, tmp / "backbone" / "llamagen.safetensors")
    (tmp / "backbone" / "llamagen.pt").unlink()
    cfg = json.loads((tmp / "flashar_config.json").read_text())
    cfg["backbone"]["checkpoint"] = "llamagen.safetensors"
    cfg["backbone"]["dtype"] = "float32"  # stored in fp16, computed in fp32 on CPU
    (tmp / "flashar_config.json").write_text(json.dumps(cfg, indent=1))
    _write_class_names(tmp)
    fl = load_file(str(tmp / "flashar.safetensors"))
    save_file({k: v.half() for k, v in fl.items()}, str(tmp / "flashar.safetensors"))
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)


def _write_class_names(folder: Path) -> None:
    """classes.json beside a shipped model: generate labels its images by name."""
    (folder / CLASSES).write_text(json.dumps(CLASS_NAMES, indent=1) + "\n")


VARIANTS = {
    # name: (post_config kwargs, shares stage 1 with "flashar")
    "stage1_only": dict(stage2=0),
    "full_ft": dict(lora=False),  # the paper's stage 2: full fine-tuning instead of LoRA
    "nar_avg": dict(fixed_gate=0.5),
    "last_layer": dict(branch_layer=-1),
    "paper_loss": dict(w_kd_fused=0.0),  # the paper's loss: no distillation of the fused prediction
}


def build_variants(assets: Path, work: Path, only: list[str] | None = None) -> None:
    """Ablation runs for the benchmark. stage1_only and full_ft resume from the main run's
    stage-1 checkpoint (same stage 1, different stage 2); the others train both stages."""
    write_shards(assets, work)
    for name, kw in VARIANTS.items():
        if only and name not in only:
            continue
        if name in ("stage1_only", "full_ft"):
            _from_stage1(work, name)
        train(post_config(work, name, **kw))


# Data-free post-training: as many teacher samples as the shipped model saw real images, every
# class in turn, without guidance: the teacher-settings sweep (data_free_sweep, docs/fmnist.md)
# measured FID 12.3 for students of CFG-1.0 samples against 17.0 (1.5) and 26.6 (2.0); the
# students are then sampled as every benchmark row, at STUDENT_CFG_SCALE.
TEACHER_CFG_SCALE = 1.0
STUDENT_CFG_SCALE = 2.0
TEACHER_BATCH = 288
TEACHER_SHARD = 2880  # 3 shards: a killed sampling run loses at most one shard's work


def build_data_free(assets: Path, work: Path, eval_samples: int = 5000, teacher_samples: int | None = None) -> dict:
    """Sample the raster base, post-train on its samples with the shipped recipe (the same
    steps and batch: fewer teacher samples than the budget's images are seen several times),
    and measure the result as benchmarks/fmnist.py measures its rows. Every stage resumes."""
    n = teacher_samples or (STAGE1_STEPS + STAGE2_STEPS) * POST_BATCH
    data = work / f"teacher_{n}"
    if not (data / "manifest.json").is_file():
        rep = sample_dataset(
            load_base(assets),
            uniform_classes(n, 10),
            data,
            sampling=TeacherSampling(TEACHER_CFG_SCALE),
            seed=0,
            batch_size=TEACHER_BATCH,
            shard_size=TEACHER_SHARD,
            extra=str((assets / "base.safetensors").resolve()),
        )
        print(f"teacher: {rep['num_examples']} samples in {rep['seconds']:.0f} s")
    teacher = json.loads((data / "teacher_report.json").read_text())
    cfg_path = post_config(work, f"data_free_{n}", data=data)
    run = work / "runs" / f"data_free_{n}"
    if not (run / "done.json").is_file():
        t = time.perf_counter()
        train(cfg_path)
        (run / "done.json").write_text(json.dumps({"train_seconds": round(time.perf_counter() - t, 1)}))
    out = work / f"data_free_{n}_eval{eval_samples}.json"
    if not out.is_file():
        model = build_model_from_run(TrainConfig.load(cfg_path)).float().eval()
        row = {
            "label": f"FlashAR, data-free: {teacher['num_examples']} samples of the base",
            **_measure(model, assets, work, eval_samples),
            "teacher_samples": teacher["num_examples"],
            "teacher_seconds": teacher["seconds"],
            "teacher_cfg": TEACHER_CFG_SCALE,
            "train_seconds": json.loads((run / "done.json").read_text())["train_seconds"],
        }
        out.write_text(json.dumps(row, indent=1))
    ref = work / f"flashar_shipped_eval{eval_samples}.json"  # the real-image model at the same sample count
    if not ref.is_file():
        ref.write_text(
            json.dumps(
                {
                    "label": "FlashAR, shipped (8640 real images)",
                    **_measure(load_flashar(assets / "flashar"), assets, work, eval_samples),
                },
                indent=1,
            )
        )
    rows = [json.loads(ref.read_text()), json.loads(out.read_text())]
    print(json.dumps(rows, indent=1))
    return rows[1]


def _measure(model, assets: Path, work: Path, eval_samples: int) -> dict:
    """A two-way model's row, as benchmarks/fmnist.py measures it (same functions, seed and CFG)."""
    c = tokenize(assets, work)
    nll = nll_bits(model, c["test"], c["test_labels"], "two_way")
    codes, y = sample_codes(
        decoder(model, "two_way", STUDENT_CFG_SCALE), eval_samples, batch=500, seed=1, progress="eval"
    )
    return {
        "mode": "two_way",
        "steps": 27,
        "nll_bits": nll,
        **Judge(assets)(codes, y),
        "samples": eval_samples,
        "nll_test_images": int(c["test"].shape[0]),
        "torch_threads": torch.get_num_threads(),
    }


def _update_info(assets: Path, **sections) -> None:
    p = assets / "info.json"
    info = json.loads(p.read_text()) if p.is_file() else {}
    info.update(sections)
    p.write_text(json.dumps(info, indent=1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m flashar_adapt.fmnist.build")
    ap.add_argument("what", choices=["tokenizer", "classifier", "base", "flashar", "variants", "data_free"])
    ap.add_argument("--assets", type=Path, default=ASSETS)
    ap.add_argument("--work", type=Path, default=Path("runs/fmnist"))
    ap.add_argument("--steps", type=int, default=BASE_TRAIN["steps"], help="base model: maximum training steps")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--eval-samples", type=int, default=5000, help="data_free: samples for Frechet and accuracy")
    ap.add_argument(
        "--teacher-samples",
        type=int,
        default=None,
        help="data_free: samples drawn from the base (default: as many as the post-training budget's images)",
    )
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    a.assets.mkdir(parents=True, exist_ok=True)
    a.work.mkdir(parents=True, exist_ok=True)
    if a.what == "tokenizer":
        build_tokenizer(a.assets, a.work)
    elif a.what == "classifier":
        build_classifier(a.assets, a.work)
    elif a.what == "base":
        build_base(a.assets, a.work, a.steps)
    elif a.what == "flashar":
        build_flashar(a.assets, a.work)
    elif a.what == "data_free":
        build_data_free(a.assets, a.work, a.eval_samples, a.teacher_samples)
    else:
        build_variants(a.assets, a.work, a.only)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
