"""Which torch devices a model may be moved to: one this torch build and machine have, checked
before anything is loaded (``torch`` itself fails late, with an ``AssertionError`` for CUDA
on a CPU build or a meta tensor that breaks decoding far away)."""

from __future__ import annotations

import torch


def device_problem(device) -> str | None:
    """Why ``device`` (a name or a ``torch.device``) cannot hold a model here, or None."""
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        return f"{device!r} is not a torch device (cpu, cuda, cuda:1, mps)"
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            return f"{str(device)!r}: this torch build or machine has no CUDA device"
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            return f"{str(device)!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            return f"{str(device)!r}: MPS is not available on this machine"
    elif dev.type != "cpu":
        return f"{str(device)!r}: only cpu, cuda and mps devices are supported"
    return None
