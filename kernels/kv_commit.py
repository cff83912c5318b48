"""KV commit after a tree verification: move the accepted path's K/V into contiguous slots.

Cache k, v [L, R, Hkv, C, D]. A verify step wrote the K/V of every tree node of sequence b into
slots of row rows[b] at or after its committed length starts[b]. The accepted root-to-leaf path has
n_accept[b] nodes at slots src_slots[b, :n_accept[b]] (path order); committing moves them to
slots starts[b], starts[b] + 1, ...:
    for l, h, j < n_accept[b]:
        cache[l, rows[b], h, starts[b] + j] = cache[l, rows[b], h, src_slots[b, j]]
in every layer at once, for k and v.

The copy is in place and source and destination ranges overlap. Let s = starts[b], src_j =
src_slots[b, j], dst_j = s + j. The nodes sit in topological order, so along a root-to-leaf path
the slots strictly increase and src_j >= s + j = dst_j. Hence
  - a write never clobbers a LATER source: for k > j, src_k >= s + k > s + j = dst_j;
  - a write may clobber an EARLIER source (src = [s+1, s+3]: step 0 reads s+1, step 1 writes s+1),
    which is harmless only if step k's read happens before step j's write for every k < j.
The kernel therefore walks j in increasing order within one program (read src_j, then write dst_j),
and each program owns a disjoint (b, l, h, D-block) region, so no other program touches its slots.
Within the program, a loaded row and the store of it share one layout, so element d is read and
written by the same thread (replicated lanes are masked out of stores), whose program order puts
its read of src_k before its write of dst_j. Reading ahead (a compiler hoisting later loads above
earlier stores) is also safe, by the first point. Rows must be distinct across the batch.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl

    jit = triton.jit
except ImportError:  # CPU-only install: the ref below still works, the launcher raises
    triton = tl = None

    def jit(fn):
        return fn


def kv_commit_ref(
    k: torch.Tensor,  # [L, R, Hkv, C, D], updated in place
    v: torch.Tensor,  # [L, R, Hkv, C, D], updated in place
    rows: torch.Tensor,  # [B] int64 cache row of each sequence
    starts: torch.Tensor,  # [B] int64 committed length before the step
    src_slots: torch.Tensor,  # [B, A] int64 slots of the accepted nodes in path order (padded)
    n_accept: torch.Tensor,  # [B] int64 accepted nodes, <= A
) -> None:
    """Pure torch: per sequence, gather all accepted slots, then scatter them to the new ones."""
    for b in range(rows.shape[0]):
        n = int(n_accept[b])
        row, start = int(rows[b]), int(starts[b])
        src = src_slots[b, :n].to(device=k.device, dtype=torch.long)
        dst = torch.arange(start, start + n, device=k.device)
        for cache in (k, v):
            cache[:, row, :, dst] = cache[:, row, :, src]  # the gather copies before the scatter


@jit
def _kv_commit_kernel(
    k_ptr,  # [L, R, Hkv, C, D] key cache, updated in place
    v_ptr,  # [L, R, Hkv, C, D] value cache, same strides as k
    rows_ptr,  # [B] cache row of each sequence
    starts_ptr,  # [B] committed length of each sequence before the step
    src_ptr,  # [B, A] accepted slots in path order, strictly increasing, src[b, j] >= starts[b] + j
    n_ptr,  # [B] accepted nodes per sequence (<= A); entries j >= n of src are never read
    stride_l,  # elements between layers of the cache
    stride_r,  # elements between rows
    stride_h,  # elements between kv heads
    stride_c,  # elements between slots
    stride_src,  # elements between batch entries of src
    Hkv,  # kv heads
    D,  # head dim
    A,  # padded path length (columns of src)
    BLOCK_D: tl.constexpr,  # head-dim elements per program (power of two)
):
    pid = tl.program_id(0)  # one (l, h) pair per program along axis 0
    layer = (pid // Hkv).to(tl.int64)
    h = (pid % Hkv).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)  # one sequence along axis 1
    cols = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)  # head-dim block along axis 2

    row = tl.load(rows_ptr + b).to(tl.int64)
    start = tl.load(starts_ptr + b).to(tl.int64)
    n = tl.load(n_ptr + b)
    base = layer * stride_l + row * stride_r + h * stride_h + cols
    # Sequential in j (see the module docstring): read src_j, then write dst_j = start + j.
    # The loop runs to the static bound A with a mask, not to the loaded n.
    for j in range(0, A):
        active = j < n
        src = tl.load(src_ptr + b * stride_src + j, mask=active, other=0).to(tl.int64)
        mask = cols < tl.where(active, D, 0)  # no columns once j >= n
        src_offs = base + src * stride_c
        dst_offs = base + (start + j) * stride_c
        kj = tl.load(k_ptr + src_offs, mask=mask)
        vj = tl.load(v_ptr + src_offs, mask=mask)
        tl.store(k_ptr + dst_offs, kj, mask=mask)
        tl.store(v_ptr + dst_offs, vj, mask=mask)


def kv_commit_(
    k: torch.Tensor,  # [L, R, Hkv, C, D], updated in place
    v: torch.Tensor,  # [L, R, Hkv, C, D], same shape, dtype and strides as k
    rows: torch.Tensor,  # [B] int64, distinct
    starts: torch.Tensor,  # [B] int64
    src_slots: torch.Tensor,  # [B, A] int64, src[b, j] >= starts[b] + j, increasing in j
    n_accept: torch.Tensor,  # [B] int64, <= A, starts[b] + n_accept[b] <= C
) -> None:
    """Commit the accepted paths of all sequences in all layers and heads, in one launch.

    Index bounds and the path property are the caller's contract; they are not checked on the
    device (that would need a host sync). Padded entries src_slots[b, j >= n_accept[b]] are ignored.
    """
    where = "kernels/kv_commit.py: kv_commit_"
    if triton is None:
        raise RuntimeError(f"{where} needs the `triton` package (not installed); use kv_commit_ref")
    if not k.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"{where} runs on CUDA tensors (or on the CPU under TRITON_INTERPRET=1);"
                           f" got k on {k.device}")
    if k.dim() != 5 or k.stride(-1) != 1:
        raise ValueError(f"{where}: k must be [L, R, Hkv, C, D] with a contiguous last dim; "
                         f"got {tuple(k.shape)} strides {k.stride()}")
    if v.shape != k.shape or v.stride() != k.stride() or v.dtype != k.dtype \
            or v.device != k.device:
        raise ValueError(f"{where}: v must match k {tuple(k.shape)} {k.dtype} strides {k.stride()} "
                         f"on {k.device}; got {tuple(v.shape)} {v.dtype} strides {v.stride()} "
                         f"on {v.device}")
    if src_slots.dim() != 2:
        raise ValueError(f"{where}: src_slots must be [B, A]; got {tuple(src_slots.shape)}")
    B, A = src_slots.shape
    for name, t, shape in (("rows", rows, (B,)), ("starts", starts, (B,)),
                           ("src_slots", src_slots, (B, A)), ("n_accept", n_accept, (B,))):
        if t.shape != shape or t.dtype != torch.int64 or not t.is_contiguous() \
                or t.device != k.device:
            raise ValueError(f"{where}: {name} must be a contiguous int64 tensor of shape {shape} "
                             f"on {k.device}; got {tuple(t.shape)} {t.dtype} on {t.device}")
    L, _, Hkv, _, D = k.shape
    if B == 0 or A == 0 or k.numel() == 0:
        return
    BLOCK_D = min(triton.next_power_of_2(D), 256)
    grid = (L * Hkv, B, triton.cdiv(D, BLOCK_D))
    _kv_commit_kernel[grid](
        k, v, rows, starts, src_slots, n_accept,
        k.stride(0), k.stride(1), k.stride(2), k.stride(3), src_slots.stride(0),
        Hkv, D, A,
        BLOCK_D=BLOCK_D, num_warps=1 if BLOCK_D <= 128 else 2,
    )
