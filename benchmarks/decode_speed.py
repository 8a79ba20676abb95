"""Decoding speed, two-way (FlashAR) against raster, measured side by side in one run.

    python benchmarks/decode_speed.py                  # CPU, small random LlamaGen models (minutes)
    python benchmarks/decode_speed.py --quick          # CPU, fewer grids, batches and repeats
    python benchmarks/decode_speed.py --device cuda --dtype bf16 --preset gpu  # LlamaGen-B, 16x16 + 32x32, compiled
    python benchmarks/decode_speed.py --hf             # also the transformers backend: static vs DynamicCache

Random-weight models of the LlamaGen architecture (integrations/llamagen.py), patched with
the shipped LlamaGen recipe. Both modes run the same code (static caches, the same sampling,
CFG as one batched forward) and are timed interleaved (raster, two-way, raster, ...) so
that machine noise hits both alike; only ratios are meant to be compared across machines.

Per model and grid: batch-1 latency of each mode and the speedup, the two-way step's cost
relative to a raster step, the ideal step ratio H*W/(H+W-1) and how much of it is reached,
throughput at several batch sizes, backbone forwards (counted), KV cache bytes (and
torch.cuda.max_memory_allocated on GPU), the vertical branch's added parameters and FLOPs,
and the measured time of the two-way steps with and without the branch. Writes
benchmarks/results/decode_speed[_<tag>].{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import flashar_adapt as fa  # noqa: E402
from flashar_adapt.integrations.llamagen import ModelArgs, Transformer, find_multiple  # noqa: E402

# name: (n_layer, dim, n_head, vocab, branch_layer, grids)
CPU_MODELS = {
    "fmnist-shape": (4, 128, 4, 256, -2, (14,)),  # the Fashion-MNIST default model's shape
    "small": (8, 256, 8, 4096, -4, (16, 24, 32)),
    "medium": (12, 384, 6, 16384, -4, (16, 32)),
}
GPU_MODELS = {
    "llamagen-B": (12, 768, 12, 16384, -4, (16, 32)),  # GPT-B: 256x256 and 512x512 images
}
# transformers backend (--hf): a random LlamaForCausalLM with the llama-image-ar recipe, the
# same shape as "small"; (n_layer, dim, n_head, codebook, branch_layer, grids)
HF_MODEL = ("hf-llama-small", (8, 256, 8, 4096, -4, (16, 32)))


def build(n_layer, dim, n_head, vocab, branch_layer, grid, device, dtype, seed=0):
    torch.manual_seed(seed)
    args = ModelArgs(
        dim=dim,
        n_layer=n_layer,
        n_head=n_head,
        vocab_size=vocab,
        num_classes=1000,
        block_size=grid * grid,
        cls_token_num=1,
        token_dropout_p=0.0,
        resid_dropout_p=0.0,
        ffn_dropout_p=0.0,
    )
    model = Transformer(args).eval()
    torch.nn.init.normal_(model.output.weight, std=0.02)  # the zero init would make every logit equal
    recipe = fa.load_recipe("llamagen-c2i-b").replace(
        **{"image.codebook_size": vocab, "image.grid": [grid, grid], "flashar.branch_layer": branch_layer}
    )
    fa.patch(model, recipe)
    return model.to(device=device, dtype=dtype)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def run_pair(fns: dict, repeats: int, device, warmup: bool = True) -> dict:
    """Median seconds of each callable, timed interleaved (after one warm-up each)."""
    if warmup:
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, f in fns.items():
            times[k].append(timed(f, device))
    return {k: statistics.median(v) for k, v in times.items()}


def count_forwards(model, fn) -> int:
    calls = []
    h = model.flashar.ctx.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        fn()
    finally:
        h.remove()
    return len(calls)


def drop_caches(model) -> None:
    for layer in list(model.flashar.ctx.layers) + list(model.flashar.branch_layers):
        layer.attention.kv_cache = None


def cache_bytes(model, mode: str) -> int:
    """Bytes of the static KV caches a generate() call of this mode uses (left on the layers)."""
    ctx = model.flashar.ctx
    layers = list(ctx.layers) + (list(model.flashar.branch_layers) if mode == "two_way" else [])
    total = 0
    for layer in layers:
        c = layer.attention.kv_cache
        if c is not None:
            total += c.k_cache.nbytes + c.v_cache.nbytes
    return total


def branch_cost(model, grid: int) -> dict:
    """Parameters and per-token FLOPs (2 per multiply-add of the linear layers) that the
    vertical branch, its head and the gate add to a backbone forward with the horizontal head."""
    ctx = model.flashar.ctx
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    per_layer = n(ctx.layers[0])
    backbone = per_layer * len(ctx.layers) + n(ctx.head)
    added = n(model.flashar.branch_layers) + n(model.flashar.vertical_head) + n(model.flashar.gate)
    return {
        "backbone_params": backbone,
        "added_params": added,
        "added_flops_fraction": added / backbone,
        "branch_layers": len(model.flashar.branch_layers),
        "backbone_layers": len(ctx.layers),
    }


@torch.inference_mode()
def matmul_growth(dim: int, rows_raster: int, rows_two_way: int, device, dtype, reps: int = 200) -> float:
    """Time of a [dim -> 3 dim] matmul on the rows a two-way step feeds (an average
    anti-diagonal, CFG doubled) over the rows a raster step feeds. 1 means the machine is
    latency bound at these sizes (the ideal step ratio is reachable); the number of rows
    means it is compute bound (the total work is the same in both modes, so the speedup
    can only come from per-step overhead)."""
    lin = torch.nn.Linear(dim, 3 * dim, bias=False, device=device, dtype=dtype)
    out = []
    for rows in (rows_raster, rows_two_way):
        x = torch.randn(1, rows, dim, device=device, dtype=dtype)
        for _ in range(10):
            lin(x)
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            lin(x)
        sync(device)
        out.append(time.perf_counter() - t)
    return out[1] / out[0]


def two_way_state(model, cond, use_branch: bool, cfg_scale: float, compile: bool = False) -> fa.DecoderState:
    """A two-way decoder state after the prefill (fa.prefill), with or without the branch."""
    return fa.prefill(model, cond, vertical=use_branch, cfg_scale=cfg_scale, top_k=0, temperature=1.0, compile=compile)


@torch.inference_mode()
def forward_growth(model, cfg_scale: float, device, reps: int = 100) -> float:
    """Time of one bare backbone forward (no branch, no head, no sampling) on an average
    anti-diagonal's tokens over one on a single token, both appended to a half-filled static
    cache. Where this is well above 1 the machine is compute bound at this size: if both
    steps were that bare forward alone, decoding would reach 1 / growth of the ideal step
    ratio, and the branch, heads and sampling only add to the two-way step."""
    state = two_way_state(model, torch.zeros(1, dtype=torch.long, device=device), False, cfg_scale)
    dec, layout = state.decoder, state.layout
    H, W = layout.height, layout.width
    start = layout.prefix_len + H * W // 2
    Bt, d = dec.pre.embeds.shape[0], dec.pre.embeds.shape[2]
    out = []
    for T in (1, round(H * W / (H + W - 1))):
        e = torch.randn(Bt, T, d, device=device, dtype=dec.dtype)

        def feed(e=e, T=T):
            return dec.feed(e, start, start + T)

        for _ in range(10):
            feed()
        out.append(statistics.median(timed(feed, device) for _ in range(reps)))
    return out[1] / out[0]


def two_way_steps(model, cond, use_branch: bool, cfg_scale: float, compile: bool = False):
    """The two-way decoding loop (fa.prefill + fa.step) with or without the vertical branch
    (without it every cell takes the horizontal head's logits; the schedule and the backbone
    work are the same). Used to measure what the branch adds to a step; returns the codes."""
    state = two_way_state(model, cond, use_branch, cfg_scale, compile)
    while not state.done:
        fa.step(state)
    return state.image()


def bench_grid(name, spec, grid, a, device, dtype, log) -> dict:
    n_layer, dim, n_head, vocab, branch_layer, _ = spec
    model = build(n_layer, dim, n_head, vocab, branch_layer, grid, device, dtype)
    H = W = grid
    steps_two, steps_raster = H + W - 1, H * W
    kw = dict(top_k=0, temperature=1.0, cfg_scale=a.cfg, compile=a.compile)

    def gen(mode, b):
        cond = torch.arange(b, device=device) % 1000
        return lambda: model.generate(cond, mode=mode, **kw)

    row = {
        "model": name,
        "layers": n_layer,
        "dim": dim,
        "heads": n_head,
        "vocab": vocab,
        "grid": f"{H}x{W}",
        "branch_layer": branch_layer,
        "cfg": a.cfg,
        "ideal_step_ratio": steps_raster / steps_two,
    }
    Bt = 2 if a.cfg != 1.0 else 1
    row["matmul_growth_b1"] = matmul_growth(dim, Bt, round(Bt * H * W / steps_two), device, dtype)
    row["forward_growth_b1"] = forward_growth(model, a.cfg, device)
    # warm-up runs: count backbone forwards and read the static caches' size (fresh, batch 1)
    drop_caches(model)
    row["forwards"], mem = {}, {}
    for m in ("raster", "two_way"):
        row["forwards"][m] = count_forwards(model, gen(m, 1))
        mem[m] = {"kv_cache_bytes_b1": cache_bytes(model, m)}
    # compiled: warm up again (counting hooked the layers, and a hook change recompiles the step)
    lat = run_pair({"raster": gen("raster", 1), "two_way": gen("two_way", 1)}, a.repeats, device, warmup=a.compile)
    row["latency_b1_s"] = lat
    row["speedup_b1"] = lat["raster"] / lat["two_way"]
    row["fraction_of_ideal_b1"] = row["speedup_b1"] / row["ideal_step_ratio"]
    # cost of one two-way step (a whole anti-diagonal) relative to one raster step (one token)
    row["step_cost_ratio_b1"] = (lat["two_way"] / steps_two) / (lat["raster"] / steps_raster)
    log(
        f"{name} {H}x{W} b1: raster {lat['raster'] * 1e3:.0f} ms, two-way {lat['two_way'] * 1e3:.0f} ms, "
        f"speedup {row['speedup_b1']:.2f}x of ideal {row['ideal_step_ratio']:.2f}x"
    )
    row["throughput"] = {}
    for b in a.batches:
        if b > 1 and a.skip_batch_grids == "smallest-only" and grid != min(spec[5]) and not a.grids:
            continue
        if b == 1:
            t = lat  # the latency runs above are batch-1 throughput runs
        else:
            reps = a.batch_repeats
            t = run_pair(
                {"raster": gen("raster", b), "two_way": gen("two_way", b)},
                reps,
                device,
                warmup=device.type == "cuda" or a.compile,
            )  # a compiled run compiles each new batch size
        row["throughput"][b] = {
            "raster_img_s": b / t["raster"],
            "two_way_img_s": b / t["two_way"],
            "speedup": t["raster"] / t["two_way"],
        }
        log(f"{name} {H}x{W} b{b}: throughput speedup {t['raster'] / t['two_way']:.2f}x")
    if device.type == "cuda":  # the allocator's peak at the largest batch, fresh caches
        for m in ("raster", "two_way"):
            drop_caches(model)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            gen(m, max(a.batches))()
            mem[m]["peak_bytes_above_weights"] = torch.cuda.max_memory_allocated() - base
    row["memory"] = mem
    # the vertical branch's cost: estimate and measured two-way steps with / without it
    row["branch"] = branch_cost(model, grid)
    cond = torch.zeros(1, dtype=torch.long, device=device)
    t = run_pair(
        {
            "with": lambda: two_way_steps(model, cond, True, a.cfg, a.compile),
            "without": lambda: two_way_steps(model, cond, False, a.cfg, a.compile),
        },
        a.repeats,
        device,
    )
    row["branch"]["two_way_b1_with_s"] = t["with"]
    row["branch"]["two_way_b1_without_s"] = t["without"]
    row["branch"]["measured_added_fraction"] = t["with"] / t["without"] - 1
    # how far the loop is from its own limit: the two-way loop without the branch costs the
    # backbone forwards of H+W-1 anti-diagonals; compare that to the raster step cost
    row["two_way_no_branch_step_cost_ratio_b1"] = (t["without"] / steps_two) / (lat["raster"] / steps_raster)
    model = None  # free the weights before the next grid
    return row


def build_hf(n_layer, dim, n_head, codebook, branch_layer, grid, device, dtype, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM  # the hf extra: only --hf needs it

    torch.manual_seed(seed)
    offset = 256  # text ids below the image codes
    cfg = LlamaConfig(
        vocab_size=offset + codebook,
        hidden_size=dim,
        intermediate_size=find_multiple(int(2 * 4 * dim / 3), 32),
        num_hidden_layers=n_layer,
        num_attention_heads=n_head,
        num_key_value_heads=n_head,
        max_position_embeddings=grid * grid + 64,
        tie_word_embeddings=False,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(cfg).eval()
    recipe = fa.load_recipe("llama-image-ar").replace(
        **{
            "image.codebook_size": codebook,
            "image.visual_token_offset": offset,
            "image.grid": [grid, grid],
            "condition.prefix_len": 16,
            "flashar.branch_layer": branch_layer,
        }
    )
    fa.patch(model, recipe)
    return model.to(device=device, dtype=dtype)


def bench_hf(grid, a, device, dtype, log) -> dict:
    """transformers backend, batch 1: both modes with the static feed-order cache (the
    default) and with transformers' DynamicCache, all four timed interleaved."""
    from flashar_adapt.integrations import hf

    name, spec = HF_MODEL
    model = build_hf(*spec[:5], grid, device, dtype)
    cond = torch.tensor([[1, 5, 6, 7]], device=device)
    kw = dict(top_k=0, temperature=1.0, cfg_scale=a.cfg)
    static = hf.full_attention_only

    def gen(mode, use_static):
        def run():
            hf.full_attention_only = static if use_static else (lambda config: False)
            try:
                model.generate(cond, mode=mode, **kw)
            finally:
                hf.full_attention_only = static

        return run

    fns = {f"{m}_{c}": gen(m, c == "static") for m in ("raster", "two_way") for c in ("static", "dynamic")}
    t = run_pair(fns, a.repeats, device)
    H = W = grid
    row = {
        "model": name,
        "layers": spec[0],
        "dim": spec[1],
        "vocab": spec[3],
        "grid": f"{H}x{W}",
        "cfg": a.cfg,
        "ideal_step_ratio": H * W / (H + W - 1),
        "latency_b1_s": t,
        "speedup_static": t["raster_static"] / t["two_way_static"],
        "speedup_dynamic": t["raster_dynamic"] / t["two_way_dynamic"],
    }
    log(
        f"{name} {H}x{W} b1: static cache raster {t['raster_static'] * 1e3:.0f} ms / two-way "
        f"{t['two_way_static'] * 1e3:.0f} ms; DynamicCache {t['raster_dynamic'] * 1e3:.0f} / "
        f"{t['two_way_dynamic'] * 1e3:.0f} ms"
    )
    model = None  # free the weights before the next grid
    return row


