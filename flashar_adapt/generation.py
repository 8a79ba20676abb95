"""Images from a model, batch by batch, into a new folder: codes, PNG files and a labelled grid
(``flashar-adapt generate``; ``fa.decode_images`` is the Python form of the last step).

The folder is built beside its destination and renamed into place, so a failure leaves no
half-written results; an output folder that exists is refused before any work. The temp
folder carries our marker, so a later run removes it only once its process is dead
(``flashar_adapt.files``); nothing else beside the output is ever touched.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from .decoding import prefill, step, use_compile
from .errors import InputError
from .files import apply_umask, atomic_save_safetensors, disown, owned_temp_dir, remove_dead_temp_dirs
from .image_folders import to_pil
from .patching import context
from .recipe import Recipe
from .sampling import Sampling, draw
from .tokenizers import ImageTokenizer, TokenizerError

GENERATE_KIND = "flashar-adapt generate"  # the kind our temp folders' markers name


class GenerateError(InputError):
    """Bad input to ``generate`` (conditions, prompts file, output folder)."""


def read_prompts(path) -> list[str]:
    """One prompt per line; an empty line is an error naming it (it would be a silent empty prompt)."""
    path = Path(path)
    if path.is_dir():
        raise GenerateError(f"{path}: a folder, not a prompts file")
    if not path.exists():  # a pipe (<(...)) or a device is read like a file
        raise GenerateError(f"{path}: prompts file not found")
    try:  # utf-8-sig: an editor's byte-order mark is not part of the first prompt
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise GenerateError(f"{path}: not UTF-8 text (byte at offset {e.start}); save it as UTF-8") from None
    # lines end at \n only: str.splitlines would also split a prompt at a form feed or U+2028
    lines = [ln.removesuffix("\r") for ln in text.split("\n")]
    while lines and not lines[-1].strip():
        lines.pop()  # a trailing newline or blank tail is not a prompt
    empty = [n for n, ln in enumerate(lines, 1) if not ln.strip()]
    if empty:
        raise GenerateError(f"{path}: line {empty[0]} is empty ({len(empty)} empty line(s)); remove them")
    if not lines:
        raise GenerateError(f"{path}: no prompts in it")
    return [ln.strip() for ln in lines]


def conditions(
    recipe: Recipe,
    *,
    classes: list[int] | None = None,
    prompts: list[str] | None = None,
    prompts_file: str | None = None,
    per_cond: int = 1,
) -> list:
    """What to generate, one entry per image (each condition repeated ``per_cond`` times):
    the ``classes`` (default: every class) of a class recipe, the ``prompts`` and the lines
    of ``prompts_file`` of a prompt recipe."""
    if recipe.condition.kind == "class":
        if prompts or prompts_file:
            raise GenerateError(f"recipe {recipe.name!r} is class-conditional: give --classes, not prompts")
        n = recipe.condition.num_classes
        classes = classes if classes else list(range(n))
        bad = [c for c in classes if not 0 <= c < n]
        if bad:
            raise GenerateError(f"--classes: {bad[0]} is outside 0..{n - 1}")
        conds = classes
    elif recipe.condition.kind == "tokens":
        if classes:
            raise GenerateError(f"recipe {recipe.name!r} is conditioned on prompts: give --prompts or --prompts-file")
        conds = list(prompts or []) + (read_prompts(prompts_file) if prompts_file else [])
        if not conds:
            raise GenerateError("give --prompts TEXT ... or --prompts-file FILE")
        if any(not p.strip() for p in conds):
            raise GenerateError("--prompts: empty prompt")
    else:
        raise GenerateError(f"condition.kind {recipe.condition.kind!r}: generate takes classes or prompts only")
    return [c for c in conds for _ in range(per_cond)]


def negative_prompt_ids(recipe: Recipe, negative: str | None, cfg_scale: float, text) -> list[int] | None:
    """The token ids of ``--negative-prompt`` (written through the prompt template, like the
    prompts), checked before any work: a prompt recipe, guidance on, 1..prefix_len tokens."""
    if negative is None:
        return None
    if recipe.condition.kind != "tokens" or text is None:
        raise GenerateError(f"--negative-prompt needs a prompt-conditioned recipe; {recipe.name!r} is not one")
    if cfg_scale == 1.0:
        raise GenerateError("--negative-prompt acts only through classifier-free guidance: pass --cfg other than 1")
    if not negative.strip():
        raise GenerateError("--negative-prompt: empty prompt")
    ids = list(text(negative))
    limit = recipe.condition.prefix_len
    if not ids or (limit is not None and len(ids) > limit):
        raise GenerateError(f"--negative-prompt is {len(ids)} tokens; condition.prefix_len allows 1..{limit}")
    return ids


def _prompt_batch(prompts: list[str], text, prefix_len: int):
    ids = [list(text(p)) for p in prompts]
    for p, i in zip(prompts, ids):
        if not i or len(i) > prefix_len:
            raise GenerateError(f"prompt {p[:40]!r} is {len(i)} tokens; condition.prefix_len allows 1..{prefix_len}")
    T = max(len(i) for i in ids)
    cond = torch.zeros(len(ids), T, dtype=torch.long)
    mask = torch.zeros(len(ids), T, dtype=torch.bool)
    for k, i in enumerate(ids):  # left-padded
        cond[k, T - len(i) :] = torch.tensor(i)
        mask[k, T - len(i) :] = True
    return cond, mask


CLASSES = "classes.json"  # class names in id order, written by ``tokenize`` from the sub-folder names


def read_class_names(path: str | os.PathLike) -> list[str] | None:
    """The class names of a ``classes.json`` (a JSON list of strings, id order); None when
    there is none. A malformed one is an error naming it (it would label every image wrongly)."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        names = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise GenerateError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise GenerateError(f"{path}: expected a JSON list of class names")
    return names


