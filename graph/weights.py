"""The model's weights as data: which tensors a checkpoint must hold, and how they are fused.

Checkpoint names follow the Hugging Face Llama layout; `{i}` stands for the layer index. q/k/v are
fused into one [q + 2kv, d] projection and gate/up into one [2F, d] projection, so a decode step
runs 4 weight products per layer instead of 7.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .config import ModelConfig

# Checkpoint tensor name -> (field, row block inside the fused field). Order inside a fused field
# is the order of its row blocks.
LAYER_TENSORS: dict[str, tuple[str, int]] = {
    "model.layers.{i}.input_layernorm.weight": ("attn_norm", 0),
    "model.layers.{i}.self_attn.q_proj.weight": ("qkv", 0),
    "model.layers.{i}.self_attn.k_proj.weight": ("qkv", 1),
    "model.layers.{i}.self_attn.v_proj.weight": ("qkv", 2),
    "model.layers.{i}.self_attn.q_proj.bias": ("qkv_bias", 0),
    "model.layers.{i}.self_attn.k_proj.bias": ("qkv_bias", 1),
    "model.layers.{i}.self_attn.v_proj.bias": ("qkv_bias", 2),
    "model.layers.{i}.self_attn.o_proj.weight": ("o", 0),
    "model.layers.{i}.post_attention_layernorm.weight": ("mlp_norm", 0),
    "model.layers.{i}.mlp.gate_proj.weight": ("gate_up", 0),
    "model.layers.{i}.mlp.up_proj.weight": ("gate_up", 1),
    "model.layers.{i}.mlp.down_proj.weight": ("down", 0),
}
MODEL_TENSORS = {
    "model.embed_tokens.weight": "embed",
    "model.norm.weight": "norm",
    "lm_head.weight": "lm_head",
}


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor name the checkpoint must hold for `cfg`, with its shape."""
    d, f, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    layer = {
        "model.layers.{i}.input_layernorm.weight": (d,),
        "model.layers.{i}.self_attn.q_proj.weight": (q, d),
        "model.layers.{i}.self_attn.k_proj.weight": (kv, d),
        "model.layers.{i}.self_attn.v_proj.weight": (kv, d),
        "model.layers.{i}.self_attn.o_proj.weight": (d, q),
        "model.layers.{i}.post_attention_layernorm.weight": (d,),
        "model.layers.{i}.mlp.gate_proj.weight": (f, d),
        "model.layers.{i}.mlp.up_proj.weight": (f, d),
        "model.layers.{i}.mlp.down_proj.weight": (d, f),
    }
    if cfg.qkv_bias:
        layer |= {
            "model.layers.{i}.self_attn.q_proj.bias": (q,),
            "model.layers.{i}.self_attn.k_proj.bias": (kv,),
            "model.layers.{i}.self_attn.v_proj.bias": (kv,),
        }
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, d), "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, d)
    for i in range(cfg.num_layers):
        shapes |= {name.format(i=i): shape for name, shape in layer.items()}
    return shapes


@dataclass
class Linear:
    """A weight [out, in] (+ bias [out]); `host` is a numpy view of it for the CPU product."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    host: np.ndarray | None = None

    @classmethod
    def of(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> Linear:
        """`dtype`, if given, stores the weight in it (weight-only precision: kernels/linear.py);
        the bias keeps the activations' dtype."""
        weight = weight.to(dtype or weight.dtype).contiguous()
        cpu32 = weight.device.type == "cpu" and weight.dtype == torch.float32
        return cls(weight, bias, weight.numpy() if cpu32 else None)


@dataclass
class LayerWeights:
    attn_norm: torch.Tensor  # [d]
    qkv: Linear  # [q + 2kv, d]: q rows, then k rows, then v rows
    o: Linear  # [d, q]
    mlp_norm: torch.Tensor  # [d]
    gate_up: Linear  # [2F, d]: gate rows, then up rows
    down: Linear  # [d, F]


@dataclass
class ModelWeights:
    embed: torch.Tensor  # [V, d]
    layers: list[LayerWeights]
    norm: torch.Tensor  # [d]
    lm_head: Linear  # [V, d]; shares storage with `embed` when the embeddings are tied

    @classmethod
    def from_state_dict(
        cls,
        state: dict[str, torch.Tensor],
        cfg: ModelConfig,
        weight_dtype: torch.dtype | None = None,
    ) -> ModelWeights:
        """Fuse a checked HF-layout state dict (see loaders/safetensors_weights.py).

        `weight_dtype` stores the matrices (and the embedding, which a tied LM head shares) in a
        narrower dtype than the activations; the norms keep the state dict's dtype, which is the
        dtype the forward computes in.
        """

        def fused(i: int, field: str) -> torch.Tensor | None:
            blocks = sorted(
                (block, name.format(i=i))
                for name, (f, block) in LAYER_TENSORS.items()
                if f == field and name.format(i=i) in state
            )
            if not blocks:
                return None
            return torch.cat([state.pop(name) for _, name in blocks], dim=0)

        layers = []
        for i in range(cfg.num_layers):
            layers.append(
                LayerWeights(
                    attn_norm=fused(i, "attn_norm"),
                    qkv=Linear.of(fused(i, "qkv"), fused(i, "qkv_bias"), weight_dtype),
                    o=Linear.of(fused(i, "o"), dtype=weight_dtype),
                    mlp_norm=fused(i, "mlp_norm"),
                    gate_up=Linear.of(fused(i, "gate_up"), dtype=weight_dtype),
                    down=Linear.of(fused(i, "down"), dtype=weight_dtype),
                )
            )
        embed = state["model.embed_tokens.weight"]
        embed = embed.to(weight_dtype or embed.dtype).contiguous()
        head = embed if cfg.tie_word_embeddings else state["lm_head.weight"]
        return cls(
            embed=embed,
            layers=layers,
            norm=state["model.norm.weight"],
            lm_head=Linear.of(head, dtype=weight_dtype),
        )
