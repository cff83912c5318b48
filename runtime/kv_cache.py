"""A preallocated KV cache: rows of slots, one write path, commit/rollback, prefix sharing.

Storage is k, v [L, R, Hkv, C, D]: R rows (one per live sequence or kept prefix) of C slots,
grown on demand (`reserve`). A row's committed tokens sit in slots [0, length). A row may borrow
its first n slots from another row (`fork`): the shared prefix is read in place, never copied, and
the lender cannot roll back below what it lends. Rows are refcounted: an owner (a stream, a
prefix-cache entry) and each borrower hold one reference, so a lender whose own sequence ends
stays readable until its last borrower is freed.

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
from ..kernels.kv_commit import kv_commit_


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
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        self.k = self.v = torch.empty(0)
        self.capacity = 0
        self.lengths: list[int] = []
        self.lender: list[tuple[int, int] | None] = []  # row -> (src row, n slots)
        self.borrowers: list[dict[int, int]] = []  # row -> {borrowing row: slots it reads}
        self.refs: list[int] = []  # owners (a stream, a prefix-cache entry) + borrowers; 0 = free
        self.free_rows: list[int] = []
        self.version = 0  # bumped when the storage is reallocated (static plans point into it)
        self.reserve(rows, capacity)

    @property
    def rows(self) -> int:
        return len(self.lengths)

    def row_bytes(self, capacity: int | None = None) -> int:
        """Bytes of K and V that one row of `capacity` slots (default: the current) takes."""
        c = self.cfg
        slots = (self.capacity if capacity is None else capacity) + 1
        return 2 * c.num_layers * c.num_kv_heads * slots * c.head_dim * self.dtype.itemsize

    def reserve(self, rows: int, capacity: int) -> None:
        """Grow the storage to at least `rows` rows of `capacity` slots, keeping every row's
        contents and ids (a reallocation and one copy; static plans must be rebuilt after it)."""
        self.resize(max(rows, self.rows), max(capacity, self.capacity))

    def resize(self, rows: int, capacity: int) -> None:
        """Reallocate to exactly `rows` rows of `capacity` slots, keeping the contents and ids of
        the rows kept. Only free rows past the last allocated one may be dropped."""
        if rows == self.rows and capacity == self.capacity:
            return
        used = [r for r in range(self.rows) if self.refs[r]]
        if used and rows <= used[-1]:
            raise KVCacheError(f"cannot shrink the cache to {rows} rows: row {used[-1]} is in use")
        if capacity < max((self.lengths[r] for r in used), default=0):
            raise KVCacheError(f"cannot shrink the cache to {capacity} slots: a row holds more")
        # One slot past the capacity is scratch: padding tokens write there, nothing reads it, so
        # a write never needs a data-dependent shape (which CUDA-graph capture forbids).
        c = self.cfg
        shape = (c.num_layers, rows, c.num_kv_heads, capacity + 1, c.head_dim)
        k = torch.zeros(shape, dtype=self.dtype, device=self.device)
        v = torch.zeros(shape, dtype=self.dtype, device=self.device)
        keep_rows, keep_slots = min(rows, self.rows), min(capacity, self.capacity)
        if keep_rows:
            k[:, :keep_rows, :, :keep_slots] = self.k[:, :keep_rows, :, :keep_slots]
            v[:, :keep_rows, :, :keep_slots] = self.v[:, :keep_rows, :, :keep_slots]
        self.k, self.v, self.capacity = k, v, capacity
        if rows < self.rows:
            for field in (self.lengths, self.lender, self.borrowers, self.refs):
                del field[rows:]
            self.free_rows = [r for r in self.free_rows if r < rows]
        added = range(self.rows, rows)
        self.lengths += [0 for _ in added]
        self.lender += [None for _ in added]
        self.borrowers += [{} for _ in added]
        self.refs += [0 for _ in added]
        self.free_rows = list(reversed(added)) + self.free_rows
        self.version += 1

    # --- rows -------------------------------------------------------------------------------
    def allocate(self) -> int:
        """A free row, owned once by the caller (`free` drops that ownership)."""
        if not self.free_rows:
            raise KVCacheError(
                f"KV cache exhausted: all {self.rows} rows are in use "
                "(raise kv_cache_mb when loading the model)"
            )
        row = self.free_rows.pop()
        self.lengths[row], self.lender[row], self.refs[row] = 0, None, 1
        return row

    def fork(self, src: int, n: int, row: int | None = None) -> int:
        """A new row (or `row`, freshly allocated) whose first n slots are src's first n, read in
        place, never copied. src stays allocated while the new row lives, even if its own owner
        frees it first."""
        if not 0 < n <= self.lengths[src]:
            raise KVCacheError(f"cannot share {n} slots of row {src}: it holds {self.lengths[src]}")
        # Borrow from the row that holds the slots: forking a fork within what it borrows would
        # pin the whole chain, and a prefix cache whose entries fork each other (the same prompts
        # answered again and again) could then evict none of them (each is borrowed from).
        while self.lender[src] is not None and self.lender[src][1] >= n:
            src = self.lender[src][0]
        row = self.allocate() if row is None else row
        self.lender[row] = (src, n)
        self.lengths[row] = n
        self.borrowers[src][row] = n
        self.refs[src] += 1
        return row

    def lent(self, row: int) -> int:
        """Slots of this row that other rows read (it cannot roll back below them)."""
        return max(self.borrowers[row].values(), default=0)

    def free(self, row: int) -> None:
        """Drop one reference to the row; it returns to the pool when no owner or borrower is
        left, and then drops its own reference to the row it borrows from."""
        if self.refs[row] <= 0:
            raise KVCacheError(f"row {row} is not allocated")
        self.refs[row] -= 1
        if self.refs[row]:
            return
        if self.lender[row] is not None:
            src = self.lender[row][0]
            del self.borrowers[src][row]
            self.free(src)
        self.lender[row] = None
        self.lengths[row] = 0
        self.free_rows.append(row)

    def in_use(self) -> int:
        return self.rows - len(self.free_rows)

    # --- length updates ---------------------------------------------------------------------
    def extend(self, rows: Sequence[int], counts: Sequence[int]) -> None:
        """Keep the K/V just written for `counts[i]` new tokens of `rows[i]`."""
        for row, n in zip(rows, counts):
            self.lengths[row] += int(n)

    def rollback(self, row: int, length: int) -> None:
        if length < self.lent(row):
            raise KVCacheError(
                f"cannot roll row {row} back to {length}: "
                f"its first {self.lent(row)} slots are shared"
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

    def commit_many(self, rows: Sequence[int], src_slots: Sequence[Sequence[int]]) -> None:
        """`commit` for several rows at once: on CUDA one Triton launch for all of them (every
        layer, head and row: kernels/kv_commit.py), elsewhere an index copy per row."""
        if not self.k.is_cuda:
            for row, src in zip(rows, src_slots):
                self.commit(row, src)
            return
        width = max(len(s) for s in src_slots)
        src = torch.zeros(len(rows), width, dtype=torch.long)
        for b, slots in enumerate(src_slots):
            src[b, : len(slots)] = torch.as_tensor(slots)
        dev = self.device
        kv_commit_(self.k, self.v, torch.tensor(list(rows), device=dev),
                   torch.tensor([self.lengths[r] for r in rows], device=dev), src.to(dev),
                   torch.tensor([len(s) for s in src_slots], device=dev))
        for row, slots in zip(rows, src_slots):
            self.lengths[row] += len(slots)

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
        kv_rows = self.shared_rows(rows, kv_len)
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
                if tree is not None and tree.shape[-1] <= 64
                and (slots is not None or tree.shape[-1] == width)
                else None
            ),
            slots=None if slots is None else slots.to(dev, torch.long),
            kv_rows=None if kv_rows is None else kv_rows.to(dev),
            logits_at=(n_new - 1).to(dev) if logits == "last" else None,
            rows_contiguous=rows_t.tolist() == list(range(rows[0], rows[0] + batch)),
        )

    def shared_rows(self, rows: Sequence[int], kv_len: int) -> torch.Tensor | None:
        """[B, S] the row holding each slot each sequence reads, following borrowed prefixes;
        None when no sequence of the step borrows."""
        if all(self.lender[r] is None for r in rows):
            return None
        kv_rows = torch.empty(len(rows), kv_len, dtype=torch.long)
        for b, row in enumerate(rows):
            kv_rows[b] = row
            r, reach = row, kv_len
            while self.lender[r] is not None:  # a fork of a fork reads through both lenders,
                r, n = self.lender[r]  # each only below what the row before it borrows
                reach = min(reach, n)
                kv_rows[b, :reach] = r
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
        if step.kv_rows is not None:  # some prefix lives in other rows: slices of its runs
            return _read_runs(self.k[layer], step.kv_runs), _read_runs(self.v[layer], step.kv_runs)
        if step.rows_contiguous:
            r0 = int(step.rows[0])
            rows = slice(r0, r0 + step.batch)
            return self.k[layer, rows, :, :kv_len], self.v[layer, rows, :, :kv_len]
        return self.k[layer][step.rows, :, :kv_len], self.v[layer][step.rows, :, :kv_len]


def _read_runs(cache: torch.Tensor, runs: list[list[tuple[int, int, int]]]) -> torch.Tensor:
    """cache [R, Hkv, C, D], per sequence its runs (row, first slot, end slot) -> [B, Hkv, S, D]."""
    per_seq = []
    for seq in runs:
        pieces = [cache[row, :, lo:hi] for row, lo, hi in seq]
        per_seq.append(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1))
    return per_seq[0].unsqueeze(0) if len(per_seq) == 1 else torch.stack(per_seq)
