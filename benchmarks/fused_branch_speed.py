"""The transformers runner's fused branch layer, measured in one run: compiled two-way
decoding with the branch layer fused with its backbone layer (``runner.fuse_branch_layer =
True``, opt-in) and with the two run apart (the default), each against compiled raster, on
one random-weight transformers Llama.

    python benchmarks/fused_branch_speed.py     # CPU: L8 d256, 12x12 grid, batch 1, CFG 2
    python benchmarks/fused_branch_speed.py --device cuda --dtype bf16 --layers 24 --dim 1024 --grid 16

One phase per setting (dynamo's caches emptied in between), each timing two-way against
raster interleaved; prints and writes (benchmarks/results/fused_branch_speed[_<tag>].{json,md})
the median times, two-way over raster in each phase, what fusing buys (the ratio of the two
speedups: machine drift between the phases cancels), and whether greedy and seeded sampled
codes are the same fused and apart.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import flashar_adapt as fa
from flashar_adapt.files import atomic_write_bytes

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import decode_speed as ds  # noqa: E402  (timing helpers of the main benchmark)


def build(layers: int, dim: int, grid: int, device, dtype, codebook: int = 1024, prompt: int = 16):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    offset = 256  # text ids below the visual range
    cfg = LlamaConfig(
        vocab_size=offset + codebook,
        hidden_size=dim,
        intermediate_size=dim * 8 // 3 // 64 * 64 or dim * 2,
        num_hidden_layers=layers,
        num_attention_heads=max(1, dim // 64),
        num_key_value_heads=max(1, dim // 64),
        max_position_embeddings=prompt + grid * grid + 64,
        attn_implementation="sdpa",
    )
    model = LlamaForCausalLM(cfg).eval().to(device=device, dtype=dtype)
    recipe = fa.load_recipe("llama-image-ar").replace(
        **{
            "image.codebook_size": codebook,
            "image.visual_token_offset": offset,
            "image.grid": [grid, grid],
            "condition.prefix_len": prompt,
            "flashar.branch_layer": -min(4, layers),
        }
    )
    fa.patch(model, recipe)
    model.flashar.to(device=device, dtype=dtype)
    return model, torch.randint(1, offset, (1, prompt), device=device)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--grid", type=int, default=12)
    p.add_argument("--cfg", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=9, help="interleaved runs of each decoder")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--tag", default="")
    p.add_argument("--out-dir", type=Path, default=HERE / "results")
    a = p.parse_args(argv)
    device = torch.device(a.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[a.dtype]
    model, cond = build(a.layers, a.dim, a.grid, device, dtype)
    runner = fa.context(model).runner

    def gen(mode: str, **kw):
        return lambda: model.generate(cond, mode=mode, cfg_scale=a.cfg, compile=True, **kw)

    def sampled():
        return gen("two_way", top_k=100, temperature=1.0, generator=torch.Generator().manual_seed(3))()

    # One phase per setting, dynamo's caches emptied in between: graphs of both settings in one
    # cache would make every step check the other setting's guards first, which a user never pays.
    ms, first, codes = {}, {}, {}
    setting = runner.fuse_branch_layer
    for fused in (True, False):
        torch.compiler.reset()
        runner.fuse_branch_layer = fused
        name = "two_way fused" if fused else "two_way apart"
        fns = {name: gen("two_way", top_k=1), f"raster ({name[8:]} phase)": gen("raster", top_k=1)}
        for k, f in fns.items():  # the first call compiles: timed alone, not in the medians
            first[k] = ds.timed(f, device)
            print(f"{k}: first call (compiles) {first[k]:.1f} s", flush=True)
        ms.update({k: v * 1e3 for k, v in ds.run_pair(fns, a.repeats, device, warmup=False).items()})
        # after the timing: these graphs are not timed; a pair is kept (and loaded for the run) only once checked
        codes[fused] = (fns[name](), sampled(), runner.pair is not None and runner.pair_for is not None)
    runner.fuse_branch_layer = setting
    greedy_same = torch.equal(codes[True][0], codes[False][0])
    sampled_same = torch.equal(codes[True][1], codes[False][1])
    speed_f = ms["raster (fused phase)"] / ms["two_way fused"]
    speed_a = ms["raster (apart phase)"] / ms["two_way apart"]
    res = {
        "model": f"transformers Llama L{a.layers} d{a.dim}, {a.grid}x{a.grid}, batch 1, CFG {a.cfg}, {a.dtype}",
        "device": str(device) if device.type != "cpu" else f"cpu ({platform.processor() or platform.machine()})",
        "threads": torch.get_num_threads(),
        "repeats": a.repeats,
        "ms": ms,
        "two_way_over_raster_fused": speed_f,
        "two_way_over_raster_apart": speed_a,
        "fusing_speedup": speed_f / speed_a,  # each phase against its own raster: drift between phases cancels
        "ideal": a.grid * a.grid / (2 * a.grid - 1),
        "greedy_codes_equal": greedy_same,
        "sampled_codes_equal": sampled_same,
        "fused_path_taken": codes[True][2],
        "first_call_s": first,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    md = "\n".join(
        [
            f"# Fused branch layer (transformers runner), compiled: {res['model']}",
            "",
            f"Device {res['device']}, {res['threads']} threads, median of {a.repeats} interleaved runs per phase "
            f"(two-way and raster), one phase per setting, {res['date']}.",
            "",
            "| phase | two-way ms | raster ms | two-way / raster speedup | of ideal |",
            "|---|---|---|---|---|",
            f"| branch layer fused | {ms['two_way fused']:.1f} | {ms['raster (fused phase)']:.1f} | {speed_f:.2f}x | "
            f"{speed_f / res['ideal']:.2f} |",
            f"| branch layer apart | {ms['two_way apart']:.1f} | {ms['raster (apart phase)']:.1f} | {speed_a:.2f}x | "
            f"{speed_a / res['ideal']:.2f} |",
            "",
            f"Fusing: {res['fusing_speedup']:.3f}x (two-way speedup fused / apart); ideal {res['ideal']:.2f}x. "
            f"Greedy codes fused == apart: {greedy_same}; seeded sampled: {sampled_same}; "
            f"fused pair set up and checked: {res['fused_path_taken']}.",
            "",
        ]
    )
    print(md)
    stem = "fused_branch_speed" + (f"_{a.tag}" if a.tag else "")
    a.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(a.out_dir / f"{stem}.json", (json.dumps(res, indent=2) + "\n").encode())
    atomic_write_bytes(a.out_dir / f"{stem}.md", md.encode())
    return res


if __name__ == "__main__":
    main()
