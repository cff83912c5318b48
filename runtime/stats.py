"""What a generation measured: the figures every method reports, filled in as it runs."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class DecodeStats:
    method: str
    generated_tokens: int = 0
    steps: int = 0  # target forward steps after the prefill (decode or verify)
    seconds: float = 0.0
    layers_computed: int = 0  # summed over generated tokens (SkipDecode's schedule)
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    accepted: list[int] = field(default_factory=list)  # draft tokens accepted per verify step
    draft_nodes: int = 0  # draft tokens proposed: DAG nodes below the root (a merge adds none)
    merged_nodes: int = 0  # nodes GSD reused by merging instead of drafting them
    plain_steps: int = 0  # self-speculation: full-model steps chosen because drafting measured
    # slower (runtime/skipdecode.py)
    prefill_tokens: int = 0  # prompt tokens the target ran
    prefill_seconds: float = 0.0  # catch-up steps (prompts, forks' first tokens), shared by a batch
    reused_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache instead

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds else 0.0

    @property
    def mean_accepted(self) -> float:
        """Mean tokens emitted per verify step (accepted draft tokens + the target's own)."""
        return sum(a + 1 for a in self.accepted) / len(self.accepted) if self.accepted else 0.0

    @property
    def mean_layers(self) -> float:
        return self.layers_computed / self.generated_tokens if self.generated_tokens else 0.0

    def summary(self) -> str:
        parts = [f"{self.method}: {self.generated_tokens} tokens in {self.seconds:.2f} s "
                 f"({self.tokens_per_second:.1f} tokens/s)"]
        if self.layers_computed:
            parts.append(f"mean layers/token {self.mean_layers:.2f}")
        if self.accepted:
            parts.append(f"mean accepted length {self.mean_accepted:.2f} over {len(self.accepted)} "
                         f"verify steps; draft {self.draft_seconds:.2f} s, verify "
                         f"{self.verify_seconds:.2f} s")
        if self.plain_steps:
            parts.append(f"{self.plain_steps} of {self.steps} steps without drafting "
                         "(drafting measured slower)")
        if self.reused_tokens:
            parts.append(f"prefix cache: {self.reused_tokens} of "
                         f"{self.reused_tokens + self.prefill_tokens} prompt tokens reused")
        if self.merged_nodes:
            parts.append(f"draft nodes {self.draft_nodes}, saved by merging {self.merged_nodes}")
        return "; ".join(parts)
