"""Did the model keep its quality at the new speed? (``flashar-adapt evaluate``)

``evaluate_samples``: the quality of one sample set against a reference. ``evaluate_model``:
one model decoded both ways, side by side: samples of raster and two-way decoding with the
same seeds and settings (``sample_sets``, sharded and resumable), their quality against the
reference (``quality``), the exact NLL of held-out shards under both factorisations
(``score``), and the model time each decoding took; written as report.json, report.md and
samples.png (a labelled grid of each mode, side by side).
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .decoding import score
from .extractors import extractor_name, load_extractor
from .files import atomic_write_bytes
from .generation import labelled_grid, steps_per_image
from .patching import context
from .quality import Images, QualityError, compare, extract, open_images, save_stats, stats_target_problem
from .recipe import recipe_from_dict
from .sample_sets import Processes, sample_set
from .shards import ShardDataset

MODES = ("raster", "two_way")
FEATURE_BATCH = 100


def reference_of(path, extractor, name: str, save_stats_to=None, progress: bool = True):
    """The reference to compare with: its Features (images), or (mu, sigma, meta) of a stats file."""
    ref = open_images(path)
    if not isinstance(ref, Images):
        return ref
    feats = extract(ref, extractor, FEATURE_BATCH, "reference features" if progress else None)
    if save_stats_to:
        save_stats(save_stats_to, feats.feats, name)
    return feats


REPORT_MARKER = "flashar-adapt evaluate"
_REPORT_FILES = ("report.json", "report.md", "samples.png")


def report_folder_problem(out, with_samples: bool) -> str | None:
    """Why the report may not be written into ``out``, or None. The folder must be new, empty
    or this command's earlier output: only report files (``report.json`` marked as ours) and,
    ``with_samples``, the modes' sample folders (``sample_set`` guards those itself)."""
    out = Path(out)
    if not out.exists():
        return None
    if not out.is_dir():
        return f"{out} exists and is not a folder"
    allowed = set(_REPORT_FILES) | (set(MODES) if with_samples else set())
    foreign = sorted(n for n in os.listdir(out) if n not in allowed and not n.startswith("."))
    if foreign:
        return f"{out} holds {foreign[0]!r}, which is not this command's; report into a new or empty folder"
    if any((out / n).exists() for n in _REPORT_FILES):
        try:
            ours = json.loads((out / "report.json").read_bytes()).get("written_by") == REPORT_MARKER
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            return f"{out} holds report files this command did not write; report into a new or empty folder"
    return None


def write_samples_report(out, measures: dict) -> Path:
    """``measures`` (of ``evaluate_samples``) as ``out``/report.json, marked as ours."""
    problem = report_folder_problem(out, with_samples=False)
    if problem:
        raise QualityError(problem)
    Path(out).mkdir(parents=True, exist_ok=True)
    path = Path(out) / "report.json"
    atomic_write_bytes(path, json.dumps({"written_by": REPORT_MARKER, **measures}, indent=1).encode())
    return path


def evaluate_samples(
    samples, reference, *, extractor: str | None = None, device="cpu", save_reference_stats=None, progress=True
) -> dict:
    """FID (and IS, precision/recall, accuracy where the inputs allow) of the images at
    ``samples`` (a sample folder, an .npz or a folder of images) against ``reference`` (the
    same kinds, or a statistics .npz). ``extractor``: a name (default: the one that suits
    the samples' recipe, else ``inception``)."""
    problem = stats_target_problem(save_reference_stats) if save_reference_stats else None
    if problem:  # before any features are extracted
        raise QualityError(problem)
    imgs = open_images(samples)
    if not isinstance(imgs, Images):
        raise QualityError(f"{samples}: statistics, not images; give the samples' images")
    name = extractor_name(extractor, imgs.recipe)
    ext = load_extractor(name, device)
    ref = reference_of(reference, ext, name, save_reference_stats, progress)
    feats = extract(imgs, ext, FEATURE_BATCH, "sample features" if progress else None)
    classifies = imgs.recipe is not None and type(ext).classifies(imgs.recipe)
    return {"samples": str(samples), "reference": str(reference), **compare(feats, ref, name, imgs.labels, classifies)}


