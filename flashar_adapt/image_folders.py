"""``flashar-adapt tokenize``: an image folder (one sub-folder per class) or a JSONL file of
``{"image": path, "prompt": text}`` (or ``"class": id``) -> training shards (flashar_adapt.shards).

The run is resumable: inputs are taken in a fixed order, and after every shard a small state
file records how many inputs the written shards cover. A killed run started again with the
same command continues after the last written shard; shards are written atomically and the
manifest only at the very end, so no example is lost or written twice, and a half-done folder
is never mistaken for a finished one. Unreadable images, modes that do not convert to 8-bit
colour, and images smaller than the tokenizer's input are counted and listed, never fatal.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from tqdm.auto import tqdm

from .errors import InputError
from .files import atomic_write_bytes, is_within
from .recipe import Recipe
from .shards import STATE, DataError, ShardWriter, resume_state
from .tokenizers import ImageTokenizer
from .validate import Num

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
# High-bit-depth / float modes: converting them to 8-bit colour clips silently, so they are refused.
_REFUSED_MODES = ("I", "F", "I;16", "I;16B", "I;16L", "I;16N")
REPORT = "tokenize_report.json"


_CLASS_ID = Num(0, integer=True)


class BadImage(InputError):
    """One input image cannot be used (the reason is the message)."""


@dataclass(frozen=True)
class Item:
    image: Path
    cond: int | str  # class id, or the prompt text


# ---------------------------------------------------------------- sources


_NUMBERED = re.compile(r"^(\d+)[_\- .]")


def list_class_folder(root: Path) -> tuple[list[Item], list[str]]:
    """Items of an image folder with one sub-folder per class (sorted names -> ids 0..n-1).
    A sub-folder that is a data folder (ours: a manifest or a tokenize state) is refused:
    it would silently become a class. So are what would otherwise be dropped or mislabelled
    without a word: image files beside the class folders (no class), links to nothing, and
    numbered folder names whose number is not the id they get (``8_Bag`` alone would be
    class 0). Links to folders inside a class are followed (once each)."""
    root = Path(root)
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{root}: no class sub-folders (expected {root}/<class name>/<image files>)")
    loose = sorted(
        p.name
        for p in root.iterdir()
        if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir() and not p.name.startswith(".")
    )
    if loose:
        raise DataError(
            f"{root}: {len(loose)} image file(s) beside the class folders belong to no class ({loose[0]!r}, ...); "
            "move them into a class sub-folder"
        )
    for cid, name in enumerate(classes):
        if (root / name / "manifest.json").is_file() or (root / name / STATE).is_file():
            raise DataError(
                f"{root / name}: a data folder (tokenize output) inside the image folder would be read as a "
                "class; move it out of the image folder"
            )
        m = _NUMBERED.match(name)
        if m and int(m.group(1)) != cid:
            raise DataError(
                f"{root / name}: class ids follow the sorted folder names, so this folder is class {cid}, not "
                f"{int(m.group(1))} as its name says; give every class from 0 a folder, or drop the numbers"
            )
    items = []
    for cid, name in enumerate(classes):
        items += [Item(p, cid) for p in _image_files(root / name, root)]
    if not items:
        raise DataError(
            f"{root}: no images in its {len(classes)} class sub-folder(s) (looked for {', '.join(IMAGE_SUFFIXES)})"
        )
    return items, classes


def _image_files(folder: Path, root: Path) -> list[Path]:
    """The image files under the class ``folder`` of ``root``, sorted, following links to
    folders once each, but never back into ``root`` (another class, or a loop); a link named
    like an image that leads nowhere is an error (it would be skipped unseen)."""
    out, seen = [], set()
    root_real, own = Path(os.path.realpath(root)), Path(os.path.realpath(folder))
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = Path(os.path.realpath(top))
        other_class = is_within(real, root_real) and not is_within(real, own)
        if real in seen or other_class or is_within(root_real, real):
            dirs[:] = []
            continue
        seen.add(real)
        dirs.sort()
        for f in files:
            p = Path(top) / f
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            if not p.exists():
                raise DataError(f"{p}: a link to nothing ({os.readlink(p)!r}); remove it or restore its target")
            out.append(p)
    return sorted(out)


def check_out_outside(source, out) -> None:
    """A data folder written inside the class folder it is made from would be read as a
    class by the next run: refused."""
    if Path(source).is_dir() and is_within(out, source):
        raise DataError(
            f"--out {out} lies inside the image folder {source}; it would be read as a class next time. "
            "Choose a folder outside it"
        )


def read_jsonl(path: Path, cond_kind: str) -> list[Item]:
    """Items of a JSONL file; image paths are relative to the file's folder. A malformed line
    is an error naming the line, before anything is written."""
    path = Path(path)
    key = "prompt" if cond_kind == "tokens" else "class"
    items = []
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not UTF-8 text (byte at offset {e.start}); a source is a class folder or a JSONL file of "
            '{"image": ..., "class": ...} lines'
        ) from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("image"), str) or key not in rec:
            raise DataError(f"{path}:{n}: each line must be an object with 'image' (a path) and {key!r}")
        cond = rec[key]
        if key == "prompt" and not (isinstance(cond, str) and cond.strip()):
            raise DataError(f"{path}:{n}: 'prompt' must be a non-empty string")
        if key == "class" and _CLASS_ID.problem(cond) is not None:
            raise DataError(f"{path}:{n}: 'class' must be a non-negative integer")
        img = Path(rec["image"])
        items.append(Item(img if img.is_absolute() else path.parent / img, cond))
    if not items:
        raise DataError(f"{path}: no examples in it")
    return items


# ---------------------------------------------------------------- images


def load_image(path: Path, tok: ImageTokenizer, allow_upscale: bool = False) -> torch.Tensor:
    """One image as float [C, H, W] in [0, 1] at the tokenizer's input size: scaled so it
    covers that size, then centre-cropped. Raises BadImage with the reason."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in _REFUSED_MODES:
                raise BadImage(f"wrong mode {im.mode!r} (high bit depth or float; save it as 8-bit L or RGB)")
            # cameras store the pixels as shot and the turn to show them upright in EXIF
            im = ImageOps.exif_transpose(im)
            w, h = im.size
            if _transparent(im):  # convert() would drop the alpha: a cut-out turns into its background
                raise BadImage(
                    f"has transparent pixels ({im.mode}); flatten it onto the background your model's images have"
                )
            im = im.convert("L" if tok.channels == 1 else "RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        if isinstance(e, BadImage):
            raise
        raise BadImage(f"unreadable ({type(e).__name__}: {e})") from None
    H, W = tok.image_size
    scale = max(H / h, W / w)
    if scale > 1 and not allow_upscale:
        raise BadImage(f"too small ({w}x{h}; the tokenizer takes {W}x{H}; --allow-upscale to scale it up)")
    if (w, h) != (W, H):
        nw, nh = max(W, round(w * scale)), max(H, round(h * scale))
        im = im.resize((nw, nh), Image.Resampling.BICUBIC)
        left, top = (nw - W) // 2, (nh - H) // 2
        im = im.crop((left, top, left + W, top + H))
    x = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).view(H, W, -1)
    return x.permute(2, 0, 1).float().div(255.0)


