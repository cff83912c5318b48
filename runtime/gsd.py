"""Graph-structured speculative decoding: draft hypotheses merged into a token DAG, unfolded into a
tree for one verification step (METHODS.md section 1).

Drafting grows a DAG from the root (the last token produced) one level per draft step: one batched
draft forward scores every frontier node of every sequence (each node sees the committed prefix
plus its own ancestor chain), each expandable node gets up to k children (top-k when greedy, k
i.i.d. samples when sampling), and a child whose token recurs at a node that is not its ancestor,
with the same tau nearest ancestor tokens, becomes an edge to that node instead of a new node: the
draft does no work for it and its subtree is reused. (k=1, tau=-1) is chain SD; (k>1, tau=-1) is
tree SD without merging.

Sampling stays lossless (the multi-candidate rule needs each node's candidates to be i.i.d. draws
from the distribution passed for it), so when sampling: every expanded node keeps all k draws with
their multiplicity (no sibling pruning), and unfolding is cut by depth only, never by a count that
depends on the drawn values. Greedy decoding may prune freely.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from .sampling import SamplingParams, probabilities


@dataclass(frozen=True)
class GSDParams:
    k: int = 4  # children per expanded node
    tau: int = 0  # merge depth: ancestor tokens that must match; -1 disables merging
    max_depth: int = 4  # draft steps per round (the deepest draft token)
    node_budget: int = 16  # unfolded tree nodes verified per step, root included
    prob_threshold: float = 0.3  # path probability below which a node is not expanded
    sibling_threshold: float = 0.2  # greedy: keep child j iff p_j >= this * max p

    def __post_init__(self):
        if self.k < 1 or self.max_depth < 1 or self.tau < -1:
            raise ValueError(f"GSDParams needs k >= 1, max_depth >= 1, tau >= -1; got {self}")
        if not 2 <= self.node_budget <= 64:
            raise ValueError(f"GSDParams.node_budget={self.node_budget}: expected 2..64")


@dataclass
class Node:
    token: int
    parent: int  # the node it was drafted under (its draft context); -1 for the root
    depth: int
    path_prob: float
    expandable: bool
    children: list[int] = field(default_factory=list)  # out-edges in draft order (may repeat)
    in_edges: list[int] = field(default_factory=list)
    q: torch.Tensor | None = None  # sampling: the distribution its children were drawn from
    computed: bool = False  # the draft ran it, so its K/V is in the draft cache


@dataclass
class DAG:
    nodes: list[Node]
    merged: int = 0  # children that became edges to existing nodes

    def ancestors(self, i: int) -> set[int]:
        """Every node with a path to i (through any parent), i excluded."""
        seen, todo = set(), list(self.nodes[i].in_edges)
        while todo:
            j = todo.pop()
            if j not in seen:
                seen.add(j)
                todo.extend(self.nodes[j].in_edges)
        return seen

    def context(self, i: int, n: int) -> list[int]:
        """The tokens of i's n nearest ancestors along its draft context (nearest first)."""
        out = []
        while len(out) < n and self.nodes[i].parent >= 0:
            i = self.nodes[i].parent
            out.append(self.nodes[i].token)
        return out

    def add_child(
        self, parent: int, token: int, prob: float, p: GSDParams, expandable: bool
    ) -> tuple[int, bool]:
        """Attach `token` under `parent`: as an edge to a matching existing node, or a new node.
        Returns (the node now under `parent`, whether it is new)."""
        if p.tau >= 0:
            want = [self.nodes[parent].token] + self.context(parent, p.tau)
            want = want[: p.tau]
            blocked = self.ancestors(parent) | {parent}
            for j, n in enumerate(self.nodes):
                if j in blocked or n.token != token or j == 0:
                    continue
                if self.context(j, p.tau) == want:
                    self.nodes[parent].children.append(j)
                    n.in_edges.append(parent)
                    self.merged += 1
                    return j, False
        par = self.nodes[parent]
        node = Node(token, parent, par.depth + 1, par.path_prob * prob, expandable)
        node.in_edges.append(parent)
        self.nodes.append(node)
        par.children.append(len(self.nodes) - 1)
        return len(self.nodes) - 1, True


