"""Autoregressive decoding of a batch of requests: the baseline every method is measured against.

Prompts that begin with the same tokens (a shared system prompt, n samples of one question) are
prefilled once: the common prefix goes into one cache row that the sequences' rows borrow.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from ..graph.model import Transformer
from .executor import Executor
from .kv_cache import KVCache
from .request import Request
from .sampling import make_generators, sample
from .stats import DecodeStats

# Below this many common tokens a shared prefill row costs more bookkeeping than it saves.
MIN_SHARED_PREFIX = 8


def common_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    first = prompts[0]
    n = min(len(p) for p in prompts)
    for p in prompts[1:]:
        n = next((i for i in range(n) if p[i] != first[i]), n)
    return n


def prefill(
    model: Transformer, cache: KVCache, prompts: Sequence[Sequence[int]], share_prefix: bool = True
):
    """Allocate a row per prompt and run the prompts; returns (rows, last-token logits [B, V],
    rows to free at the end)."""
    shared = common_prefix_length(prompts) if share_prefix and len(prompts) > 1 else 0
    # Every row still needs one token of its own, so its last logits come from its own step.
    shared = min(shared, min(len(p) for p in prompts) - 1)
    extra_rows = []
    if shared >= MIN_SHARED_PREFIX:
        lender = cache.allocate()
        extra_rows.append(lender)
        model.forward(cache.make_step([lender], [prompts[0][:shared]]), cache)
        cache.extend([lender], [shared])
        rows = [cache.fork(lender, shared) for _ in prompts]
        suffixes = [p[shared:] for p in prompts]
    else:
        rows = [cache.allocate() for _ in prompts]
        suffixes = list(prompts)
    logits = model.forward(cache.make_step(rows, suffixes), cache)
    cache.extend(rows, [len(s) for s in suffixes])
    return rows, logits, extra_rows


def generate_ar(
    model: Transformer,
    cache: KVCache,
    requests: list[Request],
    share_prefix: bool = True,
    layers_at: Callable[[int], list[int]] | None = None,
    stats: DecodeStats | None = None,
) -> Iterator[tuple[int, str]]:
    """Decode every request to its end; yields (request index, newly released text) per token.

    layers_at(t), if given, is the layer list of decode step t (t = 0 produces the second
    generated token): SkipDecode's schedule. The prompt always runs every layer.
    """
    params = requests[0].params
    generators = make_generators(params, len(requests), model.device)
    executor = Executor(model, cache)
    rows, logits, extra_rows = prefill(model, cache, [r.prompt for r in requests], share_prefix)
    active = list(range(len(requests)))
    step, n_layers = 0, model.cfg.num_layers
    layers = None
    try:
        while True:
            tokens = sample(logits, params, [generators[i] for i in active])
            for i, tok in zip(active, tokens):
                yield i, requests[i].push(tok)
            if stats is not None:
                stats.generated_tokens += len(active)
                # The first token comes from the prompt's full-depth step.
                ran = n_layers if layers is None else len(layers)
                stats.layers_computed += len(active) * ran
            keep = [j for j, i in enumerate(active) if not requests[i].finished]
            if not keep:
                return
            active = [active[j] for j in keep]
            step_rows = [rows[i] for i in active]
            layers = None if layers_at is None else layers_at(step)
            logits = executor.decode(step_rows, [tokens[j] for j in keep], layers)
            cache.extend(step_rows, [1] * len(step_rows))
            step += 1
            if stats is not None:
                stats.steps += 1
    finally:
        for row in rows + extra_rows:
            cache.free(row)
        executor.close()
