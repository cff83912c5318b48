"""Tiny random Llama-family models (transformers as the oracle), saved as HF-layout directories."""

from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_CONFIGS = {
    # name: (model_type, overrides)
    "llama_gqa_tied": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
    "llama_odd_untied": dict(
        model_type="llama",
        hidden_size=72,
        intermediate_size=50,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=3,
        tie_word_embeddings=False,
    ),
    "llama3_scaled_mha": dict(
        model_type="llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        tie_word_embeddings=False,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "qwen2_bias": dict(
        model_type="qwen2",
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    ),
    "mistral": dict(
        model_type="mistral",
        hidden_size=48,
        intermediate_size=80,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        sliding_window=None,
    ),
}


def make_hf_model(name: str, vocab_size: int = 211, seed: int = 0, num_layers: int | None = None):
    """A random `transformers` model for the named tiny config (fp32, eval mode)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = dict(TINY_CONFIGS[name])
    if num_layers is not None:
        raw["num_hidden_layers"] = num_layers
    model_type = raw.pop("model_type")
    config = AutoConfig.for_model(
        model_type,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        bos_token_id=1,
        eos_token_id=2,
        **raw,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # random init is near-zero; widen it so tokens differ from step to step
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.2)
            elif p.dim() == 1:  # norm weights
                p.normal_(1, 0.2)
            else:
                p.normal_(0, 0.2)
    return model


def save_hf_model(model, path: Path) -> Path:
    model.save_pretrained(path, safe_serialization=True)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["model_type"] in ("llama", "qwen2", "mistral")
    return path


def load_tiny(name: str, path, vocab_size: int = 211, seed: int = 0, num_layers: int | None = None,
              max_positions: int = 256, weight_dtype: torch.dtype | None = None):
    """A treadle Transformer over a fresh tiny random checkpoint saved at `path`."""
    from treadle.graph.config import ModelConfig
    from treadle.graph.model import Transformer
    from treadle.graph.weights import ModelWeights
    from treadle.loaders.safetensors_weights import read_state_dict

    save_hf_model(make_hf_model(name, vocab_size, seed, num_layers), path)
    cfg = ModelConfig.from_json(path)
    weights = ModelWeights.from_state_dict(read_state_dict(path, cfg), cfg, weight_dtype)
    return Transformer(cfg, weights, max_positions)