@dataclass
class Tree:
    """A DAG unfolded into a token tree (BFS order, node 0 = root)."""

    tokens: list[int]
    parents: list[int]
    dag_ids: list[int]  # the DAG node each tree node copies

    def depth(self, i: int) -> int:
        d = 0
        while self.parents[i] >= 0:
            i, d = self.parents[i], d + 1
        return d


def unfold(dag: DAG, budget: int, max_depth: int) -> Tree:
    """BFS from the root over DAG edges, duplicating merged subtrees, at most `budget` nodes and
    `max_depth` levels below the root."""
    tree = Tree([dag.nodes[0].token], [-1], [0])
    depth = [0]
    head = 0
    while head < len(tree.tokens):
        if depth[head] < max_depth:
            for child in dag.nodes[tree.dag_ids[head]].children:
                if len(tree.tokens) >= budget:
                    return tree
                tree.tokens.append(dag.nodes[child].token)
                tree.parents.append(head)
                tree.dag_ids.append(child)
                depth.append(depth[head] + 1)
        head += 1
    return tree


def sampling_depth(p: GSDParams) -> int:
    """The deepest level whose full k-ary unfolding fits the node budget (value-independent)."""
    depth, total, level = 0, 1, 1
    while depth < p.max_depth:
        level *= p.k
        if total + level > p.node_budget:
            break
        total += level
        depth += 1
    return max(depth, 1)


