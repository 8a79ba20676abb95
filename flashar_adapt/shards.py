"""Pre-tokenized training data: safetensors shards of codebook indices plus a manifest.

Layout of a data folder::

    manifest.json            {"format": "flashar-shards/1", "grid": [H, W], "codebook_size": K,
                              "recipe": name, "cond_kind": "class" | "tokens",
                              "num_examples": N, "shards": [{"file": ..., "num_examples": n}, ...]}
    shard-00000.safetensors  codes [n, H, W] int16/int32; class ids ``cond`` [n] int64, or prompt ids
                             ``prompt`` [n, T] int32 left-padded with ``prompt_len`` [n] int32;
                             with a preview grid (manifest ``preview_grid`` [h, w]): ``preview``
                             [n, h, w], the grid decoded before the image (same dtype as codes)

Shards are validated when opened (shapes, dtypes, index ranges) and every file is written
atomically, so a crash while writing never leaves a shard that looks complete.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .errors import FlashARError
from .files import atomic_save_safetensors, atomic_write_bytes, inside
from .validate import Is, Num, OneOf, Seq, first_problem, short

FORMAT = "flashar-shards/1"
# The state of a run that is still writing a data folder (tokenize, data-free sampling): what
# the shards written so far hold, so the same command started again continues after them.
STATE = ".tokenize_state.json"


class DataError(FlashARError, ValueError):
    """A data folder or shard is missing, malformed or inconsistent with its manifest."""


# What a manifest must hold (shards' entries are checked one by one, their files by ``inside``).
MANIFEST_RULES = {
    "format": OneOf((FORMAT,)),
    "grid": Seq(Num(1, integer=True), length=2),
    "codebook_size": Num(2, integer=True),
    "cond_kind": OneOf(("class", "tokens")),
    "num_examples": Num(0, integer=True),
    "num_classes": Num(1, integer=True, optional=True),
    "preview_grid": Seq(Num(1, integer=True), length=2, optional=True),
    "shards": Is((list,), "a list of {file, num_examples}"),
}
SHARD_RULES = {"file": Is((str,), "a file name"), "num_examples": Num(0, integer=True)}


def _code_dtype(codebook_size: int) -> torch.dtype:
    return torch.int16 if codebook_size <= 2**15 else torch.int32


class ShardWriter:
    """Write examples to shards: ``add(codes, cond)`` any number of times, then ``close()``."""

    def __init__(
        self,
        out_dir,
        grid: tuple[int, int],
        codebook_size: int,
        cond_kind: str = "class",
        recipe: str = "",
        shard_size: int = 4096,
        max_prompt_len: int | None = None,
        num_classes: int | None = None,
        preview_grid: tuple[int, int] | None = None,
    ):
        """``num_classes``: class ids must lie in [0, num_classes] (the last one for the null
        class); recorded in the manifest so training checks it against the recipe.
        ``preview_grid`` (h, w): every example also holds the codes of a preview grid decoded
        before the image (``add(..., preview=)``)."""
        args = {
            "grid": list(grid) if isinstance(grid, (list, tuple)) else grid,
            "codebook_size": codebook_size,
            "cond_kind": cond_kind,
            "shard_size": shard_size,
            "max_prompt_len": max_prompt_len,
            "num_classes": num_classes,
            "preview_grid": None if preview_grid is None else list(preview_grid),
        }
        bad = first_problem(
            args,
            {
                **{k: MANIFEST_RULES[k] for k in ("grid", "codebook_size", "cond_kind", "num_classes", "preview_grid")},
                "shard_size": Num(1, integer=True),
                "max_prompt_len": Num(1, integer=True, optional=True),
            },
        )
        if bad:
            raise DataError(f"ShardWriter: {bad[0]} {bad[1]}")
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.grid, self.K, self.kind, self.recipe = tuple(grid), codebook_size, cond_kind, recipe
        self.shard_size, self.max_prompt_len, self.num_classes = shard_size, max_prompt_len, num_classes
        self.preview_grid = None if preview_grid is None else tuple(preview_grid)
        self.shards: list[dict] = []
        self._previews: list[torch.Tensor] = []
        self._codes: list[torch.Tensor] = []
        self._cond: list[torch.Tensor] = []
        self._pending = 0

    def add(
        self,
        codes: torch.Tensor,
        cond: torch.Tensor,
        prompt_len: torch.Tensor | None = None,
        preview: torch.Tensor | None = None,
    ) -> None:
        codes = _integers(codes, "codes")
        preview = self._check_preview(preview, codes.shape[0])
        if codes.dim() != 3 or tuple(codes.shape[1:]) != self.grid:
            raise DataError(f"codes must be [N, {self.grid[0]}, {self.grid[1]}], got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.K):
            raise DataError(f"codes must lie in [0, {self.K}), got min {int(codes.min())}, max {int(codes.max())}")
        cond = _integers(cond, "class ids" if self.kind == "class" else "prompt ids")
        if cond.dim() == 0 or cond.shape[0] != codes.shape[0]:
            raise DataError("codes and cond must have the same number of examples")
        if cond.numel() and int(cond.min()) < 0:
            raise DataError(f"{'class' if self.kind == 'class' else 'prompt'} ids must be >= 0, got {int(cond.min())}")
        if (
            self.kind == "class"
            and self.num_classes is not None
            and cond.numel()
            and int(cond.max()) > self.num_classes
        ):
            raise DataError(
                f"class ids must lie in [0, {self.num_classes}] (num_classes, plus the null class), "
                f"got {int(cond.max())}"
            )
        if self.kind == "tokens":
            if cond.dim() != 2:
                raise DataError("prompt ids must be [N, T] (left-padded)")
            lens = (
                torch.full((cond.shape[0],), cond.shape[1])
                if prompt_len is None
                else _integers(prompt_len, "prompt_len")
            )
            if lens.shape != (cond.shape[0],) or (
                lens.numel() and (int(lens.min()) < 1 or int(lens.max()) > cond.shape[1])
            ):
                raise DataError(f"prompt_len must be [N] integers in [1, {cond.shape[1]}]")
            T = self.max_prompt_len or cond.shape[1]
            if cond.shape[1] > T:
                raise DataError(f"prompts are {cond.shape[1]} tokens; max_prompt_len is {T}")
            pad = torch.zeros(cond.shape[0], T, dtype=torch.int32)
            pad[:, T - cond.shape[1] :] = cond.to(torch.int32)
            cond = torch.cat([pad, lens.to(torch.int32)[:, None]], 1)  # last column carries the length
        elif cond.dim() != 1:
            raise DataError("class ids must be [N]")
        self._codes.append(codes.to(_code_dtype(self.K)))
        if preview is not None:
            self._previews.append(preview.to(_code_dtype(self.K)))
        self._cond.append(cond)
        self._pending += codes.shape[0]
        while self._pending >= self.shard_size:
            self._flush(self.shard_size)

    def _check_preview(self, preview, n: int) -> torch.Tensor | None:
        if self.preview_grid is None:
            if preview is not None:
                raise DataError("this data folder has no preview grid (ShardWriter preview_grid): pass no preview")
            return None
        h, w = self.preview_grid
        if preview is None:
            raise DataError(f"this data folder holds a {h}x{w} preview grid per example: pass preview= [N, {h}, {w}]")
        preview = _integers(preview, "preview")
        if tuple(preview.shape) != (n, h, w):
            raise DataError(f"preview must be [{n}, {h}, {w}], got {tuple(preview.shape)}")
        if preview.numel() and (int(preview.min()) < 0 or int(preview.max()) >= self.K):
            raise DataError(f"preview codes must lie in [0, {self.K}), got min {int(preview.min())}")
        return preview

    def _flush(self, n: int) -> None:
        codes, cond = torch.cat(self._codes), torch.cat(self._cond)
        self._codes, self._cond = [codes[n:]], [cond[n:]]
        self._pending -= n
        codes, cond = codes[:n], cond[:n]
        name = f"shard-{len(self.shards):05d}.safetensors"
        if self.kind == "class":
            tensors = {"codes": codes, "cond": cond.to(torch.int64)}
        else:
            tensors = {"codes": codes, "prompt": cond[:, :-1].contiguous(), "prompt_len": cond[:, -1].contiguous()}
        if self.preview_grid is not None:
            previews = torch.cat(self._previews)
            self._previews = [previews[n:]]
            tensors["preview"] = previews[:n]
        atomic_save_safetensors(tensors, self.dir / name)
        self.shards.append({"file": name, "num_examples": n})

    def close(self) -> Path:
        if self._pending:
            self._flush(self._pending)
        manifest = {
            "format": FORMAT,
            "grid": list(self.grid),
            "codebook_size": self.K,
            "recipe": self.recipe,
            "cond_kind": self.kind,
            "num_examples": sum(s["num_examples"] for s in self.shards),
            "shards": self.shards,
        }
        if self.num_classes is not None:
            manifest["num_classes"] = self.num_classes
        if self.preview_grid is not None:
            manifest["preview_grid"] = list(self.preview_grid)
        atomic_write_bytes(self.dir / "manifest.json", json.dumps(manifest, indent=1).encode())
        return self.dir


def _integers(x, what: str) -> torch.Tensor:
    """``x`` as an integer tensor; floats and bools are refused, never truncated."""
    t = torch.as_tensor(x)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise DataError(f"{what} must be integers, got dtype {t.dtype} (convert them yourself if that is intended)")
    return t


@dataclass
class Batch:
    codes: torch.Tensor  # [B, H, W] int64
    cond: torch.Tensor  # [B] class ids or [B, T] prompt ids
    cond_mask: torch.Tensor | None  # [B, T] bool for prompts
    preview: torch.Tensor | None = None  # [B, h, w] int64: the preview grid, where the data has one


class ShardDataset:
    """Reads a data folder; every shard is validated when first opened."""

    def __init__(self, path):
        self.dir = Path(path)
        mf = self.dir / "manifest.json"
        if not mf.is_file():
            raise DataError(f"{self.dir}: no manifest.json (is this a flashar data folder?)")
        inside(self.dir, "manifest.json", DataError, "manifest")
        try:
            m = json.loads(mf.read_bytes())
        except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise DataError(f"{mf}: not valid JSON: {e}") from None
        if not isinstance(m, dict):
            raise DataError(f"{mf}: must hold a JSON object, got {short(m)}")
        for key in ("grid", "codebook_size", "cond_kind", "num_examples", "shards"):
            if key not in m:
                raise DataError(f"{mf}: missing key {key!r}")
        bad = first_problem(m, MANIFEST_RULES)
        for i, sh in enumerate(m["shards"] if bad is None else []):
            bad = (
                first_problem(sh, SHARD_RULES, f"shards[{i}].")
                if isinstance(sh, dict)
                else (f"shards[{i}]", f"must be a mapping, got {short(sh)}")
            )
            if bad:
                break
        if bad:
            raise DataError(f"{mf}: {bad[0]}: {bad[1]}")
        seen: dict[Path, str] = {}
        for sh in m["shards"]:
            real = inside(self.dir, sh["file"], DataError, "shard").resolve()
            if real in seen:  # its examples would be trained on twice as often as the others
                raise DataError(f"{mf}: shard {sh['file']!r} is listed twice (first as {seen[real]!r})")
            seen[real] = sh["file"]
        self.manifest = m
        self.grid = tuple(m["grid"])
        self.codebook_size = int(m["codebook_size"])
        self.cond_kind = m["cond_kind"]
        self.recipe = m.get("recipe", "")
        self.num_classes = m.get("num_classes")
        self.preview_grid = None if m.get("preview_grid") is None else tuple(m["preview_grid"])
        self.max_class: int | None = None if self.num_classes is None else self.num_classes
        self.sizes = [int(s["num_examples"]) for s in m["shards"]]
        if sum(self.sizes) != m["num_examples"]:
            raise DataError(f"{mf}: shard sizes add up to {sum(self.sizes)}, manifest says {m['num_examples']}")
        self.offsets = [0]
        for n in self.sizes:
            self.offsets.append(self.offsets[-1] + n)
        self._cache: dict[int, dict] = {}

    def limit_classes(self, num_classes: int, max_class: int) -> None:
        """Class ids above ``max_class`` (the model's last class, or its null class) are refused
        when a shard is opened, naming the file; a manifest that records more classes than the
        model's ``num_classes`` is refused now."""
        if self.num_classes is not None and self.num_classes > num_classes:
            raise DataError(
                f"{self.dir}: the data has {self.num_classes} classes (manifest num_classes); "
                f"the recipe's condition.num_classes is {num_classes}"
            )
        self.max_class = max_class
        self._cache = {}

    def __len__(self) -> int:
        return self.offsets[-1]

    def _shard(self, k: int) -> dict:
        if k in self._cache:
            return self._cache[k]
        info = self.manifest["shards"][k]
        path = inside(self.dir, info["file"], DataError, "shard")
        if not path.is_file():
            raise DataError(f"{path}: shard listed in the manifest is missing")
        try:
            t = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise DataError(f"{path}: unreadable or truncated safetensors file ({e})") from None
        n = info["num_examples"]
        codes = t.get("codes")
        if (
            codes is None
            or codes.dtype not in (torch.int16, torch.int32, torch.int64)
            or tuple(codes.shape) != (n, *self.grid)
        ):
            raise DataError(
                f"{path}: 'codes' must be an integer tensor [{n}, {self.grid[0]}, {self.grid[1]}], "
                f"got {None if codes is None else (codes.dtype, tuple(codes.shape))}"
            )
        if n and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise DataError(
                f"{path}: codes outside the codebook [0, {self.codebook_size}) "
                f"(min {int(codes.min())}, max {int(codes.max())})"
            )
        if self.cond_kind == "class":
            cond = t.get("cond")
            if cond is None or cond.shape != (n,) or cond.is_floating_point() or cond.dtype == torch.bool:
                raise DataError(f"{path}: 'cond' must be integer class ids [{n}]")
            top = self.max_class
            if n and (int(cond.min()) < 0 or (top is not None and int(cond.max()) > top)):
                raise DataError(
                    f"{path}: class ids outside [0, {'...' if top is None else top}] "
                    f"(min {int(cond.min())}, max {int(cond.max())})"
                )
        else:
            p, lens = t.get("prompt"), t.get("prompt_len")
            if (
                p is None
                or lens is None
                or p.dim() != 2
                or p.shape[0] != n
                or lens.shape != (n,)
                or p.is_floating_point()
                or lens.is_floating_point()
            ):
                raise DataError(f"{path}: integer 'prompt' [n, T] and 'prompt_len' [n] are required for prompt data")
            if n and (int(lens.min()) < 1 or int(lens.max()) > p.shape[1] or int(p.min()) < 0):
                raise DataError(f"{path}: prompt_len outside [1, {p.shape[1]}] or negative prompt ids")
        if self.preview_grid is not None:
            pv = t.get("preview")
            if (
                pv is None
                or pv.dtype not in (torch.int16, torch.int32, torch.int64)
                or pv.shape != (n, *self.preview_grid)
            ):
                raise DataError(
                    f"{path}: 'preview' must be an integer tensor [{n}, {self.preview_grid[0]}, "
                    f"{self.preview_grid[1]}] (manifest preview_grid)"
                )
            if n and (int(pv.min()) < 0 or int(pv.max()) >= self.codebook_size):
                raise DataError(f"{path}: preview codes outside the codebook [0, {self.codebook_size})")
        self._cache = {k: t}  # keep one shard in memory
        return t

    def get(self, indices: torch.Tensor) -> Batch:
        """Examples at global ``indices`` (any order)."""
        codes, conds, masks, previews = [], [], [], []
        for idx in indices.tolist():
            k = next(i for i in range(len(self.sizes)) if idx < self.offsets[i + 1])
            t = self._shard(k)
            r = idx - self.offsets[k]
            codes.append(t["codes"][r].long())
            if self.preview_grid is not None:
                previews.append(t["preview"][r].long())
            if self.cond_kind == "class":
                conds.append(t["cond"][r].long())
            else:
                p = t["prompt"][r].long()
                L = int(t["prompt_len"][r])
                conds.append(p)
                masks.append(torch.arange(p.shape[0]) >= p.shape[0] - L)
        return Batch(
            torch.stack(codes),
            torch.stack(conds),
            torch.stack(masks) if masks else None,
            torch.stack(previews) if previews else None,
        )

    def order(self, epoch: int, seed: int) -> torch.Tensor:
        """The example order of an epoch: shards shuffled, then examples within each shard,
        so a reader touches one shard at a time. Deterministic in (seed, epoch)."""
        g = torch.Generator().manual_seed(seed * 100_003 + epoch)
        out = []
        for k in torch.randperm(len(self.sizes), generator=g).tolist():
            out.append(self.offsets[k] + torch.randperm(self.sizes[k], generator=g))
        return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)

    def global_batches(self, batch_size: int, seed: int, start_step: int = 0):
        """Yield (step, global indices) forever, epoch after epoch, from ``start_step``."""
        n = len(self)
        if n < batch_size:
            raise DataError(f"{self.dir}: {n} examples, fewer than one global batch of {batch_size}")
        per_epoch = n // batch_size  # the ragged tail is dropped so every step has a full batch
        step = start_step
        while True:
            epoch, pos = divmod(step, per_epoch)
            order = self.order(epoch, seed)
            while pos < per_epoch:
                yield step, order[pos * batch_size : (pos + 1) * batch_size]
                pos += 1
                step += 1


