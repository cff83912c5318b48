"""kernels/cpu_quant_linear.py: the numba int8 product against its reference, and row invariance."""

from __future__ import annotations

import pytest
import torch
from treadle.kernels import cpu_quant_linear as C
from treadle.kernels.quant_linear import int8_linear_ref, quantize_int8

pytestmark = pytest.mark.skipif(not C.AVAILABLE, reason="numba is not installed")


@pytest.mark.parametrize("rows, n, k", [(1, 1, 1), (1, 17, 33), (3, 16, 64), (5, 100, 576),
                                        (8, 35, 1536), (33, 7, 9)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_the_reference(rows, n, k, bias):
    g = torch.Generator().manual_seed(rows * 1000 + n + k)
    codes, scales = quantize_int8(torch.randn(n, k, generator=g))
    b = torch.randn(n, generator=g) if bias else None
    x = torch.randn(rows, k, generator=g)
    y = C.int8_linear_cpu(x, codes, scales, b)
    ref = int8_linear_ref(x, codes, scales, b)
    assert y.shape == ref.shape and y.dtype == torch.float32
    # fp32 accumulation in another order than the reference's: a few fp32 roundings of the sum
    bound = 1e-6 * k * (x.abs() @ (codes.float().abs() * scales[:, None]).T).max() + 1e-6
    assert (y - ref).abs().max() <= bound


def test_any_leading_shape_layout_and_dtype():
    g = torch.Generator().manual_seed(3)
    codes, scales = quantize_int8(torch.randn(24, 40, generator=g))
    x = torch.randn(2, 3, 80, generator=g)[..., ::2]  # not contiguous
    y = C.int8_linear_cpu(x, codes, scales)
    assert y.shape == (2, 3, 24)
    assert torch.equal(y, C.int8_linear_cpu(x.contiguous(), codes.numpy(), scales.numpy()))
    half = C.int8_linear_cpu(x.to(torch.bfloat16), codes, scales)
    assert half.dtype == torch.bfloat16


def test_a_row_is_the_same_bits_alone_or_among_others():
    g = torch.Generator().manual_seed(4)
    codes, scales = quantize_int8(torch.randn(300, 576, generator=g))
    x = torch.randn(20, 576, generator=g)
    alone = torch.cat([C.int8_linear_cpu(x[i : i + 1], codes, scales) for i in range(20)])
    for rows in (2, 3, 7, 16, 20):
        assert torch.equal(C.int8_linear_cpu(x[:rows], codes, scales), alone[:rows])
