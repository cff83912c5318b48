"""The transformer step: one forward shared by every decoding method.

    h = embed(tokens)
    per layer:  h += o(attention(rope(q), rope(k) -> cache, v -> cache))      over rmsnorm(h)
                h += down(silu(gate) * up)                                   over rmsnorm(h)
    logits = lm_head(rmsnorm(h))

The method-specific parts are inputs, never branches in here: the attention pattern comes from the
Step (graph/step.py), the layers to run from the caller (SkipDecode bypasses some), and the KV
cache is any object with `write(layer, step, k, v)` and `read(layer, step) -> (k, v)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from ..kernels.attention import attention_ref
from ..kernels.linear import linear_cpu, linear_ref
from ..kernels.rmsnorm import rmsnorm_ref
from ..kernels.rope import rope_ref, rope_tables
from ..kernels.swiglu import swiglu_ref
from .config import ModelConfig, rope_inv_freq
from .step import Step
from .weights import Linear, ModelWeights


class KVStore(Protocol):
    def write(self, layer: int, step: Step, k: torch.Tensor, v: torch.Tensor) -> None: ...

    def read(self, layer: int, step: Step) -> tuple[torch.Tensor, torch.Tensor]: ...


class Transformer:
    """A Llama-family model: its config, fused weights and RoPE tables."""

    def __init__(self, cfg: ModelConfig, weights: ModelWeights, max_positions: int | None = None):
        self.cfg = cfg
        self.weights = weights
        self.max_positions = max_positions or cfg.max_position_embeddings
        cos, sin = rope_tables(rope_inv_freq(cfg), self.max_positions)
        device = weights.embed.device
        self.cos, self.sin = cos.to(device), sin.to(device)  # [P, D] fp32, see kernels/rope.py
        self.dtype = weights.embed.dtype
        self.device = device

    @property
    def all_layers(self) -> range:
        return range(self.cfg.num_layers)

    def hidden(
        self,
        step: Step,
        cache: KVStore,
        layers: Sequence[int] | None = None,
        input_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:  # [B, T, d], before the final norm
        """Run `layers` (default: all, in order) over the step's new tokens, writing their K/V.

        input_embeds [B, T, d], if given, is added to the token embeddings (LLM-to-SLM's projector).
        """
        cfg, w = self.cfg, self.weights
        batch, width = step.tokens.shape
        h = F.embedding(step.tokens, w.embed)  # [B, T, d]
        if input_embeds is not None:
            h = h + input_embeds.to(h.dtype)
        cos, sin = self.cos[step.positions], self.sin[step.positions]  # [B, T, D]
        n_qk = cfg.num_heads + cfg.num_kv_heads
        for i in self.all_layers if layers is None else layers:
            lw = w.layers[i]
            x = rmsnorm_ref(h, lw.attn_norm, cfg.rms_norm_eps)
            qkv = self._linear(x, lw.qkv)  # [B, T, q + 2kv]
            qk = rope_ref(
                qkv[..., : n_qk * cfg.head_dim].view(batch, width, n_qk, cfg.head_dim), cos, sin
            )  # [B, T, H + Hkv, D]
            q, k = qk[:, :, : cfg.num_heads], qk[:, :, cfg.num_heads :]
            v = qkv[..., n_qk * cfg.head_dim :].view(batch, width, cfg.num_kv_heads, cfg.head_dim)
            cache.write(i, step, k, v)
            keys, values = cache.read(i, step)  # [B, Hkv, S, D]
            o = attention_ref(q.transpose(1, 2), keys, values, step.mask)  # [B, H, T, D]
            h = h + self._linear(o.transpose(1, 2).reshape(batch, width, cfg.q_size), lw.o)
            x = rmsnorm_ref(h, lw.mlp_norm, cfg.rms_norm_eps)
            h = h + self._linear(swiglu_ref(self._linear(x, lw.gate_up)), lw.down)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:  # [..., d] -> [..., V] fp32
        x = rmsnorm_ref(h, self.weights.norm, self.cfg.rms_norm_eps)
        return self._linear(x, self.weights.lm_head).float()

    def forward(
        self, step: Step, cache: KVStore, layers: Sequence[int] | None = None
    ) -> torch.Tensor:  # [B, V] at step.logits_at, else [B, T, V]
        h = self.hidden(step, cache, layers)
        if step.logits_at is not None:
            h = h[torch.arange(step.batch, device=h.device), step.logits_at]  # [B, d]
        return self.logits(h)

    @staticmethod
    def _linear(x: torch.Tensor, lin: Linear) -> torch.Tensor:
        if lin.host is not None:
            return linear_cpu(x, lin.host, lin.bias)
        return linear_ref(x, lin.weight, lin.bias)
