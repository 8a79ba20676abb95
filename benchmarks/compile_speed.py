"""Eager against compiled decoding (``generate(compile=True)``), raster and two-way, in one run.

Two-way against raster with both compiled and both eager, the bound (what a bare backbone
forward allows) and the fraction of it each reaches, what ``compile="auto"`` picks, and
whether greedy and seeded sampled compiled codes equal the eager ones.

    python benchmarks/compile_speed.py          # CPU: the Fashion-MNIST default model and small 16x16, batches 1, 64
    python benchmarks/compile_speed.py --quick  # CPU: the Fashion-MNIST default model, batch 1
    python benchmarks/compile_speed.py --batches 1,4,16,64  # the points the compile="auto" rule needs
    python benchmarks/compile_speed.py --device cuda --dtype bf16 --preset gpu   # LlamaGen-B shape, CUDA graphs

Per model, grid and batch: the first compiled call of each mode is timed alone (its excess
over the steady time is the compile time), then the four decoders (raster and two-way,
eager and compiled) are timed interleaved, so that machine noise hits all four alike. Also
checks that greedy compiled codes equal the eager ones, and reports the CPU bound the speed
doc uses (forward growth: a bare backbone forward on an average anti-diagonal over one on a
single token). Writes benchmarks/results/compile_speed[_<tag>].{json,md,png}.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from tqdm import tqdm

import flashar_adapt as fa
from flashar_adapt.decoding import bucket, recompile_room, use_compile

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import decode_speed as ds  # noqa: E402  (the models and timing helpers of the main benchmark)

# "fmnist-default" is the shipped Fashion-MNIST FlashAR model itself (trained weights, L4 d128
# K256, 14x14); the others are random-weight models of decode_speed.py's shapes.
CPU_MODELS = {"fmnist-default": (4, 128, 4, 256, -2, (14,)), "small": ds.CPU_MODELS["small"][:5] + ((16,),)}
GPU_MODELS = ds.GPU_MODELS
MODES = ("raster", "two_way")


def load_model(name, spec, grid, device, dtype):
    if name == "fmnist-default":
        from flashar_adapt.fmnist.evaluate import load_flashar

        return load_flashar().to(device=device, dtype=dtype)
    return ds.build(*spec[:5], grid, device, dtype)


@torch.inference_mode()
def graph_bounds(model, a, device) -> dict:
    """Batch-1 measures of compiled graphs alone, in this run (each timed alone, re-run on a
    decoded state: a re-run rewrites the same cache entries).

    ``bound_compiled``: 1 / the growth of a compiled bare backbone forward (no branch, head
    or sampling) from one token to an average anti-diagonal's (decode_speed.forward_growth,
    compiled). ``graphs_bound``: the fraction of the ideal two-way decoding would reach if
    both decoders were nothing but their compiled step graphs (two-way: backbone, branch,
    both heads, gate and draw, at the buckets it decodes; raster: one token), run in
    decoding order, one after the other (``graphs_in_sequence_seconds``), i.e. without the
    Python loop, the prefill and the first (eager) step; ``graphs_alone_bound`` the same
    from each graph timed alone, repeated (``graph_seconds``, summed over the steps: an
    optimistic figure, a graph run again and again on the same inputs is as warm as it gets).
    ``split``: what the two-way
    graph of the average anti-diagonal's bucket is made of: the bare backbone forward on the
    bucket's tokens, the vertical branch on top, then the heads, gate, guidance and draw
    (the rest of the graph); and the raster graph against its bare forward on one token."""
    cond = torch.zeros(1, dtype=torch.long, device=device)
    kw = dict(compile=True, cfg_scale=a.cfg, top_k=0, temperature=1.0)
    cost, graph, bare, sequence = {}, {}, {}, {}
    with recompile_room(True):
        for mode in ("two_way", "raster"):  # a prefill makes the model's earlier states stale: one at a time
            s = fa.prefill(model, cond, mode=mode, generator=torch.Generator(device).manual_seed(0), **kw)
            while not s.done:
                fa.step(s)
            H, W = s.layout.height, s.layout.width
            avg = round(H * W / (H + W - 1))
            per_bucket, total = {}, 0.0
            for t in range(1, s.num_steps):
                size = s.schedule.steps[t].entries.numel()
                if size not in per_bucket:
                    per_bucket[size] = _median(s.compiled_call(t), a, device)
                total += per_bucket[size]
            cost[mode] = total
            graph[mode] = per_bucket
            calls = [s.compiled_call(t) for t in range(1, s.num_steps)]
            sequence[mode] = _median(lambda calls=calls: [c() for c in calls], a, device, max(3, a.bound_reps // 10))
            # bare forwards on this state's decoder: the two-way one runs the branch too
            sizes = (bucket(avg),) if mode == "two_way" else (1, avg, bucket(avg))
            for T in sizes:
                bare[(mode, T)] = _median(_bare_call(s, T, device), a, device)
    b = bucket(avg)
    return {
        "forward_growth_compiled_b1": bare[("raster", avg)] / bare[("raster", 1)],
        "bound_compiled": bare[("raster", 1)] / bare[("raster", avg)],
        "graph_seconds": cost,
        "graphs_in_sequence_seconds": sequence,
        "graphs_bound": sequence["raster"] / sequence["two_way"] / (H * W / (H + W - 1)),
        "graphs_alone_bound": cost["raster"] / cost["two_way"] / (H * W / (H + W - 1)),
        "split": {
            "bucket": b,
            "two_way_graph_s": graph["two_way"][b],
            "bare_s": bare[("raster", b)],
            "bare_with_branch_s": bare[("two_way", b)],
            "raster_graph_s": graph["raster"][1],
            "raster_bare_s": bare[("raster", 1)],
        },
    }


def _median(call, a, device, reps: int | None = None) -> float:
    for _ in range(10 if reps is None else 1):
        call()
    return statistics.median(ds.timed(call, device) for _ in range(reps or a.bound_reps))


def _bare_call(state, T: int, device):
    """A compiled bare forward of T random tokens written mid-image into ``state``'s caches
    (its own code object per size and branch: its own graph list)."""
    dec = state.decoder
    code = _bare_feed.__code__.replace(co_name=f"bare_feed_{T}_{'branch' if dec.branch else 'plain'}")
    fn = torch.compile(types.FunctionType(code, _bare_feed.__globals__, code.co_name), dynamic=False)
    start = state.layout.prefix_len + state.layout.height * state.layout.width // 2
    Bt, d = dec.pre.embeds.shape[0], dec.pre.embeds.shape[2]
    args = (
        dec,
        torch.randn(Bt, T, d, device=device, dtype=dec.dtype),
        torch.arange(start, start + T, device=device),
        torch.tensor([start], device=device),
    )
    return lambda: fn(*args)


def _bare_feed(dec, embeds, entries, lim):
    return dec.feed_at(embeds, entries, lim)


def bench(name, spec, grid, batch, a, device, dtype, log) -> dict:
    model = load_model(name, spec, grid, device, dtype)
    cond = torch.arange(batch, device=device) % model.flashar.ctx.recipe.condition.num_classes
    kw = dict(top_k=0, temperature=1.0, cfg_scale=a.cfg)

    def gen(mode, compiled, **extra):
        return lambda: model.generate(cond, mode=mode, compile=compiled, **{**kw, **extra})

    H = W = grid
    row = {
        "model": name,
        "layers": spec[0],
        "dim": spec[1],
        "vocab": spec[3],
        "grid": f"{H}x{W}",
        "batch": batch,
        "cfg": a.cfg,
        "ideal_step_ratio": H * W / (H + W - 1),
    }
    eager_once = {m: ds.timed(gen(m, False), device) for m in MODES}  # warm-up, and the reference below
    first = {m: ds.timed(gen(m, True), device) for m in MODES}  # compiles this batch's graphs
    fns = {f"{m}_{c}": gen(m, c == "compiled") for c in ("eager", "compiled") for m in MODES}
    t = ds.run_pair(fns, a.repeats if batch == 1 else a.batch_repeats, device, warmup=False)
    row["seconds"] = t
    row["first_compiled_call_s"] = first
    row["compile_s"] = {m: first[m] - t[f"{m}_compiled"] for m in MODES}
    row["eager_first_call_s"] = eager_once
    row["compiled_over_eager"] = {m: t[f"{m}_eager"] / t[f"{m}_compiled"] for m in MODES}
    row["speedup_eager"] = t["raster_eager"] / t["two_way_eager"]
    row["speedup_compiled"] = t["raster_compiled"] / t["two_way_compiled"]
    greedy = {c: [gen(m, c, top_k=1)() for m in MODES] for c in (False, True)}
    row["greedy_codes_equal"] = all(torch.equal(x, y) for x, y in zip(greedy[False], greedy[True]))

    def seeded(m, c):  # sampled inside the compiled graph, from the uniforms drawn at prefill
        g = torch.Generator(device=device).manual_seed(1234)
        return gen(m, c, top_k=0, temperature=1.0, generator=g)()

    row["sampled_codes_equal"] = all(torch.equal(seeded(m, False), seeded(m, True)) for m in MODES)
    rows = batch * (2 if a.cfg != 1.0 else 1)
    row["auto_compiles"] = bool(use_compile("auto", device, rows, model.flashar.ctx.runner.static_caches))
    if batch == 1:  # the bound is a batch-1 measure (a bare forward on 1 image's tokens)
        row["forward_growth_b1"] = ds.forward_growth(model, a.cfg, device, reps=a.bound_reps)
        row["bound"] = bound = 1 / row["forward_growth_b1"]  # the fraction of the ideal a bare forward allows
        for c in ("eager", "compiled"):
            row[f"of_bound_{c}"] = row[f"speedup_{c}"] / row["ideal_step_ratio"] / bound
        row.update(graph_bounds(model, a, device))
        row["of_bound_compiled_compiled"] = row["speedup_compiled"] / row["ideal_step_ratio"] / row["bound_compiled"]
        row["of_graphs_bound_compiled"] = row["speedup_compiled"] / row["ideal_step_ratio"] / row["graphs_bound"]
    log(
        f"{name} {H}x{W} b{batch}: two-way eager {t['two_way_eager'] * 1e3:.0f} ms -> compiled "
        f"{t['two_way_compiled'] * 1e3:.0f} ms ({row['compiled_over_eager']['two_way']:.2f}x), raster "
        f"{t['raster_eager'] * 1e3:.0f} -> {t['raster_compiled'] * 1e3:.0f} ms; two-way/raster speedup eager "
        f"{row['speedup_eager']:.2f}x, compiled {row['speedup_compiled']:.2f}x "
        f"of ideal {row['ideal_step_ratio']:.2f}x; "
        f"compile {row['compile_s']['two_way']:.0f} s + {row['compile_s']['raster']:.0f} s"
        + (
            f"; of bound compiled {row['of_bound_compiled']:.2f}, eager {row['of_bound_eager']:.2f}; compiled "
            f"bound {row['bound_compiled']:.2f} (reached {row['of_bound_compiled_compiled']:.2f}), graphs only "
            f"{row['graphs_bound']:.2f} of ideal (reached {row['of_graphs_bound_compiled']:.2f})"
            if "bound" in row
            else ""
        )
    )
    return row


def markdown(res: dict) -> str:
    a = res["args"]
    out = [
        f"# Compiled decoding: two-way vs raster, both eager and both compiled ({res['device']}, {a['dtype']}, "
        f"threads {res['threads']})",
        "",
        f"The shipped Fashion-MNIST FlashAR model (fmnist-default, both modes on its backbone) and random-weight "
        f"LlamaGen-architecture models, CFG {a['cfg']}, top-k off, temperature 1. Times are medians "
        f"of {a['repeats']} (batch 1) / {a['batch_repeats']} (larger batches) interleaved runs of the four decoders; "
        f"compile = first compiled call minus the steady compiled time (inductor, graphs for this batch size). "
        f"Speedup = raster time / two-way time in the same mode; of ideal = speedup / (H*W/(H+W-1)); bound = "
        f"1 / forward growth (see docs/speed.md), measured at batch 1 (only) in this run: the fraction of the ideal "
        f"reachable if both steps were a bare backbone forward; of bound = of ideal / bound. Compiled bound: the "
        f"same with the bare forward compiled. Graphs only: the fraction of the ideal if both decoders were "
        f"nothing but their compiled step graphs (two-way: backbone, branch, both heads, gate, draw, at its "
        f"buckets; no Python loop, prefill or first step), run in decoding order; in brackets the fraction of "
        f"these two the compiled speedup reaches. auto = what "
        f'`compile="auto"` picks for this batch. Equal: greedy and seeded sampled compiled codes against eager.',
        "",
        "| model | grid | batch | two-way eager / compiled | raster eager / compiled | compiled / eager (two-way, "
        "raster) | speedup eager (of ideal) | speedup compiled (of ideal) | bound | of bound eager / compiled | "
        "compiled bound (reached) | graphs only (reached) | auto | compile two-way + raster | equal greedy, sampled |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        t, c, ideal = r["seconds"], r["compiled_over_eager"], r["ideal_step_ratio"]
        bound = f"{r['bound']:.2f}" if "bound" in r else "-"
        of_bound = f"{r['of_bound_eager']:.2f} / {r['of_bound_compiled']:.2f}" if "bound" in r else "-"
        cbound, graphs = "-", "-"
        if "graphs_bound" in r:
            cbound = f"{r['bound_compiled']:.2f} ({r['of_bound_compiled_compiled']:.2f})"
            graphs = f"{r['graphs_bound']:.2f} ({r['of_graphs_bound_compiled']:.2f})"
        auto = {True: "compiled", False: "eager", None: "-"}[r.get("auto_compiles")]
        out.append(
            f"| {r['model']} (L{r['layers']}, d{r['dim']}, K{r['vocab']}) | {r['grid']} | {r['batch']} | "
            f"{t['two_way_eager'] * 1e3:.0f} / {t['two_way_compiled'] * 1e3:.0f} ms | "
            f"{t['raster_eager'] * 1e3:.0f} / {t['raster_compiled'] * 1e3:.0f} ms | "
            f"{c['two_way']:.2f}x, {c['raster']:.2f}x | {r['speedup_eager']:.2f}x ({r['speedup_eager'] / ideal:.2f}) | "
            f"{r['speedup_compiled']:.2f}x ({r['speedup_compiled'] / ideal:.2f}) | {bound} | {of_bound} | {cbound} | "
            f"{graphs} | {auto} | "
            f"{r['compile_s']['two_way']:.0f} + {r['compile_s']['raster']:.0f} s | "
            f"{r['greedy_codes_equal']}, {r.get('sampled_codes_equal', '-')} |"
        )
    splits = [r for r in res["rows"] if "split" in r]
    if splits:
        out += [
            "",
            "What one compiled step graph is made of at batch 1, each part timed alone in the same run: the "
            "two-way graph of the average anti-diagonal's bucket (b tokens fed, b cells drawn) against the bare "
            "backbone forward on b tokens, the same with the vertical branch, and the rest of the graph (both "
            "heads, gate, guidance, draw); the raster graph against its bare forward on one token. The last "
            "column is the two-way graph over the raster graph; the bound asks for it to be the bare growth.",
            "",
            "| model | grid | bucket b | bare forward, b tokens | + branch | + heads, gate, guidance, draw | "
            "two-way graph | raster: bare forward, 1 token / graph | two-way / raster graph (bare growth) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in splits:
            sp, ms = r["split"], lambda x: f"{x * 1e3:.3f} ms"
            out.append(
                f"| {r['model']} | {r['grid']} | {sp['bucket']} | {ms(sp['bare_s'])} | "
                f"+{ms(sp['bare_with_branch_s'] - sp['bare_s'])} | "
                f"+{ms(sp['two_way_graph_s'] - sp['bare_with_branch_s'])} | {ms(sp['two_way_graph_s'])} | "
                f"{ms(sp['raster_bare_s'])} / {ms(sp['raster_graph_s'])} | "
                f"{sp['two_way_graph_s'] / sp['raster_graph_s']:.2f} ({sp['bare_s'] / sp['raster_bare_s']:.2f}) |"
            )
    if splits:
        out += [
            "",
            "Where a compiled batch-1 decoding's time goes: its step graphs each timed alone (the same call "
            "repeated: as warm as it gets) and summed, the same graphs run once each in decoding order (what "
            "'graphs only' uses), and the whole `generate` (with the prefill, the first step, run eagerly, and "
            "the Python loop around the graphs).",
            "",
            "| model | grid | two-way: graphs alone / in sequence / generate | raster: graphs alone / in sequence / "
            "generate |",
            "|---|---|---|---|",
        ]
        for r in splits:
            g, q, t = r["graph_seconds"], r["graphs_in_sequence_seconds"], r["seconds"]
            out.append(
                f"| {r['model']} | {r['grid']} | "
                + " | ".join(
                    f"{g[m] * 1e3:.1f} / {q[m] * 1e3:.1f} / {t[m + '_compiled'] * 1e3:.1f} ms" for m in MODES[::-1]
                )
                + " |"
            )
    out += [
        "",
        f"Generated by `python benchmarks/compile_speed.py {' '.join(res['argv'])}` on {res['platform']}, "
        f"torch {res['torch']}.",
        "",
    ]
    return "\n".join(out)


def plot(res: dict, path: Path) -> None:
    import matplotlib  # the plots extra: only a run that writes its PNG needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(2 * max(6, 1.6 * len(rows)), 4))
    x = list(range(len(rows)))
    labels = [f"{r['model']}\n{r['grid']} b{r['batch']}" for r in rows]
    cols = [
        ("two_way_eager", "two-way eager"),
        ("two_way_compiled", "two-way compiled"),
        ("raster_eager", "raster eager"),
        ("raster_compiled", "raster compiled"),
    ]
    w = 0.8 / len(cols)
    for k, (key, label) in enumerate(cols):
        ax.bar([i - 0.4 + (k + 0.5) * w for i in x], [r["batch"] / r["seconds"][key] for r in rows], w, label=label)
    ax.set_yscale("log")
    ax.set_xticks(x, labels, fontsize=8)
    ax.set_ylabel("images / s (log)")
    ax.set_title(f"Eager vs compiled decoding ({res['device']}, {res['args']['dtype']})")
    ax.legend(fontsize=7)
    w = 0.35
    for k, c in enumerate(("eager", "compiled")):
        frac = [r[f"speedup_{c}"] / r["ideal_step_ratio"] for r in rows]
        bx.bar([i - w / 2 + k * w for i in x], frac, w, label=f"two-way / raster, both {c}")
    bounds = [(i, r["bound"]) for i, r in zip(x, rows) if "bound" in r]
    if bounds:
        bx.scatter([i for i, _ in bounds], [b for _, b in bounds], marker="_", s=600, color="k", label="bound")
    graphs = [(i, r["graphs_bound"]) for i, r in zip(x, rows) if "graphs_bound" in r]
    if graphs:
        bx.scatter([i for i, _ in graphs], [b for _, b in graphs], marker="_", s=600, color="r", label="graphs only")
    bx.set_xticks(x, labels, fontsize=8)
    bx.set_ylabel("fraction of the ideal H*W / (H+W-1)")
    bx.set_ylim(0, 1.05)
    bx.set_title("Two-way over raster, as a fraction of the ideal")
    bx.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ds.common_args(p)
    p.add_argument("--batches", default="1,64")
    p.add_argument("--repeats", type=int, default=5, help="interleaved runs at batch 1")
    p.add_argument("--batch-repeats", type=int, default=None, help="interleaved runs at larger batches (CPU 2, GPU 5)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="the Fashion-MNIST default model at batch 1 only")
    p.add_argument("--bound-reps", type=int, default=100, help="bare forwards timed for the bound")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    if a.threads:
        torch.set_num_threads(a.threads)
    dtype = ds.DTYPES[a.dtype]
    gpu = (a.preset or ("gpu" if device.type == "cuda" else "cpu")) == "gpu"
    models = GPU_MODELS if gpu else CPU_MODELS
    if a.models:
        models = {k: v for k, v in {**CPU_MODELS, **GPU_MODELS}.items() if k in a.models.split(",")}
    batches = [int(b) for b in a.batches.split(",")]
    if a.quick:
        models, batches = {"fmnist-default": CPU_MODELS["fmnist-default"]}, [1]
    a.batch_repeats = a.batch_repeats or (5 if gpu else 2)
    jobs = [(n, s, g, b) for n, s in models.items() for g in s[5] for b in batches]
    bar = tqdm(jobs, desc="compile speed", unit="run")
    rows = []
    for name, spec, g, b in bar:
        bar.set_postfix_str(f"{name} {g}x{g} b{b}")
        rows.append(bench(name, spec, g, b, a, device, dtype, bar.write))
    tag = a.tag or (device.type if not a.quick else f"{device.type}_quick")
    res = {
        **ds.machine(device, argv),
        "date": time.strftime("%Y-%m-%d"),
        "args": {
            "dtype": a.dtype,
            "cfg": a.cfg,
            "repeats": a.repeats,
            "batch_repeats": a.batch_repeats,
            "batches": batches,
        },
        "rows": rows,
    }
    ds.write_results(res, Path(a.out) / f"compile_speed_{tag}", markdown, plot)


if __name__ == "__main__":
    main()
