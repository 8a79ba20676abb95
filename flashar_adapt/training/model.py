"""The model a run trains: the base model patched by the recipe, what each stage trains
(parameter groups, LoRA adapters), and the frozen teacher for distillation."""

from __future__ import annotations

from torch import nn

from ..adapters import lora_layers, lora_parameters
from ..formats import load_spec
from ..patching import backbone_only, context, patch
from ..recipe import load_recipe
from .config import TrainConfig, TrainingError


def build_model(cfg: TrainConfig) -> nn.Module:
    """Load the base model, patch it, and (for a resumed stage-2 LoRA run) add adapters."""
    model = load_spec(cfg.model)
    recipe = load_recipe(cfg.recipe)
    if cfg.recipe_overrides:
        recipe = recipe.replace(**cfg.recipe_overrides)
    patch(model, recipe, fixed_gate=cfg.fixed_gate)
    return model


def backbone_parameters(model) -> list[nn.Parameter]:
    """The parameters the decoder path uses (layers, norm, heads, embeddings): what stage 2
    unfreezes. Other towers (VQ model, vision encoder) stay frozen."""
    ctx = context(model)
    seen, out = set(), []
    mods = [ctx.layers, ctx.norm, ctx.head, ctx.embed, *ctx.image_embed]
    if ctx.cond_embed is not None:
        mods.append(ctx.cond_embed)
    for m in mods:
        for p in m.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
    return out


def add_lora(model, r: int | None = None, alpha: int | None = None, dropout: float | None = None) -> int:
    """Inject peft LoRA adapters on the recipe's target modules (decoder layers only)."""
    from peft import LoraConfig, inject_adapter_in_model  # optional dependency (the "train" extra)

    ctx = context(model)
    lo = ctx.recipe.lora
    if not lo.targets:
        raise TrainingError(f"recipe {ctx.recipe.name!r} names no lora.targets; add them or use full fine-tuning")
    pattern = "|".join(f"(?:{t})" for t in lo.targets)
    cfg = LoraConfig(
        r=r or lo.r,
        lora_alpha=alpha or lo.alpha,
        lora_dropout=lo.dropout if dropout is None else dropout,
        target_modules=pattern,
        bias="none",
    )
    before = {n for n, _ in lora_layers(model)}
    with backbone_only(model):  # the branch is trained in full, never wrapped
        inject_adapter_in_model(cfg, model)
    ctx.adapter_layers += [n for n, _ in lora_layers(model) if n not in before]  # ours: unpatch removes them
    n = len(lora_parameters(model))
    if n == 0:
        raise TrainingError(f"lora.targets {list(lo.targets)} matched no module of the model")
    rank = cfg.r
    widths = [min(m.in_features, m.out_features) for _, m in lora_layers(model) if hasattr(m, "in_features")]
    if widths and rank > min(widths):  # a factor wider than the layer: more parameters, no more freedom
        print(
            f"train: lora.r {rank} is larger than the narrowest adapted layer ({min(widths)}): its adapters hold "
            f"more parameters than the layer itself and alpha/r = {cfg.lora_alpha}/{rank} scales them down"
        )
    return n


def param_groups(model, cfg: TrainConfig, stage: int) -> list[dict]:
    """The optimizer's parameter groups for ``stage`` (pure: the model is not changed):
    the FlashAR modules always; in stage 2 also the LoRA adapters or the decoder path."""
    flash = [
        p
        for n, p in model.flashar.named_parameters()
        if not (model.flashar.fixed_gate is not None and n.startswith("gate."))
    ]  # unused when fixed
    st = cfg.stage1 if stage == 1 else cfg.stage2
    groups = [{"params": flash, "lr": st.lr, "name": "flashar"}]
    if stage == 2:
        if st.lora:
            groups.append({"params": lora_parameters(model), "lr": st.lr * st.lora_lr_scale, "name": "lora"})
        else:
            groups.append(
                {"params": backbone_parameters(model), "lr": st.lr * st.backbone_lr_scale, "name": "backbone"}
            )
    for g in groups:
        g["initial_lr"] = g["lr"]
    return groups


def set_trainable(model, groups: list[dict]) -> None:
    """Gradients for exactly the parameters in ``groups``; the rest of the model is frozen."""
    for p in model.parameters():
        p.requires_grad_(False)
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)


def trainable_state(model) -> dict:
    """Everything training may have changed: FlashAR modules, LoRA weights, and (stage 2
    full) the decoder-path parameters. Names are the model's own."""
    keep = {id(p) for p in model.parameters() if p.requires_grad}
    keep |= {id(p) for p in model.flashar.parameters()}
    return {n: p.detach().clone() for n, p in model.named_parameters() if id(p) in keep}


def frozen_teacher(cfg: TrainConfig, device) -> nn.Module:
    """The original model, loaded again from the config (so a resumed run gets the same
    teacher), for distillation while full fine-tuning changes the trained copy."""
    t = build_model(cfg).to(device).eval()
    for p in t.parameters():
        p.requires_grad_(False)
    return t


def enable_gradient_checkpointing(model) -> None:
    context(model).gradient_checkpointing = True
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
