"""patch/unpatch: the model comes back bit for bit; the branch, gate and proximity mask start as the method says."""

from __future__ import annotations

import pytest
import torch

import flashar_adapt as fa
from tests import tiny


@pytest.mark.parametrize("make", ["llamagen", "hf_llama"])
def test_unpatch_restores_the_model_bit_for_bit(make):
    if make == "llamagen":
        model, recipe = tiny.llamagen(grid=4), tiny.llamagen_recipe(grid=4)

        def run():
            return model(
                torch.randint(0, 48, (2, 15), generator=torch.Generator().manual_seed(0)), torch.tensor([1, 2])
            )[0]
    else:
        model, recipe = tiny.hf_llama(), tiny.hf_llama_recipe()

        def run():
            return model(torch.randint(0, 160, (2, 9), generator=torch.Generator().manual_seed(0))).logits

    before_sd = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before_out = run()
    had_generate = "generate" in model.__dict__
    fa.patch(model, recipe)
    assert any(k.startswith("flashar.") for k in model.state_dict())
    with pytest.raises(RuntimeError, match="already patched"):
        fa.patch(model, recipe)
    model.generate(torch.tensor([1, 2]) if make == "llamagen" else torch.tensor([[3, 4], [5, 6]]), top_k=1)
    fa.unpatch(model)
    after_sd = model.state_dict()
    assert list(after_sd) == list(before_sd)
    assert all(torch.equal(before_sd[k], after_sd[k]) for k in before_sd)
    with torch.no_grad():
        assert torch.equal(run(), before_out)
    assert ("generate" in model.__dict__) == had_generate
    assert not hasattr(model, "flashar")
    with pytest.raises(RuntimeError, match="not patched"):
        fa.unpatch(model)


def test_gate_starts_at_half_and_branch_starts_as_copy():
    model = tiny.llamagen(grid=4)
    fa.patch(model, tiny.llamagen_recipe(grid=4))
    ctx = model.flashar.ctx
    b = ctx.branch_index
    assert b == len(ctx.layers) - 4
    for (n1, p1), (n2, p2) in zip(ctx.layers[b].named_parameters(), model.flashar.branch_layers[0].named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2) and p1.data_ptr() != p2.data_ptr()
    assert torch.equal(model.flashar.vertical_head.proj.weight, model.output.weight)
    codes = torch.randint(0, 48, (2, 4, 4))
    tf = fa.teacher_forward(model, torch.tensor([1, 2]), codes)
    assert torch.allclose(tf.gate, torch.full_like(tf.gate, 0.5))


def test_fixed_gate_is_the_plain_average():
    model = tiny.llamagen(grid=4)
    fa.patch(model, tiny.llamagen_recipe(grid=4), fixed_gate=0.5)
    tiny.randomize(model.flashar, 4)
    tf = fa.teacher_forward(model, torch.tensor([1, 2]), torch.randint(0, 48, (2, 4, 4)))
    inner = 0.5 * (tf.horizontal + tf.vertical)
    torch.testing.assert_close(tf.fused[:, 1:, 1:], inner[:, 1:, 1:])
    torch.testing.assert_close(tf.fused[:, 0], tf.horizontal[:, 0])
    torch.testing.assert_close(tf.fused[:, 1:, 0], tf.vertical[:, 1:, 0])


def test_proximity_mask_shape():
    lay = fa.Layout(prefix_len=2, height=2, width=3, eol=True)
    m = lay.attention("two_way")
    d = lay.slot_diagonal
    # cell (1,0) on diagonal 1 sees (0,1) (diagonal 1, later in raster order? no: earlier) and not (0,2)
    s10, s01, s02 = lay.slot(1, 0), lay.slot(0, 1), lay.slot(0, 2)
    assert m[s10, s01] and not m[s10, s02]
    # (0,1) sees (1,0): same diagonal, later in raster order
    assert m[s01, s10]
    # end-of-line of row 0 lives on diagonal W = 3
    assert d[lay.slot(0, 3)] == 3
    # the prefix stays causal
    assert m[1, 0] and not m[0, 1]
    assert lay.num_steps_two_way == 4 and lay.num_steps_raster == 6
