"""SwiGLU activation of the fused gate/up projection: silu(gate) * up.

For a row [gate, up] of 2F elements:
    out = gate * sigmoid(gate) * up = gate / (1 + exp(-gate)) * up        ([F], fp32 math)
The Triton kernel reads 2F elements and writes F per row, one block of columns per program.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    jit = triton.jit
except ImportError:  # CPU-only install: the ref below still works, the launcher raises
    triton = tl = None

    def jit(fn):
        return fn


def swiglu_ref(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2F] (gate rows first, then up rows) -> [..., F]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


@jit
def _swiglu_kernel(
    gu_ptr,  # [N, 2F] input rows: gate in columns [0, F), up in [F, 2F); unit column stride
    out_ptr,  # [N, F] output rows; unit column stride
    stride_gu,  # elements between rows of gate_up
    stride_out,  # elements between rows of out
    n_out,  # output columns F
    BLOCK_F: tl.constexpr,  # columns per program (power of two)
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride may exceed 2^31
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = cols < n_out
    gate = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * stride_gu + n_out + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [..., 2F] fp32/bf16/fp16 with a contiguous last dim -> out [..., F], same dtype."""
    where = "kernels/swiglu.py: swiglu"
    if triton is None:
        raise RuntimeError(f"{where} needs the `triton` package (not installed); use swiglu_ref")
    if not gate_up.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{where} runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1);"
                           f" got gate_up on {gate_up.device}")
    if gate_up.dtype not in _DTYPES:
        raise ValueError(f"{where}: gate_up must be fp32/bf16/fp16; got {gate_up.dtype}")
    if gate_up.dim() < 1 or gate_up.shape[-1] % 2 or gate_up.stride(-1) != 1:
        raise ValueError(f"{where}: gate_up must be [..., 2F] with an even last dim of unit stride;"
                         f" got shape {tuple(gate_up.shape)} strides {gate_up.stride()}")
    n_out = gate_up.shape[-1] // 2
    out = torch.empty((*gate_up.shape[:-1], n_out), dtype=gate_up.dtype, device=gate_up.device)
    if out.numel() == 0:
        return out
    gu2 = gate_up.reshape(-1, 2 * n_out)  # copies only if the leading dims are not uniform
    out2 = out.view(-1, n_out)
    BLOCK_F = min(triton.next_power_of_2(n_out), 1024)
    grid = (gu2.shape[0], triton.cdiv(n_out, BLOCK_F))
    _swiglu_kernel[grid](
        gu2, out2, gu2.stride(0), out2.stride(0), n_out,
        BLOCK_F=BLOCK_F, num_warps=4,
    )
    return out
