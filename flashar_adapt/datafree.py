"""Data-free post-training data: shards sampled from the raster model itself
(``flashar-adapt tokenize --from-model``).

A user without the original training set samples the model's own raster decoding (the
teacher whose distribution post-training distils anyway) and trains on that. Conditions are
either every class in turn (``i % num_classes``: uniform, and exactly balanced when the count
is a multiple of the classes) or the prompts of a file in turn.

Reproducible and resumable: the conditions are cut into batches of ``batch_size`` in order,
and batch ``b`` is sampled with a generator seeded ``batch_seed(seed, b)``, so every example
depends only on (model, conditions, settings, seed, batch size) and not on where an earlier
run stopped. After every shard a state file records how many examples the written shards
hold; a killed run started again with the same command resamples the batch it was in, keeps
what the shards lack, and so neither duplicates nor loses an example. The manifest is written
last, so a half-done folder is never mistaken for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .decoding import prefill, step
from .files import atomic_write_bytes
from .patching import context
from .sampling import Sampling
from .shards import STATE, DataError, ShardWriter, resume_state
from .validate import Num

REPORT = "teacher_report.json"


@dataclass(frozen=True)
class TeacherSampling:
    """How the teacher samples: the arguments of ``model.generate(mode="raster", ...)``."""

    cfg_scale: float = 1.0
    cfg_schedule: str = "constant"
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


# An odd 32-bit multiplier (2**32 / golden ratio): seed -> seed * M is a bijection modulo 2**32.
_SEED_MIX = 0x9E3779B1


def batch_seed(seed: int, b: int) -> int:
    """The generator seed of batch ``b``, in 32 bits: a CPU ``torch.Generator`` keeps only the
    low 32 bits of its seed, so ``(seed << 32) | b`` gave every seed the same batches.
    ``(seed * M + b) mod 2**32`` differs for every batch of one seed and for every seed at one
    batch, and across (seed, batch) pairs for seeds below 1024 and batches below 2**20
    (tests/test_teacher.py checks the multiples of M exhaustively)."""
    if not (0 <= seed < 2**31 and 0 <= b < 2**32):
        raise DataError(f"seed must lie in [0, 2**31) (got {seed})")
    return (seed * _SEED_MIX + b) % 2**32


def uniform_classes(n: int, num_classes: int) -> list[int]:
    """``n`` class ids, every class in turn."""
    return [i % num_classes for i in range(n)]


def cycled_prompts(prompts: list[str], n: int) -> list[str]:
    """``n`` prompts, the file's prompts in turn."""
    return [prompts[i % len(prompts)] for i in range(n)]


def encode_prompts(prompts: list[str], text: Callable[[str], list[int]], prefix_len: int):
    """Left-padded ids [N, prefix_len], their mask and lengths: the layout the shards store and
    training reads, so the teacher sees each prompt exactly as the student will."""
    cond = torch.zeros(len(prompts), prefix_len, dtype=torch.long)
    lens = torch.zeros(len(prompts), dtype=torch.long)
    for k, p in enumerate(prompts):
        ids = list(text(p))
        if not ids or len(ids) > prefix_len:
            raise DataError(f"prompt {p[:40]!r} is {len(ids)} tokens; condition.prefix_len allows 1..{prefix_len}")
        cond[k, prefix_len - len(ids) :] = torch.tensor(ids)
        lens[k] = len(ids)
    mask = torch.arange(prefix_len)[None, :] >= (prefix_len - lens)[:, None]
    return cond, mask, lens


