"""Static plans (padded buckets, capacity-wide attention, tree envelopes) equal eager steps."""

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
from treadle.runtime.executor import Executor
from treadle.runtime.kv_cache import KVCache


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = save_hf_model(make_hf_model("llama_gqa_tied"), tmp_path_factory.mktemp("x"))
    cfg = ModelConfig.from_json(path)
    return cfg, ModelWeights.from_state_dict(read_state_dict(path, cfg), cfg)


def run_script(model, static: bool, device="cpu", cuda_graphs=None):
    """Prefill 3 ragged prompts, decode 3 steps (bucket 4), verify a padded tree batch."""
    rng = random.Random(0)
    cache = KVCache(model.cfg, rows=5, capacity=24, device=device)
    ex = Executor(model, cache, static=static, cuda_graphs=cuda_graphs)
    rows = [cache.allocate() for _ in range(3)]
    prompts = [[rng.randrange(211) for _ in range(n)] for n in (5, 2, 7)]
    model.forward(cache.make_step(rows, prompts), cache)
    cache.extend(rows, [5, 2, 7])
    out = []
    for t in range(3):
        out.append(ex.decode(rows, [10 + t, 20 + t, 30 + t]).clone())
        cache.extend(rows, [1, 1, 1])
    parents = [[-1, 0, 0, 1, -1, 4], [-1, 0, 1]]
    n_nodes = [len(p) for p in parents]
    width = 8  # the envelope: padding nodes past n_nodes
    tree = torch.zeros(2, width, width, dtype=torch.bool)
    tokens = torch.zeros(2, width, dtype=torch.long)
    for b, p in enumerate(parents):
        tree[b, : len(p), : len(p)] = tree_from_parents(p)
        tokens[b, : len(p)] = torch.tensor([rng.randrange(211) for _ in p])
    logits = ex.verify(rows[:2], tokens, tree, n_nodes)
    out += [logits[b, :n].clone() for b, n in enumerate(n_nodes)]
    ex.close()
    return [o.cpu() for o in out]


@pytest.mark.parametrize("backend", list(Backend))
def test_static_plans_equal_eager_steps(weights, backend, torch_device):
    cfg, w = weights
    device = "cpu"
    if backend is Backend.TRITON:
        pytest.importorskip("triton")
        device = torch_device  # interpreted on the CPU; compiled under TREADLE_TEST_DEVICE=cuda
    eager = run_script(Transformer(cfg, w, 64, backend=Backend.TORCH), static=False)
    model = Transformer(cfg, w if device == "cpu" else _on_cuda(w), 64, backend=backend)
    static = run_script(model, static=True, device=device, cuda_graphs=False)
    for a, b in zip(static, eager):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replay_equals_eager(weights):
    cfg, w = weights
    eager = run_script(Transformer(cfg, w, 64, backend=Backend.TORCH), static=False)
    model = Transformer(cfg, _on_cuda(w), 64, backend=Backend.TRITON)
    graphs = run_script(model, static=True, device="cuda", cuda_graphs=True)
    for a, b in zip(graphs, eager):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3)


def _on_cuda(w: ModelWeights) -> ModelWeights:
    return ModelWeights(
        embed=w.embed.cuda(),
        layers=[type(lw)(**{k: _cuda(v) for k, v in lw.__dict__.items()}) for lw in w.layers],
        norm=w.norm.cuda(), lm_head=_cuda(w.lm_head),
    )


def _cuda(v):
    from treadle.graph.weights import Linear

    if isinstance(v, Linear):
        return Linear.of(v.weight.cuda(), None if v.bias is None else v.bias.cuda())
    return v.cuda()
