"""The public step API: ``prefill`` (a ``DecoderState``), ``step`` (one anti-diagonal, or one
raster token) and ``generate``, that loop."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields, replace

import torch

from ..context import PatchContext, context
from ..errors import InputError
from ..grid import Layout
from ..sampling import Sampling, check_logits, guide
from . import compiled
from .decoder import Decoder, draw_cells, sampled_step, step_logits
from .forward import cell_logits
from .inputs import (
    build_prefix,
    check_cond,
    check_grid,
    check_mode,
    check_negative,
    check_positions,
    check_preview,
    check_step_codes,
    eval_behaviour,
    has_uncond,
    with_grid,
)
from .schedules import Schedule, padded_schedule, schedule

# what makes the first step's logits undrawable, said with the refusal
FIRST_LOGITS_WHY = "non-finite weights or inputs, a hook, or an overflow in a low-precision dtype"


@dataclass(eq=False)
class DecoderState:
    """One decoding run between ``prefill`` and the last ``step``.

    ``codes`` [B, H*W] fills as steps run (``image()`` is the [B, H, W] view); ``t`` is the
    next step; ``logits`` the guided logits [B, n, K] the last step sampled from;
    ``schedule.steps[t]`` what step t feeds and samples; ``noise`` [B, H*W] the uniform each
    cell is drawn with (None when greedy), drawn at prefill; ``preview`` [B, h, w] the preview
    grid the main grid is conditioned on (recipes with ``image.preview_*``: decoded, raster,
    inside ``prefill``), else None. A later ``prefill``/``generate`` on
    the same model makes this state stale (its caches may be reused): stepping it then
    raises."""

    model: torch.nn.Module = field(repr=False)
    mode: str
    layout: Layout
    sampling: Sampling
    batch: int
    vertical: bool
    codes: torch.Tensor = field(repr=False)
    decoder: Decoder = field(repr=False)
    schedule: Schedule = field(repr=False)
    t: int = 0
    logits: torch.Tensor | None = field(default=None, repr=False)
    compiled: bool = False
    noise: torch.Tensor | None = field(default=None, repr=False)
    preview: torch.Tensor | None = field(default=None, repr=False)  # [B, h, w]: the preview grid, if the recipe has one
    _hidden: tuple = field(default=None, repr=False)  # the prefill's last (hidden, branch hidden): step 0's source
    _scales: list = field(default=None, repr=False)  # compiled: per-step guidance scales as tensors
    _draw: Sampling = field(default=None, repr=False)  # the settings the draw reads (no generator: its noise is drawn)
    _watch: compiled.CompileWatch | None = field(default=None, repr=False)  # compiled: the start/end lines

    @property
    def num_steps(self) -> int:
        L = self.layout
        return L.num_steps_two_way if self.mode == "two_way" else L.num_steps_raster

    @property
    def done(self) -> bool:
        return self.t >= self.num_steps

    def cells(self, t: int | None = None) -> torch.Tensor:
        """Flat cell indices (into ``codes`` [B, H*W]) that step ``t`` (default: the next) samples."""
        t = self.t if t is None else t
        if not 0 <= t < self.num_steps:
            raise IndexError(f"step {t} is outside 0..{self.num_steps - 1}")
        out = self.schedule.steps[t].out
        if isinstance(out, slice):
            return torch.arange(out.start, out.stop, device=self.codes.device)
        return out

    def image(self) -> torch.Tensor:
        return self.codes.view(self.batch, self.layout.height, self.layout.width)

    def compiled_call(self, t: int):
        """Step ``t`` (after the first) of a compiled state as a call of no arguments that
        returns (padded guided logits, padded codes): what ``step`` runs, without the
        bookkeeping around it. It feeds the codes ``codes`` holds at step t's cells and
        rewrites the same cache entries, so it can run again (benchmarks time the graphs
        alone with it); call it inside ``torch.inference_mode()`` and
        ``compiled.recompile_room(True)``, as ``step`` does."""
        if not self.compiled:
            raise InputError("compiled_call needs a state prefilled with compile=True (state.compiled)")
        if not 1 <= t < self.num_steps:
            raise IndexError(f"step {t} is outside 1..{self.num_steps - 1} (step 0 runs eagerly, from the prefill)")
        _check_fresh(self)
        st = self.schedule.steps[t]
        key = (self.codes.device.type, st.entries.numel())
        args = (self.decoder, self.codes, st, self._scales[t], self.noise, st.out_rows, self._draw)
        # looked up on the module at every call: tests run the static path uncompiled by replacing it
        fn = compiled.compiled_step(*key)
        return lambda: compiled.run_step(key, fn, sampled_step, *args)


def _sampling(sampling: Sampling | None, kwargs: dict) -> Sampling:
    if sampling is None:
        return Sampling(**kwargs)
    if not isinstance(sampling, Sampling):
        raise InputError(f"sampling must be a flashar_adapt.Sampling, got {type(sampling).__name__}")
    if kwargs:
        raise InputError(
            f"pass sampling settings either as sampling=Sampling(...) or as keywords, not both: {sorted(kwargs)}"
        )
    return sampling


def _check_compile(compile) -> None:
    if not (isinstance(compile, bool) or (isinstance(compile, str) and compile == "auto")):
        raise InputError(f'compile must be True, False or "auto", got {compile!r}')


def _prefill(
    model,
    ctx: PatchContext,
    cond,
    mode: str,
    grid,
    sampling: Sampling,
    cond_mask,
    vertical: bool,
    compile: bool | str = False,
    negative=None,
    negative_mask=None,
    preview=None,
) -> DecoderState:
    cond, cond_mask = check_cond(ctx, cond, cond_mask)
    grid = check_grid(ctx, grid)
    sampling.check_device(cond.device)
    sampling.check_batch(cond.shape[0])
    neg = check_negative(ctx, negative, negative_mask, cond.shape[0], sampling.guided)
    if sampling.guided and not has_uncond(ctx, neg):
        raise InputError(
            f"cfg_scale={sampling.cfg_scale} needs an unconditional prefix, but recipe "
            f"{ctx.recipe.name!r} defines none (condition.uncond) and no negative prompt was given"
        )
    pre = build_prefix(ctx, cond, cond_mask, grid, sampling.guided, neg)
    before = ()
    small = ctx.preview_grid(grid)
    if small is not None:
        if preview is None:
            # the preview grid first, raster (its own prefill and h*w - 1 steps), then the main
            # grid conditioned on it: the preview's cells end the main grid's prefix
            first = _start(model, ctx, pre, "raster", ctx.layout(pre.length, small), sampling, False, compile)
            while not first.done:
                _step(first)
            preview = first.image()
        else:
            preview = check_preview(ctx, preview, cond.shape[0], grid)
        pre, before = with_grid(ctx, pre, preview), (small,)
    elif preview is not None:
        check_preview(ctx, preview, cond.shape[0], grid)  # raises: this recipe has no preview
    state = _start(model, ctx, pre, mode, ctx.layout(pre.length, grid, before), sampling, vertical, compile)
    state.preview = preview
    return state


def _start(
    model, ctx: PatchContext, pre, mode: str, layout: Layout, sampling: Sampling, vertical: bool, compile: bool | str
) -> DecoderState:
    """Prefill ``pre`` into fresh caches for decoding ``layout`` in ``mode``."""
    check_positions(ctx, layout)
    dev = pre.embeds.device
    compile = compiled.use_compile(compile, dev, pre.embeds.shape[0], ctx.runner.static_caches)
    sched = (padded_schedule if compile else schedule)(layout, mode, dev)
    branch = mode == "two_way" and vertical
    dec = Decoder(ctx, pre, layout, sched.order, branch, sched.pad if compile else None)
    hh, hv = dec.prefill()
    B = pre.batch
    codes = torch.zeros(B, layout.height * layout.width, dtype=torch.long, device=dev)
    n = len(sched.steps)
    # per-step guidance scales as tensors: a compiled step would specialise on a float
    scales = compiled.step_scales(sampling, n, dev) if compile else None
    watch = None
    settings = replace(sampling, generator=None)  # what the draw reads; a compiled step specialises on it
    if compile:
        rows = pre.embeds.shape[0]  # with CFG, twice the images
        knobs = (settings.greedy, settings.temperature, settings.top_k, settings.top_p)
        keys = {(dev.type, st.entries.numel(), rows, layout.seq_len, mode, knobs) for st in sched.steps[1:]}
        what = f"{mode} decoding of a batch of {B} at {layout.height}x{layout.width}"
        watch = compiled.CompileWatch(model, what, keys)
    # one uniform per cell, drawn now: a cell's draw depends on its image's generator and the
    # cell, not on the step order (raster and two-way use the same uniforms for the same seed)
    noise = sampling.noise(B, layout.height * layout.width, dev)
    return DecoderState(
        model,
        mode,
        layout,
        sampling,
        B,
        branch,
        codes,
        dec,
        sched,
        compiled=compile,
        noise=noise,
        _hidden=(hh[:, -1:], None if hv is None else hv[:, -1:]),
        _scales=scales,
        _draw=settings,
        _watch=watch,
    )


def prefill(
    model,
    cond,
    *,
    mode: str = "two_way",
    grid=None,
    sampling: Sampling | None = None,
    cond_mask=None,
    negative=None,
    negative_mask=None,
    vertical: bool = True,
    compile: bool | str = False,
    preview=None,
    **sampling_kwargs,
) -> DecoderState:
    """Check the inputs, build the prefix and run it into fresh static caches; returns the
    state that ``step`` advances. Sampling settings as ``sampling=Sampling(...)`` or as its
    keywords (``cfg_scale=``, ``temperature=``, ...); ``negative`` as in ``generate``.
    ``vertical=False`` (two-way only) skips the vertical branch and takes the horizontal
    head everywhere: the backbone work of two-way decoding alone, a speed ablation, not a
    generator. ``compile=True``: every ``step`` after the first runs compiled (see
    ``generate``); ``"auto"``: where it pays (``state.compiled`` says whether it does). A
    recipe with a preview grid decodes it here first (raster, with the same sampling), or
    takes its codes as ``preview`` [B, h, w] (teacher forcing, continuing known codes); the
    steps then decode the main grid."""
    check_mode(mode)
    _check_compile(compile)
    if not isinstance(vertical, bool):
        raise InputError(f"vertical must be True or False, got {vertical!r}")
    ctx = context(model)
    s = _sampling(sampling, sampling_kwargs)
    with ctx.guard, eval_behaviour(model), torch.inference_mode():
        return _prefill(model, ctx, cond, mode, grid, s, cond_mask, vertical, compile, negative, negative_mask, preview)


def _advance(state: DecoderState, sample: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Feed what the previous step sampled (nothing at step 0: the prefill's last state
    predicts the first cells); return this step's guided logits [B, n, K] and, with
    ``sample``, its codes [B, n]: drawn inside the compiled step when compiled, by the same
    arithmetic eagerly (``sampled_step``)."""
    t, st, dec, B = state.t, state.schedule.steps[state.t], state.decoder, state.batch
    if t == 0 or not state.compiled:
        scale = state.sampling.scale_at(t, state.num_steps)
        if t == 0:
            hh, hv = state._hidden
            lg = cell_logits(dec.ctx, hh, hv, st.h_idx, st.v_idx, st.has_h, st.has_v, state.vertical)
            lg = guide(lg, B, scale)
            # once per run (one host sync): NaN weights, a hook returning NaN or a low-precision
            # overflow would otherwise be drawn as code 0 in every cell without a word
            check_logits(lg, "the model's logits at the first step", FIRST_LOGITS_WHY)
        else:
            lg = step_logits(dec, state.codes, st, scale)
        lg = lg.reshape(B, -1, lg.shape[-1])
        return lg, draw_cells(lg, state.noise, st.out, state._draw) if sample else None
    dev = state.codes.device
    if dev.type == "cuda":
        torch.compiler.cudagraph_mark_step_begin()
    lg, tok = state.compiled_call(t)()
    lg, tok = lg.reshape(B, -1, lg.shape[-1])[:, : st.n], tok[:, : st.n]
    # a CUDA graph's outputs are overwritten by its next replay: state.logits must outlive the step
    return (lg.clone(), tok.clone()) if dev.type == "cuda" else (lg, tok)