def markdown(res: dict) -> str:
    a = res["args"]
    out = [
        f"# Decoding speed: two-way vs raster ({res['device']}, {a['dtype']}, threads {res['threads']}, "
        f"{'compiled: generate(compile=True)' if a.get('compile') else 'eager'})",
        "",
        f"Random-weight LlamaGen-architecture models, CFG scale {a['cfg']} (one batched [cond; uncond] forward), "
        f"top-k off, temperature 1. Times are medians of {a['repeats']} interleaved runs; only ratios are meaningful "
        f"across machines. Step ratio = H*W/(H+W-1) (the ideal speedup); step cost = time of one two-way step "
        f"(a whole anti-diagonal, vertical branch included) / time of one raster step. Matmul growth = time of a "
        f"[d -> 3d] matmul on the rows of an average anti-diagonal / on one token's rows: near 1, a step costs the "
        f"same whatever it feeds (latency bound, the ideal is reachable); near the row count, the machine is "
        f"compute bound and both modes do the same total work, so the speedup can only come from per-step overhead. "
        f"Forward growth = one bare backbone forward (no branch, head or sampling) on an average anti-diagonal's "
        f"tokens / one on a single token, half-way through the image; 1 / forward growth (in brackets) is the fraction "
        f"of the ideal a decoder would reach if both steps were that bare forward alone. "
        f"Branch +FLOPs: parameters of the branch layers, vertical head and gate over the backbone's (per token); "
        f"branch +time: two-way decoding with vs without the branch, measured.",
        "",
        "| model | grid | forwards raster / two-way | ideal | speedup b1 | of ideal | step cost b1 | matmul growth | "
        "forward growth (bound) | "
        + " | ".join(f"thr. speedup b{b}" for b in a["batches"])
        + " | branch +FLOPs est. | branch +time meas. | "
        "KV cache b1 raster / two-way |",
        "|---|---|---|---|---|---|---|---|---|" + "---|" * len(a["batches"]) + "---|---|---|",
    ]
    for r in res["rows"]:
        thr = [f"{r['throughput'][b]['speedup']:.2f}x" if b in r["throughput"] else "-" for b in a["batches"]]
        m = r["memory"]
        out.append(
            f"| {r['model']} (L{r['layers']}, d{r['dim']}, K{r['vocab']}) | {r['grid']} | "
            f"{r['forwards']['raster']} / {r['forwards']['two_way']} | {r['ideal_step_ratio']:.2f}x | "
            f"{r['speedup_b1']:.2f}x | {r['fraction_of_ideal_b1']:.2f} | {r['step_cost_ratio_b1']:.2f} | "
            f"{r['matmul_growth_b1']:.2f} | {r['forward_growth_b1']:.2f} ({1 / r['forward_growth_b1']:.2f}) | "
            + " | ".join(thr)
            + f" | {100 * r['branch']['added_flops_fraction']:.0f}% | "
            f"{100 * r['branch']['measured_added_fraction']:.0f}% | "
            f"{m['raster']['kv_cache_bytes_b1'] / 2**20:.1f} / {m['two_way']['kv_cache_bytes_b1'] / 2**20:.1f} MiB |"
        )
    if any("peak_bytes_above_weights" in r["memory"]["raster"] for r in res["rows"]):
        out += ["", f"GPU peak memory above the weights at batch {max(a['batches'])}:", ""]
        for r in res["rows"]:
            m = r["memory"]
            out.append(
                f"- {r['model']} {r['grid']}: raster {m['raster']['peak_bytes_above_weights'] / 2**20:.0f} MiB, "
                f"two-way {m['two_way']['peak_bytes_above_weights'] / 2**20:.0f} MiB"
            )
    if res.get("hf_rows"):
        out += [
            "",
            "transformers backend (random LlamaForCausalLM, llama-image-ar recipe), batch-1 latency with the "
            "static feed-order cache (default) and with transformers' DynamicCache, timed interleaved:",
            "",
            "| model | grid | raster static / dynamic | two-way static / dynamic | speedup static | speedup dynamic "
            "| of ideal (static) |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in res["hf_rows"]:
            t = r["latency_b1_s"]
            out.append(
                f"| {r['model']} (L{r['layers']}, d{r['dim']}, K{r['vocab']}) | {r['grid']} | "
                f"{t['raster_static'] * 1e3:.0f} / {t['raster_dynamic'] * 1e3:.0f} ms | "
                f"{t['two_way_static'] * 1e3:.0f} / {t['two_way_dynamic'] * 1e3:.0f} ms | "
                f"{r['speedup_static']:.2f}x | {r['speedup_dynamic']:.2f}x | "
                f"{r['speedup_static'] / r['ideal_step_ratio']:.2f} |"
            )
    out += [
        "",
        "Throughput (images/s, this machine):",
        "",
        "| model | grid | batch | raster | two-way |",
        "|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        for b, t in r["throughput"].items():
            out.append(f"| {r['model']} | {r['grid']} | {b} | {t['raster_img_s']:.2f} | {t['two_way_img_s']:.2f} |")
    out += [
        "",
        f"Generated by `python benchmarks/decode_speed.py {' '.join(res['argv'])}` on {res['platform']}, "
        f"torch {res['torch']}.",
        "",
    ]
    return "\n".join(out)


def plot(res: dict, path: Path) -> None:
    import matplotlib  # the plots extra: only a run that writes its PNG needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    labels = [f"{r['model']}\n{r['grid']}" for r in rows]
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4))
    w = 0.8 / (2 + len(res["args"]["batches"]))
    ax.bar(
        [i - 0.4 + w / 2 for i in x], [r["ideal_step_ratio"] for r in rows], w, label="ideal (step ratio)", color="#bbb"
    )
    ax.bar([i - 0.4 + 1.5 * w for i in x], [r["speedup_b1"] for r in rows], w, label="latency b1")
    for k, b in enumerate(res["args"]["batches"]):
        ax.bar(
            [i - 0.4 + (2.5 + k) * w for i in x],
            [r["throughput"].get(b, {}).get("speedup", 0) for r in rows],
            w,
            label=f"throughput b{b}",
        )
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel("speedup over raster (x)")
    ax.set_title(f"FlashAR two-way vs raster decoding ({res['device']}, {res['args']['dtype']})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def common_args(p: argparse.ArgumentParser) -> None:
    """The arguments every speed benchmark takes (this one and compile_speed.py)."""
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--preset", choices=["cpu", "gpu"], default=None, help="model set (default: by device)")
    p.add_argument("--models", default=None, help="comma-separated subset of the preset's models")
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default=None, help="suffix of the output files (default: device)")


