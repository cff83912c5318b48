"""Weight-only integer products y = x @ W.T (+ b): the formats, their references, Triton kernels.

Two formats for a weight W [N out, K in], both read as integer codes and float scales:
    int8, per output channel, symmetric:   W[n, k] = scales[n] * q[n, k]          q in [-127, 127]
    int4, groups of 32 inputs, asymmetric: W[n, k] = scales[g, n] * q + mins[g, n]  q in [0, 15],
                                           g = k // 32
int4 codes are stored two per byte, in GGML's Q4 block order (so a GGUF Q4_0/Q4_1 block copies as
it is): byte 16g + j of row n holds the code of column 32g + j in its low nibble and that of column
32g + 16 + j in its high nibble. codes: uint8 [N, K/2]; scales, mins: fp32 [K/32, N] (a group's
scales for neighbouring outputs sit side by side, which the kernel reads in one load).

`quantize_int8` / `quantize_int4` pick scales that are exactly representable in bf16, and for int4
a min such that min + 8 * scale is too: torch's CPU kernels (kernels/linear.py) take bf16 scales
and an int4 zero point of (q - 8) * scale + zero, so weights quantized here lose nothing there.

The Triton kernels, per [BLOCK_M, BLOCK_N] output tile, fp32 accumulation:
    int8: acc = sum over K blocks of x_blk @ q_blk.T;  y = acc * scales[n]
    int4: per group g (32 columns, one loop step):
          acc += (x_g @ q_g.T) * scales[g, n] + rowsum(x_g) * mins[g, n]
so the codes enter tl.dot as small exact integers and the scales multiply afterwards. x is read
in its own dtype and multiplied in fp32 (tl.dot in IEEE fp32). Every row is computed the same way
whatever the number of rows, so a row's result does not depend on the rows multiplied with it.
Bytes per output tile row: K (int8) or K/2 (int4) of codes + 4 or 8 bytes of scales per group.
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


GROUP = 32  # int4 inputs per scale/min pair (GGUF's Q4 block)
INT8_MAX = 127


# --- the formats ---------------------------------------------------------------------------------


def bf16_ceil(v: torch.Tensor) -> torch.Tensor:
    """The smallest bf16-representable value >= v (v >= 0), as fp32."""
    b = v.to(torch.bfloat16)
    low = b.float() < v
    b[low] = (b[low].view(torch.int16) + 1).view(torch.bfloat16)  # next bf16 up (v >= 0)
    return b.float()


def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] float -> (codes int8 [N, K], scales fp32 [N]), scales exact in bf16."""
    w = w.float()
    scales = bf16_ceil(w.abs().amax(1) / INT8_MAX)
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    codes = (w / safe[:, None]).round().clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return codes, scales


