"""What one compiled decoding step runs: ops per step of two-way and raster decoding, from
torch.profiler, grouped by kind (inductor's fused kernels, matrix products, attention,
everything else), compiled and eager.

    python benchmarks/profile_steps.py            # the Fashion-MNIST default model, batch 1, CFG 2
    python benchmarks/profile_steps.py --batch 8

Counts (how many kernels a step launches is what a CUDA graph or a CPU's per-op overhead
multiplies) and self CPU time per step by kind (under the profiler, so inflated by its
overhead; the shares are what to read). Prints two tables (markdown).
"""

from __future__ import annotations

import argparse
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from flashar_adapt.fmnist.evaluate import load_flashar

MODES = ("raster", "two_way")


def kind(name: str) -> str:
    """The group an op's profiler name falls in."""
    n = name.lower()
    if "cpp_fused" in n or "triton_" in n:
        return "fused (inductor)"
    if any(k in n for k in ("addmm", "aten::mm", "bmm", "matmul", "linear", "mkl", "onednn")):
        return "matrix products"
    if "attention" in n or "sdpa" in n or "flash" in n:
        return "attention"
    if any(k in n for k in ("sort", "topk", "searchsorted", "cumsum", "multinomial", "rand")):
        return "sampling"
    if any(k in n for k in ("index", "gather", "scatter", "copy", "cat", "slice", "select", "view", "reshape")):
        return "indexing / copies"
    return "other"


def ops_per_step(model, cond, mode: str, compiled: bool, cfg: float) -> tuple[Counter, Counter, Counter]:
    kw = dict(mode=mode, compile=compiled, cfg_scale=cfg, top_k=0, temperature=1.0)
    g = torch.Generator().manual_seed(0)
    model.generate(cond, generator=g, **kw)  # compiles (once per process), warms up
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cond.is_cuda else [])) as prof:
        model.generate(cond, generator=torch.Generator().manual_seed(0), **kw)
    H, W = model.flashar.ctx.recipe.image.grid
    steps = H + W - 1 if mode == "two_way" else H * W
    top, self_us, by_name = Counter(), Counter(), Counter()
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CPU:
            continue
        if e.cpu_parent is None:  # top-level ops only
            top[kind(e.name)] += 1
        # self time partitions the run: each event's time minus its children's (profiler overhead included)
        self_us[kind(e.name)] += e.self_cpu_time_total
        by_name[e.name[:60]] += e.self_cpu_time_total
    per_step = lambda c, scale=1: Counter({k: v / steps / scale for k, v in c.items()})  # noqa: E731
    return per_step(top), per_step(self_us, 1000), per_step(by_name, 1000)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--cfg", type=float, default=2.0)
    a = p.parse_args(argv)
    model = load_flashar()
    cond = torch.arange(a.batch) % model.flashar.ctx.recipe.condition.num_classes
    both = {(m, c): ops_per_step(model, cond, m, c, a.cfg) for m in MODES for c in (False, True)}
    for title, i, fmt in (("top-level ops per step", 0, "{:.1f}"), ("self CPU time per step, ms", 1, "{:.2f}")):
        rows = {key: r[i] for key, r in both.items()}
        kinds = sorted({k for r in rows.values() for k in r})
        print(f"\n{title} (batch {a.batch}, CFG {a.cfg})\n")
        print("| mode | path | " + " | ".join(kinds) + " | all |")
        print("|---|---|" + "---|" * (len(kinds) + 1))
        for (m, c), r in rows.items():
            cells = " | ".join(fmt.format(r.get(k, 0)) for k in kinds)
            print(f"| {m} | {'compiled' if c else 'eager'} | {cells} | {fmt.format(sum(r.values()))} |")
    for m in MODES:
        print(f"\n{m}, compiled: the ops taking most self CPU time per step (ms)\n")
        print("| op | ms per step |\n|---|---|")
        for name, ms in both[(m, True)][2].most_common(12):
            print(f"| `{name}` | {ms:.3f} |")


if __name__ == "__main__":
    main()
