"""Sample sets: ``num_samples`` images of a model in one folder, the work shared between the
processes of a launch, resumable (``flashar-adapt sample``; ``flashar-adapt evaluate`` reads
the result).

Sample ``i`` is drawn for condition ``conds[i % len(conds)]`` (every class or prompt in turn)
with a generator of its own, seeded ``index_seed(seed, i)``: its codes depend on the model,
the settings, the seed and ``i``, not on its batchmates or on the process that drew it. The
indices are cut into global batches of ``batch_size``, and process r of W takes batches r,
r + W, r + 2W, ... A run on one process and on two therefore write the same files, byte for
byte (every batch holds the same samples and runs the same kernels); another batch size
draws the same samples up to the rounding of batched matrix products (a code whose uniform
sits within that rounding of a boundary may flip, rarely).

The folder::

    run.json            what the run is, written first; a run continued there must match it
    parts/000012.safetensors  one per finished batch: its indices, codes and seconds
    images/000123.png   one per sample
    codes.safetensors   every sample's codes [N, h, w] (int32) and class ids, in index order
    samples.npz         arr_0 uint8 [N, H, W, 3] (the ADM evaluator's layout), arr_1 class ids
    manifest.json       written last: a folder with it is complete

A killed run started again with the same command (on any number of processes) skips the
batches whose part file exists and redoes the others (a batch's images are written before
its part file); once every process is done, rank 0 writes the merged files and the manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from tqdm.auto import tqdm

from .datafree import encode_prompts
from .decoding.inputs import check_mode
from .errors import InputError
from .files import atomic_save_safetensors, atomic_write_bytes
from .image_folders import to_pil
from .npz_images import write_npz
from .numerics import weights_fingerprint
from .patching import context
from .recipe import Recipe
from .sampling import Sampling, index_generators, index_seed
from .tokenizers import ImageTokenizer

FORMAT = "flashar-adapt sample set 1"
RUN, MANIFEST = "run.json", "manifest.json"
# How long a process waits for the others at a barrier: a resumed run may leave one process
# many more batches than another, and a batch of a large model can take minutes.
BARRIER_TIMEOUT = timedelta(hours=6)


class SampleSetError(InputError):
    """A sample folder that cannot be used (another run's, not a sample set, incomplete)."""


@dataclass(frozen=True)
class Processes:
    """The processes sharing one job: this one's ``rank`` of ``world``, a barrier (``wait``)
    and the device this process should use (None: the caller's choice)."""

    rank: int = 0
    world: int = 1
    wait: Callable[[], None] = field(default=lambda: None, repr=False)
    device: str | None = None

    @property
    def main(self) -> bool:
        return self.rank == 0


def launched_processes(cpu: bool = False) -> Processes:
    """The processes of a ``torchrun`` / ``accelerate launch`` (accelerate's process state:
    gloo on CPU, NCCL on GPU; ``cpu`` forces CPU), or this process alone when not launched."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return Processes()
    from accelerate import PartialState  # optional dependency (the "train" extra): only a launched run needs it

    st = PartialState(cpu=cpu or not torch.cuda.is_available(), timeout=BARRIER_TIMEOUT)
    return Processes(st.process_index, st.num_processes, st.wait_for_everyone, str(st.device))


def sample_indices(num_samples: int, batch_size: int, procs: Processes) -> list[range]:
    """The global batches (index ranges) that process ``procs.rank`` draws."""
    starts = range(procs.rank * batch_size, num_samples, procs.world * batch_size)
    return [range(s, min(s + batch_size, num_samples)) for s in starts]


def _identity(recipe: Recipe, conds: list, n: int, mode: str, sampling: dict, seed: int, batch: int, extra) -> dict:
    h = hashlib.sha256()
    for c in conds:
        h.update(f"{c}\n".encode())
    return {
        "format": FORMAT,
        "model": extra,
        "recipe": recipe.name,
        "grid": list(recipe.image.grid),
        "mode": mode,
        "sampling": sampling,
        "seed": seed,
        "seeding": "sample i: torch.Generator().manual_seed(flashar_adapt.sampling.index_seed(seed, i))",
        "num_samples": n,
        "batch_size": batch,
        "conditions": "sample i has conditions[i % len(conditions)]",
        "conditions_sha256": h.hexdigest(),
        "num_conditions": len(conds),
    }


def _check_folder(out: Path, ident: dict) -> str:
    """'new', 'resume' or 'complete'; anything else in ``out`` is refused (read-only: every
    process checks the same files and refuses alike)."""
    if out.exists() and not out.is_dir():
        raise SampleSetError(f"{out}: exists and is not a folder; choose another --out")
    if not out.exists() or not any(out.iterdir()):
        return "new"
    if not (out / RUN).is_file():
        raise SampleSetError(f"{out}: not empty and not a sample folder (no {RUN}); choose another --out")
    try:
        old = json.loads((out / RUN).read_text())
    except (ValueError, OSError) as e:
        raise SampleSetError(f"{out / RUN}: unreadable ({e})") from None
    differ = sorted(k for k in set(old) | set(ident) if old.get(k) != ident.get(k))
    if differ:
        raise SampleSetError(
            f"{out}: holds a sample run with other {', '.join(differ)}; continue it with the same command, "
            "or choose another --out"
        )
    return "complete" if (out / MANIFEST).is_file() else "resume"


def _check_inputs(recipe: Recipe, conds: list, text, mode: str, sampling: dict, seed: int, n: int) -> None:
    """What would fail in the middle of the run fails before any file is written."""
    check_mode(mode)
    Sampling(**sampling)
    index_seed(seed, n - 1)  # the seed and the largest index are in range
    if text is not None:
        encode_prompts(conds, text, recipe.condition.prefix_len)  # every prompt fits
    elif recipe.condition.kind == "class":
        top = recipe.condition.num_classes
        bad = [c for c in conds if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < top]
        if bad:
            raise SampleSetError(f"class id {bad[0]!r} is outside the recipe's classes 0..{top - 1}")
    else:
        raise SampleSetError(
            f"condition.kind {recipe.condition.kind!r}: sample takes class ids, or prompts with a text tokenizer"
        )


def _draw(model, conds: list, idx: range, *, text, mode: str, sampling: dict, seed: int, compile: bool):
    """(codes [b, h, w] on the CPU, seconds the model took) of the samples ``idx``."""
    ctx = context(model)
    dev = next(model.parameters()).device
    part = [conds[i % len(conds)] for i in idx]
    if text is None:
        cond, mask = torch.tensor(part, dtype=torch.long), None
    else:  # padded to prefix_len, not to the longest prompt of the batch: batchmates change nothing
        cond, mask, _ = encode_prompts(part, text, ctx.recipe.condition.prefix_len)
        mask = mask.to(dev)
    s = Sampling(**sampling, generator=index_generators(seed, idx, dev))
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    codes = model.generate(cond.to(dev), mode=mode, sampling=s, cond_mask=mask, compile=compile)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return codes.cpu(), time.perf_counter() - t0


def _png(image: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG")
    return buf.getvalue()


def _part(out: Path, b: int) -> Path:
    return out / "parts" / f"{b:06d}.safetensors"


def sample_set(
    model,
    conds: list,
    out,
    *,
    num_samples: int | None = None,
    tok: ImageTokenizer | None = None,
    text: Callable[[str], list[int]] | None = None,
    mode: str = "two_way",
    cfg_scale: float = 1.0,
    cfg_schedule: str = "constant",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 32,
    compile: bool = False,
    progress: bool = True,
    procs: Processes | None = None,
    model_info: dict | str | None = None,
) -> dict | None:
    """Draw ``num_samples`` (default: one per condition) samples into the folder ``out`` (new,
    empty, or an interrupted run of the same command, which continues), this process's share
    of them when ``procs`` is a launch's. ``tok`` decodes the codes to images (without one:
    codes only); ``text`` tokenises prompts (prompt recipes). ``model_info`` names the model
    in the run's identity. Returns the manifest on rank 0 (None on the other ranks)."""
    procs = procs or Processes()
    recipe = context(model).recipe
    if isinstance(conds, torch.Tensor):  # class ids as a tensor: the same ids as a list
        conds = conds.tolist()
    n = len(conds) if num_samples is None else num_samples
    if not conds:
        raise SampleSetError("nothing to sample: no conditions")
    if not (isinstance(n, int) and n >= 1) or not (isinstance(batch_size, int) and batch_size >= 1):
        raise SampleSetError(f"num_samples and batch_size must be integers >= 1, got {n!r} and {batch_size!r}")
    sampling = dict(cfg_scale=cfg_scale, cfg_schedule=cfg_schedule, temperature=temperature, top_k=top_k, top_p=top_p)
    _check_inputs(recipe, conds, text, mode, sampling, seed, n)
    out = Path(out)
    ident = _identity(recipe, conds, n, mode, sampling, seed, batch_size, model_info)
    # by content, not by path: an export replaced at the same path between a kill and the
    # resume would otherwise finish the run with another model
    ident["weights_sha256"] = weights_fingerprint(model, skip=("flashar.",) if mode == "raster" else ())
    ident.update(compile=compile, images=tok is not None)
    state = _check_folder(out, ident)
    if state == "complete":
        return json.loads((out / MANIFEST).read_text()) if procs.main else None
    procs.wait()  # every process has looked at the folder before rank 0 writes to it
    if state == "new" and procs.main:
        (out / "parts").mkdir(parents=True, exist_ok=True)
        if tok is not None:
            (out / "images").mkdir(exist_ok=True)
        atomic_write_bytes(out / RUN, json.dumps(ident, indent=1).encode())
    procs.wait()
    todo = [(b, idx) for b, idx in _numbered(n, batch_size, procs) if not _part(out, b).is_file()]
    who = f" (rank 0's share of {procs.world} processes)" if procs.world > 1 else ""
    bar = tqdm(
        total=sum(len(i) for _, i in todo),
        desc=f"sample {mode}{who}",
        unit="img",
        disable=not (progress and procs.main),  # one bar per launch
    )
    for b, idx in todo:
        codes, seconds = _draw(model, conds, idx, text=text, mode=mode, sampling=sampling, seed=seed, compile=compile)
        if tok is not None:
            for i, image in zip(idx, tok.decode(codes)):
                atomic_write_bytes(out / "images" / f"{i:06d}.png", _png(image))
        index = torch.tensor(list(idx), dtype=torch.int64)
        atomic_save_safetensors(
            {"index": index, "codes": codes.to(torch.int32)}, _part(out, b), metadata={"seconds": repr(seconds)}
        )
        bar.update(len(idx))
    bar.close()
    procs.wait()
    if not procs.main:
        return None
    return _merge(out, ident, recipe, conds, tok is not None, procs.world)


