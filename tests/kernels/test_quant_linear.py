"""kernels/quant_linear.py: the int8/int4 weight formats, and the Triton kernels against their refs.

The Triton tests run under TRITON_INTERPRET=1 on the CPU (set here unless the runner set it); with
TRITON_INTERPRET=0 on a CUDA machine (perf/gpu_check.sh) the same tests check the compiled kernels.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch
import torch.nn.functional as F
from treadle.kernels import quant_linear as K

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
needs_triton = pytest.mark.skipif(
    K.triton is None or (not INTERPRET and not torch.cuda.is_available()),
    reason="needs triton, and a CUDA device unless TRITON_INTERPRET=1",
)

# (M rows, N outputs, K inputs): one row (decode), a verify step, and odd ones (N and M not
# multiples of any block; K a multiple of 32 for int4, of nothing for int8).
SHAPES = [(1, 64, 64), (5, 96, 128), (3, 37, 96), (17, 130, 160)]
INT8_ODD_K = [(3, 37, 41), (2, 9, 341)]


def weights(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    # Rows of different magnitudes and a shifted group: scales and mins both matter.
    return torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) + 0.3


# --- the formats ---------------------------------------------------------------------------------


def test_int4_round_trip_and_layout():
    w = weights(24, 96)
    codes, scales, mins = K.quantize_int4(w)
    assert codes.dtype == torch.uint8 and codes.shape == (24, 48)
    assert scales.shape == mins.shape == (3, 24)
    q = K.unpack_int4(codes)
    assert q.max() <= 15 and torch.equal(K.pack_int4(q), codes)
    # GGML's nibble order: byte 16g + j holds columns 32g + j (low) and 32g + 16 + j (high).
    assert torch.equal(codes[:, 16 + 3] & 15, q[:, 32 + 3])
    assert torch.equal(codes[:, 16 + 3] >> 4, q[:, 32 + 16 + 3])
    err = (K.dequantize_int4(codes, scales, mins) - w).abs()
    step = scales.T.repeat_interleave(32, dim=1)
    assert (err <= step / 2 + 1e-6).all()  # round to nearest within the group's range


def test_int8_round_trip():
    w = weights(24, 41)
    codes, scales = K.quantize_int8(w)
    assert codes.dtype == torch.int8 and scales.shape == (24,)
    err = (K.dequantize_int8(codes, scales) - w).abs()
    assert (err <= scales[:, None] / 2 + 1e-6).all()
    zero = K.quantize_int8(torch.zeros(2, 8))
    assert (zero[0] == 0).all() and torch.equal(K.dequantize_int8(*zero), torch.zeros(2, 8))


def test_scales_are_exact_in_bf16():
    """torch's CPU kernels take bf16 scales (and int4 zero points min + 8 * scale): weights
    quantized here must lose nothing there."""
    w = weights(16, 64)
    _, s8 = K.quantize_int8(w)
    _, s4, m4 = K.quantize_int4(w)
    assert torch.equal(s8.bfloat16().float(), s8)
    assert torch.equal(s4.bfloat16().float(), s4)
    zero = m4 + 8 * s4
    assert torch.equal(zero.bfloat16().float(), zero)
    v = torch.tensor([0.0, 1e-3, 0.3, 7.0, 1.00390625])
    up = K.bf16_ceil(v)
    assert (up >= v).all() and torch.equal(up.bfloat16().float(), up)


def test_int4_needs_groups_of_32():
    with pytest.raises(ValueError, match="multiple of 32"):
        K.quantize_int4(torch.randn(4, 40))


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_refs_are_the_dequantized_product(fmt):
    w, x, b = weights(37, 96), torch.randn(3, 96), torch.randn(37)
    if fmt == "int8":
        q = K.quantize_int8(w)
        y, dense = K.int8_linear_ref(x, *q, b), K.dequantize_int8(*q)
    else:
        q = K.quantize_int4(w)
        y, dense = K.int4_linear_ref(x, *q, b), K.dequantize_int4(*q)
    torch.testing.assert_close(y, F.linear(x, dense, b))


# --- the Triton kernels --------------------------------------------------------------------------

DTYPES = [torch.float32, torch.bfloat16]


def assert_close_to_ref(y, x, dense, b, ref):
    """fp32: within fp32 rounding of the reference. bf16: within 2x the error of torch's own bf16
    product on the same data (+ one bf16 step: the interpreter truncates where a GPU rounds)."""
    y = y.float().cpu()
    if y.dtype == torch.float32 and x.dtype == torch.float32:
        torch.testing.assert_close(y, ref, atol=1e-4 * x.shape[-1] ** 0.5, rtol=1e-4)
        return
    torch_bf16 = F.linear(x.bfloat16(), dense.bfloat16(), None if b is None else b.bfloat16())
    bound = 2 * (torch_bf16.float() - ref).abs().max() + 2.0 ** (torch.frexp(ref.abs())[1] - 8)
    assert ((y - ref).abs() <= bound).all(), ((y - ref).abs().max(), bound.min())


def dev(t):
    return None if t is None else t.to(DEVICE)


@needs_triton
@pytest.mark.parametrize("shape", SHAPES + INT8_ODD_K, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_int8_kernel(shape, dtype, bias):
    m, n, k = shape
    codes, scales = K.quantize_int8(weights(n, k))
    x = torch.randn(m, k).to(dtype)
    b = torch.randn(n) if bias else None
    ref = K.int8_linear_ref(x.float(), codes, scales, b)
    y = K.int8_linear(dev(x), dev(codes), dev(scales), dev(b))
    assert y.shape == (m, n) and y.dtype == dtype
    assert_close_to_ref(y, x, K.dequantize_int8(codes, scales), b, ref)


@needs_triton
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bias", [False, True])
def test_int4_kernel(shape, dtype, bias):
    m, n, k = shape
    codes, scales, mins = K.quantize_int4(weights(n, k))
    x = torch.randn(m, k).to(dtype)
    b = torch.randn(n) if bias else None
    ref = K.int4_linear_ref(x.float(), codes, scales, mins, b)
    y = K.int4_linear(dev(x), dev(codes), dev(scales), dev(mins), dev(b))
    assert y.shape == (m, n) and y.dtype == dtype
    assert_close_to_ref(y, x, K.dequantize_int4(codes, scales, mins), b, ref)


@needs_triton
def test_leading_dims_and_strided_rows():
    codes, scales, mins = (t.to(DEVICE) for t in K.quantize_int4(weights(40, 64)))
    buf = torch.randn(2, 3, 80, device=DEVICE)
    x = buf[..., :64]  # rows of a wider buffer
    y = K.int4_linear(x, codes, scales, mins)
    assert y.shape == (2, 3, 40)
    torch.testing.assert_close(y, K.int4_linear_ref(x, codes, scales, mins), atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(INTERPRET or not torch.cuda.is_available(),
                    reason="compiled kernels only: the interpreter's tl.dot is numpy's matmul, "
                    "whose rounding depends on where a row sits in the tile")
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_kernels_are_row_invariant(fmt):
    w = weights(576, 576)
    x = torch.randn(17, 576, device="cuda")
    if fmt == "int8":
        q = [t.cuda() for t in K.quantize_int8(w)]
        run = lambda r: K.int8_linear(r, *q)  # noqa: E731
    else:
        q = [t.cuda() for t in K.quantize_int4(w)]
        run = lambda r: K.int4_linear(r, *q)  # noqa: E731
    one = torch.cat([run(x[i : i + 1]) for i in range(17)])
    for rows in (2, 3, 4, 8, 16, 17):
        assert torch.equal(run(x[:rows]), one[:rows]), rows


@needs_triton
def test_bad_inputs():
    codes, scales, mins = (t.to(DEVICE) for t in K.quantize_int4(weights(8, 64)))
    with pytest.raises(ValueError, match="x has 32 inputs, the weight 64"):
        K.int4_linear(torch.zeros(2, 32, device=DEVICE), codes, scales, mins)
    with pytest.raises(ValueError, match="scales must be contiguous fp32"):
        K.int4_linear(torch.zeros(2, 64, device=DEVICE), codes, scales.half(), mins)
    with pytest.raises(ValueError, match="codes must be int8"):
        K.int8_linear(torch.zeros(2, 32, device=DEVICE), codes, scales[0], None)
    with pytest.raises(ValueError, match="fp32/bf16/fp16"):
        K.int4_linear(torch.zeros(2, 64, dtype=torch.int32, device=DEVICE), codes, scales, mins)


def test_without_triton_or_device(monkeypatch):
    codes, scales = K.quantize_int8(weights(8, 32))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    if K.triton is not None:
        with pytest.raises(RuntimeError, match="CUDA tensors"):
            K.int8_linear(torch.zeros(2, 32), codes, scales)
    monkeypatch.setattr(K, "triton", None)
    with pytest.raises(RuntimeError, match="needs the `triton` package"):
        K.int8_linear(torch.zeros(2, 32), codes, scales)
