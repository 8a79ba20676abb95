"""GLM-Image (transformers GlmImageForConditionalGeneration) with the shipped recipe: three-axis
positions by rule, a preview grid decoded before the image, and the doctor's reference being
the model's own generation.

A tiny random model (tests/tiny.py ``glm_image``) at a small grid: greedy raster codes, preview
and image, equal transformers' own ``generate`` with ``image_grid_thw``; every decoding step
(two-way and raster, eager and on static caches) equals one teacher-forced pass on values; a
recipe with one-axis positions fails the doctor.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import flashar_adapt as fa
from flashar_adapt import decoding
from flashar_adapt.errors import InputError
from flashar_adapt.exactness import steps_match_teacher
from flashar_adapt.grid import Layout
from flashar_adapt.recipe import RecipeError
from tests import tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

GRID, PREVIEW = (4, 6), (2, 3)
IMAGE_START = 16384
# two prompts, the first left-padded: text then "<sop>H W<eop><sop>h w<eop>" (stand-in ids: the
# released tokenizer's are not known offline; the model's positions do not depend on them)
PROMPTS = torch.tensor([[0, 0, 170, 171, 172, 173, 174], [180, 181, 182, 183, 184, 185, 186]])
MASK = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)


def _own_generation(model, prompts, mask, grid, preview):
    """transformers' own greedy text-to-image generation, called as its processor and
    diffusers' pipeline call it: image_grid_thw lists the image grid first and the preview
    last; the preview is generated first. Returns (preview [B, h, w], image [B, H, W]) ids."""
    ids = torch.cat([prompts, torch.full((prompts.shape[0], 1), IMAGE_START)], 1)
    attn = torch.cat([mask.long(), torch.ones(prompts.shape[0], 1, dtype=torch.long)], 1)
    (H, W), (h, w) = grid, preview
    B = ids.shape[0]
    with torch.no_grad():
        out = type(model).generate(
            model,
            input_ids=ids,
            attention_mask=attn,
            image_grid_thw=torch.tensor([[1, H, W], [1, h, w]] * B),
            images_per_sample=torch.full((B,), 2),
            max_new_tokens=h * w + H * W,
            do_sample=False,
            eos_token_id=None,
        )
    new = out[:, ids.shape[1] :]
    return new[:, : h * w].view(B, h, w), new[:, h * w :].view(B, H, W)


@pytest.fixture(scope="module")
def own():
    """The tiny model's own generation, before any patch."""
    return _own_generation(tiny.glm_image(), PROMPTS, MASK, GRID, PREVIEW)


def _patched(recipe=None, seed: int = 5):
    model = tiny.glm_image()
    fa.patch(model, recipe or tiny.glm_image_recipe(GRID, PREVIEW))
    tiny.randomize(model.flashar, seed=seed)
    return model


# ---------------------------------------------------------------- the shipped recipe


def test_shipped_recipe_positions_cells_on_three_axes_after_a_preview():
    r = fa.load_recipe("glm-image")
    im = r.image
    assert (r.backend, im.positions, im.codebook_size, im.visual_token_offset) == ("glm-image", "grid", 16384, 0)
    assert im.before == (IMAGE_START,) and im.eol_token is None and r.condition.uncond == "none"
    assert im.grid == (32, 32) and im.preview(im.grid) == (16, 16)  # 1024x1024: 32x32 codes after 16x16
    assert r.tokenizer is None  # codes only: transformers has GLM-Image's VQ encoder, not a decoder


@pytest.mark.parametrize("size", [(1024, 1024), (1152, 768), (768, 1152), (2048, 512), (640, 1536), (96, 1000)])
def test_preview_side_is_the_processors_preview(size):
    """image.preview_side 16 gives the preview GLM-Image's processor asks for at that size."""
    from transformers.models.glm_image.processing_glm_image import GlmImageProcessor

    H, W, h, w = GlmImageProcessor._get_target_shape(None, *size)  # uses nothing of the instance
    assert fa.load_recipe("glm-image").image.preview((H, W)) == (h, w)


