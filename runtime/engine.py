"""The decoding engine: one step loop over live streams that join, fork and leave.

A stream is one sequence being generated: a request of its own, or a fork of another stream that
shares its KV prefix. Its `context` is every token of the sequence; the target's KV cache holds the
first `cache.lengths[row]` of them, and the rest are pending (at least the last one, the root that
the next forward reads). Every step of `Engine.step`:
  1. catch up: streams with more than one pending token (a new request, a fork) run them in one
     ragged forward; their next token is sampled from the last one. A new stream first looks its
     context up in the prefix cache and forks the longest match, so a prompt shared with an earlier
     call, or with another stream of the batch, is prefilled once.
  2. one round of each decoding method over the streams that use it: a policy (AR, SkipDecode,
     speculative, self-speculative; runtime/methods.py) proposes, runs one forward, accepts and
     commits, then emits the accepted tokens.
  3. streams that reached EOS, a stop string or their limit leave: their rows go to the prefix
     cache (a later call may reuse them) or, if it is off, back to the pool.
Streams may join (`add`, `fork`) between any two steps; a stream's tokens are the same whatever
else shares its steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..graph.model import Transformer
from ..kernels.sampling import sample as sample_kernel
from .executor import Executor
from .kv_cache import KVCache, KVCacheError
from .prefix_cache import PrefixCache
from .request import Request
from .sampling import draw, probabilities
from .stats import DecodeStats

# (context, logits [V]) -> logits [V] for the token after `context`: bans, forced tokens (APAR).
LogitProcessor = Callable[[Sequence[int], torch.Tensor], torch.Tensor]

# Below this many common tokens a shared prefill row costs more bookkeeping than it saves.
MIN_SHARED_PREFIX = 8
# Cache capacity grows in steps of this many slots, so a new request rarely reallocates it.
CAPACITY_STEP = 256


class Worker:
    """One model and what its steps need: the KV cache (grown on demand within a memory budget),
    the prefix cache over it, and the executor with its plans, all kept across calls."""

    def __init__(
        self,
        model: Transformer,
        max_capacity: int,
        kv_cache_mb: float = 2048,
        prefix_cache: bool = True,
        static: bool | None = None,
        cache: KVCache | None = None,  # a cache to use instead of a new one (tests)
    ):
        self.model = model
        self.max_capacity = max_capacity
        self.kv_cache_bytes = int(kv_cache_mb * 2**20)
        self.cache = cache or KVCache(model.cfg, 0, min(CAPACITY_STEP, max_capacity), model.dtype,
                                      model.device)
        self.prefixes = PrefixCache(self.cache, enabled=prefix_cache)
        self.executor = Executor(model, self.cache, static=static)

    def ensure_capacity(self, slots: int) -> None:
        if slots > self.max_capacity:
            raise KVCacheError(
                f"a sequence needs {slots} cache slots, past max_seq_len ({self.max_capacity} "
                "with the drafting slack): raise max_seq_len when loading the model"
            )
        cache = self.cache
        if slots > cache.capacity:
            cap = min(self.max_capacity, -(-slots // CAPACITY_STEP) * CAPACITY_STEP)
            rows = cache.rows
            if rows * cache.row_bytes(cap) > self.kv_cache_bytes:
                # Longer rows for fewer of them: the kept prefixes go first, then the free rows
                # past the last one in use.
                self.prefixes.clear()
                rows = max((r + 1 for r in range(cache.rows) if cache.refs[r]), default=0)
            self._check_budget(rows, cap)
            cache.resize(rows, cap)

    def allocate(self) -> int:
        """A free row: from the pool, else by evicting a prefix-cache entry, else by growing the
        cache within the memory budget."""
        cache = self.cache
        while not cache.free_rows and self.prefixes.evict_one():
            pass
        if not cache.free_rows:
            grown = max(4, cache.rows * 2)
            most = self.kv_cache_bytes // cache.row_bytes()
            if cache.rows >= most:
                raise KVCacheError(
                    f"KV cache exhausted: {cache.rows} rows of {cache.capacity} slots "
                    f"({cache.rows * cache.row_bytes() / 2**20:.1f} MiB) are all in use by live "
                    f"streams; raise kv_cache_mb (now {self.kv_cache_bytes / 2**20:g}) when "
                    "loading the model, or send fewer requests at once"
                )
            cache.reserve(min(grown, most), cache.capacity)
        return cache.allocate()

    def _check_budget(self, rows: int, capacity: int) -> None:
        need = rows * self.cache.row_bytes(capacity)
        if need > self.kv_cache_bytes:
            raise KVCacheError(
                f"KV cache exhausted: {rows} rows of {capacity} slots need {need / 2**20:.0f} MiB, "
                f"past kv_cache_mb={self.kv_cache_bytes / 2**20:g}: raise kv_cache_mb when "
                "loading the model, or lower max_new_tokens"
            )

    def rows_for(self, contexts: Sequence[Sequence[int]]) -> list[int]:
        """A row per context, each forking the longest prefix already in the cache. Contexts that
        share a prefix no entry holds get it prefilled once into a row of its own (kept in the
        prefix cache), which they then fork."""
        limits = [len(c) - 1 for c in contexts]  # every row keeps one token of its own to run
        if len(contexts) > 1 and self.prefixes.enabled:
            shared = min(_common_prefix(contexts), min(limits))
            _, cached = self.prefixes.match(contexts[0], shared)
            if shared >= MIN_SHARED_PREFIX and shared > cached:
                lender = self._row_holding(contexts[0][:shared])
                self.prefixes.insert(contexts[0][:shared], lender)
        rows = []
        try:
            for ctx, limit in zip(contexts, limits):
                src, n = self.prefixes.match(ctx, limit)
                rows.append(self.allocate_fork(src, n) if n else self.allocate())
        except KVCacheError:
            for row in rows:  # all or nothing: a failed call keeps no row
                self.cache.free(row)
            raise
        for row in rows:
            if self.cache.lengths[row]:
                self.prefixes.record_hit(self.cache.lengths[row])
        return rows

    def allocate_fork(self, src: int, n: int) -> int:
        """A new row reading src's first n slots in place; when src is a prefix-cache entry and
        the only row that could make room, a plain row instead (its `lengths` is then 0)."""
        self.cache.refs[src] += 1  # pinned, so that making room below cannot evict src
        try:
            row = self.allocate()
        except KVCacheError:
            row = None
        finally:
            self.cache.free(src)
        return self.allocate() if row is None else self.cache.fork(src, n, row=row)

    def _row_holding(self, tokens: Sequence[int]) -> int:
        """A row whose K/V holds exactly `tokens` (forking what the cache already has of them)."""
        src, n = self.prefixes.match(tokens, len(tokens) - 1)
        row = self.allocate_fork(src, n) if n else self.allocate()
        n = self.cache.lengths[row]
        self.executor.prefill([row], [list(tokens[n:])])
        self.cache.extend([row], [len(tokens) - n])
        return row


@dataclass(eq=False)
class Stream:
    request: Request
    method: Any  # a runtime/methods.py method (frozen dataclass: the key of its policy)
    context: list[int]  # every token of the sequence: prompt (or the parent's prefix) + generated
    generator: torch.Generator | None
    stats: DecodeStats
    processor: LogitProcessor | None = None
    on_text: Callable[[str], None] | None = None
    parent: Stream | None = None
    row: int = -1  # the target cache row, once the stream has one
    state: Any = None  # the method's per-stream state (a draft's cache row, acceptance figures)
    group: Any = None  # the request a forked stream belongs to (APAR's fork tree), or None
    children: list[Stream] = field(default_factory=list)
    draws: int = 0  # Philox offsets used by the CUDA kernels (a new one per draw)
    # [len(prompt), d] added to the prompt's token embeddings at its prefill (LLM-to-SLM's
    # projected states), or None. Its K/V then depend on more than the tokens, so the stream's
    # rows are never matched against nor kept in the prefix cache.
    prompt_embeds: torch.Tensor | None = None

    def tree(self) -> list[Stream]:
        """This stream and every stream forked from it, at any depth."""
        out = [self]
        for child in self.children:
            out += child.tree()
        return out

    def philox(self) -> tuple[int, int]:
        """(seed, offset) for one draw by a Triton kernel: the stream's generator seed, and an
        offset that advances per draw, so a stream draws the same alone or in any batch."""
        self.draws += 1
        return self.generator.initial_seed() % 2**62, self.draws - 1

    @property
    def finished(self) -> bool:
        return self.request.finished

    @property
    def params(self):
        return self.request.params


class Engine:
    def __init__(self, target: Worker, policy_for: Callable[[Any], Any]):
        self.target = target
        self.policy_for = policy_for  # method -> its policy object (built once per method)
        self.policies: dict[Any, Any] = {}
        self.live: list[Stream] = []
        self.events: list[tuple[Stream, str]] = []  # text released during the current step

    # --- streams joining and leaving ----------------------------------------------------------
    def add(self, stream: Stream) -> Stream:
        e, cfg = stream.prompt_embeds, self.target.model.cfg
        if e is not None and stream.parent is None and (
                e.dim() != 2 or tuple(e.shape) != (len(stream.context), cfg.hidden_size)):
            raise ValueError(
                f"prompt_embeds has shape {tuple(e.shape)}, expected [prompt tokens, hidden_size]"
                f" = {[len(stream.context), cfg.hidden_size]}"
            )
        policy = self.policy(stream)
        self.target.ensure_capacity(len(stream.context) + stream.params.max_new_tokens
                                    + policy.slack)
        policy.join(self, stream)
        self.live.append(stream)
        return stream

    def fork(self, parent: Stream, forced: Sequence[int], request: Request,
             at: int | None = None, processor: LogitProcessor | None = None,
             group: Any = None) -> Stream:
        """A stream that continues parent's sequence up to `at` tokens (default: all of it) with
        `forced` tokens and then decodes on its own, reading parent's committed KV in place. Both
        go on in the same steps. `processor` is the child's own (None: none); `group` the
        request it belongs to (APAR's fork tree)."""
        cache = self.target.cache
        at = len(parent.context) if at is None else at
        n = min(cache.lengths[parent.row], at)
        row = self.target.allocate_fork(parent.row, n) if n else self.target.allocate()
        gen = None
        if parent.generator is not None:  # the child's own draws, reproducible from the parent's
            gen = torch.Generator(device=self.target.model.device)
            gen.manual_seed((parent.generator.initial_seed() * 1000003 + len(parent.children) + 1)
                            % 2**62)
        child = Stream(request, parent.method, parent.context[:at] + list(forced), gen,
                       parent.stats, processor, None, parent, row=row, group=group,
                       prompt_embeds=parent.prompt_embeds)  # for the prompt slots it prefills
        parent.children.append(child)
        self.add(child)
        self.emit(child, [], forced=list(forced))
        return child

    def _leave(self, s: Stream) -> None:
        self.policy(s).leave(s)
        if s.row >= 0:
            length = self.target.cache.lengths[s.row]
            if s.prompt_embeds is None:
                self.target.prefixes.insert(s.context[:length], s.row)
            else:  # K/V that the tokens alone do not determine: no later call may reuse them
                self.target.cache.free(s.row)
            s.row = -1
        self.live.remove(s)

    def policy(self, s: Stream):
        if s.method not in self.policies:
            self.policies[s.method] = self.policy_for(s.method)
        return self.policies[s.method]

    # --- what every policy calls --------------------------------------------------------------
    def pending(self, s: Stream) -> list[int]:
        return s.context[self.target.cache.lengths[s.row]:] if s.row >= 0 else s.context

    def process(self, s: Stream, context: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        """The stream's logit processor applied to logits [V] for the token after `context`."""
        return logits if s.processor is None else s.processor(context, logits)

    def next_token(self, s: Stream, logits: torch.Tensor) -> int:
        """Sample (or argmax) the token after s.context from logits [V]."""
        logits = self.process(s, s.context, logits)
        if s.params.greedy:
            return int(logits.argmax())
        if logits.is_cuda:  # the sort-free Triton sampler, seeded per stream (kernels/sampling.py)
            p = s.params
            seed, offset = s.philox()
            return int(sample_kernel(logits[None], p.temperature, p.top_k, p.top_p, seed,
                                     offset)[0])
        return draw(probabilities(logits, s.params), s.generator)

    def emit(self, s: Stream, tokens: list[int], forced: list[int] | None = None) -> None:
        """Append accepted tokens to the sequence and release their text; a forked stream's forced
        tokens are already in its context and only counted as generated."""
        if forced is None:
            s.context += tokens
        before = len(s.request.tokens)
        text = s.request.push_many(tokens if forced is None else forced)
        s.stats.generated_tokens += len(s.request.tokens) - before
        if text and s.on_text is not None:
            s.on_text(text)
        self.events.append((s, text))

    # --- the step loop ------------------------------------------------------------------------
    def step(self) -> list[tuple[Stream, str]]:
        """Advance every live stream once; returns the (stream, text) released by this step."""
        self.events = []
        joining = [s for s in self.live
                   if not s.finished and (s.row < 0 or len(self.pending(s)) > 1)]
        if joining:
            self._catch_up(joining)
        groups: dict[Any, list[Stream]] = {}
        for s in self.live:
            if not s.finished and s not in joining:
                groups.setdefault(s.method, []).append(s)
        for method, streams in groups.items():
            self.policy(streams[0]).round(self, streams)
        for s in [s for s in self.live if s.finished]:
            self._leave(s)
        return self.events

    def run(self, streams: Iterable[Stream]) -> Iterator[tuple[Stream, str]]:
        """Step until every given stream has finished, yielding what each step releases."""
        streams = list(streams)
        try:
            while any(not t.finished for s in streams for t in s.tree()):
                yield from self.step()
        finally:
            for t in [t for s in streams for t in s.tree()]:  # an abandoned generator must not
                if t in self.live:  # leave its rows behind
                    t.request.finish_reason = t.request.finish_reason or "cancelled"
                    self._leave(t)

    def _catch_up(self, streams: list[Stream]) -> None:
        """One ragged forward over every pending token of these streams (the prompt of a new one),
        then each stream's next token from its last token's logits."""
        t0 = time.perf_counter()
        cache = self.target.cache
        new = [s for s in streams if s.row < 0 and s.prompt_embeds is None]
        for s, row in zip(new, self.target.rows_for([s.context for s in new]) if new else []):
            s.row = row
            s.stats.reused_tokens += cache.lengths[row]
        for s in streams:
            if s.row < 0:  # prompt_embeds: a plain row, never a cached prefix (see Stream)
                s.row = self.target.allocate()
        rows = [s.row for s in streams]
        tokens = [self.pending(s) for s in streams]
        embeds = [None if s.prompt_embeds is None else s.prompt_embeds[cache.lengths[s.row]:]
                  for s in streams]
        logits = self.target.executor.prefill(rows, tokens, embeds)  # [B, V]
        cache.extend(rows, [len(t) for t in tokens])
        seconds = time.perf_counter() - t0
        for st in {id(s.stats): s.stats for s in streams}.values():
            st.prefill_seconds += seconds
        for b, s in enumerate(streams):
            s.stats.prefill_tokens += len(tokens[b])
            tok = self.next_token(s, logits[b])
            s.stats.layers_computed += self.target.model.cfg.num_layers
            self.emit(s, [tok])


def _common_prefix(contexts: Sequence[Sequence[int]]) -> int:
    first = contexts[0]
    n = min(len(c) for c in contexts)
    for c in contexts[1:]:
        n = next((i for i in range(n) if c[i] != first[i]), n)
    return n