def check_class_names(names: list[str], num_classes: int, path) -> None:
    """Class names label files and grid rows: two classes of one name could not be told
    apart, and names past the recipe's classes name ids the model does not have. (Fewer
    names than classes is a data folder of some classes: the others are labelled by id.)"""
    seen = {}
    for i, n in enumerate(names):
        if n in seen:
            raise GenerateError(
                f"{path}: classes {seen[n]} and {i} are both named {n!r}; every class needs its own name"
            )
        seen[n] = i
    if len(names) > num_classes:
        raise GenerateError(f"{path}: names {len(names)} classes, the recipe has {num_classes}")


def condition_labels(conds: list, class_names: list[str] | None = None) -> list[str]:
    """How files and grid rows name each condition: its class name when ``class_names`` has
    one for the id, else the id or the prompt."""
    return [
        class_names[c] if class_names and isinstance(c, int) and 0 <= c < len(class_names) else str(c) for c in conds
    ]


def steps_per_image(mode: str, grid) -> int:
    """Serial decoding steps after the prefix: H+W-1 anti-diagonals, or H*W tokens."""
    return grid[0] + grid[1] - 1 if mode == "two_way" else grid[0] * grid[1]


def generate_codes(
    model,
    conds: list,
    *,
    text=None,
    mode="two_way",
    cfg_scale=1.0,
    cfg_schedule="constant",
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    seed=0,
    batch_size=16,
    progress=True,
    log=print,
    compile=False,
    negative: list[int] | None = None,
) -> tuple[torch.Tensor, list[dict]]:
    """Codes for every condition, batch by batch, with the steps and wall time of each batch.
    With ``compile`` the first batch includes the compile time, and a smaller last batch is
    padded to the batch size (with its last condition, results dropped) so that it runs the
    graphs already compiled instead of compiling its own. ``compile="auto"`` is decided once,
    for the batch size (``decoding.use_compile``). ``negative``: token ids of one negative
    prompt for every image (``negative_prompt_ids``)."""
    ctx = context(model)
    dev = next(model.parameters()).device
    rows = min(batch_size, len(conds)) * (2 if cfg_scale != 1.0 else 1)  # the largest batch's, CFG doubling
    compile = use_compile(compile, dev, rows, ctx.runner.static_caches)
    neg = None if negative is None else torch.tensor(negative, dtype=torch.long, device=dev)
    g = torch.Generator(device=dev).manual_seed(seed)
    grid = ctx.recipe.image.grid
    out, timings = [], []
    starts = range(0, len(conds), batch_size)
    for b, i in enumerate(tqdm(starts, desc=f"generate ({mode})", disable=not progress)):
        part = conds[i : i + batch_size]
        n_real = len(part)
        if compile and b > 0 and n_real < batch_size:
            part = part + [part[-1]] * (batch_size - n_real)
        if text is None:
            cond, mask = torch.tensor(part, dtype=torch.long, device=dev), None
        else:
            cond, mask = (t.to(dev) for t in _prompt_batch(part, text, ctx.recipe.condition.prefix_len))
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        sampling = Sampling(cfg_scale, cfg_schedule, temperature, top_k, top_p, g)
        if n_real == len(part):
            codes = model.generate(cond, mode=mode, cond_mask=mask, negative=neg, sampling=sampling, compile=compile)
        else:
            codes = _decode_padded(model, cond, mask, n_real, mode, sampling, neg)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t0
        steps = steps_per_image(mode, grid)
        timings.append({"batch": b, "images": n_real, "steps": steps, "seconds": round(dt, 4)})
        padded = f" (padded to {len(part)}: the compiled size)" if len(part) != n_real else ""
        log(f"batch {b + 1}/{len(starts)}: {n_real} images{padded}, {steps} steps, {dt:.2f} s")
        out.append(codes[:n_real].cpu())
    return torch.cat(out), timings


