"""Negative prompts: ``generate(cond, negative=ids)`` builds the CFG unconditional branch from
the given ids for that call. Against transformers' Emu3 generation with ``negative_prompt_ids``
(its UnbatchedClassifierFreeGuidanceLogitsProcessor) and the model card's
``prefix_allowed_tokens_fn``; two-way and raster against teacher forcing on values."""

from __future__ import annotations

import pytest
import torch

import flashar_adapt as fa
from flashar_adapt.exactness import step_tol, steps_match_teacher
from flashar_adapt.numerics import EPS32
from tests import tiny

# emu3-gen's ids (recipes/emu3-gen.yaml cites their sources)
BOS, EOS, PAD = 151849, 151850, 151643
IMG, EOI, EOL, EOF = 151851, 151853, 151846, 151847
V0, K = 151854, 32768
H, W = 2, 3
S = 3.0
COND = [[BOS, 30, 31, 32], [BOS, 60, 61, 62]]
NEG = [[BOS, 40, 41], [BOS, 50, 51]]


def _emu3(seed: int = 0):
    model = tiny.emu3(seed=seed)
    r = fa.load_recipe("emu3-gen").replace(**{"flashar.branch_layer": -2, "flashar.branch_depth": 2})
    fa.patch(model, r, grid=[H, W])
    tiny.randomize(model.flashar, seed=11)  # a branch and gate that are not the identity
    return model


def _allowed(batch_id, input_ids):
    """The model card's prefix_allowed_tokens_fn (transformers docs/source/en/model_doc/emu3.md),
    in its order, with the recipe's ids: an end-of-line after every W codes, then EOF, EOI, EOS,
    then padding; visual ids everywhere else."""
    start = int(torch.nonzero(input_ids == IMG)[0, 0])
    offset = input_ids.shape[0] - start
    body = (W + 1) * H
    if offset % (W + 1) == 0:
        return [EOL]
    ends = {body + 1: EOF, body + 2: EOI, body + 3: EOS}
    if offset in ends:
        return [ends[offset]]
    return [PAD] if offset > body + 3 else list(range(V0, V0 + K))


def _header() -> list[int]:
    return [151852, 15 + H, 9, 15 + W, IMG]  # <|image start|> "2" "*" "3" <|image token|>


def _transformers(model, cond, neg):
    """transformers' own greedy CFG generation: (codes [B, H, W], scores of the code steps [B, H*W, K],
    the generated sequences)."""
    prompt = torch.tensor([c + _header() for c in cond])
    out = type(model).generate(  # transformers' own: patch replaced the instance's generate
        model,
        input_ids=prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=(W + 1) * H + 3,
        do_sample=False,
        guidance_scale=S,
        negative_prompt_ids=torch.tensor(neg),
        negative_prompt_attention_mask=torch.ones(len(neg), len(neg[0]), dtype=torch.long),
        prefix_allowed_tokens_fn=_allowed,
        output_scores=True,
        return_dict_in_generate=True,
    )
    gen = out.sequences[:, prompt.shape[1] :]
    rows = gen[:, : (W + 1) * H].reshape(len(cond), H, W + 1)
    assert bool((rows[:, :, -1] == EOL).all()) and gen[:, (W + 1) * H :].tolist() == [[EOF, EOI, EOS]] * len(cond)
    code_steps = [r * (W + 1) + c for r in range(H) for c in range(W)]
    scores = torch.stack([out.scores[i][:, V0 : V0 + K] for i in code_steps], 1)
    return rows[:, :, :W] - V0, scores, out.sequences


def _full_logits(model, ids: list[int], seq: torch.Tensor) -> torch.Tensor:
    """Full-vocabulary logits predicting each generated token of ``seq`` after ``ids``, from the
    model's own forward (their magnitudes and log-sum-exps size the bound)."""
    x = torch.cat([torch.tensor(ids), seq[:-1]])[None]
    with torch.no_grad():
        return model(input_ids=x).logits[0, len(ids) - 1 :].float()


