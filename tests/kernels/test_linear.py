"""Weight products: the fp32 CPU path and weight-only bf16, which must be row-invariant."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from treadle.kernels.linear import ROW_INVARIANT_K, linear_cpu, linear_ref


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_cpu_fp32_product_matches_the_reference(rows):
    g = torch.Generator().manual_seed(rows)
    w, b = torch.randn(40, 24, generator=g), torch.randn(40, generator=g)
    x = torch.randn(2, rows, 24, generator=g)
    torch.testing.assert_close(linear_cpu(x, w.numpy(), b), linear_ref(x, w, b))


@pytest.mark.parametrize("k", [576, 1536, 2 * ROW_INVARIANT_K + 5])
def test_bf16_weights_under_fp32_inputs(k):
    g = torch.Generator().manual_seed(k)
    w, x, b = torch.randn(64, k, generator=g), torch.randn(5, k, generator=g), torch.randn(64)
    y = linear_ref(x, w.to(torch.bfloat16), b)
    assert y.dtype == torch.float32
    exact = x.to(torch.bfloat16).double() @ w.to(torch.bfloat16).double().T + b.double()
    # one bf16 rounding of each chunk's output: 2^-8 relative, per chunk
    chunks = -(-k // ROW_INVARIANT_K)
    scale = (x.abs().to(torch.float64) @ w.abs().double().T).max()
    assert (y.double() - exact).abs().max() <= chunks * 2**-8 * scale


# The default model's products (qkv, o, gate_up, down, LM head) and a long reduction.
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576), (2048, 3000)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_bf16_product_is_row_invariant(shape):
    """Row i of a k-row product equals the one-row product of row i, bit for bit, for every k a
    verify step may use: speculative decoding under bf16 weights depends on it (graph/backend.py).
    Thousands of outputs: a different reduction order shows as rounding flips in some of them
    (checked: without kernels/linear.py's chunking, 576x1536 and 2048x3000 fail here)."""
    out_f, in_f = shape
    g = torch.Generator().manual_seed(out_f + in_f)
    w = (torch.randn(out_f, in_f, generator=g) / in_f**0.5).to(torch.bfloat16)
    # SwiGLU-like activations (what the down projection sees): heavy tails and many near-zeros,
    # which expose a changed reduction order where plain normal data may not.
    x = F.silu(3 * torch.randn(17, in_f, generator=g)) * torch.randn(17, in_f, generator=g)
    one = torch.cat([linear_ref(x[i : i + 1], w) for i in range(17)])
    for rows in (2, 3, 4, 5, 8, 9, 16, 17):
        got = linear_ref(x[:rows], w)
        assert torch.equal(got, one[:rows]), f"{shape}: {rows} rows differ from one row at a time"
    assert not np.isnan(one.numpy()).any()
