"""Emu3.5-Image generated and trained as upstream (github.com/baaivision/Emu3.5) does.

- the shipped unconditional prompt is upstream's, re-derived here with a byte-level BPE over
  the rows of upstream's ``emu3.tiktoken`` that encoding it can touch (tests/data/);
- the default grid and the aspect-ratio table are upstream's Emu3.5-Image t2i ones;
- the last row ends with end-of-image, not end-of-line (``image.last_row_end``), and greedy
  two-way decoding still equals teacher forcing, raster logits the model's own, on every grid;
- dropout in train mode and ``rope_scaling`` (linear, dynamic) follow the official modelling
  file, checked against the official decoder math written out by hand below.
"""

from __future__ import annotations

import base64
import math
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import flashar_adapt as fa
from flashar_adapt.grid import Layout
from tests import tiny
from tests.numerics import assert_same_math

transformers = pytest.importorskip("transformers")
emu3p5 = pytest.importorskip("flashar_adapt.integrations.emu3p5")

DATA = Path(__file__).parent / "data"
BOS, BSS, BOI, IMG, EOI, EOL, BOV = 151849, 151746, 151852, 151851, 151853, 151846, 151854


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


# ---------------------------------------------------------------- the official decoder, by hand


def reference_logits(cfg: dict, sd: dict, ids: torch.Tensor, dropout=None) -> torch.Tensor:
    """Logits of baaivision/Emu3.5 src/emu3p5/modeling_emu3.py's Emu3ForCausalLM for ``ids`` [1, T]:
    pre-norm blocks, per-head RMSNorm on q and k before rotate-half RoPE (``rope_scaling``
    linear: positions / factor; dynamic: NTK base for T > max_position_embeddings), GQA,
    causal softmax, SiLU-gated MLP. ``dropout(x)``, if given, is applied where the official
    model applies ``attention_dropout`` in train mode, in its order: the embeddings, then per
    layer the attention probabilities, the attention output and the MLP output."""
    eps, theta, hd = cfg["rms_norm_eps"], cfg["rope_theta"], cfg["head_dim"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    drop = dropout or (lambda x: x)

    def rms(x, w):
        return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))

    def rot(x):
        return torch.cat([-x[..., hd // 2 :], x[..., : hd // 2]], -1)

    T = ids.shape[1]
    t = torch.arange(T).float()
    scaling = cfg.get("rope_scaling") or {}
    if scaling.get("type") == "linear":
        t = t / scaling["factor"]
    elif scaling.get("type") == "dynamic" and T > cfg["max_position_embeddings"]:
        f = scaling["factor"]
        theta = theta * (f * T / cfg["max_position_embeddings"] - (f - 1)) ** (hd / (hd - 2))
    inv = 1.0 / theta ** (torch.arange(0, hd, 2).float() / hd)
    ang = torch.outer(t, inv)
    cos, sin = torch.cat([ang, ang], -1).cos(), torch.cat([ang, ang], -1).sin()
    x = drop(sd["model.embed_tokens.weight"][ids])
    causal = torch.full((T, T), float("-inf")).triu(1)
    for i in range(cfg["num_hidden_layers"]):

        def p(n, i=i):
            return sd[f"model.layers.{i}.{n}.weight"]

        h = rms(x, p("input_layernorm"))
        q = rms((h @ p("self_attn.q_proj").T).view(1, T, nh, hd), p("self_attn.q_norm")).transpose(1, 2)
        k = rms((h @ p("self_attn.k_proj").T).view(1, T, nkv, hd), p("self_attn.k_norm")).transpose(1, 2)
        v = (h @ p("self_attn.v_proj").T).view(1, T, nkv, hd).transpose(1, 2)
        q, k = q * cos + rot(q) * sin, k * cos + rot(k) * sin
        k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
        a = drop(torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + causal, -1)) @ v
        x = x + drop(a.transpose(1, 2).reshape(1, T, nh * hd) @ p("self_attn.o_proj").T)
        h = rms(x, p("post_attention_layernorm"))
        m = torch.nn.functional.silu(h @ p("mlp.gate_proj").T) * (h @ p("mlp.up_proj").T)
        x = x + drop(m @ p("mlp.down_proj").T)
    return rms(x, sd["model.norm.weight"]) @ sd["lm_head.weight"].T


def _load(tmp_path, **over):
    cfg = tiny.emu3p5_official_config(**over)
    sd = tiny.emu3p5_state_dict(cfg)
    tiny.write_emu3p5_official(tmp_path / "ck", cfg, sd)
    return cfg, sd, emu3p5.load_emu3p5(tmp_path / "ck")


# ---------------------------------------------------------------- 1. the unconditional prompt

UNCOND_PROMPT = "<|extra_203|>You are a helpful assistant. USER:  ASSISTANT: <|extra_100|>"  # example_config_t2i.py
# src/tokenizer_emu3_ibq/tokenization_emu3.py: PAT_STR, and specials numbered from 151643
PAT = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""  # noqa: E501 - the upstream pattern, verbatim
SPECIALS = {
    s: 151643 + i
    for i, s in enumerate(["<|endoftext|>", "<|im_start|>", "<|im_end|>"] + [f"<|extra_{n}|>" for n in range(205)])
}


def _ranks() -> dict[bytes, int]:
    rows = (
        line.split()
        for line in (DATA / "emu3p5_uncond_prompt.tiktoken").read_text().splitlines()
        if line and not line.startswith("#")
    )
    return {base64.b64decode(tok): int(rank) for tok, rank in rows}


def _bpe(piece: bytes, ranks: dict[bytes, int]) -> list[int]:
    """tiktoken's byte-pair merge: repeatedly join the adjacent pair of lowest rank."""
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while True:
        pairs = [(ranks[a + b], i) for i, (a, b) in enumerate(zip(parts, parts[1:])) if a + b in ranks]
        if not pairs:
            return [ranks[p] for p in parts]
        _, i = min(pairs)
        parts[i : i + 2] = [parts[i] + parts[i + 1]]


def _encode(text: str, ranks) -> list[int]:
    """Emu3Tokenizer.encode(text, add_special_tokens=False): specials split out first (allowed_special="all")."""
    regex = pytest.importorskip("regex")  # \p{L}: transformers depends on it
    out: list[int] = []
    for chunk in regex.split("(" + "|".join(regex.escape(s) for s in SPECIALS) + ")", text):
        if chunk in SPECIALS:
            out.append(SPECIALS[chunk])
        elif chunk:
            for piece in regex.findall(PAT, chunk):
                out += _bpe(piece.encode(), ranks)
    return out


def test_uncond_ids_are_upstreams_tokenized_prompt():
    ids = list(fa.load_recipe("emu3.5-image").condition.uncond_ids)
    assert ids == [151849, 2610, 525, 264, 10950, 17847, 13, 13872, 25, 220, 35560, 3846, 2821, 25, 220, 151746]
    ranks = _ranks()
    assert _encode(UNCOND_PROMPT, ranks) == ids
    names = {v: k.encode() for k, v in SPECIALS.items()} | {v: k for k, v in ranks.items()}
    assert b"".join(names[i] for i in ids).decode() == UNCOND_PROMPT
    assert ids[0] == BOS and ids[-1] == BSS


# ---------------------------------------------------------------- 2. default grid and aspect ratios


def test_default_grid_and_aspect_ratio_table():
    im = fa.load_recipe("emu3.5-image").image
    assert im.grid == emu3p5.grid_for_aspect_ratio("default") == emu3p5.grid_for_aspect_ratio("4:3") == (55, 73)
    assert emu3p5.grid_for_aspect_ratio("1:1") == (64, 64) and im.variable_grid
    for name, (H, W) in emu3p5.ASPECT_RATIOS.items():
        if name == "default":
            continue
        w, h = map(int, name.split(":"))
        # upstream's table: W:H as named (within 2%, grids are integers) at ~1048576 px of 16x16-px tokens
        assert abs(W / H - w / h) <= 0.02 * w / h, name
        assert abs(H * W * 256 - 1048576) <= 0.03 * 1048576, name
    with pytest.raises(ValueError, match="grid up front"):
        emu3p5.grid_for_aspect_ratio("auto")
    with pytest.raises(ValueError, match="known: 4:3"):
        emu3p5.grid_for_aspect_ratio("5:4")


# ---------------------------------------------------------------- 3. end-of-image after the last row


@settings(max_examples=60, deadline=None)
@given(P=st.integers(0, 4), H=st.integers(1, 6), W=st.integers(1, 6))
def test_layout_without_last_eol_is_the_full_layout_minus_its_last_slot(P, H, W):
    full, cut = Layout(P, H, W, True), Layout(P, H, W, True, eol_last=False)
    L = cut.seq_len
    assert L == full.seq_len - 1 == P + H * W + H - 1
    assert torch.equal(cut.cell_slots, full.cell_slots) and int(cut.cell_slots.max()) == L - 1
    assert torch.equal(cut.eol_slots, full.eol_slots[:-1])
    assert torch.equal(cut.slot_diagonal, full.slot_diagonal[:L])
    for mode in ("raster", "two_way"):
        assert torch.equal(cut.attention(mode), full.attention(mode)[:L, :L])
    for h_cut, h_full in zip(cut.sources(), full.sources()):
        assert torch.equal(h_cut, h_full)
    fed = torch.cat([cut.fed_slots(t) for t in range(cut.num_steps_two_way)])
    assert sorted(fed.tolist()) == list(range(P, L))  # every image slot fed exactly once
    steps = (fa.decoding.schedule(x, "two_way", "cpu").steps for x in (cut, full))
    for a, b in zip(*steps):
        assert all(
            torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
            for x, y in zip(vars(a).values(), vars(b).values())
        )
    assert Layout(P, H, W, False, eol_last=False).seq_len == P + H * W  # no end-of-line at all: nothing to drop


def _upstream_sequence(prompt: list[int], codes: torch.Tensor) -> list[int]:
    """What upstream feeds for an image (src/utils/input_utils.py format_image_string; the
    logits processor forces the same): BOI "H*W" IMG, rows joined by EOL, EOI."""
    H, W = codes.shape
    digits = lambda n: [15 + int(c) for c in str(n)]  # noqa: E731  '0'..'9' = 15..24
    rows = [[BOV + int(c) for c in row] for row in codes]
    body = [t for i, row in enumerate(rows) for t in row + ([EOL] if i < H - 1 else [])]
    return prompt + [BOI] + digits(H) + [9] + digits(W) + [IMG] + body + [EOI]


@pytest.fixture(scope="module")
def patched(tmp_path_factory):
    cfg, sd, model = _load(tmp_path_factory.mktemp("emu"))
    fa.patch(model, grid=[4, 4])  # the default 55x73 needs more positions than the tiny config's 2048
    return model


@pytest.mark.numerics
@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    H=st.integers(1, 4),
    W=st.integers(1, 4),
    T=st.integers(1, 3),
    cfg=st.sampled_from([1.0, 5.0]),
    seed=st.integers(0, 2**16),
)
def test_two_way_and_raster_follow_upstreams_sequence(patched, H, W, T, cfg, seed):
    g = torch.Generator().manual_seed(seed)
    prompt = [BOS] + torch.randint(30, 3000, (T,), generator=g).tolist() + [BSS]
    cond = torch.tensor([prompt])  # with CFG: shorter than the 16-id unconditional prompt, so left-padded
    codes = patched.generate(cond, grid=(H, W), top_k=1, cfg_scale=cfg)
    # greedy two-way == teacher forcing
    assert torch.equal(fa.logits(patched, cond, codes, cfg_scale=cfg).argmax(-1), codes)
    seq = _upstream_sequence(prompt, codes[0])
    with torch.no_grad():
        own = patched(input_ids=torch.tensor([seq])).logits[0]
    P = len(seq) - (H * W + H - 1) - 1  # prompt + BOI "H*W" IMG
    cell_slots = Layout(P, H, W, True, eol_last=False).cell_slots.flatten()
    raster = fa.logits(patched, cond, codes, mode="raster")[0].reshape(H * W, -1)
    # same decoder, same inputs at the same positions; only the mask form differs (additive 4D vs causal)
    assert_same_math(raster, own[cell_slots - 1, BOV:], layers=5, width=32)
    assert patched.flashar.ctx.layout(P, (H, W)).seq_len == len(seq) - 1  # the layout stops at the last code
    assert emu3p5.image_token_ids(patched, codes)[0].tolist() == seq[len(prompt) :]  # what upstream decodes


def test_recipe_field_last_row_end():
    r = fa.load_recipe("emu3.5-image")
    assert r.image.last_row_end == EOI and r.eol and not r.eol_last
    assert fa.load_recipe("emu3-gen").eol_last  # Emu3 writes an end-of-line after every row
    with pytest.raises(fa.RecipeError, match="image.last_row_end.*needs image.eol_token"):
        r.replace(**{"image.eol_token": None})
    with pytest.raises(fa.RecipeError, match="image.last_row_end"):
        r.replace(**{"image.last_row_end": -1})


@pytest.mark.numerics
def test_doctor_reads_the_upstream_sequence(patched):
    rep = fa.check(patched, grid=[2, 3])
    assert rep.ok, rep
    assert rep.item("raster").status == "pass"  # patched raster logits == the decoder's own, without the last eol
    assert "row-end token at" in rep.item("layout").detail


# ---------------------------------------------------------------- 4. training fidelity: dropout, rope scaling


class _Masks:
    """A deterministic stand-in for F.dropout: the n-th call draws its keep-mask from seed n,
    so two computations that drop the same tensors in the same order drop them identically."""

    def __init__(self):
        self.calls = 0

    def __call__(self, x, p=0.5, training=True, inplace=False):
        if not training or p == 0:
            return x
        g = torch.Generator().manual_seed(1000 + self.calls)
        self.calls += 1
        return x * (torch.rand(x.shape, generator=g) >= p).to(x.dtype) / (1 - p)


@pytest.mark.numerics
def test_dropout_in_train_mode_is_the_official_one(tmp_path, monkeypatch):
    cfg, sd, model = _load(tmp_path, attention_dropout=0.3)
    model.config._attn_implementation = "eager"  # SDPA drops inside its kernel; eager calls F.dropout
    ids = torch.tensor([[BOS, 30, 31, BOI, 17, 9, 18, IMG, BOV + 7, BOV + 99, EOL]])
    with torch.no_grad():
        assert_same_math(model(input_ids=ids).logits, reference_logits(cfg, sd, ids), layers=5, width=32)  # eval: none
        model.train()
        ours, theirs = _Masks(), _Masks()
        monkeypatch.setattr(torch.nn.functional, "dropout", ours)
        got = model(input_ids=ids).logits
        monkeypatch.setattr(torch.nn.functional, "dropout", theirs)
        ref = reference_logits(cfg, sd, ids, dropout=lambda x: theirs(x, 0.3))
    assert ours.calls == theirs.calls == 1 + 3 * cfg["num_hidden_layers"]
    assert_same_math(got, ref, layers=5, width=32)  # same masks at the same places; summation order only
    again = _Masks()
    monkeypatch.setattr(torch.nn.functional, "dropout", again)
    with torch.no_grad():
        positional = model.model(ids).last_hidden_state  # input_ids passed positionally: dropped the same way
    assert again.calls == ours.calls and (model.lm_head(positional) - got).abs().max() == 0


def test_dropout_reaches_the_branch_and_stops_in_eval(tmp_path, monkeypatch):
    cfg, sd, model = _load(tmp_path, attention_dropout=0.3)
    fa.patch(model, grid=[2, 2])
    cond, codes = torch.tensor([[BOS, 30, BSS]]), torch.tensor([[[1, 2], [3, 4]]])
    masks = _Masks()
    monkeypatch.setattr(torch.nn.functional, "dropout", masks)
    fa.teacher_forward(model, cond, codes)
    assert masks.calls == 0  # eval mode
    model.train()
    fa.teacher_forward(model, cond, codes)
    # embeddings once, 2 output dropouts per backbone layer and per branch copy (SDPA drops internally)
    assert masks.calls == 1 + 2 * cfg["num_hidden_layers"] + 2 * len(model.flashar.branch_layers)
    assert all(b.output_dropout.training for layer in model.flashar.branch_layers for b in (layer.self_attn, layer.mlp))


def test_config_defaults_are_the_official_ones(tmp_path):
    cfg = tiny.emu3p5_official_config()
    for k in ("attention_dropout", "max_position_embeddings", "rope_scaling"):
        del cfg[k]
    c = emu3p5.config_from_official(cfg)
    assert c.attention_dropout == 0.1 and c.max_position_embeddings == 9216  # configuration_emu3.py defaults
    for bad in ({"type": "yarn", "factor": 2.0}, {"type": "linear", "factor": 1.0}, {"type": "linear"}):
        with pytest.raises(ValueError, match="rope_scaling"):
            emu3p5.config_from_official(tiny.emu3p5_official_config(rope_scaling=bad))


@pytest.mark.numerics
@pytest.mark.parametrize("kind,T", [("linear", 11), ("dynamic", 11), ("dynamic", 6)])
def test_rope_scaling_matches_the_official_rotary_embeddings(tmp_path, kind, T):
    # max_position_embeddings 8: T = 11 positions engage dynamic NTK, T = 6 stays at the plain base
    cfg, sd, model = _load(tmp_path, rope_scaling={"type": kind, "factor": 4.0}, max_position_embeddings=8)
    ids = torch.randint(0, 2000, (1, T), generator=torch.Generator().manual_seed(T))
    with torch.no_grad():
        got = model(input_ids=ids).logits
    ref = reference_logits(cfg, sd, ids)
    plain = reference_logits({**cfg, "rope_scaling": None}, sd, ids)
    assert_same_math(got, ref, layers=5, width=32)  # summation order only
    changed = kind == "linear" or T > 8
    assert ((ref - plain).abs().max() > 1e-2) == changed  # the check can tell scaled from unscaled
    out = emu3p5.save_emu3p5(model, tmp_path / "again")
    again = emu3p5.load_emu3p5(out)
    assert (again(input_ids=ids).logits - got).abs().max() == 0  # rope_scaling survives export