def _is_data_manifest(path: Path) -> bool:
    """``path`` is the manifest of a data folder (it lists shards)."""
    try:
        m = json.loads(path.read_bytes())
    except (ValueError, OSError):
        return False
    return isinstance(m, dict) and "shards" in m


def resume_state(out: Path) -> dict | None:
    """The saved state of an interrupted run in ``out``, None for a fresh folder; refuses a
    finished data folder or a folder that holds something else."""
    if (out / "manifest.json").exists():
        if _is_data_manifest(out / "manifest.json"):  # else another command's folder (sample, evaluate)
            raise DataError(f"{out}: already holds a finished data folder (manifest.json); choose another --out")
        raise DataError(f"{out}: exists and is not an interrupted tokenize run; choose another --out")
    if (out / STATE).is_file():
        try:
            state = json.loads((out / STATE).read_bytes().decode("utf-8"))
        except (ValueError, OSError) as e:  # not JSON, not UTF-8
            raise DataError(f"{out / STATE}: unreadable state of the interrupted run ({e})") from None
        if not isinstance(state, dict):
            raise DataError(
                f"{out / STATE}: the state of an interrupted run is a JSON object, got {type(state).__name__}"
            )
        return state
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out}: exists and is not an interrupted tokenize run; choose another --out")
    return None
