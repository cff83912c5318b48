"""GGUF import: tiny GGUF files written here from random HF-layout weights, imported back, compared.

The writer below does what llama.cpp's converter does (HF names -> GGUF names, q/k row permutation
for Llama, quantization), independently of the importer, so a round trip checks the importer's
inverse mapping. `transformers` is the oracle for the end-to-end logits.
"""

from __future__ import annotations

import json
import threading

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from safetensors.numpy import load_file
from tokenizers import Tokenizer, pre_tokenizers
from treadle.graph.config import ModelConfig, rope_inv_freq
from treadle.loaders import gguf_import
from treadle.loaders.gguf_import import GGUFImportError, OutputExistsError, convert_gguf

D, FF, LAYERS, HEADS, KV_HEADS = 64, 96, 2, 4, 2
HEAD_DIM = D // HEADS
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "2 0"]
USER_DEFINED = ["<tool>"]
TOKENS = (
    SPECIALS
    + sorted(pre_tokenizers.ByteLevel.alphabet())
    + ["".join(m.split(" ")) for m in MERGES]
    + USER_DEFINED
)
VOCAB = len(TOKENS)  # 267
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
)

HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
} | {f"self_attn.{x}_proj.{k}": f"attn_{x}.{k}" for x in "qkv" for k in ("weight", "bias")}


def gguf_name(hf: str) -> str:
    if hf.startswith("model.layers."):
        i, rest = hf[len("model.layers.") :].split(".", 1)
        return f"blk.{i}.{HF_TO_GGUF[rest]}"
    return HF_TO_GGUF[hf]