# ---------------------------------------------------------------- against transformers


@pytest.mark.numerics
def test_raster_greedy_equals_transformers_generate(own):
    """Greedy raster codes, preview and image, equal transformers' own generation with
    image_grid_thw: left-padded prompts, the shipped recipe at a small grid. Two-way greedy
    codes are teacher forcing's argmax given its own preview."""
    prev_ids, img_ids = own
    assert bool((prev_ids < 16384).all() and (img_ids < 16384).all())  # the tiny model chose only codes
    model = _patched()
    codes, preview = model.generate(PROMPTS, cond_mask=MASK, mode="raster", top_k=1, return_preview=True)
    assert torch.equal(preview, prev_ids) and torch.equal(codes, img_ids)
    # the preview first, then the image conditioned on it: the same preview, whatever the mode
    two, preview2 = model.generate(PROMPTS, cond_mask=MASK, top_k=1, return_preview=True)
    assert torch.equal(preview2, prev_ids)
    tf = fa.logits(model, PROMPTS, two, cond_mask=MASK, preview=preview2)
    assert torch.equal(tf.argmax(-1), two)


@pytest.mark.numerics
def test_one_axis_positions_diverge_from_transformers(own):
    """What the doctor must catch: the same recipe with one-axis positions runs without an error
    but generates other codes."""
    model = _patched(tiny.glm_image_recipe(GRID, PREVIEW, **{"image.positions": "sequence"}))
    codes, preview = model.generate(PROMPTS, cond_mask=MASK, mode="raster", top_k=1, return_preview=True)
    assert not torch.equal(codes, own[1])
    assert (codes != own[1]).float().mean() > 0.5


# ---------------------------------------------------------------- decoding is teacher forcing


@pytest.mark.numerics
@pytest.mark.parametrize("mode", ["two_way", "raster"])
def test_every_step_equals_teacher_forcing_on_values(mode):
    """Each step's logits, the codes and the preview forced, against one teacher-forced pass
    under the derived float32 bound (``exactness``): positions, caches and feeding order agree."""
    model = _patched()
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16384, (2, *GRID), generator=g)
    preview = torch.randint(0, 16384, (2, *PREVIEW), generator=g)
    found = steps_match_teacher(model, PROMPTS, codes, mode, cond_mask=MASK, preview=preview)
    assert found.ok, found.describe()
    assert len(found.errors) == (sum(GRID) - 1 if mode == "two_way" else GRID[0] * GRID[1])
    # another preview changes the image's logits: the image is conditioned on it
    other = fa.logits(model, PROMPTS, codes, mode=mode, cond_mask=MASK, preview=(preview + 1) % 16384)
    assert not torch.allclose(other, fa.logits(model, PROMPTS, codes, mode=mode, cond_mask=MASK, preview=preview))


def test_static_caches_decode_the_eager_codes(monkeypatch):
    """compile=True's static step (run uncompiled here) takes the same positions: same codes,
    preview and image, as eager decoding, in both modes."""
    model = _patched()
    monkeypatch.setattr(decoding.compiled, "compiled_step", lambda device_type, size: decoding.sampled_step)
    for mode in ("two_way", "raster"):
        eager = model.generate(PROMPTS, cond_mask=MASK, mode=mode, top_k=1, return_preview=True)
        static = model.generate(PROMPTS, cond_mask=MASK, mode=mode, top_k=1, return_preview=True, compile=True)
        assert all(torch.equal(a, b) for a, b in zip(static, eager))


def test_backbone_forwards_are_the_preview_then_h_plus_w_minus_1():
    model = _patched()
    calls = []
    hook = fa.context(model).layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        model.generate(PROMPTS, cond_mask=MASK, top_k=1)
        two_way = len(calls)
        calls.clear()
        state = fa.prefill(model, PROMPTS, cond_mask=MASK, top_k=1)  # the preview is decoded in prefill
        assert state.preview.shape == (2, *PREVIEW) and state.num_steps == sum(GRID) - 1
    finally:
        hook.remove()
    assert two_way == PREVIEW[0] * PREVIEW[1] + GRID[0] + GRID[1] - 1


