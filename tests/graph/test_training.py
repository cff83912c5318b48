"""The training path of the one forward (graph/training.py): the same logits as the inference
forward and as `transformers`, gradients to the weights and to input_embeds, a loss that falls,
hidden states out, replaced embeddings, and the un-fused checkpoint."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from treadle.graph.config import ModelConfig
from treadle.graph.model import Transformer
from treadle.graph.training import (
    StepKV,
    make_trainable,
    sequence_step,
    state_dict_of,
    trainable_parameters,
    training_model,
)
from treadle.graph.weights import ModelWeights
from treadle.loaders.safetensors_weights import read_state_dict
from treadle.runtime.kv_cache import KVCache


def weights_of(path) -> tuple[ModelConfig, ModelWeights]:
    cfg = ModelConfig.from_json(path)
    return cfg, ModelWeights.from_state_dict(read_state_dict(path, cfg), cfg)


def tokens(batch: int, width: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 211, (batch, width), generator=torch.Generator().manual_seed(seed))


def test_training_forward_equals_inference_forward_and_transformers(tiny_model):
    name, hf, path = tiny_model
    cfg, weights = weights_of(path)
    inference = Transformer(cfg, weights, max_positions=256)
    train = training_model(cfg, weights_of(path)[1], max_positions=256)
    make_trainable(train.weights)
    tok = tokens(2, 21)
    cache = KVCache(cfg, rows=2, capacity=64)
    ref = inference.forward(cache.make_step([0, 1], tok, logits="all"), cache)
    ours = train.logits(train.hidden(sequence_step(tok), StepKV()))
    assert ours.requires_grad
    torch.testing.assert_close(ours.detach(), ref, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        oracle = hf(tok).logits
    torch.testing.assert_close(ours.detach(), oracle, atol=1e-4, rtol=1e-4)


def test_right_padded_sequences_match_each_alone(tiny_model):
    name, hf, path = tiny_model
    cfg, weights = weights_of(path)
    model = training_model(cfg, weights, 256)
    tok = tokens(3, 13, seed=4)
    lengths = torch.tensor([13, 5, 9])
    with torch.no_grad():
        batched = model.logits(model.hidden(sequence_step(tok, lengths), StepKV()))
        for b, n in enumerate(lengths.tolist()):
            alone = model.logits(model.hidden(sequence_step(tok[b : b + 1, :n]), StepKV()))
            torch.testing.assert_close(batched[b, :n], alone[0], atol=1e-5, rtol=1e-5)


def test_step_kv_refuses_a_step_over_a_cached_prefix(tiny_model):
    name, hf, path = tiny_model
    cfg, weights = weights_of(path)
    model = training_model(cfg, weights, 256)
    cache = KVCache(cfg, rows=1, capacity=32)
    cache.extend([0], [4])  # 4 committed tokens the step would need to see
    with pytest.raises(ValueError, match="make it with sequence_step"):
        model.hidden(cache.make_step([0], tokens(1, 3)), StepKV())


def test_gradients_reach_weights_and_input_embeds(tiny_model):
    name, hf, path = tiny_model
    cfg, weights = weights_of(path)
    model = training_model(cfg, weights, 256)
    params = make_trainable(weights, layers=[cfg.num_layers - 1], norm=True, embed=False)
    tok = tokens(2, 11)
    extra = torch.randn(2, 11, cfg.hidden_size, requires_grad=True)
    logits = model.logits(model.hidden(sequence_step(tok), StepKV(), input_embeds=extra))
    F.cross_entropy(logits[:, :-1].flatten(0, 1), tok[:, 1:].flatten()).backward()
    assert extra.grad is not None and extra.grad.abs().sum() > 0
    assert len(params) == 6 + (cfg.qkv_bias and 1) + 1  # one layer's 6 (+bias) and the norm
    for p in params:
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert {id(p) for p in trainable_parameters(weights)} == {id(p) for p in params}
    assert not weights.embed.requires_grad and not weights.layers[0].qkv.weight.requires_grad


def test_tied_embedding_is_one_parameter(tiny_model):
    name, hf, path = tiny_model
    cfg, weights = weights_of(path)
    params = make_trainable(weights, layers=[], norm=False, embed=True)
    assert isinstance(weights.embed, torch.nn.Parameter)
    assert len(trainable_parameters(weights)) == len(params)
    if cfg.tie_word_embeddings:
        assert len(params) == 1 and weights.lm_head.weight is weights.embed
    else:
        assert len(params) == 2 and weights.lm_head.weight is not weights.embed


def test_a_few_optimizer_steps_lower_the_loss(tiny_model):
    name, hf, path = tiny_model
    cfg, weights = weights_of(path)
    model = training_model(cfg, weights, 256)
    opt = torch.optim.AdamW(make_trainable(weights), lr=3e-3)
    tok = tokens(4, 16, seed=7)
    step = sequence_step(tok)
    losses = []
    for _ in range(6):
        logits = model.logits(model.hidden(step, StepKV()))
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tok[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.1 and losses == sorted(losses, reverse=True)


def test_replaced_and_added_input_embeds(tiny_model):
    name, hf, path = tiny_model
    cfg, weights = weights_of(path)
    model = training_model(cfg, weights, 256)
    tok = tokens(1, 9)
    step = sequence_step(tok)
    embeds = F.embedding(tok, weights.embed)
    with torch.no_grad():
        plain = model.hidden(step, StepKV())
        torch.testing.assert_close(
            model.hidden(step, StepKV(), input_embeds=embeds, replace_embeds=True), plain
        )
        other = torch.randn(1, 9, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
        added = model.hidden(step, StepKV(), input_embeds=other - embeds)
        replaced = model.hidden(
            sequence_step(torch.zeros_like(tok)), StepKV(), input_embeds=other, replace_embeds=True
        )
        torch.testing.assert_close(added, replaced, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="replace_embeds needs input_embeds"):
        model.hidden(step, StepKV(), replace_embeds=True)


def test_hidden_states_at_chosen_layers(tiny_model):
    name, hf, path = tiny_model
    cfg, weights = weights_of(path)
    model = Transformer(cfg, weights, 256)  # the inference forward has the same outputs
    tok = tokens(1, 10)
    cache = KVCache(cfg, rows=1, capacity=32)
    with torch.no_grad():
        after0, last = model.hidden_states(cache.make_step([0], tok, logits="all"), cache, at=[0])
        with_hf = hf(tok, output_hidden_states=True).hidden_states
    torch.testing.assert_close(after0, with_hf[1], atol=1e-5, rtol=1e-5)  # after layer 0
    torch.testing.assert_close(model.norm(last), with_hf[-1], atol=1e-5, rtol=1e-5)  # final norm
    with pytest.raises(ValueError, match="at=\\[1\\]"):
        model.hidden_states(cache.make_step([0], tok), cache, layers=[0], at=[1])


def test_state_dict_of_inverts_from_state_dict(tiny_model):
    name, hf, path = tiny_model
    cfg = ModelConfig.from_json(path)
    state = read_state_dict(path, cfg)
    weights = ModelWeights.from_state_dict(dict(state), cfg)
    make_trainable(weights, embed=True)
    back = state_dict_of(weights, cfg)
    assert sorted(back) == sorted(state)
    for k, v in state.items():
        assert torch.equal(back[k], v) and not back[k].requires_grad, k
