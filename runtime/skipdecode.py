"""SkipDecode's lossless self-speculative mode: the skip-layer forward drafts, the full forward
verifies, and the two share the K/V of the layers both ran.

One round, for every active sequence of the batch at once:
  1. Draft k tokens one at a time with the skip-layer forward (warm-up layers [0, w), then the top
     layers of the draft's layer set), keeping each token's residual stream after the warm-up
     layers. One more warm-up-only step gives the last draft token's stream.
  2. Verify root + k drafts in one step that runs layers [w, L) from those streams: the warm-up
     layers' K/V that the draft wrote is exactly what the full model computes (same layers, same
     inputs, same prefix), so it is reused, not recomputed; layers [w, L) are rewritten in full.
  3. Accept (greedy: the target's argmax; sampled: the lossless rejection rule, with the draft's
     and target's distributions processed by the same SamplingParams) and keep the accepted K/V.
The output is token-identical to greedy AR of the full model, and distributed as AR when sampling.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import torch

from ..graph.model import Transformer
from .ar import prefill
from .kv_cache import KVCache
from .request import Request
from .sampling import draw, make_generators, probabilities, sample
from .speculative import accept, commit
from .stats import DecodeStats


def generate_selfspec(
    model: Transformer,
    cache: KVCache,
    requests: list[Request],
    draft_layers: list[int],  # the draft's layer set: [0, w) + some top layers, ascending
    k: int,
    stats: DecodeStats | None = None,
) -> Iterator[tuple[int, str]]:
    if k < 1:
        raise ValueError(f"self-speculative draft length k={k}: expected >= 1")
    L = model.cfg.num_layers
    w = next((i for i, layer in enumerate(draft_layers) if layer != i), len(draft_layers))
    warmup, top = draft_layers[:w], draft_layers[w:]
    rest = list(range(w, L))  # what verification runs on top of the shared warm-up
    params = requests[0].params
    gens = make_generators(params, len(requests), model.device)
    stats = stats or DecodeStats("selfspec")
    rows, logits, extra_rows = prefill(model, cache, [r.prompt for r in requests])
    try:
        roots = sample(logits, params, gens)
        for i, tok in enumerate(roots):
            yield i, requests[i].push(tok)
        stats.generated_tokens += len(requests)
        stats.layers_computed += L * len(requests)
        active = [i for i in range(len(requests)) if not requests[i].finished]
        while active:
            act_rows = [rows[i] for i in active]
            starts = [cache.lengths[r] for r in act_rows]
            t0 = time.perf_counter()
            # 1. Draft: k skip-layer steps, then the warm-up layers of the last draft token.
            cur = [roots[i] for i in active]
            drafts, streams, q = [], [], []
            for j in range(k + 1):
                step = cache.make_step(act_rows, [[t] for t in cur])
                h_w = model.hidden(step, cache, warmup)  # [B, 1, d]
                streams.append(h_w)
                cache.extend(act_rows, [1] * len(act_rows))
                if j == k:
                    break
                h = model.hidden(step, cache, top, start=h_w)
                draft_logits = model.logits(h[:, 0])  # [B, V]
                if params.greedy:
                    cur = draft_logits.argmax(-1).tolist()
                else:
                    probs = probabilities(draft_logits, params)
                    q.append(probs)
                    cur = [draw(p, gens[i]) for p, i in zip(probs, active)]
                drafts.append(cur)
            for r, s in zip(act_rows, starts):
                cache.rollback(r, s)
            t1 = time.perf_counter()
            # 2. Verify root + drafts over layers [w, L), continuing from the draft's streams.
            chain = [[roots[i]] + [d[b] for d in drafts] for b, i in enumerate(active)]
            step = cache.make_step(act_rows, chain, logits="all")
            h = model.hidden(step, cache, rest, start=torch.cat(streams, dim=1))
            target_logits = model.logits(h)  # [B, k + 1, V]
            tokens = torch.tensor(chain)
            parents = torch.arange(-1, k).expand(len(active), k + 1)
            draft_probs = None
            if not params.greedy:  # node j's child (draft j + 1) was drawn from q[j]
                draft_probs = torch.stack(q + [q[-1]], dim=1)  # the last row is never used
            accepted = accept(tokens, parents, [k + 1] * len(active), target_logits, params,
                              draft_probs, [gens[i] for i in active])
            commit(cache, act_rows, accepted)
            t2 = time.perf_counter()
            stats.draft_seconds += t1 - t0
            stats.verify_seconds += t2 - t1
            stats.steps += 1
            for i, acc in zip(active, accepted):
                stats.accepted.append(len(acc.path))
                before = len(requests[i].tokens)
                yield i, requests[i].push_many(acc.tokens)
                emitted = len(requests[i].tokens) - before
                stats.generated_tokens += emitted
                stats.layers_computed += k * len(draft_layers) + w + (k + 1) * len(rest)
                roots[i] = acc.tokens[-1]
            active = [i for i in active if not requests[i].finished]
    finally:
        for row in rows + extra_rows:
            cache.free(row)
