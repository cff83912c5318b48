"""graph/weights.py: weight formats. Each format's forward is the fp32 forward of the weights it
actually holds (its dequantized matrices), up to the rounding of its products' inputs/outputs."""

from __future__ import annotations

import pytest
import torch
from tiny_models import load_tiny
from treadle.graph.model import Transformer
from treadle.graph.weights import (
    LayerWeights,
    Linear,
    ModelWeights,
    WeightFormat,
    quantize,
)
from treadle.runtime.kv_cache import KVCache

IDS = [3, 17, 42, 9, 100, 5, 77, 1]


def dense(w: ModelWeights) -> ModelWeights:
    """The same weights in fp32: every matrix dequantized (the reference forward)."""

    def lin(x: Linear) -> Linear:
        return Linear.of(x.dequantized(), x.bias)

    layers = [LayerWeights(lw.attn_norm, lin(lw.qkv), lin(lw.o), lw.mlp_norm, lin(lw.gate_up),
                           lin(lw.down)) for lw in w.layers]
    embed = w.embedding(torch.arange(w.embed.shape[0])).float().contiguous()
    tied = w.lm_head is w.embed_quant or w.lm_head.weight is w.embed
    head = Linear.of(embed) if tied else lin(w.lm_head)
    return ModelWeights(embed=embed, layers=layers, norm=w.norm, lm_head=head)


def logits(model: Transformer) -> torch.Tensor:
    cache = KVCache(model.cfg, rows=1, capacity=len(IDS))
    return model.forward(cache.make_step([0], [IDS], logits="all"), cache)


# How far a format's forward may be from the fp32 forward of its own dequantized weights: the CPU
# products round x (and their output) to bf16, ~2^-8 relative per product, over 3 layers.
TOLERANCE = {"bfloat16": 0.03, "int8": 0.03, "int4": 0.03}  # measured: 0.010-0.013