def test_sampled_preview_follows_the_generators():
    """Sampling draws the preview's cells first, from each image's own generator."""
    model = _patched()

    def gens():
        return [torch.Generator().manual_seed(s) for s in (3, 4)]

    a = model.generate(PROMPTS, cond_mask=MASK, top_k=50, generator=gens(), return_preview=True)
    b = model.generate(PROMPTS, cond_mask=MASK, top_k=50, generator=gens(), return_preview=True)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    one = model.generate(PROMPTS[1:], cond_mask=MASK[1:], top_k=50, generator=gens()[1:], return_preview=True)
    assert torch.equal(one[0], a[0][1:]) and torch.equal(one[1], a[1][1:])


# ---------------------------------------------------------------- the doctor


def test_doctor_passes_the_shipped_recipe_and_fails_one_axis_positions():
    """The doctor's reference is the model's own generation: a recipe with one-axis positions,
    whose raster logits equal the model's own forward (which positions image tokens on one
    axis as well), fails it, naming image.positions."""
    model = tiny.glm_image()
    good = fa.check(model, tiny.glm_image_recipe(GRID, PREVIEW), grid=GRID)
    assert good.ok, str(good)
    assert "model's own generate" in good.item("raster").detail
    assert good.item("steps").status == "pass"  # preview + H + W - 1 forwards
    bad = fa.check(model, tiny.glm_image_recipe(GRID, PREVIEW, **{"image.positions": "sequence"}), grid=GRID)
    assert not bad.ok and bad.item("raster").status == "fail"
    assert bad.failed_keys == ["image.positions"]


# ---------------------------------------------------------------- positions by rule


@settings(max_examples=40, deadline=None)
@given(
    text=st.integers(1, 6),
    grids=st.lists(st.tuples(st.integers(1, 5), st.integers(1, 5)), min_size=1, max_size=3),
    pads=st.lists(st.integers(0, 3), min_size=1, max_size=3),
)
def test_grid_positions_place_each_cell_by_its_row_and_column(text, grids, pads):
    """Prompt slot s -> (s, s, s); cell (r, c) of a grid starting at P -> (P, P + r, P + c);
    the next grid starts at P + max(h, w); left padding shifts a row's positions; the
    one-axis rule is the slot index. Whatever the slots asked for, in any order."""
    *before, (H, W) = grids
    P = text + sum(h * w for h, w in before)
    lay = Layout(P, H, W, False, positions="grid", before_grids=tuple(before))
    want = [(s, s, s) for s in range(text)]
    start = text
    for h, w in (*before, (H, W)):
        want += [(start, start + r, start + c) for r in range(h) for c in range(w)]
        start += max(h, w)
    n_pad = torch.tensor([min(p, text - 1) for p in pads])
    slots = torch.randperm(lay.seq_len)
    got = lay.position_ids(slots, n_pad)
    assert got.shape == (3, len(pads), lay.seq_len)
    ref = torch.tensor(want).T[:, slots]
    assert torch.equal(got, (ref[:, None] - n_pad[None, :, None]).clamp(min=0))
    one = Layout(P, H, W, False).position_ids(slots, n_pad)
    assert torch.equal(one, (slots[None] - n_pad[:, None]).clamp(min=0))


# ---------------------------------------------------------------- bad input


