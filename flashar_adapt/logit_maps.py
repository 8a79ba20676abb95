"""The map a model applies after its head (a logit scale, then a tanh soft-cap), read off the
model itself: what ``inspect`` drafts as ``logits:`` and what ``check`` names when a recipe
misses it.

A single probe cannot tell these apart: with logits of a few units ``30 * tanh(x / 30)`` is
almost linear, so a cap of 30 fits as 29.9963 or as a scale of 0.99999. So the same short
forward runs at several magnitudes: a forward hook multiplies the decoder's output by a power
of two (exact in floating point) and the head is applied to it here, giving (head output,
model logits) pairs from well inside the linear range to full saturation, where
``c * tanh(x / c)`` is exactly ``c`` in float32. The cap is that saturated value, the scale the
median ratio over the unsaturated points, and the form (none, scale, soft-cap, both) must fit
every probe. A value the model declares in its config that agrees with the fit within the
bound replaces it: the model's own number, not a fitted neighbour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .heads import finish_logits

# target largest |logit| of the probes: 1/4 .. 2^20 (a cap saturates once x > 9 c in float32)
_TARGETS = tuple(2.0**j for j in range(-2, 21, 2))
_ULPS = 16  # a map applied in floating point: a few roundings of the largest logit; 16 leaves room


@dataclass
class LogitMap:
    """``logits = finish_logits(head output, scale, softcap)``, and where each number came from."""

    scale: float = 1.0
    softcap: float | None = None
    sources: dict[str, str] = field(default_factory=dict)  # "logits.scale" / "logits.softcap" -> origin
    residual: float = 0.0  # largest |map(x) - logits| / max |logits| over the probes
    probes: int = 0

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def items(self) -> dict[str, float]:
        """The recipe keys this map sets: {"logits.scale": s, "logits.softcap": c} without identities."""
        out = {}
        if self.scale != 1.0:
            out["logits.scale"] = self.scale
        if self.softcap is not None:
            out["logits.softcap"] = self.softcap
        return out


def _output_hidden(out):
    return out[0] if isinstance(out, (tuple, list)) else getattr(out, "last_hidden_state", out)


def _scaled_output(out, alpha: float):
    """The decoder's output with its hidden states times ``alpha`` (a tuple, a model output or a tensor)."""
    if isinstance(out, (tuple, list)):
        return type(out)((out[0] * alpha, *out[1:]))
    if hasattr(out, "last_hidden_state"):
        out.last_hidden_state = out.last_hidden_state * alpha
        return out
    return out * alpha


def probe_pair(model: nn.Module, decoder: nn.Module, head: nn.Module, ids: torch.Tensor, alpha: float = 1.0):
    """(head output, the model's logits) of ``model(input_ids=ids)`` with the decoder's output
    times ``alpha``, float64 and flattened, masked logits (non-finite, the dtype's lowest) left
    out; None when the logits are not shaped like the head's output or overflow."""
    seen = {}

    def hook(mod, args, out):
        out = _scaled_output(out, alpha) if alpha != 1.0 else out
        seen["h"] = _output_hidden(out)
        return out

    handle = decoder.register_forward_hook(hook)
    try:
        with torch.no_grad():
            res = model(input_ids=ids, use_cache=False)
            y = res[0] if isinstance(res, (tuple, list)) else getattr(res, "logits", None)
            x = head(seen["h"]) if "h" in seen else None
    finally:
        handle.remove()
    if x is None or y is None or x.shape != y.shape or not bool(torch.isfinite(x).all()):
        return None
    keep = torch.isfinite(y) & (y > torch.finfo(y.dtype).min)  # masked logits say nothing
    return x.double()[keep].flatten(), y.double()[keep].flatten()


def probe_pairs(model: nn.Module, decoder: nn.Module, head: nn.Module, ids: torch.Tensor, first=None) -> list:
    """``probe_pair`` at powers of two that bring the largest head output to 1/4 .. 2^20 (from
    the linear range to saturation); ``first``: the pair at 1 if already run."""
    first = first or probe_pair(model, decoder, head, ids)
    if first is None:
        return []
    pairs = [first]
    m = float(first[0].abs().max())
    for target in _TARGETS if m > 0 else ():
        alpha = 2.0 ** round(math.log2(target / m))
        if alpha != 1.0:
            pair = probe_pair(model, decoder, head, ids, alpha)
            if pair is None:
                break  # past the dtype's range: the probes so far are what there is
            pairs.append(pair)
    return pairs


def _tol(dtype: torch.dtype) -> float:
    return _ULPS * torch.finfo(dtype).eps


