"""The loss of both stages::

CE(fused) + w_v * CE(vertical alone) + w_kd * T^2 * KL(raster teacher || vertical)
          + w_kd_fused * Tf^2 * KL(raster teacher || fused)
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters import adapters_disabled
from ..decoding import teacher_forward
from .config import TrainConfig


class FlashARLoss(nn.Module):
    """Wraps the patched model so accelerate/DDP see one forward that returns the losses."""

    def __init__(self, model: nn.Module, cfg: TrainConfig, stage: int, teacher: nn.Module | None = None):
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.stage = stage
        # Kept out of the module tree so that DDP, the optimizer and checkpoints never see it.
        self.__dict__["teacher"] = teacher

    def _teacher_logits(self, cond, codes, cond_mask, preview=None):
        with torch.no_grad():
            if self.teacher is not None:
                return teacher_forward(self.teacher, cond, codes, "raster", cond_mask, preview=preview).fused
            with adapters_disabled(self.model) if self.stage == 2 else contextlib.nullcontext():
                return teacher_forward(self.model, cond, codes, "raster", cond_mask, preview=preview).fused

    def forward(self, cond, codes, cond_mask=None, preview=None):
        """``preview``: the preview grid's codes the image is conditioned on (recipes with
        one); the loss is the image's (the preview stays raster)."""
        cfg = self.cfg
        out = teacher_forward(self.model, cond, codes, "two_way", cond_mask, preview=preview)
        K = out.fused.shape[-1]
        ce = F.cross_entropy(out.fused.reshape(-1, K), codes.reshape(-1))
        has_v = torch.zeros(codes.shape[1:], dtype=torch.bool, device=codes.device)
        has_v[1:] = True
        lv = out.vertical[:, has_v]  # [B, n, K]
        tv = codes[:, has_v]
        ce_v = F.cross_entropy(lv.reshape(-1, K), tv.reshape(-1)) if lv.numel() else ce.new_zeros(())
        kd = ce.new_zeros(())
        kd_f = ce.new_zeros(())
        if (cfg.w_kd > 0 and lv.numel()) or cfg.w_kd_fused > 0:
            teach = self._teacher_logits(cond, codes, cond_mask, preview).float()
            if cfg.w_kd > 0 and lv.numel():
                kd = kd_loss(lv, teach[:, has_v], cfg.kd_temperature)
            if cfg.w_kd_fused > 0:
                kd_f = kd_loss(out.fused, teach, cfg.kd_fused_temperature)
        loss = ce + cfg.w_v * ce_v + cfg.w_kd * kd + cfg.w_kd_fused * kd_f
        gate = out.gate[:, 1:, 1:].mean() if out.gate is not None and out.gate[:, 1:, 1:].numel() else ce.new_zeros(())
        res = {
            "loss": loss,
            "ce_fused": ce.detach(),
            "ce_vertical": ce_v.detach(),
            "kd": kd.detach(),
            "gate": gate.detach(),
        }
        if cfg.w_kd_fused > 0:
            res["kd_fused"] = kd_f.detach()
        return res


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, T: float) -> torch.Tensor:
    """T^2 * KL(teacher || student) per token, over the last dimension."""
    K = student.shape[-1]
    p_t = F.log_softmax(teacher / T, -1).reshape(-1, K)
    p_s = F.log_softmax(student.float() / T, -1).reshape(-1, K)
    return F.kl_div(p_s, p_t, log_target=True, reduction="batchmean") * T * T