def hf_weights(*, tied: bool, bias: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Random HF-layout weights for the tiny model (float32, [out, in])."""
    g = np.random.default_rng(seed)

    def w(*shape, scale=0.08):
        return (g.standard_normal(shape) * scale).astype(np.float32)

    out = {"model.embed_tokens.weight": w(VOCAB, D, scale=1.0), "model.norm.weight": 1 + w(D)}
    if not tied:
        out["lm_head.weight"] = w(VOCAB, D)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        out |= {
            p + "input_layernorm.weight": 1 + w(D),
            p + "post_attention_layernorm.weight": 1 + w(D),
            p + "self_attn.q_proj.weight": w(HEADS * HEAD_DIM, D),
            p + "self_attn.k_proj.weight": w(KV_HEADS * HEAD_DIM, D),
            p + "self_attn.v_proj.weight": w(KV_HEADS * HEAD_DIM, D),
            p + "self_attn.o_proj.weight": w(D, HEADS * HEAD_DIM),
            p + "mlp.gate_proj.weight": w(FF, D),
            p + "mlp.up_proj.weight": w(FF, D),
            p + "mlp.down_proj.weight": w(D, FF),
        }
        if bias:
            out |= {
                p + "self_attn.q_proj.bias": w(HEADS * HEAD_DIM),
                p + "self_attn.k_proj.bias": w(KV_HEADS * HEAD_DIM),
                p + "self_attn.v_proj.bias": w(KV_HEADS * HEAD_DIM),
            }
    return out


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's HF -> GGUF reordering of q/k rows (as in its convert_hf_to_gguf.py)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_gguf(
    path,
    weights: dict[str, np.ndarray],
    *,
    arch: str = "llama",
    quant: dict[str, Q] | None = None,
    skip_keys: tuple[str, ...] = (),
    tokenizer_model: str = "gpt2",
    extra_tensors: dict[str, np.ndarray] | None = None,
):
    """A GGUF as llama.cpp's converter would write it; `quant` maps HF name suffixes to types."""
    w = gguf.GGUFWriter(str(path), arch)
    keys = {
        "block_count": lambda: w.add_block_count(LAYERS),
        "context_length": lambda: w.add_context_length(256),
        "embedding_length": lambda: w.add_embedding_length(D),
        "feed_forward_length": lambda: w.add_feed_forward_length(FF),
        "head_count": lambda: w.add_head_count(HEADS),
        "head_count_kv": lambda: w.add_head_count_kv(KV_HEADS),
        "rms_eps": lambda: w.add_layer_norm_rms_eps(1e-5),
        "rope_freq_base": lambda: w.add_rope_freq_base(100000.0),
        "vocab_size": lambda: w.add_vocab_size(VOCAB),
        "rope_dimension_count": lambda: w.add_rope_dimension_count(HEAD_DIM),
    }
    for key, add in keys.items():
        if key not in skip_keys:
            add()
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("smollm")
    w.add_token_list(TOKENS)
    w.add_token_types([3] * len(SPECIALS) + [1] * (VOCAB - len(SPECIALS) - 1) + [4])
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    for hf, t in weights.items():
        if arch == "llama" and ".q_proj." in hf:
            t = llama_cpp_permute(t, HEADS)
        elif arch == "llama" and ".k_proj." in hf:
            t = llama_cpp_permute(t, KV_HEADS)
        qtype = next((q for suffix, q in (quant or {}).items() if hf.endswith(suffix)), Q.F32)
        w.add_tensor(gguf_name(hf), gguf.quants.quantize(t, qtype), raw_dtype=qtype)
    for name, t in (extra_tensors or {}).items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def roundtrip(weights: dict[str, np.ndarray], quant: dict[str, Q]) -> dict[str, np.ndarray]:
    """What a lossless importer must return: dequantize(quantize(w)) for each tensor."""
    out = {}
    for hf, t in weights.items():
        qtype = next((q for suffix, q in quant.items() if hf.endswith(suffix)), Q.F32)
        out[hf] = gguf.quants.dequantize(gguf.quants.quantize(t, qtype), qtype).reshape(t.shape)
    return out


def hf_model(arch: str, weights: dict[str, np.ndarray], tied: bool, rope_scaling=None):
    """A transformers model built directly from HF-layout weights (the reference)."""
    import transformers

    cls = {"llama": "Llama", "qwen2": "Qwen2"}[arch]
    extra = {"rope_scaling": rope_scaling} if rope_scaling else {}
    config = getattr(transformers, f"{cls}Config")(
        vocab_size=VOCAB,
        hidden_size=D,
        intermediate_size=FF,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        max_position_embeddings=256,
        tie_word_embeddings=tied,
        **extra,
    )
    model = getattr(transformers, f"{cls}ForCausalLM")(config).eval()
    missing, unexpected = model.load_state_dict(
        {k: torch.from_numpy(v) for k, v in weights.items()}, strict=False
    )
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    return model


def logits(model) -> torch.Tensor:
    ids = torch.tensor([[1, 5, 70, 200, 3, 266, 42, 9, 100, 17]])
    with torch.no_grad():
        return model(ids).logits  # [1, S, V]


CASES = {
    "llama-f32-untied": ("llama", False, False, {}),
    "llama-quant-tied": (
        "llama",
        True,
        False,
        {
            "embed_tokens.weight": Q.Q8_0,
            "proj.weight": Q.Q4_0,
            "layernorm.weight": Q.F16,
        },
    ),
    "llama-q4_1-bias": ("llama", True, True, {"proj.weight": Q.Q4_1}),
    "qwen2-q8_0-bias": ("qwen2", True, True, {"proj.weight": Q.Q8_0}),
}


@pytest.mark.parametrize("case", CASES)
def test_import_matches_original(tmp_path, case):
    arch, tied, bias, quant = CASES[case]
    weights = hf_weights(tied=tied, bias=bias)
    src = write_gguf(tmp_path / "tiny.gguf", weights, arch=arch, quant=quant)
    out = convert_gguf(src, tmp_path / "hf", progress=False)
    assert out == tmp_path / "hf"

    imported = load_file(out / "model.safetensors")
    expected = roundtrip(weights, quant)
    assert imported.keys() == expected.keys()
    for name, w in expected.items():
        assert imported[name].dtype == np.float32
        np.testing.assert_array_equal(imported[name], w, err_msg=name)

    cfg = ModelConfig.from_json(out)
    assert (cfg.model_type, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size) == (
        arch,
        VOCAB,
        D,
        FF,
    )
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (
        LAYERS,
        HEADS,
        KV_HEADS,
        HEAD_DIM,
    )
    assert (cfg.rms_norm_eps, cfg.rope_theta, cfg.max_position_embeddings) == (1e-5, 1e5, 256)
    assert (cfg.tie_word_embeddings, cfg.qkv_bias) == (tied, bias)
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (1, (2,))
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    assert json.loads((out / "generation_config.json").read_text()) == {
        "bos_token_id": 1,
        "eos_token_id": 2,
    }

    if arch == "llama" and bias:
        return  # HF's Llama attention_bias also adds an o_proj bias, which GGUF Llama lacks
    import transformers

    oracle = logits(hf_model(arch, expected, tied))
    imported_hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    torch.testing.assert_close(logits(imported_hf), oracle)
    torch.testing.assert_close(treadle_logits(out), oracle, atol=1e-4, rtol=1e-4)


def treadle_logits(model_dir) -> torch.Tensor:
    """treadle's own forward over the same ids as `logits`."""
    from treadle.graph.model import Transformer
    from treadle.graph.weights import ModelWeights
    from treadle.loaders.safetensors_weights import read_state_dict
    from treadle.runtime.kv_cache import KVCache

    cfg = ModelConfig.from_json(model_dir)
    model = Transformer(cfg, ModelWeights.from_state_dict(read_state_dict(model_dir, cfg), cfg))
    ids = [1, 5, 70, 200, 3, 266, 42, 9, 100, 17]
    cache = KVCache(cfg, rows=1, capacity=len(ids))
    return model.forward(cache.make_step([0], [ids], logits="all"), cache)


def test_tokenizer(tmp_path):
    src = write_gguf(tmp_path / "tiny.gguf", hf_weights(tied=True, bias=False))
    out = convert_gguf(src, tmp_path / "hf", progress=False)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert tok.get_vocab_size() == VOCAB
    assert all(tok.token_to_id(t) == i for i, t in enumerate(TOKENS))

    text = "<|im_start|>user\nthe cat in 2024 héllo ✓<tool><|im_end|>"
    enc = tok.encode(text)
    assert enc.ids[0] == 1 and enc.ids[-1] == 2 and TOKENS.index("<tool>") in enc.ids
    assert "Ġthe" not in enc.tokens and "he" in enc.tokens  # "the" after "\n" has no Ġ
    assert [t for t in enc.tokens if t in "0123456789"] == ["2", "0", "2", "4"]  # digit by digit
    assert "Ġin" not in enc.tokens and tok.encode(" the").tokens == ["Ġthe"]
    assert tok.decode(enc.ids, skip_special_tokens=False) == text
    assert tok.decode(enc.ids) == "user\nthe cat in 2024 héllo ✓<tool>"  # control tokens dropped

    config = json.loads((out / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert (config["add_bos_token"], config["add_eos_token"]) == (False, False)
    assert config["chat_template"] == TEMPLATE


def test_llama3_rope_scaling(tmp_path):
    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    raw = {
        "model_type": "llama",
        "vocab_size": VOCAB,
        "hidden_size": D,
        "intermediate_size": FF,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "rope_theta": 100000.0,
    }
    plain = rope_inv_freq(ModelConfig.from_dict(raw))
    scaled = rope_inv_freq(ModelConfig.from_dict(raw | {"rope_scaling": scaling}))
    divisors = (plain / scaled).numpy().astype(np.float32)  # [HEAD_DIM // 2], llama.cpp's form
    assert divisors.max() > divisors.min()  # the test model's frequencies span the blend

    weights = hf_weights(tied=True, bias=False)
    src = write_gguf(tmp_path / "a.gguf", weights, extra_tensors={"rope_freqs.weight": divisors})
    with pytest.raises(GGUFImportError, match="rope_freqs"):  # 8192 would not reproduce them
        convert_gguf(src, tmp_path / "bad", progress=False)

    w = gguf.GGUFWriter  # the original context is metadata in GGUF
    original_add = w.add_context_length

    def add_both(self, n):
        original_add(self, n)
        self.add_rope_scaling_orig_ctx_len(64)

    mp = pytest.MonkeyPatch()
    with mp.context() as m:
        m.setattr(w, "add_context_length", add_both)
        src = write_gguf(
            tmp_path / "b.gguf", weights, extra_tensors={"rope_freqs.weight": divisors}
        )
    out = convert_gguf(src, tmp_path / "hf", progress=False)
    assert json.loads((out / "config.json").read_text())["rope_scaling"] == scaling

    import transformers

    ours = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ref = hf_model("llama", weights, tied=True, rope_scaling=scaling)
    torch.testing.assert_close(logits(ours), logits(ref))


# --- atomic output ------------------------------------------------------------------------------


@pytest.fixture
def tiny_gguf(tmp_path):
    return write_gguf(tmp_path / "tiny.gguf", hf_weights(tied=True, bias=False))


@pytest.mark.parametrize("fail_at", ["weights", "config"])
def test_failure_leaves_nothing(tmp_path, tiny_gguf, monkeypatch, fail_at):
    def boom(*args, **kwargs):
        raise RuntimeError("disk on fire")

    if fail_at == "weights":  # after some tensors were written
        real, calls = gguf_import._dequantize, []

        def dequantize(t, src):
            calls.append(t)
            return boom() if len(calls) > 5 else real(t, src)

        monkeypatch.setattr(gguf_import, "_dequantize", dequantize)
    else:  # after weights and tokenizer, before config.json and the marker
        real_json = gguf_import._write_json

        def write_json(path, obj):
            return boom() if path.name == "config.json" else real_json(path, obj)

        monkeypatch.setattr(gguf_import, "_write_json", write_json)
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert_gguf(tiny_gguf, tmp_path / "hf", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.gguf"]


def test_existing_output(tmp_path, tiny_gguf):
    out = tmp_path / "hf"
    out.mkdir()
    convert_gguf(tiny_gguf, out, progress=False)  # an empty directory is fine
    (out / "stale.txt").write_text("old")
    with pytest.raises(OutputExistsError, match="overwrite=True"):
        convert_gguf(tiny_gguf, out, progress=False)
    assert (out / "stale.txt").exists()
    convert_gguf(tiny_gguf, out, progress=False, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / gguf_import.MARKER).exists()
    assert gguf_import.import_is_current(out, tiny_gguf)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "tiny.gguf"]


def test_concurrent_imports_keep_one_complete_copy(tmp_path, tiny_gguf):
    out, errors = tmp_path / "hf", []

    def run():
        try:
            convert_gguf(tiny_gguf, out, progress=False)
        except OutputExistsError as e:
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) <= 2 and gguf_import.import_is_current(out, tiny_gguf)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "tiny.gguf"]


# --- bad input ----------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(GGUFImportError, match="no such file") as e:
        convert_gguf(tmp_path / "nope.gguf", tmp_path / "hf", progress=False)
    assert str(tmp_path / "nope.gguf") in str(e.value)


def test_not_a_gguf(tmp_path):
    src = tmp_path / "random.gguf"
    src.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(GGUFImportError, match="not a readable GGUF") as e:
        convert_gguf(src, tmp_path / "hf", progress=False)
    assert str(src) in str(e.value) and not (tmp_path / "hf").exists()


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.02, 0.0])  # tensor data, metadata, empty
def test_truncated(tmp_path, tiny_gguf, keep):
    data = tiny_gguf.read_bytes()
    src = tmp_path / "cut.gguf"
    src.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(GGUFImportError, match="not a readable GGUF") as e:
        convert_gguf(src, tmp_path / "hf", progress=False)
    assert str(src) in str(e.value) and not (tmp_path / "hf").exists()