def _check_fresh(state: DecoderState) -> None:
    if state.decoder.epoch != state.decoder.ctx.guard.epoch:
        raise RuntimeError(
            "this decoder state is stale: a later prefill or generate on the same model reused its "
            "caches; prefill again (or decode on a copy.deepcopy of the model)"
        )
    p = next(state.decoder.ctx.layers.parameters())
    if (p.dtype, p.device) != state.decoder.weights:
        was = state.decoder.weights
        raise RuntimeError(
            f"this decoder state is stale: the model is now {p.dtype} on {p.device}, it was {was[0]} on "
            f"{was[1]} at its prefill; prefill again"
        )


def _step(state: DecoderState, forced=None) -> torch.Tensor:
    if state.done:
        raise RuntimeError(f"all {state.num_steps} steps of this decoder state have run")
    _check_fresh(state)
    ctx = state.decoder.ctx
    lg, tok = _advance(state, forced is None)
    if forced is not None:
        tok = check_step_codes(ctx, forced, state.t, (state.batch, lg.shape[1]), state.codes.device)
    state.codes[:, state.schedule.steps[state.t].out] = tok
    state.logits = lg
    state.t += 1
    if state.done and state._watch is not None:
        state._watch.finish()
    return tok


def step(state: DecoderState, codes=None) -> torch.Tensor:
    """Feed what the last step sampled and sample the next anti-diagonal (two-way) or the
    next token (raster): returns its codes [B, n] (cells: ``state.cells(state.t - 1)``).
    ``codes`` [B, n] forces those codes instead of sampling (teacher forcing, continuing
    known codes); ``state.logits`` still holds what the model predicted."""
    if not isinstance(state, DecoderState):
        raise InputError(f"step needs the DecoderState that prefill returned, got {type(state).__name__}")
    ctx = state.decoder.ctx
    with ctx.guard, eval_behaviour(state.model), torch.inference_mode(), compiled.recompile_room(state.compiled):
        return _step(state, codes)


