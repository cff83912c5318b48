"""Rotary position embedding in the Hugging Face (half-split) layout.

For each head vector x = [x1, x2] (halves of D) at position p with angles a = p * inv_freq:
    rope(x) = [x1 * cos(a) - x2 * sin(a),  x2 * cos(a) + x1 * sin(a)]
            = x * [cos, cos] + [x2, x1] * [-sin, sin]
The tables store [cos, cos] and [-sin, sin] (width D) so the rotation is one swap and two products.
q and k heads are rotated together in one call (they sit side by side in the fused QKV output).
"""

from __future__ import annotations

import torch


def rope_tables(inv_freq: torch.Tensor, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos table [P, D] = [cos, cos] and signed sin table [P, D] = [-sin, sin] (fp32)."""
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq.float())
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1), torch.cat((-sin, sin), dim=-1)


def rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, T, H, D]; cos, sin [B, T, D] (rope_tables rows gathered at each token's position)."""
    half = x.shape[-1] // 2
    swapped = torch.cat((x[..., half:], x[..., :half]), dim=-1)
    return x * cos.unsqueeze(2).to(x.dtype) + swapped * sin.unsqueeze(2).to(x.dtype)