def test_unsupported_architecture(tmp_path):
    src = write_gguf(tmp_path / "f.gguf", hf_weights(tied=True, bias=False), arch="falcon")
    with pytest.raises(GGUFImportError, match="architecture 'falcon' is not supported") as e:
        convert_gguf(src, tmp_path / "hf", progress=False)
    assert str(src) in str(e.value)


def test_missing_metadata_key(tmp_path):
    src = write_gguf(
        tmp_path / "m.gguf", hf_weights(tied=True, bias=False), skip_keys=("feed_forward_length",)
    )
    with pytest.raises(GGUFImportError, match="'llama.feed_forward_length' is missing") as e:
        convert_gguf(src, tmp_path / "hf", progress=False)
    assert str(src) in str(e.value)


def test_unexpected_shape(tmp_path):
    weights = hf_weights(tied=True, bias=False)
    weights["model.layers.1.mlp.up_proj.weight"] = weights["model.layers.1.mlp.up_proj.weight"][:64]
    src = write_gguf(tmp_path / "s.gguf", weights)
    with pytest.raises(GGUFImportError, match=r"'blk.1.ffn_up.weight' has shape \[64, 64\]") as e:
        convert_gguf(src, tmp_path / "hf", progress=False)
    assert "expected [96, 64]" in str(e.value) and str(src) in str(e.value)


