"""Runs a model's forward steps: eagerly with exact shapes, or by replaying static plans.

Static plans (graph/plan.py) are the GPU path: each (step kind, batch bucket, width) is built once,
captured as a CUDA graph on first use, and replayed with new inputs copied into its buffers, so a
decode or verify step costs one graph launch instead of hundreds of kernel launches. On the CPU the
executor runs the forward directly on exact shapes (no launch overhead to amortise there).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..graph.model import Transformer
from ..graph.plan import DRAFT_WINDOW, StepKind, StepPlan, batch_bucket, build_step_plan
from .kv_cache import KVCache, KVCacheError


class Executor:
    def __init__(
        self,
        model: Transformer,
        cache: KVCache,
        static: bool | None = None,  # default: static plans on CUDA, eager elsewhere
        cuda_graphs: bool | None = None,  # default: capture static plans on CUDA
    ):
        on_cuda = model.device.type == "cuda"
        self.model, self.cache = model, cache
        self.static = on_cuda if static is None else static
        self.cuda_graphs = self.static and on_cuda if cuda_graphs is None else cuda_graphs
        self.plans: dict[tuple, StepPlan] = {}  # (kind, bucket, width, layers) -> plan
        self.cache_version = cache.version  # the plans point into this version of the storage
        # Padding sequences of a bucket write their K/V into this row, which nothing reads. It is
        # taken on the first static step (the cache may still have no rows when this is built).
        self.scratch_row: int | None = None

    def close(self) -> None:
        if self.scratch_row is not None:
            self.cache.free(self.scratch_row)
            self.scratch_row = None

    # --- steps ------------------------------------------------------------------------------
    def prefill(
        self,
        rows: Sequence[int],
        tokens: Sequence[Sequence[int]],
        embeds: Sequence[torch.Tensor | None] | None = None,  # per sequence [<= n_new, d] or None
    ) -> torch.Tensor:
        """Ragged runs of new tokens (prompts, a fork's first tokens) -> logits [B, V] at each
        sequence's last one. Always eager: prompt shapes vary too much to keep a plan per shape.
        `embeds[b]`, if given, is added to the embeddings of sequence b's first new tokens (LLM-to-
        SLM's projected prompt states); the tokens it does not cover get nothing added."""
        step = self.cache.make_step(rows, tokens)
        extra = None
        if embeds is not None and any(e is not None for e in embeds):
            m = self.model
            extra = torch.zeros(step.batch, step.width, m.cfg.hidden_size, dtype=m.dtype,
                                device=m.device)  # [B, T, d]
            for b, e in enumerate(embeds):
                if e is not None:
                    n = min(len(e), len(tokens[b]))
                    extra[b, :n] = e[:n]
        return self.model.forward(step, self.cache, input_embeds=extra)

    def decode(
        self,
        rows: Sequence[int],
        tokens: Sequence[int],
        layers: Sequence[int] | None = None,  # a SkipDecode layer list; None = every layer
    ) -> torch.Tensor:
        """One new token per sequence -> next-token logits [B, V] (K/V written, not yet kept)."""
        if not self.static:
            step = self.cache.make_step(rows, [[t] for t in tokens])
            return self.model.forward(step, self.cache, layers)
        plan = self._plan(StepKind.DECODE, len(rows), 1, layers)
        plan.load(list(rows), self._starts(rows, 1), torch.tensor(tokens)[:, None],
                  kv_rows=self.cache.shared_rows(rows, self.cache.capacity),
                  scratch_row=self.scratch_row)
        self._run(plan)
        return plan.logits[: len(rows)]

    def verify(
        self,
        rows: Sequence[int],
        tokens: torch.Tensor,  # [B, N] int64 tree nodes (padded)
        tree: torch.Tensor,  # [B, N, N] bool visibility (node sees itself and its ancestors)
        n_nodes: Sequence[int],
    ) -> torch.Tensor:  # [B, N, V] logits at every node
        """A token tree per sequence in one step (K/V of every node written at starts + i)."""
        width = tokens.shape[1]
        if not self.static:
            toks = [tokens[b, :n].tolist() for b, n in enumerate(n_nodes)]
            trees = torch.zeros(len(rows), width, width, dtype=torch.bool)
            trees[:] = torch.eye(width, dtype=torch.bool)
            for b, n in enumerate(n_nodes):
                trees[b, :n, :n] = tree[b, :n, :n]
            step = self.cache.make_step(rows, toks, tree=trees[:, : max(n_nodes), : max(n_nodes)],
                                        logits="all")
            return self.model.forward(step, self.cache)
        plan = self._plan(StepKind.VERIFY, len(rows), width)
        plan.load(list(rows), self._starts(rows, width), tokens, tree=tree, n_new=list(n_nodes),
                  kv_rows=self.cache.shared_rows(rows, self.cache.capacity),
                  scratch_row=self.scratch_row)
        self._run(plan)
        return plan.logits[: len(rows)]

    def draft(
        self,
        rows: Sequence[int],
        tokens: Sequence[Sequence[int]],  # per sequence: the new draft nodes' tokens
        tree: torch.Tensor,  # [B, T, W] bool: node i sees pending slot starts + j (W <= 64)
        positions: torch.Tensor,  # [B, T] int64
        slots: torch.Tensor,  # [B, T] int64: where each new node's K/V goes
    ) -> torch.Tensor:  # [B, T, V] logits at every new node
        """One level of a draft tree (GSD's draft model): new nodes at given slots of a pending
        window of nodes written by earlier levels."""
        if not self.static:
            step = self.cache.make_step(rows, tokens, tree=tree, logits="all",
                                        positions=positions, slots=slots)
            return self.model.forward(step, self.cache)
        width = max(len(t) for t in tokens)
        plan = self._plan(StepKind.DRAFT, len(rows), batch_bucket(width))
        padded = torch.zeros(len(rows), plan.width, dtype=torch.long)
        for b, t in enumerate(tokens):
            padded[b, : len(t)] = torch.as_tensor(t)
        grow = (0, plan.width - tree.shape[1])
        plan.load(list(rows), self._starts(rows, DRAFT_WINDOW), padded,
                  tree=torch.nn.functional.pad(tree, (0, 0) + grow),
                  n_new=[len(t) for t in tokens],
                  kv_rows=self.cache.shared_rows(rows, self.cache.capacity),
                  scratch_row=self.scratch_row,
                  positions=torch.nn.functional.pad(positions, grow),
                  slots=torch.nn.functional.pad(slots, grow))
        self._run(plan)
        return plan.logits[: len(rows), :width]

    # --- plans ------------------------------------------------------------------------------
    def _starts(self, rows: Sequence[int], width: int) -> list[int]:
        starts = [self.cache.lengths[r] for r in rows]
        for r, s in zip(rows, starts):
            if s + width > self.cache.capacity:
                raise KVCacheError(
                    f"KV cache exhausted: row {r} holds {s} tokens and the step adds {width}, "
                    f"past its capacity of {self.cache.capacity}"
                )
        return starts

    def _plan(
        self, kind: StepKind, batch: int, width: int, layers: Sequence[int] | None = None
    ) -> StepPlan:
        if self.scratch_row is None:
            if not self.cache.free_rows:
                self.cache.reserve(self.cache.rows + 1, self.cache.capacity)
            self.scratch_row = self.cache.allocate()
        if self.cache.version != self.cache_version:  # the cache grew: its storage moved
            self.plans.clear()
            self.cache_version = self.cache.version
        key = (kind, batch_bucket(batch), width, None if layers is None else tuple(layers))
        if key not in self.plans:
            self.plans[key] = build_step_plan(
                kind, self.model.ops.backend, key[1], width, self.cache.capacity,
                self.model.cfg.vocab_size, self.model.device, layers=key[3],
            )
        return self.plans[key]

    def _forward_into(self, plan: StepPlan) -> None:
        plan.logits.copy_(self.model.forward(plan.step, self.cache, plan.layers))

    def _run(self, plan: StepPlan) -> None:
        if plan.graph is not None:
            plan.graph.replay()
            return
        if not self.cuda_graphs:
            self._forward_into(plan)
            return
        # Warm up on a side stream (compiles the Triton kernels), then capture. The warm-up
        # writes the same K/V the replay will, into the same slots.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward_into(plan)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._forward_into(plan)
        plan.graph = graph
        graph.replay()
