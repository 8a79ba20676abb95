"""The recipe doctor: ``check(model, recipe)`` verifies a recipe on the real model.

1. patch: the recipe fits the model (paths, ids, positions) -- else the RecipeError's key.
2. raster: when the runner can run the model's own generation (``reference_generation``: a
   ``generate`` that produces image tokens), greedy raster codes from the patched model equal
   the model's own greedy generation for the same prompt, every grid (a preview, then the
   image). Otherwise the patched raster logits equal the model's own next-token logits for the same
   sequence (prompt, forced meta tokens, codes at their vocabulary ids, end-of-line tokens).
   The reference is, in order: the runner's own reference forward (if it declares one); the
   model's forward on input ids sliced to the visual ids; and, when that forward alters
   image logits (some models mask them), the family-agnostic rule "apply the recipe's head
   to the decoder's last_hidden_state" run with the decoder's *own* default causal mask
   and positions.
3. two_way, raster_dec: decoding with caches equals teacher forcing, on values: the sample's
   codes forced through every step (``prefill`` / ``step``), each step's logits against one
   teacher-forced pass (``fa.logits``) under the derived float bound (``exactness``), in both
   modes. (``patch`` has already probed that the decoder's outputs do not depend on the order
   its tokens are fed: ``probes``.)
4. steps: the two-way decoder calls the first decoder layer H+W-1 times.

Also available as ``flashar-adapt check MODEL RECIPE`` (``flashar_adapt.commands.inspect_check``).
"""

from __future__ import annotations

import inspect as _inspect
from dataclasses import dataclass, field

import torch
from torch import nn

from .decoding import build_prefix, grid_shape, logits, sequence_embeds
from .errors import InputError
from .exactness import steps_match_teacher
from .heads import finish_logits
from .logit_maps import find_logit_map
from .patching import context, patch, unpatch
from .recipe import Recipe, RecipeError, load_recipe
from .validate import Num

PASS, FAIL, SKIP, INFO = "pass", "fail", "skip", "info"
STEP_ITEMS = {"two_way": "two_way", "raster": "raster_dec"}  # the report item checking each mode's decoding


@dataclass
class Item:
    name: str
    status: str
    detail: str
    key: str | None = None

    def __str__(self) -> str:
        key = f"  [recipe key: {self.key}]" if self.key and self.status == FAIL else ""
        return f"{self.status.upper():4s}  {self.name:10s} {self.detail}{key}"


@dataclass
class Report:
    recipe: str | None
    model_class: str
    grid: tuple[int, int] | None = None
    items: list[Item] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(i.status != FAIL for i in self.items) and any(i.status == PASS for i in self.items)

    @property
    def failed_keys(self) -> list[str]:
        return [i.key for i in self.items if i.status == FAIL and i.key]

    def item(self, name: str) -> Item:
        return next(i for i in self.items if i.name == name)

    def add(self, *a, **k) -> Item:
        it = Item(*a, **k)
        self.items.append(it)
        return it

    def __str__(self) -> str:
        head = f"recipe {self.recipe or '?'} on {self.model_class}" + (f", grid {list(self.grid)}" if self.grid else "")
        lines = [head] + [str(i) for i in self.items]
        lines.append(
            "RESULT: "
            + (
                "pass"
                if self.ok
                else "FAIL" + (f" (check {', '.join(dict.fromkeys(self.failed_keys))})" if self.failed_keys else "")
            )
        )
        return "\n".join(lines)


# ---------------------------------------------------------------- inputs