@torch.no_grad()
def nll_bits(model, shards, mode: str, batch: int = 64) -> dict:
    """Exact NLL in bits per token of a data folder's examples under ``mode``'s factorisation."""
    recipe = context(model).recipe
    ds = ShardDataset(shards)
    if tuple(ds.grid) != tuple(recipe.image.grid) or ds.codebook_size != recipe.image.codebook_size:
        raise QualityError(
            f"{shards}: codes of a {list(ds.grid)} grid and {ds.codebook_size} codes; the recipe has "
            f"{list(recipe.image.grid)} and {recipe.image.codebook_size}"
        )
    if recipe.condition.kind == "class":
        ds.limit_classes(recipe.condition.num_classes, recipe.condition.num_classes - 1)
    dev = next(model.parameters()).device
    total, n = 0.0, len(ds)
    if n == 0:
        raise QualityError(f"{shards}: no examples")
    for i in range(0, n, batch):
        b = ds.get(torch.arange(i, min(n, i + batch)))
        mask = None if b.cond_mask is None else b.cond_mask.to(dev)
        total -= float(score(model, b.cond.to(dev), b.codes.to(dev), mode=mode, cond_mask=mask).double().sum())
    return {"nll_bits": total / (n * b.codes[0].numel()) / math.log(2), "nll_examples": n}


def _grid_of(folder: Path, conds: list, n: int, per_row: int = 8, rows: int = 10):
    """A labelled grid of the first ``per_row`` samples of each of the first ``rows`` conditions."""
    c = len(conds)
    picks = [[k + c * j for j in range(per_row) if k + c * j < n] for k in range(min(rows, c, n))]
    per_row = min(per_row, max(len(p) for p in picks))
    idx = [p[j] if j < len(p) else p[-1] for p in picks for j in range(per_row)]
    ims = []
    for i in idx:
        with Image.open(folder / "images" / f"{i:06d}.png") as im:
            ims.append(torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1).float() / 255)
    labels = [str(conds[i % c])[:28] for i in idx]
    return labelled_grid(torch.stack(ims), labels, per_row)


def side_by_side(panels: dict[str, Image.Image], path) -> None:
    """The panels next to each other, each under its title, as one PNG."""
    w = sum(p.width for p in panels.values()) + 16 * (len(panels) - 1)
    h = max(p.height for p in panels.values()) + 20
    canvas = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for title, p in panels.items():
        draw.text((x + 4, 4), title, fill="black")
        canvas.paste(p, (x, 20))
        x += p.width + 16
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())


def measure_set(
    folder, manifest: dict, ext, name: str, reference, *, model=None, shards=None, progress: bool = True
) -> dict:
    """One sample set's row: steps, quality against ``reference``, the NLL of ``shards``
    under its mode's factorisation (with ``model``), and the model time it took."""
    recipe = recipe_from_dict(manifest["recipe_spec"])
    imgs = open_images(folder)
    feats = extract(imgs, ext, FEATURE_BATCH, f"{manifest['mode']} features" if progress else None)
    return {
        "steps_per_image": steps_per_image(manifest["mode"], recipe.image.grid),
        **compare(feats, reference, name, imgs.labels, type(ext).classifies(recipe)),
        **(nll_bits(model, shards, manifest["mode"]) if shards else {}),
        "model_seconds": manifest["model_seconds"],
        "seconds_per_image": manifest["model_seconds"] / manifest["num_samples"],
    }


