"""Rotary position embedding in the Hugging Face (half-split) layout.

For each head vector x = [x1, x2] (halves of D) at position p with angles a = p * inv_freq:
    rope(x) = [x1 * cos(a) - x2 * sin(a),  x2 * cos(a) + x1 * sin(a)]
            = x * [cos, cos] + [x2, x1] * [-sin, sin]
The tables store [cos, cos] and [-sin, sin] (width D) so the rotation is one swap and two products.
q and k heads are rotated together in one call (they sit side by side in the fused QKV output).
Scaled variants (llama3) only change inv_freq, hence the tables; the rotation is the same.

The Triton kernel `rope_(x, positions, cos_table, sin_table)` gathers the table rows at each token's
position itself (no [B, T, D] cos/sin gather before the call) and rotates x in place, which may be a
strided view of the fused QKV buffer. With c = cos_table[p], s = sin_table[p] it computes, in fp32,
    out[:D/2] = x1 * c[:D/2] + x2 * s[:D/2]     out[D/2:] = x2 * c[D/2:] + x1 * s[D/2:]
i.e. exactly rope_ref's x * c + swap(x) * s, for any tables (not only ones built by rope_tables).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    jit = triton.jit
except ImportError:  # CPU-only install: the refs below still work, the launcher raises
    triton = tl = None

    def jit(fn):
        return fn


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


@jit
def _rope_kernel(
    x_ptr,  # [B, T, H, D] rotated in place; unit stride along D, any other strides
    pos_ptr,  # [B, T] int position of each token
    cos_ptr,  # [P, D] fp32 cos table ([cos, cos] from rope_tables)
    sin_ptr,  # [P, D] fp32 signed sin table ([-sin, sin] from rope_tables)
    stride_xb,  # elements between batch entries of x
    stride_xt,  # elements between tokens of x
    stride_xh,  # elements between heads of x
    stride_pb,  # elements between batch entries of positions
    stride_pt,  # elements between tokens of positions
    stride_table,  # elements between rows of the tables
    T,  # tokens per batch entry
    H,  # heads per token
    HALF,  # D // 2
    BLOCK_H: tl.constexpr,  # heads per program (power of two)
    BLOCK_HALF: tl.constexpr,  # next power of two >= D // 2
):
    token = tl.program_id(0)  # one token (b, t) per program along axis 0
    b = (token // T).to(tl.int64)
    t = (token % T).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    cols = tl.arange(0, BLOCK_HALF)  # [BLOCK_HALF]
    col_mask = cols < HALF

    pos = tl.load(pos_ptr + b * stride_pb + t * stride_pt).to(tl.int64)
    row = pos * stride_table
    cos_lo = tl.load(cos_ptr + row + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    cos_hi = tl.load(cos_ptr + row + HALF + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    sin_lo = tl.load(sin_ptr + row + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    sin_hi = tl.load(sin_ptr + row + HALF + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]

    offs = b * stride_xb + t * stride_xt + heads.to(tl.int64)[:, None] * stride_xh + cols[None, :]
    mask = (heads[:, None] < H) & col_mask[None, :]  # [BLOCK_H, BLOCK_HALF]
    x1 = tl.load(x_ptr + offs, mask=mask, other=0.0)
    x2 = tl.load(x_ptr + offs + HALF, mask=mask, other=0.0)
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    out1 = x1f * cos_lo + x2f * sin_lo
    out2 = x2f * cos_hi + x1f * sin_hi
    tl.store(x_ptr + offs, out1.to(x1.dtype), mask=mask)
    tl.store(x_ptr + offs + HALF, out2.to(x1.dtype), mask=mask)


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INDEX_DTYPES = (torch.int64, torch.int32)


def rope_(
    x: torch.Tensor,  # [B, T, H, D] fp32/bf16/fp16, unit stride along D
    positions: torch.Tensor,  # [B, T] int64/int32, each in [0, P)
    cos_table: torch.Tensor,  # [P, D] fp32, rows of unit stride
    sin_table: torch.Tensor,  # [P, D] fp32, same shape and strides as cos_table
) -> torch.Tensor:  # x, rotated in place
    """Rotate x in place by the table rows at each token's position; returns x.

    Equals `x.copy_(rope_ref(x, cos_table[positions], sin_table[positions]))` up to rounding
    (the kernel computes in fp32 and rounds once). Positions are not bounds-checked on the device.
    """
    where = "kernels/rope.py: rope_"
    if triton is None:
        raise RuntimeError(f"{where} needs the `triton` package (not installed); use rope_ref")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{where} runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1);"
                           f" got x on {x.device}")
    if x.dim() != 4 or x.dtype not in _DTYPES or x.stride(-1) != 1 or x.shape[-1] % 2:
        raise ValueError(f"{where}: x must be [B, T, H, D] fp32/bf16/fp16 with even D and a "
                         f"contiguous last dim; got {tuple(x.shape)} {x.dtype} "
                         f"strides {x.stride()}")
    B, T, H, D = x.shape
    if positions.shape != (B, T) or positions.dtype not in _INDEX_DTYPES:
        raise ValueError(f"{where}: positions must be [{B}, {T}] int64/int32; "
                         f"got {tuple(positions.shape)} {positions.dtype}")
    for name, table in (("cos_table", cos_table), ("sin_table", sin_table)):
        if table.dim() != 2 or table.shape[1] != D or table.dtype != torch.float32 \
                or table.stride(1) != 1:
            raise ValueError(f"{where}: {name} must be [P, {D}] fp32 with a contiguous last dim; "
                             f"got {tuple(table.shape)} {table.dtype} strides {table.stride()}")
    if cos_table.shape != sin_table.shape or cos_table.stride() != sin_table.stride():
        raise ValueError(f"{where}: cos_table and sin_table must have the same shape and strides; "
                         f"got {tuple(cos_table.shape)} {cos_table.stride()} and "
                         f"{tuple(sin_table.shape)} {sin_table.stride()}")
    for name, t in (("positions", positions), ("cos_table", cos_table), ("sin_table", sin_table)):
        if t.device != x.device:
            raise ValueError(f"{where}: {name} must be on {x.device}; got {t.device}")
    if x.numel() == 0:
        return x
    BLOCK_HALF = triton.next_power_of_2(D // 2)
    BLOCK_H = min(triton.next_power_of_2(H), max(1, 2048 // BLOCK_HALF))  # <= 4096 elements
    grid = (B * T, triton.cdiv(H, BLOCK_H))
    _rope_kernel[grid](
        x, positions, cos_table, sin_table,
        x.stride(0), x.stride(1), x.stride(2),
        positions.stride(0), positions.stride(1),
        cos_table.stride(0),
        T, H, D // 2,
        BLOCK_H=BLOCK_H, BLOCK_HALF=BLOCK_HALF, num_warps=4,
    )
    return x
