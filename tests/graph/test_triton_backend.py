"""The whole forward on the Triton backend (interpreted on the CPU; compiled on the GPU under
TREADLE_TEST_DEVICE=cuda) equals the torch backend."""

from __future__ import annotations

import random

import pytest
import torch
from tiny_models import make_hf_model, save_hf_model
from treadle.graph import backend as backend_module
from treadle.graph.backend import Backend
from treadle.graph.config import ModelConfig
from treadle.graph.model import Transformer
from treadle.graph.step import tree_from_parents
from treadle.graph.weights import ModelWeights
from treadle.loaders.safetensors_weights import read_state_dict
from treadle.runtime.kv_cache import KVCache

pytest.importorskip("triton")


@pytest.fixture(scope="module", params=["llama_gqa_tied", "qwen2_bias"])
def models(request, tmp_path_factory, torch_device):
    path = save_hf_model(make_hf_model(request.param), tmp_path_factory.mktemp("t"))
    cfg = ModelConfig.from_json(path)
    state = {name: t.to(torch_device) for name, t in read_state_dict(path, cfg).items()}
    weights = ModelWeights.from_state_dict(state, cfg)
    return {b: Transformer(cfg, weights, 128, backend=b) for b in Backend}


def test_prefill_decode_tree_and_shared_prefix_agree(models, torch_device):
    rng = random.Random(0)
    cfg = models[Backend.TORCH].cfg
    outs = {}
    for backend, model in models.items():
        cache = KVCache(cfg, rows=3, capacity=32, device=torch_device)
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


# Per sequence, a draft DAG (parents) grown one level per step, as runtime/gsd.py's ModelDraft
# does: the nodes of level t are scored in one step, at slots start + node inside a pending window
# of every node so far.
DRAFT_PARENTS = ([-1, 0, 0, 1, 2, 2, 3], [-1, 0, 1, 1, 3])
DRAFT_LEVELS = ([[0], [1, 2], [3, 4, 5], [6]], [[0], [1], [2, 3], [4]])


def draft_step(cache, rows, level: int, rng: random.Random):
    """The step ModelDraft._score builds for the nodes at `level` of each sequence's DAG."""
    frontier = [levels[level] for levels in DRAFT_LEVELS]
    width = max(len(f) for f in frontier)
    window = max(f[-1] + 1 for f in frontier)  # every node so far, this level's included
    starts = [cache.lengths[r] for r in rows]
    tokens = [[rng.randrange(211) for _ in f] for f in frontier]
    slots = torch.zeros(len(rows), width, dtype=torch.long)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    tree = torch.zeros(len(rows), width, window, dtype=torch.bool)
    for b, (parents, f) in enumerate(zip(DRAFT_PARENTS, frontier)):
        for j, node in enumerate(f):
            slots[b, j] = starts[b] + node
            positions[b, j] = starts[b] + level
            chain = node
            while chain >= 0:  # the node and its ancestors
                tree[b, j, chain] = True
                chain = parents[chain]
        tree[b, len(f):, 0] = True  # padding queries see the root
    return cache.make_step(rows, tokens, tree=tree, logits="all", positions=positions,
                           slots=slots), [len(f) for f in frontier]


def test_draft_steps_over_a_pending_window_agree(models, torch_device, monkeypatch):
    def no_fallback(*args):
        raise AssertionError("a draft step over a pending window fell back to the reference")

    # The Triton backend must run these steps through the kernel (TORCH_OPS holds its own ref).
    monkeypatch.setattr(backend_module, "_attention_ref", no_fallback)
    cfg = models[Backend.TORCH].cfg
    outs = {}
    for backend, model in models.items():
        rng = random.Random(1)  # both backends see the same tokens
        cache = KVCache(cfg, rows=3, capacity=40, device=torch_device)
        a, b = cache.allocate(), cache.allocate()
        model.forward(cache.make_step([a, b], [[rng.randrange(211) for _ in range(n)]
                                               for n in (9, 5)]), cache)
        cache.extend([a, b], [9, 5])
        c = cache.fork(a, 6)  # a draft over a prefix read in place from row a
        got = []
        for level in range(len(DRAFT_LEVELS[0])):
            step, n_new = draft_step(cache, [a, c], level, rng)
            if level:
                assert step.tree.shape[-1] > step.width and step.tree_bits is not None
            logits = model.forward(step, cache)
            got += [logits[i, :n] for i, n in enumerate(n_new)]
        outs[backend] = got
    for ours, ref in zip(outs[Backend.TRITON], outs[Backend.TORCH]):
        torch.testing.assert_close(ours, ref, atol=2e-4, rtol=2e-4)
