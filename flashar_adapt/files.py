"""Files the toolkit reads and writes, and how it proves a file or folder is its own.

- ``inside``: a file name taken from a manifest or an export config resolves inside its
  folder (no absolute names, no ``..``, no symbolic link leading out), or it is refused.
- ``atomic_write_bytes`` / ``atomic_save_safetensors`` / ``atomic_write``: a temp file in the
  same folder, fsynced, renamed over the target; a failure leaves the previous file as it was.
  The temp file's name carries this host and pid, so ``remove_dead_temp_files`` can tell a
  dead writer's leftover from anything else.
- ``apply_umask``: files and folders end up with the modes the user's umask gives, like
  any other tool (``mkstemp``/``mkdtemp`` would leave 0600/0700).
- ``exclusive_lock``: an advisory lock on a folder, so two runs cannot share it;
  ``target_lock``: one beside a file or folder that is about to be replaced (an export).
- Ownership: ``owned_temp_dir`` makes a temp folder beside a target holding a marker
  (``OWNER_FILE``: kind, target, pid, host, creation time); ``remove_dead_temp_dirs`` removes
  only folders that hold such a marker, for that kind and target, whose process is dead on
  this host. The parent is listed and names are compared as strings: a user's name is never
  a pattern, and nothing without our marker is ever removed.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
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


def is_within(path, folder) -> bool:
    """``path`` is ``folder`` or lies under it, once both are resolved (symbolic links followed)."""
    real, root = Path(path).resolve(), Path(folder).resolve()
    return real == root or root in real.parents


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


# ---------------------------------------------------------------- who owns what

HOST = socket.gethostname()
# In file names: the host hashed (host names may hold dots and dashes), so a name parses back.
HOST_TAG = hashlib.sha256(HOST.encode()).hexdigest()[:8]
OWNER_FILE = ".flashar-owner.json"


def owner_record(kind: str, **extra) -> dict:
    """What a marker holds: which kind of work wrote it, and which process, where, when."""
    return {"kind": kind, "pid": os.getpid(), "host": HOST, "created": time.time(), **extra}


def _process_start(pid: int) -> float | None:
    """When process ``pid`` started (seconds since the epoch), where /proc tells; else None."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        boot = next(
            float(ln.split()[1]) for ln in Path("/proc/stat").read_text().splitlines() if ln.startswith("btime")
        )
        return boot + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def process_alive(pid, host: str | None = HOST, created: float | None = None) -> bool:
    """False only when it is certain that the process is gone: it ran on this host and no
    process has its pid, or the one that has it started after ``created`` (the pid was
    reused). A process on another host, or one we cannot see, counts as alive."""
    if host != HOST or not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return True  # another machine's process, or not a pid we wrote: never taken for dead
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, run by another user
        pass
    except (OverflowError, OSError):  # not a pid this system could have: not ours to judge
        return True
    started = _process_start(pid)
    # 2 s: /proc/stat's boot time is whole seconds; a pid is never reused that fast
    return not (started is not None and isinstance(created, (int, float)) and started > created + 2)


def owned_temp_dir(target, kind: str, tag: str = "tmp") -> Path:
    """A new folder ``.<target name>.<tag>-XXXX`` beside ``target``, holding our marker, so a
    later run can prove it is ours (and remove it once its process is dead)."""
    target = Path(target)
    d = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.{tag}-"))
    (d / OWNER_FILE).write_text(json.dumps(owner_record(kind, target=target.name)))
    return d


def disown(folder) -> None:
    """Take our marker out of ``folder``: it becomes a result (or is left to the user) and
    is never removed as a stale temp folder."""
    (Path(folder) / OWNER_FILE).unlink(missing_ok=True)


def marker_kind(path) -> str | None:
    """The ``kind`` a marker of ours at ``path`` names (``owner_record``), or None when there
    is none: missing, a link (a link proves nothing), unreadable or not a record."""
    path = Path(path)
    try:
        rec = None if path.is_symlink() else json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return rec.get("kind") if isinstance(rec, dict) else None


