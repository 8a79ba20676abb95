"""Compiled decoding: ``step_logits`` under ``torch.compile``, one copy per bucket size, the
recompile room its graphs need, and the lines that say when compiling starts and ends.

Compiling takes minutes on a CPU, with nothing else to see: ``CompileWatch`` writes one line
when a decoding run is about to compile graphs its model has not run yet (what, how many)
and one when they are compiled (how many, the seconds). They go to the logger
``flashar_adapt.compile`` at INFO, which writes them to stderr by default;
``logging.getLogger("flashar_adapt.compile").setLevel(logging.WARNING)`` silences them, and
replacing its handlers sends them elsewhere.
"""

from __future__ import annotations

import logging
import sys
import time
import types
import weakref
from contextlib import contextmanager

import torch

from .decoder import step_logits

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
    """``step_logits`` under torch.compile for one device type and bucket size: static
    shapes, CUDA graphs on CUDA ("reduce-overhead"). Each bucket gets its own copy of the
    function's code: dynamo keeps a code object's graphs in one list and checks their guards
    (hundreds: every module and parameter the step touches) in turn on every call, so with
    one list a late bucket would pay for the guards of all the earlier ones."""
    key = (device_type, size)
    fn = _COMPILED.get(key)
    if fn is None:
        code = step_logits.__code__.replace(co_name=f"step_logits_{size}")
        copy = types.FunctionType(code, step_logits.__globals__, code.co_name, step_logits.__defaults__)
        mode = "reduce-overhead" if device_type == "cuda" else None
        fn = _COMPILED[key] = torch.compile(copy, dynamic=False, mode=mode)
    return fn


@contextmanager
def recompile_room(compile: bool):
    """Room for the bucketed graphs: dynamo counts graphs per function, across every model
    and grid a process decodes, and falls back to eager past its limit (8 by default)."""
    if not compile:
        yield
        return
    import torch._dynamo  # not at module level: importing dynamo costs a second, eager decoding never needs it

    limit = max(torch._dynamo.config.recompile_limit, 256)
    with torch._dynamo.config.patch(
        recompile_limit=limit,
        accumulated_recompile_limit=max(torch._dynamo.config.accumulated_recompile_limit, 4 * limit),
    ):
        yield
