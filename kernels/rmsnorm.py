"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * w, computed in fp32 and cast back to x's dtype.

Fused with the residual add that precedes every norm in a pre-norm transformer:
    h = x + residual                      (the new residual stream, rounded to x's dtype)
    y = h / sqrt(mean(h^2) + eps) * w     (computed from the rounded h, so the fused op equals
                                           the unfused `h = x + r; y = rmsnorm(h)` in any dtype)
One program normalizes one row of D elements: it reads x (and residual) once and writes y (and h)
once, so the op moves 2*D (add: 4*D) elements per row plus the weight.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    jit = triton.jit
except ImportError:  # CPU-only install: the refs below still work, the launchers raise
    triton = tl = None

    def jit(fn):
        return fn


def rmsnorm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D], weight [D] -> [..., D]."""
    if x.dtype == torch.float32:
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    x32 = x.float()
    return (F.rms_norm(x32, (x.shape[-1],), None, eps) * weight.float()).to(x.dtype)


def add_rmsnorm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [..., D], weight [D] -> (y = rmsnorm(h) [..., D], h = x + residual [..., D])."""
    h = x + residual
    return rmsnorm_ref(h, weight, eps), h


@jit
def _rmsnorm_kernel(
    x_ptr,  # [N, D] input rows (row stride stride_x, unit column stride)
    r_ptr,  # [N, D] residual rows (row stride stride_r); unused unless HAS_RESIDUAL
    w_ptr,  # [D] weight
    y_ptr,  # [N, D] output rows (row stride stride_y)
    h_ptr,  # [N, D] output h = x + residual (row stride stride_h); unused unless HAS_RESIDUAL
    stride_x,  # elements between rows of x
    stride_r,  # elements between rows of residual
    stride_y,  # elements between rows of y
    stride_h,  # elements between rows of h
    D,  # row length
    eps,  # added to mean(x^2) before the square root
    HAS_RESIDUAL: tl.constexpr,  # fused add: normalize h = x + residual and store h
    BLOCK_D: tl.constexpr,  # next power of two >= D: the whole row in one block
):
    row = tl.program_id(0).to(tl.int64)  # int64: row * stride may exceed 2^31
    cols = tl.arange(0, BLOCK_D)
    mask = cols < D
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0)
        h = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)  # rounded like the unfused add
        tl.store(h_ptr + row * stride_h + cols, h, mask=mask)
        x = h
    x = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / D + eps)  # padded lanes are 0: they add nothing
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    y = x * rstd * w
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _check_triton(x: torch.Tensor, op: str) -> None:
    if triton is None:
        raise RuntimeError(f"kernels/rmsnorm.py: {op} needs the `triton` package (not installed); "
                           "use the pure-torch *_ref functions on this machine")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"kernels/rmsnorm.py: {op} runs on CUDA tensors (or on the CPU under "
                           f"TRITON_INTERPRET=1); got a tensor on {x.device}")


def _check(name: str, t: torch.Tensor, x: torch.Tensor, op: str) -> None:
    if t.shape != x.shape or t.dtype != x.dtype or t.device != x.device:
        raise ValueError(f"kernels/rmsnorm.py: {op}: {name} must match x {tuple(x.shape)} "
                         f"{x.dtype} on {x.device}; got {tuple(t.shape)} {t.dtype} on {t.device}")


def _launch(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, op: str
) -> tuple[torch.Tensor, torch.Tensor | None]:
    _check_triton(x, op)
    if x.dtype not in _DTYPES:
        raise ValueError(f"kernels/rmsnorm.py: {op}: x must be fp32/bf16/fp16; got {x.dtype}")
    if x.dim() < 1 or x.shape[-1] == 0 or x.stride(-1) != 1:
        raise ValueError(f"kernels/rmsnorm.py: {op}: x must be [..., D] with D > 0 and a "
                         f"contiguous last dim; got shape {tuple(x.shape)} strides {x.stride()}")
    D = x.shape[-1]
    if D * x.element_size() > 65536:  # one row per program must fit in registers
        raise ValueError(f"kernels/rmsnorm.py: {op}: rows of more than 64 KiB are not supported; "
                         f"got D={D} in {x.dtype}")
    if weight.shape != (D,) or not weight.is_contiguous() or weight.device != x.device:
        raise ValueError(f"kernels/rmsnorm.py: {op}: weight must be a contiguous [{D}] tensor on "
                         f"{x.device}; got {tuple(weight.shape)} on {weight.device}")
    if weight.dtype not in (x.dtype, torch.float32):
        raise ValueError(f"kernels/rmsnorm.py: {op}: weight must be {x.dtype} or fp32; "
                         f"got {weight.dtype}")
    if residual is not None:
        _check("residual", residual, x, op)
    # Flatten the leading dims to rows; reshape copies only if they are not uniformly strided.
    x2 = x.reshape(-1, D)
    r2 = residual.reshape(-1, D) if residual is not None else x2
    if r2.stride(-1) != 1:
        r2 = r2.contiguous()
    y = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    h = torch.empty_like(y) if residual is not None else None
    y2 = y.view(-1, D)
    h2 = h.view(-1, D) if h is not None else y2
    n_rows = x2.shape[0]
    if n_rows == 0:
        return y, h
    BLOCK_D = triton.next_power_of_2(D)
    num_warps = min(max(BLOCK_D // 256, 1), 16)  # ~8 elements per thread per row
    _rmsnorm_kernel[(n_rows,)](
        x2, r2, weight, y2, h2,
        x2.stride(0), r2.stride(0), y2.stride(0), h2.stride(0),
        D, eps,
        HAS_RESIDUAL=residual is not None, BLOCK_D=BLOCK_D, num_warps=num_warps,
    )
    return y, h


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D] (fp32/bf16/fp16, last dim contiguous), weight [D] (x's dtype or fp32)
    -> y [..., D] in x's dtype."""
    return _launch(x, None, weight, eps, "rmsnorm")[0]


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """x, residual [..., D] (same shape and dtype), weight [D]
    -> (y = rmsnorm(h) * weight [..., D], h = x + residual [..., D]), both in x's dtype."""
    y, h = _launch(x, residual, weight, eps, "add_rmsnorm")
    return y, h
