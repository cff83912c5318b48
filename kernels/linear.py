"""y = x @ W.T (+ b) for W [out, in], choosing the fastest product for the shape and device.

On the CPU, for a few rows of x, numpy's OpenBLAS matrix-vector product streams the weights about
twice as fast as torch's (12 ms vs 24-32 ms for the default model's 30 layers + LM head at one
token, measured on the 2-core CI machine; see perf/results/). numpy arrays share memory with torch
tensors, so the switch costs no copy.

Weight-only bf16 (a Linear whose weight is narrower than x): x is rounded to the weight's dtype and
the product runs there (oneDNN's AVX-512 BF16 path on the CPU), the result cast back. This halves
the bytes streamed, and, more important for speculative verification, its cost stays flat in the
number of rows: on the 2-core CI machine (AMD EPYC, AVX-512 BF16), the default model's 30 layers +
LM head take 12.6 ms at 1 row, 12.7 at 4, 14.0 at 8 and 17.5 at 16, where fp32 takes 13.7 ms at
1 row (numpy matvec) but 29-50 ms at 2-16 rows (numpy/OpenBLAS, torch/MKL: both pack the weight
for small-M GEMMs). perf/bench_linear.py measures it (results/bench_linear-vm.json).

Without AVX-512 BF16 (a Zen 3 EPYC with AVX2 only, results/bench_linear-vm-avx2.json) oneDNN
emulates bf16: one row is still faster than fp32 (17-19 ms vs 22-25 ms, half the bytes), but the
cost grows with the rows (58-72 ms at 4, 229 ms at 16), so there fp32 weights are the setting for
speculative decoding. On that machine torch/MKL's W @ x.T at 2-4 rows (25-35 ms) beats OpenBLAS
(40-64 ms) when timed alone, but not inside a forward: MKL needs torch's OpenMP pool at 2 threads,
and that pool and OpenBLAS's spin against each other on 2 cores (AR fell from 22.6 to 3.4 tokens/s,
an n-gram GSD verify step from 65 to 216 ms). With torch at 1 thread it was slower for chains
and 4-node trees (97 and 81 ms vs 65 ms per verify step) and only a little faster for 8-node
trees (68 vs 75 ms), where most products have more rows than it was used for.

Integer weights (kernels/quant_linear.py's int8 and int4 formats) run on the CPU in torch's
weight-only kernels, `_weight_int8pack_mm` and `_weight_int4pack_mm_for_cpu`. Their x86 vector
paths take bf16 activations only (with fp32 or fp16 ones they run scalar loops, 10-50x slower,
measured on an AVX2 Zen 3): x is rounded to bf16 for the product, the bf16 result cast back. Both
compute a row the same whatever the number of rows (tests/kernels/test_linear.py), so calling them
on row chunks (`rows_per_call`) gives the same bits, and can be faster where a kernel's cost grows
faster than the rows (graph/products.py times it). int4 scales and zero points enter as bf16:
exact for weights quantized by kernels/quant_linear.py, rounded for a GGUF file's fp16 ones (the
default model's 210 Q4_1 matrices, held exactly by the int4 format, move by at most 4.6% of a
quantization step, 0.20% of the weights' RMS, in the kernel's form).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .quant_linear import GROUP, unpack_int4

# oneDNN's bf16 product computes a row the same whether it comes alone or with others, except, on
# the CI machine's CPU, when the reduction is longer than this (the default model's down projection,
# 1536): there it splits the reduction differently by row count. Longer reductions are cut into
# chunks of at most this length, each a row-invariant product (tests/kernels/test_linear.py).
ROW_INVARIANT_K = 1024


def linear_ref(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    if x.dtype != w.dtype:  # weight-only precision: the product in the weight's dtype
        xw = x.to(w.dtype)
        k = w.shape[1]
        chunks = -(-k // ROW_INVARIANT_K)
        if chunks == 1:
            y = F.linear(xw, w).to(x.dtype)
        else:
            step = -(-k // chunks)
            y = sum(F.linear(xw[..., i : i + step], w[:, i : i + step]).to(x.dtype)
                    for i in range(0, k, step))
        return y if b is None else y + b
    return F.linear(x, w, b)


def linear_cpu(
    x: torch.Tensor,  # [..., in] fp32 on the CPU
    w_host: np.ndarray,  # [out, in], C-contiguous numpy view of the weight
    b: torch.Tensor | None = None,
) -> torch.Tensor:  # [..., out]
    x2 = x.reshape(-1, x.shape[-1])
    xn = x2.numpy() if x2.is_contiguous() else np.ascontiguousarray(x2.numpy())
    if xn.shape[0] == 1:
        # Matrix-vector: W [out, in] @ x [in, 1] keeps the weight in its natural row order.
        y = torch.from_numpy((w_host @ xn.T).T)
    else:
        y = torch.from_numpy(xn @ w_host.T)
    if b is not None:
        y += b
    return y.view(*x.shape[:-1], w_host.shape[0])


# torch's weight-only CPU kernels (absent from older torch builds: the products then run the
# dequantizing references, and LLM.describe() says so).
INT8_CPU_KERNEL = hasattr(torch, "_weight_int8pack_mm")
INT4_CPU_KERNEL = hasattr(torch, "_weight_int4pack_mm_for_cpu")
INT4_CPU_ROWS = 16  # the int4 kernel needs the outputs in multiples of 16: pad with zero rows


def pack_int4_cpu(
    codes: torch.Tensor,  # uint8 [N, K/2], kernels/quant_linear.py's layout
    scales: torch.Tensor,  # [K/32, N]
    mins: torch.Tensor,  # [K/32, N]
) -> tuple[torch.Tensor, torch.Tensor]:  # (torch's packed codes, bf16 [K/32, N16, 2])
    """The int4 CPU kernel's form: codes repacked by torch (its layout depends on the CPU's vector
    width, so it is made at load, never stored), N padded to a multiple of 16, and per group the
    pair (scale, zero) with w = (q - 8) * scale + zero, i.e. zero = min + 8 * scale."""
    n = codes.shape[0]
    pad = -n % INT4_CPU_ROWS
    q = F.pad(unpack_int4(codes).to(torch.int32), (0, 0, 0, pad))  # [N16, K]
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 1)
    pairs = torch.stack((scales.float(), mins.float() + 8 * scales.float()), dim=-1)
    return packed, F.pad(pairs, (0, 0, 0, pad)).to(torch.bfloat16).contiguous()


def _chunked(kernel, x2: torch.Tensor, rows_per_call: int) -> torch.Tensor:
    if rows_per_call <= 0 or x2.shape[0] <= rows_per_call:
        return kernel(x2)
    return torch.cat([kernel(x2[i : i + rows_per_call])
                      for i in range(0, x2.shape[0], rows_per_call)])


def _finish(y: torch.Tensor, x: torch.Tensor, n_out: int, b: torch.Tensor | None) -> torch.Tensor:
    y = y[:, :n_out].to(x.dtype)
    if not y.is_contiguous():  # padded outputs sliced off under bf16 activations
        y = y.contiguous()
    if b is not None:
        y += b
    return y.view(*x.shape[:-1], n_out)


def linear_int8_cpu(
    x: torch.Tensor,  # [..., K]
    codes: torch.Tensor,  # int8 [N, K]
    scales: torch.Tensor,  # bf16 [N]
    b: torch.Tensor | None = None,
    rows_per_call: int = 0,  # > 0: call the kernel on chunks of this many rows (same bits)
) -> torch.Tensor:  # [..., N] in x's dtype
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    y = _chunked(lambda r: torch._weight_int8pack_mm(r, codes, scales), x2, rows_per_call)
    return _finish(y, x, codes.shape[0], b)


def linear_int4_cpu(
    x: torch.Tensor,  # [..., K]
    packed: torch.Tensor,  # pack_int4_cpu's codes
    scales_zeros: torch.Tensor,  # pack_int4_cpu's bf16 [K/32, N16, 2]
    n_out: int,  # N (the packed form may hold up to 15 padding outputs more)
    b: torch.Tensor | None = None,
    rows_per_call: int = 0,  # > 0: call the kernel on chunks of this many rows (same bits)
) -> torch.Tensor:  # [..., N] in x's dtype
    x2 = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
    y = _chunked(lambda r: torch._weight_int4pack_mm_for_cpu(r, packed, GROUP, scales_zeros), x2,
                 rows_per_call)
    return _finish(y, x, n_out, b)