def _transparent(im) -> bool:
    """Whether any pixel of ``im`` is not fully opaque (an alpha channel that is all 255, as
    many editors save, is not transparency)."""
    if im.mode in ("P", "L", "RGB") and "transparency" in im.info:
        im = im.convert("RGBA" if im.mode != "L" else "LA")
    if im.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        return im.getchannel("A").getextrema()[0] < 255
    return False


def to_pil(image: torch.Tensor):
    """float [C, H, W] in [0, 1] -> a PIL image (L or RGB)."""
    x = image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    if x.shape[0] == 1:
        return Image.fromarray(x[0].numpy(), "L")
    return Image.fromarray(x.permute(1, 2, 0).contiguous().numpy(), "RGB")


# ---------------------------------------------------------------- the run


def inputs_fingerprint(items: list[Item], recipe: Recipe, shard_size: int, extra: str) -> str:
    """What a tokenize run records to resume only the same run: the recipe's sizes, the shard
    size, and each input's image path, condition and byte size."""
    h = hashlib.sha256()
    h.update(json.dumps([recipe.name, list(recipe.image.grid), recipe.image.codebook_size, shard_size, extra]).encode())
    for it in items:  # the size too: an image replaced after it was encoded is another input
        h.update(f"{it.image}\0{it.cond}\0{_size(it.image)}\n".encode())
    return h.hexdigest()


def _size(path) -> int:
    try:
        return os.stat(path).st_size
    except (OSError, TypeError, ValueError):  # unreadable: listed as bad when it is read
        return -1


