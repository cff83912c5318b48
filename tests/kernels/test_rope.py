"""kernels/rope.py: the in-place Triton rope_ (position gather inside) against rope_ref.

Runs under TRITON_INTERPRET=1 on the CPU (set here unless the runner set it); with
TRITON_INTERPRET=0 on a CUDA machine the same tests check the compiled kernel.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

tl = pytest.importorskip("triton.language")
from treadle.graph.config import RopeScaling, rope_inv_freq  # noqa: E402
from treadle.kernels import rope as K  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
if INTERPRET and not isinstance(tl.sigmoid, InterpretedFunction):  # triton's own @jit helpers
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set (triton decides at import); "
                "set it at the top of tests/conftest.py or in the environment",
                allow_module_level=True)
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"

SHAPES = [  # (B, T, H, D)
    (1, 1, 1, 8),
    (2, 3, 5, 16),
    (3, 5, 7, 24),  # odd heads, D/2 = 12 padded to 16
    (1, 2, 6, 1024),  # 2 head blocks per token (BLOCK_H = 4)
]
DTYPES = [  # (dtype, atol, rtol) against the fp32 reference
    (torch.float32, 1e-5, 1e-5),
    (torch.bfloat16, 2e-2, 2e-2),
    (torch.float16, 2e-3, 2e-3),
]


def bf16_ulp(x):
    """Spacing of bf16 numbers at |x| (8 significant bits)."""
    _, exponent = torch.frexp(x.abs())
    return torch.ldexp(torch.ones_like(x), exponent - 8)


def assert_close_to_ref(out, ref32, ref_low, atol, rtol):
    """out close to the fp32 ref, and (low precision) its error at most ~2x torch's own.

    Triton's interpreter truncates fp32 -> bf16 (triton/runtime/interpreter.py, _convert_float)
    where the GPU rounds to nearest even: under the interpreter bf16 results get one more ulp.
    """
    torch.testing.assert_close(out.float(), ref32, atol=atol, rtol=rtol)
    if out.dtype == torch.float32:
        return
    err = (out.float() - ref32).abs()
    bound = 2 * (ref_low.float() - ref32).abs().max() + 1e-6
    if INTERPRET and out.dtype == torch.bfloat16:
        bound = bound + bf16_ulp(ref32)
    assert (err <= bound).all(), (err.max().item(), bound.min().item())


def tables(head_dim, max_positions, scaling=None, theta=10000.0):
    cfg = type("Cfg", (), {"head_dim": head_dim, "rope_theta": theta, "rope_scaling": scaling})
    cos, sin = K.rope_tables(rope_inv_freq(cfg), max_positions)
    return cos.to(DEVICE), sin.to(DEVICE)


def check(x, positions, cos, sin, atol, rtol):
    """rope_ on a copy of x vs rope_ref, in place and returning its argument."""
    out = x.clone()
    assert K.rope_(out, positions, cos, sin) is out
    ref32 = K.rope_ref(x.float(), cos[positions], sin[positions])
    assert_close_to_ref(out, ref32, K.rope_ref(x, cos[positions], sin[positions]), atol, rtol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_rope(shape, dtype, atol, rtol):
    B, T, H, D = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g).to(dtype).to(DEVICE)
    positions = torch.randint(0, 64, (B, T), generator=g).to(DEVICE)
    cos, sin = tables(D, 64)
    check(x, positions, cos, sin, atol, rtol)


@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_llama3_scaled_table(dtype, atol, rtol):
    """Scaling lives in the tables; far positions make the angles large."""
    scaling = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192)
    cos, sin = tables(32, 16384, scaling, theta=500000.0)
    plain_cos, _ = tables(32, 16384, None, theta=500000.0)
    assert not torch.allclose(cos, plain_cos)  # the scaling changes the table
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 32, generator=g).to(dtype).to(DEVICE)
    positions = torch.tensor([[0, 8191, 16383], [12000, 5, 9000]], device=DEVICE)
    check(x, positions, cos, sin, atol, rtol)


def test_strided_view_into_fused_qkv():
    """q and k heads rotated in place inside the fused QKV buffer; v untouched."""
    B, T, Hq, Hkv, D = 2, 3, 4, 2, 16
    n_qk = Hq + Hkv
    qkv = torch.randn(B, T, (n_qk + Hkv) * D, device=DEVICE)
    before = qkv.clone()
    positions = torch.tensor([[3, 4, 5], [0, 1, 7]], device=DEVICE)
    cos, sin = tables(D, 8)
    x = qkv[..., : n_qk * D].view(B, T, n_qk, D)
    assert not x.is_contiguous()
    K.rope_(x, positions, cos, sin)
    expected = K.rope_ref(before[..., : n_qk * D].view(B, T, n_qk, D), cos[positions],
                          sin[positions])
    torch.testing.assert_close(qkv[..., : n_qk * D].view(B, T, n_qk, D), expected)
    assert torch.equal(qkv[..., n_qk * D :], before[..., n_qk * D :])


def test_strided_positions_and_int32():
    B, T, H, D = 2, 3, 3, 8
    x = torch.randn(B, T, H, D, device=DEVICE)
    cos, sin = tables(D, 16)
    wide = torch.randint(0, 16, (B, 2 * T), device=DEVICE)
    check(x, wide[:, ::2], cos, sin, 1e-5, 1e-5)  # non-contiguous positions
    check(x, wide[:, :T].to(torch.int32), cos, sin, 1e-5, 1e-5)


def test_position_zero_is_identity():
    x = torch.randn(1, 4, 3, 16, device=DEVICE)
    cos, sin = tables(16, 4)
    out = K.rope_(x.clone(), torch.zeros(1, 4, dtype=torch.long, device=DEVICE), cos, sin)
    torch.testing.assert_close(out, x)


def test_bad_inputs():
    cos, sin = tables(8, 4)
    pos = torch.zeros(1, 2, dtype=torch.long, device=DEVICE)
    x = torch.zeros(1, 2, 3, 8, device=DEVICE)
    with pytest.raises(ValueError, match="even D"):
        K.rope_(torch.zeros(1, 2, 3, 7, device=DEVICE), pos, cos[:, :7], sin[:, :7])
    with pytest.raises(ValueError, match="contiguous last dim"):
        K.rope_(torch.zeros(1, 2, 8, 3, device=DEVICE).transpose(2, 3), pos, cos, sin)
    with pytest.raises(ValueError, match="positions must be"):
        K.rope_(x, pos.float(), cos, sin)
    with pytest.raises(ValueError, match="positions must be"):
        K.rope_(x, pos[:, :1], cos, sin)
    with pytest.raises(ValueError, match="cos_table must be"):
        K.rope_(x, pos, cos.half(), sin)
    with pytest.raises(ValueError, match="sin_table must be"):
        K.rope_(x, pos, cos, sin[:, :4])
    with pytest.raises(ValueError, match="same shape"):
        K.rope_(x, pos, cos, sin[:2])


def test_without_triton_or_device(monkeypatch):
    cos, sin = K.rope_tables(torch.ones(4), 4)
    x, pos = torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, dtype=torch.long)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        K.rope_(x, pos, cos, sin)
    monkeypatch.setattr(K, "triton", None)
    with pytest.raises(RuntimeError, match="needs the `triton` package"):
        K.rope_(x, pos, cos, sin)
