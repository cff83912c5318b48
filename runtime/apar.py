"""APAR (METHODS.md section 4): a model that forks its own answer into parallel streams.

A model tuned for it writes a control token [Fork] where the rest of an item can be written apart
from the main text (a list item's details, a paragraph's body). The engine then starts a child
stream that reads the parent's KV prefix in place (a fork: no copy), with [Child] forced as its
first token; parent and child go on in the same steps, and neither sees the other's later tokens.
Each stream decodes with a base method (AR, or SD/GSD as the paper combines APAR with Medusa).

Rules, applied to the logits of every stream of the request (`bans`):
  - [Child] is never sampled: only a fork puts it there;
  - [Fork] is banned when the request has max_streams live streams, right after [Fork] or
    [Child], and in streams at max_depth (depth 1 is the root, so max_depth=2 lets only the root
    fork);
  - the length cap counts new tokens summed over all streams of the request.
The answer is reassembled from the fork tree (`reassemble`): at each fork the parent's text up to
it, then the child's text (the detail), then the parent's continuation.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch

from .engine import Engine, Stream
from .request import Request

NUMBERED_ITEM = re.compile(r"(^|\n)\s*\d+\.\s[^\n]*$")


@dataclass(frozen=True)
class APAR:
    """APAR decoding: streams fork at [Fork] (token id fork_id) and children start with [Child]
    (child_id). Ids None mean the tuned default model's, looked up by name in the tokenizer."""

    base: object = None  # the method each stream decodes with; None = AR
    fork_id: int | None = None
    child_id: int | None = None
    max_streams: int = 32
    max_depth: int = 2
    name = "apar"


@dataclass(eq=False)
class Family:
    """The streams of one APAR request: its fork tree and the shared length cap."""

    root: Stream
    cap: int  # new tokens summed over all streams
    streams: list[Stream] = field(default_factory=list)
    depth: dict[int, int] = field(default_factory=dict)  # id(stream) -> 1 for the root
    fork_at: dict[int, int] = field(default_factory=dict)  # id(child) -> index in parent tokens
    checked: dict[int, int] = field(default_factory=dict)  # id(stream) -> tokens scanned
    inner: dict[int, Callable | None] = field(default_factory=dict)  # the caller's processors

    def live(self) -> int:
        return sum(not s.finished for s in self.streams)

    def generated(self) -> int:
        return sum(len(s.request.tokens) for s in self.streams)

    def tokens_per_stream(self) -> list[int]:
        return [len(s.request.tokens) for s in self.streams]

    def max_depth(self) -> int:
        return max(self.depth.values())


def bans(family: Family, s: Stream, m: APAR) -> Callable:
    """The stream's logit processor: the caller's (if any), then APAR's bans."""
    inner = family.inner[id(s)]

    def process(context: Sequence[int], logits: torch.Tensor) -> torch.Tensor:
        if inner is not None:
            logits = inner(context, logits)
        out = logits.clone()
        out[m.child_id] = -float("inf")
        if (family.live() >= m.max_streams or context[-1] in (m.fork_id, m.child_id)
                or family.depth[id(s)] >= m.max_depth):
            out[m.fork_id] = -float("inf")
        return out

    return process


class APARPolicy:
    def __init__(self, method: APAR, base_policy, new_decoder: Callable | None = None):
        if method.fork_id is None or method.child_id is None:
            raise ValueError("APAR needs its control token ids (fork_id, child_id)")
        self.method, self.base = method, base_policy
        self.new_decoder = new_decoder  # a fresh stream decoder for a child's text (or None)
        self.slack = base_policy.slack

    def join(self, engine: Engine, s: Stream) -> None:
        if s.group is None:  # a new request: the root of its fork tree
            s.group = Family(s, s.params.max_new_tokens)
        family = s.group
        family.depth[id(s)] = 1 if s.parent is None else family.depth[id(s.parent)] + 1
        family.streams.append(s)
        family.inner[id(s)] = s.processor
        s.processor = bans(family, s, self.method)
        self.base.join(engine, s)

    def round(self, engine: Engine, streams: list[Stream]) -> None:
        for s in streams:  # fork at every [Fork] this stream wrote since the last round
            family, tokens = s.group, s.request.tokens
            for i in range(family.checked.get(id(s), 0), len(tokens)):
                if tokens[i] == self.method.fork_id:
                    self.fork(engine, s, i)
            family.checked[id(s)] = len(tokens)
        for family in {id(s.group): s.group for s in streams}.values():
            self.share_cap(family)
        self.base.round(engine, [s for s in streams if not s.finished])

    @staticmethod
    def share_cap(family: Family) -> None:
        """Split what is left of the family's token cap among its live streams, so that no round
        can take the sum past it: each stream's own limit becomes its share."""
        live = [s for s in family.streams if not s.finished]
        left = family.cap - family.generated()
        for i, s in enumerate(live):
            share = left // len(live) + (i < left % len(live))
            if share <= 0:
                s.request.finish_reason = "length"
            else:
                s.request.params = replace(s.params, max_new_tokens=len(s.request.tokens) + share)

    def fork(self, engine: Engine, parent: Stream, index: int) -> None:
        """A child of `parent` at its generated token `index` ([Fork]): it reads the parent's
        sequence up to and including that token, then [Child]."""
        family, m = parent.group, self.method
        at = len(parent.context) - len(parent.request.tokens) + index + 1
        params = replace(parent.params, max_new_tokens=family.cap)  # the family cap binds
        decoder = self.new_decoder() if self.new_decoder is not None else None
        request = Request(parent.context[:at] + [m.child_id], params, parent.request.eos_ids,
                          decoder)
        child = engine.fork(parent, [m.child_id], request, at=at,
                            processor=family.inner[id(parent)], group=family)
        family.fork_at[id(child)] = index

    def leave(self, s: Stream) -> None:
        self.base.leave(s)


def reassemble(family: Family, decode: Callable[[list[int]], str]) -> str:
    """The answer from the fork tree: each stream's text with, at each of its forks, the child's
    text inserted (a newline before it when the text so far ends in a numbered item, else a
    space), and a blank line before the parent's continuation. `decode` drops control tokens."""
    children: dict[int, list[Stream]] = {}
    for s in family.streams:
        if id(s) in family.fork_at:
            children.setdefault(id(s.parent), []).append(s)

    def text_of(s: Stream) -> str:
        tokens = s.request.tokens
        out, start = "", 0
        for child in sorted(children.get(id(s), []), key=lambda c: family.fork_at[id(c)]):
            at = family.fork_at[id(child)]
            out += decode(tokens[start:at])
            out += ("\n" if NUMBERED_ITEM.search(out) else " ") + text_of(child).strip() + "\n\n"
            start = at + 1  # past the [Fork] itself
        return out + decode(tokens[start:])

    return text_of(family.root).strip()