def _fit(pairs: list, tol: float) -> tuple[float, float | None] | None:
    """(scale, cap or None) from the pairs: the cap is where max |y| stops growing while x
    grows on; the scale the median of y / x (through atanh under a cap) over unsaturated points."""
    by_size = sorted(pairs, key=lambda p: float(p[0].abs().max()))
    top = [float(y.abs().max()) for _, y in by_size]
    cap = None
    if len(top) >= 2 and abs(top[-1] - top[-2]) <= tol * top[-1] and top[-1] < 0.5 * float(by_size[-1][0].abs().max()):
        cap = top[-1]
    ratios = []
    for x, y in by_size:
        keep = x.abs() > 1e-3 * x.abs().max()
        if cap is not None:
            keep &= y.abs() < 0.5 * cap
        if keep.any():
            lin = y[keep] if cap is None else cap * torch.atanh(y[keep] / cap)
            ratios.append(lin / x[keep])
    if not ratios:
        return None
    scale = float(torch.cat(ratios).median())
    return (1.0 if abs(scale - 1.0) <= tol else scale), cap


def _residual(pairs: list, scale: float, cap: float | None) -> float:
    return max(float((finish_logits(x, scale, cap) - y).abs().max() / y.abs().max().clamp(min=1e-30)) for x, y in pairs)


def declared_floats(model: nn.Module) -> dict[str, float]:
    """Every finite non-zero float in the model's config (and its text config): the values a
    fitted constant may be the model's own."""
    cfg = getattr(model, "config", None)
    if cfg is None or not hasattr(cfg, "to_dict"):
        return {}
    configs = [("", cfg)]
    text = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else None
    if text is not None and text is not cfg:
        configs.append(("text_config.", text))
    out = {}
    for prefix, c in configs:
        for k, v in c.to_dict().items():
            if isinstance(v, float) and math.isfinite(v) and v != 0.0:
                out[prefix + k] = v
    return out


def _declared(value: float, floats: dict[str, float], tol: float, inverse: bool) -> tuple[float, str] | None:
    """The config value (or, for a scale, the inverse of one) nearest ``value`` within ``tol`` relative."""
    best = None
    for k, v in floats.items():
        for cand, name in ((v, k), (1.0 / v, f"1 / {k}")) if inverse else ((v, k),):
            rel = abs(cand - value) / abs(value)
            if rel <= tol and (best is None or rel < best[0]):
                best = (rel, cand, name)
    return None if best is None else (best[1], best[2])


def find_logit_map(model: nn.Module, decoder: nn.Module, head: nn.Module, ids: torch.Tensor) -> LogitMap | None:
    """The map between ``head(decoder output)`` and ``model(input_ids=ids)``'s logits that fits
    every probe, with the model's declared values preferred; None when there is no probe
    (the model does not run on input ids, or its logits are not the head's output) or when no
    scale / soft-cap fits. ``LogitMap().identity`` when the logits are the head's output."""
    dtype = next((p.dtype for p in head.parameters()), torch.float32)
    tol = max(_tol(dtype), _tol(torch.float32))
    was = [m.training for m in model.modules()]
    model.eval()
    try:
        first = probe_pair(model, decoder, head, ids)
        if first is not None and _residual([first], 1.0, None) <= tol:
            return LogitMap(probes=1)  # the logits are the head's output: no more probes needed
        pairs = probe_pairs(model, decoder, head, ids, first)
    finally:
        for m, t in zip(model.modules(), was):
            m.training = t
    if not pairs:
        return None
    fitted = _fit(pairs, tol)
    if fitted is None:
        return None
    scale, cap = fitted
    floats, declared = declared_floats(model), {}
    for key, inverse in (("logits.scale", True), ("logits.softcap", False)):
        value = scale if key == "logits.scale" else cap
        if value is None or value == 1.0:
            continue
        found = _declared(value, floats, tol, inverse)
        value = found[0] if found is not None else shortest(value, tol)
        scale, cap = (value, cap) if key == "logits.scale" else (scale, value)
        if found is not None:
            declared[key] = found[1]
    residual = _residual(pairs, scale, cap)
    if residual > tol:
        return None
    how = (
        f"probe forwards at {len(pairs)} magnitudes (|logits| up to {max(float(y.abs().max()) for _, y in pairs):.3g})"
    )
    found = LogitMap(scale, cap, {}, residual, len(pairs))
    for key in found.items():
        found.sources[key] = (
            f"= the config's {declared[key]}; {how} agree within {residual:.1e}"
            if key in declared
            else f"fitted on {how}, residual {residual:.1e}; the config declares no such value"
        )
    return found


def shortest(value: float, tol: float) -> float:
    """The shortest decimal within ``tol`` (relative) of ``value``: 30.0 for 29.9999995."""
    for digits in range(1, 18):
        d = float(f"{value:.{digits}g}")
        if abs(d - value) <= tol * abs(value):
            return d
    return value
