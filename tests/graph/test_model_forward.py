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


def test_bf16_weights_under_fp32_activations_track_the_oracle(tiny_model):
    """Weight-only bf16: the matrices (and the tied embedding) are stored in bf16, norms and the
    residual stream stay fp32. The oracle is transformers in fp32 with its weights rounded to bf16;
    what remains is the bf16 rounding of each product's input and output."""
    name, hf, path = tiny_model
    cfg = ModelConfig.from_json(path)
    weights = ModelWeights.from_state_dict(read_state_dict(path, cfg), cfg, torch.bfloat16)
    model = Transformer(cfg, weights, max_positions=256)
    assert weights.layers[0].qkv.weight.dtype == torch.bfloat16
    assert weights.embed.dtype == torch.bfloat16
    assert weights.norm.dtype == torch.float32 and model.dtype == torch.float32
    tokens = torch.randint(0, 211, (1, 23), generator=torch.Generator().manual_seed(2))
    cache = KVCache(model.cfg, rows=1, capacity=64)
    assert cache.k.dtype == torch.float32
    ours = model.forward(cache.make_step([0], tokens, logits="all"), cache)
    rounded = {k: v.to(torch.bfloat16).float() if v.dim() == 2 else v
               for k, v in hf.state_dict().items()}
    oracle = type(hf)(hf.config).eval()
    oracle.load_state_dict(rounded)
    with torch.no_grad():
        ref = oracle(tokens).logits
        fp32 = hf(tokens).logits
    scale = ref.std()
    worst, mean = (ours - ref).abs().max() / scale, (ours - ref).abs().mean() / scale
    agree = (ours.argmax(-1) == ref.argmax(-1)).float().mean()
    assert ours.dtype == torch.float32, name
    assert worst < 0.15 and mean < 0.02 and agree >= 0.9, f"{name}: {worst:.3g} {mean:.3g} {agree}"
    # and the rounding is real: the bf16 model is not the fp32 one
    assert not torch.allclose(ours, fp32, atol=1e-4, rtol=1e-4)


def test_bf16_weights_forward_is_row_invariant(tiny_model):
    """Under weight-only bf16, a k-token causal step gives each token bit for bit the logits that
    k one-token steps give (what keeps greedy speculative decoding token-identical to AR)."""
    name, hf, path = tiny_model
    cfg = ModelConfig.from_json(path)
    weights = ModelWeights.from_state_dict(read_state_dict(path, cfg), cfg, torch.bfloat16)
    model = Transformer(cfg, weights, max_positions=256)
    prompt, new = [5, 17, 42, 99, 3, 150, 7], [11, 23, 5, 99, 180, 2, 64, 31, 8]
    results = []
    for batched in (False, True):
        cache = KVCache(model.cfg, rows=1, capacity=64)
        model.forward(cache.make_step([0], [prompt]), cache)
        cache.extend([0], [len(prompt)])
        if batched:
            results.append(model.forward(cache.make_step([0], [new], logits="all"), cache)[0])
        else:
            rows = []
            for tok in new:
                rows.append(model.forward(cache.make_step([0], [[tok]]), cache)[0])
                cache.extend([0], [1])
            results.append(torch.stack(rows))
    assert torch.equal(results[0], results[1]), name
