"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * w, computed in fp32 and cast back to x's dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D], weight [D] -> [..., D]."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    x32 = x.float()
    return (F.rms_norm(x32, (x.shape[-1],), None, eps) * weight.float()).to(x.dtype)
