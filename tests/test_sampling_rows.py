"""Per-image randomness: one generator per image makes an image's codes independent of its
batchmates; ``draw`` is a pure function of (logits, uniforms, settings) that samples each
code with its probability; ``index_seed`` gives every sample index its own 32-bit seed."""

from __future__ import annotations

import pytest
import torch

import flashar_adapt as fa
from flashar_adapt.errors import InputError
from flashar_adapt.sampling import Sampling, draw, filtered_probs, index_generators, index_seed
from tests import tiny


# a class-conditional and a prompt family (left-padded prompts under a mask): the drawing is
# the same code for every family, the conditions are what differ
@pytest.fixture(scope="module", params=["llamagen-c2i", "llama"])
def family(request):
    return (request.param, *tiny.patched_family(request.param))


@pytest.mark.numerics
@pytest.mark.parametrize("mode", ["two_way", "raster"])
def test_an_image_depends_on_its_own_generator_not_on_its_batchmates(family, mode):
    """Decoded in one batch or one by one, each image gets the same codes from its generator.
    The logits of a row differ between batch sizes by the round-off of batched products
    (~1e-6 of their scale on these random models); a code flips only when its uniform lies
    within that of a boundary of the cumulative distribution: odds of order 1e-6 per cell."""
    name, model, cond, mask = family
    cfg = 2.0 if fa.decoding.has_uncond(model.flashar.ctx) else 1.0
    kw = dict(mode=mode, cfg_scale=cfg, top_k=20, top_p=0.95, temperature=1.3)
    gens = index_generators(7, range(cond.shape[0]))
    together = model.generate(cond, generator=gens, cond_mask=mask, **kw)
    for i in range(cond.shape[0]):
        alone = model.generate(
            cond[i : i + 1],
            generator=index_generators(7, [i]),
            cond_mask=None if mask is None else mask[i : i + 1],
            **kw,
        )
        assert torch.equal(alone[0], together[i]), f"{name}: image {i}"
    other = model.generate(cond, generator=index_generators(8, range(cond.shape[0])), cond_mask=mask, **kw)
    assert not torch.equal(other, together)  # the seed matters


def test_greedy_draws_nothing_and_ignores_the_generators():
    model = fa.patch(tiny.llamagen(grid=4), tiny.llamagen_recipe())
    cond = torch.tensor([1, 2, 3])
    greedy = model.generate(cond, top_k=1)
    assert torch.equal(model.generate(cond, top_k=1, generator=index_generators(0, range(3))), greedy)
    st = fa.prefill(model, cond, top_k=1)
    assert st.noise is None


def test_draw_is_pure_and_samples_each_code_with_its_probability():
    """Frequencies of 200,000 draws from one distribution are within 6 standard errors of its
    probabilities (a false failure has odds ~1e-9 per code); codes outside top-k/top-p never
    appear, even for uniforms just below 1."""
    g = torch.Generator().manual_seed(0)
    lg = torch.randn(1, 12, generator=g) * 2
    s = Sampling(top_k=6, top_p=0.97, temperature=0.9)
    n = 200_000
    u = torch.rand(n, generator=g, dtype=torch.float64)
    codes = draw(lg.expand(n, -1), u, s)
    assert torch.equal(codes, draw(lg.expand(n, -1), u.clone(), s))  # pure: same inputs, same codes
    p = filtered_probs(lg, s)[0].double()
    freq = torch.bincount(codes, minlength=12).double() / n
    se = (p * (1 - p) / n).sqrt()
    assert ((freq - p).abs() <= 6 * se + 1e-12).all(), (freq, p)
    assert (freq[p == 0] == 0).all()
    edge = torch.tensor([1 - 2**-53, 0.0], dtype=torch.float64)
    last = int(torch.nonzero(p).max())
    first = int(torch.nonzero(p).min())
    assert draw(lg.expand(2, -1), edge, s).tolist() == [last, first]


def test_sample_with_a_generator_per_image_groups_rows_in_order():
    lg = torch.randn(6, 9, generator=torch.Generator().manual_seed(1))
    two = fa.sample(lg, generator=[torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])
    first = fa.sample(lg[:3], generator=[torch.Generator().manual_seed(1)])
    second = fa.sample(lg[3:], generator=[torch.Generator().manual_seed(2)])
    assert torch.equal(two, torch.cat([first, second]))
    with pytest.raises(InputError, match="do not split into 4 images"):
        fa.sample(lg, generator=[torch.Generator()] * 4)


@pytest.mark.parametrize(
    "gen,msg",
    [([], "an empty sequence"), ([torch.Generator(), 3], "a sequence holding int 3"), ("abc", "str 'abc'")],
)
def test_bad_generators_are_refused(gen, msg):
    with pytest.raises(InputError, match=msg):
        Sampling(generator=gen)


def test_one_generator_per_image_is_checked_against_the_batch():
    model = fa.patch(tiny.llamagen(grid=4), tiny.llamagen_recipe())
    with pytest.raises(InputError, match="2 generators for a batch of 3 images"):
        model.generate(torch.tensor([1, 2, 3]), generator=index_generators(0, range(2)))
    s = Sampling(generator=(torch.Generator(),))
    assert isinstance(s.generator, tuple) and s.per_image


def test_index_seeds_are_distinct_within_32_bits():
    """A CPU generator keeps the low 32 bits of its seed only: seeds that differ above bit 32
    give the same stream, so per-index seeds must differ within 32 bits."""
    assert torch.equal(
        torch.rand(4, generator=torch.Generator().manual_seed(5)),
        torch.rand(4, generator=torch.Generator().manual_seed(5 + 2**32)),
    )
    for seed in (0, 1, 2**32 - 1):
        seeds = {index_seed(seed, i) for i in range(100_000)}
        assert len(seeds) == 100_000 and all(0 <= s < 2**32 for s in seeds)
    at_one_index = {index_seed(s, 12345) for s in range(100_000)}
    assert len(at_one_index) == 100_000
    a = torch.rand(8, generator=index_generators(0, [3])[0])
    b = torch.rand(8, generator=index_generators(1, [3])[0])
    assert not torch.equal(a, b)
    for bad in (-1, 2**32, 1.5, True):
        with pytest.raises(InputError, match=r"seed must be an integer in \[0, 2\*\*32\)"):
            index_seed(bad, 0)


def test_noise_is_drawn_per_cell_so_both_modes_share_it():
    """The uniform of a cell depends on its image's generator and the cell, not on the step
    order: prefill draws H*W of them per image."""
    model = fa.patch(tiny.llamagen(grid=4), tiny.llamagen_recipe())
    cond = torch.tensor([1, 2])
    states = [fa.prefill(model, cond, mode=m, generator=index_generators(3, range(2))) for m in ("two_way", "raster")]
    assert states[0].noise.shape == (2, 16) and states[0].noise.dtype == torch.float64
    assert torch.equal(states[0].noise, states[1].noise)
