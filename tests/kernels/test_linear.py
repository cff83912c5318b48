"""Weight products on the CPU: fp32 (numpy), weight-only bf16 and the integer kernels; the last two
must be row-invariant."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from treadle.kernels.linear import (
    INT4_CPU_KERNEL,
    INT8_CPU_KERNEL,
    ROW_INVARIANT_K,
    linear_cpu,
    linear_int4_cpu,
    linear_int8_cpu,
    linear_ref,
    pack_int4_cpu,
)
from treadle.kernels.quant_linear import (
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
)


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


# --- integer weights on the CPU: torch's weight-only kernels -------------------------------------

needs_int8 = pytest.mark.skipif(not INT8_CPU_KERNEL, reason="torch lacks _weight_int8pack_mm")
needs_int4 = pytest.mark.skipif(not INT4_CPU_KERNEL,
                                reason="torch lacks _weight_int4pack_mm_for_cpu")


def _swiglu_like(rows: int, k: int, g: torch.Generator) -> torch.Tensor:
    return F.silu(3 * torch.randn(rows, k, generator=g)) * torch.randn(rows, k, generator=g)


def _int_product(fmt: str, w: torch.Tensor, rows_per_call: int = 0):
    """(product(x, b=None), the dequantized weight) for `w` quantized to `fmt`."""
    if fmt == "int8":
        codes, scales = quantize_int8(w)
        bf16 = scales.to(torch.bfloat16)
        return (lambda x, b=None: linear_int8_cpu(x, codes, bf16, b, rows_per_call),
                dequantize_int8(codes, scales))
    codes, scales, mins = quantize_int4(w)
    packed, pairs = pack_int4_cpu(codes, scales, mins)
    return (lambda x, b=None: linear_int4_cpu(x, packed, pairs, w.shape[0], b, rows_per_call),
            dequantize_int4(codes, scales, mins))


@pytest.mark.parametrize("fmt", [pytest.param("int8", marks=needs_int8),
                                 pytest.param("int4", marks=needs_int4)])
# N not a multiple of 16 (the int4 kernel's outputs are padded to it)
@pytest.mark.parametrize("shape", [(64, 64), (37, 96), (211, 64)], ids=str)
@pytest.mark.parametrize("act", [torch.float32, torch.bfloat16], ids=str)
def test_integer_cpu_product_matches_the_dequantized_weight(fmt, shape, act):
    """The CPU kernels multiply exactly the weights quantize_* made (bf16-exact scales): what is
    left is the rounding of x and of the output to bf16."""
    n, k = shape
    g = torch.Generator().manual_seed(n + k)
    w = torch.randn(n, k, generator=g)
    x, b = torch.randn(2, 3, k, generator=g).to(act), torch.randn(n, generator=g).to(act)
    product, dense = _int_product(fmt, w)
    y = product(x, b)
    assert y.shape == (2, 3, n) and y.dtype == act and y.is_contiguous()
    exact = x.to(torch.bfloat16).double() @ dense.double().T  # x as the kernel sees it
    scale = (x.abs().double() @ dense.abs().double().T).max()
    assert ((y.double() - b.double()) - exact).abs().max() <= 2**-7 * scale


# The default model's layer products, the LM head's shape class (long N), and odd sizes.
INT_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (4096, 576), (48, 96)]


@pytest.mark.parametrize("fmt", [pytest.param("int8", marks=needs_int8),
                                 pytest.param("int4", marks=needs_int4)])
@pytest.mark.parametrize("shape", INT_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("threads", [1, 2])
def test_integer_cpu_products_are_row_invariant(fmt, shape, threads):
    """A row's result is bit for bit the same whatever the rows multiplied with it, and the same
    when the rows are fed in chunks (graph/products.py's -rows4/-rows8 candidates): with both,
    speculative decoding under integer weights is token-identical to AR. LLM runs these kernels
    in torch's pool at one thread per core."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _check_row_invariance(fmt, shape)
    finally:
        torch.set_num_threads(before)


def _check_row_invariance(fmt, shape):
    out_f, in_f = shape
    g = torch.Generator().manual_seed(out_f + in_f)
    product, _ = _int_product(fmt, torch.randn(out_f, in_f, generator=g) / in_f**0.5)
    chunked, _ = _int_product(fmt, torch.randn(out_f, in_f, generator=g) / in_f**0.5, 4)
    x = _swiglu_like(33, in_f, g)
    one = torch.cat([product(x[i : i + 1]) for i in range(33)])
    for rows in (2, 3, 4, 5, 8, 9, 16, 17, 32, 33):
        assert torch.equal(product(x[:rows]), one[:rows]), f"{fmt} {shape}: {rows} rows"
    one_c = torch.cat([chunked(x[i : i + 1]) for i in range(33)])
    assert torch.equal(chunked(x), one_c), f"{fmt} {shape}: chunks of 4"
