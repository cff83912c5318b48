"""treadle's quantized checkpoint: a model's integer weights, beside its HF-layout directory.

A GGUF import (loaders/gguf_import.py) writes, next to the float32 model.safetensors that
`transformers` and float loads read, the matrices the file stored quantized, in the formats of
kernels/quant_linear.py:
    treadle-quant.safetensors   per quantized matrix <name> (its HF tensor name):
        <name>.codes    int8 [out, in] (int8)  |  uint8 [out, in / 2] (int4, two codes per byte)
        <name>.scales   fp32 [out]    (int8)  |  fp32 [in / 32, out]  (int4)
        <name>.mins                           |  fp32 [in / 32, out]  (int4)
    treadle-quant.json          {"version", "file", "tensors": {<name>: {"format", "shape",
                                 "source" (the GGUF type), "exact" (bool), ...}}}
`treadle.load(dir, weights="native")` reads these instead of the float copies of those matrices.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..graph.config import ModelConfig
from ..graph.weights import QuantizedTensor, WeightFormat, expected_shapes

QUANT_FILE = "treadle-quant.safetensors"
QUANT_INDEX = "treadle-quant.json"
QUANT_VERSION = 1


class QuantizedWeightsError(ValueError):
    """A quantized checkpoint is unreadable or does not match the model's config."""


def has_quantized(model_dir: str | os.PathLike) -> bool:
    return (Path(model_dir) / QUANT_INDEX).is_file()


def write_quantized(out_dir: Path, tensors: dict[str, QuantizedTensor], info: dict[str, dict],
                    file_mode: int | None = None) -> None:
    """Write `tensors` (HF name -> QuantizedTensor) and their description `info` into `out_dir`
    (the caller makes the directory appear atomically)."""
    from safetensors.torch import save_file

    arrays = {}
    for name, q in tensors.items():
        arrays[f"{name}.codes"] = q.codes.contiguous()
        arrays[f"{name}.scales"] = q.scales.float().contiguous()
        if q.mins is not None:
            arrays[f"{name}.mins"] = q.mins.float().contiguous()
    save_file(arrays, str(out_dir / QUANT_FILE), metadata={"format": "treadle-quant"})
    if file_mode is not None:
        os.chmod(out_dir / QUANT_FILE, file_mode)  # safetensors creates files 0o600
    index = {
        "version": QUANT_VERSION,
        "file": QUANT_FILE,
        "tensors": {name: {"format": tensors[name].format.value,
                           "shape": list(tensors[name].shape), **info.get(name, {})}
                    for name in tensors},
    }
    (out_dir / QUANT_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def read_index(model_dir: str | os.PathLike) -> dict:
    path = Path(model_dir) / QUANT_INDEX
    try:
        index = json.loads(path.read_text())
        if index["version"] != QUANT_VERSION or not isinstance(index["tensors"], dict):
            raise ValueError(f"version {index['version']}, expected {QUANT_VERSION}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise QuantizedWeightsError(
            f"{path}: not a treadle quantized-weights index ({e})"
        ) from None
    return index


def read_quantized(model_dir: str | os.PathLike, cfg: ModelConfig) -> dict[str, QuantizedTensor]:
    """Every matrix `model_dir`'s quantized checkpoint holds (HF name -> QuantizedTensor, on the
    CPU), each checked against `cfg`'s shape."""
    model_dir = Path(model_dir)
    index = read_index(model_dir)
    path = model_dir / index.get("file", QUANT_FILE)
    expected = expected_shapes(cfg)
    out = {}
    try:
        f = safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise QuantizedWeightsError(f"{path}: missing, corrupt or truncated ({e})") from None
    with f:
        for name, entry in index["tensors"].items():
            where = f"{path}: tensor '{name}'"
            try:
                fmt = WeightFormat(entry["format"])
            except (ValueError, KeyError):
                raise QuantizedWeightsError(f"{where}: unknown format {entry.get('format')!r}, "
                                            "expected int8 or int4") from None
            if not fmt.quantized:
                raise QuantizedWeightsError(f"{where}: format {fmt.value} is not an integer one")
            if name not in expected:
                raise QuantizedWeightsError(f"{where}: not a matrix of this {cfg.model_type} "
                                            f"model with {cfg.num_layers} layers")
            try:
                q = QuantizedTensor(
                    fmt,
                    f.get_tensor(f"{name}.codes"),
                    f.get_tensor(f"{name}.scales"),
                    f.get_tensor(f"{name}.mins") if fmt == WeightFormat.INT4 else None,
                )
            except (SafetensorError, RuntimeError, OSError) as e:
                raise QuantizedWeightsError(
                    f"{where}: cannot read its codes/scales ({e})"
                ) from None
            _check(q, expected[name], where)
            out[name] = q
    return out


def _check(q: QuantizedTensor, shape: tuple[int, ...], where: str) -> None:
    n, k = shape
    if q.format == WeightFormat.INT8:
        want = {"codes": (torch.int8, (n, k)), "scales": (torch.float32, (n,))}
    else:
        want = {"codes": (torch.uint8, (n, k // 2)), "scales": (torch.float32, (k // 32, n)),
                "mins": (torch.float32, (k // 32, n))}
    for part, (dtype, dims) in want.items():
        t = getattr(q, part)
        if t.dtype != dtype or tuple(t.shape) != dims:
            raise QuantizedWeightsError(
                f"{where}: {part} is {t.dtype} {list(t.shape)}, expected {dtype} {list(dims)} for "
                f"{q.format.value} weights of shape {list(shape)}"
            )