def machine(device, argv) -> dict:
    """Where and how a benchmark ran (recorded beside its rows)."""
    return {
        "device": device.type if device.type == "cpu" else torch.cuda.get_device_name(device),
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "argv": list(argv if argv is not None else sys.argv[1:]),
    }


def write_results(res: dict, stem: Path, markdown, plot) -> None:
    """``stem``.json, .md (also printed) and .png."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1))
    stem.with_suffix(".md").write_text(markdown(res))
    plot(res, stem.with_suffix(".png"))
    print(markdown(res))
    print(f"wrote {stem}.{{json,md,png}}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    common_args(p)
    p.add_argument("--grids", default=None, help="comma-separated grid sides overriding the models' own")
    p.add_argument("--batches", default=None, help="throughput batch sizes (default cpu 1,8,32; gpu 1,8,64)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--all-batches", action="store_true", help="CPU: throughput on every grid, not the smallest only")
    p.add_argument(
        "--compile",
        action="store_true",
        default=None,
        help="decode with generate(compile=True) (default with --preset gpu: CUDA graphs)",
    )
    p.add_argument("--eager", dest="compile", action="store_false", help="do not compile (also with --preset gpu)")
    p.add_argument("--quick", action="store_true", help="16x16 (and 14x14) only, fewer batches and repeats")
    p.add_argument(
        "--hf", action="store_true", help="also time the transformers backend (static feed-order cache vs DynamicCache)"
    )
    a = p.parse_args(argv)
    device = torch.device(a.device)
    torch.set_num_threads(a.threads)
    dtype = DTYPES[a.dtype]
    gpu = (a.preset or ("gpu" if device.type == "cuda" else "cpu")) == "gpu"
    models = GPU_MODELS if gpu else CPU_MODELS
    if a.compile is None:
        a.compile = gpu
    if a.models:
        models = {k: v for k, v in {**CPU_MODELS, **GPU_MODELS}.items() if k in a.models.split(",")}
    a.batches = [int(b) for b in a.batches.split(",")] if a.batches else ([1, 8, 64] if gpu else [1, 8, 32])
    a.repeats = a.repeats or (2 if a.quick else 3 if not gpu else 5)
    a.batch_repeats = 3 if gpu else 1
    # CPU: throughput at batch > 1 only on the smallest grid of each model (minutes otherwise)
    a.skip_batch_grids = () if gpu or a.all_batches else "smallest-only"
    if a.quick:
        a.batches = a.batches[:2]
    jobs = []
    for name, spec in models.items():
        grids = [int(g) for g in a.grids.split(",")] if a.grids else spec[5]
        if a.quick:
            grids = [g for g in grids if g <= 16] or grids[:1]
        jobs += [(name, spec, g) for g in grids]
    bar = tqdm(jobs, desc="decode speed", unit="grid")
    rows = []
    for name, spec, g in bar:
        bar.set_postfix_str(f"{name} {g}x{g}")
        rows.append(bench_grid(name, spec, g, a, device, dtype, bar.write))
    hf_rows = []
    if a.hf:
        hf_grids = [g for g in HF_MODEL[1][5] if g <= 16] if a.quick else HF_MODEL[1][5]
        for g in tqdm(hf_grids, desc="transformers backend", unit="grid"):
            hf_rows.append(bench_hf(g, a, device, dtype, tqdm.write))
    tag = a.tag or (device.type if not a.quick else f"{device.type}_quick")
    res = {
        **machine(device, argv),
        "args": {"dtype": a.dtype, "cfg": a.cfg, "compile": a.compile, "repeats": a.repeats, "batches": a.batches},
        "rows": rows,
        "hf_rows": hf_rows,
    }
    write_results(res, Path(a.out) / f"decode_speed_{tag}", markdown, plot)


if __name__ == "__main__":
    main()
