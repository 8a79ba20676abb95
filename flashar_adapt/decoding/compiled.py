"""Compiled decoding: ``step_logits`` under ``torch.compile``, one copy per bucket size, and the
recompile room its graphs need."""

from __future__ import annotations

import types
from contextlib import contextmanager

import torch

from .decoder import step_logits

_COMPILED: dict = {}


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