class ModelDraft:
    """A draft model with its own KV cache (a Worker kept across calls, with its own prefix
    cache), drafting DAGs for a batch of streams at once. A stream's draft row holds the K/V of
    its context's first `lengths[row]` tokens; each round first catches up on the rest."""

    def __init__(self, worker, vocab_size: int | None = None):
        self.worker = worker
        self.model, self.cache = worker.model, worker.cache
        # The target's vocabulary: a draft whose embedding has extra padding rows (or fewer) is
        # cut (or padded with -inf) to it, so it never proposes an id the target cannot score.
        self.vocab_size = vocab_size or self.model.cfg.vocab_size

    def _fit(self, logits: torch.Tensor) -> torch.Tensor:
        extra = self.vocab_size - logits.shape[-1]
        if extra <= 0:
            return logits[..., : self.vocab_size]
        return torch.nn.functional.pad(logits, (0, extra), value=float("-inf"))

    def _join(self, streams) -> None:
        """A draft row for each stream that has none: a fork's shares its parent's draft row up
        to where the two sequences agree; others fork the draft's prefix cache."""
        new = [s for s in streams if s.state is None]
        for s in [s for s in new if s.parent is not None and s.parent.state is not None]:
            src = s.parent.state
            n = min(self.cache.lengths[src], _common_prefix_len(s.context, s.parent.context),
                    len(s.context) - 1)
            s.state = self.worker.allocate_fork(src, n) if n > 0 else self.worker.allocate()
        new = [s for s in new if s.state is None]
        if new:
            for s, row in zip(new, self.worker.rows_for([s.context for s in new])):
                s.state = row
        need = max(len(s.context) + s.params.max_new_tokens for s in streams)
        self.worker.ensure_capacity(need + 65)  # the largest draft tree and its root

    def leave(self, s) -> None:
        if s.state is not None:
            self.worker.prefixes.insert(s.context[: self.cache.lengths[s.state]], s.state)
            s.state = None

    def draft_for(self, streams, p: GSDParams) -> list[DAG]:
        self._join(streams)
        rows = [s.state for s in streams]
        pending = [s.context[self.cache.lengths[r]:] for s, r in zip(streams, rows)]
        return self.draft(rows, pending, p, [s.params for s in streams],
                          [s.generator for s in streams])

    def draft(
        self,
        rows: Sequence[int],
        pending: Sequence[Sequence[int]],  # per sequence: tokens not yet in the draft cache; the
        p: GSDParams,  # last one is the root
        params: Sequence[SamplingParams],  # per sequence
        generators: Sequence[torch.Generator | None],
    ) -> list[DAG]:
        cache = self.cache
        # Level 0: catch up on the pending tokens; the root's logits seed the DAG.
        logits = self._fit(self.worker.executor.prefill(rows, pending))  # [B, V]
        cache.extend(rows, [len(t) - 1 for t in pending])  # the root stays pending (node 0)
        dags = [DAG([Node(t[-1], -1, 0, 1.0, True, in_edges=[], computed=True)]) for t in pending]
        depths = [p.max_depth if q.greedy else sampling_depth(p) for q in params]
        frontier = [[0] for _ in rows]
        scores = {b: logits[b, None] for b in range(len(rows))}  # b -> [F, V] at its frontier
        for depth in range(max(depths)):
            for b in scores:
                dag, grown = dags[b], []
                for f, node_id in enumerate(frontier[b]):
                    grown += self._expand(dag, node_id, scores[b][f], p, params[b], generators[b],
                                          depth + 1 < depths[b])
                frontier[b] = [i for i in grown if dag.nodes[i].expandable]
            live = [b for b in range(len(rows)) if frontier[b] and depth + 1 < depths[b]]
            if not live:
                break
            scored = self._score([rows[b] for b in live], [dags[b] for b in live],
                                 [frontier[b] for b in live])
            scores = {b: scored[j] for j, b in enumerate(live)}
        return dags

    def _expand(self, dag, node_id, logits, p, params, gen, may_expand) -> list[int]:
        """Draw/choose node_id's children from the draft's logits there."""
        node = dag.nodes[node_id]
        if params.greedy:
            probs = torch.softmax(logits.float(), -1)
            top = probs.topk(p.k)
            keep = top.values >= p.sibling_threshold * top.values[0]
            cands = list(zip(top.indices[keep].tolist(), top.values[keep].tolist()))
        else:
            q = probabilities(logits, params)
            node.q = q
            draws = torch.multinomial(q, p.k, replacement=True, generator=gen).tolist()
            cands = [(t, float(q[t])) for t in draws]
        made = []
        for token, prob in cands:
            # The draft budget (greedy only binds here: when sampling, the depth cut already keeps
            # the whole k-ary tree within the budget, so no draw is dropped by a count).
            if len(dag.nodes) >= p.node_budget:
                break
            expandable = may_expand and node.path_prob * prob >= p.prob_threshold
            child, is_new = dag.add_child(node_id, token, prob, p, expandable)
            if is_new:
                made.append(child)
        return made

    def _score(self, rows, dags, frontier) -> torch.Tensor:
        """One draft forward over every frontier node: [B, F, V] logits."""
        width = max(len(f) for f in frontier)
        window = max(len(d.nodes) for d in dags)
        batch = len(rows)
        starts = [self.cache.lengths[r] for r in rows]
        tokens = [[dags[b].nodes[i].token for i in f] for b, f in enumerate(frontier)]
        slots = torch.zeros(batch, width, dtype=torch.long)
        positions = torch.zeros(batch, width, dtype=torch.long)
        tree = torch.zeros(batch, width, window, dtype=torch.bool)
        for b, f in enumerate(frontier):
            for j, i in enumerate(f):
                dags[b].nodes[i].computed = True
                slots[b, j] = starts[b] + i
                positions[b, j] = starts[b] + dags[b].nodes[i].depth
                chain = i
                while chain >= 0:  # a node sees its draft context: itself and its parent chain
                    tree[b, j, chain] = True
                    chain = dags[b].nodes[chain].parent
            tree[b, len(f):, 0] = True  # padding queries see the root (their output is unused)
        return self._fit(self.worker.executor.draft(rows, tokens, tree, positions, slots))

    def accepted(self, rows: Sequence[int], dags: Sequence[DAG], trees: Sequence[Tree],
                 paths: Sequence[list[int]]) -> None:
        """Keep the K/V the draft computed in the accepted path's own context (the next round
        catches up on the emitted tokens past it)."""
        for row, dag, tree, path in zip(rows, dags, trees, paths):
            start = self.cache.lengths[row]
            # The root, then each path node the draft ran under the previous kept node (a node
            # reached through a merge edge was computed in another context; a leaf never ran).
            keep = [0]
            for node in path:
                d = tree.dag_ids[node]
                if dag.nodes[d].parent != keep[-1] or not dag.nodes[d].computed:
                    break
                keep.append(d)
            self.cache.commit(row, [start + d for d in keep])


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


