"""``fa.unpatch`` under concurrency and with adapters: it takes the per-model guard (a generate
in another thread finishes first; one that waited behind it raises a clear error, never an
AttributeError), and it removes the LoRA adapters FlashAR added (an export loaded with its
adapters kept comes back as the original model, bit for bit), or refuses in one sentence when
they were merged into the weights."""

from __future__ import annotations

import threading
import time

import pytest
import torch

import flashar_adapt as fa
from flashar_adapt.adapters import lora_layers
from flashar_adapt.errors import InputError
from flashar_adapt.inspection import load_model
from flashar_adapt.training import add_lora
from tests import tiny

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py
pytest.importorskip("peft")


@pytest.fixture(scope="module")
def with_adapters(tmp_path_factory):
    """An export with LoRA adapters kept apart (``export --keep-adapters``), adapters non-zero."""
    model = fa.patch(tiny.llamagen(grid=4), tiny.llamagen_recipe())
    add_lora(model, r=4, alpha=8)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return fa.export_merged(model, tmp_path_factory.mktemp("lora") / "export", merge=False)


def _state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_unpatch_removes_the_adapters_flashar_added(with_adapters):
    model = fa.load_adapted(with_adapters)
    assert lora_layers(model)
    fa.unpatch(model)
    assert not lora_layers(model) and not [k for k in model.state_dict() if "lora_" in k]
    original, _ = load_model(with_adapters / "backbone" / "llamagen.pt")
    want, got = _state(original), _state(model)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert not hasattr(model, "flashar")


def test_unpatch_keeps_adapters_the_user_added_before_patching(with_adapters):
    from peft import LoraConfig, inject_adapter_in_model

    raw = tiny.llamagen(grid=4)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=r"layers\.0\.attention\.wo"), raw)
    theirs = [n for n, _ in lora_layers(raw)]
    model = fa.patch(raw, tiny.llamagen_recipe())
    fa.unpatch(model)
    assert [n for n, _ in lora_layers(model)] == theirs


def test_unpatch_with_merged_adapters_is_refused_and_changes_nothing(with_adapters, tmp_path):
    model = fa.load_adapted(with_adapters)
    for _, m in lora_layers(model):
        m.merge()
    before = _state(model)
    with pytest.raises(InputError, match=r"^cannot unpatch: the LoRA adapters FlashAR added are merged into 25 layer"):
        fa.unpatch(model)
    after = _state(model)
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert model.generate(torch.tensor([1]), top_k=1).shape == (1, 4, 4)  # still patched, still works
    # an export that merges them (the default) merges them into this very model
    model = fa.load_adapted(with_adapters)
    fa.export_merged(model, tmp_path / "merged")
    with pytest.raises(InputError, match="merged into 25 layer"):
        fa.unpatch(model)


def test_unpatch_waits_for_a_generate_in_another_thread():
    model = fa.patch(tiny.llamagen(grid=4), tiny.llamagen_recipe())
    want = model.generate(torch.tensor([1, 2]), top_k=1)
    original = tiny.llamagen(grid=4)
    inside, go = threading.Event(), threading.Event()

    def hold(module, args):  # the first generate stays inside its forward until told to go
        if not go.is_set():
            inside.set()
            go.wait(30)

    handle = model.layers[0].register_forward_pre_hook(hold)
    results: dict[str, object] = {}

    def run(key, fn):
        try:
            results[key] = fn()
        except Exception as e:  # noqa: BLE001 - the test records what each thread ended with
            results[key] = e

    first = threading.Thread(target=run, args=("first", lambda: model.generate(torch.tensor([1, 2]), top_k=1)))
    first.start()
    assert inside.wait(30)
    unpatcher = threading.Thread(target=run, args=("unpatch", lambda: fa.unpatch(model)))
    unpatcher.start()
    late = threading.Thread(target=run, args=("late", lambda: fa.generate(model, torch.tensor([3]), top_k=1)))
    late.start()
    time.sleep(0.3)
    assert unpatcher.is_alive() and hasattr(model, "flashar")  # it waits for the generate in progress
    go.set()
    for t in (first, unpatcher, late):
        t.join(60)
    handle.remove()
    assert torch.equal(results["first"], want)  # the call in progress finished, undisturbed
    assert results["unpatch"] is model and not hasattr(model, "flashar")
    late_result = results["late"]  # ran before the unpatch, or was refused after it; never a crash
    assert (isinstance(late_result, torch.Tensor) and late_result.shape == (1, 4, 4)) or (
        isinstance(late_result, RuntimeError) and "unpatched" in str(late_result)
    ), repr(late_result)
    want_sd, got_sd = _state(original), _state(model)
    assert all(torch.equal(got_sd[k], want_sd[k]) for k in want_sd) and got_sd.keys() == want_sd.keys()


def test_unpatch_from_inside_a_generate_is_refused():
    model = fa.patch(tiny.llamagen(grid=4), tiny.llamagen_recipe())
    seen = []

    def unpatch_now(module, args):
        if not seen:
            try:
                fa.unpatch(model)
            except RuntimeError as e:
                seen.append(str(e))

    handle = model.layers[0].register_forward_pre_hook(unpatch_now)
    model.generate(torch.tensor([1]), top_k=1)
    handle.remove()
    assert seen and "re-entrant" in seen[0]
    assert model.generate(torch.tensor([1]), top_k=1).shape == (1, 4, 4)  # still patched
    fa.unpatch(model)


def test_a_model_that_generated_can_be_patched_again():
    """generate leaves the LlamaGen attention caches on the model, made under inference_mode;
    the next patch's order probe runs outside it and must not trip over them."""
    model = tiny.llamagen(grid=4)  # its caches (17 entries) hold the probe's 11 tokens: reused
    recipe = tiny.llamagen_recipe(grid=4)
    fa.patch(model, recipe)
    first = model.generate(torch.tensor([1]), top_k=1)
    fa.unpatch(model)
    fa.patch(model, recipe)
    assert torch.equal(model.generate(torch.tensor([1]), top_k=1), first)
