"""The transformers runner's fused branch layer: in compiled decoding, the decoder layer at
the branch index and its vertical-branch copy run as one call, inside the decoder's own
layer loop.

Both layers read the same input, so the layer's own forward is run once over their two
weight sets stacked (``torch.func.vmap`` of ``torch.func.functional_call``): every
projection becomes one batched matmul (fewer, larger kernels in the compiled step). It is
the same function as the two separate calls (any layer class: no names are assumed). Only
compiled steps run the pair: eager calls (eager decoding, a compiled run's prefill and first
step) keep the two calls, since vmap without a compiler costs more than it saves. What it
buys is measured by ``benchmarks/fused_branch_speed.py`` (docs/speed.md).

How it reaches the layer loop: while decoding, the layer's ``forward`` is
``paired_forward``, which runs the pair when the runner says so for this very layer and
the layer's own forward otherwise (training, raster decoding, the user's own calls);
``unpatch`` removes it. Both layers' keys and values for the slot they use live in one
stacked buffer per cache pair, which the caches' slot layers view, so the fused and the
separate calls read and write the same entries.

A pair is used only when the layers match (one branch layer of the same class, the same
parameters and buffers, eval mode, no hooks, the layer's forward not replaced by anyone
else: checked at the start of every compiled run, when the weights are copied in) and, once
per pair of caches, its first fused call reproduces the separate calls on the prefill's
inputs (written into empty buffers); otherwise decoding runs the layers separately, and
one line on the ``flashar_adapt.compile`` logger says why. A change made in the middle of a
run (a hook added between steps of the step API) is seen by the next run's check."""

from __future__ import annotations

import copy
import logging
import threading
import types
import warnings

import torch
from torch import nn
from torch.func import functional_call, vmap

from flashar_adapt.context import capture_hook

from .hf_layers import is_cache

log = logging.getLogger("flashar_adapt.compile")


class _Active(threading.local):
    """The pair whose backbone layer runs fused in this thread's current forward, and the
    branch output that call left (the runner reads it after the decoder returns)."""

    def __init__(self):
        # set on the instance, never read from the class: a compiled step sets and reads them,
        # and dynamo's guards on a thread-local's instance dict must hold from its start
        self.pair: PairedLayer | None = None
        self.branch_out: torch.Tensor | None = None


ACTIVE = _Active()


def _quiet_vmap_notes() -> None:
    """vmap runs an op with no batching rule (CPU flash attention, say) once per layer and
    warns that it does, while compiling too (outside any call of ours); once per layer is
    what the two separate calls do anyway. Filtered process-wide from the first pair on
    (only where fusing was switched on)."""
    warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")


def in_graph() -> bool:
    """Whether this call is being compiled: the pair runs only inside compiled steps (without
    a compiler, vmap's per-op overhead costs more than one call instead of two saves)."""
    return torch.compiler.is_compiling()


def paired_forward(self, *args, **kwargs):
    """The backbone layer's ``forward`` while it is paired: the fused call when the runner
    asks for this layer, the layer class's own forward otherwise."""
    pair = ACTIVE.pair
    if pair is not None and pair.layer is self:
        return pair(args, kwargs)
    return type(self).forward(self, *args, **kwargs)


def is_installed(layer: nn.Module) -> bool:
    """Whether ``layer.forward`` is our ``paired_forward`` (the only instance forward we remove)."""
    fwd = layer.__dict__.get("forward")
    return isinstance(fwd, types.MethodType) and fwd.__func__ is paired_forward and fwd.__self__ is layer


def install(layer: nn.Module) -> None:
    """Make ``paired_forward`` the layer's forward (a no-op when it already is)."""
    if not is_installed(layer):
        layer.forward = types.MethodType(paired_forward, layer)


def uninstall(layer: nn.Module) -> None:
    if is_installed(layer):
        del layer.__dict__["forward"]


class SlotCache:
    """Stands in for the decoder's cache inside the vmapped call: writes both layers' keys
    and values (one batched tensor each) at the step's entries and returns them whole, as a
    static ``FeedOrderCache`` layer does."""

    def __init__(self):
        self.keys = self.values = self.entries = None

    def update(self, key_states, value_states, *args, **kwargs):
        # indexed assignment: vmap batches it (index_copy_ it would run once per layer, with a warning)
        self.keys[:, :, self.entries] = key_states
        self.values[:, :, self.entries] = value_states
        return self.keys, self.values


def why_not(layer: nn.Module, branch: list, slot: int | None) -> str | None:
    """Why ``layer`` and its branch copy cannot run as one (None: they can)."""
    if len(branch) != 1:
        return f"the branch is {len(branch)} layers deep"
    other = branch[0]
    if slot is None:
        return "the layer writes no cache slot of its own"
    if type(other) is not type(layer):
        return f"the branch layer is a {type(other).__name__}, the backbone's a {type(layer).__name__}"
    if ("forward" in layer.__dict__ and not is_installed(layer)) or "forward" in other.__dict__:
        return "a layer's forward is replaced on the instance (e.g. by offloading hooks)"
    mods, others = list(layer.named_modules()), list(other.named_modules())
    if [(n, type(m)) for n, m in mods] != [(n, type(m)) for n, m in others]:
        return "the two layers are built from different modules (e.g. adapters on one of them)"
    for (name, m), (_, o) in zip(mods, others, strict=True):
        if m.training or o.training:
            return "a layer is in training mode"
        own_pre = dict(m._forward_pre_hooks)
        if m is layer:  # the branch capture hook patch() put there: it records, never changes, inputs
            own_pre = {k: h for k, h in own_pre.items() if h is not capture_hook}
        if own_pre or m._forward_hooks or o._forward_pre_hooks or o._forward_hooks:
            return f"hooks on {name or 'the layer'}"
    for get in (nn.Module.named_parameters, nn.Module.named_buffers):
        mine, theirs = list(get(layer)), list(get(other))
        spec = [(n, t.shape, t.dtype, t.device) for n, t in mine]
        if spec != [(n, t.shape, t.dtype, t.device) for n, t in theirs]:
            return "the two layers' parameters or buffers differ in name, shape, dtype or device"
    return None


