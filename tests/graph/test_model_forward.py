"""The forward against `transformers` (the oracle) on tiny random Llama-family models."""

from __future__ import annotations

import torch
from treadle.graph.config import ModelConfig
from treadle.graph.model import Transformer
from treadle.graph.weights import ModelWeights
from treadle.loaders.safetensors_weights import read_state_dict
from treadle.runtime.kv_cache import KVCache


def load_transformer(path) -> Transformer:
    cfg = ModelConfig.from_json(path)
    return Transformer(
        cfg, ModelWeights.from_state_dict(read_state_dict(path, cfg), cfg), max_positions=256
    )


def test_prefill_logits_match_transformers(tiny_model):
    name, hf, path = tiny_model
    model = load_transformer(path)
    tokens = torch.randint(0, 211, (1, 23), generator=torch.Generator().manual_seed(1))
    cache = KVCache(model.cfg, rows=1, capacity=64)
    step = cache.make_step([0], tokens, logits="all")
    ours = model.forward(step, cache)
    with torch.no_grad():
        ref = hf(tokens).logits
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_greedy_32_tokens_identical_to_transformers(tiny_model):
    name, hf, path = tiny_model
    model = load_transformer(path)
    prompt = [5, 17, 42, 99, 3, 150, 7]
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=32,
            do_sample=False,
            min_new_tokens=32,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
    cache = KVCache(model.cfg, rows=1, capacity=64)
    logits = model.forward(cache.make_step([0], [prompt]), cache)
    cache.extend([0], [len(prompt)])
    out = []
    for _ in range(32):
        tok = int(logits[0].argmax())
        out.append(tok)
        logits = model.forward(cache.make_step([0], [[tok]]), cache)
        cache.extend([0], [1])
    assert out == ref
    assert len(set(out)) > 8, "degenerate test model: greedy output should vary"
