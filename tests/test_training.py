"""Post-training: data shards, the two stages, resume after SIGKILL, 2 processes, NaN stop."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flashar_adapt.shards import DataError, ShardDataset, ShardWriter
from flashar_adapt.training import TrainConfig, TrainingError, build_model, load_checkpoint, train
from tests.numerics import assert_same_losses, assert_same_training
from tests.train_helpers import llamagen_run, structured_codes

# subprocesses import `tests.*` (a package) from the repository root
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _free_port() -> int:
    # a fixed port collides with any other run of this suite on the machine
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cli(cfg: Path, extra_env: dict | None = None, nproc: int = 1) -> subprocess.CompletedProcess:
    """The train command; with a FLASHAR_TEST_KILL_* variable in ``extra_env``, through
    tests/kill_switch.py, which installs that kill -9 first."""
    if nproc == 1:
        killing = any(k.startswith("FLASHAR_TEST_KILL_") for k in extra_env or {})
        main = "tests.kill_switch" if killing else "flashar_adapt.commands"
        cmd = [sys.executable, "-m", main, "train", "--config", str(cfg), "--no-progress"]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            str(nproc),
            "--master_port",
            str(_free_port()),
            "-m",
            "flashar_adapt.commands",
            "train",
            "--config",
            str(cfg),
            "--no-progress",
        ]
    return subprocess.run(cmd, env={**ENV, **(extra_env or {})}, capture_output=True, text=True, timeout=300)


def _ckpt_weights(run: Path) -> dict:
    return load_checkpoint(run / "checkpoint.pt")["trainable"]


def _initial_weights(cfg_path: Path) -> dict:
    cfg = TrainConfig.load(cfg_path)
    torch.manual_seed(cfg.seed)  # as train() does before building: the gate's random init is the run's
    return build_model(cfg).state_dict()


# ---------------------------------------------------------------- data


def test_shards_round_trip_and_order(tmp_path):
    codes, cls = structured_codes(50, 4, 48)
    w = ShardWriter(tmp_path, (4, 4), 48, "class", shard_size=16)
    w.add(codes[:30], cls[:30])
    w.add(codes[30:], cls[30:])
    w.close()
    ds = ShardDataset(tmp_path)
    assert len(ds) == 50 and ds.grid == (4, 4) and len(ds.manifest["shards"]) == 4
    order = ds.order(epoch=0, seed=1)
    assert sorted(order.tolist()) == list(range(50))
    assert torch.equal(order, ds.order(epoch=0, seed=1)) and not torch.equal(order, ds.order(epoch=1, seed=1))
    b = ds.get(order[:7])
    assert torch.equal(b.codes, codes[order[:7]]) and torch.equal(b.cond, cls[order[:7]])
    batches = ds.global_batches(8, seed=1)
    seen = [next(batches) for _ in range(7)]
    assert [s for s, _ in seen] == list(range(7))  # 6 full batches an epoch, then epoch 1
    resumed = ds.global_batches(8, seed=1, start_step=5)
    assert all(torch.equal(next(resumed)[1], seen[k][1]) for k in (5, 6))


def test_prompt_shards(tmp_path):
    w = ShardWriter(tmp_path, (2, 2), 10, "tokens", max_prompt_len=5)
    w.add(torch.zeros(3, 2, 2, dtype=torch.long), torch.tensor([[1, 2], [3, 4], [0, 5]]), torch.tensor([2, 2, 1]))
    w.close()
    b = ShardDataset(tmp_path).get(torch.tensor([2, 0]))
    assert b.cond.shape == (2, 5)
    assert b.cond_mask.tolist() == [[False] * 4 + [True], [False] * 3 + [True] * 2]
    assert b.cond[1, -2:].tolist() == [1, 2]


def test_bad_shards_are_clear_errors(tmp_path):
    with pytest.raises(DataError, match="outside the codebook|lie in"):
        ShardWriter(tmp_path / "a", (2, 2), 4, "class").add(torch.full((1, 2, 2), 4), torch.tensor([0]))
    with pytest.raises(DataError, match="no manifest"):
        ShardDataset(tmp_path / "nothing")
    w = ShardWriter(tmp_path / "b", (2, 2), 4, "class", shard_size=2)
    w.add(torch.zeros(4, 2, 2, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    w.close()
    shard = tmp_path / "b" / "shard-00001.safetensors"
    from safetensors.torch import save_file

    save_file(
        {"codes": torch.full((2, 2, 2), 9, dtype=torch.int16), "cond": torch.zeros(2, dtype=torch.int64)}, str(shard)
    )
    ds = ShardDataset(tmp_path / "b")
    ds.get(torch.tensor([0]))
    with pytest.raises(DataError, match="outside the codebook"):
        ds.get(torch.tensor([3]))
    shard.write_bytes(shard.read_bytes()[:40])
    with pytest.raises(DataError, match="truncated"):
        ShardDataset(tmp_path / "b").get(torch.tensor([3]))
    shard.unlink()
    with pytest.raises(DataError, match="missing"):
        ShardDataset(tmp_path / "b").get(torch.tensor([3]))


# ---------------------------------------------------------------- stages


def test_stage1_trains_branch_and_gate_only(tmp_path):
    cfg = TrainConfig.load(llamagen_run(tmp_path, stage1=30, stage2=0))
    base = build_model(cfg)
    model = train(cfg, progress=False)
    ctx = model.flashar.ctx
    for (n, p), (_, q) in zip(ctx.layers.named_parameters(), base.flashar.ctx.layers.named_parameters()):
        assert torch.equal(p, q), n
    assert torch.equal(model.output.weight, base.output.weight)
    assert not torch.equal(model.flashar.gate.net[2].weight, base.flashar.gate.net[2].weight)
    assert not torch.equal(
        model.flashar.branch_layers[0].attention.wqkv.weight, base.flashar.branch_layers[0].attention.wqkv.weight
    )
    m = _metrics(tmp_path / "run")
    assert len(m) == 30 and all(r["stage"] == 1 for r in m)
    first = sum(r["ce_fused"] for r in m[:5]) / 5
    last = sum(r["ce_fused"] for r in m[-5:]) / 5
    assert last < first - 0.3, (first, last)  # the branch learns the vertical structure
    assert abs(m[-1]["gate"] - 0.5) > 1e-4


@pytest.mark.parametrize("stage,lora", [(1, False), (2, False), (2, True)])
def test_param_groups_are_pure_and_set_trainable_freezes_the_rest(tmp_path, stage, lora):
    from flashar_adapt.adapters import lora_parameters
    from flashar_adapt.training import add_lora, backbone_parameters, param_groups, set_trainable

    cfg = TrainConfig.load(llamagen_run(tmp_path, stage1=1, stage2=1, lora=lora))
    model = build_model(cfg)
    if lora:
        add_lora(model)
    model.requires_grad_(False)
    groups = param_groups(model, cfg, stage)
    assert not any(p.requires_grad for p in model.parameters())  # building the groups changes nothing
    assert [g["name"] for g in groups] == ["flashar"] + ([] if stage == 1 else ["lora" if lora else "backbone"])
    if stage == 2:
        want = lora_parameters(model) if lora else backbone_parameters(model)
        assert [id(p) for p in groups[1]["params"]] == [id(p) for p in want]
    model.requires_grad_(True)
    set_trainable(model, groups)
    chosen = {id(p) for g in groups for p in g["params"]}
    assert [p.requires_grad for p in model.parameters()] == [id(p) in chosen for p in model.parameters()]


@pytest.mark.parametrize("lora", [False, True])
def test_stage2_full_and_lora(tmp_path, lora):
    cfg = TrainConfig.load(llamagen_run(tmp_path, stage1=3, stage2=4, lora=lora))
    base = build_model(cfg)
    model = train(cfg, progress=False)
    names = [n for n, _ in model.named_parameters()]
    if lora:
        assert any("lora_A" in n for n in names)
        wqkv = model.layers[0].attention.wqkv
        assert torch.equal(wqkv.base_layer.weight, base.layers[0].attention.wqkv.weight)  # base frozen
        assert not torch.equal(wqkv.lora_B["default"].weight, torch.zeros_like(wqkv.lora_B["default"].weight))
        assert not any("lora_" in n for n in names if n.startswith("flashar."))  # the branch stays plain
    else:
        moved = [torch.equal(p, q) for p, q in zip(model.layers.parameters(), base.layers.parameters())]
        assert not any(moved)
        groups = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["optimizer"]["param_groups"]
        assert [g["initial_lr"] for g in groups] == pytest.approx([3e-3, 3e-3 * 0.2])


@pytest.mark.parametrize("lora", [False, True])
def test_fused_distillation_targets_the_original_model(tmp_path, lora, monkeypatch):
    """w_kd_fused adds T^2 KL(original raster model || fused) to the loss, in both stages;
    in full stage 2 the teacher is a frozen copy of the original that never moves and never
    reaches the optimizer or the checkpoint."""
    from flashar_adapt.decoding import teacher_forward
    from flashar_adapt.training import FlashARLoss, frozen_teacher, kd_loss

    cfg = TrainConfig.load(
        llamagen_run(tmp_path, stage1=2, stage2=3, lora=lora, w_kd_fused=1.0, kd_fused_temperature=1.5)
    )
    base = build_model(cfg).eval()
    seen = []
    real_init = FlashARLoss.__init__

    def spy(self, model, cfg, stage, teacher=None):
        seen.append((stage, teacher is not None))
        real_init(self, model, cfg, stage, teacher)

    monkeypatch.setattr(FlashARLoss, "__init__", spy)
    model = train(cfg, progress=False)
    assert seen == [(1, False), (2, not lora)]  # LoRA's teacher is the model with adapters off
    m = _metrics(tmp_path / "run")
    assert all(r["kd_fused"] > 0 for r in m)
    ck = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert len(ck["optimizer"]["param_groups"]) == 2  # branch+gate and backbone/LoRA: no teacher
    assert not any(k.startswith("teacher") for k in ck["trainable"])

    codes, cls = structured_codes(4, 4, 48)
    teacher = None if lora else frozen_teacher(cfg, "cpu")
    loss = FlashARLoss(model, cfg, 2, teacher)
    assert "teacher" not in dict(loss.named_modules()) and all(
        not n.startswith("teacher") for n, _ in loss.named_parameters()
    )
    with torch.no_grad():
        got = loss(cls, codes)["kd_fused"]
        fused = teacher_forward(model, cls, codes, "two_way").fused
        want_t = teacher_forward(base, cls, codes, "raster").fused  # the original model, not the trained one
        moved = teacher_forward(model, cls, codes, "raster").fused
    assert not torch.allclose(want_t, moved, atol=1e-4)  # stage 2 did move the raster model
    # The loss recomputes the same logits with the same kernels on the same batch; only the final
    # mean over ~10^3 terms may sum in another order: float32 relative round-off ~sqrt(n)*eps32 < 1e-5.
    torch.testing.assert_close(got, kd_loss(fused, want_t, 1.5), rtol=1e-5, atol=1e-6)
    by_hand = (want_t / 1.5).softmax(-1) * ((want_t / 1.5).log_softmax(-1) - (fused / 1.5).log_softmax(-1))
    torch.testing.assert_close(got, by_hand.sum(-1).mean() * 1.5**2, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_fused_distillation_resumes_exactly(tmp_path):
    """The full-stage-2 teacher is rebuilt from the config on resume, so a run killed in
    stage 2 ends with the weights of an uninterrupted one."""
    ref = llamagen_run(tmp_path / "ref", stage1=2, stage2=4, w_kd_fused=1.0)
    assert _cli(ref).returncode == 0
    cfg = llamagen_run(tmp_path / "kill", stage1=2, stage2=4, w_kd_fused=1.0)
    r = _cli(cfg, {"FLASHAR_TEST_KILL_AT_STEP": "5"})  # after the stage-2 checkpoint at step 3
    assert r.returncode == -9, r.stderr[-2000:]
    r = _cli(cfg)
    assert r.returncode == 0, r.stderr[-2000:]
    a, b = _ckpt_weights(tmp_path / "ref" / "run"), _ckpt_weights(tmp_path / "kill" / "run")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- faults


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_gives_the_same_weights(tmp_path):
    ref_cfg = llamagen_run(tmp_path / "ref", stage1=5, stage2=4, lora=True)
    assert _cli(ref_cfg).returncode == 0  # same process setup (threads) as the killed runs
    ref = _ckpt_weights(tmp_path / "ref" / "run")
    cfg = llamagen_run(tmp_path / "kill", stage1=5, stage2=4, lora=True)
    # after an optimizer step (before its checkpoint), in the middle of writing a checkpoint,
    # right at the stage boundary, and during stage 2
    for env in (
        {"FLASHAR_TEST_KILL_AT_STEP": "2"},
        {"FLASHAR_TEST_KILL_IN_SAVE": "3"},
        {"FLASHAR_TEST_KILL_AT_STEP": "5"},
        {"FLASHAR_TEST_KILL_AT_STEP": "8"},
    ):
        r = _cli(cfg, env)
        assert r.returncode == -9, r.stderr[-2000:]
        ck = tmp_path / "kill" / "run" / "checkpoint.pt"
        if ck.exists():
            load_checkpoint(ck)  # what is there is always whole
    r = _cli(cfg)
    assert r.returncode == 0, r.stderr[-2000:]
    assert not list((tmp_path / "kill" / "run").glob(".*tmp"))  # stale partial writes cleaned up
    got = _ckpt_weights(tmp_path / "kill" / "run")
    assert got.keys() == ref.keys()
    diff = {k: (got[k] - ref[k]).abs().max().item() for k in ref}
    assert all(v == 0 for v in diff.values()), {k: v for k, v in diff.items() if v}
    steps = [m["step"] for m in _metrics(tmp_path / "kill" / "run")]
    assert steps == list(range(1, 10))  # the log has each step once, resumes included


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
    cfg = TrainConfig.load(llamagen_run(tmp_path, stage1=2, stage2=0))
    train(cfg, progress=False)
    ckpt = tmp_path / "run" / "checkpoint.pt"
    before = ckpt.read_bytes()
    from flashar_adapt import training

    real = training.FlashARLoss.forward

    def poisoned(self, *a, **k):
        out = real(self, *a, **k)
        out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(training.FlashARLoss, "forward", poisoned)
    cfg.stage1.steps = 6
    with pytest.raises(TrainingError, match="loss is nan at step 2") as e:
        train(cfg, progress=False, allow_config_change=True)
    assert "intact" in str(e.value)
    assert ckpt.read_bytes() == before


def test_checkpoint_from_another_recipe_is_refused(tmp_path):
    cfg = TrainConfig.load(llamagen_run(tmp_path, stage1=3, stage2=0))
    train(cfg, progress=False)
    state = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    state["recipe"] = "emu3-gen"
    torch.save(state, tmp_path / "run" / "checkpoint.pt")
    cfg.stage1.steps = 5
    with pytest.raises(TrainingError, match="emu3-gen"):
        train(cfg, progress=False, allow_config_change=True)


def test_config_errors(tmp_path):
    with pytest.raises(TrainingError, match="did you mean 'batch_size'"):
        TrainConfig.from_dict(
            {"model": {"backend": "llamagen"}, "recipe": "x", "data": "d", "out_dir": "o", "batch_sise": 3}
        )
    with pytest.raises(TrainingError, match="stage2.lr_scale"):
        TrainConfig.from_dict(
            {"model": {"backend": "llamagen"}, "recipe": "x", "data": "d", "out_dir": "o", "stage2": {"lr_scale": 1}}
        )
    with pytest.raises(TrainingError, match="kd_fused_temperature must be a number > 0"):
        TrainConfig.from_dict(
            {"model": {"backend": "llamagen"}, "recipe": "x", "data": "d", "out_dir": "o", "kd_fused_temperature": 0}
        )
    with pytest.raises(TrainingError, match="w_kd_fused must be a number >= 0"):
        TrainConfig.from_dict(
            {"model": {"backend": "llamagen"}, "recipe": "x", "data": "d", "out_dir": "o", "w_kd_fused": -1}
        )
    with pytest.raises(TrainingError, match="missing key 'data'"):
        TrainConfig.from_dict({"model": {"backend": "llamagen"}, "recipe": "x", "out_dir": "o"})


@pytest.mark.slow
@pytest.mark.numerics
def test_two_processes_match_one(tmp_path):
    """2 CPU processes (gloo) at the same global batch follow the 1-process trajectory.

    Each process sees half of every global batch and DDP averages the gradients, so the two
    runs compute the same math in another summation order. What that order can change, and so
    the bounds below (derived, not read off one CPU: AVX2 vs AVX512 kernels, 1 vs 2 processes):
    losses step by step (numerics.assert_same_losses) and weights per tensor, relative to how
    far training moved them (numerics.assert_same_training: Adam's scale-free update rules out an
    element-wise bound). A real fault (a process seeing the wrong half, gradients not averaged,
    a batch dropped) changes every step's update: far outside both bounds.
    """
    one = llamagen_run(tmp_path / "one", stage1=4, stage2=3)
    two = llamagen_run(tmp_path / "two", stage1=4, stage2=3)
    r1, r2 = _cli(one), _cli(two, nproc=2)
    assert r1.returncode == 0, r1.stderr[-2000:]
    assert r2.returncode == 0, r2.stderr[-3000:]
    m1, m2 = _metrics(tmp_path / "one" / "run"), _metrics(tmp_path / "two" / "run")
    assert [m["processes"] for m in m2] == [2] * 7 and [m["processes"] for m in m1] == [1] * 7
    assert_same_losses(m2, m1)
    assert_same_training(
        _ckpt_weights(tmp_path / "two" / "run"), _ckpt_weights(tmp_path / "one" / "run"), _initial_weights(one)
    )


def test_bf16_mixed_precision_runs_on_cpu(tmp_path):
    cfg = TrainConfig.load(llamagen_run(tmp_path, stage1=2, stage2=1, mixed_precision="bf16"))
    train(cfg, progress=False)
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in _metrics(tmp_path / "run"))
    cfg.mixed_precision = "fp16"
    with pytest.raises(TrainingError, match="GPU"):
        train(cfg, progress=False)


@pytest.mark.numerics
@pytest.mark.parametrize("family", ["llamagen", "transformers"])
def test_gradient_checkpointing_gives_the_same_training(tmp_path, family):
    from tests.train_helpers import hf_run

    make = llamagen_run if family == "llamagen" else hf_run
    plain = train(TrainConfig.load(make(tmp_path / "a", stage1=1, stage2=2)), progress=False)
    ck = TrainConfig.load(make(tmp_path / "b", stage1=1, stage2=2))
    ck.gradient_checkpointing = True
    model = train(ck, progress=False)
    assert model.flashar.ctx.gradient_checkpointing
    if family != "llamagen":  # the transformers layers checkpoint too (their own switch)
        assert any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    # Recomputing a block's forward replays the same kernels; only the order in which a weight's
    # gradient contributions are accumulated may change: two runs of the same math.
    assert_same_losses(_metrics(tmp_path / "b" / "run"), _metrics(tmp_path / "a" / "run"))
    init = _initial_weights(tmp_path / "a" / "cfg.yaml")
    assert_same_training(dict(model.named_parameters()), dict(plain.named_parameters()), init)


@pytest.mark.slow
@pytest.mark.parametrize("sync", [True, False])
def test_fsdp_on_cpu_is_refused_not_silently_unsharded(tmp_path, sync):
    """accelerate (1.15 here) shards with FSDP on accelerators only. Launched with an FSDP
    config on 2 CPU processes it either refuses in its plugin (sync_module_states: it looks for
    a GPU) or quietly trains unsharded DDP; both must end in one clear error and no checkpoint,
    not in a run the user believes is sharded. docs/training.md has the versions and errors."""
    import yaml

    shipped = yaml.safe_load((Path(__file__).parents[1] / "integrations" / "accelerate" / "fsdp.yaml").read_text())
    shipped.update(num_processes=2, mixed_precision="no", use_cpu=True)
    shipped["fsdp_config"].update(
        fsdp_transformer_layer_cls_to_wrap="TransformerBlock",
        fsdp_sync_module_states=sync,
        fsdp_cpu_ram_efficient_loading=False,
    )
    (tmp_path / "fsdp_cpu.yaml").write_text(yaml.safe_dump(shipped))
    cfg = llamagen_run(tmp_path / "r", stage1=2, stage2=1)
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(tmp_path / "fsdp_cpu.yaml"),
        "--main_process_port",
        str(_free_port()),
        "-m",
        "flashar_adapt.commands",
        "train",
        "--config",
        str(cfg),
        "--no-progress",
    ]
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=300, cwd=tmp_path / "r")
    assert r.returncode != 0
    assert "launched with FSDP on CPU, which accelerate" in r.stderr and "cpu.yaml (DDP over gloo)" in r.stderr
    assert ("accelerate refused" if sync else "would run MULTI_CPU instead") in r.stderr
    assert not (tmp_path / "r" / "run" / "checkpoint.pt").exists()
