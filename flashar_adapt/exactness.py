"""Is incremental decoding exactly teacher forcing? Every step's logits against one pass.

FlashAR's promise is that decoding with caches, one anti-diagonal (or, raster, one token)
at a time, computes exactly the logits of one teacher-forced forward over the whole image.
``steps_match_teacher`` drives ``prefill`` / ``step`` with known codes forced at every step
and compares each step's logits with ``logits`` (one pass, the same codes) at the same cells,
under the float32 reordering bound of ``numerics`` with the sizes read from the model. Values,
not argmaxes: on small random models an error of 1e-2 rarely flips an argmax.

Split in two so a test can alter what was collected: ``forced_steps`` (run the decoder) and
``compare_steps`` (pure).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .context import context
from .decoding import eval_behaviour, logits, prefill, step, teacher_forward
from .grid import Layout
from .numerics import reorder_tol, sum_width
from .sampling import Sampling


@dataclass
class ForcedSteps:
    """What ``forced_steps`` collected: per step the cells it predicted [n] and its guided
    logits [B, n, K]; the layout of the run (its ``fed_len`` bounds the keys a query reads)."""

    cells: list
    logits: list
    layout: Layout


@dataclass
class StepComparison:
    """Per-step max |step logits - teacher-forced logits| of one decoding run, and the bound."""

    mode: str
    errors: list[float]
    bound: float
    scale: float  # max |teacher-forced logits| (guided: of the guided ones)
    run: ForcedSteps | None = field(default=None, repr=False)  # what was compared

    @property
    def worst_step(self) -> int:
        """The step furthest from the pass (a NaN counts as furthest)."""
        return max(range(len(self.errors)), key=lambda t: (self.errors[t] != self.errors[t], self.errors[t]), default=0)

    @property
    def worst(self) -> float:
        return self.errors[self.worst_step] if self.errors else 0.0

    @property
    def ok(self) -> bool:
        return all(e <= self.bound for e in self.errors)

    def describe(self) -> str:
        n = len(self.errors)
        name, each = ("two-way", "an anti-diagonal") if self.mode == "two_way" else ("raster", "a token")
        if self.ok:
            return (
                f"every {name} step's logits ({n} steps, {each} each) equal one teacher-forced pass "
                f"(max diff {self.worst:.2e}, float bound {self.bound:.2e})"
            )
        return (
            f"{name} step {self.worst_step} of {n} predicts logits {self.worst:.3g} away from one teacher-forced "
            f"pass (float bound {self.bound:.3g}): decoding with caches is not the model's forward"
        )


def forced_steps(
    model,
    cond,
    codes,
    mode: str = "two_way",
    cond_mask=None,
    cfg_scale: float = 1.0,
    negative=None,
    negative_mask=None,
    preview=None,
) -> ForcedSteps:
    """Run ``prefill`` / ``step`` with ``codes`` [B, H, W] forced at every step, keeping each
    step's logits (what the model predicted before the forced codes were fed); ``preview``: the
    preview grid's codes, for a recipe that has one."""
    codes = torch.as_tensor(codes)
    grid = tuple(int(g) for g in codes.shape[1:])
    state = prefill(
        model,
        cond,
        mode=mode,
        grid=grid,
        cond_mask=cond_mask,
        cfg_scale=cfg_scale,
        negative=negative,
        negative_mask=negative_mask,
        preview=preview,
    )
    flat = codes.flatten(1).to(state.codes.device)
    run = ForcedSteps([], [], state.layout)
    while not state.done:
        cells = state.cells()
        step(state, flat[:, cells])
        run.cells.append(cells)
        run.logits.append(state.logits)
    return run


def compare_steps(run: ForcedSteps, ref: torch.Tensor, bound: float, mode: str) -> StepComparison:
    """Each step's logits against ``ref`` [B, H, W, K] at its cells."""
    flat = ref.flatten(1, 2).double()
    errors = [
        float((lg.double() - flat[:, cells.to(flat.device)]).abs().max()) for cells, lg in zip(run.cells, run.logits)
    ]
    return StepComparison(mode, errors, bound, float(flat.abs().max()), run)


def step_tol(model, mode: str, fed_len: int) -> float:
    """The relative bound between a step's logits and the teacher-forced pass: the sums
    stacked between an input and a logit (the decoder layers, then in two-way the branch
    layers and the gate, then the head) of at most ``sum_width`` terms each, in the model's dtype."""
    ctx = context(model)
    layers, width = len(ctx.layers) + 1, sum_width(ctx.layers, fed_len)
    if mode == "two_way":
        layers += ctx.recipe.flashar.branch_depth + 1
        width = max(width, *(m.in_features for m in ctx.flashar.gate.modules() if isinstance(m, nn.Linear)))
    return reorder_tol(layers, width, next(ctx.layers.parameters()).dtype)


def steps_match_teacher(
    model,
    cond,
    codes,
    mode: str = "two_way",
    cond_mask=None,
    cfg_scale: float = 1.0,
    negative=None,
    negative_mask=None,
    preview=None,
) -> StepComparison:
    """Force ``codes`` through every decoding step and compare each step's logits with one
    teacher-forced pass. With guidance the logits are u + s (c - u): each term's error is
    bounded relative to its own pass, so the bound is s times the conditional one plus
    |1 - s| times the unconditional one (the largest s of the schedule). ``negative``: the
    unconditional branch's prompt, as in ``generate``; ``preview``: the preview grid's codes
    (recipes with one), the same for both."""
    neg = dict(negative=negative, negative_mask=negative_mask)
    ref = logits(model, cond, codes, mode=mode, cond_mask=cond_mask, cfg_scale=cfg_scale, preview=preview, **neg)
    run = forced_steps(model, cond, codes, mode, cond_mask, cfg_scale, preview=preview, **neg)
    tol = step_tol(model, mode, run.layout.fed_len)
    s = Sampling(cfg_scale=cfg_scale)
    if not s.guided:
        return compare_steps(run, ref, tol * float(ref.abs().max()), mode)
    cond_ref = logits(model, cond, codes, mode=mode, cond_mask=cond_mask, preview=preview)
    with torch.no_grad(), eval_behaviour(model):
        uncond_ref = teacher_forward(
            model, cond, codes, mode=mode, cond_mask=cond_mask, uncond=True, preview=preview, **neg
        ).fused
    n = len(run.cells)
    scales = [s.scale_at(t, n) for t in range(n)]
    weight_c, weight_u = max(abs(x) for x in scales), max(abs(1 - x) for x in scales)
    bound = tol * (weight_c * float(cond_ref.abs().max()) + weight_u * float(uncond_ref.abs().max()))
    return compare_steps(run, ref, bound, mode)
