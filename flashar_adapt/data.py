"""Pre-tokenized training data: safetensors shards of codebook indices plus a manifest.

Layout of a data folder::

    manifest.json            {"format": "flashar-shards/1", "grid": [H, W], "codebook_size": K,
                              "recipe": name, "cond_kind": "class" | "tokens",
                              "num_examples": N, "shards": [{"file": ..., "num_examples": n}, ...]}
    shard-00000.safetensors  codes [n, H, W] int16/int32; class ids ``cond`` [n] int64, or prompt ids
                             ``prompt`` [n, T] int32 left-padded with ``prompt_len`` [n] int32

Shards are validated when opened (shapes, dtypes, index ranges) and every file is written
atomically, so a crash while writing never leaves a shard that looks complete.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT = "flashar-shards/1"


class DataError(ValueError):
    """A data folder or shard is missing, malformed or inconsistent with its manifest."""


def _umask_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _umask_mode())  # mkstemp makes 0600 files; keep the usual permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save_safetensors(tensors: dict, path: Path, metadata: dict | None = None) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.chmod(tmp, _umask_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _code_dtype(codebook_size: int) -> torch.dtype:
    return torch.int16 if codebook_size <= 2**15 else torch.int32


class ShardWriter:
    """Write examples to shards: ``add(codes, cond)`` any number of times, then ``close()``."""

    def __init__(self, out_dir, grid: tuple[int, int], codebook_size: int, cond_kind: str = "class",
                 recipe: str = "", shard_size: int = 4096, max_prompt_len: int | None = None):
        if cond_kind not in ("class", "tokens"):
            raise ValueError(f"cond_kind must be 'class' or 'tokens', got {cond_kind!r}")
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.grid, self.K, self.kind, self.recipe = tuple(grid), codebook_size, cond_kind, recipe
        self.shard_size, self.max_prompt_len = shard_size, max_prompt_len
        self.shards: list[dict] = []
        self._codes: list[torch.Tensor] = []
        self._cond: list[torch.Tensor] = []
        self._pending = 0

    def add(self, codes: torch.Tensor, cond: torch.Tensor, prompt_len: torch.Tensor | None = None) -> None:
        codes = torch.as_tensor(codes)
        if codes.dim() != 3 or tuple(codes.shape[1:]) != self.grid:
            raise DataError(f"codes must be [N, {self.grid[0]}, {self.grid[1]}], got {tuple(codes.shape)}")
        if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= self.K):
            raise DataError(f"codes must lie in [0, {self.K})")
        cond = torch.as_tensor(cond)
        if cond.shape[0] != codes.shape[0]:
            raise DataError("codes and cond must have the same number of examples")
        if self.kind == "tokens":
            if cond.dim() != 2:
                raise DataError("prompt ids must be [N, T] (left-padded)")
            lens = torch.full((cond.shape[0],), cond.shape[1]) if prompt_len is None else torch.as_tensor(prompt_len)
            T = self.max_prompt_len or cond.shape[1]
            if cond.shape[1] > T:
                raise DataError(f"prompts are {cond.shape[1]} tokens; max_prompt_len is {T}")
            pad = torch.zeros(cond.shape[0], T, dtype=torch.int32)
            pad[:, T - cond.shape[1]:] = cond.to(torch.int32)
            cond = torch.cat([pad, lens.to(torch.int32)[:, None]], 1)  # last column carries the length
        elif cond.dim() != 1:
            raise DataError("class ids must be [N]")
        self._codes.append(codes.to(_code_dtype(self.K)))
        self._cond.append(cond)
        self._pending += codes.shape[0]
        while self._pending >= self.shard_size:
            self._flush(self.shard_size)

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
        atomic_save_safetensors(tensors, self.dir / name)
        self.shards.append({"file": name, "num_examples": n})

    def close(self) -> Path:
        if self._pending:
            self._flush(self._pending)
        manifest = {"format": FORMAT, "grid": list(self.grid), "codebook_size": self.K, "recipe": self.recipe,
                    "cond_kind": self.kind, "num_examples": sum(s["num_examples"] for s in self.shards),
                    "shards": self.shards}
        atomic_write_bytes(self.dir / "manifest.json", json.dumps(manifest, indent=1).encode())
        return self.dir


@dataclass
class Batch:
    codes: torch.Tensor  # [B, H, W] int64
    cond: torch.Tensor  # [B] class ids or [B, T] prompt ids
    cond_mask: torch.Tensor | None  # [B, T] bool for prompts


class ShardDataset:
    """Reads a data folder; every shard is validated when first opened."""

    def __init__(self, path):
        self.dir = Path(path)
        mf = self.dir / "manifest.json"
        if not mf.is_file():
            raise DataError(f"{self.dir}: no manifest.json (is this a flashar data folder?)")
        try:
            m = json.loads(mf.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"{mf}: not valid JSON: {e}") from None
        if m.get("format") != FORMAT:
            raise DataError(f"{mf}: format {m.get('format')!r} is not {FORMAT!r}")
        for key in ("grid", "codebook_size", "cond_kind", "num_examples", "shards"):
            if key not in m:
                raise DataError(f"{mf}: missing key {key!r}")
        self.manifest = m
        self.grid = tuple(m["grid"])
        self.codebook_size = int(m["codebook_size"])
        self.cond_kind = m["cond_kind"]
        self.recipe = m.get("recipe", "")
        self.sizes = [int(s["num_examples"]) for s in m["shards"]]
        if sum(self.sizes) != m["num_examples"]:
            raise DataError(f"{mf}: shard sizes add up to {sum(self.sizes)}, manifest says {m['num_examples']}")
        self.offsets = [0]
        for n in self.sizes:
            self.offsets.append(self.offsets[-1] + n)
        self._cache: dict[int, dict] = {}

    def __len__(self) -> int:
        return self.offsets[-1]

    def _shard(self, k: int) -> dict:
        if k in self._cache:
            return self._cache[k]
        info = self.manifest["shards"][k]
        path = self.dir / info["file"]
        if not path.is_file():
            raise DataError(f"{path}: shard listed in the manifest is missing")
        try:
            t = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise DataError(f"{path}: unreadable or truncated safetensors file ({e})") from None
        n = info["num_examples"]
        codes = t.get("codes")
        if codes is None or codes.dtype not in (torch.int16, torch.int32, torch.int64) \
                or tuple(codes.shape) != (n, *self.grid):
            raise DataError(f"{path}: 'codes' must be an integer tensor [{n}, {self.grid[0]}, {self.grid[1]}], "
                            f"got {None if codes is None else (codes.dtype, tuple(codes.shape))}")
        if n and (int(codes.min()) < 0 or int(codes.max()) >= self.codebook_size):
            raise DataError(f"{path}: codes outside the codebook [0, {self.codebook_size}) "
                            f"(min {int(codes.min())}, max {int(codes.max())})")
        if self.cond_kind == "class":
            cond = t.get("cond")
            if cond is None or cond.shape != (n,) or cond.is_floating_point():
                raise DataError(f"{path}: 'cond' must be integer class ids [{n}]")
        else:
            p, lens = t.get("prompt"), t.get("prompt_len")
            if p is None or lens is None or p.dim() != 2 or p.shape[0] != n or lens.shape != (n,):
                raise DataError(f"{path}: 'prompt' [n, T] and 'prompt_len' [n] are required for prompt data")
            if int(lens.min()) < 1 or int(lens.max()) > p.shape[1]:
                raise DataError(f"{path}: prompt_len outside [1, {p.shape[1]}]")
        self._cache = {k: t}  # keep one shard in memory
        return t

    def get(self, indices: torch.Tensor) -> Batch:
        """Examples at global ``indices`` (any order)."""
        codes, conds, masks = [], [], []
        for idx in indices.tolist():
            k = next(i for i in range(len(self.sizes)) if idx < self.offsets[i + 1])
            t = self._shard(k)
            r = idx - self.offsets[k]
            codes.append(t["codes"][r].long())
            if self.cond_kind == "class":
                conds.append(t["cond"][r].long())
            else:
                p = t["prompt"][r].long()
                L = int(t["prompt_len"][r])
                conds.append(p)
                masks.append(torch.arange(p.shape[0]) >= p.shape[0] - L)
        return Batch(torch.stack(codes), torch.stack(conds), torch.stack(masks) if masks else None)

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
                yield step, order[pos * batch_size:(pos + 1) * batch_size]
                pos += 1
                step += 1
