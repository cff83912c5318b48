"""config.json -> ModelConfig, and clear errors naming the field."""

from __future__ import annotations

import json

import pytest
import torch
from treadle.graph.config import ConfigError, ModelConfig, rope_inv_freq

SMOLLM = dict(
    model_type="llama",
    vocab_size=49152,
    hidden_size=576,
    intermediate_size=1536,
    num_hidden_layers=30,
    num_attention_heads=9,
    num_key_value_heads=3,
    rms_norm_eps=1e-5,
    rope_theta=100000.0,
    max_position_embeddings=8192,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
)


def test_derived_fields():
    cfg = ModelConfig.from_dict(SMOLLM)
    assert (cfg.head_dim, cfg.q_size, cfg.kv_size, cfg.group_size) == (64, 576, 192, 3)
    assert cfg.eos_token_ids == (2,) and not cfg.qkv_bias and cfg.rope_scaling is None


def test_qwen2_has_qkv_bias_and_eos_list():
    cfg = ModelConfig.from_dict(SMOLLM | {"model_type": "qwen2", "eos_token_id": [2, 7]})
    assert cfg.qkv_bias and cfg.eos_token_ids == (2, 7)


def test_round_trip_through_to_dict():
    cfg = ModelConfig.from_dict(SMOLLM)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("key", ["rope_scaling", "rope_parameters"])
def test_llama3_rope_scaling_matches_transformers(key):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {
        "rope_type": "llama3",
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    raw = SMOLLM | {"rope_theta": 500000.0, key: scaling | {"rope_theta": 500000.0}}
    ours = rope_inv_freq(ModelConfig.from_dict(raw))
    hf_cfg = LlamaConfig(
        **{k: v for k, v in raw.items() if k not in ("rope_scaling",)}, rope_scaling=scaling
    )
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](hf_cfg, "cpu")
    torch.testing.assert_close(ours, ref.float())


def test_unknown_model_type_names_it():
    with pytest.raises(ConfigError, match="model_type 'gpt_neox' is not supported"):
        ModelConfig.from_dict(SMOLLM | {"model_type": "gpt_neox"})


@pytest.mark.parametrize(
    "field",
    [
        "model_type",
        "hidden_size",
        "vocab_size",
        "num_hidden_layers",
        "intermediate_size",
        "num_attention_heads",
    ],
)
def test_missing_field_names_it(field):
    raw = dict(SMOLLM)
    raw.pop(field)
    with pytest.raises(ConfigError, match=f"required field '{field}' is missing"):
        ModelConfig.from_dict(raw)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="no config.json"):
        ModelConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config\.json: not valid JSON"):
        ModelConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM | {"num_key_value_heads": 4}))
    with pytest.raises(ConfigError, match="not a multiple of num_key_value_heads=4"):
        ModelConfig.from_json(tmp_path)
    (tmp_path / "config.json").write_text(
        json.dumps(SMOLLM | {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    )
    with pytest.raises(ConfigError, match="rope_scaling type 'yarn' is not supported"):
        ModelConfig.from_json(tmp_path)
