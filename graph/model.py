"""The transformer step: one forward shared by every decoding method.

    h = embed(tokens)
    per layer:  h += o(attention(rope(q), rope(k) -> cache, v -> cache))      over rmsnorm(h)
                h += down(silu(gate) * up)                                   over rmsnorm(h)
    logits = lm_head(rmsnorm(h))

The method-specific parts are inputs, never branches in here: the attention pattern comes from the
Step (graph/step.py), the layers to run from the caller (SkipDecode bypasses some), and the KV
cache is any object with `write(layer, step, k, v)` and `read(layer, step) -> (k, v)`. Training runs
this same forward under autograd with another op table and KV store (graph/training.py); extra
input embeddings and the hidden states out (`hidden_states(at=...)`, `norm`) are arguments and
outputs of it, not copies of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol

import torch

from ..kernels.rope import rope_tables
from .backend import Backend, Ops, ops_for
from .config import ModelConfig, rope_inv_freq
from .products import Products
from .step import Step
from .weights import ModelWeights


class KVStore(Protocol):
    def write(self, layer: int, step: Step, k: torch.Tensor, v: torch.Tensor) -> None: ...

    def read(self, layer: int, step: Step) -> tuple[torch.Tensor, torch.Tensor]: ...


class Transformer:
    """A Llama-family model: its config, fused weights, RoPE tables, and the backend's ops."""

    def __init__(
        self,
        cfg: ModelConfig,
        weights: ModelWeights,
        max_positions: int | None = None,
        backend: Backend | str | Ops | None = None,
        products: str | None = None,
        product_cache: Path | None = None,
    ):
        """`products` / `product_cache`: how the weight products are chosen (graph/products.py:
        "measure" or "fixed", default $TREADLE_PRODUCTS or "measure") and where the per-machine
        choice is cached (None: this process only)."""
        self.cfg = cfg
        self.weights = weights
        self.max_positions = max_positions or cfg.max_position_embeddings
        device = weights.embed.device
        narrow_weights = weights.weight_only  # weight-only precision (graph/weights.py)
        self.products: Products | None = None
        if isinstance(backend, Ops):  # an op table of its own (graph/training.py's)
            self.ops = backend
        else:
            backend = backend or Backend.default_for(device)
            self.ops = ops_for(backend, row_invariant=narrow_weights)
            self.products = Products(backend, weights, products, product_cache)
            if self.products.mode != "fixed":  # fixed: the op table's own products
                self.ops = replace(self.ops, linear=self.products.linear)
        cos, sin = rope_tables(rope_inv_freq(cfg), self.max_positions)
        self.cos, self.sin = cos.to(device), sin.to(device)  # [P, D] fp32, see kernels/rope.py
        self.dtype = weights.norm.dtype  # activations (weights may be narrower)
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
        start: torch.Tensor | None = None,
        replace_embeds: bool = False,
    ) -> torch.Tensor:  # [B, T, d] residual stream after the last layer run (before the norm)
        """Run `layers` (default: all, in order) over the step's new tokens, writing their K/V.

        input_embeds [B, T, d], if given, is added to the token embeddings (LLM-to-SLM's projector),
        or replaces them when `replace_embeds` (the tokens then only size the step).
        start [B, T, d], if given, is the residual stream to continue from instead of the
        embeddings (a step that resumes where an earlier partial step stopped).
        """
        return self.hidden_states(step, cache, layers, input_embeds, start, replace_embeds)[-1]

    def hidden_states(
        self,
        step: Step,
        cache: KVStore,
        layers: Sequence[int] | None = None,
        input_embeds: torch.Tensor | None = None,
        start: torch.Tensor | None = None,
        replace_embeds: bool = False,
        at: Sequence[int] = (),
    ) -> list[torch.Tensor]:  # len(at) + 1 residual streams [B, T, d]
        """`hidden`, also returning the residual stream after each layer index in `at` (indices
        into the model's layers, each one of `layers`), in the order of `at`, then the last one.
        The final-norm output is `norm(...)` of the last one."""
        cfg, w, ops = self.cfg, self.weights, self.ops
        eps = cfg.rms_norm_eps
        batch, width = step.tokens.shape
        layers = list(self.all_layers if layers is None else layers)
        if any(i not in layers for i in at):
            raise ValueError(f"at={list(at)}: every layer must be one of the layers run {layers}")
        if replace_embeds:
            if input_embeds is None or start is not None:
                raise ValueError("replace_embeds needs input_embeds (and no start)")
            h, input_embeds = input_embeds.to(self.dtype), None
        elif start is None:
            h = w.embedding(step.tokens).to(self.dtype)  # [B, T, d]
        else:
            h = start
        if input_embeds is not None:
            h = h + input_embeds.to(h.dtype)
        kept: dict[int, torch.Tensor] = {}
        n_qk = cfg.num_heads + cfg.num_kv_heads
        x = ops.rmsnorm(h, w.layers[layers[0]].attn_norm, eps) if layers else h
        for n, i in enumerate(layers):
            lw = w.layers[i]
            qkv = ops.linear(x, lw.qkv)  # [B, T, q + 2kv]
            qk = qkv[..., : n_qk * cfg.head_dim].view(batch, width, n_qk, cfg.head_dim)
            qk = ops.rope(qk, step.positions, self.cos, self.sin)  # [B, T, H + Hkv, D]
            q, k = qk[:, :, : cfg.num_heads], qk[:, :, cfg.num_heads :]
            v = qkv[..., n_qk * cfg.head_dim :].view(batch, width, cfg.num_kv_heads, cfg.head_dim)
            cache.write(i, step, k, v)
            o = ops.attention(q, cache, i, step)  # [B, T, H, D]
            o = ops.linear(o.reshape(batch, width, cfg.q_size), lw.o)
            x, h = ops.add_rmsnorm(o, h, lw.mlp_norm, eps)
            mlp = ops.linear(ops.swiglu(ops.linear(x, lw.gate_up)), lw.down)
            if n + 1 < len(layers):  # fuse the residual add into the next layer's input norm
                x, h = ops.add_rmsnorm(mlp, h, w.layers[layers[n + 1]].attn_norm, eps)
            else:
                h = h + mlp
            if i in at:
                kept[i] = h
        return [kept[i] for i in at] + [h]

    def norm(self, h: torch.Tensor) -> torch.Tensor:  # [..., d] final-norm output
        return self.ops.rmsnorm(h, self.weights.norm, self.cfg.rms_norm_eps)

    def logits(self, h: torch.Tensor) -> torch.Tensor:  # [..., d] -> [..., V] fp32
        return self.ops.linear(self.norm(h), self.weights.lm_head).float()

    def forward(
        self,
        step: Step,
        cache: KVStore,
        layers: Sequence[int] | None = None,
        input_embeds: torch.Tensor | None = None,  # [B, T, d] added to the token embeddings
    ) -> torch.Tensor:  # [B, V] at step.logits_at, else [B, T, V]
        h = self.hidden(step, cache, layers, input_embeds)
        if step.logits_at is not None:
            h = h[torch.arange(step.batch, device=h.device), step.logits_at]  # [B, d]
        return self.logits(h)
