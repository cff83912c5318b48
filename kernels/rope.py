"""Rotary position embedding in the Hugging Face (half-split) layout.

For each head vector x = [x1, x2] (halves of D) at position p with angles a = p * inv_freq:
    rope(x) = [x1 * cos(a) - x2 * sin(a),  x2 * cos(a) + x1 * sin(a)]
q and k heads are rotated together in one call (they sit side by side in the fused QKV output).
"""

from __future__ import annotations

import torch


def rope_tables(inv_freq: torch.Tensor, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [max_positions, D/2] (fp32), built once per model."""
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq.float())
    return angles.cos(), angles.sin()


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D]; cos, sin [B, T, D/2] (already gathered at each token's position)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    c, s = cos.unsqueeze(2).to(x.dtype), sin.unsqueeze(2).to(x.dtype)
    return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