@pytest.mark.parametrize("fmt", ["bfloat16", "int8", "int4"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_forward_is_the_dequantized_forward(tmp_path, fmt, backend, torch_device):
    if backend == "torch" and torch_device != "cpu":
        pytest.skip("the torch backend's integer products are the CPU's")
    model = load_tiny("llama_gqa_tied", tmp_path, num_layers=3, weight_dtype=WeightFormat(fmt))
    ref = Transformer(model.cfg, dense(model.weights))
    got = logits(Transformer(model.cfg, model.weights, backend=backend))
    want = logits(ref)
    scale = want.abs().max()
    # The Triton kernels multiply integer weights in fp32: only bf16 weights round there.
    tol = TOLERANCE[fmt] if backend == "torch" or fmt == "bfloat16" else 1e-4
    assert (got - want).abs().max() <= tol * scale, ((got - want).abs().max(), scale)


def test_int4_keeps_the_embedding_and_head_int8(tmp_path):
    model = load_tiny("llama_gqa_tied", tmp_path, weight_dtype=WeightFormat.INT4)
    w = model.weights
    assert w.formats() == {WeightFormat.INT4: 4 * 2, WeightFormat.INT8: 1}
    assert w.lm_head is w.embed_quant and w.lm_head.weight is w.embed  # tied: one table
    assert w.embed.dtype == torch.int8 and w.weight_only
    assert model.ops.attention.__name__ == "_attention_ref_f64"  # row-invariant attention
    rows = w.embedding(torch.tensor([[5, 9]]))
    assert rows.shape == (1, 2, 64)
    torch.testing.assert_close(rows[0], w.lm_head.dequantized()[[5, 9]])


def test_untied_head_and_packed_forms(tmp_path):
    model = load_tiny("llama3_scaled_mha", tmp_path, weight_dtype=WeightFormat.INT4)
    w = model.weights
    assert w.lm_head is not w.embed_quant and w.lm_head.format == WeightFormat.INT8
    qkv = w.layers[0].qkv
    assert (qkv.out_features, qkv.in_features) == (3 * 64, 64)
    assert qkv.weight.dtype == torch.uint8 and qkv.scales.shape == (2, 3 * 64)
    assert qkv.packed is not None and qkv.packed_scales.dtype == torch.bfloat16
    assert qkv.nbytes == 3 * 64 * 32 + 2 * (2 * 3 * 64 * 4)


def test_int4_needs_inputs_in_groups_of_32(tmp_path):
    with pytest.raises(ValueError, match=r"'model\.layers\.0\..*' has 72 inputs: int4 weights "
                       r"need a multiple of 32"):
        load_tiny("llama_odd_untied", tmp_path, weight_dtype=WeightFormat.INT4)
    model = load_tiny("llama_odd_untied", tmp_path / "8", weight_dtype=WeightFormat.INT8)
    assert set(model.weights.formats()) == {WeightFormat.INT8}


def test_quantized_state_is_kept_or_converted(tmp_path):
    """A quantized checkpoint's matrices (QuantizedTensors) stay as they are unless a format is
    asked for; fused row blocks in different formats are kept exactly, in fp32."""
    from tiny_models import make_hf_model

    hf = make_hf_model("llama_gqa_tied", num_layers=1)
    state = {k: v.detach().clone() for k, v in hf.state_dict().items() if "rotary" not in k}
    from treadle.graph.config import ModelConfig

    hf.config.save_pretrained(tmp_path)
    cfg = ModelConfig.from_json(tmp_path)
    p = "model.layers.0."
    for name in ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "mlp.gate_proj.weight",
                 "mlp.up_proj.weight", "mlp.down_proj.weight"):
        state[p + name] = quantize(state[p + name], WeightFormat.INT4)
    v = quantize(state[p + "self_attn.v_proj.weight"], WeightFormat.INT8)
    state[p + "self_attn.v_proj.weight"] = v
    state["model.embed_tokens.weight"] = quantize(state["model.embed_tokens.weight"],
                                                  WeightFormat.INT4)
    state.pop("lm_head.weight", None)
    kept = ModelWeights.from_state_dict(dict(state), cfg)
    lw = kept.layers[0]
    assert (lw.gate_up.format, lw.down.format, lw.o.format) == (
        WeightFormat.INT4, WeightFormat.INT4, WeightFormat.FLOAT32)
    assert lw.qkv.format == WeightFormat.FLOAT32  # int4 q/k + int8 v: exact in fp32
    torch.testing.assert_close(lw.qkv.weight[-32:], v.dequantize())
    assert kept.embed_quant.format == WeightFormat.INT4 and kept.lm_head is kept.embed_quant
    torch.testing.assert_close(kept.embedding(torch.tensor([4, 2])),
                               kept.embed_quant.dequantized()[[4, 2]])
    as_int8 = ModelWeights.from_state_dict(dict(state), cfg, WeightFormat.INT8)
    assert set(as_int8.formats()) == {WeightFormat.INT8}


def test_formats_by_name_and_errors():
    assert WeightFormat.of("int4") == WeightFormat.INT4
    assert WeightFormat.of(torch.bfloat16) == WeightFormat.BFLOAT16
    with pytest.raises(ValueError, match="'int3': expected one of float32, bfloat16, float16, "
                       "int8, int4"):
        WeightFormat.of("int3")
    with pytest.raises(ValueError, match="expected one of"):
        WeightFormat.of(torch.int8)
    with pytest.raises(ValueError, match="no float dtype"):
        WeightFormat.INT8.dtype  # noqa: B018
    with pytest.raises(ValueError, match="expected one of"):
        Linear(torch.zeros(2, 2, dtype=torch.int8))  # integer codes need their format


@pytest.mark.parametrize("fmt", ["bfloat16", "int8", "int4"])
def test_a_k_token_step_computes_each_token_as_one_token_steps(tmp_path, fmt):
    """Bit for bit: what makes lossless speculative methods token-identical to AR under narrow
    weights (row-invariant products and attention), independent of how wide the logit gaps are."""
    model = load_tiny("llama_gqa_tied", tmp_path, num_layers=3, weight_dtype=WeightFormat(fmt))
    cache = KVCache(model.cfg, rows=2, capacity=16)
    prompt, new = IDS[:3], IDS[3:]
    model.forward(cache.make_step([0, 1], [prompt, prompt]), cache)
    cache.extend([0, 1], [3, 3])
    wide = model.forward(cache.make_step([0], [new], logits="all"), cache)[0]  # [5, V]
    one = []
    for tok in new:
        one.append(model.forward(cache.make_step([1], [[tok]]), cache)[0])
        cache.extend([1], [1])
    assert torch.equal(wide, torch.stack(one))


def test_training_refuses_integer_weights(tmp_path):
    from treadle.graph.training import make_trainable, training_model

    model = load_tiny("llama_gqa_tied", tmp_path, weight_dtype=WeightFormat.INT4)
    with pytest.raises(ValueError, match="training runs float weights; these hold int4/int8"):
        training_model(model.cfg, model.weights)
    with pytest.raises(ValueError, match="weights='float32'"):
        make_trainable(model.weights)
