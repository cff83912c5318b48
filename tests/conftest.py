"""Shared fixtures."""

from __future__ import annotations

import os

import torch

# Triton decides at decoration time whether a kernel is compiled or interpreted, and importing
# treadle.graph imports the kernels: without a GPU, interpret every kernel, set before any import.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# The test models are tiny: a second torch thread only adds OpenMP hand-offs, which on a busy
# 2-core machine cost milliseconds per op.
torch.set_num_threads(1)

import pytest  # noqa: E402
from tiny_models import TINY_CONFIGS, make_hf_model, save_hf_model  # noqa: E402


@pytest.fixture(scope="session", params=sorted(TINY_CONFIGS))
def tiny_model(request, tmp_path_factory):
    """(name, transformers model, directory holding its safetensors checkpoint)."""
    name = request.param
    model = make_hf_model(name)
    path = save_hf_model(model, tmp_path_factory.mktemp(name))
    return name, model, path
