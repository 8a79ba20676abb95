"""LoRA adapters found by type and handled layer by layer (flashar_adapt.adapters) give exactly
what peft's own PeftModel wrapper gives: merge_and_unload and disable_adapter."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from flashar_adapt.adapters import (
    adapters_disabled,
    lora_named_parameters,
    lora_parameters,
    merge_lora,
)
from tests.numerics import assert_same_math


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(8, 16)
        self.mid = nn.Linear(16, 16)  # no adapter: not a target
        self.down = nn.Linear(16, 4)

    def forward(self, x):
        return self.down(torch.relu(self.mid(torch.relu(self.up(x)))))


def _pair():
    torch.manual_seed(0)
    net = Net()
    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["up", "down"], lora_dropout=0.0)
    ours = peft.inject_adapter_in_model(cfg, copy.deepcopy(net))
    theirs = peft.get_peft_model(copy.deepcopy(net), copy.deepcopy(cfg))
    with torch.no_grad():  # adapters that matter (B starts at zero), the same in both
        for (n, p), (_, q) in zip(lora_named_parameters(ours), lora_named_parameters(theirs), strict=True):
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(n))))
            q.copy_(p)
    return ours, theirs


def test_lora_parameters_are_found_by_type_in_model_order():
    ours, _ = _pair()
    names = [n for n, _ in lora_named_parameters(ours)]
    assert names == [n for n, _ in ours.named_parameters() if "lora_" in n]  # what the old name rule found
    assert len(names) == 4 and all(p.requires_grad for p in lora_parameters(ours))
    assert not lora_named_parameters(Net())


@pytest.mark.numerics
def test_merge_equals_peft_merge_and_unload():
    ours, theirs = _pair()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = ours(x)
    assert merge_lora(ours) == 2 and not lora_named_parameters(ours)
    plain = theirs.merge_and_unload()
    assert type(ours.up) is nn.Linear and ours.state_dict().keys() == plain.state_dict().keys()
    for k, v in plain.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k  # the same peft merge, the same floats
    with torch.no_grad():
        assert_same_math(ours(x), before, layers=3, width=16)  # W + BA summed once instead of per call


def test_adapters_disabled_equals_peft_disable_adapter():
    ours, theirs = _pair()
    x = torch.randn(5, 8, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        on = ours(x)
        with adapters_disabled(ours):
            off = ours(x)
        with theirs.disable_adapter():
            assert torch.equal(off, theirs(x))
        assert torch.equal(ours(x), on) and not torch.equal(on, off)  # switched back on
