"""Shared fixtures."""

from __future__ import annotations

import pytest
from tiny_models import TINY_CONFIGS, make_hf_model, save_hf_model


@pytest.fixture(scope="session", params=sorted(TINY_CONFIGS))
def tiny_model(request, tmp_path_factory):
    """(name, transformers model, directory holding its safetensors checkpoint)."""
    name = request.param
    model = make_hf_model(name)
    path = save_hf_model(model, tmp_path_factory.mktemp(name))
    return name, model, path
