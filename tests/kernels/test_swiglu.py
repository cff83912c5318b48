"""kernels/swiglu.py: the Triton swiglu against swiglu_ref.

Runs under TRITON_INTERPRET=1 on the CPU (set here unless the runner set it); with
TRITON_INTERPRET=0 on a CUDA machine the same tests check the compiled kernel.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import pytest
import torch

tl = pytest.importorskip("triton.language")
from treadle.kernels import swiglu as K  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
if INTERPRET and not isinstance(tl.sigmoid, InterpretedFunction):  # triton's own @jit helpers
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set (triton decides at import); "
                "set it at the top of tests/conftest.py or in the environment",
                allow_module_level=True)
if not INTERPRET and not torch.cuda.is_available():
    pytest.skip("TRITON_INTERPRET=0 needs a CUDA device", allow_module_level=True)
DEVICE = "cpu" if INTERPRET else "cuda"

SHAPES = [  # gate_up shapes [..., 2F]
    (1, 16),
    (4, 128),
    (3, 5, 82),  # F = 41 padded to 64
    (2, 2 * 1100),  # F > 1024: two column blocks per row, the second partly masked
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


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype, atol, rtol", DTYPES)
def test_swiglu(shape, dtype, atol, rtol):
    g = torch.Generator().manual_seed(0)
    gate_up = (3 * torch.randn(shape, generator=g)).to(dtype).to(DEVICE)
    out = K.swiglu(gate_up)
    assert out.shape == (*shape[:-1], shape[-1] // 2) and out.dtype == dtype
    ref32 = K.swiglu_ref(gate_up.float())
    assert_close_to_ref(out, ref32, K.swiglu_ref(gate_up), atol, rtol)


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # numpy, under the interpreter
def test_extreme_gates():
    """silu saturates cleanly: no inf/nan from exp(-gate) for large |gate|."""
    gate = torch.tensor([[-1e4, -100.0, -20.0, 0.0, 20.0, 100.0, 1e4, 3.0]], device=DEVICE)
    gate_up = torch.cat((gate, torch.full_like(gate, 2.0)), dim=-1)
    out = K.swiglu(gate_up)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, K.swiglu_ref(gate_up))


def test_strided_rows():
    """Rows of a wider buffer: only the last dim must be contiguous; the input is untouched."""
    buf = torch.randn(3, 4, 40, device=DEVICE)
    gate_up = buf[..., :32]
    before = buf.clone()
    torch.testing.assert_close(K.swiglu(gate_up), K.swiglu_ref(gate_up))
    assert torch.equal(buf, before)


def test_bad_inputs():
    with pytest.raises(ValueError, match="even last dim"):
        K.swiglu(torch.zeros(2, 7, device=DEVICE))
    with pytest.raises(ValueError, match="even last dim"):
        K.swiglu(torch.zeros(8, 2, device=DEVICE).t())
    with pytest.raises(ValueError, match="fp32/bf16/fp16"):
        K.swiglu(torch.zeros(2, 8, dtype=torch.int64, device=DEVICE))


def test_without_triton_or_device(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="CUDA tensors"):
        K.swiglu(torch.zeros(2, 8))
    monkeypatch.setattr(K, "triton", None)
    with pytest.raises(RuntimeError, match="needs the `triton` package"):
        K.swiglu(torch.zeros(2, 8))
