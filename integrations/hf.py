"""The transformers runner (Llama-style, Emu3, Janus, Chameleon, ...); its model format is
``hf_format``, how it reaches the layers ``hf_layers``, its caches ``hf_caches``, its fused
branch layer ``hf_fused``.

Runs the recipe's ``modules.decoder`` (the text model, e.g. ``model.text_model``) with
``inputs_embeds``, an additive 4D float mask (a bool 4D mask is silently wrong under eager
attention) and explicit ``position_ids``. The vertical branch reuses the keyword arguments
the decoder passed its branch layer (rotary embeddings, mask) with its own cache.

Decoding uses ``FeedOrderCache``: static per-layer buffers allocated once per generate()
call and filled in feeding order, so a step attends exactly the filled entries (views, no
``torch.cat`` growth, no attention over unused entries) and its additive mask is a view of
one preallocated row. transformers' own ``StaticCache`` would make every step attend all
``max_cache_len`` entries behind a mask, which costs more than it saves at these sizes.
"""

from __future__ import annotations

import inspect
import logging

import torch

# transformers is an optional dependency of the core: without it this plugin's import fails
# and the plugin registry hides the "transformers" runner and format, naming the package.
from transformers import DynamicCache
from transformers.cache_utils import get_layer_types_and_kwargs

from flashar_adapt.decoding import run_then_branch
from flashar_adapt.errors import InputError
from flashar_adapt.recipe import RecipeError
from flashar_adapt.runners import Runner

from .hf_caches import FeedOrderCache, mask_row
from .hf_fused import ACTIVE, PairedLayer, in_graph, why_not
from .hf_fused import install as install_paired_forward
from .hf_fused import uninstall as uninstall_paired_forward
from .hf_layers import (
    cache_kwarg,
    causal_buffers,
    causal_buffers_open,
    is_cache,
    replace_mask,
    sliding_window,
)

log = logging.getLogger("flashar_adapt.compile")  # the lines compiled decoding writes (decoding.compiled)


def _tokens_fed(ctx) -> int:
    """Tokens fed for the recipe's grid and longest prompt (the last code is never fed)."""
    im, c = ctx.recipe.image, ctx.recipe.condition
    return ctx.layout(len(ctx.meta_ids(im.grid)) + (c.prefix_len or 1), im.grid).fed_len


def _dynamic_cache(config=None):
    return DynamicCache(config=config) if config is not None else DynamicCache()


def full_attention_only(config) -> bool:
    """Whether every layer is plain full attention (no sliding window, chunks, shared KV or
    linear attention): the layouts FeedOrderCache can hold; anything else keeps DynamicCache."""
    if config is None:
        return True
    try:
        types, _ = get_layer_types_and_kwargs(config.get_text_config(decoder=True))
    except Exception:  # noqa: BLE001 - an unusual config: stay on the generic cache
        return False
    return all(t == "full_attention" for t in types)


