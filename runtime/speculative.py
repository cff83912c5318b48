"""Verification of draft token trees and the commit of what was accepted, shared by every
speculative method (chain SD, tree SD, GSD, self-speculative SkipDecode).

A tree per sequence: node 0 is the root (the last token produced, whose K/V is not in the cache
yet), nodes 1.. are draft tokens in topological order. One target step scores every node; the
acceptance rule (greedy, or the lossless multi-candidate rule) walks the tree; the accepted path's
K/V rows move to contiguous slots and the emitted tokens are the accepted drafts plus one token of
the target's own.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ..graph.model import Transformer
from ..graph.step import tree_from_parents
from ..kernels.verify import verify_greedy_ref, verify_sample_ref
from .ar import prefill
from .executor import Executor
from .gsd import DAG, GSDParams, ModelDraft, NgramDraft, Tree, sampling_depth, unfold
from .kv_cache import KVCache
from .request import Request
from .sampling import SamplingParams, make_generators, probabilities, sample
from .stats import DecodeStats


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


def generate_speculative(
    target: Transformer,
    cache: KVCache,
    requests: list[Request],
    draft: ModelDraft | NgramDraft,
    p: GSDParams,
    stats: DecodeStats | None = None,
) -> Iterator[tuple[int, str]]:
    """Speculative decoding of a batch: draft a DAG per sequence, verify its unfolded tree in one
    target step, keep what the target accepts. Each sequence accepts its own number of tokens."""
    params = requests[0].params
    vocab = target.cfg.vocab_size
    gens = make_generators(params, len(requests), target.device)
    stats = stats or DecodeStats("speculative")
    executor = Executor(target, cache)
    prompts = [r.prompt for r in requests]
    rows, logits, extra_rows = prefill(target, cache, prompts)
    draft_rows = draft.begin(prompts) if isinstance(draft, ModelDraft) else []
    depth = p.max_depth if params.greedy else sampling_depth(p)
    try:
        roots = sample(logits, params, gens)
        for i, tok in enumerate(roots):
            yield i, requests[i].push(tok)
        stats.generated_tokens += len(requests)
        pending = [[t] for t in roots]  # tokens the draft model has not seen, ending at the root
        active = [i for i in range(len(requests)) if not requests[i].finished]
        while active:
            t0 = time.perf_counter()
            if isinstance(draft, ModelDraft):
                dags = draft.draft([draft_rows[i] for i in active], [pending[i] for i in active],
                                   p, params, [gens[i] for i in active])
            else:
                dags = [draft.draft(requests[i].prompt + requests[i].tokens, p, params)
                        for i in active]
            trees = [unfold(dag, p.node_budget, depth) for dag in dags]
            width = max(len(t.tokens) for t in trees)
            tokens = torch.zeros(len(active), width, dtype=torch.long)
            parents = torch.full((len(active), width), -1, dtype=torch.long)
            vis = torch.zeros(len(active), width, width, dtype=torch.bool)
            draft_probs = None if params.greedy else torch.zeros(len(active), width, vocab)
            for b, (dag, tree) in enumerate(zip(dags, trees)):
                n = len(tree.tokens)
                tokens[b, :n] = torch.tensor(tree.tokens)
                parents[b, :n] = torch.tensor(tree.parents)
                vis[b, :n, :n] = tree_from_parents(tree.parents)
                if draft_probs is not None:
                    _fill_draft_probs(draft_probs[b], dag, tree)
            t1 = time.perf_counter()
            act_rows = [rows[i] for i in active]
            logits = executor.verify(act_rows, tokens, vis, [len(t.tokens) for t in trees])
            accepted = accept(tokens, parents, [len(t.tokens) for t in trees], logits, params,
                              draft_probs, [gens[i] for i in active])
            commit(cache, act_rows, accepted)
            if isinstance(draft, ModelDraft):
                new_pending = draft.accepted([draft_rows[i] for i in active], dags, trees,
                                             [a.path for a in accepted],
                                             [a.tokens for a in accepted])
                for i, pend in zip(active, new_pending):
                    pending[i] = pend
            t2 = time.perf_counter()
            stats.draft_seconds += t1 - t0
            stats.verify_seconds += t2 - t1
            stats.steps += 1
            for i, dag, acc in zip(active, dags, accepted):
                stats.accepted.append(len(acc.path))
                stats.draft_nodes += len(dag.nodes) - 1
                stats.merged_nodes += dag.merged
                before = len(requests[i].tokens)
                yield i, requests[i].push_many(acc.tokens)
                stats.generated_tokens += len(requests[i].tokens) - before
            active = [i for i in active if not requests[i].finished]
    finally:
        for row in rows + extra_rows:
            cache.free(row)
        if draft_rows:
            draft.end(draft_rows)
        executor.close()


def _fill_draft_probs(out: torch.Tensor, dag: DAG, tree: Tree) -> None:
    """out [N, V]: for each tree node, the distribution its children were drawn from."""
    for i, d in enumerate(tree.dag_ids):
        node = dag.nodes[d]
        if node.q is not None:
            out[i, : node.q.shape[-1]] = node.q
        elif node.children:  # n-gram: a point mass on the one proposed child
            out[i, dag.nodes[node.children[0]].token] = 1.0