def test_quant_type_not_dequantizable(tmp_path, tiny_gguf, monkeypatch):
    def refuse(data, qtype):
        raise NotImplementedError(f"Dequantization for {qtype.name} is not yet implemented")

    monkeypatch.setattr(gguf.quants, "dequantize", refuse)
    with pytest.raises(GGUFImportError, match="'token_embd.weight' is stored as F32") as e:
        convert_gguf(tiny_gguf, tmp_path / "hf", progress=False)
    assert str(tiny_gguf) in str(e.value) and not (tmp_path / "hf").exists()


def test_sentencepiece_tokenizer_refused(tmp_path):
    src = write_gguf(
        tmp_path / "spm.gguf", hf_weights(tied=True, bias=False), tokenizer_model="llama"
    )
    with pytest.raises(GGUFImportError, match="tokenizer model 'llama' in GGUF not supported"):
        convert_gguf(src, tmp_path / "hf", progress=False)


def test_load_gguf_imports_once_into_the_cache(tmp_path, tiny_gguf, monkeypatch):
    import treadle

    monkeypatch.setenv("TREADLE_CACHE", str(tmp_path / "cache"))
    llm = treadle.load(tiny_gguf)
    assert llm.model_dir.parent == tmp_path / "cache" / "models"
    first = (llm.model_dir / "model.safetensors").stat().st_mtime_ns
    out = llm.generate([1, 5, 7], treadle.SamplingParams(max_new_tokens=4, ignore_eos=True))
    assert len(out.tokens) == 4
    again = treadle.load(tiny_gguf)  # the second load finds the import, converts nothing
    assert again.model_dir == llm.model_dir
    assert (again.model_dir / "model.safetensors").stat().st_mtime_ns == first


