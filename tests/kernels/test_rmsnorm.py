"""kernels/rmsnorm.py: the Triton rmsnorm / add_rmsnorm against the pure-torch refs.

Runs under TRITON_INTERPRET=1 on the CPU (set here unless the runner set it); with
TRITON_INTERPRET=0 on a CUDA machine the same tests check the compiled kernels.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

tl = pytest.importorskip("triton.language")
from treadle.kernels import rmsnorm as K  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
if INTERPRET and not isinstance(tl.sigmoid, InterpretedFunction):  # triton's own @jit helpers
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set (triton decides at import); "
                "set it at the top of tests/conftest.py or in the environment",
                allow_module_level=True)
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"
EPS = 1e-5

SHAPES = [(1, 8), (4, 64), (3, 5, 41), (2, 576)]  # 41 and 576 leave padded lanes in the block
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


def make(shape, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1], generator=g)).to(dtype)
    return x.to(DEVICE), w.to(DEVICE)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_rmsnorm(shape, dtype, atol, rtol):
    x, w = make(shape, dtype)
    y = K.rmsnorm(x, w, EPS)
    assert y.shape == x.shape and y.dtype == dtype
    ref32 = K.rmsnorm_ref(x.float(), w.float(), EPS)
    assert_close_to_ref(y, ref32, K.rmsnorm_ref(x, w, EPS), atol, rtol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_add_rmsnorm(shape, dtype, atol, rtol):
    x, w = make(shape, dtype, seed=1)
    r, _ = make(shape, dtype, seed=2)
    y, h = K.add_rmsnorm(x, r, w, EPS)
    y_low, h_low = K.add_rmsnorm_ref(x, r, w, EPS)
    if INTERPRET and dtype == torch.bfloat16:  # the interpreter truncates (see above)
        assert ((h.float() - h_low.float()).abs() <= bf16_ulp(h_low.float())).all()
    else:
        assert torch.equal(h, h_low)  # one fp32 add, rounded once, as torch does
    ref32 = K.rmsnorm_ref(h.float(), w.float(), EPS)  # the norm of the stored residual stream
    assert_close_to_ref(y, ref32, y_low, atol, rtol)


def test_fp32_weight_with_bf16_input():
    x, _ = make((3, 48), torch.bfloat16)
    w = torch.rand(48, device=DEVICE) + 0.5
    y = K.rmsnorm(x, w, EPS)
    ref32 = K.rmsnorm_ref(x.float(), w, EPS)
    assert_close_to_ref(y, ref32, K.rmsnorm_ref(x, w, EPS), 2e-2, 2e-2)


def test_strided_rows():
    """Rows of a wider buffer (e.g. a slice of a fused output): only the last dim is contiguous."""
    buf = torch.randn(2, 3, 80, device=DEVICE)
    x, r = buf[..., :40], buf[..., 40:]
    w = torch.rand(40, device=DEVICE)
    before = buf.clone()
    torch.testing.assert_close(K.rmsnorm(x, w, EPS), K.rmsnorm_ref(x, w, EPS))
    y, h = K.add_rmsnorm(x, r, w, EPS)
    y_ref, h_ref = K.add_rmsnorm_ref(x, r, w, EPS)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(h, h_ref)
    assert torch.equal(buf, before)  # inputs untouched


@pytest.mark.parametrize(
    "x_shape, x_dtype, w_shape, w_dtype, match",
    [
        ((2, 8), torch.int32, (8,), torch.float32, "fp32/bf16/fp16"),
        ((2, 8), torch.float32, (9,), torch.float32, "weight must be a contiguous"),
        ((2, 8), torch.float16, (8,), torch.bfloat16, "weight must be"),
        ((1, 32768), torch.float32, (32768,), torch.float32, "more than 64 KiB"),
    ],
)
def test_bad_inputs(x_shape, x_dtype, w_shape, w_dtype, match):
    x = torch.ones(x_shape, dtype=x_dtype, device=DEVICE)
    w = torch.ones(w_shape, dtype=w_dtype, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        K.rmsnorm(x, w, EPS)


def test_bad_layout_and_residual():
    x = torch.ones(8, 4, device=DEVICE).t()  # last dim strided
    with pytest.raises(ValueError, match="contiguous last dim"):
        K.rmsnorm(x, torch.ones(8, device=DEVICE), EPS)
    x = torch.ones(2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="residual must match x"):
        K.add_rmsnorm(x, torch.ones(3, 8, device=DEVICE), torch.ones(8, device=DEVICE), EPS)


def test_without_triton_or_device(monkeypatch):
    x, w = torch.ones(2, 8), torch.ones(8)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        K.rmsnorm(x, w, EPS)
    monkeypatch.setattr(K, "triton", None)
    with pytest.raises(RuntimeError, match="needs the `triton` package"):
        K.rmsnorm(x, w, EPS)
    torch.testing.assert_close(K.rmsnorm_ref(x, w, EPS), torch.ones(2, 8), atol=1e-4, rtol=0)
