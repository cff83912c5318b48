"""The decoding methods a request can ask for, as data, and the one place that runs them."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path

from ..graph.skip import SkipSchedule
from .apar import APAR, APARPolicy
from .ar import DecodePolicy, skip_layers
from .engine import Engine, Stream, Worker
from .executor import Executor
from .gsd import GSDParams, ModelDraft, NgramDraft
from .llm2slm import LLM2SLM
from .request import Request
from .sampling import make_generators
from .skeleton import SGD, SkeletonMethod, SoT
from .skipdecode import SelfSpecPolicy
from .speculative import SpeculativePolicy
from .stats import DecodeStats


@dataclass(frozen=True)
class AR:
    """Plain autoregressive decoding (the baseline)."""

    name = "ar"


@dataclass(frozen=True)
class SkipDecode:
    """SkipDecode (lossy): generated token t runs schedule.layers_at(t). Give a schedule, or a
    target speedup (total layers / mean layers) from which a linear-decay schedule is built.
    Neither: the schedule the model was fine-tuned for (train/skipdecode.py), else speedup 2."""

    speedup: float | None = None
    warmup_layers: int = 2
    schedule: SkipSchedule | None = None
    name = "skipdecode"

    def schedule_for(self, num_layers: int, tokens: int) -> SkipSchedule:
        if self.schedule is not None:
            if self.schedule.num_layers != num_layers:
                raise ValueError(
                    f"the SkipDecode schedule is for {self.schedule.num_layers} layers, "
                    f"the model has {num_layers}"
                )
            return self.schedule
        speedup = 2.0 if self.speedup is None else self.speedup
        return SkipSchedule.for_speedup(num_layers, speedup, tokens, self.warmup_layers)


@dataclass(frozen=True)
class SelfSpec:
    """Lossless self-speculative decoding: a skip-layer draft (warm-up layers + the top layers,
    num_layers / draft_speedup in all) proposes k tokens that the full model verifies. With a
    `schedule`, the draft token at generated position t runs schedule.layers_at(t) instead; on a
    model fine-tuned for a schedule that is the default (unless a speedup or layers are given)."""

    k: int = 4
    draft_speedup: float | None = None  # None: 2 (or the tuned schedule, see above)
    warmup_layers: int = 2
    adaptive: bool = True  # draft only while drafting measures faster (runtime/skipdecode.py)
    layers: tuple[int, ...] | None = None  # an explicit draft layer set instead of the above
    schedule: SkipSchedule | None = None  # per-position draft layer sets instead of the above
    name = "selfspec"

    def draft_layers(self, num_layers: int) -> list[int]:
        if self.layers is not None:
            return list(self.layers)
        speedup = 2.0 if self.draft_speedup is None else self.draft_speedup
        n = max(self.warmup_layers + 1, round(num_layers / speedup))
        n = min(n, num_layers)
        return list(range(self.warmup_layers)) + list(
            range(num_layers - (n - self.warmup_layers), num_layers)
        )


@dataclass(frozen=True)
class Speculative:
    """Lossless speculative decoding with a draft: chain SD (k=1, tau=-1), tree SD (k>1,
    tau=-1) or GSD (tau >= 0: recurring draft sequences merged into a DAG). The draft is
    "default" (the draft derived from the default model: `treadle draft build`), "ngram"
    (prompt lookup, no model), "ngram+default" (prompt lookup plus the n-gram table of the default
    model's habitual phrases that the build counts), or a model directory / GGUF file with the
    target's vocabulary."""

    draft: str = "default"
    k: int = 1
    tau: int = -1
    max_depth: int = 4
    node_budget: int = 8
    prob_threshold: float = 0.0
    sibling_threshold: float = 0.0

    @classmethod
    def chain(cls, depth: int = 4, draft: str = "default") -> Speculative:
        return cls(draft=draft, k=1, tau=-1, max_depth=depth, node_budget=depth + 1)

    @classmethod
    def gsd(cls, k: int = 4, tau: int = 0, depth: int = 4, budget: int = 16,
            prob_threshold: float = 0.3, sibling_threshold: float = 0.2,
            draft: str = "default") -> Speculative:
        return cls(draft, k, tau, depth, budget, prob_threshold, sibling_threshold)

    @property
    def name(self) -> str:
        kind = "sd" if self.k == 1 and self.tau == -1 else ("tree-sd" if self.tau == -1 else "gsd")
        return f"{kind}[{self.draft}]"

    def params(self) -> GSDParams:
        return GSDParams(self.k, self.tau, self.max_depth, self.node_budget, self.prob_threshold,
                         self.sibling_threshold)


Method = AR | SkipDecode | SelfSpec | Speculative | APAR | LLM2SLM | SGD | SoT


def make_policy(method: Method, executor: Executor, draft: ModelDraft | NgramDraft | None = None,
                new_decoder=None):
    """The engine policy that runs `method` on a model's executor; `draft` is the resolved draft
    source of a Speculative method (or of APAR's base method); `new_decoder` makes the stream
    decoder of an APAR child."""
    L = executor.model.cfg.num_layers
    if isinstance(method, APAR):
        base = make_policy(method.base or AR(), executor, draft)
        return APARPolicy(method, base, new_decoder)
    if isinstance(method, AR):
        return DecodePolicy(executor, L)
    if isinstance(method, SkipDecode):
        schedule = lru_cache(maxsize=None)(lambda tokens: method.schedule_for(L, tokens))
        return DecodePolicy(executor, L, layers_for=skip_layers(schedule))
    if isinstance(method, SelfSpec):
        if method.schedule is not None:
            return SelfSpecPolicy(executor, method.schedule.layers_at, method.k, method.adaptive,
                                  warmup=method.schedule.warmup_layers)
        return SelfSpecPolicy(executor, method.draft_layers(L), method.k, method.adaptive)
    if isinstance(method, Speculative):
        return SpeculativePolicy(executor, draft, method.params())
    if isinstance(method, LLM2SLM):
        raise TypeError("LLM2SLM is not a policy of one model's engine: the large model's "
                        "generate/stream run it, on the small model's engine (runtime/llm2slm.py)")
    if isinstance(method, SkeletonMethod):
        raise TypeError(f"{method.name} runs many streams per question: the model's generate/"
                        "stream run it (runtime/sgd.py), each point with a per-stream method")
    raise TypeError(f"unknown decoding method {method!r}")


class TunedScheduleWarning(UserWarning):
    """A model fine-tuned for one SkipDecode schedule is run with another (lower quality)."""


def for_tuned_model(method: Method, tuned: SkipSchedule | None, model: str | Path) -> Method:
    """`method` on a model fine-tuned for the SkipDecode schedule `tuned` (None: an untuned
    model, nothing changes). SkipDecode without a schedule or speedup runs the tuned schedule, as
    does a speedup that rebuilds exactly it; any other schedule runs as asked, with a
    TunedScheduleWarning. SelfSpec without draft layers or speedup drafts with the tuned
    schedule."""
    if tuned is None:
        return method
    if isinstance(method, SkipDecode):
        if method.schedule is None:
            if method.speedup is None or tuned == SkipSchedule.for_speedup(
                tuned.num_layers, method.speedup, tuned.decay_length, method.warmup_layers
            ):
                return replace(method, schedule=tuned)
            other = f"speedup {method.speedup} (warm-up {method.warmup_layers} layers)"
        elif method.schedule == tuned:
            return method
        else:
            other = str(method.schedule)
        warnings.warn(
            f"{model} was fine-tuned for the SkipDecode schedule {tuned}; running {other} "
            "instead, on which its quality is untested (leave the speedup unset to run the tuned "
            "schedule)",
            TunedScheduleWarning,
            stacklevel=2,
        )
        return method
    if (isinstance(method, SelfSpec) and method.schedule is None and method.layers is None
            and method.draft_speedup is None):
        return replace(method, schedule=tuned)
    return method


def run_requests(
    worker: Worker,
    requests: list[Request],
    method: Method = AR(),
    draft: ModelDraft | NgramDraft | None = None,
    stats: DecodeStats | None = None,
) -> Iterator[tuple[int, str]]:
    """Decode `requests` on a model's worker with one engine built for the call: (request index,
    new text) as it comes. What `LLM` does with its persistent engine, for tests and benchmarks
    that hold a bare model."""
    stats = stats or DecodeStats(method.name)
    engine = Engine(worker, lambda m: make_policy(m, worker.executor, draft))
    gens = make_generators(requests[0].params, len(requests), worker.model.device)
    streams = [engine.add(Stream(r, method, list(r.prompt), g, stats))
               for r, g in zip(requests, gens)]
    index = {id(s): i for i, s in enumerate(streams)}
    for s, text in engine.run(streams):
        yield index[id(s)], text