def _sample_inputs(ctx, grid, batch: int = 2, seed: int = 0):
    c = ctx.recipe.condition
    g = torch.Generator().manual_seed(seed)
    if c.kind == "class":
        cond = torch.arange(batch) % c.num_classes
    elif c.kind == "features":
        lin = next((m for m in ctx.cond_embed.modules() if isinstance(m, nn.Linear)), None)
        if lin is None:
            raise ValueError("cannot tell the condition feature size; pass cond=")
        cond = torch.randn(batch, c.prefix_len, lin.in_features, generator=g)
    else:
        top = min(ctx.vocab_size or 1000, 1000)
        cond = torch.randint(1, top, (batch, min(4, c.prefix_len or 4)), generator=g)  # prefix_len: a limit, maybe none
    codes = torch.randint(0, ctx.recipe.image.codebook_size, (batch, *grid), generator=g)
    small = ctx.preview_grid(grid)
    preview = None if small is None else torch.randint(0, ctx.recipe.image.codebook_size, (batch, *small), generator=g)
    return cond, codes, preview


def _default_grid(recipe: Recipe) -> tuple[int, int]:
    H, W = recipe.image.grid
    if not recipe.image.variable_grid:
        return H, W
    d = recipe.image.size_token_divisor
    return (max(d, min(H, 3 * d) // d * d), max(d, min(W, 4 * d) // d * d))


# ---------------------------------------------------------------- references


def _image_ids(ctx, codes):
    """Codes at their vocabulary ids, rows closed by the end-of-line token, the last row by
    ``image.last_row_end`` where the recipe has one: [B, H * row_len]."""
    im = ctx.recipe.image
    ids = codes + im.visual_token_offset
    if im.eol_token is not None:
        ids = torch.cat([ids, torch.full((*codes.shape[:2], 1), im.eol_token, dtype=ids.dtype, device=ids.device)], 2)
        if im.last_row_end is not None:
            ids[:, -1, -1] = im.last_row_end
    return ids.flatten(1)


def _pred_index(ctx, prefix_len, grid):
    """Sequence index whose output predicts each cell: [H * W]."""
    lay = ctx.layout(prefix_len, grid)
    return (lay.cell_slots - 1).flatten()


def _visual_slice(ctx, full):
    im = ctx.recipe.image
    if full.shape[-1] == im.codebook_size:
        return full
    return full[..., im.visual_token_offset : im.visual_token_offset + im.codebook_size]


def _hidden_rule(ctx, cond, codes, grid):
    """head(decoder(inputs_embeds).last_hidden_state) with the decoder's default mask/positions,
    mapped as the recipe's ``logits`` says."""
    pre = build_prefix(ctx, cond, None, grid, guided=False)
    B = codes.shape[0]
    embeds = sequence_embeds(ctx, pre, ctx.layout(pre.length, grid), codes)
    out = ctx.decoder(inputs_embeds=embeds, use_cache=False)
    h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    idx = _pred_index(ctx, pre.length, grid)
    lg = finish_logits(_visual_slice(ctx, ctx.head(h[:, idx])), ctx.recipe.logits.scale, ctx.recipe.logits.softcap)
    return lg.view(B, *grid, -1).float()


def _own_ids(ctx, cond, codes, grid):
    """The raster sequence as input ids: prompt, forced tokens, codes at their vocabulary ids
    with the end-of-line tokens; only the tokens ever fed (the last code predicts nothing), as
    the patched model runs them."""
    meta = torch.tensor(ctx.meta_ids(grid), dtype=torch.long, device=cond.device).expand(cond.shape[0], -1)
    P = cond.shape[1] + meta.shape[1]
    return torch.cat([cond, meta, _image_ids(ctx, codes)], 1)[:, : ctx.layout(P, grid).fed_len]


def _own_forward(ctx, cond, codes, grid):
    """The model's own forward on input ids, full vocabulary at the predicting positions."""
    out = ctx.model(input_ids=_own_ids(ctx, cond, codes, grid), use_cache=False)
    lg = out.logits if hasattr(out, "logits") else out[0]
    idx = _pred_index(ctx, cond.shape[1] + len(ctx.meta_ids(grid)), grid)
    return lg[:, idx].float().view(cond.shape[0], *grid, -1)


def _find_offset(ours, full, tol):
    """Where in the full vocabulary do our codebook logits sit? (None if nowhere)"""
    a = ours.reshape(-1, ours.shape[-1])[0]
    f = full.reshape(-1, full.shape[-1])[0]
    K = a.shape[0]
    for o in torch.nonzero((f[: f.shape[0] - K + 1] - a[0]).abs() <= tol).flatten().tolist()[:64]:
        if torch.allclose(f[o : o + K], a, atol=tol, rtol=0):
            return o
    return None


_LOGIT_MAP_WORDS = {"logits.scale": "times a logit scale of", "logits.softcap": "soft-capped (tanh) at"}


def _check_generation(ctx, model, rep, cond, grid):
    """Greedy raster codes of the patched model, every grid, against the model's own greedy
    generation (the runner's ``reference_generate``): the check that sees wrong positions,
    which a reference forward with the same wrong positions would not."""
    small = ctx.preview_grid(grid)
    with torch.no_grad():
        theirs = ctx.runner.reference_generate(ctx, cond, grid)
        out = model.generate(cond, mode="raster", grid=grid, top_k=1, return_preview=small is not None)
    ours = [out[1], out[0]] if small is not None else [out]
    names = (["preview"] if small is not None else []) + ["image"]
    sizes = " then ".join(f"{n} {a.shape[1]}x{a.shape[2]}" for n, a in zip(names, ours))
    # a model whose head is wider than its codebook may pick another id (-1 here), which the
    # patched decoder never samples: each image is compared up to that cell, in decoding order
    mine, ref = (torch.cat([g.flatten(1).cpu() for g in x], 1) for x in (ours, theirs))
    compared = torch.cumprod((ref >= 0).long(), 1).bool()
    n = int(compared.sum())
    cut = (
        ""
        if bool(compared.all())
        else f"; the model's own generate chose ids outside the codebook: {n} of {ref.numel()} cells compared"
    )
    if n == 0:
        return rep.add(
            "raster", SKIP, "no reference: the model's own generate starts every image with an id outside the codebook"
        )
    wrong = (mine != ref) & compared
    if not bool(wrong.any()):
        return rep.add("raster", PASS, f"greedy raster codes equal the model's own generate ({sizes}{cut})")
    at, said = 0, []
    for name, g in zip(names, ours):
        k = g[0].numel()
        said.append(f"{int(wrong[:, at : at + k].sum())} of {int(compared[:, at : at + k].sum())} {name} cells")
        at += k
    return rep.add(
        "raster",
        FAIL,
        f"greedy raster codes differ from the model's own generate in {', '.join(said)}{cut}: the model positions "
        "or orders its image tokens otherwise (check image.positions, image.preview_grid / image.preview_side)",
        key="image.positions",
    )


def _check_raster(ctx, model, rep, cond, codes, grid, atol):
    if ctx.runner.reference_generation:
        return _check_generation(ctx, model, rep, cond, grid)
    ours = logits(model, cond, codes, mode="raster").float()
    if ctx.runner.reference_forward:
        with torch.no_grad():
            ref = ctx.runner.reference_logits(ctx, cond, codes).float()
        d = (ours - ref).abs().max().item()
        if d <= atol:
            return rep.add("raster", PASS, f"patched raster logits equal the model's own forward (max diff {d:.2e})")
        return rep.add(
            "raster",
            FAIL,
            f"patched raster logits differ from the model's own forward by {d:.3g}",
            key="modules.layers",
        )
    hidden_ok, hidden_d = None, None
    if hasattr(ctx.decoder, "forward") and "inputs_embeds" in _inspect.signature(ctx.decoder.forward).parameters:
        with torch.no_grad():
            hid = _hidden_rule(ctx, cond, codes, grid)
        hidden_d = (ours - hid).abs().max().item()
        hidden_ok = hidden_d <= atol
    full = None
    if ctx.recipe.condition.kind == "tokens" and not ctx.image_embed:
        try:
            with torch.no_grad():
                full = _own_forward(ctx, cond, codes, grid)
        except Exception as e:  # noqa: BLE001 - a forward that does not take input_ids: rely on the hidden rule
            rep.add(
                "forward", SKIP, f"model(input_ids=...) failed ({type(e).__name__}: {e}); using the hidden-state rule"
            )
    if full is not None:
        return _against_own_forward(ctx, rep, cond, codes, grid, ours, full, atol, hidden_ok, hidden_d)
    if hidden_ok is None:
        return rep.add(
            "raster", SKIP, "no reference: the runner has no reference forward and the decoder takes no inputs_embeds"
        )
    if hidden_ok:
        return rep.add("raster", PASS, f"patched raster logits equal head(last_hidden_state) (max diff {hidden_d:.2e})")
    return rep.add(
        "raster",
        FAIL,
        f"patched raster logits differ from head(last_hidden_state) by {hidden_d:.3g}",
        key="modules.decoder",
    )


def _against_own_forward(ctx, rep, cond, codes, grid, ours, full, atol, hidden_ok, hidden_d):
    """The raster item from the model's own forward ``full`` (all vocabulary logits): equal,
    equal where that forward does not mask image logits, or which recipe key is wrong."""
    own = _visual_slice(ctx, full)
    d = (ours - own).abs().max().item()
    if d <= atol:
        return rep.add(
            "raster",
            PASS,
            f"patched raster logits equal the model's own forward sliced to the visual ids (max diff {d:.2e})",
        )
    masked = ~torch.isfinite(own) | (own < -1e30)  # some forwards mask image logits (set them to -inf / min)
    rest = (ours - own)[~masked].abs().max().item() if (~masked).any() else 0.0
    if masked.any() and rest <= atol and hidden_ok is not False:
        how = f"equal head(last_hidden_state) (max diff {hidden_d:.2e})" if hidden_ok else "were not compared"
        return rep.add(
            "raster",
            PASS,
            f"the model's forward masks {masked.float().mean().item():.0%} of the image "
            f"logits; the unmasked ones equal ours and all of ours {how}",
        )
    if hidden_ok is False:
        return rep.add(
            "raster",
            FAIL,
            f"patched raster logits differ from head(last_hidden_state) by {hidden_d:.3g}: "
            "the decoder run by the runner is not the model's decoder",
            key="modules.decoder",
        )
    if hidden_ok:
        item = _logit_map_item(ctx, rep, cond, codes, grid)
        if item is not None:
            return item
    o = _find_offset(ours, full, atol)
    if o is not None and o != ctx.recipe.image.visual_token_offset:
        return rep.add(
            "raster",
            FAIL,
            f"codebook logits found at vocabulary offset {o}, recipe says {ctx.recipe.image.visual_token_offset}",
            key="image.visual_token_offset",
        )
    return rep.add(
        "raster",
        FAIL,
        f"patched raster logits differ from the model's own forward by {d:.3g} while the "
        "decoder's hidden states agree: the recipe's head is not the one the model uses",
        key="modules.head",
    )


def _logit_map_item(ctx, rep, cond, codes, grid):
    """A failed raster item naming the logit scale / soft-cap the model applies and the recipe
    misses (read off probe forwards at several magnitudes, the model's declared value
    preferred: ``logit_maps``), or None when no such map explains the difference."""
    found = find_logit_map(ctx.model, ctx.decoder, ctx.head, _own_ids(ctx, cond, codes, grid))
    if found is None or found.identity:
        return None
    have = {"logits.scale": ctx.recipe.logits.scale, "logits.softcap": ctx.recipe.logits.softcap}
    want = {"logits.scale": 1.0, "logits.softcap": None, **found.items()}
    wrong = [k for k in have if want[k] != have[k]]
    if not wrong:
        return None
    said = ", ".join(f"{k.split('.')[1]} {have[k]}" for k in wrong)
    return rep.add(
        "raster",
        FAIL,
        "the model's logits are its head's output "
        + " and ".join(f"{_LOGIT_MAP_WORDS[k]} {v:.9g} ({found.sources[k]})" for k, v in found.items().items())
        + f"; the recipe says {said}: "
        + ", ".join(f"set {k}: {want[k]:.9g}" if want[k] is not None else f"set {k}: null" for k in wrong),
        key=wrong[0],
    )


def _check_layout_hints(ctx, rep, cond, codes, grid):
    """On a trained model the own forward should predict visual ids inside rows and the
    end-of-line token at row ends. Informational only (random test models fail it)."""
    if ctx.recipe.condition.kind != "tokens" or ctx.image_embed or ctx.preview_grid(grid) is not None:
        return  # (the sequence below has no preview grid)
    try:
        with torch.no_grad():
            full = _own_forward(ctx, cond, codes, grid)
    except Exception:  # noqa: BLE001
        return
    im = ctx.recipe.image
    arg = full.argmax(-1)
    visual = ((arg >= im.visual_token_offset) & (arg < im.visual_token_offset + im.codebook_size)).float().mean().item()
    msg = f"own forward predicts a visual id at {visual:.0%} of image positions"
    if im.eol_token is not None and grid[0] > 1:
        meta = len(ctx.meta_ids(grid))
        lay = ctx.layout(cond.shape[1] + meta, grid)
        seq = torch.cat(
            [
                cond,
                torch.tensor(ctx.meta_ids(grid), dtype=torch.long, device=cond.device).expand(cond.shape[0], -1),
                _image_ids(ctx, codes),
            ],
            1,
        )
        # Only the tokens decoding ever feeds (the positions check counts those): the last
        # row's end is predicted from the last code, which is never fed, so it is not checked.
        seq = seq[:, : lay.fed_len]
        try:
            with torch.no_grad():
                out = ctx.model(input_ids=seq, use_cache=False)
        except Exception:  # noqa: BLE001 - informational: a model we cannot run this way is skipped
            return rep.add("layout", INFO, msg)
        lg = out.logits if hasattr(out, "logits") else out[0]
        ends = lay.cell_slots[:-1, -1]  # the output at each row's last code predicts the row's end token
        eol_hit = (lg[:, ends.to(lg.device)].argmax(-1) == im.eol_token).float().mean().item()
        msg += f", the row-end token at {eol_hit:.0%} of row ends"
    rep.add(
        "layout",
        INFO,
        msg + " (near 100% on a trained model; else check image.visual_token_offset / image.before / image.eol_token)",
    )


def _check_steps(model, rep, cond, codes, mode: str, preview=None):
    """Every decoding step's logits, the sample's codes forced, against one teacher-forced
    pass, on values under the float bound (``exactness``): the caches, the feeding order and
    (two-way) the vertical branch compute exactly what the model computes in one pass."""
    found = steps_match_teacher(model, cond, codes, mode, preview=preview)
    rep.add(STEP_ITEMS[mode], PASS if found.ok else FAIL, found.describe(), key=None if found.ok else "backend")


# ---------------------------------------------------------------- check


def _backbone_steps(ctx, run) -> tuple:
    """(``run()``, the backbone forwards it made): calls of the first decoder layer, plus the
    runner's fused passes that run a fused branch block in its place (a branch at layer 0 of
    LlamaGen: that block never calls the layer, so its hooks would count nothing)."""
    calls = []
    hook = ctx.layers[0].register_forward_pre_hook(lambda *a: calls.append(1))
    fused = ctx.runner.run_with_branch if ctx.runner.fused_branch else None
    if fused is not None:

        def counted(*a, **k):
            n = len(calls)
            out = fused(*a, **k)
            if len(calls) == n:  # layer 0 ran inside the fused block
                calls.append(1)
            return out

        ctx.runner.run_with_branch = counted
    try:
        return run(), calls
    finally:
        hook.remove()
        if fused is not None:
            del ctx.runner.run_with_branch  # the class's method again


def check(
    model: nn.Module, recipe: Recipe | str | None = None, *, grid=None, cond=None, atol: float = 1e-4, **overrides
) -> Report:
    """Verify ``recipe`` on ``model`` (patched here and unpatched afterwards; an already
    patched model is checked as it is). Returns a Report; ``report.ok`` is the verdict."""
    if Num(0).problem(atol) is not None:
        raise InputError(f"atol must be a finite number >= 0, got {atol!r}")
    grid = None if grid is None else grid_shape(grid)
    already = getattr(model, "flashar", None) is not None
    if already and (recipe is not None or overrides):
        raise InputError(
            "model is already patched: check it as it is (no recipe, no overrides), or fa.unpatch(model) first "
            "to check another recipe"
        )
    if not already:
        if grid is not None:
            overrides.setdefault("grid", list(grid))  # check (and patch) at this grid
        failed = _patch_for_check(model, recipe, overrides)
        if failed is not None:
            return failed
    ctx = context(model)
    rep = Report(ctx.recipe.name, type(model).__name__)
    rep.add(
        "patch",
        PASS,
        "recipe fits the model (paths, layer indices, token ids, positions)"
        if not already
        else "model was already patched; checking it as it is",
    )
    try:
        rep.grid = g = grid or _default_grid(ctx.recipe)
        s_cond, codes, preview = _check_inputs(ctx, g, cond)
        was_training = model.training
        model.eval()
        try:
            _check_raster(ctx, model, rep, s_cond, codes, g, atol)
            _check_layout_hints(ctx, rep, s_cond, codes, g)
            for mode in ("two_way", "raster"):
                _check_steps(model, rep, s_cond, codes, mode, preview)
            _check_step_count(ctx, model, rep, s_cond, g)
        finally:
            model.train(was_training)
    except RecipeError as e:
        rep.add("run", FAIL, str(e), key=e.key)
    except InputError as e:  # what was asked of the check (its cond, its grid for this recipe), not the backend
        rep.add("run", FAIL, str(e))
    except Exception as e:  # noqa: BLE001 - report, do not crash the doctor
        rep.add("run", FAIL, f"{type(e).__name__}: {e}", key="backend")
    finally:
        if not already:
            unpatch(model)
    return rep


def _patch_for_check(model, recipe, overrides: dict) -> Report | None:
    """Patch ``model`` for the check; a recipe that does not fit is the report (its one item)."""
    name = None
    try:
        if recipe is not None:
            recipe = load_recipe(recipe)
            name = recipe.name
        patch(model, recipe, **overrides)
    except RecipeError as e:
        rep = Report(name, type(model).__name__)
        rep.add("patch", FAIL, str(e), key=e.key)
        return rep
    return None


def _check_inputs(ctx, g: tuple[int, int], cond):
    """The condition, codes and preview the check decodes (the given ``cond``, else sample
    ones), on the model's device."""
    s_cond, codes, preview = _sample_inputs(ctx, g)
    if cond is not None:
        s_cond = torch.as_tensor(cond)
        codes = codes[:1].expand(s_cond.shape[0], -1, -1).clone()
        preview = None if preview is None else preview[:1].expand(s_cond.shape[0], -1, -1).clone()
    dev = next(ctx.layers.parameters()).device
    return s_cond.to(dev), codes.to(dev), None if preview is None else preview.to(dev)


def _check_step_count(ctx, model, rep: Report, s_cond, g: tuple[int, int]) -> None:
    """Two-way decoding runs H+W-1 backbone steps (after the preview's, raster)."""
    _, calls = _backbone_steps(ctx, lambda: model.generate(s_cond, top_k=1, grid=g))
    small = ctx.preview_grid(g)
    first = 0 if small is None else small[0] * small[1]  # the preview, raster
    want = first + g[0] + g[1] - 1
    before = "" if small is None else f"{first} for the {small[0]}x{small[1]} preview + "
    rep.add(
        "steps",
        PASS if len(calls) == want else FAIL,
        f"{len(calls)} backbone steps for a {g[0]}x{g[1]} grid ({before}H+W-1 = {want}, raster {first + g[0] * g[1]})",
        key=None if len(calls) == want else "modules.layers",
    )
