"""Files the toolkit reads and writes.

- ``inside``: a file name taken from a manifest or an export config resolves inside its
  folder (no absolute names, no ``..``, no symbolic link leading out), or it is refused.
- ``atomic_write_bytes`` / ``atomic_save_safetensors`` / ``atomic_write``: a temp file in the
  same folder, fsynced, renamed over the target; a failure leaves the previous file as it was.
- ``apply_umask``: files and folders end up with the modes the user's umask gives, like
  any other tool (``mkstemp``/``mkdtemp`` would leave 0600/0700).
- ``exclusive_lock``: an advisory lock on a folder, so two runs cannot share it.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from safetensors.torch import save_file


def inside(folder, name, error: type[Exception], what: str = "file") -> Path:
    """``folder / name``, refused with ``error`` unless it stays inside ``folder`` once
    symbolic links are resolved."""
    folder = Path(folder)
    if not isinstance(name, str) or not name or "\0" in name:
        raise error(f"{folder}: {what} name must be a non-empty string, got {_short(name)}")
    if os.path.isabs(name):
        raise error(f"{folder}: {what} {_short(name)} is an absolute path; names must be relative to the folder")
    path = folder / name
    root = folder.resolve()
    real = path.resolve()
    if real != root and root not in real.parents:
        raise error(f"{folder}: {what} {_short(name)} resolves to {real}, outside the folder; refused")
    return path


def escaping_links(folder) -> list[Path]:
    """Symbolic links under ``folder`` (recursively) whose target lies outside it."""
    root = Path(folder).resolve()
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            if p.is_symlink():
                real = p.resolve()
                if real != root and root not in real.parents:
                    out.append(p)
    return out


def _short(v, n: int = 80) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    return 0o666 & ~umask()


def apply_umask(path) -> None:
    """Give ``path`` (and, for a folder, everything under it) the modes a plain
    ``open``/``mkdir`` would have given under the user's umask."""
    mask = umask()
    path = Path(path)
    items = [path] + (list(path.rglob("*")) if path.is_dir() and not path.is_symlink() else [])
    for p in items:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _replace_atomically(path, write) -> None:
    """``write(tmp)`` a temp file beside ``path``, fsync it (a rename is only as durable as the
    data before it), give it the umask's mode, then rename it over ``path``; on any failure
    the temp file goes and ``path`` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write(path, write) -> None:
    """``write(tmp)`` writes the file at the path ``tmp`` (piece by piece, for a file too large
    to hold in memory); it then replaces ``path`` as ``atomic_write_bytes`` does."""
    _replace_atomically(path, write)


def atomic_write_bytes(path, data: bytes) -> None:
    _replace_atomically(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_save_safetensors(tensors: dict, path, metadata: dict | None = None) -> None:
    _replace_atomically(
        path, lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
    )


LOCK_NAME = ".flashar.lock"


@contextmanager
def exclusive_lock(folder, error: type[Exception], what: str = "run"):
    """Hold an exclusive advisory lock on ``folder`` for the ``with`` block; another holder
    makes this raise ``error`` at once (never waits). The kernel drops the lock when the
    holder dies, so a killed run never leaves a stale lock. No-op where ``fcntl`` is missing."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock (documented in docs/reliability.md)
        yield
        return
    path = Path(folder) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            raise error(
                f"{folder} is in use by another {what} (pid {holder}); wait for it to finish or use another out_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)
