"""safetensors checkpoint (single file or sharded) -> a checked state dict in the requested dtype.

Every tensor named in graph/weights.py's declaration must be present with its declared shape;
anything else is an error that names the tensor, the file and both shapes.
"""

from __future__ import annotations

import json
from collections.abc import Collection
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..graph.config import ModelConfig
from ..graph.weights import expected_shapes

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Tensors a checkpoint may carry that the forward does not need (RoPE caches of old exports).
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class WeightsError(ValueError):
    """A checkpoint is missing, unreadable, or does not match the model's config."""


def checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it."""
    index = model_dir / INDEX_NAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise WeightsError(f"{index}: not a valid safetensors index ({e})") from None
        return {name: model_dir / file for name, file in weight_map.items()}
    single = model_dir / SINGLE_NAME
    if not single.exists():
        raise WeightsError(f"{model_dir}: no {SINGLE_NAME} or {INDEX_NAME} found")
    with _open(single) as f:
        return {name: single for name in f.keys()}


def read_state_dict(
    model_dir: str | Path,
    cfg: ModelConfig,
    dtype: torch.dtype = torch.float32,
    skip: Collection[str] = (),
) -> dict[str, torch.Tensor]:
    """Every declared tensor of `cfg` from `model_dir`, checked, cast to `dtype` (on the CPU);
    the names in `skip` (held elsewhere, e.g. quantized: loaders/quantized_weights.py) must be in
    the checkpoint but are not read."""
    model_dir = Path(model_dir)
    where = checkpoint_files(model_dir)
    expected = expected_shapes(cfg)
    missing = [n for n in expected if n not in where]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(
            f"{model_dir}: tensor '{missing[0]}' is missing from the checkpoint{more}"
        )
    # A tied checkpoint may still store lm_head.weight (a copy of the embedding): ignore it.
    allowed_extra = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unexpected = [
        n
        for n in where
        if n not in expected and n not in allowed_extra and not n.endswith(IGNORED_SUFFIXES)
    ]
    if unexpected:
        raise WeightsError(
            f"{where[unexpected[0]]}: unexpected tensor '{unexpected[0]}' for a "
            f"{cfg.model_type} model with {cfg.num_layers} layers"
            + (f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else "")
        )

    state: dict[str, torch.Tensor] = {}
    by_file: dict[Path, list[str]] = {}
    for name in expected:
        if name not in skip:
            by_file.setdefault(where[name], []).append(name)
    for path, names in by_file.items():
        with _open(path) as f:
            for name in names:
                try:
                    t = f.get_tensor(name)
                except (SafetensorError, RuntimeError, OSError) as e:
                    raise WeightsError(f"{path}: cannot read tensor '{name}' ({e})") from None
                if tuple(t.shape) != expected[name]:
                    raise WeightsError(
                        f"{path}: tensor '{name}' has shape {tuple(t.shape)}, "
                        f"expected {expected[name]} from config.json"
                    )
                if not t.dtype.is_floating_point:
                    raise WeightsError(
                        f"{path}: tensor '{name}' has dtype {t.dtype}, expected a float type"
                    )
                state[name] = t.to(dtype)
    return state


_SAFETENSORS_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def checkpoint_dtype(model_dir: str | Path, cfg: ModelConfig) -> torch.dtype:
    """The float dtype the checkpoint stores its matrices in (read from the file header)."""
    model_dir = Path(model_dir)
    name = "model.layers.0.mlp.down_proj.weight" if cfg.num_layers else "model.embed_tokens.weight"
    path = checkpoint_files(model_dir).get(name)
    if path is None:
        raise WeightsError(f"{model_dir}: tensor '{name}' is missing from the checkpoint")
    with _open(path) as f:
        kind = f.get_slice(name).get_dtype()
    if kind not in _SAFETENSORS_DTYPES:
        raise WeightsError(f"{path}: tensor '{name}' is stored as {kind}, expected F32/BF16/F16")
    return _SAFETENSORS_DTYPES[kind]


def _open(path: Path):
    if not path.exists():
        raise WeightsError(f"{path}: weight file is missing")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError, RuntimeError, ValueError) as e:
        raise WeightsError(f"{path}: corrupt or truncated safetensors file ({e})") from None
