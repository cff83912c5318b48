"""`load(..., weights=...)` on a tiny safetensors model: quantized on load, the options and their
errors, what describe() says, and lossless speculation under integer weights through the API.
(GGUF files' native matrices: tests/loaders/test_gguf_import.py.)"""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import make_hf_model, save_hf_model
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models
from treadle.__main__ import main
from treadle.graph import products
from treadle.graph.weights import WeightFormat
from treadle.kernels import cpu_quant_linear
from treadle.runtime.llm import LLM, _physical_cores, load
from treadle.runtime.methods import AR, Speculative
from treadle.runtime.sampling import SamplingParams

SPECIALS = ["<unk>", "<s>", "</s>"]
CHARS = [chr(c) for c in range(32, 127)]
GREEDY = SamplingParams(max_new_tokens=16, ignore_eos=True)


def tiny_dir(path, dtype=torch.float32):
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    model = make_hf_model("llama_gqa_tied", vocab_size=len(vocab), num_layers=3).to(dtype)
    save_hf_model(model, path)
    tok = RawTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_dir(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("weights, formats", [
    (None, {WeightFormat.FLOAT32: 13}),
    ("native", {WeightFormat.FLOAT32: 13}),  # the checkpoint's own dtype
    ("bfloat16", {WeightFormat.BFLOAT16: 13}),
    ("int8", {WeightFormat.INT8: 13}),
    ("int4", {WeightFormat.INT4: 12, WeightFormat.INT8: 1}),  # the tied embedding/head: int8
])
def test_weights_option(model_dir, weights, formats):
    llm = load(model_dir, weights=weights)
    assert llm.model.weights.formats() == formats
    assert llm.weights == (weights or "float32")
    assert len(llm.generate("hello", GREEDY).tokens) == 16
    # fp32: OpenBLAS's threads multiply, torch's pool stays at one; otherwise torch multiplies.
    fp32_only = set(formats) == {WeightFormat.FLOAT32}
    assert torch.get_num_threads() == (1 if fp32_only else _physical_cores())


def test_native_keeps_a_bf16_checkpoint_in_bf16(tmp_path):
    llm = load(tiny_dir(tmp_path / "bf16", torch.bfloat16), weights="native")
    assert llm.model.weights.formats() == {WeightFormat.BFLOAT16: 13}
    assert llm.weight_dtype == torch.bfloat16 and llm.model.dtype == torch.float32


def test_weight_dtype_still_works_and_must_agree(model_dir):
    llm = load(model_dir, weight_dtype="bfloat16")
    assert llm.weights == "bfloat16" and llm.weight_dtype == torch.bfloat16
    assert load(model_dir, weight_dtype=torch.bfloat16, weights="bfloat16").weights == "bfloat16"
    with pytest.raises(ValueError, match="weights='int8' and weight_dtype='bfloat16' disagree"):
        load(model_dir, weight_dtype="bfloat16", weights="int8")


@pytest.mark.parametrize("kw, match", [
    ({"weights": "int3"}, r"weights='int3': expected one of native, float32, bfloat16, float16, "
                          r"int8, int4"),
    ({"weights": "q4_1"}, "expected one of native"),
    ({"weight_dtype": "int4"}, "weight_dtype='int4': expected one of float32"),
])
def test_unknown_formats_are_clear_errors_before_reading_anything(kw, match):
    with pytest.raises(ValueError, match=match):
        LLM("/nonexistent", **kw)


def test_describe_names_the_formats_and_products(model_dir):
    text = load(model_dir, weights="int4").describe()
    assert "weights=int4 (12 int4, 1 int8 matrices)" in text
    assert "int4: 12 matrices, torch-int4 (default)" in text
    assert "int8: 1 matrices, torch-int8 (default)" in text
    assert "dequantize" not in text  # no reference fallback: torch has the CPU kernels


@pytest.mark.parametrize("weights", ["int4", "int8"])
def test_speculation_is_lossless_under_integer_weights(model_dir, weights):
    llm = load(model_dir, weights=weights)
    prompt = "abcabcabcab"  # repetitive: the n-gram draft finds continuations
    ref = llm.generate(prompt, GREEDY, method=AR()).tokens
    for method in (Speculative.chain(depth=3, draft="ngram"),
                   Speculative.gsd(k=2, tau=0, depth=3, budget=8, draft="ngram")):
        assert llm.generate(prompt, GREEDY, method=method).tokens == ref


@pytest.mark.skipif(not cpu_quant_linear.AVAILABLE, reason="numba is not installed")
def test_speculation_is_lossless_under_the_numba_int8_product(model_dir, monkeypatch):
    """The fp32-activation int8 product (kernels/cpu_quant_linear.py) is row-invariant, so a
    k-token verify step scores each token as AR's one-token step does."""
    original = products.candidates

    def numba_first(backend, device_type, fmt):  # fixed mode runs the first candidate
        return sorted(original(backend, device_type, fmt), key=lambda c: c.name != "numba-int8")

    monkeypatch.setattr(products, "candidates", numba_first)
    llm = load(model_dir, weights="int8")
    assert "numba-int8 (default)" in llm.describe()
    prompt = "abcabcabcab"
    ref = llm.generate(prompt, GREEDY, method=AR()).tokens
    for method in (Speculative.chain(depth=3, draft="ngram"),
                   Speculative.gsd(k=2, tau=0, depth=3, budget=8, draft="ngram")):
        assert llm.generate(prompt, GREEDY, method=method).tokens == ref


def test_a_draft_model_follows_the_targets_weights(model_dir, tmp_path):
    target = load(model_dir, weights="int4")
    assert target.draft_weights() == "int4"
    draft = tiny_dir(tmp_path / "draft")
    ref = target.generate("hello", GREEDY).tokens
    got = target.generate("hello", GREEDY, method=Speculative.chain(depth=2, draft=str(draft)))
    assert got.tokens == ref
    assert set(target.draft_model(str(draft)).model.weights.formats()) == {
        WeightFormat.INT4, WeightFormat.INT8}


def test_cli_weights_flag(model_dir, capsys):
    assert main(["generate", "--model", str(model_dir), "--weights", "int4", "--raw",
                 "--max-new-tokens", "4", "--ignore-eos", "--verbose", "hello"]) == 0
    captured = capsys.readouterr()
    assert "weights=int4" in captured.err and "4 tokens" in captured.out
