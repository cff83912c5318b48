"""Static execution plans: a fixed-shape step, its preallocated buffers, and its ops in order.

A plan is built once per (method step, batch bucket, width) and only replayed afterwards: the
executor (runtime/executor.py) copies a step's inputs into the plan's buffers and runs the ops, as
one CUDA graph on a GPU. Every shape is fixed at build time, so
  - the batch is padded to a bucket (padding sequences write into a scratch cache row),
  - attention reads up to the cache capacity (the kernels mask past each sequence's end), and
  - a tree is padded to its envelope (padding nodes are invisible and never accepted).
On the CPU there is no launch overhead to amortise and exact shapes are cheaper, so the executor
runs eagerly there and needs no plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

import torch

from .backend import Backend
from .step import Step

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class StepKind(str, Enum):
    DECODE = "decode"  # one new token per sequence -> next-token logits
    VERIFY = "verify"  # a token tree per sequence -> logits at every node
    # a level of a draft tree: new nodes at given slots of a pending window of earlier nodes
    # (GSD's draft model) -> logits at every new node
    DRAFT = "draft"


# The ordered ops of each step kind (what the executor runs, and captures as one graph).
STEP_OPS = {
    StepKind.DECODE: ("embed", "layers", "final_norm", "lm_head"),
    StepKind.VERIFY: ("embed", "layers (tree attention)", "final_norm", "lm_head"),
    StepKind.DRAFT: ("embed", "layers (tree attention over the pending window)", "final_norm",
                     "lm_head"),
}
DRAFT_WINDOW = 64  # pending slots a draft plan's tree may see: the largest node budget


def batch_bucket(batch: int) -> int:
    for b in BATCH_BUCKETS:
        if batch <= b:
            return b
    raise ValueError(f"batch {batch} exceeds the largest plan bucket {BATCH_BUCKETS[-1]}")


@dataclass
class StepPlan:
    kind: StepKind
    backend: Backend
    batch: int  # the bucket: sequences per replay (real ones first, padding after)
    width: int  # new tokens per sequence: 1 (decode) or the tree envelope (verify)
    capacity: int  # cache slots a sequence may read: the static kv_len
    step: Step  # the forward's input, made of views of the static buffers
    logits: torch.Tensor  # [batch, V] (decode) or [batch, width, V] (verify): output buffer
    ops: tuple[str, ...]
    layers: tuple[int, ...] | None = None  # the layers the step runs (SkipDecode); None = all
    graph: object | None = None  # torch.cuda.CUDAGraph once captured

    def load(
        self,
        rows: list[int],
        starts: list[int],
        tokens: torch.Tensor,  # [b, width] int64, b <= batch
        tree: torch.Tensor | None = None,  # [b, width, width] bool (verify)
        n_new: list[int] | None = None,  # valid nodes per sequence (verify; default: width)
        kv_rows: torch.Tensor | None = None,  # [b, S] row of each slot read (prefix sharing)
        scratch_row: int = 0,
        positions: torch.Tensor | None = None,  # [b, width] (draft)
        slots: torch.Tensor | None = None,  # [b, width] where the new nodes go (draft)
    ) -> None:
        """Copy one step's inputs into the buffers; padding sequences point at `scratch_row`."""
        b = len(rows)
        s = self.step
        s.refilled()
        dev = s.tokens.device
        s.rows.fill_(scratch_row)
        s.rows[:b] = torch.as_tensor(rows, device=dev)
        s.starts.zero_()
        s.starts[:b] = torch.as_tensor(starts, device=dev)
        s.n_new.fill_(self.width)
        if n_new is not None:
            s.n_new[:b] = torch.as_tensor(n_new, device=dev)
        s.tokens.zero_()
        s.tokens[:b] = tokens.to(dev)
        s.kv_rows.copy_(s.rows[:, None].expand_as(s.kv_rows))
        if kv_rows is not None:
            s.kv_rows[:b, : kv_rows.shape[1]] = kv_rows.to(dev)
        if self.kind is StepKind.DECODE:
            s.positions.copy_(s.starts[:, None])
            return
        from ..kernels.attention import tree_bits_from_mask

        window = s.tree.shape[-1]
        if self.kind is StepKind.DRAFT:  # padding sequences: one node at slot 0 of the scratch row
            s.n_new[b:] = 1
            full = torch.zeros(self.batch, self.width, window, dtype=torch.bool, device=dev)
            full[:, :, 0] = True
            full[:b, :, : tree.shape[-1]] = tree.to(dev)
            s.slots.zero_()
            s.slots[:b] = slots.to(dev)
            s.tree.copy_(full)
            s.tree_bits.copy_(tree_bits_from_mask(full))
            s.positions.zero_()
            s.positions[:b] = positions.to(dev)
            return
        full = torch.eye(self.width, dtype=torch.bool, device=dev).expand(self.batch, -1, -1)
        full = full.clone()
        full[:b] = tree.to(dev)
        s.tree.copy_(full)
        s.tree_bits.copy_(tree_bits_from_mask(full))
        s.positions.copy_(s.starts[:, None] + (full.sum(-1) - 1))


def build_step_plan(
    kind: StepKind,
    backend: Backend,
    batch: int,
    width: int,
    capacity: int,
    vocab_size: int,
    device: torch.device | str,
    layers: tuple[int, ...] | None = None,
) -> StepPlan:
    """Preallocate every buffer of a fixed-shape step."""
    if kind is StepKind.DECODE and width != 1:
        raise ValueError("a decode step has width 1")
    if kind is not StepKind.DECODE and not 1 <= width <= 64:
        raise ValueError(f"a {kind.value} tree envelope must hold 1..64 nodes, got {width}")

    def buf(*shape, dtype=torch.long):
        return torch.zeros(shape, dtype=dtype, device=device)

    tree = tree_bits = slots = None
    if kind is StepKind.VERIFY:
        tree = buf(batch, width, width, dtype=torch.bool)
        tree_bits = buf(batch, width)
    if kind is StepKind.DRAFT:
        tree = buf(batch, width, DRAFT_WINDOW, dtype=torch.bool)
        tree_bits = buf(batch, width)
        slots = buf(batch, width)
    step = Step(
        tokens=buf(batch, width),
        positions=buf(batch, width),
        rows=buf(batch),
        starts=buf(batch),
        n_new=buf(batch),
        kv_len=capacity,
        tree=tree,
        tree_bits=tree_bits,
        slots=slots,
        # Every slot's row, so that sequences reading a shared prefix from another row replay the
        # same plan as those that do not.
        kv_rows=buf(batch, capacity),
        logits_at=buf(batch) if kind is StepKind.DECODE else None,  # index 0: the one new token
    )
    shape = (batch, vocab_size) if kind is StepKind.DECODE else (batch, width, vocab_size)
    return StepPlan(
        kind=kind,
        backend=backend,
        batch=batch,
        width=width,
        capacity=capacity,
        step=step,
        logits=buf(*shape, dtype=torch.float32),
        ops=STEP_OPS[kind],
        layers=layers,
    )
