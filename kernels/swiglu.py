"""SwiGLU activation of the fused gate/up projection: silu(gate) * up."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def swiglu_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2F] (gate rows first, then up rows) -> [..., F]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