def _meta_twin(layer: nn.Module) -> nn.Module:
    """A copy of ``layer`` whose tensors are on the meta device (no memory): functional_call
    runs it with the stacked weights, and it is never the layer ``paired_forward`` fuses."""
    memo = {}
    for t in (*layer.parameters(), *layer.buffers()):
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, requires_grad=False) if isinstance(t, nn.Parameter) else meta
    twin = copy.deepcopy(layer, memo)
    twin.__dict__.pop("forward", None)
    for m in twin.modules():  # nothing of the layer's own calls: fewer guards in every compiled step
        for hooks in (
            m._forward_pre_hooks,
            m._forward_hooks,
            m._forward_pre_hooks_with_kwargs,
            m._forward_hooks_with_kwargs,
        ):
            hooks.clear()
    return twin


class PairedLayer:
    """A decoder layer and its branch copy, run as one (see the module docstring). Kept by
    the runner from one compiled run to the next (a CUDA graph replays on its buffers);
    ``load`` copies both layers' current weights in at every run."""

    def __init__(self, layer: nn.Module, other: nn.Module, slot: int):
        _quiet_vmap_notes()
        self.layer, self.other, self.slot = layer, other, slot
        self.key = self.key_of(layer, other)
        self.twin = _meta_twin(layer)
        self.params = {n: _stacked(p) for n, p in layer.named_parameters()}
        self.buffers = {n: _stacked(b) for n, b in layer.named_buffers()}
        self.load()
        self.keys = self.values = None  # [2, B, heads, entries, head_dim]: both slots, stacked
        self.views: tuple = ()  # the four slot tensors the caches hold: views of the stacked ones
        self.slot_cache = SlotCache()
        self.tail: tuple | None = None  # the rest of a tuple the layer returns (all None)

    @staticmethod
    def key_of(layer, other) -> tuple:
        return id(layer), id(other), tuple((n, p.shape, p.dtype, p.device) for n, p in layer.named_parameters())

    def load(self) -> None:
        with torch.no_grad():
            for store, get in ((self.params, nn.Module.named_parameters), (self.buffers, nn.Module.named_buffers)):
                for i, m in enumerate((self.layer, self.other)):
                    for n, t in get(m):
                        store[n][i].copy_(t)

    def holds(self, cache, branch_cache) -> bool:
        """Whether both caches' slot layers view this pair's stacked keys and values."""
        a, b = cache.layers[self.slot], branch_cache.layers[self.slot]
        held = (a.keys, b.keys, a.values, b.values)
        return bool(self.views) and all(x is y for x, y in zip(held, self.views, strict=True))

    def adopt(self, cache, branch_cache) -> None:
        """Stack both caches' slot buffers (filled by the prefill) into one and make the
        caches view it."""
        a, b = cache.layers[self.slot], branch_cache.layers[self.slot]
        self.keys = torch.stack([a.keys, b.keys])
        self.values = torch.stack([a.values, b.values])
        a.keys, b.keys, a.values, b.values = self.views = (self.keys[0], self.keys[1], self.values[0], self.values[1])
        if self.keys.is_cuda:  # a CUDA graph of the compiled step replays on these very buffers
            from torch import _dynamo  # heavy to import, and only CUDA graphs need it

            for t in (self.keys, self.values, *self.views, *self.params.values(), *self.buffers.values()):
                _dynamo.mark_static_address(t)

    def __call__(self, args: tuple, kwargs: dict, keys=None, values=None):
        """The backbone layer's output, from one call over both weight sets; the branch's
        output is left in ``ACTIVE.branch_out``. ``keys``/``values``: stacked buffers to
        write instead of the caches' (the adoption check)."""
        cache = next(v for v in (*args[1:], *kwargs.values()) if is_cache(v))
        sc = self.slot_cache
        sc.entries = cache.entries
        rest = tuple(sc if v is cache else v for v in args[1:])
        kw = {k: (sc if v is cache else v) for k, v in kwargs.items()}

        def one(params, buffers, k, v, hidden):
            sc.keys, sc.values = k, v
            out = functional_call(self.twin, (params, buffers), (hidden, *rest), kw)
            sc.keys = sc.values = None
            if isinstance(out, tuple):
                if any(x is not None for x in out[1:]):
                    raise RuntimeError("the layer returns more than its hidden states")
                self.tail = out[1:]
                return out[0]
            self.tail = None
            return out

        k = self.keys if keys is None else keys
        v = self.values if values is None else values
        both = vmap(one, in_dims=(0, 0, 0, 0, None))(self.params, self.buffers, k, v, args[0])
        ACTIVE.branch_out = both[1]
        return both[0] if self.tail is None else (both[0], *self.tail)


def _stacked(t: torch.Tensor) -> torch.Tensor:
    return torch.empty((2, *t.shape), dtype=t.dtype, device=t.device)
