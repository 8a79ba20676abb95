"""GLM-Image (transformers ``GlmImageForConditionalGeneration``): the transformers runner, plus
the model's own generation as the doctor's reference.

GLM-Image positions image tokens on three axes (M-RoPE: a cell (r, c) of a grid starting at P
sits at (P, P + r, P + c)) and decodes a preview grid before the main one; its own forward on
input ids gives every token one-axis positions, which agree with its own generation only on
the prompt. So ``check`` compares greedy raster codes with the model's own greedy ``generate``
(``reference_generation``), called as transformers' text-to-image path calls it
(``image_grid_thw`` lists the main grid first and the preview last; decoding runs the list
backwards, preview first: ``GlmImageModel.get_rope_index`` in transformers'
``models/glm_image/modeling_glm_image.py``). Everything else is the transformers runner: the
recipe's ``image.positions: grid`` hands the text model position ids [3, B, T], which it takes
as they are.
"""

from __future__ import annotations

import types

import torch

from .hf import TransformersRunner


class GlmImageRunner(TransformersRunner):
    name = "glm-image"
    reference_generation = True

    def reference_generate(self, ctx, cond, grid, cond_mask=None):
        grid = (int(grid[0]), int(grid[1]))
        B, dev = cond.shape[0], cond.device
        meta = torch.tensor(ctx.meta_ids(grid), dtype=torch.long, device=dev).expand(B, -1)
        prompt = torch.cat([cond.long(), meta], 1)
        if cond_mask is not None:  # left padding, as the patched prefix takes it
            mask = torch.cat([cond_mask.long(), torch.ones_like(meta)], 1)
        small = ctx.preview_grid(grid)
        grids = ([small] if small is not None else []) + [grid]  # decoding order
        thw = torch.tensor([[1, h, w] for h, w in reversed(grids)] * B, device=dev)  # upstream's order: main first
        n = sum(h * w for h, w in grids)
        # the model's own generate, not FlashAR's (patch put that one on the instance)
        own = ctx.old_generate if ctx.had_generate else types.MethodType(type(ctx.model).generate, ctx.model)
        with torch.no_grad():
            out = own(
                input_ids=prompt,
                attention_mask=torch.ones_like(prompt) if cond_mask is None else mask,
                image_grid_thw=thw,
                images_per_sample=torch.full((B,), len(grids), device=dev),
                max_new_tokens=n,
                do_sample=False,
                eos_token_id=None,  # every cell is generated: an end id where a code belongs is a wrong code (-1)
            )
        seq = out.sequences if hasattr(out, "sequences") else out
        new = seq[:, prompt.shape[1] :] - ctx.recipe.image.visual_token_offset
        new = new.masked_fill((new < 0) | (new >= ctx.recipe.image.codebook_size), -1)
        result, at = [], 0
        for h, w in grids:
            result.append(new[:, at : at + h * w].reshape(B, h, w))
            at += h * w
        return result
