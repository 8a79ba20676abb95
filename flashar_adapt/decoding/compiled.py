"""Compiled decoding: ``sampled_step`` (a step's logits, guidance and draw) under
``torch.compile``, one copy per bucket size, the recompile room its graphs need, the lines
that say when compiling starts and ends, the compile cache, and when compiling pays.

Compiling takes minutes on a CPU, with nothing else to see: ``CompileWatch`` writes one line
when a decoding run is about to compile graphs its model has not run yet (what, how many)
and one when they are compiled (how many, the seconds). They go to the logger
``flashar_adapt.compile`` at INFO, which writes them to stderr by default;
``logging.getLogger("flashar_adapt.compile").setLevel(logging.WARNING)`` silences them, and
replacing its handlers sends them elsewhere.

The compile cache: while a decoding run compiles, inductor keeps its generated code and
built libraries in a folder this tool owns, ``$FLASHAR_COMPILE_CACHE`` if set, else
``$XDG_CACHE_HOME/flashar-adapt/inductor`` (``~/.cache/...``), marked as ours when we create
it. A compile killed while a library is being built (Ctrl-C, a timeout) can leave it
truncated, and inductor would load it again and fail on every later run (or, for the library
that probes the CPU's vector instructions, silently take them for missing and emit code
that does not build). So the first compiled run of a process removes the libraries of our
folder that are not libraries (no ELF header: empty or cut short) and that no live build
holds the lock of, and ``run_step`` removes a library of our folder that fails to load and
compiles it again, or, if it keeps failing, decodes that step size eagerly (one line says
which).
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
import types
import weakref
from contextlib import contextmanager
from pathlib import Path

import torch
from filelock import FileLock, Timeout  # torch's own dependency; inductor locks its builds with it

from ..errors import error_chain
from ..files import OWNER_FILE, is_within, marker_kind, owner_record
from .decoder import sampled_step

CACHE_ENV = "FLASHAR_COMPILE_CACHE"  # the compile cache folder; see compile_cache_dir
CACHE_KIND = "flashar-adapt compile cache"  # the kind our cache folder's marker names

_COMPILED: dict = {}


class _Stderr(logging.Handler):
    """Writes to the current ``sys.stderr`` (not the one at import: tests and notebooks swap it)."""

    def emit(self, record):
        print(self.format(record), file=sys.stderr, flush=True)


log = logging.getLogger("flashar_adapt.compile")
log.setLevel(logging.INFO)
log.addHandler(_Stderr())
log.propagate = False  # one line on stderr, not a second one through the root logger's handlers

# per model (weakly held): the graphs (device type, bucket, batch rows, cache length) it has run
_SEEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _graphs_made() -> int:
    """Graphs dynamo has compiled in this process (its own counter; none before it is imported)."""
    utils = sys.modules.get("torch._dynamo.utils")  # not imported here: eager decoding never pays for dynamo
    return 0 if utils is None else utils.counters["stats"].get("unique_graphs", 0)


class CompileWatch:
    """The start and end lines of a decoding run that compiles. ``keys``: the graphs the run
    needs; those its model has not run yet are announced before the first step, and the end
    line (``finish``) gives the graphs dynamo made and the time since the start."""

    def __init__(self, model, what: str, keys: set):
        seen = _SEEN.setdefault(model, set())
        self.model, self.new = model, keys - seen
        self.t0 = self.made0 = None
        if self.new:
            self.made0 = _graphs_made()
            log.info(
                "flashar-adapt: compiling %s: %d new graph(s), once per process (a CPU takes minutes)...",
                what,
                len(self.new),
            )
            self.t0 = time.perf_counter()

    def finish(self) -> None:
        if self.t0 is None:
            return
        n = _graphs_made() - self.made0
        log.info(
            "flashar-adapt: compiled %d graph(s) in %.1f s (later calls reuse them)", n, time.perf_counter() - self.t0
        )
        _SEEN[self.model] |= self.new
        self.t0 = None


def compiled_step(device_type: str, size: int):
    """``sampled_step`` under torch.compile for one device type and bucket size: static
    shapes, CUDA graphs on CUDA ("reduce-overhead"). Each bucket gets its own copy of the
    function's code: dynamo keeps a code object's graphs in one list and checks their guards
    (hundreds: every module and parameter the step touches) in turn on every call, so with
    one list a late bucket would pay for the guards of all the earlier ones. A size whose
    compiled step kept failing to load (``run_step``) gets the eager function."""
    key = (device_type, size)
    if key in _EAGER:
        return sampled_step
    fn = _COMPILED.get(key)
    if fn is None:
        code = sampled_step.__code__.replace(co_name=f"sampled_step_{size}")
        copy = types.FunctionType(code, sampled_step.__globals__, code.co_name, sampled_step.__defaults__)
        mode = "reduce-overhead" if device_type == "cuda" else None
        fn = _COMPILED[key] = torch.compile(copy, dynamic=False, mode=mode)
    return fn


_SCALES: dict = {}


def step_scales(sampling, n: int, device) -> list[torch.Tensor]:
    """The guidance scale of each of ``n`` steps as a 0-d tensor on ``device`` (a compiled
    step would specialise on a float), made once per set of values and device: a raster
    run has hundreds of steps, and a tensor per step per call costs more than a step."""
    values = tuple(sampling.scale_at(t, n) for t in range(n))
    key = (values, str(device))
    if key not in _SCALES:
        if len(_SCALES) > 32:
            _SCALES.clear()
        _SCALES[key] = list(torch.tensor(values, device=device).unbind())
    return _SCALES[key]


# compile="auto" on a CPU: compile only where it pays. benchmarks/results/compile_speed_cpu.md
# (2 threads, CFG 2, so rows = 2 * batch) measured compiled / eager of two-way decoding at
# 1.39x (Fashion-MNIST L4 d128) and 1.12x (L8 d256) at batch 1 (2 rows), 0.84x and 0.86x at
# batch 64 (128 rows); raster 1.90x, 1.20x, then 0.96x, 0.89x. Interpolated in log2(rows),
# two-way stops paying at about 38 and 14 rows: compile up to 8 rows, the power of two below
# the smaller crossing. Rerun the benchmark with --batches 1,4,16,64 to refine it.
AUTO_CPU_MAX_ROWS = 8


def use_compile(compile, device, rows: int, able: bool = True):
    """What ``compile`` means for a decoding run of ``rows`` sequences (images, twice with
    CFG) on ``device``, ``able`` whether its runner can run the compiled step: ``"auto"``
    becomes a bool (compiled on CUDA, on a CPU up to ``AUTO_CPU_MAX_ROWS`` rows, where
    compiled steps were measured faster than eager ones; never where the runner cannot);
    any other value is returned as it is (checked by the caller)."""
    if not (isinstance(compile, str) and compile == "auto"):
        return compile
    kind = torch.device(device).type
    return able and (kind == "cuda" or (kind == "cpu" and rows <= AUTO_CPU_MAX_ROWS))


@contextmanager
def recompile_room(compile: bool):
    """Room for the bucketed graphs: dynamo counts graphs per function, across every model
    and grid a process decodes, and falls back to eager past its limit (8 by default). And
    inductor's cache in our folder (``compile_cache_dir``) for the time being: the caller's
    own ``TORCHINDUCTOR_CACHE_DIR`` is restored afterwards."""
    if not compile:
        yield
        return
    import torch._dynamo  # not at module level: importing dynamo costs a second, eager decoding never needs it

    limit = max(torch._dynamo.config.recompile_limit, 256)
    with (
        torch._dynamo.config.patch(
            recompile_limit=limit,
            accumulated_recompile_limit=max(torch._dynamo.config.accumulated_recompile_limit, 4 * limit),
        ),
        _inductor_cache(ensure_cache_dir()),
    ):
        yield


# ---------------------------------------------------------------- the compile cache


def compile_cache_dir() -> Path:
    """Where compiled decoding keeps inductor's cache: ``$FLASHAR_COMPILE_CACHE``, else
    ``$XDG_CACHE_HOME/flashar-adapt/inductor``, else ``~/.cache/flashar-adapt/inductor``."""
    given = os.environ.get(CACHE_ENV)
    if given:
        return Path(given).expanduser().absolute()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser().absolute() / "flashar-adapt" / "inductor"


def ensure_cache_dir() -> Path:
    """The cache folder, created if missing. Once per process and folder: an empty folder
    gets our marker, which is what allows us to remove a broken library from it, and the
    libraries an interrupted build left broken are removed (``remove_broken_libraries``)."""
    d = compile_cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    if d not in _SWEPT:  # once per process and folder: listing a cache of hundreds of entries takes a while
        if not any(d.iterdir()):
            (d / OWNER_FILE).write_text(json.dumps(owner_record(CACHE_KIND)))
        _SWEPT.add(d)
        removed = remove_broken_libraries(d)
        if removed:
            log.warning(
                "flashar-adapt: removed %d broken file(s) an interrupted compile left in %s: %s",
                len(removed),
                d,
                ", ".join(p.name for p in removed),
            )
    return d


_SWEPT: set = set()


def remove_broken_libraries(folder) -> list[Path]:
    """Remove the ``.so`` files under ``folder`` (ours: it must hold our marker) that do
    not start with an ELF header (what a build killed while writing leaves) and whose build
    no live process holds inductor's lock of (``locks/<key>.lock``, key: the name up to its
    first dot); returns them."""
    folder = Path(folder)
    if not owns_cache(folder):
        return []
    removed = []
    for p in sorted(folder.glob("*/*.so")):
        try:
            with p.open("rb") as f:
                if p.is_symlink() or f.read(4) == b"\x7fELF":
                    continue
        except OSError:
            continue
        try:
            with FileLock(str(folder / "locks" / f"{p.name.split('.')[0]}.lock"), timeout=0):
                p.unlink(missing_ok=True)
                removed.append(p)
        except Timeout:  # being built right now
            continue
    return removed


def owns_cache(folder) -> bool:
    """``folder`` holds our compile cache marker (a real file, not a link)."""
    return marker_kind(Path(folder) / OWNER_FILE) == CACHE_KIND


@contextmanager
def _inductor_cache(folder: Path):
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)  # inductor reads it at every lookup
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = old


_LIBRARY = re.compile(r"(/[^\s'\":]+\.so)\b")
_EAGER: set = set()  # (device type, bucket size) whose compiled step failed twice: eager from then on


def broken_libraries(error: BaseException, folder) -> list[Path]:
    """The built libraries (``.so``) under ``folder`` that ``error`` (or an error it was
    raised from) names: what inductor failed to load."""
    found = []
    for e in error_chain(error):
        for m in _LIBRARY.findall(str(e)):
            p = Path(m)
            if p not in found and p.is_file() and is_within(p, folder):
                found.append(p)
    return found


def run_step(key: tuple, fn, eager, *args):
    """``fn(*args)`` (a compiled step), surviving libraries a killed compile left broken in
    our cache: remove each one inductor fails to load and compile again; if it still fails
    after a few rounds, ``eager(*args)`` now and for every later call of ``key``
    (``compiled_step`` then returns the eager function)."""
    for _ in range(_ROUNDS):
        try:
            return fn(*args)
        except Exception as e:
            folder = compile_cache_dir()
            broken = broken_libraries(e, folder) if owns_cache(folder) else []
            if not broken:
                raise
            error = e
        for p in broken:
            p.unlink(missing_ok=True)
            log.warning("flashar-adapt: removed %s from the compile cache (an interrupted compile left it broken)", p)
    _EAGER.add(key)
    log.warning("flashar-adapt: the compiled step still fails to load (%s); this step size decodes eagerly", error)
    return eager(*args)


_ROUNDS = 3  # a graph builds one or two libraries (its kernels, and its wrapper): each may be broken
