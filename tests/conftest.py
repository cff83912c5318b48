"""Shared fixtures."""

from __future__ import annotations

import os

import torch

# Triton decides at decoration time whether a kernel is compiled or interpreted, and importing
# treadle.graph imports the kernels: set the mode before any import. TREADLE_TEST_DEVICE=cuda
# (perf/gpu_check.sh) runs the kernel, Triton-backend and executor tests compiled on the GPU;
# otherwise, without a GPU, every kernel is interpreted on the CPU.
TEST_DEVICE = os.environ.get("TREADLE_TEST_DEVICE", "cpu")
if TEST_DEVICE not in ("cpu", "cuda"):
    raise RuntimeError(f"tests/conftest.py: TREADLE_TEST_DEVICE must be cpu or cuda; "
                       f"got {TEST_DEVICE!r}")
if TEST_DEVICE == "cuda":
    if not torch.cuda.is_available():
        raise RuntimeError("tests/conftest.py: TREADLE_TEST_DEVICE=cuda but torch sees no CUDA "
                           f"device (torch {torch.__version__})")
    os.environ["TRITON_INTERPRET"] = "0"  # the kernel tests' setdefault("1") then keeps it
elif not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The test models are tiny: a second torch thread only adds OpenMP hand-offs, which on a busy
# 2-core machine cost milliseconds per op.
torch.set_num_threads(1)
# Every backend's default weight products, untimed (graph/products.py): a choice timed on a busy
# machine could differ from run to run. tests/graph/test_products.py times them explicitly.
os.environ.setdefault("TREADLE_PRODUCTS", "fixed")

import pytest  # noqa: E402
from tiny_models import TINY_CONFIGS, make_hf_model, save_hf_model  # noqa: E402


@pytest.fixture(scope="session", params=sorted(TINY_CONFIGS))
def tiny_model(request, tmp_path_factory):
    """(name, transformers model, directory holding its safetensors checkpoint)."""
    name = request.param
    model = make_hf_model(name)
    path = save_hf_model(model, tmp_path_factory.mktemp(name))
    return name, model, path


@pytest.fixture(scope="session")
def torch_device() -> str:
    """Where the Triton-backend tests put models and caches: "cuda" under TREADLE_TEST_DEVICE=cuda,
    else "cpu" (the interpreter)."""
    return TEST_DEVICE
