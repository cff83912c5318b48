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
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

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