def tokenize_dataset(
    items: list[Item],
    out_dir,
    tok: ImageTokenizer,
    recipe: Recipe,
    *,
    text_tokenizer: Callable[[str], list[int]] | None = None,
    batch_size: int = 32,
    shard_size: int = 4096,
    allow_upscale: bool = False,
    progress: bool = True,
    extra: str = "",
) -> dict:
    """Encode ``items`` into a data folder at ``out_dir``; resumes an interrupted run there.
    Returns the report (examples written, bad images with reasons)."""
    kind = recipe.condition.kind
    if kind not in ("class", "tokens"):
        raise DataError(f"condition.kind {kind!r}: tokenize writes class ids or prompt token ids only")
    if kind == "tokens" and text_tokenizer is None:
        raise DataError(f"recipe {recipe.name!r} is conditioned on prompts: give a text tokenizer (--text-tokenizer)")
    if kind == "class":
        n_cls = recipe.condition.num_classes
        over = [it for it in items if it.cond >= n_cls]
        if over:
            raise DataError(f"class id {over[0].cond} ({over[0].image}) is outside the recipe's {n_cls} classes")
    out = Path(out_dir)
    state = resume_state(out)
    fp = inputs_fingerprint(items, recipe, shard_size, extra)
    if state is not None and state.get("fingerprint") != fp and not state.get("shards") and not state.get("done"):
        state = None  # a run that wrote nothing (every image bad, or killed at once): start over with these inputs
    if state is not None and state.get("fingerprint") != fp:
        raise DataError(
            f"{out}: holds an interrupted run of other inputs or settings; finish it with the same "
            "command, or choose another --out"
        )
    if state is None:  # recorded before the first shard: a folder with shards always has its state
        state = {"fingerprint": fp, "done": 0, "shards": [], "bad": []}
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(out / STATE, json.dumps(state).encode())
    T = recipe.condition.prefix_len if kind == "tokens" else None
    classes = recipe.condition.num_classes if kind == "class" else None  # recorded: training checks it
    writer = ShardWriter(
        out, recipe.image.grid, recipe.image.codebook_size, kind, recipe.name, shard_size, T, num_classes=classes
    )
    writer.shards = list(state["shards"])
    run = _Run(items, writer, tok, state, out, T, text_tokenizer, allow_upscale)
    run.go(batch_size, progress)
    report = {
        "num_examples": sum(s["num_examples"] for s in writer.shards),
        "num_inputs": len(items),
        "num_bad": len(state["bad"]),
        "bad": state["bad"],
    }
    atomic_write_bytes(out / REPORT, json.dumps(report, indent=1).encode())
    if report["num_examples"] == 0:  # no manifest, the state kept: the same command tries again
        raise DataError(f"{out}: none of the {len(items)} images could be used; reasons in {out / REPORT}")
    os.unlink(out / STATE)
    return report


class _Run:
    """The loop of one tokenize run: encode batches, cut exact shards, save state after each."""

    def __init__(self, items, writer, tok, state, out, T, text_tokenizer, allow_upscale):
        self.items, self.writer, self.tok, self.state, self.out = items, writer, tok, state, out
        self.T, self.text, self.upscale = T, text_tokenizer, allow_upscale
        self.pending: list[tuple[int, torch.Tensor, torch.Tensor, int]] = []  # (item index, codes, cond, prompt len)
        self.bad: list[tuple[int, str, str]] = [(-1, b[0], b[1]) for b in state["bad"]]

    def go(self, batch_size: int, progress: bool) -> None:
        start = self.state["done"]
        bar = tqdm(total=len(self.items), initial=start, desc="tokenize", unit="img", disable=not progress)
        imgs, conds, idx = [], [], []
        for i in range(start, len(self.items)):
            it = self.items[i]
            try:
                cond, plen = self._cond(it)
                imgs.append(load_image(it.image, self.tok, self.upscale))
            except BadImage as e:
                self.bad.append((i, str(it.image), str(e)))
            else:
                conds.append((cond, plen))
                idx.append(i)
            bar.update(1)
            if len(imgs) == batch_size or (i == len(self.items) - 1 and imgs):
                self._encode(imgs, conds, idx)
                imgs, conds, idx = [], [], []
                bar.set_postfix(bad=len(self.bad))
        bar.close()
        self._flush_all()

    def _cond(self, it: Item) -> tuple[torch.Tensor, int]:
        if self.T is None:
            return torch.tensor(it.cond), 0
        ids = list(self.text(it.cond))
        if not ids or len(ids) > self.T:
            raise BadImage(f"prompt is {len(ids)} tokens; condition.prefix_len allows 1..{self.T}")
        row = torch.zeros(self.T, dtype=torch.int32)
        row[self.T - len(ids) :] = torch.tensor(ids, dtype=torch.int32)  # left-padded, as the shards store prompts
        return row, len(ids)

    def _encode(self, imgs, conds, idx) -> None:
        codes = self.tok.encode(torch.stack(imgs))
        for k, i in enumerate(idx):
            self.pending.append((i, codes[k], conds[k][0], conds[k][1]))
        while len(self.pending) >= self.writer.shard_size:
            chunk = self.pending[: self.writer.shard_size]
            self._write(chunk, chunk[-1][0] + 1)
            self.pending = self.pending[self.writer.shard_size :]

    def _add(self, chunk) -> None:
        codes = torch.stack([c for _, c, _, _ in chunk])
        cond = torch.stack([c for _, _, c, _ in chunk])
        lens = torch.tensor([n for _, _, _, n in chunk]) if self.T is not None else None
        self.writer.add(codes, cond, lens)

    def _write(self, chunk, next_index: int) -> None:
        """Write one full shard, then record that inputs before ``next_index`` are done."""
        self._add(chunk)  # exactly shard_size examples with nothing pending: add() writes the shard at once
        self.state["done"] = next_index
        self.state["shards"] = list(self.writer.shards)
        self.state["bad"] = [[p, r] for i, p, r in self.bad if i < next_index]
        atomic_write_bytes(self.out / STATE, json.dumps(self.state).encode())

    def _flush_all(self) -> None:
        """The last, short shard and the manifest. The state file is not advanced first: a run
        killed in here redoes the tail."""
        any_example = bool(self.pending or self.writer.shards)
        if self.pending:
            self._add(self.pending)
            self.pending = []
        self.state["bad"] = [[p, r] for _, p, r in self.bad]
        if any_example:  # no manifest for a folder without a single example
            self.writer.close()
