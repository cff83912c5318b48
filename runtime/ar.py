"""Autoregressive decoding as an engine policy: one decode step for every stream, one token each.

SkipDecode is the same step with its schedule's layer list: generated token t of a stream runs
schedule.layers_at(t) (graph/skip.py), and streams at positions with the same layer list share a
step. The baseline every method is measured against, and what self-speculation falls back to when
drafting does not pay (runtime/skipdecode.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .engine import Engine, Stream
from .executor import Executor


class DecodePolicy:
    slack = 0  # cache slots past prompt + max_new_tokens that a round may write

    def __init__(
        self,
        executor: Executor,
        num_layers: int,
        layers_for: Callable[[Stream], Sequence[int] | None] | None = None,
    ):
        self.executor, self.num_layers = executor, num_layers
        self.layers_for = layers_for  # the stream's layer list for its next step; None = all

    def round(self, engine: Engine, streams: list[Stream]) -> None:
        groups: dict[tuple[int, ...] | None, list[Stream]] = {}
        for s in streams:
            layers = None if self.layers_for is None else self.layers_for(s)
            groups.setdefault(None if layers is None else tuple(layers), []).append(s)
        for layers, group in groups.items():
            self.step(engine, group, layers)

    def step(self, engine: Engine, streams: list[Stream], layers: tuple[int, ...] | None) -> None:
        rows = [s.row for s in streams]
        logits = self.executor.decode(rows, [s.context[-1] for s in streams], layers)  # [B, V]
        self.executor.cache.extend(rows, [1] * len(rows))
        ran = self.num_layers if layers is None else len(layers)  # what the forward just ran
        for s in {id(s.stats): s.stats for s in streams}.values():
            s.steps += 1
        for b, s in enumerate(streams):
            s.stats.layers_computed += ran
            engine.emit(s, [engine.next_token(s, logits[b])])

    def leave(self, s: Stream) -> None:
        pass


def skip_layers(schedule_for: Callable[[int], object]) -> Callable[[Stream], list[int]]:
    """The layer list of a stream's next SkipDecode step: its schedule (built for its length)
    at the index of the generated token the step reads."""

    def layers_for(s: Stream) -> list[int]:
        return schedule_for(s.params.max_new_tokens).layers_at(len(s.request.tokens) - 1)

    return layers_for