# --- quantized matrices (treadle-quant.safetensors) ---------------------------------------------


@pytest.mark.parametrize("case", ["llama-quant-tied", "llama-q4_1-bias", "qwen2-q8_0-bias"])
def test_import_keeps_quantized_matrices(tmp_path, case):
    """Q4_0 / Q4_1 -> int4 with the file's own codes and scales: they dequantize to the float32
    import bit for bit (q/k rows un-permuted like the float ones). Q8_0 -> int8 per row,
    re-quantized, with its error recorded. Float tensors (F16 norms) stay out."""
    from treadle.graph.weights import WeightFormat
    from treadle.loaders.quantized_weights import read_index, read_quantized

    arch, tied, bias, quant = CASES[case]
    src = write_gguf(tmp_path / "q.gguf", hf_weights(tied=tied, bias=bias), arch=arch,
                     quant=quant)
    out = convert_gguf(src, tmp_path / "hf", progress=False)
    floats = load_file(out / "model.safetensors")
    index = read_index(out)["tensors"]
    cfg = ModelConfig.from_json(out)
    quantized = read_quantized(out, cfg)
    assert quantized.keys() == index.keys()
    for name, entry in index.items():
        suffix, qtype = next((s, q) for s, q in quant.items() if name.endswith(s))
        assert entry["source"] == qtype.name and entry["shape"] == list(floats[name].shape)
        q = quantized[name]
        if qtype in (Q.Q4_0, Q.Q4_1):
            assert q.format == WeightFormat.INT4 and entry["exact"]
            np.testing.assert_array_equal(q.dequantize().numpy(), floats[name], err_msg=name)
        else:
            assert q.format == WeightFormat.INT8 and not entry["exact"]
            err = np.abs(q.dequantize().numpy() - floats[name]).max()
            assert err == pytest.approx(entry["max_abs_error"])
            assert entry["rel_rms_error"] < 0.02
    assert not any("layernorm" in name or "norm.weight" in name for name in index)
    assert gguf_import.import_is_current(out, src)