class TransformersRunner(Runner):
    """transformers decoders. What each layer must see reaches it however the family threads
    it: the cache is found by type, and when the decoder module rewrites or flattens the 4D
    mask it is given (``mask_at_layers``), the additive mask is passed to the decoder as None
    and put into every layer's ``attention_mask`` by a forward pre-hook instead."""

    name = "transformers"
    static_caches = True  # for full-attention decoders (new_cache refuses the others)
    fused_branch = True  # run_with_branch: compiled steps may fuse the branch layer (fuse_branch_layer, hf_fused)

    def __init__(self):
        self.cache_key = "cache"  # the decoder forward's name for its cache argument (bind reads it)
        self.mask_at_layers = False  # bind's probe decides: the mask goes to every layer, not the decoder
        self.layer_mask: torch.Tensor | None = None  # the additive mask of the current call, when at layers
        self.entries: torch.Tensor | None = None  # static caches: the entries of the current call
        # static caches kept from one generate() call to the next: "backbone"/"branch" -> (key, cache)
        self.static_held: dict[str, tuple] = {}
        # id(module) -> the built-in causal buffers inside it (the modules live as long as the patch)
        self.causal_found: dict[int, list[tuple]] = {}
        # what bind saw each decoder layer hand its cache as the layer index (layers that never
        # update a cache are absent): the branch copies keep their originals' slots
        self.cache_slots: dict[int, int] = {}
        # True: compiled steps run the branch layer fused with its backbone layer (hf_fused). Off by
        # default: on a CPU it measured no faster (docs/speed.md); on a GPU it is unmeasured
        self.fuse_branch_layer = False
        # the fused pair, kept from one compiled run to the next; the pairs whose fused call failed
        # its check (pair key -> why, never retried); the refusals already said (one line each)
        self.pair: PairedLayer | None = None
        self.pair_for = None  # the branch cache of the run the pair was checked and loaded for
        self.pair_failed: dict[tuple, str] = {}
        self.pair_said: set[tuple] = set()

    def bind(self, ctx) -> None:
        dec = ctx.decoder
        name = type(dec).__name__
        params = inspect.signature(dec.forward).parameters if hasattr(dec, "forward") else {}
        if "inputs_embeds" not in params:
            raise RecipeError(
                "modules.decoder",
                f"{name}.forward takes no inputs_embeds; point "
                "modules.decoder at the text decoder (e.g. 'model' or 'model.text_model')",
                ctx.recipe.source,
            )
        if "attention_mask" not in params:
            raise RecipeError(
                "modules.decoder",
                f"{name}.forward takes no attention_mask: FlashAR's proximity mask "
                "needs a decoder whose attention can be masked",
                ctx.recipe.source,
            )
        self.cache_key = cache_kwarg(dec.forward)
        no_positions = RecipeError(
            "modules.decoder",
            f"{name}.forward takes no position_ids: its positions come from "
            "the token order or a 2D padding mask (e.g. ALiBi biases), so "
            "tokens fed in anti-diagonal order cannot keep their raster "
            "positions",
            ctx.recipe.source,
        )
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        if "position_ids" not in params and not takes_any:
            raise no_positions  # before the probe, which passes position_ids and would blame the mask
        self._check_causal_buffers(ctx)  # before the probe, which opens them
        self._probe_mask(ctx)
        if "position_ids" not in params:
            raise no_positions
        self._check_window(ctx)
        self.cache_slots = self._observe_cache_slots(ctx)

    def _probe_mask(self, ctx) -> None:
        """Run the decoder on 4 random inputs: under a causal additive mask it must reproduce
        its own default (causal) forward, and masking one key must change the output. Tries the
        mask through the decoder first, then at the layer boundary; refuses if neither works."""
        dec, src = ctx.decoder, ctx.recipe.source
        p = next(ctx.layers.parameters())
        x = torch.randn(1, 4, ctx.dim, generator=torch.Generator().manual_seed(0)).to(p)
        slots = torch.arange(4, device=p.device)
        causal = torch.ones(4, 4, dtype=torch.bool, device=p.device).tril()[None]
        was_training = dec.training
        dec.eval()
        try:
            with torch.no_grad():
                out = dec(inputs_embeds=x, use_cache=False)
                ref = out[0] if isinstance(out, tuple) else out.last_hidden_state
                # detection threshold, not a proof: a mis-delivered mask changes outputs by O(|ref|)
                tol = (1e-3 if ref.dtype == torch.float32 else 5e-2) * (1 + ref.abs().max().item())
                errors = []
                for at_layers in (False, True):
                    self.mask_at_layers = at_layers
                    try:
                        h = self.run(ctx, x, slots[None], slots, slots, causal, None)
                    except Exception as e:  # noqa: BLE001 - try the other delivery, then report
                        errors.append(f"{type(e).__name__}: {e}")
                        continue
                    if (h - ref).abs().max().item() <= tol:
                        break
                    errors.append("the output differs from the decoder's own causal forward")
                else:
                    raise RecipeError(
                        "modules.decoder",
                        f"{type(dec).__name__} cannot run under an additive 4D "
                        f"attention mask, neither through its forward nor at its layers "
                        f"({'; '.join(dict.fromkeys(errors))}); FlashAR needs softmax attention that "
                        "takes one (state-space and linear-attention models have none)",
                        src,
                    )
                blocked = causal.clone()
                blocked[:, 3, 0] = False  # the last query loses the first key
                blocked[:, 0, 1] = True  # the first query sees a later key (the proximity mask does that)
                h2 = self.run(ctx, x, slots[None], slots, slots, blocked, None)
                # Bitwise: a masked key gets exactly zero weight, so a mask that takes effect moves
                # the output by the key's contribution (however small the weights: half precision
                # at initialisation), and one that is ignored runs the very same arithmetic.
                if torch.equal(h2[:, 3], h[:, 3]):
                    raise RecipeError(
                        "modules.decoder",
                        f"{type(dec).__name__}'s output ignores the attention mask "
                        "(no softmax attention over the sequence, e.g. a state-space or linear-attention "
                        "model): FlashAR's proximity mask cannot apply",
                        src,
                    )
                if torch.equal(h2[:, 0], h[:, 0]):
                    raise RecipeError(
                        "modules.decoder",
                        f"{type(dec).__name__}'s attention stays causal whatever mask "
                        "it is given: the proximity mask, which lets a token see later raster slots of "
                        "earlier diagonals, cannot apply",
                        src,
                    )
        finally:
            dec.train(was_training)

    def _check_window(self, ctx) -> None:
        window = sliding_window(getattr(ctx.decoder, "config", None))
        need = _tokens_fed(ctx)
        if window is not None and need > window:
            raise RecipeError(
                "image.grid",
                f"{list(ctx.recipe.image.grid)} feeds {need} tokens but the model's sliding-window "
                f"layers attend only the last {window}: the proximity mask needs every "
                "earlier diagonal; use a grid (and prompt) that fits the window",
                ctx.recipe.source,
            )

    def _check_causal_buffers(self, ctx) -> None:
        """A built-in causal mask whose band (its window) is shorter than the tokens fed would
        hide earlier diagonals that the proximity mask must show; a longer one is opened
        during FlashAR's forwards like a full causal mask (the proximity mask then decides)."""
        need = _tokens_fed(ctx)
        paths = {id(m): p for p, m in ctx.layers.named_modules()}
        for mod, name, w in self._builtin_causal(ctx.layers):
            if w < need:
                where = f"{ctx.recipe.modules.layers}.{paths[id(mod)]}"
                raise RecipeError(
                    "image.grid",
                    f"{list(ctx.recipe.image.grid)} feeds {need} tokens but {type(mod).__name__}'s built-in "
                    f"causal mask ({name!r} at {where}) lets a token attend only the last {w}: the proximity "
                    "mask needs every earlier diagonal; use a grid (and prompt) that fits the window",
                    ctx.recipe.source,
                )

    def _observe_cache_slots(self, ctx) -> dict[int, int]:
        """Which integer each decoder layer hands ``cache.update`` as its layer index, seen
        during one cached forward of 3 tokens into this runner's own cache (whatever the
        attribute holding it is called: ``layer_idx``, GPT-Neo's ``layer_id``, ...). The
        branch copies keep these slots in a branch cache of the same numbering. A branch
        layer that uses several slots, or shares one, cannot get caches of its own."""
        seen: dict[int, list[int]] = {}
        current: list[int | None] = [None]
        cache = self.new_cache(ctx, 1, 3)
        inner = cache.update

        def update(key_states, value_states, *args, **kwargs):
            idx = args[0] if args else kwargs.get("layer_idx")
            if current[0] is not None and isinstance(idx, int) and idx not in seen.setdefault(current[0], []):
                seen[current[0]].append(idx)
            return inner(key_states, value_states, *args, **kwargs)

        cache.update = update
        hooks = []
        for i, layer in enumerate(ctx.layers):
            hooks.append(layer.register_forward_pre_hook(lambda m, a, i=i: current.__setitem__(0, i)))
            hooks.append(layer.register_forward_hook(lambda m, a, o: current.__setitem__(0, None)))
        p = next(ctx.layers.parameters())
        x = torch.randn(1, 3, ctx.dim, generator=torch.Generator().manual_seed(2)).to(p)
        slots = torch.arange(3, device=p.device)
        causal = torch.ones(1, 3, 3, dtype=torch.bool, device=p.device).tril()
        try:
            with torch.no_grad():
                self.run(ctx, x, slots[None], slots, slots, causal, cache)
        except Exception as e:  # noqa: BLE001 - a decoder that cannot run on its caches is refused, naming why
            raise RecipeError(
                "backend",
                f"{type(ctx.decoder).__name__} cannot run on the runner's caches ({type(e).__name__}: {e})",
                ctx.recipe.source,
            ) from e
        finally:
            for h in hooks:
                h.remove()
        b, k = ctx.branch_index, ctx.recipe.flashar.branch_depth
        for i in range(b, b + k):
            mine = seen.get(i, [])
            shared = [j for j, v in seen.items() if j != i and set(v) & set(mine)]
            if len(mine) > 1 or shared:
                how = (
                    f"hands its cache the indices {mine}"
                    if len(mine) > 1
                    else f"shares cache slot {mine[0]} with {shared}"
                )
                raise RecipeError(
                    "flashar.branch_layer",
                    f"decoder layer {i} {how}: a branch copy of it cannot get a cache of its own; "
                    "put the branch on other layers",
                    ctx.recipe.source,
                )
        return {i: v[0] for i, v in seen.items() if len(v) == 1}

    def max_positions(self, ctx):
        cfg = getattr(ctx.decoder, "config", None)
        bands = [w for mod, name, w in self._builtin_causal(ctx.layers) if w < getattr(mod, name).shape[-1]]
        limits = [getattr(cfg, "max_position_embeddings", None), sliding_window(cfg), *bands]
        limits = [x for x in limits if isinstance(x, int)]
        return min(limits) if limits else None

    def run(self, ctx, embeds, positions, slots, key_slots, allowed, cache, entries=None):
        # allowed is [B, T, S] or [B, 1, S] (one row for every query); the model gets a full
        # additive [B, 1, T, S] mask (a bool 4D mask is silently wrong under eager attention).
        B, T, S = allowed.shape[0], embeds.shape[1], allowed.shape[-1]
        if entries is not None:  # static caches: branch_call hands the same entries to the branch's cache
            cache.entries = self.entries = entries
        if entries is None and allowed.shape[1] == 1 and getattr(cache, "feed_order", False):
            mask = mask_row(cache, allowed, embeds.dtype)[:, :, :, :S].expand(-1, -1, T, -1)
        else:
            mask = torch.zeros((B, T, S), dtype=embeds.dtype, device=embeds.device)
            mask = mask.masked_fill(~allowed, torch.finfo(embeds.dtype).min)[:, None]
        kwargs = {self.cache_key: cache}
        hooks = []
        if self.mask_at_layers:
            self.layer_mask = mask  # branch_call gives the branch layers the same mask
            hooks = [
                layer.register_forward_pre_hook(
                    lambda m, a, k: replace_mask(m, a, k, mask), with_kwargs=True, prepend=True
                )
                for layer in ctx.layers
            ]
        found = self._builtin_causal(ctx.layers)
        if (
            found
            and torch.is_grad_enabled()
            and any(getattr(m, "gradient_checkpointing", False) and m.training for m in ctx.layers)
        ):
            # a recomputed forward (in backward) would run outside the swap, with the causal buffer
            raise RuntimeError(
                f"{type(found[0][0]).__name__} applies a built-in causal mask that FlashAR opens only "
                "during its own forwards; gradient checkpointing would recompute the layers with it "
                "closed: disable gradient checkpointing for this model"
            )
        try:
            with causal_buffers_open(found):
                out = ctx.decoder(
                    inputs_embeds=embeds,
                    attention_mask=None if self.mask_at_layers else mask,
                    position_ids=positions,
                    use_cache=cache is not None,
                    **kwargs,
                )
        finally:
            for hk in hooks:
                hk.remove()
        return out[0] if isinstance(out, tuple) else out.last_hidden_state

    def new_cache(self, ctx, batch, max_len, static=False):
        config = getattr(ctx.decoder, "config", None)
        if static and (self.mask_at_layers or self._builtin_causal(ctx.layers)):
            # both swap module state (hooks, buffers) around every forward, which a compiled graph cannot replay
            raise InputError(
                f"compile=True is not available for {type(ctx.decoder).__name__}: its mask reaches the "
                "attention only through per-call layer hooks or by opening a built-in causal buffer; "
                "decode it eagerly (compile=False)"
            )
        if full_attention_only(config):
            return (
                self._static_cache("backbone", ctx, len(ctx.layers), batch, max_len)
                if static
                else FeedOrderCache(len(ctx.layers), max_len)
            )
        if static:
            raise InputError(
                f"compile=True needs static caches; {type(ctx.decoder).__name__} has sliding-window, "
                "chunked, shared-KV or linear-attention layers, which keep transformers' DynamicCache"
            )
        return _dynamic_cache(config)

    def new_branch_cache(self, ctx, batch, max_len, static=False):
        # the copies keep their originals' cache slots: a cache of the same numbering, whose
        # layers are allocated at their first update (only the branch's ever are)
        config = getattr(ctx.decoder, "config", None)
        if full_attention_only(config):
            n = max(self.cache_slots.values(), default=len(ctx.layers) - 1) + 1
            if static:
                cache = self._static_cache("branch", ctx, n, batch, max_len)
                self._pair_layers(ctx, cache)
                return cache
            return FeedOrderCache(n, max_len)
        return _dynamic_cache(config)  # the originals' layer types at the originals' slots

    def _pair_layers(self, ctx, branch_cache) -> None:
        """At the start of a compiled run: the fused branch layer, if the layers allow one,
        loaded with their current weights for this run's ``branch_cache`` (only a run it was
        checked and loaded for uses it), else None and one line saying why."""
        self.pair_for = None
        if not self.fuse_branch_layer:  # the pair, if any, is kept for when it is switched on again
            return
        b = ctx.branch_index
        layer, branch = ctx.layers[b], list(ctx.flashar.branch_layers)
        reason = why_not(layer, branch, self.cache_slots.get(b))
        key = PairedLayer.key_of(layer, branch[0]) if reason is None else None
        reason = reason or self.pair_failed.get(key)
        if reason is not None:
            self._refuse_pair(ctx, reason)
            return
        if self.pair is None or self.pair.key != key:
            self.pair = PairedLayer(layer, branch[0], self.cache_slots[b])
        install_paired_forward(layer)
        self.pair.load()
        self.pair_for = branch_cache

    def _refuse_pair(self, ctx, reason: str, failed: bool = False) -> None:
        b = ctx.branch_index
        layer = ctx.layers[b]
        if failed:
            self.pair_failed[self.pair.key] = reason
        said = (id(layer), reason)
        if said not in self.pair_said:
            self.pair_said.add(said)
            log.info("flashar-adapt: the vertical branch runs beside decoder layer %d, not fused: %s", b, reason)
        self.pair = self.pair_for = None
        uninstall_paired_forward(layer)

    def run_with_branch(self, ctx, embeds, positions, slots, key_slots, allowed, cache, branch_cache, entries=None):
        # eager decoding, and a run the pair was not loaded for (switched on mid-run): the two calls
        pair = self.pair if entries is not None and self.pair_for is branch_cache else None
        if pair is None:
            return run_then_branch(ctx, embeds, positions, slots, key_slots, allowed, cache, branch_cache, entries)
        if not pair.holds(cache, branch_cache):  # a compiled run's prefill on caches new to the pair
            return self._adopt(ctx, pair, embeds, positions, slots, key_slots, allowed, cache, branch_cache, entries)
        if not in_graph():  # a compiled run's eager calls (its first step): vmap costs more than it saves there
            return run_then_branch(ctx, embeds, positions, slots, key_slots, allowed, cache, branch_cache, entries)
        ACTIVE.pair = pair
        try:
            h = self.run(ctx, embeds, positions, slots, key_slots, allowed, cache, entries)
            return h, ACTIVE.branch_out
        finally:
            ACTIVE.pair = ACTIVE.branch_out = None

    def _adopt(self, ctx, pair, embeds, positions, slots, key_slots, allowed, cache, branch_cache, entries):
        """Run the prefill separately, stack the two slot buffers it filled into the pair's,
        and check the fused call on the prefill's own inputs against what the separate calls
        gave (outputs and the keys and values written); refuse the pair if it differs."""
        seen = {}
        hook = ctx.layers[ctx.branch_index].register_forward_hook(
            lambda m, a, k, o: seen.update(args=a, kwargs=k, out=o), with_kwargs=True
        )
        try:
            h, x = run_then_branch(ctx, embeds, positions, slots, key_slots, allowed, cache, branch_cache, entries)
        finally:
            hook.remove()
        pair.adopt(cache, branch_cache)
        # zeros: the call must write what it attends (the prefill attends only its own entries)
        keys, values = torch.zeros_like(pair.keys), torch.zeros_like(pair.values)
        try:
            out = pair(seen["args"], seen["kwargs"], keys, values)
            got = (out[0] if isinstance(out, tuple) else out, ACTIVE.branch_out, keys, values)
        except Exception as e:  # noqa: BLE001 - any failure of the fused call: the layers run separately
            self._refuse_pair(ctx, f"the fused call fails ({type(e).__name__}: {e})", failed=True)
            return h, x
        finally:
            ACTIVE.branch_out = None
        ref = seen["out"][0] if isinstance(seen["out"], tuple) else seen["out"]
        e = entries  # the entries the prefill wrote (the rest may hold an earlier run's)
        got = (*got[:2], got[2][:, :, :, e], got[3][:, :, :, e])
        for a, r in zip(got, (ref, x, pair.keys[:, :, :, e], pair.values[:, :, :, e]), strict=True):
            # detection threshold, not a proof (the tests bound the values): one sum order
            # against another differs by round-off, a fused call that is another function by O(|r|)
            tol = (1e-3 if r.dtype == torch.float32 else 5e-2) * (1 + r.abs().max().item())
            if a.shape != r.shape or (a - r).abs().max().item() > tol:
                self._refuse_pair(ctx, "its fused call differs from the two separate calls", failed=True)
                break
        return h, x

    def unbind(self, ctx) -> None:
        uninstall_paired_forward(ctx.layers[ctx.branch_index])
        self.pair = self.pair_for = None

    def _static_cache(self, which: str, ctx, n_layers: int, batch: int, max_len: int):
        """Static caches live from one generate() call to the next of the same shape (a CUDA
        graph of the compiled step replays on their buffers); stale entries are never seen
        (every entry a step attends unmasked was written earlier in the same run)."""
        p = next(ctx.layers.parameters())
        key = (n_layers, batch, max_len, p.dtype, p.device)
        held = self.static_held
        if which not in held or held[which][0] != key:
            held[which] = (key, FeedOrderCache(n_layers, max_len, static=True))
        return held[which][1]

    def branch_call(self, layer, hidden, args, kwargs, cache):
        # The backbone's cache, wherever the decoder put it (any keyword, or positionally), is
        # swapped for the branch's own by type.
        kw = {k: (cache if is_cache(v) else v) for k, v in kwargs.items()}
        rest = tuple(cache if is_cache(a) else a for a in args[1:])
        if getattr(cache, "static", False):
            cache.entries = self.entries
        if self.mask_at_layers:
            rest, kw = replace_mask(layer, (hidden, *rest), kw, self.layer_mask)
            rest = rest[1:]
        with causal_buffers_open(self._builtin_causal(layer)):
            if args:
                out = layer(hidden, *rest, **kw)
            else:
                kw["hidden_states"] = hidden
                out = layer(**kw)
        return out[0] if isinstance(out, tuple) else out

    def _builtin_causal(self, module) -> list[tuple]:
        found = self.causal_found
        if id(module) not in found:
            found[id(module)] = causal_buffers(module)
        return found[id(module)]


# ---------------------------------------------------------------- files