def _numbered(n: int, batch_size: int, procs: Processes) -> list[tuple[int, range]]:
    return [(idx.start // batch_size, idx) for idx in sample_indices(n, batch_size, procs)]


def read_parts(out: Path, n: int, batch_size: int) -> tuple[torch.Tensor, float]:
    """The codes of every batch part of a sample folder, in index order, and the model seconds
    they took; a missing or damaged part is a ``SampleSetError`` naming it."""
    codes, seconds = [], 0.0
    for b in range(-(-n // batch_size)):
        path = _part(out, b)
        if not path.is_file():
            raise SampleSetError(f"{out}: batch {b} was not drawn ({path} missing); run the same command again")
        try:
            with safe_open(str(path), "pt") as f:
                index, c = f.get_tensor("index"), f.get_tensor("codes")
                seconds += float(f.metadata()["seconds"])
        except Exception as e:  # noqa: BLE001 - safetensors' own error type for a damaged file, a missing key
            raise SampleSetError(
                f"{path}: damaged ({' '.join(str(e).split())[:120]}); delete it and run the same command "
                "again (that batch is drawn again)"
            ) from None
        if index.tolist() != list(range(b * batch_size, min(n, (b + 1) * batch_size))):
            raise SampleSetError(f"{path}: holds other indices than batch {b}'s; remove the folder and sample again")
        codes.append(c)
    return torch.cat(codes), seconds


def read_rgb(path: Path) -> np.ndarray:
    """A sample PNG as uint8 RGB [H, W, 3]; a damaged one is a ``SampleSetError`` naming it."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:  # PIL: truncated or not an image
        raise SampleSetError(
            f"{path}: damaged ({' '.join(str(e).split())[:120]}); delete it and the part file of its batch "
            "(parts/), then run the same command again"
        ) from None


def _merge(out: Path, ident: dict, recipe: Recipe, conds: list, images: bool, world: int) -> dict:
    """Rank 0, once every batch is drawn: the codes file, the .npz and the manifest (last)."""
    n = ident["num_samples"]
    codes, seconds = read_parts(out, n, ident["batch_size"])
    labels = [conds[i % len(conds)] for i in range(n)] if recipe.condition.kind == "class" else None
    tensors = {"codes": codes}
    if labels is not None:
        tensors["cond"] = torch.tensor(labels, dtype=torch.int64)
    atomic_save_safetensors(tensors, out / "codes.safetensors")
    manifest = {
        **ident,
        "recipe_spec": recipe.to_dict(),
        "condition_list": [str(c) for c in conds],
        "model_seconds": round(seconds, 3),
        "processes": world,
        "files": {"codes": "codes.safetensors"},
    }
    if images:
        first = read_rgb(out / "images" / "000000.png")
        h, w = first.shape[:2]
        pngs = (read_rgb(out / "images" / f"{i:06d}.png") for i in range(n))
        write_npz(out / "samples.npz", pngs, (n, h, w), labels)
        manifest["image_size"] = [h, w]
        manifest["files"].update(images="images/{index:06d}.png", npz="samples.npz")
    atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=1).encode())
    return manifest


def read_manifest(folder) -> dict:
    """The manifest of a complete sample folder."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        why = "an unfinished sample run: run its command again" if (Path(folder) / RUN).is_file() else "no manifest"
        raise SampleSetError(f"{folder}: not a complete sample folder ({why})")
    try:
        m = json.loads(path.read_bytes().decode("utf-8"))
    except (ValueError, OSError) as e:
        raise SampleSetError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise SampleSetError(f"{path}: not a flashar-adapt sample manifest")
    return m