def evaluate_model(
    model,
    conds: list,
    out,
    reference,
    *,
    tok,
    text=None,
    extractor: str | None = None,
    shards=None,
    sample_options: dict | None = None,
    procs: Processes | None = None,
    model_info: dict | None = None,
    device=None,
    save_reference_stats=None,
) -> dict | None:
    """Sample ``model`` both ways into ``out``/raster and ``out``/two_way (``sample_options``:
    the keywords of ``sample_set``, the same for both), measure both against ``reference``
    (and the NLL of the data folder ``shards``), write the report into ``out``; returns it on
    rank 0 (None on the other ranks of a launch)."""
    procs = procs or Processes()
    opts = dict(sample_options or {})
    recipe = context(model).recipe
    if tok is None:
        raise QualityError(f"recipe {recipe.name!r} has no tokenizer section: there are no images to measure")
    out = Path(out)
    problem = report_folder_problem(out, with_samples=True) or (
        stats_target_problem(save_reference_stats) if save_reference_stats else None
    )
    if problem:  # before any sampling: nothing of the user's is replaced at the end
        raise QualityError(problem)
    progress = opts.get("progress", True)
    rows, sets, ext, ref = {}, {}, None, None
    for mode in MODES:
        m = sample_set(
            model, conds, out / mode, tok=tok, text=text, mode=mode, procs=procs, model_info=model_info, **opts
        )
        if not procs.main:
            continue  # rank 0 measures while the others draw the next mode
        if ext is None:
            name = extractor_name(extractor, recipe)
            ext = load_extractor(name, device or next(model.parameters()).device)
            ref = reference_of(reference, ext, name, save_reference_stats, progress)
        rows[mode] = measure_set(out / mode, m, ext, name, ref, model=model, shards=shards, progress=progress)
        sets[mode] = m
    if not procs.main:
        return None
    report = {
        "written_by": REPORT_MARKER,
        "recipe": recipe.name,
        "model": model_info,
        "reference": str(reference),
        "shards": None if shards is None else str(shards),
        "settings": {k: sets["raster"][k] for k in ("sampling", "seed", "num_samples", "batch_size", "compile")},
        "processes": procs.world,
        "device": str(next(model.parameters()).device),
        "torch_threads": torch.get_num_threads(),
        "modes": rows,
        "speedup": rows["raster"]["seconds_per_image"] / max(rows["two_way"]["seconds_per_image"], 1e-12),
    }
    atomic_write_bytes(out / "report.json", json.dumps(report, indent=1).encode())
    atomic_write_bytes(out / "report.md", report_markdown(report).encode())
    n = report["settings"]["num_samples"]
    titles = {m: f"{m.replace('_', '-')} ({rows[m]['steps_per_image']} steps)" for m in MODES}
    side_by_side({titles[m]: _grid_of(out / m, conds, n) for m in MODES}, out / "samples.png")
    return report


_ROWS = (  # (key, label, format)
    ("steps_per_image", "decoding steps per image", "{:d}"),
    ("fid", "FID", "{:.2f}"),
    ("inception_score", "Inception Score", "{:.2f}"),
    ("precision", "precision", "{:.3f}"),
    ("recall", "recall", "{:.3f}"),
    ("accuracy", "accuracy of the classes", "{:.3f}"),
    ("nll_bits", "NLL of the held-out shards, bits/token", "{:.4f}"),
    ("seconds_per_image", "model time per image, s", "{:.4f}"),
)


def report_markdown(r: dict) -> str:
    """The report as a Markdown table: one row per measure, raster and two-way side by side."""
    s, rows = r["settings"], r["modes"]
    sp = s["sampling"]
    head = [
        f"# Raster vs two-way decoding: {r['recipe']}",
        "",
        f"{s['num_samples']} samples per mode, seed {s['seed']}, CFG {sp['cfg_scale']} ({sp['cfg_schedule']}), "
        f"temperature {sp['temperature']}, top-k {sp['top_k']}, top-p {sp['top_p']}, batch {s['batch_size']}; "
        f"features: `{rows['raster']['extractor']}`; reference: `{r['reference']}`"
        + (f" ({rows['raster']['num_reference']} images)" if rows["raster"].get("num_reference") else "")
        + (f"; NLL on `{r['shards']}` ({rows['raster']['nll_examples']} examples)" if r["shards"] else "")
        + f". {r['processes']} process(es) on {r['device']}, {r['torch_threads']} torch threads.",
        "",
        "| | raster | two-way |",
        "|---|---|---|",
    ]
    for key, label, fmt in _ROWS:
        if key in rows["raster"]:
            head.append(f"| {label} | {fmt.format(rows['raster'][key])} | {fmt.format(rows['two_way'][key])} |")
    head.append(f"| speed-up (model time) | 1.00x | {r['speedup']:.2f}x |")
    head += ["", "Samples side by side (same seeds): `samples.png`.", ""]
    return "\n".join(head)
