"""Attention of new tokens over the KV cache, with GQA.

out[b, h, i] = softmax_s(q[b, h, i] . k[b, h // G, s] / sqrt(D) + (0 if mask[b, i, s] else -inf)) v
The mask expresses every visibility pattern the methods need (causal prefill, decode over ragged
lengths, a token tree over a shared prefix): see graph/step.py, which builds it once per step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_ref(
    q: torch.Tensor,  # [B, H, T, D]
    k: torch.Tensor,  # [B, Hkv, S, D]
    v: torch.Tensor,  # [B, Hkv, S, D]
    mask: torch.Tensor | None,  # [B, 1, T, S] bool (True = visible), None = all visible
) -> torch.Tensor:  # [B, H, T, D]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1]
    )
