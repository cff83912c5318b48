"""LLM-to-SLM (METHODS.md section 5, lossy): a large model reads the prompt once, a small one
writes the answer.

    large prefill over the prompt, layers 0..N only, in a scratch KV cache dropped on return
    s_t   = final_norm(h_t after layer N)                          # [T, d_large]
    e_t   = W2 relu(W1 s_t + b1) + b2                              # [T, d_small], the projector
    small prefill with embed(x_t) + e_t at prompt position t (one to one: one tokenizer)
    small decodes alone: its decode steps add nothing

The large model's final norm is applied to the chosen layer's residual stream too: for the last
layer that is the paper's "final hidden states", and for an intermediate one it keeps the
projector's input at the scale it was trained on (residual streams grow with depth).

    llm = treadle.load()                                        # the large model
    llm.generate(prompt, params, chat=True, method=LLM2SLM())   # the default projector + small
    pair = llm.llm2slm(LLM2SLM(projector=dir))   # or hold the pair: generate / stream / submit

The small model runs on its own engine (`pair.small`): its streams carry the projected states as
`Stream.prompt_embeds`, which keeps them out of the prefix cache. A pair is checked when it is
opened: one tokenizer, the widths the projector was trained for, the large and small models it
was trained with (by content fingerprint, loaders/projector.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..graph.model import Transformer
from ..graph.weights import WeightFormat
from ..loaders.projector import (
    ProjectorInfo,
    find_projector,
    model_fingerprint,
    projector_dir,
    read_projector,
    vocab_fingerprint,
)
from .kv_cache import KVCache
from .sampling import SamplingParams

if TYPE_CHECKING:
    from .engine import LogitProcessor, Stream
    from .llm import LLM, Completion


@dataclass(frozen=True)
class LLM2SLM:
    """LLM-to-SLM decoding, asked of the large model. `projector`: "default" (the default
    model's, `treadle train llm2slm`), "tuned" (the one trained with --tune-small) or a
    directory; `small`: None for the small model the projector was trained with, or a directory
    (which must be that same model); `small_weights`: how the small model's matrices are stored
    (`LLM`'s `weights`), None for as the large model's are (`matching_weights`)."""

    projector: str = "default"
    small: str | None = None
    small_weights: str | None = None
    name = "llm2slm"


class PairMismatchError(ValueError):
    """A large model, projector and small model that do not belong together."""


class Projector(torch.nn.Module):
    """Linear(d_large -> d_small) -> ReLU -> Linear(d_small -> d_small). A fresh one adds
    nothing (its output layer starts at zero), so training starts from the small model alone."""

    def __init__(self, d_large: int, d_small: int):
        super().__init__()
        self.inp = torch.nn.Linear(d_large, d_small)
        self.out = torch.nn.Linear(d_small, d_small)
        torch.nn.init.zeros_(self.out.weight)
        torch.nn.init.zeros_(self.out.bias)

    def forward(self, states: torch.Tensor) -> torch.Tensor:  # [..., d_large] -> [..., d_small]
        return self.out(torch.relu(self.inp(states)))

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> Projector:
        d_small, d_large = state["inp.weight"].shape
        p = cls(d_large, d_small)
        p.load_state_dict(state)
        return p.requires_grad_(False)


def layer_states(
    model: Transformer, prompts: Sequence[Sequence[int]], layers: Sequence[int]
) -> list[torch.Tensor]:
    """Per prompt, [len(layers), len(prompt), d] fp32: the final norm of the residual stream
    after each of `layers`, from one ragged prefill over layers 0..max(layers) only. The K/V go
    to a scratch cache of those layers that is dropped on return: none of the large model's K/V
    outlives the call. Generation and training both read the large model through this."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("layer_states needs at least one prompt, and no empty prompt")
    top = max(layers)
    if min(layers) < 0 or top >= model.cfg.num_layers:
        raise ValueError(f"layers {list(layers)}: the large model has layers "
                         f"0..{model.cfg.num_layers - 1}")
    cfg = replace(model.cfg, num_layers=top + 1)
    scratch = KVCache(cfg, len(prompts), max(len(p) for p in prompts), model.dtype, model.device)
    rows = [scratch.allocate() for _ in prompts]
    with torch.no_grad():
        step = scratch.make_step(rows, [list(p) for p in prompts], logits="all")
        hs = model.hidden_states(step, scratch, range(top + 1), at=list(layers))[:-1]
        states = torch.stack([model.norm(h).float() for h in hs], dim=1)  # [B, n, T, d]
    del scratch
    return [states[b, :, : len(p)].clone() for b, p in enumerate(prompts)]


def vocabulary(tokenizer) -> list[str | None]:
    """The token string at every id of a loaders/tokenizer.py Tokenizer."""
    return [tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)]


def check_same_vocab(large: list[str | None], small: list[str | None], small_dir: str | Path,
                     where: str | Path) -> None:
    """LLM-to-SLM adds states token by token: the two models must tokenize identically."""
    if len(large) != len(small):
        raise PairMismatchError(
            f"{where}: the small model {small_dir} has another tokenizer ({len(small)} tokens, "
            f"the large model's has {len(large)}): LLM-to-SLM adds states token by token"
        )
    bad = next((i for i, (a, b) in enumerate(zip(large, small)) if a != b), None)
    if bad is not None:
        raise PairMismatchError(
            f"{where}: the small model {small_dir} has another tokenizer: token id {bad} is "
            f"{small[bad]!r} there but {large[bad]!r} in the large model's: LLM-to-SLM adds "
            "states token by token"
        )


def check_pair(large: LLM, small: LLM, info: ProjectorInfo, where: Path) -> None:
    """Raise PairMismatchError naming what differs: another large model, another tokenizer,
    another width than the projector was trained for, another small model."""
    big, little = large.config, small.config
    if big.hidden_size != info.d_large:
        raise PairMismatchError(
            f"{where}: the projector takes states of width {info.d_large} (trained on "
            f"{info.large_dir}), but the large model {large.model_dir} has hidden_size "
            f"{big.hidden_size}"
        )
    if info.layer >= big.num_layers:
        raise PairMismatchError(f"{where}: the projector reads layer {info.layer}, but the large "
                                f"model {large.model_dir} has {big.num_layers} layers")
    fp = model_fingerprint(large.model_dir)
    if fp != info.large_fingerprint:
        raise PairMismatchError(
            f"{where}: the projector was trained on another large model ({info.large_dir}, "
            f"fingerprint {info.large_fingerprint}); {large.model_dir} has fingerprint {fp}"
        )
    vl = vocabulary(large.tokenizer)
    check_same_vocab(vl, vocabulary(small.tokenizer), small.model_dir, where)
    if vocab_fingerprint(vl) != info.vocab_fingerprint:
        raise PairMismatchError(f"{where}: the projector was trained with another tokenizer than "
                                f"{large.model_dir}'s")
    if little.hidden_size != info.d_small:
        raise PairMismatchError(
            f"{where}: the projector writes states of width {info.d_small} (trained for "
            f"{info.small_dir}), but the small model {small.model_dir} has hidden_size "
            f"{little.hidden_size}"
        )
    fp = model_fingerprint(small.model_dir)
    if fp != info.small_fingerprint:
        raise PairMismatchError(
            f"{where}: the projector was trained with another small model ({info.small_dir}, "
            f"fingerprint {info.small_fingerprint}); {small.model_dir} has fingerprint {fp}"
        )


def matching_weights(large: LLM) -> str:
    """The `weights` option that stores the small model as the large one is stored, so that the
    two read comparable bytes per token: the large model's own option, or for "native" the
    format of its matrices (the default model's int4 layers + int8 head: "int4", which quantizes
    the same way on load; graph/weights.py)."""
    if large.weights != "native":
        return large.weights
    formats = large.model.weights.formats()
    for fmt in (WeightFormat.INT4, WeightFormat.INT8):
        if fmt in formats:
            return fmt.value
    return next(iter(formats)).value


def resolve_projector(spec: str) -> Path:
    """"default" / "tuned" -> the default model's projector directory (checked to be built)."""
    if spec in ("default", "tuned"):
        path = find_projector(tuned=spec == "tuned")
        if path is None:
            flag = " --tune-small" if spec == "tuned" else ""
            raise FileNotFoundError(
                f"no LLM-to-SLM projector at {projector_dir(spec == 'tuned')}: train it with "
                f"`treadle train llm2slm{flag}`, or pass a projector directory"
            )
        return path
    path = find_projector(spec)
    if path is None:
        raise FileNotFoundError(f"{spec}: not a finished LLM-to-SLM projector directory (no "
                                "treadle-llm2slm.json + projector.safetensors)")
    return path


class Pair:
    """A large model, a projector and a small model, checked to belong together. generate /
    stream / submit take prompts as `LLM`'s do; the answer is the small model's."""

    def __init__(self, large: LLM, small: LLM, projector: Projector, info: ProjectorInfo,
                 path: Path):
        self.large, self.small, self.info, self.path = large, small, info, path
        self.projector = projector.to(large.model.device)
        self.last_completion: Completion | None = None

    @classmethod
    def open(cls, large: LLM, method: LLM2SLM, load: Callable[..., LLM]) -> Pair:
        """Read `method`'s projector, load its small model beside `large` (same dtypes, device,
        context and cache settings) and check the three against each other."""
        path = resolve_projector(method.projector)
        info, state = read_projector(path)
        small_dir = Path(method.small) if method.small is not None else info.small_path(path)
        small = load(small_dir, dtype=large.model.dtype, device=str(large.model.device),
                     max_seq_len=large.max_seq_len,
                     weights=method.small_weights or matching_weights(large),
                     kv_cache_mb=large.kv_cache_mb, prefix_cache=large.prefix_cache)
        check_pair(large, small, info, path)
        return cls(large, small, Projector.from_state(state), info, path)

    def prompt_embeds(self, prompts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """[len(prompt), d_small] per prompt: the projected large-model states (one prefill of
        the large model over all prompts)."""
        states = layer_states(self.large.model, prompts, [self.info.layer])
        with torch.no_grad():
            return [self.projector(s[0]).to(self.small.model.dtype) for s in states]

    def _encode(self, prompts: list, chat: bool, system: str | None):
        ids = [self.large.encode(p, chat, system) for p in prompts]
        t0 = time.perf_counter()
        embeds = self.prompt_embeds(ids)
        return ids, embeds, time.perf_counter() - t0

    def generate(self, prompts, params: SamplingParams | None = None, chat: bool = False,
                 system: str | None = None) -> Completion | list[Completion]:
        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], int))
        ids, embeds, seconds = self._encode([prompts] if single else list(prompts), chat, system)
        out = self.small.generate(ids, params, prompt_embeds=embeds)
        _account(out[0].stats, seconds, out)
        return out[0] if single else out

    def stream(self, prompt, params: SamplingParams | None = None, chat: bool = False,
               system: str | None = None) -> Iterator[str]:
        ids, embeds, seconds = self._encode([prompt], chat, system)
        yield from self.small.stream(ids[0], params, prompt_embeds=embeds[0])
        done = self.small.last_completion
        _account(done.stats, seconds, [done])
        self.last_completion = done

    def submit(self, prompt, params: SamplingParams | None = None, chat: bool = False,
               system: str | None = None, on_text=None,
               processor: LogitProcessor | None = None) -> Stream:
        """Join the small model's engine: advance it with `pair.small.step()`."""
        ids, embeds, seconds = self._encode([prompt], chat, system)
        stream = self.small.submit(ids[0], params, on_text=on_text, processor=processor,
                                   prompt_embeds=embeds[0])
        _account(stream.stats, seconds, [])
        return stream


def _account(stats, seconds: float, completions) -> None:
    """The large model's prefill is part of the call's prefill and of its time."""
    stats.method = LLM2SLM.name
    stats.prefill_seconds += seconds
    stats.seconds += seconds
    for c in completions:
        c.seconds = stats.seconds
