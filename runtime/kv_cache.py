"""A preallocated KV cache: rows of slots, one write path, commit/rollback, prefix sharing.

Storage is k, v [L, R, Hkv, C, D]: R rows (one per live sequence) of C slots. A row's committed
tokens sit in slots [0, length). A row may borrow its first n slots from another row (`fork`): the
shared prefix is read in place, never copied, and the lender cannot roll back below what it lends.

The forward writes the K/V of a step's new tokens (the one write path, `write`); the caller then
keeps them (`extend`), keeps only some of them in a new order (`commit`, an index copy, used after a
tree verification), or drops them (`rollback`, a length update).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..graph.config import ModelConfig
from ..graph.step import Step, tree_depths
from ..kernels.attention import tree_bits_from_mask


class KVCacheError(RuntimeError):
    """The cache cannot hold what was asked (exhausted rows or slots, bad prefix sharing)."""


class KVCache:
    def __init__(
        self,
        cfg: ModelConfig,
        rows: int,
        capacity: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ):
        # One slot past the capacity is scratch: padding tokens write there, nothing reads it, so
        # a write never needs a data-dependent shape (which CUDA-graph capture forbids).
        shape = (cfg.num_layers, rows, cfg.num_kv_heads, capacity + 1, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.capacity = capacity
        self.lengths = [0] * rows
        self.lender: list[tuple[int, int] | None] = [None] * rows  # row -> (src row, n slots)
        self.lent = [0] * rows  # slots of this row that other rows read
        self.borrowers = [0] * rows
        self.free_rows = list(range(rows - 1, -1, -1))
        self.device = torch.device(device)

    # --- rows -------------------------------------------------------------------------------
    def allocate(self) -> int:
        if not self.free_rows:
            raise KVCacheError(
                f"KV cache exhausted: all {len(self.lengths)} rows are in use "
                "(raise max_batch when loading the model)"
            )
        row = self.free_rows.pop()
        self.lengths[row], self.lender[row], self.lent[row] = 0, None, 0
        return row

    def fork(self, src: int, n: int) -> int:
        """A new row whose first n slots are src's first n (read in place, not copied)."""
        if not 0 < n <= self.lengths[src]:
            raise KVCacheError(f"cannot share {n} slots of row {src}: it holds {self.lengths[src]}")
        row = self.allocate()
        self.lender[row] = (src, n)
        self.lengths[row] = n
        self.lent[src] = max(self.lent[src], n)
        self.borrowers[src] += 1
        return row

    def free(self, row: int) -> None:
        if self.borrowers[row]:
            raise KVCacheError(f"row {row} still lends its prefix to {self.borrowers[row]} rows")
        if self.lender[row] is not None:
            src = self.lender[row][0]
            self.borrowers[src] -= 1
            if not self.borrowers[src]:
                self.lent[src] = 0
        self.lender[row] = None
        self.lengths[row] = 0
        self.free_rows.append(row)

    # --- length updates ---------------------------------------------------------------------
    def extend(self, rows: Sequence[int], counts: Sequence[int]) -> None:
        """Keep the K/V just written for `counts[i]` new tokens of `rows[i]`."""
        for row, n in zip(rows, counts):
            self.lengths[row] += int(n)

    def rollback(self, row: int, length: int) -> None:
        if length < self.lent[row]:
            raise KVCacheError(
                f"cannot roll row {row} back to {length}: "
                f"its first {self.lent[row]} slots are shared"
            )
        if length > self.lengths[row]:
            raise KVCacheError(
                f"cannot roll row {row} forward from {self.lengths[row]} to {length}"
            )
        self.lengths[row] = length

    def commit(self, row: int, src_slots: torch.Tensor | Sequence[int]) -> None:
        """Move the K/V at `src_slots` (written by the last step) to the slots right after the
        committed length, in order, and keep them. One index copy over all layers."""
        src = torch.as_tensor(src_slots, dtype=torch.long, device=self.device)
        start = self.lengths[row]
        if len(src) and int(src.min()) < start:
            raise KVCacheError(f"commit of row {row} reads slot {int(src.min())} < length {start}")
        dst = torch.arange(start, start + len(src), device=self.device)
        for cache in (self.k, self.v):
            cache[:, row, :, dst] = cache[:, row, :, src]  # the gather copies before the scatter
        self.lengths[row] = start + len(src)

    # --- steps ------------------------------------------------------------------------------
    def make_step(
        self,
        rows: Sequence[int],
        tokens: Sequence[Sequence[int]] | torch.Tensor,
        tree: torch.Tensor | None = None,
        logits: str = "last",
        positions: torch.Tensor | None = None,
        slots: torch.Tensor | None = None,
    ) -> Step:
        """The Step that appends `tokens[i]` after the committed tokens of `rows[i]`.

        tree: [T, T] or [B, T, T] visibility among the new tokens (see graph/step.py), or
        [B, T, W] over a pending window of W >= T slots when `slots` places the new tokens inside
        it (positions must then be given); None means causal. logits: "last" (each sequence's
        last new token) or "all".
        """
        batch = len(rows)
        if isinstance(tokens, torch.Tensor):
            tok = tokens.to(self.device, torch.long)
            n_new = torch.full((batch,), tok.shape[1], dtype=torch.long)
        else:
            n_new = torch.tensor([len(t) for t in tokens], dtype=torch.long)
            tok = torch.zeros(batch, int(n_new.max()), dtype=torch.long)
            for i, t in enumerate(tokens):
                tok[i, : len(t)] = torch.as_tensor(t, dtype=torch.long)
        width = tok.shape[1]
        if int(n_new.min()) < 1:
            raise KVCacheError("every sequence of a step needs at least one new token")
        starts = torch.tensor([self.lengths[r] for r in rows], dtype=torch.long)
        window = n_new if tree is None or slots is None else torch.full_like(n_new, tree.shape[-1])
        ends = starts + window
        for r, end in zip(rows, ends.tolist()):
            if end > self.capacity:
                raise KVCacheError(
                    f"KV cache exhausted: row {r} holds {self.lengths[r]} tokens and the step adds "
                    f"{end - self.lengths[r]}, past its capacity of {self.capacity} "
                    "(raise max_seq_len when loading the model)"
                )
        kv_len = int(ends.max())
        if tree is not None:
            tree = tree.to(torch.bool).expand(batch, width, tree.shape[-1])
        if positions is None:
            if slots is not None:
                raise KVCacheError("a step with explicit slots needs explicit positions")
            if tree is None:
                positions = starts[:, None] + torch.arange(width)[None, :]
            else:
                positions = starts[:, None] + tree_depths(tree)
        rows_t = torch.tensor(list(rows), dtype=torch.long)
        dev = self.device
        kv_rows = self._shared_rows(rows, kv_len)
        return Step(
            tokens=tok.to(dev),
            positions=positions.to(dev),
            rows=rows_t.to(dev),
            starts=starts.to(dev),
            n_new=n_new.to(dev),
            kv_len=kv_len,
            tree=None if tree is None else tree.to(dev),
            tree_bits=(
                tree_bits_from_mask(tree).to(dev)
                if tree is not None and slots is None and width <= 64 and tree.shape[-1] == width
                else None
            ),
            slots=None if slots is None else slots.to(dev, torch.long),
            kv_rows=None if kv_rows is None else kv_rows.to(dev),
            logits_at=(n_new - 1).to(dev) if logits == "last" else None,
            rows_contiguous=rows_t.tolist() == list(range(rows[0], rows[0] + batch)),
        )

    def _shared_rows(self, rows: Sequence[int], kv_len: int) -> torch.Tensor | None:
        """[B, S] the row holding each slot each sequence reads, following borrowed prefixes;
        None when no sequence of the step borrows."""
        if all(self.lender[r] is None for r in rows):
            return None
        kv_rows = torch.empty(len(rows), kv_len, dtype=torch.long)
        for b, row in enumerate(rows):
            kv_rows[b] = row
            r = row
            while self.lender[r] is not None:  # a fork of a fork reads through both lenders
                r, n = self.lender[r]
                kv_rows[b, :n] = r
        return kv_rows

    # --- the forward's interface (graph/model.py KVStore) -----------------------------------
    def write(self, layer: int, step: Step, k: torch.Tensor, v: torch.Tensor) -> None:
        """k, v [B, T, Hkv, D] of the step's new tokens -> slots starts[b] + j of rows[b]."""
        batch, width = k.shape[:2]
        # Fast path: a block of rows all appending at the same slot is one slice assignment. It
        # reads tensor values on the host, so static plans (rows_contiguous=False) never take it.
        if (step.slots is None and step.rows_contiguous and step.all_valid
                and step.uniform_start is not None):
            r0, s0 = int(step.rows[0]), step.uniform_start
            self.k[layer, r0 : r0 + batch, :, s0 : s0 + width] = k.transpose(1, 2)
            self.v[layer, r0 : r0 + batch, :, s0 : s0 + width] = v.transpose(1, 2)
            return
        j = torch.arange(width, device=k.device)
        placed = step.starts[:, None] + j[None, :] if step.slots is None else step.slots
        slots = torch.where(  # [B, T]; padding tokens (j >= n_new) go to the scratch slot
            j[None, :] < step.n_new[:, None], placed, self.capacity
        )
        rows = step.rows[:, None].expand(batch, width)
        self.k[layer][rows, :, slots] = k
        self.v[layer][rows, :, slots] = v

    def read(self, layer: int, step: Step) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, Hkv, S, D] that the step's sequences may attend to."""
        kv_len = step.kv_len
        if step.kv_rows is not None:
            slots = torch.arange(kv_len, device=self.device)
            k = self.k[layer][step.kv_rows, :, slots]  # [B, S, Hkv, D]
            v = self.v[layer][step.kv_rows, :, slots]
            return k.transpose(1, 2), v.transpose(1, 2)
        if step.rows_contiguous:
            r0 = int(step.rows[0])
            rows = slice(r0, r0 + step.batch)
            return self.k[layer, rows, :, :kv_len], self.v[layer, rows, :, :kv_len]
        return self.k[layer][step.rows, :, :kv_len], self.v[layer][step.rows, :, :kv_len]
