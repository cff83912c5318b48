"""KV that lasts across calls: finished sequences' cache rows, kept and found again by token prefix.

When a stream leaves, its row is not freed but kept here under the tokens whose K/V it holds (the
prompt and what was generated). A later sequence that begins with the same tokens (the same system
prompt, the same question asked again, a conversation's next turn) forks the longest match and
prefills only the rest: the shared slots are read in place (runtime/kv_cache.py `fork`).

An entry owns one reference to its row. Rows are the unit of memory, so the budget is rows: when the
engine needs a row and none is free, the least recently used entry that no live row still borrows
from is evicted. vLLM's automatic prefix caching and SGLang's radix cache do the same with blocks;
a linear scan over the entries is enough at the entry counts a row budget allows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .kv_cache import KVCache


@dataclass
class Entry:
    tokens: tuple[int, ...]  # the K/V the row holds: slots [0, len(tokens))
    row: int
    last_used: int


class PrefixCache:
    def __init__(self, cache: KVCache, enabled: bool = True):
        self.cache, self.enabled = cache, enabled
        self.entries: list[Entry] = []
        self.clock = 0
        self.hits = 0  # lookups that reused at least one slot
        self.reused_tokens = 0  # prefill tokens saved by those lookups

    def match(self, tokens: Sequence[int], limit: int) -> tuple[int, int]:
        """(row, n): the entry sharing the longest prefix with `tokens`, at most `limit` tokens;
        (-1, 0) when none shares any."""
        best_row, best_n = -1, 0
        if not self.enabled:
            return best_row, best_n
        for e in self.entries:
            n = _common_prefix(e.tokens, tokens, limit)
            if n > best_n:
                best_row, best_n = e.row, n
                self.clock += 1
                e.last_used = self.clock
        return best_row, best_n

    def record_hit(self, n: int) -> None:
        self.hits += 1
        self.reused_tokens += n

    def insert(self, tokens: Sequence[int], row: int) -> None:
        """Keep `row` (its caller's reference passes to the entry) under `tokens`. An entry that
        holds a prefix of these tokens is replaced, since the new one answers every lookup the old
        one did."""
        if not self.enabled or not tokens:
            self.cache.free(row)
            return
        tokens = tuple(tokens)
        self.clock += 1
        kept = []
        for e in self.entries:
            if len(e.tokens) <= len(tokens) and tokens[: len(e.tokens)] == e.tokens:
                self.cache.free(e.row)  # still alive if the new row borrows from it
            else:
                kept.append(e)
        self.entries = kept + [Entry(tokens, row, self.clock)]

    def evict_one(self) -> bool:
        """Free the least recently used entry whose row only it holds (nobody borrows from it, no
        caller has pinned it); False if none can go."""
        free = [e for e in self.entries if self.cache.refs[e.row] == 1]
        if not free:
            return False
        victim = min(free, key=lambda e: e.last_used)
        self.entries.remove(victim)
        self.cache.free(victim.row)
        return True

    def clear(self) -> None:
        for e in self.entries:
            self.cache.free(e.row)
        self.entries = []


def _common_prefix(a: Sequence[int], b: Sequence[int], limit: int) -> int:
    n = min(len(a), len(b), limit)
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