class NgramTable:
    """The most frequent next tokens after each context of up to `order` tokens, counted over a
    corpus (for the default model: its own answers; train/ngram.py writes it), as a second source
    of draft hypotheses beside prompt lookup: phrases the model habitually writes, such as list and
    closing formulas, that the current prompt has not shown yet."""

    def __init__(self, next_tokens: dict[tuple[int, ...], list[int]], order: int):
        self.next_tokens, self.order = next_tokens, order

    def next(self, context: Sequence[int]) -> list[int]:
        """Next tokens after the longest suffix of `context` that the table knows."""
        for n in range(min(self.order, len(context)), 0, -1):
            found = self.next_tokens.get(tuple(context[-n:]))
            if found:
                return found
        return []

    def paths(self, context: Sequence[int], depth: int, width: int) -> list[list[int]]:
        """Up to `width` continuations of `depth` tokens: a beam that branches on every known next
        token, most frequent first."""
        paths: list[list[int]] = [[]]
        ctx = list(context)
        for _ in range(depth):
            grown = [p + [t] for p in paths for t in self.next(ctx + p)]
            if not grown:
                break
            paths = grown[:width]
        return [p for p in paths if p]


class NgramDraft:
    """N-gram drafting, no model: continuations of earlier occurrences of the last n tokens (prompt
    lookup), plus, given a `table`, the continuations it predicts. They are laid into the DAG by
    the same rules as a model's hypotheses: each node keeps at most k distinct next tokens (so k=1
    drafts one chain, the first continuation), a token that recurs elsewhere in the DAG with the
    same tau ancestors becomes an edge to it (tau=-1: a plain trie), and drafting stops at the node
    budget. When sampling, only the first continuation is proposed, since its draft distribution
    is a point mass and the multi-candidate rule needs one per parent."""

    def __init__(
        self,
        max_ngram: int = 3,
        min_ngram: int = 1,
        max_matches: int = 4,
        table: NgramTable | None = None,
    ):
        self.max_ngram, self.min_ngram, self.max_matches = max_ngram, min_ngram, max_matches
        self.table = table

    def continuations(self, context: Sequence[int], depth: int) -> list[list[int]]:
        """Up to max_matches continuations (most recent match first) of the longest n-gram suffix
        of `context` that occurred before."""
        ctx = list(context)
        for n in range(min(self.max_ngram, len(ctx) - 1), self.min_ngram - 1, -1):
            suffix = ctx[-n:]
            found = []
            for i in range(len(ctx) - n - 1, -1, -1):
                if ctx[i : i + n] == suffix:
                    cont = ctx[i + n : i + n + depth]
                    if cont and cont not in found:
                        found.append(cont)
                    if len(found) == self.max_matches:
                        break
            if found:
                return found
        return []

    def draft(self, context: Sequence[int], p: GSDParams, params: SamplingParams) -> DAG:
        """context ends with the root."""
        dag = DAG([Node(context[-1], -1, 0, 1.0, True, in_edges=[])])
        conts = self.continuations(context, p.max_depth)
        if self.table is not None:
            conts += [c for c in self.table.paths(context, p.max_depth, self.max_matches)
                      if c not in conts]
        if not params.greedy:
            conts = conts[:1]
        for cont in conts:
            at = 0
            for tok in cont:
                node = dag.nodes[at]
                known = [c for c in node.children if dag.nodes[c].token == tok]
                if known:
                    at = known[0]
                    continue
                if len(node.children) >= p.k or len(dag.nodes) >= p.node_budget:
                    break
                at, _ = dag.add_child(at, tok, 1.0, p, expandable=True)
        return dag