_GENERATE_DEFAULTS = {f.name: f.default for f in fields(Sampling)}  # generate()'s keywords are Sampling's fields


def generate(
    model,
    cond,
    *,
    mode: str = "two_way",
    grid=None,
    cfg_scale: float = 1.0,
    cfg_schedule: str = "constant",
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    cond_mask=None,
    negative=None,
    negative_mask=None,
    sampling: Sampling | None = None,
    compile: bool | str = False,
    return_preview: bool = False,
):
    """Generate images as codebook indices [B, H, W].

    two_way: H+W-1 backbone forwards (prefill, then one per anti-diagonal); raster: the
    model's own next-token decoding, H*W forwards. CFG runs [cond; uncond] in one batch.
    ``negative`` (prompt recipes, with ``cfg_scale != 1``): the token ids of a negative
    prompt, [T] for the batch or [B, T] per image (left-padded under ``negative_mask``, as
    prompts), that build the unconditional branch for this call instead of the recipe's.
    ``generator``: one ``torch.Generator``, or one per image (each image's codes then depend
    on its own generator alone, whatever the batch it is decoded in).
    ``prefill`` + ``step`` until done, under the model's lock and in eval behaviour (the
    caller's train/eval flags are restored).

    ``compile=True`` runs every step after the first through ``torch.compile`` (CUDA graphs
    on CUDA): static caches attended whole under a mask, steps padded to power-of-two
    buckets, so a process compiles a few graphs per mode and grid, once. The first call
    pays the compile time; the codes are the eager ones (same math, other kernels).
    ``compile="auto"``: compiled on CUDA, and on a CPU for up to
    ``compiled.AUTO_CPU_MAX_ROWS`` sequences (images, twice with CFG), where compiling was
    measured to pay; eager otherwise.

    A recipe with a preview grid (``image.preview_grid`` / ``image.preview_side``) first
    decodes the h x w preview, raster (h*w forwards), then the main grid conditioned on it:
    h*w + H+W-1 forwards in all (two-way), h*w + H*W (raster). ``return_preview=True``
    returns ``(codes, preview)`` with the preview's codes [B, h, w]."""
    check_mode(mode)
    _check_compile(compile)
    ctx = context(model)
    if not isinstance(return_preview, bool):
        raise InputError(f"return_preview must be True or False, got {return_preview!r}")
    if return_preview and ctx.preview_grid(check_grid(ctx, grid)) is None:
        raise InputError(f"recipe {ctx.recipe.name!r} decodes no preview grid: return_preview=True has none to return")
    if sampling is None:
        sampling = Sampling(cfg_scale, cfg_schedule, temperature, top_k, top_p, generator)
    else:
        given = dict(
            cfg_scale=cfg_scale,
            cfg_schedule=cfg_schedule,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            generator=generator,
        )
        sampling = _sampling(sampling, {k: v for k, v in given.items() if v != _GENERATE_DEFAULTS[k]})
    with ctx.guard, eval_behaviour(model), torch.inference_mode(), compiled.recompile_room(compile):
        state = _prefill(model, ctx, cond, mode, grid, sampling, cond_mask, True, compile, negative, negative_mask)
        while not state.done:
            _step(state)
        return (state.image(), state.preview) if return_preview else state.image()
