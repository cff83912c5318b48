"""Finding and reading an LLM-to-SLM projector (METHODS.md section 5). It is made by
`treadle train llm2slm` (treadle/train/llm2slm.py); this module only locates and reads it.

A projector directory holds
    projector.safetensors   inp.weight [d_small, d_large], inp.bias [d_small],
                            out.weight [d_small, d_small], out.bias [d_small]
    treadle-llm2slm.json    which large model (directory + fingerprint) and which of its layers,
                            which small model (directory + fingerprint), the widths, the shared
                            tokenizer's fingerprint, the recipe and timings; written last, so its
                            presence means the build finished
    small/                  with --tune-small: the tuned small model (an HF-layout directory; the
                            JSON's small_dir is then "small", relative to the projector directory)

Fingerprints identify models by content, not path (a directory may move, or be rebuilt in place):
see `model_fingerprint`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ..graph.config import ModelConfig
from .default_model import DEFAULT_MODEL_NAME, cache_dir
from .safetensors_weights import checkpoint_files

MARKER = "treadle-llm2slm.json"
WEIGHTS = "projector.safetensors"
TUNED_SMALL = "small"  # the tuned small model's subdirectory
PROJECTOR_FORMAT = 1


class ProjectorError(ValueError):
    """A projector directory that is missing, unfinished or unreadable."""


# --- where projectors live ------------------------------------------------------------------------
def projector_dir(tuned: bool = False) -> Path:
    """`<cache>/models/SmolLM2-135M-Instruct-llm2slm[-tuned]`: the default model's projector
    (`-tuned`: trained with --tune-small, holding its tuned small model). May not exist yet."""
    return cache_dir() / "models" / f"{DEFAULT_MODEL_NAME}-llm2slm{'-tuned' if tuned else ''}"


def find_projector(path: str | Path | None = None, tuned: bool = False) -> Path | None:
    """The projector directory (default `projector_dir(tuned)`) if a finished build is there."""
    path = Path(path) if path is not None else projector_dir(tuned)
    return path if (path / MARKER).is_file() and (path / WEIGHTS).is_file() else None


# --- what a projector records ---------------------------------------------------------------------
@dataclass(frozen=True)
class ProjectorInfo:
    large_dir: str
    large_fingerprint: str
    layer: int  # the large model's layer (0-based) whose states the projector maps
    small_dir: str  # absolute, or relative to the projector directory (a tuned small model)
    small_fingerprint: str
    d_large: int
    d_small: int
    vocab_fingerprint: str  # the tokenizer both models share
    record: dict = field(default_factory=dict)  # recipe, losses, timings: what a build measured

    def small_path(self, projector: str | Path) -> Path:
        small = Path(self.small_dir)
        return small if small.is_absolute() else Path(projector) / small

    def to_json(self) -> dict:
        return {"format": PROJECTOR_FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, obj: object, source: str | Path) -> ProjectorInfo:
        if not isinstance(obj, dict) or obj.get("format") != PROJECTOR_FORMAT:
            raise ProjectorError(f"{source}: not a treadle projector record (format "
                                 f"{PROJECTOR_FORMAT} expected)")
        kinds = {"large_dir": str, "large_fingerprint": str, "layer": int, "small_dir": str,
                 "small_fingerprint": str, "d_large": int, "d_small": int,
                 "vocab_fingerprint": str, "record": dict}
        for name, kind in kinds.items():
            if not isinstance(obj.get(name), kind):
                raise ProjectorError(f"{source}: field '{name}' should be a {kind.__name__}, "
                                     f"found {obj.get(name)!r:.80}")
        return cls(**{name: obj[name] for name in kinds})


def read_info(path: str | Path) -> ProjectorInfo:
    source = Path(path) / MARKER
    try:
        obj = json.loads(source.read_text())
    except (OSError, ValueError) as e:
        raise ProjectorError(f"{source}: cannot read the projector record ({e}); build one with "
                             "`treadle train llm2slm`") from None
    return ProjectorInfo.from_json(obj, source)


def projector_shapes(d_large: int, d_small: int) -> dict[str, tuple[int, ...]]:
    return {"inp.weight": (d_small, d_large), "inp.bias": (d_small,),
            "out.weight": (d_small, d_small), "out.bias": (d_small,)}


def read_projector(path: str | Path) -> tuple[ProjectorInfo, dict[str, torch.Tensor]]:
    """(record, weights) of a finished projector directory, the weights checked against the
    recorded widths."""
    path = Path(path)
    info = read_info(path)
    source = path / WEIGHTS
    try:
        state = load_file(str(source))
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds for a bad file
        raise ProjectorError(f"{source}: cannot read the projector weights ({e})") from None
    expected = projector_shapes(info.d_large, info.d_small)
    if set(state) != set(expected):
        raise ProjectorError(f"{source}: tensors {sorted(state)}, expected {sorted(expected)}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != shape:
            raise ProjectorError(f"{source}: tensor '{name}' has shape {tuple(state[name].shape)},"
                                 f" expected {shape} from the recorded widths")
    return info, state


# --- fingerprints ---------------------------------------------------------------------------------
def model_fingerprint(model_dir: str | Path) -> str:
    """A short hash of what a model directory computes: its config and, for every weight tensor,
    its name, dtype, shape and first row (a tuned or retrained model changes the first row of any
    matrix it trains). Reads a few KB, not the weights."""
    model_dir = Path(model_dir)
    h = hashlib.sha256(json.dumps(ModelConfig.from_json(model_dir).to_dict(),
                                  sort_keys=True).encode())
    files = checkpoint_files(model_dir)
    handles = {p: safe_open(str(p), framework="pt") for p in set(files.values())}
    for name in sorted(files):
        sl = handles[files[name]].get_slice(name)
        shape = list(sl.get_shape())
        first = sl[0:1] if len(shape) > 1 else sl[:]
        h.update(f"{name}|{first.dtype}|{shape}|".encode())
        h.update(first.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def vocab_fingerprint(tokens: list[str | None]) -> str:
    """A short hash of a vocabulary: the token string at every id."""
    return hashlib.sha256(json.dumps(tokens).encode()).hexdigest()[:16]
