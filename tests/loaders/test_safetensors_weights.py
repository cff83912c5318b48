"""Checkpoint loading: single and sharded files, and clear errors for every bad checkpoint."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import make_hf_model, save_hf_model
from treadle.graph.config import ModelConfig
from treadle.loaders.safetensors_weights import WeightsError, read_state_dict


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_hf_model(make_hf_model("llama_odd_untied"), tmp_path_factory.mktemp("w"))


@pytest.fixture
def copy(model_dir, tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(model_dir, dst)
    return dst


def test_sharded_checkpoint_loads_the_same_tensors(model_dir, copy):
    cfg = ModelConfig.from_json(model_dir)
    whole = load_file(copy / "model.safetensors")
    (copy / "model.safetensors").unlink()
    names = sorted(whole)
    shards = {
        "model-00001-of-00002.safetensors": names[::2],
        "model-00002-of-00002.safetensors": names[1::2],
    }
    weight_map = {}
    for file, part in shards.items():
        save_file({n: whole[n] for n in part}, copy / file)
        weight_map |= {n: file for n in part}
    (copy / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    state = read_state_dict(copy, cfg, torch.bfloat16)
    assert state.keys() == whole.keys()
    for n, t in state.items():
        assert t.dtype == torch.bfloat16
        torch.testing.assert_close(t, whole[n].to(torch.bfloat16))


def test_missing_weight_file(copy):
    cfg = ModelConfig.from_json(copy)
    (copy / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match=r"no model\.safetensors"):
        read_state_dict(copy, cfg)


def test_missing_shard_names_the_file(copy):
    cfg = ModelConfig.from_json(copy)
    names = list(load_file(copy / "model.safetensors"))
    (copy / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {n: "gone.safetensors" for n in names}})
    )
    with pytest.raises(WeightsError, match=r"gone\.safetensors: weight file is missing"):
        read_state_dict(copy, cfg)


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.001])
def test_truncated_file(copy, keep):
    cfg = ModelConfig.from_json(copy)
    f = copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(WeightsError, match=r"model\.safetensors: corrupt or truncated"):
        read_state_dict(copy, cfg)


def test_garbage_file(copy):
    cfg = ModelConfig.from_json(copy)
    (copy / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(WeightsError, match="corrupt or truncated"):
        read_state_dict(copy, cfg)


def rewrite(copy, change):
    state = load_file(copy / "model.safetensors")
    change(state)
    save_file(state, copy / "model.safetensors")


def test_wrong_shape_names_tensor_file_and_both_shapes(copy):
    cfg = ModelConfig.from_json(copy)
    name = "model.layers.1.mlp.up_proj.weight"
    rewrite(copy, lambda s: s.__setitem__(name, torch.zeros(49, 72)))
    with pytest.raises(
        WeightsError,
        match=rf"model\.safetensors: tensor '{name}' has shape "
        r"\(49, 72\), expected \(50, 72\)",
    ):
        read_state_dict(copy, cfg)


def test_wrong_dtype(copy):
    cfg = ModelConfig.from_json(copy)
    name = "model.norm.weight"
    rewrite(copy, lambda s: s.__setitem__(name, torch.zeros(72, dtype=torch.int32)))
    with pytest.raises(WeightsError, match=rf"tensor '{name}' has dtype torch.int32"):
        read_state_dict(copy, cfg)


def test_missing_tensor(copy):
    cfg = ModelConfig.from_json(copy)
    rewrite(copy, lambda s: s.pop("model.layers.2.self_attn.k_proj.weight"))
    with pytest.raises(
        WeightsError,
        match=r"'model\.layers\.2\.self_attn\.k_proj\.weight' is "
        "missing",
    ):
        read_state_dict(copy, cfg)


def test_unexpected_tensor(copy):
    cfg = ModelConfig.from_json(copy)
    rewrite(copy, lambda s: s.__setitem__("model.layers.3.mlp.up_proj.weight", torch.zeros(1)))
    with pytest.raises(WeightsError, match=r"unexpected tensor 'model\.layers\.3\.mlp\.up_proj"):
        read_state_dict(copy, cfg)
