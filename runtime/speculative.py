"""Verification of draft token trees and the commit of what was accepted, shared by every
speculative method (chain SD, tree SD, GSD, self-speculative SkipDecode).

A tree per stream: node 0 is the root (the last token produced, whose K/V is not in the cache
yet), nodes 1.. are draft tokens in topological order. One target step scores every node; the
acceptance rule (greedy, or the lossless multi-candidate rule) walks the tree; the accepted path's
K/V rows move to contiguous slots and the emitted tokens are the accepted drafts plus one token of
the target's own.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..graph.step import tree_from_parents
from ..kernels.verify import verify_greedy, verify_greedy_ref, verify_sample, verify_sample_ref
from .engine import Engine, Stream
from .executor import Executor
from .gsd import DAG, GSDParams, ModelDraft, NgramDraft, Tree, sampling_depth, unfold
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
    logits: torch.Tensor,  # [B, N, V] target logits at every node (already processed)
    params: Sequence[SamplingParams],  # per sequence
    draft_probs: torch.Tensor | None = None,  # [B, N, V] (sampling): what each node's children
    generators: Sequence[torch.Generator | None] = (),  # were drawn from; one per sequence
    philox: Sequence = (),  # CUDA: per sequence, a callable giving (seed, offset) for one draw
) -> list[Accepted]:
    """The greedy rule for greedy sequences (one batched call: the Triton kernel on CUDA), the
    lossless multi-candidate rule for sampled ones."""
    n = torch.as_tensor(list(n_nodes))
    out: list[Accepted | None] = [None] * len(params)
    greedy = [b for b, p in enumerate(params) if p.greedy]
    if greedy:
        g = torch.tensor(greedy, device=tokens.device)
        rule = verify_greedy if tokens.is_cuda else verify_greedy_ref
        n_acc, path, emitted = rule(tokens[g], parents[g], n.to(tokens.device)[g],
                                    logits[g].argmax(-1))
        for j, b in enumerate(greedy):
            a = int(n_acc[j])
            out[b] = Accepted(path[j, :a].tolist(), emitted[j, : a + 1].tolist())
    for b, p in enumerate(params):
        if p.greedy:
            continue
        p_target = probabilities(logits[b : b + 1], p)
        one = (tokens[b : b + 1], parents[b : b + 1], n[b : b + 1].to(tokens.device), p_target,
               draft_probs[b : b + 1].to(tokens.device))
        if tokens.is_cuda:  # the Triton rule draws from Philox, seeded per stream
            n_acc, path, emitted = verify_sample(*one, *philox[b]())
        else:
            n_acc, path, emitted = verify_sample_ref(*one, generators[b])
        a = int(n_acc[0])
        out[b] = Accepted(path[0, :a].tolist(), emitted[0, : a + 1].tolist())
    return out


def commit(cache: KVCache, rows: Sequence[int], accepted: Sequence[Accepted]) -> None:
    """Keep the root and the accepted nodes' K/V (written by the verify step at start + node)."""
    cache.commit_many(rows, [[cache.lengths[r]] + [cache.lengths[r] + node for node in acc.path]
                             for r, acc in zip(rows, accepted)])


def tree_contexts(context: Sequence[int], tree: Tree) -> list[list[int]]:
    """The sequence up to and including each tree node (node 0 = the root = context[-1])."""
    out = [list(context)]
    for i in range(1, len(tree.tokens)):
        out.append(out[tree.parents[i]] + [tree.tokens[i]])
    return out


class SpeculativePolicy:
    """Chain SD, tree SD and GSD over the engine's streams: draft a DAG per stream, verify its
    unfolded tree in one target step, keep what the target accepts. Each stream accepts its own
    number of tokens."""

    def __init__(self, executor: Executor, draft: ModelDraft | NgramDraft, p: GSDParams):
        self.executor, self.draft, self.p = executor, draft, p
        self.slack = p.node_budget + 1
        self.vocab = executor.model.cfg.vocab_size

    def depth(self, s: Stream) -> int:
        return self.p.max_depth if s.params.greedy else sampling_depth(self.p)

    def round(self, engine: Engine, streams: list[Stream]) -> None:
        p, cache = self.p, self.executor.cache
        t0 = time.perf_counter()
        if isinstance(self.draft, ModelDraft):
            dags = self.draft.draft_for(streams, p)
        else:
            dags = [self.draft.draft(s.context, p, s.params) for s in streams]
        trees = [unfold(dag, p.node_budget, self.depth(s)) for dag, s in zip(dags, streams)]
        width = max(len(t.tokens) for t in trees)
        batch = len(streams)
        tokens = torch.zeros(batch, width, dtype=torch.long)
        parents = torch.full((batch, width), -1, dtype=torch.long)
        vis = torch.zeros(batch, width, width, dtype=torch.bool)
        sampled = any(not s.params.greedy for s in streams)
        draft_probs = torch.zeros(batch, width, self.vocab) if sampled else None
        for b, (dag, tree) in enumerate(zip(dags, trees)):
            n = len(tree.tokens)
            tokens[b, :n] = torch.tensor(tree.tokens)
            parents[b, :n] = torch.tensor(tree.parents)
            vis[b, :n, :n] = tree_from_parents(tree.parents)
            if sampled:
                _fill_draft_probs(draft_probs[b], dag, tree)
        t1 = time.perf_counter()
        rows = [s.row for s in streams]
        logits = self.executor.verify(rows, tokens, vis, [len(t.tokens) for t in trees])
        for b, (s, tree) in enumerate(zip(streams, trees)):
            if s.processor is not None:
                for i, ctx in enumerate(tree_contexts(s.context, tree)):
                    logits[b, i] = engine.process(s, ctx, logits[b, i])
        accepted = accept(tokens.to(logits.device), parents.to(logits.device),
                          [len(t.tokens) for t in trees], logits, [s.params for s in streams],
                          draft_probs, [s.generator for s in streams],
                          [s.philox for s in streams])
        commit(cache, rows, accepted)
        if isinstance(self.draft, ModelDraft):
            self.draft.accepted([s.state for s in streams], dags, trees,
                                [a.path for a in accepted])
        t2 = time.perf_counter()
        for st in {id(s.stats): s.stats for s in streams}.values():
            st.draft_seconds += t1 - t0
            st.verify_seconds += t2 - t1
            st.steps += 1
        for s, dag, acc in zip(streams, dags, accepted):
            s.stats.accepted.append(len(acc.path))
            s.stats.draft_nodes += len(dag.nodes) - 1
            s.stats.merged_nodes += dag.merged
            engine.emit(s, acc.tokens)

    def leave(self, s: Stream) -> None:
        if isinstance(self.draft, ModelDraft):
            self.draft.leave(s)


def _fill_draft_probs(out: torch.Tensor, dag: DAG, tree: Tree) -> None:
    """out [N, V]: for each tree node, the distribution its children were drawn from."""
    for i, d in enumerate(tree.dag_ids):
        node = dag.nodes[d]
        if node.q is not None:
            out[i, : node.q.shape[-1]] = node.q
        elif node.children:  # n-gram: a point mass on the one proposed child
            out[i, dag.nodes[node.children[0]].token] = 1.0
