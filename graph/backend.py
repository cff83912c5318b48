"""Backends: which implementation of each op the forward runs, chosen once when a model is built.

TORCH runs every op's pure-torch `_ref` (the CPU backend, and a reference on a GPU). TRITON runs the
Triton kernels (CUDA; in tests, the interpreter with TRITON_INTERPRET=1). Weight products use
torch/cuBLAS on the GPU and numpy's BLAS on the CPU (kernels/linear.py says why); integer weights
run torch's weight-only kernels on the CPU and the Triton kernels of kernels/quant_linear.py on the
TRITON backend. These are each backend's default products; graph/products.py times the others a
format can use and may choose them instead, per number of rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum

import torch

from ..kernels import attention, quant_linear, rmsnorm, rope, swiglu
from ..kernels.linear import linear_cpu, linear_int4_cpu, linear_int8_cpu, linear_ref
from .weights import Linear, WeightFormat


class Backend(str, Enum):
    TORCH = "torch"
    TRITON = "triton"

    @classmethod
    def default_for(cls, device: torch.device | str) -> Backend:
        return cls.TRITON if torch.device(device).type == "cuda" else cls.TORCH


@dataclass(frozen=True)
class Ops:
    """The op table of one backend. Shapes: x [..., d]; q/k [B, T, H, D]; cache rows as in
    runtime/kv_cache.py."""

    backend: Backend
    rmsnorm: Callable  # (x, weight, eps) -> y
    add_rmsnorm: Callable  # (x, residual, weight, eps) -> (rmsnorm(x + residual), x + residual)
    rope: Callable  # (x, positions [B, T], cos_table, sin_table) -> rotated x (maybe in place)
    swiglu: Callable  # (gate_up [..., 2F]) -> [..., F]
    attention: Callable  # (q [B, T, H, D], cache, layer, step) -> [B, T, H, D]
    linear: Callable  # (x [..., in], Linear) -> [..., out]


def _linear(x: torch.Tensor, lin: Linear) -> torch.Tensor:
    if lin.host is not None:
        return linear_cpu(x, lin.host, lin.bias)
    if lin.format == WeightFormat.INT4:
        if lin.packed is not None:  # on the CPU (graph/weights.py packs it there)
            return linear_int4_cpu(x, lin.packed, lin.packed_scales, lin.out_features, lin.bias)
        return quant_linear.int4_linear_ref(x, lin.weight, lin.scales, lin.mins, lin.bias)
    if lin.format == WeightFormat.INT8:
        if lin.packed_scales is not None:
            return linear_int8_cpu(x, lin.weight, lin.packed_scales, lin.bias)
        return quant_linear.int8_linear_ref(x, lin.weight, lin.scales, lin.bias)
    return linear_ref(x, lin.weight, lin.bias)


def _linear_triton(x: torch.Tensor, lin: Linear) -> torch.Tensor:
    if lin.format == WeightFormat.INT4:
        return quant_linear.int4_linear(x, lin.weight, lin.scales, lin.mins, lin.bias)
    if lin.format == WeightFormat.INT8:
        return quant_linear.int8_linear(x, lin.weight, lin.scales, lin.bias)
    return _linear(x, lin)


def _rope_ref(x, positions, cos_table, sin_table):
    return rope.rope_ref(x, cos_table[positions], sin_table[positions])


def _attention_ref(q, cache, layer, step):
    keys, values = cache.read(layer, step)  # [B, Hkv, S, D]
    return attention.attention_ref(q.transpose(1, 2), keys, values, step.mask).transpose(1, 2)


def _attention_ref_f64(q, cache, layer, step):
    # Row-invariant attention (see ops_for): in fp64 the order in which a reduction adds its terms
    # changes the result by ~1e-16, far below an fp32 rounding step, so one query alone and the
    # same query inside a k-token tree round to the same fp32 output (bar odds of ~1e-9 per value).
    keys, values = cache.read(layer, step)  # [B, Hkv, S, D]
    o = attention.attention_ref(q.transpose(1, 2).double(), keys.double(), values.double(),
                                step.mask)
    return o.to(q.dtype).transpose(1, 2)


def _attention_triton(q, cache, layer, step):
    if step.tree is not None and step.tree_bits is None:
        # No bit form: a pending window wider than the kernel's 64 bits runs the reference.
        return _attention_ref(q, cache, layer, step)
    window = None  # the step's own n_new tokens
    if step.slots is not None and step.tree is not None:
        # New tokens at explicit slots inside a pending window of W slots (GSD's level-by-level
        # draft): the bits address all W, whichever slots this step's tokens were written to.
        window = torch.full_like(step.n_new, step.tree.shape[-1])
    return attention.tree_attention(
        q, cache.k[layer], cache.v[layer], step.rows, step.starts, step.n_new, step.tree_bits,
        step.kv_rows, kv_len=step.kv_len, window=window,
    )


TORCH_OPS = Ops(
    backend=Backend.TORCH,
    rmsnorm=rmsnorm.rmsnorm_ref,
    add_rmsnorm=rmsnorm.add_rmsnorm_ref,
    rope=_rope_ref,
    swiglu=swiglu.swiglu_ref,
    attention=_attention_ref,
    linear=_linear,
)

TRITON_OPS = Ops(
    backend=Backend.TRITON,
    rmsnorm=rmsnorm.rmsnorm,
    add_rmsnorm=rmsnorm.add_rmsnorm,
    rope=rope.rope_,
    swiglu=swiglu.swiglu,
    attention=_attention_triton,
    linear=_linear_triton,
)


# The torch backend for weights narrower than the activations (weight-only bf16, int8 or int4 on
# the CPU). bf16 rounding of every product's input and output turns a last-bit difference anywhere
# into ~0.3 in the logits, so a k-token verify step must compute each row bit for bit as k one-token
# steps would, or near-tied greedy choices flip. The products are row-invariant (kernels/linear.py
# splits the one bf16 reduction that was not; graph/products.py chooses only among row-invariant
# ones); attention's reductions are made so by running them in fp64.
TORCH_ROW_INVARIANT_OPS = replace(TORCH_OPS, attention=_attention_ref_f64)


def ops_for(backend: Backend | str, row_invariant: bool = False) -> Ops:
    if row_invariant and Backend(backend) == Backend.TORCH:
        return TORCH_ROW_INVARIANT_OPS
    return {Backend.TORCH: TORCH_OPS, Backend.TRITON: TRITON_OPS}[Backend(backend)]
