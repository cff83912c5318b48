"""int8 weight products on the CPU with fp32 activations, compiled by numba.

y = x @ dequantize(W).T for kernels/quant_linear.py's int8 format (int8 codes per output channel,
one fp32 scale per channel).

Why not torch's weight-only kernel (kernels/linear.py): its vector path takes bf16 activations only.
On a CPU without AVX-512 BF16 (the AVX2 Zen 3 machines) bf16 is emulated, and the bf16 rounding of
every product's input and output costs accuracy: greedy tokens flip where the model's top two
logits are close. Here the activations stay fp32 and so does the accumulation; the only error is
the weights' own quantization. It is also faster there: all 121 int8 products of the default model
(30 layers + LM head), 2 threads, AVX2 Zen 3, in ms at 1 / 4 / 8 / 32 rows: this kernel
8.9 / 20 / 39 / 141, torch's int8 kernel 21 / 23 / 50 / 142 (perf/results/bench_linear-vm-avx2.json;
graph/products.py times both on each machine and keeps the faster).

How: the output channels are split into chunks over numba's threads; each (row, channel) pair is one
dot product of an fp32 row of x with the channel's int8 codes, converted to fp32 as they are read
(the compiled loop uses several vector accumulators), then scaled.

Row invariance (graph/products.py): every (row, channel) dot product runs the same compiled loop
over the same operands whatever the number of rows, so a row's result is bit-identical alone or
inside a k-row verify step (tests/kernels/test_cpu_quant_linear.py checks it, and the result
against `int8_linear_ref`).

Not here: int4. The same scheme for int4 groups (unpacking two codes per byte) did not vectorize
under numba (63 ms at one row against 19 ms for torch's int4 kernel, measured on the same machine),
so int4 stays on torch's kernel.

numba compiles the kernel on first use (a few seconds; cached on disk beside this file afterwards).
Without numba, AVAILABLE is False and graph/products.py does not offer it.
"""

from __future__ import annotations

import numpy as np
import torch

try:  # numba is a dependency (pyproject.toml); a missing one only removes this candidate
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - exercised only where numba is absent
    numba = None
AVAILABLE = numba is not None
CHUNK = 16  # output channels per task: enough tasks to balance the threads

if AVAILABLE:
    # fastmath lets the dot product keep several vector accumulators (a reassociated sum); the
    # loop is one and the same compiled code for every (row, channel), so a row's bits still do
    # not depend on the other rows.
    @njit(fastmath=True, cache=True, nogil=True)
    def _dot_int8(x, codes):  # x [K] f32, codes [K] i8
        acc = np.float32(0.0)
        for k in range(x.shape[0]):
            acc += x[k] * np.float32(codes[k])
        return acc

    @njit(parallel=True, fastmath=True, cache=True, nogil=True)
    def _int8_kernel(x, codes, scales, out):  # x [M, K] f32, codes [N, K] i8, scales [N] f32
        m_rows = x.shape[0]
        n_out = codes.shape[0]
        for chunk in prange((n_out + CHUNK - 1) // CHUNK):
            for n in range(chunk * CHUNK, min(n_out, chunk * CHUNK + CHUNK)):
                row = codes[n]
                scale = scales[n]
                for m in range(m_rows):
                    out[m, n] = _dot_int8(x[m], row) * scale


def int8_linear_cpu(
    x: torch.Tensor,
    codes: torch.Tensor | np.ndarray,
    scales: torch.Tensor | np.ndarray,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """x [..., K] -> [..., N]: codes int8 [N, K], scales fp32 [N], as tensors or as numpy views of
    them (graph/weights.py keeps the views, saving two conversions a call). Reference:
    kernels/quant_linear.py int8_linear_ref."""
    if isinstance(codes, torch.Tensor):
        codes, scales = codes.numpy(), scales.float().numpy()
    x2 = x.reshape(-1, x.shape[-1])
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    y = torch.empty(x2.shape[0], codes.shape[0])
    _int8_kernel(x2.numpy(), codes, scales, y.numpy())
    if bias is not None:
        y += bias.float()
    return y.view(*x.shape[:-1], codes.shape[0]).to(x.dtype)