def dead_owner(folder, kind: str, target_name: str) -> bool:
    """``folder`` is a real folder (not a link) holding our marker for ``kind`` and
    ``target_name``, and the process that wrote it is dead."""
    folder = Path(folder)
    if folder.is_symlink() or not folder.is_dir():
        return False
    marker = folder / OWNER_FILE
    try:
        if marker.is_symlink():
            return False
        rec = json.loads(marker.read_bytes())
    except (OSError, ValueError):
        return False
    if not isinstance(rec, dict) or rec.get("kind") != kind or rec.get("target") != target_name:
        return False
    return not process_alive(rec.get("pid"), rec.get("host"), rec.get("created"))


def remove_dead_temp_dirs(target, kind: str) -> list[Path]:
    """Remove the temp folders that dead ``kind`` processes left beside ``target``
    (``owned_temp_dir``'s, any tag). Every other entry of the parent is left alone."""
    target = Path(target)
    parent = target.parent
    if not parent.is_dir():
        return []
    head = f".{target.name}."
    removed = []
    for name in sorted(os.listdir(parent)):
        if name.startswith(head) and "-" in name[len(head) :] and dead_owner(parent / name, kind, target.name):
            shutil.rmtree(parent / name, ignore_errors=True)
            removed.append(parent / name)
    return removed


# ---------------------------------------------------------------- atomic files


_MKSTEMP_CHARS = set("abcdefghijklmnopqrstuvwxyz0123456789_")  # what mkstemp appends to the prefix


def _temp_prefix(name: str) -> str:
    return f".{name}.tmp-{HOST_TAG}-{os.getpid()}-"


def remove_dead_temp_files(folder, name: str) -> list[Path]:
    """Remove the temp files that writers of ``folder/name`` (``atomic_write_bytes``) left
    when killed: names this module generated, for this host, whose pid is dead. Every other
    file is left alone (a name alone is not proof enough for anything else)."""
    folder = Path(folder)
    head = f".{name}.tmp-{HOST_TAG}-"
    removed = []
    for entry in sorted(os.listdir(folder)) if folder.is_dir() else []:
        if not entry.startswith(head):
            continue
        pid, sep, rand = entry[len(head) :].partition("-")
        if not (sep and pid.isdigit() and rand and set(rand) <= _MKSTEMP_CHARS):
            continue
        p = folder / entry
        if p.is_symlink() or not p.is_file() or process_alive(int(pid), HOST):
            continue
        p.unlink()
        removed.append(p)
    return removed


# Files up to this size (configs, model_args.json) are recorded by their hash; larger ones
# (weights) by their size and the hash of their first and last MiB (the header and the first
# and last tensors), so loading a multi-GB backbone is not slowed by hashing it whole.
HASHED_BYTES = 1 << 20


def file_record(f: Path) -> dict:
    """{"bytes": size, "sha256": digest} of a small file, {"bytes", "sha256_ends"} of a large one."""
    size = f.stat().st_size
    with f.open("rb") as fh:
        if size <= HASHED_BYTES:
            return {"bytes": size, "sha256": hashlib.sha256(fh.read()).hexdigest()}
        h = hashlib.sha256(fh.read(HASHED_BYTES))
        fh.seek(size - HASHED_BYTES)
        h.update(fh.read())
        return {"bytes": size, "sha256_ends": h.hexdigest()}


def write_failure(e: BaseException, path) -> OSError | None:
    """An ``OSError`` naming ``path`` for a write that failed for want of room or a device
    error (a full disk, ``ulimit -f``): the serialisers report it in their own types, or
    as an ``OSError`` without the file's name. None for anything else (a bug stays one)."""
    text = " ".join(str(e).split())
    if isinstance(e, OSError):
        return None if e.filename else OSError(e.errno, e.strerror or text, str(path))
    if type(e).__name__ == "SafetensorError" and "I/O error" in text:
        return OSError(errno.EIO, f"could not write it ({text[:200]})", str(path))
    if isinstance(e, RuntimeError) and any(k in text for k in ("inline_container", "PytorchStreamWriter")):
        return OSError(errno.EIO, f"could not write it (torch.save: {text[:200]})", str(path))
    return None