def test_preview_inputs_are_checked():
    model = _patched()
    codes = torch.zeros(2, *GRID, dtype=torch.long)
    with pytest.raises(InputError, match=r"2x3 preview grid: pass its codes as preview="):
        fa.logits(model, PROMPTS, codes, cond_mask=MASK)
    with pytest.raises(InputError, match=r"preview codes must be \[B, 2, 3\]"):
        fa.logits(model, PROMPTS, codes, cond_mask=MASK, preview=torch.zeros(2, 3, 2, dtype=torch.long))
    with pytest.raises(InputError, match="codebook indices"):
        fa.prefill(model, PROMPTS, cond_mask=MASK, preview=torch.full((2, *PREVIEW), 16384))
    with pytest.raises(InputError, match="return_preview must be True or False"):
        model.generate(PROMPTS, cond_mask=MASK, return_preview=1)
    plain = tiny.hf_llama()
    fa.patch(plain, tiny.hf_llama_recipe())
    with pytest.raises(InputError, match="decodes no preview grid"):
        plain.generate(torch.tensor([[1, 2]]), return_preview=True)
    with pytest.raises(InputError, match="decodes no preview grid"):
        fa.prefill(plain, torch.tensor([[1, 2]]), preview=torch.zeros(1, 2, 2, dtype=torch.long))


def test_recipe_refuses_grid_positions_with_end_of_line_tokens_and_two_previews():
    with pytest.raises(RecipeError, match="image.positions: grid positions place cells") as e:
        tiny.hf_llama_recipe(eol=99, **{"image.positions": "grid"})
    assert e.value.key == "image.positions"
    with pytest.raises(RecipeError, match="image.positions: must be 'sequence' or 'grid'"):
        tiny.hf_llama_recipe(**{"image.positions": "2d"})
    with pytest.raises(RecipeError, match="image.preview_side: give the preview as image.preview_grid or"):
        fa.load_recipe("glm-image").replace(**{"image.preview_grid": [2, 2]})


# ---------------------------------------------------------------- training data and training


def test_data_free_shards_hold_the_preview_and_train_on_it(tmp_path):
    """Data-free shards sampled from the raster model hold both grids (the preview as the
    model decoded it before the image); the training loss reads them through the same
    teacher forcing as decoding, and a data folder without the preview is refused."""
    from flashar_adapt.datafree import TeacherSampling, sample_dataset
    from flashar_adapt.shards import ShardDataset, ShardWriter
    from flashar_adapt.training.config import TrainConfig
    from flashar_adapt.training.loop import TrainingError, check_data
    from flashar_adapt.training.loss import FlashARLoss

    model = _patched(tiny.glm_image_recipe(GRID, PREVIEW, **{"condition.prefix_len": 8}))
    text = {"a cat": [170, 171], "a dog on a mat": [180, 181, 182, 183]}
    sample_dataset(
        model,
        list(text),
        tmp_path / "d",
        sampling=TeacherSampling(top_k=1),
        text=text.get,
        batch_size=2,
        progress=False,
    )
    data = ShardDataset(tmp_path / "d")
    assert data.preview_grid == PREVIEW
    batch = data.get(torch.arange(2))
    codes, preview = model.generate(batch.cond, cond_mask=batch.cond_mask, mode="raster", top_k=1, return_preview=True)
    assert torch.equal(batch.preview, preview) and torch.equal(batch.codes, codes)
    check_data(data, fa.context(model).recipe)
    cfg = TrainConfig(model={"format": "transformers"}, recipe="glm-image", data="d", out_dir="o")
    loss = FlashARLoss(model, cfg, stage=1)
    out = loss(batch.cond, batch.codes, batch.cond_mask, batch.preview)
    assert torch.isfinite(out["loss"]) and out["loss"].requires_grad
    # the loss is the image's given this preview: another preview gives another loss
    other = loss(batch.cond, batch.codes, batch.cond_mask, (batch.preview + 1) % 16384)
    assert not torch.allclose(other["loss"], out["loss"])
    w = ShardWriter(tmp_path / "plain", GRID, 16384, "tokens")
    w.add(batch.codes, batch.cond, batch.cond_mask.sum(1))
    w.close()
    with pytest.raises(TrainingError, match="preview grid is none"):
        check_data(ShardDataset(tmp_path / "plain"), fa.context(model).recipe)