def sample_batch(
    model,
    conds: list,
    b: int,
    *,
    seed: int,
    sampling: TeacherSampling,
    text: Callable[[str], list[int]] | None = None,
    on_step: Callable[[int, int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(codes, cond, prompt lengths or None, preview codes or None) of one batch, sampled by
    raster decoding (a recipe's preview grid first, inside ``prefill``): the
    ``prefill``/``step`` loop ``model.generate(mode="raster")`` runs (the same codes), so that
    ``on_step(t, steps)`` can report every step of a long batch."""
    dev = next(model.parameters()).device
    if text is None:
        cond, mask, lens = torch.tensor(conds, dtype=torch.long), None, None
    else:
        cond, mask, lens = encode_prompts(conds, text, context(model).recipe.condition.prefix_len)
    g = torch.Generator(device=dev).manual_seed(batch_seed(seed, b))
    state = prefill(
        model,
        cond.to(dev),
        mode="raster",
        cond_mask=None if mask is None else mask.to(dev),
        sampling=Sampling(**asdict(sampling), generator=g),
    )
    while not state.done:
        step(state)
        if on_step is not None:
            on_step(state.t, state.num_steps)
    return state.image().cpu(), cond, lens, None if state.preview is None else state.preview.cpu()


def _step_progress(bar, new_images: int, label: str) -> Callable[[int, int], None]:
    """Move ``bar`` (counting images) through a batch step by step: by the share of the
    batch's ``new_images`` decoded so far, with the step in its postfix. A batch of a large
    model takes minutes; a bar that moves once per batch looks stuck."""
    start = bar.n

    def on_step(t: int, steps: int) -> None:
        bar.set_postfix_str(f"{label}, step {t}/{steps}", refresh=False)
        bar.update(start + new_images * t // steps - bar.n)  # refreshes at most every mininterval

    return on_step


def _fingerprint(
    conds: list, recipe_name: str, sampling: TeacherSampling, seed: int, batch_size: int, shard_size: int, extra: str
) -> str:
    h = hashlib.sha256(json.dumps([recipe_name, asdict(sampling), seed, batch_size, shard_size, extra]).encode())
    for c in conds:
        h.update(f"{c}\n".encode())
    return h.hexdigest()


def _check_inputs(recipe, conds: list, text, batch_size: int, shard_size: int) -> None:
    """DataError unless ``conds`` suit the recipe's condition and the sizes are positive."""
    kind = recipe.condition.kind
    if kind not in ("class", "tokens") or (kind == "tokens") != (text is not None):
        raise DataError(
            f"condition.kind {kind!r}: give class ids (class recipes) or prompts with a text tokenizer (prompt recipes)"
        )
    if not conds:
        raise DataError("nothing to sample: no conditions")
    if batch_size < 1 or shard_size < 1:
        raise DataError("batch_size and shard_size must be >= 1")
    if kind == "class":
        class_id = Num(0, recipe.condition.num_classes, hi_open=True, integer=True)
        bad = [c for c in conds if class_id.problem(c) is not None]
        if bad:
            raise DataError(f"class id {bad[0]!r} is outside the recipe's {recipe.condition.num_classes} classes")


def _run_state(out: Path, fp: str) -> dict:
    """The state of the run at ``out``: an interrupted one with the same fingerprint, or a new
    one recorded before the first shard (a folder with shards always has its state)."""
    state = resume_state(out)
    if state is not None and state.get("fingerprint") != fp:
        raise DataError(
            f"{out}: holds an interrupted run of other conditions, settings or model; finish it with the "
            "same command, or choose another --out"
        )
    if state is None:
        state = {"fingerprint": fp, "done": 0, "shards": [], "seconds": 0.0}
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / STATE, json.dumps(state).encode())
    return state


def _writer(out: Path, recipe, shard_size: int) -> ShardWriter:
    kind = recipe.condition.kind
    return ShardWriter(
        out,
        recipe.image.grid,
        recipe.image.codebook_size,
        kind,
        recipe.name,
        shard_size,
        recipe.condition.prefix_len if kind == "tokens" else None,
        num_classes=recipe.condition.num_classes if kind == "class" else None,
        preview_grid=recipe.image.preview(recipe.image.grid),
    )


def sample_dataset(
    model,
    conds: list,
    out_dir,
    *,
    sampling: TeacherSampling = TeacherSampling(),
    seed: int = 0,
    text: Callable[[str], list[int]] | None = None,
    batch_size: int = 64,
    shard_size: int = 4096,
    progress: bool = True,
    extra: str = "",
) -> dict:
    """Sample one raster image per entry of ``conds`` (class ids, or prompts with ``text``) into
    a data folder at ``out_dir``; continues an interrupted run there. ``extra`` names the model
    (it joins the fingerprint, so a run is never continued with another model). Returns the
    report (examples, seconds spent sampling in this and earlier runs)."""
    recipe = context(model).recipe
    _check_inputs(recipe, conds, text, batch_size, shard_size)
    out = Path(out_dir)
    state = _run_state(out, _fingerprint(conds, recipe.name, sampling, seed, batch_size, shard_size, extra))
    writer = _writer(out, recipe, shard_size)
    writer.shards = list(state["shards"])
    done, n = state["done"], len(conds)
    bar = tqdm(total=n, initial=done, desc="sample (raster teacher)", unit="img", disable=not progress)
    t_run = time.perf_counter()
    for b in range(done // batch_size, -(-n // batch_size)):
        start = b * batch_size
        part = conds[start : start + batch_size]
        skip = max(0, done - start)  # a resumed run's first batch: the shards already hold its head
        on_step = _step_progress(bar, len(part) - skip, f"batch {b + 1}/{-(-n // batch_size)}")
        codes, cond, lens, preview = sample_batch(
            model, part, b, seed=seed, sampling=sampling, text=text, on_step=on_step
        )
        before = len(writer.shards)
        writer.add(
            codes[skip:],
            cond[skip:],
            None if lens is None else lens[skip:],
            None if preview is None else preview[skip:],
        )
        done = start + codes.shape[0]
        if len(writer.shards) != before:  # a shard was written: record what the shards hold
            state.update(
                done=sum(s["num_examples"] for s in writer.shards),
                shards=list(writer.shards),
                seconds=state["seconds"] + time.perf_counter() - t_run,
            )
            t_run = time.perf_counter()
            atomic_write_bytes(out / STATE, json.dumps(state).encode())
        bar.update(done - bar.n)
    bar.close()
    writer.close()
    report = {
        "num_examples": sum(s["num_examples"] for s in writer.shards),
        "seconds": round(state["seconds"] + time.perf_counter() - t_run, 2),
        "seed": seed,
        "batch_size": batch_size,
        "sampling": asdict(sampling),
    }
    atomic_write_bytes(out / REPORT, json.dumps(report, indent=1).encode())
    if (out / STATE).exists():
        os.unlink(out / STATE)
    return report
