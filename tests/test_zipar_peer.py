"""The ZipAR-style benchmark peer: with a window of a full row it is raster decoding exactly."""

import sys
from pathlib import Path

import torch

import flashar_adapt as fa
from tests import tiny

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from zipar import generate_zipar  # noqa: E402


def test_full_row_window_is_raster_and_steps_shrink_with_the_window():
    model = tiny.hf_llama()
    fa.patch(model, tiny.hf_llama_recipe(grid=(3, 5)))
    cond = torch.tensor([[3, 4, 5], [6, 7, 8]])
    for cfg in (1.0, 3.0):
        raster = model.generate(cond, mode="raster", top_k=1, cfg_scale=cfg)
        count = []
        assert torch.equal(generate_zipar(model, cond, 5, top_k=1, cfg_scale=cfg, count=count), raster)
        assert len(count) == 15
    for w in (1, 2):
        count = []
        generate_zipar(model, cond, w, top_k=1, count=count)
        assert len(count) == (3 - 1) * w + 5
