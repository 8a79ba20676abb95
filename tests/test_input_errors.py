"""Bad arguments to generate() get a ValueError naming the argument."""

from __future__ import annotations

import pytest
import torch

import flashar_adapt as fa
from tests import tiny


def test_generation_input_errors():
    model = tiny.llamagen(grid=4)
    fa.patch(model, tiny.llamagen_recipe(grid=4))
    ok = torch.tensor([1])
    cases = [
        (dict(cond=torch.tensor([10])), "class ids"),
        (dict(cond=torch.tensor([-1])), "class ids"),
        (dict(cond=torch.tensor([[1]])), "LongTensor \\[B\\]"),
        (dict(cond=ok, top_k=-1), "top_k"),
        (dict(cond=ok, top_p=0.0), "top_p"),
        (dict(cond=ok, temperature=-1.0), "temperature"),
        (dict(cond=ok, cfg_scale=float("nan")), "cfg_scale"),
        (dict(cond=ok, grid=(5, 5)), "fixed grid"),
        (dict(cond=ok, mode="zigzag"), "mode"),
        (dict(cond=ok, cfg_schedule="cosine"), "cfg_schedule"),
    ]
    for kwargs, msg in cases:
        with pytest.raises(ValueError, match=msg):
            model.generate(**kwargs)


def test_prompt_errors_and_positions_limit():
    model = tiny.hf_llama(max_pos=40)
    fa.patch(model, tiny.hf_llama_recipe(grid=(4, 4)))
    with pytest.raises(ValueError, match="at most 16"):
        model.generate(torch.ones(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="empty"):
        model.generate(torch.ones(1, 0, dtype=torch.long))
    with pytest.raises(ValueError, match="positions"):
        model.generate(torch.ones(1, 3, dtype=torch.long), grid=(7, 7))
    with pytest.raises(ValueError, match="vocabulary|\\[0, 160\\)"):
        model.generate(torch.full((1, 3), 500))