def _decode_padded(model, cond, mask, n_real: int, mode: str, sampling: Sampling, negative=None) -> torch.Tensor:
    """Compiled decoding of a batch padded past its ``n_real`` images: the first rows sample
    exactly as an unpadded batch would (the padding rows decode greedily, drawing no random
    numbers), so padding changes no image."""
    if sampling.greedy:
        return model.generate(cond, mode=mode, cond_mask=mask, negative=negative, sampling=sampling, compile=True)
    H, W = context(model).recipe.image.grid
    # the uniforms an unpadded batch draws at its prefill, drawn here for the real rows only
    noise = sampling.noise(n_real, H * W, cond.device)
    greedy = Sampling(sampling.cfg_scale, sampling.cfg_schedule, top_k=1)
    state = prefill(model, cond, mode=mode, cond_mask=mask, negative=negative, sampling=greedy, compile=True)
    while not state.done:
        cells = state.cells()
        step(state)
        lg = state.logits[:n_real]
        u = noise[:, cells].reshape(-1)
        with torch.inference_mode():  # the state's tensors are inference tensors
            state.codes[:n_real, cells] = draw(lg.reshape(-1, lg.shape[-1]), u, sampling).view(n_real, -1)
    return state.image()


def labelled_grid(images: torch.Tensor, labels: list[str], per_row: int, min_cell: int = 64):
    """One PIL image: a row per condition, its label on the left."""
    N, C, H, W = images.shape
    zoom = max(1, -(-min_cell // max(H, W)))
    h, w = H * zoom, W * zoom
    rows = -(-N // per_row)
    label_w = 8 + 7 * min(28, max((len(s) for s in labels), default=0))
    canvas = Image.new("RGB", (label_w + per_row * (w + 2), rows * (h + 2)), "white")
    draw = ImageDraw.Draw(canvas)
    for k in range(N):
        r, c = divmod(k, per_row)
        tile = to_pil(images[k]).convert("RGB").resize((w, h), Image.Resampling.NEAREST)
        canvas.paste(tile, (label_w + c * (w + 2), r * (h + 2)))
        if c == 0:
            draw.text((4, r * (h + 2) + h // 2 - 6), labels[k][:28], fill="black")
    return canvas


def _write_outputs(
    tmp: Path, codes, labels: list[str], meta: dict, tok: ImageTokenizer | None, recipe: Recipe, per_row: int
) -> str:
    atomic_save_safetensors({"codes": codes.to(torch.int32)}, tmp / "codes.safetensors")
    if tok is None:
        (tmp / "generate.json").write_text(json.dumps(meta, indent=1))
        return f"codes only (recipe {recipe.name!r} has no tokenizer section): codes.safetensors"
    try:
        images = tok.decode(codes)
    except TokenizerError as e:
        meta["decode_error"] = str(e)
        (tmp / "generate.json").write_text(json.dumps(meta, indent=1))
        return f"codes only ({e})"
    (tmp / "images").mkdir()
    for k in range(images.shape[0]):
        safe = "".join(ch if ch.isalnum() else "_" for ch in labels[k][:32])
        to_pil(images[k]).save(tmp / "images" / f"{k:05d}_{safe}.png")
    labelled_grid(images, labels, per_row).save(tmp / "grid.png")  # one labelled row per condition
    (tmp / "generate.json").write_text(json.dumps(meta, indent=1))
    return f"{images.shape[0]} PNG files in images/, grid.png, codes.safetensors"


def refuse_existing(out: str | os.PathLike) -> Path:
    """``out`` as a Path; an existing one is refused (nothing is ever written over)."""
    out = Path(out)
    if out.exists() or out.is_symlink():
        raise GenerateError(f"{out}: exists; choose a new --out (nothing was written)")
    return out


def generate_to_folder(
    model,
    conds: list,
    out: str | os.PathLike,
    *,
    tok: ImageTokenizer | None = None,
    text: Callable[[str], list[int]] | None = None,
    mode: str = "two_way",
    cfg_scale: float = 1.0,
    cfg_schedule: str = "constant",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int = 0,
    batch_size: int = 16,
    per_cond: int = 1,
    progress: bool = True,
    compile: bool | str = False,
    class_names: list[str] | None = None,
    negative: list[int] | None = None,
) -> str:
    """Generate one image per entry of ``conds`` into the new folder ``out``: codes.safetensors,
    generate.json (settings and per-batch timings) and, when ``tok`` decodes them, PNG files and
    grid.png (``per_cond`` images a row), labelled with ``class_names`` where they name the
    class (``read_class_names``); ``negative``: the token ids of a negative prompt
    (``negative_prompt_ids``). Returns what was written, in words."""
    out = refuse_existing(out)
    recipe = context(model).recipe
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temp_dirs(out, GENERATE_KIND)  # left by generate runs that were killed
    tmp = owned_temp_dir(out, GENERATE_KIND)
    keep = False  # the results stay in tmp only when something took their place meanwhile
    try:
        codes, timings = generate_codes(
            model,
            conds,
            text=text,
            mode=mode,
            cfg_scale=cfg_scale,
            cfg_schedule=cfg_schedule,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            batch_size=batch_size,
            progress=progress,
            compile=compile,
            negative=negative,
        )
        labels = condition_labels(conds, class_names)
        meta = {
            "recipe": recipe.name,
            "mode": mode,
            "cfg": cfg_scale,
            "negative": negative,
            "seed": seed,
            "grid": list(codes.shape[1:]),
            "compile": compile,
            "conditions": [str(c) for c in conds],
            "labels": labels,
            "batches": timings,
        }
        what = _write_outputs(tmp, codes, labels, meta, tok, recipe, per_cond)
        disown(tmp)  # from here on the folder is the results (or left to the user)
        if out.exists() or out.is_symlink():
            keep = True
            raise GenerateError(f"{out}: appeared while generating; results left in {tmp}")
        apply_umask(tmp)  # mkdtemp made it 0700; the results are read like any file
        os.replace(tmp, out)
    except BaseException:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return what
