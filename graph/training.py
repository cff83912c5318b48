"""The training path of the one forward: the same `Transformer.hidden` loop under autograd.

    model = training_model(cfg, weights)            # TRAINING_OPS: pure torch, differentiable
    params = make_trainable(weights, layers=..., norm=True, embed=False)
    step = sequence_step(tokens, lengths)            # whole right-padded sequences, causal
    h = model.hidden(step, StepKV())                 # the step keeps its own K/V (no cache)
    loss(model.logits(h)).backward()                 # gradients reach params and input_embeds
    save_file(state_dict_of(weights, cfg), ...)      # un-fused back to Hugging Face names

What differs from inference is data, not code: the op table (every weight product is `F.linear`
on `Linear.weight`, never the CPU's numpy product, which autograd cannot see; attention is the
reference over the step's own keys) and the KV store (the step's K/V are kept as computed instead
of being copied into a preallocated cache, which would cut the graph).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import replace

import torch
import torch.nn.functional as F

from .backend import TORCH_OPS, Ops
from .config import ModelConfig
from .model import Transformer
from .step import Step
from .weights import LAYER_TENSORS, MODEL_TENSORS, Linear, ModelWeights, expected_shapes


def _linear_autograd(x: torch.Tensor, lin: Linear) -> torch.Tensor:
    return F.linear(x, lin.weight, lin.bias)


# The reference ops are out-of-place torch (differentiable); only the product changes.
TRAINING_OPS: Ops = replace(TORCH_OPS, linear=_linear_autograd)


class StepKV:
    """A KVStore for one step over whole sequences (every sequence starts at slot 0): `read`
    returns exactly what this step wrote, so nothing is copied and autograd sees through it."""

    def __init__(self) -> None:
        self.k: dict[int, torch.Tensor] = {}  # layer -> [B, Hkv, T, D]
        self.v: dict[int, torch.Tensor] = {}

    def write(self, layer: int, step: Step, k: torch.Tensor, v: torch.Tensor) -> None:
        if step.kv_len != step.width:
            raise ValueError(
                f"StepKV holds one step over whole sequences (kv_len == width), but the step reads "
                f"{step.kv_len} slots for {step.width} new tokens: make it with sequence_step"
            )
        self.k[layer], self.v[layer] = k.transpose(1, 2), v.transpose(1, 2)

    def read(self, layer: int, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[layer], self.v[layer]


def sequence_step(tokens: torch.Tensor, lengths: torch.Tensor | None = None) -> Step:
    """The causal Step over right-padded sequences tokens [B, T] of `lengths` [B] real tokens
    (default all T), at positions 0.. (a training or teacher-forcing step, with `StepKV`)."""
    batch, width = tokens.shape
    dev = tokens.device
    n_new = (
        torch.full((batch,), width, dtype=torch.long, device=dev)
        if lengths is None
        else lengths.to(dev, torch.long)
    )
    return Step(
        tokens=tokens,
        positions=torch.arange(width, device=dev).expand(batch, width),
        rows=torch.arange(batch, device=dev),
        starts=torch.zeros(batch, dtype=torch.long, device=dev),
        n_new=n_new,
        kv_len=width,
        rows_contiguous=True,
    )


def training_model(
    cfg: ModelConfig, weights: ModelWeights, max_positions: int | None = None
) -> Transformer:
    """A Transformer over `weights` that runs `TRAINING_OPS` (differentiable on any device)."""
    _float_only(weights)
    return Transformer(cfg, weights, max_positions, backend=TRAINING_OPS)


def _float_only(weights: ModelWeights) -> None:
    quantized = sorted({lin.format.value for lin in weights.linears() if lin.format.quantized})
    if quantized:
        raise ValueError(f"training runs float weights; these hold {'/'.join(quantized)} matrices "
                         "(load the model with weights='float32')")


def make_trainable(
    weights: ModelWeights,
    layers: Iterable[int] | None = None,
    norm: bool = True,
    embed: bool = False,
) -> list[torch.nn.Parameter]:
    """Turn the chosen tensors of `weights` into `torch.nn.Parameter`s, in place, and return them
    (for the optimizer): every tensor of `layers` (default all; the fused qkv / gate_up matrices
    are one parameter each), the final norm, and the embedding (which a tied LM head shares).
    The rest stay plain tensors without gradients (frozen)."""
    _float_only(weights)
    params: list[torch.nn.Parameter] = []

    def param(t: torch.Tensor) -> torch.nn.Parameter:
        p = torch.nn.Parameter(t.detach().clone())
        params.append(p)
        return p

    def lin(x: Linear) -> Linear:
        return Linear(param(x.weight), param(x.bias) if x.bias is not None else None)

    for i in range(len(weights.layers)) if layers is None else layers:
        lw = weights.layers[i]
        lw.attn_norm, lw.mlp_norm = param(lw.attn_norm), param(lw.mlp_norm)
        lw.qkv, lw.o, lw.gate_up, lw.down = lin(lw.qkv), lin(lw.o), lin(lw.gate_up), lin(lw.down)
    if norm:
        weights.norm = param(weights.norm)
    if embed:
        tied = weights.lm_head.weight is weights.embed
        weights.embed = param(weights.embed)
        weights.lm_head = Linear(weights.embed) if tied else lin(weights.lm_head)
    return params


def state_dict_of(weights: ModelWeights, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of `ModelWeights.from_state_dict`: the fused fields split back into their
    Hugging Face-named row blocks (detached, contiguous; no `lm_head.weight` when tied)."""
    shapes = expected_shapes(cfg)
    state: dict[str, torch.Tensor] = {}
    for i, lw in enumerate(weights.layers):
        fields = {
            "attn_norm": lw.attn_norm,
            "qkv": lw.qkv.weight,
            "qkv_bias": lw.qkv.bias,
            "o": lw.o.weight,
            "mlp_norm": lw.mlp_norm,
            "gate_up": lw.gate_up.weight,
            "down": lw.down.weight,
        }
        row = dict.fromkeys(fields, 0)  # next unsplit row of each fused field
        for template, (field, _) in LAYER_TENSORS.items():  # in row-block order
            name = template.format(i=i)
            if name not in shapes or fields[field] is None:
                continue
            n = shapes[name][0]
            state[name] = fields[field][row[field] : row[field] + n].detach().contiguous()
            row[field] += n
    tensors = {"embed": weights.embed, "norm": weights.norm, "lm_head": weights.lm_head.weight}
    for name, field in MODEL_TENSORS.items():
        if name in shapes:
            state[name] = tensors[field].detach().contiguous()
    return state


def trainable_parameters(weights: ModelWeights) -> list[torch.nn.Parameter]:
    """The parameters `make_trainable` made (each once; a tied LM head is the embedding)."""
    tensors = [weights.embed, weights.norm, weights.lm_head.weight, weights.lm_head.bias]
    for lw in weights.layers:
        tensors += [lw.attn_norm, lw.mlp_norm]
        for lin in (lw.qkv, lw.o, lw.gate_up, lw.down):
            tensors += [lin.weight, lin.bias]
    seen: set[int] = set()
    out = []
    for t in tensors:
        if isinstance(t, torch.nn.Parameter) and t.requires_grad and id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out
