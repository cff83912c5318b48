"""The whole forward on the Triton backend (interpreted on the CPU) equals the torch backend."""

from __future__ import annotations

import random

import pytest
import torch
from tiny_models import make_hf_model, save_hf_model
from treadle.graph.backend import Backend
from treadle.graph.config import ModelConfig
from treadle.graph.model import Transformer
from treadle.graph.step import tree_from_parents
from treadle.graph.weights import ModelWeights
from treadle.loaders.safetensors_weights import read_state_dict
from treadle.runtime.kv_cache import KVCache

pytest.importorskip("triton")


@pytest.fixture(scope="module", params=["llama_gqa_tied", "qwen2_bias"])
def models(request, tmp_path_factory):
    path = save_hf_model(make_hf_model(request.param), tmp_path_factory.mktemp("t"))
    cfg = ModelConfig.from_json(path)
    weights = ModelWeights.from_state_dict(read_state_dict(path, cfg), cfg)
    return {b: Transformer(cfg, weights, 128, backend=b) for b in Backend}


def test_prefill_decode_tree_and_shared_prefix_agree(models):
    rng = random.Random(0)
    cfg = models[Backend.TORCH].cfg
    outs = {}
    for backend, model in models.items():
        cache = KVCache(cfg, rows=3, capacity=32)
        got = []
        a, b = cache.allocate(), cache.allocate()
        rng.seed(0)  # both backends see the same tokens
        prompts = [[rng.randrange(211) for _ in range(n)] for n in (6, 3)]
        prefill = model.forward(cache.make_step([a, b], prompts, logits="all"), cache)
        got += [prefill[0], prefill[1, :3]]  # b's positions 3.. are padding (unspecified)
        cache.extend([a, b], [6, 3])
        for t in range(2):  # ragged decode
            got.append(model.forward(cache.make_step([a, b], [[7 + t], [9 + t]]), cache))
            cache.extend([a, b], [1, 1])
        tree = tree_from_parents([-1, 0, 0, 1, -1])
        got.append(model.forward(cache.make_step([a], [[1, 2, 3, 4, 5]], tree=tree, logits="all"),
                                 cache))
        c = cache.fork(b, 4)  # a sequence reading b's prefix in place
        got.append(model.forward(cache.make_step([c], [[11, 12]], logits="all"), cache))
        outs[backend] = got
    for ours, ref in zip(outs[Backend.TRITON], outs[Backend.TORCH]):
        torch.testing.assert_close(ours, ref, atol=2e-4, rtol=2e-4)