def random_q4_k(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    """Valid Q4_K rows of random bytes (finite positive fp16 d and dmin), [rows, cols/256*144]."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows, cols // 256, 144), dtype=np.uint8)
    for off in (0, 2):  # d, dmin: fp16 in [2^-10, 2^-4)
        h = rng.uniform(2**-10, 2**-4, size=blocks.shape[:2]).astype(np.float16)
        blocks[..., off : off + 2] = h[..., None].view(np.uint8)
    return blocks.reshape(rows, -1)


def test_q4_k_decodes_exactly():
    """Q4_K's super-blocks become 8 int4 groups each (scale d * sc, min -dmin * m): the same
    numbers as gguf's own dequantization, bit for bit."""
    raw = random_q4_k(6, 512)
    codes, scales, mins = gguf_import._q4k(raw, 6, 512)
    from treadle.kernels.quant_linear import dequantize_int4

    ours = dequantize_int4(torch.from_numpy(codes), torch.from_numpy(scales.T.copy()),
                           torch.from_numpy(mins.T.copy()))
    ref = gguf.quants.dequantize(raw, Q.Q4_K).reshape(6, 512)
    np.testing.assert_array_equal(ours.numpy(), ref)


def test_load_gguf_native_and_other_formats(tmp_path, monkeypatch):
    import treadle
    from treadle.graph.weights import WeightFormat

    monkeypatch.setenv("TREADLE_CACHE", str(tmp_path / "cache"))
    arch, tied, bias, quant = CASES["llama-quant-tied"]  # Q8_0 embedding, Q4_0 layers, F16 norms
    src = write_gguf(tmp_path / "q.gguf", hf_weights(tied=tied, bias=bias), quant=quant)
    native = treadle.load(src, weights="native")
    assert native.weights == "native"
    assert native.model.weights.formats() == {WeightFormat.INT4: 2 * LAYERS * 2,
                                              WeightFormat.INT8: 1}
    assert "weights=native (8 int4, 1 int8 matrices)" in native.describe()
    params = treadle.SamplingParams(max_new_tokens=6, ignore_eos=True)
    assert len(native.generate([1, 5, 7], params).tokens) == 6

    fp32 = treadle.load(src, weights="float32")
    assert set(fp32.model.weights.formats()) == {WeightFormat.FLOAT32}
    assert fp32.weight_dtype == torch.float32 and native.weight_dtype is None
    ids = [1, 5, 70, 200, 3]
    from treadle.runtime.kv_cache import KVCache

    def step_logits(llm):
        cache = KVCache(llm.config, rows=1, capacity=8)
        return llm.model.forward(cache.make_step([0], [ids], logits="all"), cache)

    # The same weights (Q4_0 is exact in int4; Q8_0 re-quantized per row), bf16 activations in
    # the products: close, not equal.
    a, b = step_logits(native), step_logits(fp32)
    assert (a - b).abs().max() <= 0.05 * b.abs().max()
    as_int8 = treadle.load(src, weights="int8")
    assert set(as_int8.model.weights.formats()) == {WeightFormat.INT8}
    with pytest.raises(ValueError, match="weights='q4': expected one of native, float32"):
        treadle.load(src, weights="q4")