@pytest.mark.numerics
def test_negative_prompt_equals_transformers_emu3_cfg():
    """Greedy raster CFG with a negative prompt per image == transformers' Emu3 generate with
    negative_prompt_ids and guidance_scale and the model card's prefix_allowed_tokens_fn: the same
    codes, and guided logits equal up to one constant per row. transformers guides in log-softmax
    space, s*lsm(c) + (1-s)*lsm(u) = u + s(c - u) - [s*LSE(c) + (1-s)*LSE(u)], the project on raw
    logits u + s(c - u): the difference is one constant per row (the LSEs over the full vocabulary).
    Bound: each side computes c and u within the float32 reordering bound of a step (exactness.step_tol,
    relative to max |c| and max |u|), plus the roundings of log-softmax and the combination
    (a few eps32 of s*(|c| + LSE(c)) + |1-s|*(|u| + LSE(u))); the spread of a row's difference is at
    most twice the sum."""
    model = _emu3()
    codes_hf, scores, seqs = _transformers(model, COND, NEG)
    state = fa.prefill(model, torch.tensor(COND), mode="raster", cfg_scale=S, top_k=1, negative=torch.tensor(NEG))
    guided = []
    while not state.done:
        fa.step(state)
        guided.append(state.logits[:, 0])
    assert torch.equal(state.image(), codes_hf), (state.image().tolist(), codes_hf.tolist())
    assert torch.equal(model.generate(torch.tensor(COND), mode="raster", cfg_scale=S, top_k=1, negative=NEG), codes_hf)
    diff = scores.double() - torch.stack(guided, 1).double()  # [B, H*W, K]
    spread = float((diff.amax(-1) - diff.amin(-1)).max())
    prompt_len = len(COND[0]) + len(_header())
    tol = step_tol(model, "raster", prompt_len + (W + 1) * H)
    err = 0.0
    for b in range(len(COND)):
        seq = seqs[b, prompt_len:]
        c = _full_logits(model, COND[b] + _header(), seq)
        u = _full_logits(model, NEG[b], seq)
        mc, mu = float(c.abs().max()), float(u.abs().max())
        lc, lu = float(torch.logsumexp(c, -1).abs().max()), float(torch.logsumexp(u, -1).abs().max())
        err = max(err, tol * (S * mc + abs(1 - S) * mu) + 8 * EPS32 * (S * (mc + lc) + abs(1 - S) * (mu + lu)))
    assert spread <= 2 * err, f"spread {spread:.3g} > bound {2 * err:.3g}"
    assert 2 * err < 1e-3 * float(scores.abs().max())  # tight enough to see a wrong branch
    # the recipe's default branch (BOS alone, no header) is transformers' with negative = [BOS]
    codes_bos, _, _ = _transformers(model, COND, [[BOS]] * 2)
    assert torch.equal(model.generate(torch.tensor(COND), mode="raster", cfg_scale=S, top_k=1), codes_bos)
    assert not torch.equal(codes_bos, codes_hf)  # the negative prompt matters on this model


@pytest.mark.numerics
@pytest.mark.parametrize("mode", ["two_way", "raster"])
def test_negative_prompt_steps_equal_teacher_forcing(mode):
    """Decoding with a (left-padded) negative prompt is teacher forcing done incrementally: each
    step's guided logits equal fa.logits(..., negative=...) within the derived bound, and the
    negative changes them (the branch is really the one given)."""
    model = _emu3()
    cond = torch.tensor(COND)
    neg = torch.tensor([[0, BOS, 40, 41], [BOS, 50, 51, 52]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]).bool()
    codes = torch.randint(0, K, (2, H, W), generator=torch.Generator().manual_seed(2))
    found = steps_match_teacher(model, cond, codes, mode, cfg_scale=S, negative=neg, negative_mask=mask)
    assert found.ok, found.describe()
    assert found.bound < 1e-3 * found.scale
    with_neg = fa.logits(model, cond, codes, mode, cfg_scale=S, negative=neg, negative_mask=mask)
    default = fa.logits(model, cond, codes, mode, cfg_scale=S)
    assert float((with_neg - default).abs().max()) > 100 * found.bound


