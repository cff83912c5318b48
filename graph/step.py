"""One forward step's input: the new tokens, where they sit, and what each of them may see.

A step runs B sequences with up to T new tokens each. Sequence b lives in KV-cache row rows[b]; its
committed tokens occupy cache slots [0, starts[b]) and its n_new[b] new tokens are written to slots
starts[b] + j (j < n_new[b]). New token i of sequence b sees
    every committed slot s < starts[b]          (the prefix; possibly shared with another row)
    and new token j when tree[b, i, j]          (causal: j <= i; a tree: j is i or an ancestor)
Positions (for RoPE) are given per token: starts[b] + i for a chain, starts[b] + depth for a tree.

This one description covers causal prefill, single-token decode, a batch of ragged lengths, and a
tree of new tokens over a shared prefix; the forward knows nothing else about the decoding method.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass
class Step:
    tokens: torch.Tensor  # [B, T] int64, padded past n_new
    positions: torch.Tensor  # [B, T] int64 RoPE positions
    rows: torch.Tensor  # [B] int64 KV-cache rows
    starts: torch.Tensor  # [B] int64 committed length = first slot written by this step
    n_new: torch.Tensor  # [B] int64 valid new tokens per sequence (<= T)
    kv_len: int  # S = max(starts + n_new): cache slots read by this step
    # [B, T, W] bool: new token i sees pending slot starts + j iff tree[b, i, j] (W >= T). Usually
    # the pending slots are the step's own new tokens (W = T); a step that grows a tree level by
    # level (GSD's draft) also sees nodes written by earlier steps. None = causal among new tokens.
    tree: torch.Tensor | None = None
    # [B, T] the slot each new token is written to; None = starts + i (the usual layout)
    slots: torch.Tensor | None = None
    # [B, T] int64 the same visibility as bits (bit j of row i set iff i sees pending slot
    # starts + j; W <= 64), the Triton kernel's form; a plain field so a static plan can point it
    # at a buffer it refills.
    tree_bits: torch.Tensor | None = None
    # [B, S] the cache row holding slot s of sequence b, where some sequence reads a prefix stored
    # in another row (prefix sharing); None when every sequence reads only its own row.
    kv_rows: torch.Tensor | None = None
    logits_at: torch.Tensor | None = None  # [B] which new token's logits to return; None = all
    rows_contiguous: bool = False  # rows == arange(r0, r0 + B): the cache can be read as a view

    @property
    def batch(self) -> int:
        return self.tokens.shape[0]

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    def refilled(self) -> None:
        """Forget what was derived from the tensors (a static plan refills them in place)."""
        for name in ("all_valid", "uniform_start", "mask", "kv_runs"):
            self.__dict__.pop(name, None)

    @cached_property
    def all_valid(self) -> bool:
        return bool((self.n_new == self.width).all())

    @cached_property
    def uniform_start(self) -> int | None:
        """The common start slot when every sequence starts at the same slot, else None."""
        s0 = int(self.starts[0])
        return s0 if bool((self.starts == s0).all()) else None

    @cached_property
    def kv_runs(self) -> list[list[tuple[int, int, int]]] | None:
        """Per sequence, kv_rows as runs (row, first slot, end slot) of one row each: a borrowed
        prefix is then read as a few slices instead of a gather per slot (about 5x faster on the
        CPU for a few hundred slots). None without kv_rows."""
        if self.kv_rows is None:
            return None
        rows = self.kv_rows.cpu()
        ends = rows.shape[1]
        b_idx, s_idx = torch.nonzero(rows[:, 1:] != rows[:, :-1], as_tuple=True)
        cuts: list[list[int]] = [[] for _ in range(rows.shape[0])]
        for b, s in zip(b_idx.tolist(), s_idx.tolist()):
            cuts[b].append(s + 1)
        runs = []
        for b, inner in enumerate(cuts):
            bounds = [0, *inner, ends]
            runs.append([(int(rows[b, lo]), lo, hi) for lo, hi in zip(bounds, bounds[1:])])
        return runs

    @cached_property
    def mask(self) -> torch.Tensor | None:
        """[B, 1, T, S] bool visibility over cache slots (the torch backend's form); None when
        every token sees every slot (single-token decode with all sequences ending at S)."""
        if self.width == 1 and bool((self.starts + 1 == self.kv_len).all()):
            return None
        if self.tree is None:
            tree = causal_tree(self.width).to(self.starts.device).expand(self.batch, -1, -1)
            # Padding tokens (j >= n_new) are never visible to real ones: causal j <= i < n_new.
            return build_mask(self.starts, self.n_new, tree, self.kv_len)
        return build_mask(self.starts, self.n_new, self.tree, self.kv_len)


def causal_tree(width: int) -> torch.Tensor:
    """[T, T] lower-triangular visibility among a chain of T new tokens."""
    return torch.ones(width, width, dtype=torch.bool).tril()


def tree_from_parents(parents: list[int]) -> torch.Tensor:
    """[T, T] visibility for a token tree: node i sees itself and its ancestors (parents[i] < i,
    -1 for a child of the committed prefix)."""
    n = len(parents)
    vis = torch.eye(n, dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= i:
            raise ValueError(f"tree node {i} has parent {p}: parents must come before children")
        if p >= 0:
            vis[i] |= vis[p]
    return vis


def tree_depths(tree: torch.Tensor) -> torch.Tensor:
    """[..., T] depth of each node (0 for a child of the prefix) from its visibility matrix."""
    return tree.sum(-1) - 1


def build_mask(
    starts: torch.Tensor,  # [B]
    n_new: torch.Tensor,  # [B]
    tree: torch.Tensor,  # [B, T, W] bool visibility of pending slots starts + j
    kv_len: int,
) -> torch.Tensor:  # [B, 1, T, S] bool
    """Visibility of cache slots for every new token (see the module docstring)."""
    batch, width, window = tree.shape
    device = starts.device
    slot = torch.arange(kv_len, device=device)  # [S]
    rel = slot[None, :] - starts[:, None]  # [B, S] index of the slot in the pending window
    prefix = rel < 0  # [B, S]
    pending = (rel >= 0) & (rel < window)  # [B, S]
    new_vis = torch.zeros(batch, width, kv_len, dtype=torch.bool, device=device)
    b_idx, s_idx = torch.nonzero(pending, as_tuple=True)
    new_vis[b_idx, :, s_idx] = tree[b_idx, :, rel[b_idx, s_idx]]
    vis = prefix[:, None, :] | new_vis  # [B, T, S]
    # Padding queries (i >= n_new) see slot 0 so their softmax stays finite; their output is unused.
    pad_q = torch.arange(width, device=device)[None, :] >= n_new[:, None]  # [B, T]
    vis[:, :, 0] |= pad_q
    return vis[:, None]
