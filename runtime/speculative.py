"""Verification of draft token trees and the commit of what was accepted, shared by every
speculative method (chain SD, tree SD, GSD, self-speculative SkipDecode).

A tree per sequence: node 0 is the root (the last token produced, whose K/V is not in the cache
yet), nodes 1.. are draft tokens in topological order. One target step scores every node; the
acceptance rule (greedy, or the lossless multi-candidate rule) walks the tree; the accepted path's
K/V rows move to contiguous slots and the emitted tokens are the accepted drafts plus one token of
the target's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..kernels.verify import verify_greedy_ref, verify_sample_ref
from .kv_cache import KVCache
from .sampling import SamplingParams, probabilities


@dataclass
class Accepted:
    path: list[int]  # accepted draft nodes, root excluded, root-to-leaf order
    tokens: list[int]  # the accepted draft tokens, then the target's next token


def accept(
    tokens: torch.Tensor,  # [B, N] int64 (node 0 = root)
    parents: torch.Tensor,  # [B, N] int64 (parents[:, 0] = -1)
    n_nodes: Sequence[int],
    logits: torch.Tensor,  # [B, N, V] target logits at every node
    params: SamplingParams,
    draft_probs: torch.Tensor | None = None,  # [B, N, V] (sampling): what each node's children
    generators: Sequence[torch.Generator] = (),  # were drawn from; one generator per sequence
) -> list[Accepted]:
    n = torch.as_tensor(list(n_nodes))
    if params.greedy:
        n_acc, path, out = verify_greedy_ref(tokens, parents, n, logits.argmax(-1))
    else:
        p_target = probabilities(logits, params)
        results = [
            verify_sample_ref(tokens[b : b + 1], parents[b : b + 1], n[b : b + 1],
                              p_target[b : b + 1], draft_probs[b : b + 1], generators[b])
            for b in range(tokens.shape[0])
        ]
        n_acc, path, out = (torch.cat(parts) for parts in zip(*results))
    return [
        Accepted(path[b, :a].tolist(), out[b, : a + 1].tolist())
        for b, a in enumerate(n_acc.tolist())
    ]


def commit(cache: KVCache, rows: Sequence[int], accepted: Sequence[Accepted]) -> None:
    """Keep the root and the accepted nodes' K/V (written by the verify step at start + node)."""
    for row, acc in zip(rows, accepted):
        start = cache.lengths[row]
        cache.commit(row, [start] + [start + node for node in acc.path])