def _replace_atomically(path, write) -> None:
    """``write(tmp)`` a temp file beside ``path``, fsync it (a rename is only as durable as the
    data before it), give it the umask's mode, then rename it over ``path``; on any failure
    the temp file goes and ``path`` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=_temp_prefix(path.name))
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, file_mode())
        os.replace(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.unlink(tmp)
        failed = write_failure(e, path)
        if failed is not None:
            raise failed from e
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


# ---------------------------------------------------------------- locks

LOCK_NAME = ".flashar.lock"
_LOCK_SIGNATURE = b"flashar-adapt lock"


def _flock(fd: int) -> bool:
    import fcntl  # POSIX only; callers check

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _holder(fd: int) -> str:
    text = os.pread(fd, 200, 0).decode(errors="replace").strip()
    return text.removeprefix(_LOCK_SIGNATURE.decode()).strip() or "?"


def _has_fcntl() -> bool:
    try:
        import fcntl  # noqa: F401 - only asks whether the platform has it
    except ImportError:
        return False
    return True


@contextmanager
def exclusive_lock(folder, error: type[Exception], what: str = "run"):
    """Hold an exclusive advisory lock on ``folder`` for the ``with`` block; another holder
    makes this raise ``error`` at once (never waits). The kernel drops the lock when the
    holder dies, so a killed run never leaves a stale lock. No-op where ``fcntl`` is missing."""
    if not _has_fcntl():  # not POSIX: no lock (documented in docs/reliability.md)
        yield
        return
    path = Path(folder) / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, file_mode())
    try:
        if not _flock(fd):
            holder = _holder(fd)
            raise error(
                f"{folder} is in use by another {what} (pid {holder}); wait for it to finish or use another out_dir"
            )
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def lock_holder(folder) -> str | None:
    """The pid (as written) of the process holding ``exclusive_lock(folder)``, or None when
    nobody holds it. Creates nothing."""
    path = Path(folder) / LOCK_NAME
    if not _has_fcntl() or not path.is_file():
        return None
    fd = os.open(path, os.O_RDONLY)
    try:
        if _flock(fd):
            return None
        return os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
    finally:
        os.close(fd)


def target_lock_path(target) -> Path:
    target = Path(target)
    return target.parent / f".{target.name}.flashar-lock"


@contextmanager
def target_lock(target, error: type[Exception], what: str = "export"):
    """Hold an exclusive lock on replacing ``target`` (a file or folder that is about to be
    replaced by a rename, so the lock cannot live inside it): a lock file beside it, removed
    again on release. A second writer of the same target raises ``error`` at once, naming
    the holder. A file of that name that is not one of our locks is refused, never written."""
    if not _has_fcntl():  # not POSIX: no lock (documented in docs/reliability.md)
        yield
        return
    path = target_lock_path(target)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, file_mode())
        if not _flock(fd):
            holder = _holder(fd)
            os.close(fd)
            raise error(f"{target} is being written by another {what} ({holder}); wait for it to finish")
        try:  # the previous holder may have removed the file after we opened it: lock the one there now
            same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        old = os.pread(fd, 4096, 0)
        if old and not old.startswith(_LOCK_SIGNATURE):
            raise error(f"{path} exists and is not a flashar-adapt lock; move it away (it was left as it was)")
        os.ftruncate(fd, 0)
        os.pwrite(fd, _LOCK_SIGNATURE + f" pid {os.getpid()} host {HOST}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    try:
        yield
    finally:
        os.unlink(path)  # while still holding it: a waiter that opened it re-checks the inode
        os.close(fd)
