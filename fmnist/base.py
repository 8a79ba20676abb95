"""Train the raster base model from scratch: LlamaGen architecture, class-conditional.

Resumable: a checkpoint (model, optimizer, RNG, step) is written atomically every
``ckpt_every`` steps; the same command continues from it. Test NLL on a fixed subset is
logged every ``eval_every`` steps (the learning curve ships with the weights); the best
weights are kept, and training stops early when the test NLL stops improving.
"""

from __future__ import annotations

import io
import json
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from flashar_adapt.files import atomic_save_safetensors, atomic_write_bytes
from flashar_adapt.integrations.llamagen import ModelArgs, Transformer

from .config import base_config

GRID = 14
CODEBOOK = 256


def base_args(**over) -> ModelArgs:
    """The base model's ModelArgs: ``configs/base.yaml`` (``model:``), ``over`` replacing fields."""
    return ModelArgs(**{**base_config()["model"], **over})


@torch.no_grad()
def test_nll_bits(model: Transformer, codes: torch.Tensor, labels: torch.Tensor, batch: int = 500) -> float:
    """Exact raster NLL in bits per token (teacher forcing, eval mode)."""
    was = model.training
    model.eval()
    total = 0.0
    for i in range(0, codes.shape[0], batch):
        c = codes[i : i + batch].flatten(1)
        logits, _ = model(c[:, :-1], labels[i : i + batch])
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), c.reshape(-1), reduction="sum").item()
    model.train(was)
    return total / codes.numel() / math.log(2)


def train_base(
    codes: torch.Tensor,
    labels: torch.Tensor,
    test_codes: torch.Tensor,
    test_labels: torch.Tensor,
    out: Path,
    *,
    steps: int = 6000,
    batch: int = 64,
    lr: float = 1e-3,
    warmup: int = 200,
    eval_every: int = 100,
    ckpt_every: int = 100,
    patience: int = 4,
    seed: int = 0,
    args: ModelArgs | None = None,
    progress: bool = True,
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    args = args or base_args()
    (out / "model_args.json").write_text(json.dumps(asdict(args), indent=1))  # weights are useless without it
    torch.manual_seed(seed)
    model = Transformer(args)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    )
    state = {"step": 0, "best": float("inf"), "best_step": 0, "bad_evals": 0}
    ck = out / "base_ckpt.pt"
    if ck.is_file():
        s = torch.load(ck, map_location="cpu", weights_only=True)
        model.load_state_dict(s["model"])
        opt.load_state_dict(s["optimizer"])
        sched.load_state_dict(s["scheduler"])
        torch.set_rng_state(s["rng"])
        state = s["state"]
    log = out / "base_train_log.jsonl"
    if log.is_file():  # drop entries past the checkpoint (they are redone)
        keep = [ln for ln in log.read_text().splitlines() if ln and json.loads(ln)["step"] <= state["step"]]
        atomic_write_bytes(log, ("\n".join(keep) + ("\n" if keep else "")).encode())
    n = codes.shape[0]
    per_epoch = n // batch
    g = torch.Generator()
    model.train()
    bar = None
    if progress:
        bar = tqdm(total=steps, initial=state["step"], desc="base model", dynamic_ncols=True)
    t0 = time.perf_counter()
    while state["step"] < steps and state["bad_evals"] < patience:
        step = state["step"]
        epoch, pos = divmod(step, per_epoch)
        g.manual_seed(seed * 1000 + epoch)
        idx = torch.randperm(n, generator=g)[pos * batch : (pos + 1) * batch]
        c = codes[idx].flatten(1)
        logits, loss = model(c[:, :-1], labels[idx], targets=c)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        state["step"] = step = step + 1
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item() / math.log(2):.3f} bits", best=f"{state['best']:.3f}")
        rec = None
        if step % eval_every == 0 or step == steps:
            nll = test_nll_bits(model, test_codes, test_labels)
            rec = {
                "step": step,
                "epoch": round(step / per_epoch, 3),
                "train_bits": round(loss.item() / math.log(2), 4),
                "test_bits": round(nll, 4),
                "sec": round(time.perf_counter() - t0, 1),
            }
            if nll < state["best"] - 1e-3:
                state.update(best=nll, best_step=step, bad_evals=0)
                atomic_save_safetensors({k: v.half() for k, v in model.state_dict().items()}, out / "base.safetensors")
            else:
                state["bad_evals"] += 1
            with open(log, "a") as f:
                f.write(json.dumps(rec) + "\n")
        if step % ckpt_every == 0 or step == steps or state["bad_evals"] >= patience:
            buf = io.BytesIO()
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "scheduler": sched.state_dict(),
                    "rng": torch.get_rng_state(),
                    "state": state,
                },
                buf,
            )
            atomic_write_bytes(ck, buf.getvalue())
    if bar is not None:
        bar.close()
    return state