def dequantize_int8(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """codes int8 [N, K], scales [N] -> fp32 [N, K]."""
    return codes.float() * scales.float()[:, None]


def quantize_int4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """w [N, K] float, K a multiple of 32 -> (codes uint8 [N, K/2], scales, mins fp32 [K/32, N]).

    Per group: scale = (max - min) / 15 rounded up to bf16; min + 8 * scale rounded to bf16 (the
    CPU kernel's zero point), min recomputed from it; codes = round((w - min) / scale) in [0, 15].
    """
    n, k = w.shape
    if k % GROUP:
        raise ValueError(f"int4 needs the input size to be a multiple of {GROUP}; got {k}")
    g = w.float().reshape(n, k // GROUP, GROUP)  # [N, G, 32]
    lo, hi = g.amin(-1), g.amax(-1)  # [N, G]
    scales = bf16_ceil((hi - lo) / 15)
    mins = (lo + 8 * scales).to(torch.bfloat16).float() - 8 * scales
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    q = ((g - mins[..., None]) / safe[..., None]).round().clamp(0, 15).to(torch.uint8)
    return pack_int4(q.reshape(n, k)), scales.T.contiguous(), mins.T.contiguous()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """codes [N, K] in [0, 15] (any integer dtype) -> uint8 [N, K/2] in the block order above."""
    n, k = q.shape
    q = q.to(torch.uint8).reshape(n, k // GROUP, 2, GROUP // 2)  # [N, G, low/high, 16]
    return (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] -> codes uint8 [N, K] in [0, 15] (column order)."""
    n = codes.shape[0]
    b = codes.reshape(n, -1, GROUP // 2)  # [N, G, 16]
    return torch.stack((b & 15, b >> 4), dim=2).reshape(n, -1)


def dequantize_int4(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, K/2], scales/mins [K/32, N] -> fp32 [N, K]."""
    n = codes.shape[0]
    q = unpack_int4(codes).float().reshape(n, -1, GROUP)  # [N, G, 32]
    w = q * scales.float().T[..., None] + mins.float().T[..., None]
    return w.reshape(n, -1)


# --- references ----------------------------------------------------------------------------------


def int8_linear_ref(
    x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype: the product with the dequantized weight, in fp32."""
    y = F.linear(x.float(), dequantize_int8(codes, scales))
    return (y if bias is None else y + bias.float()).to(x.dtype)


def int4_linear_ref(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] -> [..., N] in x's dtype: the product with the dequantized weight, in fp32."""
    y = F.linear(x.float(), dequantize_int4(codes, scales, mins))
    return (y if bias is None else y + bias.float()).to(x.dtype)


# --- Triton kernels ------------------------------------------------------------------------------


@jit
def _int8_linear_kernel(
    x_ptr,  # [M, K] activations, unit column stride
    q_ptr,  # [N, K] int8 codes, unit column stride
    s_ptr,  # [N] fp32 per-output scales
    b_ptr,  # [N] bias (unused unless HAS_BIAS)
    y_ptr,  # [M, N] output, unit column stride
    M,  # rows of x
    N,  # outputs
    K,  # inputs
    stride_xm,  # elements between rows of x
    stride_qn,  # elements between rows of the codes
    stride_ym,  # elements between rows of y
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per program (>= 16: tl.dot's smallest operand)
    BLOCK_N: tl.constexpr,  # outputs per program
    BLOCK_K: tl.constexpr,  # inputs per loop step
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_ok, n_ok = rm < M, rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm  # int64: row * stride may exceed 2^31
    q_cols = q_ptr + rn.to(tl.int64)[None, :] * stride_qn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + rk
        k_ok = k < K
        x = tl.load(x_rows + k[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        q = tl.load(q_cols + k[:, None], mask=k_ok[:, None] & n_ok[None, :], other=0)  # [BK, BN]
        acc += tl.dot(x.to(tl.float32), q.to(tl.float32), input_precision="ieee")
    acc = acc * tl.load(s_ptr + rn, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


@jit
def _int4_linear_kernel(
    x_ptr,  # [M, K] activations, unit column stride
    q_ptr,  # [N, K/2] uint8 codes, two per byte (module docstring), unit column stride
    s_ptr,  # [K/32, N] fp32 scales
    z_ptr,  # [K/32, N] fp32 mins
    b_ptr,  # [N] bias (unused unless HAS_BIAS)
    y_ptr,  # [M, N] output, unit column stride
    M,  # rows of x
    N,  # outputs
    K,  # inputs, a multiple of 32
    stride_xm,  # elements between rows of x
    stride_qn,  # bytes between rows of the codes
    stride_ym,  # elements between rows of y
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,  # rows per program (>= 16: tl.dot's smallest operand)
    BLOCK_N: tl.constexpr,  # outputs per program
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    j = tl.arange(0, 16)  # byte j of a group: columns j (low nibble) and 16 + j (high nibble)
    m_ok, n_ok = rm < M, rn < N
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm
    q_cols = q_ptr + rn.to(tl.int64)[None, :] * stride_qn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(0, K // 32):
        b = tl.load(q_cols + (16 * g + j)[:, None], mask=n_ok[None, :], other=0)  # [16, BN]
        low = (b & 15).to(tl.float32)
        high = (b >> 4).to(tl.float32)
        x_low = tl.load(x_rows + (32 * g + j)[None, :], mask=m_ok[:, None], other=0.0)
        x_high = tl.load(x_rows + (32 * g + 16 + j)[None, :], mask=m_ok[:, None], other=0.0)
        x_low, x_high = x_low.to(tl.float32), x_high.to(tl.float32)  # [BM, 16]
        dot = tl.dot(x_low, low, input_precision="ieee")
        dot = tl.dot(x_high, high, dot, input_precision="ieee")  # sum_j x * q over the group
        x_sum = tl.sum(x_low, axis=1) + tl.sum(x_high, axis=1)  # [BM]
        s = tl.load(s_ptr + g * N + rn, mask=n_ok, other=0.0)
        z = tl.load(z_ptr + g * N + rn, mask=n_ok, other=0.0)
        acc += dot * s[None, :] + x_sum[:, None] * z[None, :]
    if HAS_BIAS:
        acc += tl.load(b_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    y = y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :]
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK_M = 16
BLOCK_N = 64


def _check(where: str, x: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
    if triton is None:
        raise RuntimeError(f"{where} needs the `triton` package (not installed); use the _ref")
    if not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{where} runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1);"
                           f" got x on {x.device}")
    if x.dtype not in _DTYPES:
        raise ValueError(f"{where}: x must be fp32/bf16/fp16; got {x.dtype}")
    for name, t in tensors.items():
        if t is not None and t.device != x.device:
            raise ValueError(f"{where}: {name} is on {t.device}, x on {x.device}")


def _rows(x: torch.Tensor, k: int, where: str) -> torch.Tensor:
    if x.shape[-1] != k:
        raise ValueError(f"{where}: x has {x.shape[-1]} inputs, the weight {k}")
    x2 = x.reshape(-1, k)
    return x2 if x2.stride(-1) == 1 else x2.contiguous()


def int8_linear(
    x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """x [..., K] fp32/bf16/fp16, codes int8 [N, K], scales fp32 [N] -> y [..., N] in x's dtype."""
    where = "kernels/quant_linear.py: int8_linear"
    _check(where, x, {"codes": codes, "scales": scales, "bias": bias})
    n, k = codes.shape
    if codes.dtype != torch.int8 or codes.stride(-1) != 1:
        raise ValueError(f"{where}: codes must be int8 [N, K] with unit column stride")
    if scales.shape != (n,) or scales.dtype != torch.float32 or not scales.is_contiguous():
        raise ValueError(f"{where}: scales must be contiguous fp32 [{n}]; got {scales.dtype} "
                         f"{tuple(scales.shape)}")
    x2 = _rows(x, k, where)
    y = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    if y.numel():
        grid = (triton.cdiv(x2.shape[0], BLOCK_M), triton.cdiv(n, BLOCK_N))
        _int8_linear_kernel[grid](
            x2, codes, scales, bias if bias is not None else scales, y,
            x2.shape[0], n, k, x2.stride(0), codes.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=64,
            num_warps=4,
        )
    return y.view(*x.shape[:-1], n)


def int4_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    mins: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] fp32/bf16/fp16, codes uint8 [N, K/2], scales/mins fp32 [K/32, N] -> [..., N]."""
    where = "kernels/quant_linear.py: int4_linear"
    _check(where, x, {"codes": codes, "scales": scales, "mins": mins, "bias": bias})
    n, k = codes.shape[0], 2 * codes.shape[1]
    if codes.dtype != torch.uint8 or codes.stride(-1) != 1 or k % GROUP:
        raise ValueError(f"{where}: codes must be uint8 [N, K/2] with unit column stride and K a "
                         f"multiple of {GROUP}; got {codes.dtype} {tuple(codes.shape)}")
    for name, t in (("scales", scales), ("mins", mins)):
        if t.shape != (k // GROUP, n) or t.dtype != torch.float32 or not t.is_contiguous():
            raise ValueError(f"{where}: {name} must be contiguous fp32 [{k // GROUP}, {n}]; got "
                             f"{t.dtype} {tuple(t.shape)}")
    x2 = _rows(x, k, where)
    y = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    if y.numel():
        grid = (triton.cdiv(x2.shape[0], BLOCK_M), triton.cdiv(n, BLOCK_N))
        _int4_linear_kernel[grid](
            x2, codes, scales, mins, bias if bias is not None else scales, y,
            x2.shape[0], n, k, x2.stride(0), codes.stride(0), y.stride(0),
            HAS_BIAS=bias is not None, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=4,
        )
    return y.view(*x.shape[:-1], n)