def test_one_negative_for_the_batch_left_padding_and_a_recipe_without_uncond():
    """A 1-D negative is every row's; a left-padded row decodes as it does alone; a prompt recipe
    with no unconditional prefix (condition.uncond: none) gets one from the negative."""
    model = _emu3()
    cond = torch.tensor(COND)
    kw = dict(mode="raster", cfg_scale=S, top_k=1)
    one = model.generate(cond, negative=torch.tensor(NEG[0]), **kw)
    assert torch.equal(one, model.generate(cond, negative=torch.tensor([NEG[0]] * 2), **kw))
    padded = model.generate(
        cond, negative=torch.tensor([[0, BOS, 40], NEG[1]]), negative_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]), **kw
    )
    assert torch.equal(padded[0], model.generate(cond[:1], negative=torch.tensor([[BOS, 40]]), **kw)[0])
    assert torch.equal(padded[1], model.generate(cond[1:], negative=torch.tensor([NEG[1]]), **kw)[0])
    m = tiny.hf_llama()
    fa.patch(m, tiny.hf_llama_recipe(grid=(2, 3), **{"condition.uncond": "none"}))
    prompts = torch.tensor([[1, 5, 6], [1, 8, 9]])
    with pytest.raises(fa.FlashARError, match="no negative prompt was given"):
        m.generate(prompts, cfg_scale=2.0)
    assert m.generate(prompts, cfg_scale=2.0, negative=[1, 7], mode="raster", top_k=1).shape == (2, 2, 3)


def test_negative_prompts_are_checked_like_prompts():
    model = _emu3()
    cond = torch.tensor(COND)
    cases = [
        (dict(negative=NEG), "cfg_scale != 1"),  # no guidance: the negative would do nothing
        (dict(negative=torch.tensor(NEG).float(), cfg_scale=2.0), "negative must be a LongTensor"),
        (dict(negative=torch.zeros(2, 0, dtype=torch.long), cfg_scale=2.0), "negative is empty"),
        (dict(negative=[[BOS, 40], [BOS]], cfg_scale=2.0), "rows of one length"),
        (dict(negative=[[BOS, 40]] * 3, cfg_scale=2.0), "1 or 2 rows"),
        (dict(negative=[BOS, 200000], cfg_scale=2.0), r"negative token ids must be in \[0, 184622\)"),
        (dict(negative=[BOS] * 513, cfg_scale=2.0), "at most 512"),
        (dict(negative=NEG, negative_mask=[[1, 1, 0], [1, 1, 1]], cfg_scale=2.0), "left padding"),
        (dict(negative=NEG, negative_mask=[[1, 1], [1, 1]], cfg_scale=2.0), r"negative_mask must have shape \(2, 3\)"),
        (dict(negative_mask=[[1, 1, 1]], cfg_scale=2.0), "without negative"),
    ]
    for kw, msg in cases:
        with pytest.raises(fa.FlashARError, match=msg):
            model.generate(cond, **kw)
        with pytest.raises(fa.FlashARError, match=msg):
            fa.prefill(model, cond, **kw)
    with pytest.raises(fa.FlashARError, match="cfg_scale != 1"):
        fa.logits(model, cond, torch.zeros(2, H, W, dtype=torch.long), negative=NEG)
    with pytest.raises(fa.FlashARError, match="uncond=True"):
        fa.teacher_forward(model, cond, torch.zeros(2, H, W, dtype=torch.long), negative=NEG)
    llamagen = tiny.llamagen(grid=4)
    fa.patch(llamagen, tiny.llamagen_recipe(grid=4))
    with pytest.raises(fa.FlashARError, match=r"conditioned on class \(condition.kind\)"):
        llamagen.generate(torch.tensor([3, 7]), cfg_scale=2.0, negative=[1, 2])
