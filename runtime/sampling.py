"""Sampling parameters, the processed next-token distribution, and seeded sampling.

Temperature, top-k and top-p turn logits into the distribution p that a token is drawn from; the
speculative methods apply the very same processing to target and draft before comparing them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class SamplingError(ValueError):
    """Invalid sampling parameters."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0  # 0 = greedy (argmax)
    top_k: int = 0  # 0 = no top-k cut
    top_p: float = 1.0  # 1 = no nucleus cut
    seed: int | None = None  # sequence i of a batch draws from a generator seeded with seed + i
    stop: tuple[str, ...] = ()  # stop strings (not included in the output text)
    ignore_eos: bool = False

    def __post_init__(self):
        def bad(field: str, value, expected: str):
            raise SamplingError(f"SamplingParams.{field}={value!r}: expected {expected}")

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad("max_new_tokens", self.max_new_tokens, "an integer >= 1")
        t = self.temperature
        if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
            bad("temperature", t, "a finite number >= 0 (0 = greedy)")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k", self.top_k, "an integer >= 0 (0 = off)")
        p = self.top_p
        if not isinstance(p, (int, float)) or not 0 < p <= 1:
            bad("top_p", p, "a number in (0, 1]")
        if self.seed is not None and not isinstance(self.seed, int):
            bad("seed", self.seed, "an integer or None")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop", self.stop, "non-empty strings")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def probabilities(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """[..., V] logits -> [..., V] the distribution sampling draws from (one-hot when greedy)."""
    logits = logits.float()
    if params.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, -math.inf)
    probs = logits.softmax(-1)
    if params.top_p < 1:
        sorted_p, order = probs.sort(-1, descending=True)
        # Keep the smallest head of the sorted distribution whose mass reaches top_p.
        drop = sorted_p.cumsum(-1) - sorted_p >= params.top_p
        sorted_p = sorted_p.masked_fill(drop, 0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def make_generators(params: SamplingParams, count: int, device="cpu") -> list[torch.Generator]:
    """One generator per sequence, so a sequence samples the same tokens alone or in a batch."""
    gens = []
    for i in range(count):
        g = torch.Generator(device=device)
        if params.seed is None:
            g.seed()
        else:
            g.manual_seed(params.seed + i)
        gens.append(g)
    return gens


def draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from a [V] distribution."""
    return int(torch.multinomial(probs, 1, generator=generator))


def sample(
    logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator]
) -> list[int]:
    """[B, V] logits -> B next tokens."""
    if params.greedy:
        return logits.argmax(-1).tolist()
    probs = probabilities(logits, params)
    return [draw(p, g) for p, g in zip(probs, generators)]
