"""Attention of new tokens over the KV cache, with GQA.

out[b, h, i] = softmax_s(q[b, h, i] . k[b, h // G, s] / sqrt(D) + (0 if mask[b, i, s] else -inf)) v
The mask expresses every visibility pattern the methods need (causal prefill, decode over ragged
lengths, a token tree over a shared prefix): see graph/step.py, which builds it once per step.

`attention_ref` takes gathered K/V and a dense mask (the torch backend). `tree_attention` is the
Triton kernel family that reads the cache in place. Cache k, v [R, Hkv, C, D]; sequence b owns row
rows[b]; its committed tokens are slots s < starts[b], and slots starts[b] + j, j < window[b], are
its pending window: the n_new[b] new tokens of the step (already written) and, for a step that grows
a tree level by level (GSD's draft), nodes written by earlier steps; window defaults to n_new.
Queries i < n_new[b] are the real ones. New token i of sequence b sees

    slot s < starts[b]                  always (the prefix; read from row kv_rows[b, s] if given)
    slot starts[b] + j, j < window[b]   iff bit j of tree_bits[b, i] is set (j < 64; None: j <= i)

and, in base-2 units (c = sm_scale * log2(e)), for its visible slots s = 0, 1, ...:

    x_s = c * q . k_s
    m_s = max(m_{s-1}, x_s)                       running maximum
    l_s = l_{s-1} 2^(m_{s-1} - m_s) + 2^(x_s - m_s)
    a_s = a_{s-1} 2^(m_{s-1} - m_s) + 2^(x_s - m_s) v_s
    out = a_S / l_S

done a block of BLOCK_N slots at a time (online softmax, fp32). The G = H / Hkv query heads of one
kv head read the same K/V, so a program packs its G * T query rows (row r = token r // G, head
r % G) into the M dimension of one tile: decode's G rows make the M tile (padded to 16), and K/V is
read once per kv head. Split-K (flash-decoding): when B * Hkv * (query tiles) is too few programs
to fill the GPU, the slot range is cut into splits; each program writes its partial (m, l, a) and
a second kernel merges them: m = max_p m_p, l = sum_p l_p 2^(m_p - m), a = sum_p a_p 2^(m_p - m).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl

    jit = triton.jit
except ImportError:  # CPU-only install: the refs below still work, the launchers raise
    triton = tl = None

    def jit(fn):
        return fn


def attention_ref(
    q: torch.Tensor,  # [B, H, T, D]
    k: torch.Tensor,  # [B, Hkv, S, D]
    v: torch.Tensor,  # [B, Hkv, S, D]
    mask: torch.Tensor | None,  # [B, 1, T, S] bool (True = visible), None = all visible
) -> torch.Tensor:  # [B, H, T, D]
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, enable_gqa=q.shape[1] != k.shape[1]
    )


# --- references -------------------------------------------------------------------------------
def tree_bits_from_mask(tree: torch.Tensor) -> torch.Tensor:
    """[B, T, W] or [T, W] bool visibility of the pending window (tree[..., i, j]: new token i
    sees pending slot j; W = T for a step's own tokens, W >= T for a window), W <= 64
    -> [B, T] or [T] int64 with bit j of out[..., i] set iff i sees j."""
    width = tree.shape[-1]
    if tree.dim() not in (2, 3) or width > 64:
        raise ValueError(f"kernels/attention.py: tree_bits_from_mask: tree must be [T, W] or "
                         f"[B, T, W] with W <= 64; got {tuple(tree.shape)}")
    # 2^j for j < 63, and bit 63 as int64's sign bit; the bits are distinct, so sum == or.
    weight = torch.tensor([1 << j if j < 63 else -(1 << 63) for j in range(width)],
                          dtype=torch.long, device=tree.device)
    return (tree.bool().long() * weight).sum(-1)


def mask_from_tree_bits(bits: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """[..., T] int64 bits -> [..., T, W] bool, W = window (default T; <= 64): the inverse of
    tree_bits_from_mask."""
    j = torch.arange(bits.shape[-1] if window is None else window, device=bits.device)
    return ((bits[..., :, None] >> j) & 1).bool()


def _visibility(
    starts: torch.Tensor,  # [B]
    n_new: torch.Tensor,  # [B]
    window: torch.Tensor,  # [B] pending slots (>= n_new)
    tree_bits: torch.Tensor | None,  # [B, T] or None (causal)
    width: int,  # T
    kv_len: int,  # S
) -> torch.Tensor:  # [B, T, S] bool
    """Which cache slots each new token sees (the rule in the module docstring)."""
    device = starts.device
    i = torch.arange(width, device=device)
    rel = torch.arange(kv_len, device=device)[None, :] - starts[:, None]  # [B, S] j of each slot
    pending = (rel >= 0) & (rel < window[:, None])  # [B, S]
    if tree_bits is None:
        sees = rel[:, None, :] <= i[None, :, None]  # [B, T, S]
    else:
        # Bit j of tree_bits[b, i]; the bits address the first 64 pending slots only.
        j = rel.clamp(0, 63)[:, None, :]  # [B, 1, S]
        sees = (((tree_bits[:, :, None] >> j) & 1) != 0) & (rel < 64)[:, None, :]
    vis = (rel < 0)[:, None, :] | (pending[:, None, :] & sees)
    # A padding query (i >= n_new) sees slot 0 so that its softmax stays finite; it is unused.
    pad_q = i[None, :] >= n_new[:, None]  # [B, T]
    vis[:, :, 0] |= pad_q
    return vis


def tree_attention_ref(
    q: torch.Tensor,  # [B, T, H, D]
    k_cache: torch.Tensor,  # [R, Hkv, C, D]
    v_cache: torch.Tensor,  # [R, Hkv, C, D]
    rows: torch.Tensor,  # [B] int64
    starts: torch.Tensor,  # [B] int64
    n_new: torch.Tensor,  # [B] int64
    tree_bits: torch.Tensor | None,  # [B, T] int64, None = causal
    kv_rows: torch.Tensor | None = None,  # [B, S] int64, None = rows[b] for every slot
    sm_scale: float | None = None,
    *,
    window: torch.Tensor | None = None,  # [B] int64 pending slots (>= n_new), None = n_new
) -> torch.Tensor:  # [B, T, H, D]
    """tree_attention in pure torch: gather each sequence's K/V, build the dense mask, and call
    attention_ref. Reads the lengths on the host (a sync); a reference, not a fast path."""
    batch, width = q.shape[:2]
    if window is None:
        window = n_new
    kv_len = int((starts + window).max())
    if kv_rows is None:
        k = k_cache[rows, :, :kv_len]  # [B, Hkv, S, D]
        v = v_cache[rows, :, :kv_len]
    else:
        slots = torch.arange(kv_len, device=q.device)
        k = k_cache[kv_rows[:, :kv_len], :, slots].transpose(1, 2)  # [B, Hkv, S, D]
        v = v_cache[kv_rows[:, :kv_len], :, slots].transpose(1, 2)
    mask = _visibility(starts, n_new, window, tree_bits, width, kv_len)[:, None]  # [B, 1, T, S]
    if sm_scale is not None:  # attention_ref scales by 1/sqrt(D): fold the difference into q
        q = q * (sm_scale * math.sqrt(q.shape[-1]))
    return attention_ref(q.transpose(1, 2), k, v, mask).transpose(1, 2)


# --- the Triton kernels -----------------------------------------------------------------------
@jit
def _round_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), still as fp32 (finite x only)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return bits.to(tl.float32, bitcast=True)


@jit
def _attend_block(
    acc, m_i, l_i,  # [BLOCK_M, BLOCK_D] fp32, [BLOCK_M] fp32, [BLOCK_M] fp32: the running state
    q,  # [BLOCK_M, BLOCK_D] the query tile
    k_base, v_base,  # kv head hk of slot 0 of row rows[b] (of row 0 when HAS_KV_ROWS)
    kv_rows_b,  # pointer to kv_rows[b, 0] when HAS_KV_ROWS
    stride_kvs,  # elements between slots of kv_rows
    stride_kr, stride_kc,  # k_cache strides: row, slot
    stride_vr, stride_vc,  # v_cache strides: row, slot
    lo, hi,  # this loop's slot range [lo, hi), lo a multiple of BLOCK_N
    start, window,  # the sequence's committed length and number of pending slots
    tok,  # [BLOCK_M] int32 new-token index of each query row
    bits_lo, bits_hi,  # [BLOCK_M] int32 visibility bits 0-31 and 32-63 (when HAS_TREE)
    qk_scale,  # sm_scale * log2(e)
    offs_d, d_ok,  # [BLOCK_D] head-dim offsets and their mask
    MASKED: tl.constexpr,  # slots may be new tokens or past the end: apply the visibility rule
    HAS_TREE: tl.constexpr,  # new-token visibility from bits (else causal)
    HAS_KV_ROWS: tl.constexpr,  # each slot's row from kv_rows (prefix sharing)
    IN_PREC: tl.constexpr,  # tl.dot input precision ("ieee" for fp32 inputs)
    EMULATE_BF16: tl.constexpr,  # the interpreter's bf16: see the launcher
    EVEN_D: tl.constexpr,  # D == BLOCK_D: no head-dim mask
    BLOCK_N: tl.constexpr,  # slots per step
):
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)  # [BLOCK_N] slots
        # Unmasked steps cover whole blocks of the prefix: every slot exists and is visible.
        in_range = offs_n < start + window
        if HAS_KV_ROWS:
            if MASKED:
                r = tl.load(kv_rows_b + offs_n * stride_kvs, mask=in_range, other=0)
            else:
                r = tl.load(kv_rows_b + offs_n * stride_kvs)  # [BLOCK_N] int64 rows
            k_off = r * stride_kr + offs_n * stride_kc
            v_off = r * stride_vr + offs_n * stride_vc
        else:
            k_off = offs_n * stride_kc  # within row rows[b], already in k_base
            v_off = offs_n * stride_vc
        k_ptrs = k_base + k_off[:, None] + offs_d[None, :]  # [BLOCK_N, BLOCK_D]
        v_ptrs = v_base + v_off[:, None] + offs_d[None, :]
        if MASKED:
            kv_mask = in_range[:, None] & d_ok[None, :]
            k = tl.load(k_ptrs, mask=kv_mask, other=0.0)
            v = tl.load(v_ptrs, mask=kv_mask, other=0.0)
        elif EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=d_ok[None, :], other=0.0)
            v = tl.load(v_ptrs, mask=d_ok[None, :], other=0.0)
        if EMULATE_BF16:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        x = tl.dot(q, tl.trans(k), input_precision=IN_PREC) * qk_scale  # [BLOCK_M, BLOCK_N]
        if MASKED:
            j = offs_n - start  # [BLOCK_N] index in the pending window (< 0: prefix)
            is_new = (j >= 0) & in_range
            if HAS_TREE:
                # Bit j of 64, tested in 32-bit halves (64-bit shifts cost several instructions
                # and twice the registers); a shift by < 0 or >= 32 is undefined: clamp. The bits
                # address the first 64 pending slots only.
                is_new = is_new & (j < 64)
                jj = tl.where(is_new, j, 0).to(tl.int32)
                word = tl.where((jj < 32)[None, :], bits_lo[:, None], bits_hi[:, None])
                sees = ((word >> (jj & 31)[None, :]) & 1) != 0
            else:
                sees = j[None, :] <= tok[:, None]
            visible = (j < 0)[None, :] | (is_new[None, :] & sees)
            x = tl.where(visible, x, float("-inf"))
        # m_i starts finite (-1e30), so a row with nothing visible yet gets 2^(-inf) = 0, not NaN.
        m_new = tl.maximum(m_i, tl.max(x, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(x - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if EMULATE_BF16:
            p = _round_bf16(p)  # exactly the bf16 P of the GPU path, kept in fp32
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=IN_PREC)
        m_i = m_new
    return acc, m_i, l_i


@jit
def _tree_attention_kernel(
    q_ptr,  # [B, T, H, D] queries
    k_ptr,  # [R, Hkv, C, D] key cache
    v_ptr,  # [R, Hkv, C, D] value cache
    rows_ptr,  # [B] int64 cache row of each sequence
    starts_ptr,  # [B] int64 committed length (first new slot)
    n_new_ptr,  # [B] int64 number of new tokens (queries i < n_new are real)
    window_ptr,  # [B] int64 pending slots starts + j, j < window, that the bits address
    bits_ptr,  # [B, T] int64 visibility bits (when HAS_TREE)
    kv_rows_ptr,  # [B, S] int64 cache row of each slot (when HAS_KV_ROWS)
    o_ptr,  # [B, T, H, D] output (when not PARTIAL)
    pm_ptr,  # [B * Hkv, NS, G * T] fp32 partial maxima (when PARTIAL)
    pl_ptr,  # [B * Hkv, NS, G * T] fp32 partial sums (when PARTIAL)
    pa_ptr,  # [B * Hkv, NS, G * T, D] fp32 partial accumulators (when PARTIAL)
    stride_qb, stride_qt, stride_qh,  # q strides (the head dim is contiguous)
    stride_kr, stride_kh, stride_kc,  # k_cache strides: row, kv head, slot
    stride_vr, stride_vh, stride_vc,  # v_cache strides: row, kv head, slot
    stride_bb, stride_bt,  # tree_bits strides
    stride_kvb, stride_kvs,  # kv_rows strides
    stride_ob, stride_ot, stride_oh,  # out strides
    T,  # new tokens per sequence (padded width)
    Hkv,  # kv heads
    n_splits,  # NS: splits of the slot range
    split_len,  # slots per split, a multiple of BLOCK_N
    qk_scale,  # sm_scale * log2(e)
    G: tl.constexpr,  # query heads per kv head
    HEAD_DIM: tl.constexpr,  # D
    HAS_TREE: tl.constexpr,  # visibility among new tokens from bits (else causal)
    HAS_KV_ROWS: tl.constexpr,  # prefix sharing: each slot's row from kv_rows
    PARTIAL: tl.constexpr,  # split-K: write (m, l, acc) partials instead of the output
    IN_PREC: tl.constexpr,  # tl.dot input precision
    EMULATE_BF16: tl.constexpr,  # the interpreter's bf16: see the launcher
    BLOCK_M: tl.constexpr,  # packed query rows (token, head) per program, >= 16
    BLOCK_N: tl.constexpr,  # slots per step, >= 16
    BLOCK_D: tl.constexpr,  # next power of two >= D, >= 16
):
    pid_m = tl.program_id(0)  # query tile
    pid_bh = tl.program_id(1)  # (sequence, kv head)
    pid_s = tl.program_id(2)  # split
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    start = tl.load(starts_ptr + b)
    n_new = tl.load(n_new_ptr + b)
    window = tl.load(window_ptr + b)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # packed rows r = t * G + g
    tok = offs_m // G
    head = hk * G + offs_m % G
    m_ok = offs_m < T * G
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    # Padding tokens (t >= n_new) read q = 0: finite whatever the caller left there.
    q_ok = (m_ok & (tok < n_new))[:, None] & d_ok[None, :]
    q_off = b.to(tl.int64) * stride_qb + tok * stride_qt + head * stride_qh
    q = tl.load(q_ptr + q_off[:, None] + offs_d[None, :], mask=q_ok, other=0.0)
    if EMULATE_BF16:
        q = q.to(tl.float32)
    if HAS_TREE:
        bits = tl.load(bits_ptr + b * stride_bb + tok * stride_bt, mask=m_ok & (tok < n_new),
                       other=0)  # [BLOCK_M] int64
        bits_lo = bits.to(tl.int32)  # the low 32 bits (truncation)
        bits_hi = (bits >> 32).to(tl.int32)
    else:
        bits_lo = tok  # unused
        bits_hi = tok

    # This program's slots: its split, cut at the end of the pending window; causal rows see no
    # further than their last token.
    end = start + window
    if not HAS_TREE:
        last_tok = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // G, T - 1)
        end = tl.minimum(end, start + last_tok + 1)
    lo = pid_s * split_len
    # The last split runs to the end, so a kv_len hint below the true length costs time, not keys.
    hi = tl.where(pid_s == n_splits - 1, end, tl.minimum(lo + split_len, end))
    # Whole blocks of the prefix need no mask; the rest (prefix tail, new tokens) does.
    prefix_end = tl.maximum(tl.minimum((start // BLOCK_N) * BLOCK_N, hi), lo)

    k_base = k_ptr + hk.to(tl.int64) * stride_kh
    v_base = v_ptr + hk.to(tl.int64) * stride_vh
    if not HAS_KV_ROWS:
        row = tl.load(rows_ptr + b)  # int64: row * stride may exceed 2^31
        k_base += row * stride_kr
        v_base += row * stride_vr
    kv_rows_b = kv_rows_ptr + b.to(tl.int64) * stride_kvb

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc, m_i, l_i = _attend_block(
        acc, m_i, l_i, q, k_base, v_base, kv_rows_b,
        stride_kvs, stride_kr, stride_kc, stride_vr, stride_vc, lo, prefix_end, start, window,
        tok, bits_lo, bits_hi, qk_scale, offs_d, d_ok,
        MASKED=False, HAS_TREE=HAS_TREE, HAS_KV_ROWS=HAS_KV_ROWS, IN_PREC=IN_PREC,
        EMULATE_BF16=EMULATE_BF16, EVEN_D=HEAD_DIM == BLOCK_D, BLOCK_N=BLOCK_N,
    )
    acc, m_i, l_i = _attend_block(
        acc, m_i, l_i, q, k_base, v_base, kv_rows_b,
        stride_kvs, stride_kr, stride_kc, stride_vr, stride_vc, prefix_end, hi, start, window,
        tok, bits_lo, bits_hi, qk_scale, offs_d, d_ok,
        MASKED=True, HAS_TREE=HAS_TREE, HAS_KV_ROWS=HAS_KV_ROWS, IN_PREC=IN_PREC,
        EMULATE_BF16=EMULATE_BF16, EVEN_D=HEAD_DIM == BLOCK_D, BLOCK_N=BLOCK_N,
    )

    if PARTIAL:
        part = (pid_bh * n_splits + pid_s).to(tl.int64) * (T * G) + offs_m  # [BLOCK_M]
        tl.store(pm_ptr + part, m_i, mask=m_ok)
        tl.store(pl_ptr + part, l_i, mask=m_ok)
        a_ptrs = pa_ptr + part[:, None] * HEAD_DIM + offs_d[None, :]
        tl.store(a_ptrs, acc, mask=m_ok[:, None] & d_ok[None, :])
    else:
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # l = 0 only for a row that sees nothing
        if EMULATE_BF16:
            out = _round_bf16(out)
        o_off = b.to(tl.int64) * stride_ob + tok * stride_ot + head * stride_oh
        tl.store(o_ptr + o_off[:, None] + offs_d[None, :], out.to(o_ptr.dtype.element_ty),
                 mask=m_ok[:, None] & d_ok[None, :])


@jit
def _combine_splits_kernel(
    pm_ptr,  # [B * Hkv, NS, G * T] fp32 partial maxima (base 2)
    pl_ptr,  # [B * Hkv, NS, G * T] fp32 partial sums
    pa_ptr,  # [B * Hkv, NS, G * T, D] fp32 partial accumulators
    o_ptr,  # [B, T, H, D] output
    stride_ob, stride_ot, stride_oh,  # out strides
    T,  # new tokens per sequence
    Hkv,  # kv heads
    n_splits,  # NS
    G: tl.constexpr,  # query heads per kv head
    HEAD_DIM: tl.constexpr,  # D
    EMULATE_BF16: tl.constexpr,  # the interpreter's bf16: round by hand before the cast
    BLOCK_M: tl.constexpr,  # packed query rows per program
    BLOCK_D: tl.constexpr,  # next power of two >= D
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hkv
    hk = pid_bh % Hkv
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_ok = offs_m < T * G
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    md_ok = m_ok[:, None] & d_ok[None, :]

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for s in range(0, n_splits):
        part = (pid_bh * n_splits + s).to(tl.int64) * (T * G) + offs_m
        m_s = tl.load(pm_ptr + part, mask=m_ok, other=-1.0e30)
        l_s = tl.load(pl_ptr + part, mask=m_ok, other=0.0)
        a_s = tl.load(pa_ptr + part[:, None] * HEAD_DIM + offs_d[None, :], mask=md_ok, other=0.0)
        m_new = tl.maximum(m_i, m_s)
        alpha = tl.exp2(m_i - m_new)
        beta = tl.exp2(m_s - m_new)  # 0 for an empty split (m_s = -1e30) once m_i is real
        l_i = l_i * alpha + l_s * beta
        acc = acc * alpha[:, None] + a_s * beta[:, None]
        m_i = m_new
    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    if EMULATE_BF16:
        out = _round_bf16(out)
    tok = offs_m // G
    head = hk * G + offs_m % G
    o_off = b.to(tl.int64) * stride_ob + tok * stride_ot + head * stride_oh
    tl.store(o_ptr + o_off[:, None] + offs_d[None, :], out.to(o_ptr.dtype.element_ty), mask=md_ok)


# --- the launcher -----------------------------------------------------------------------------
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_MIN_SPLIT = 128  # slots (two 64-slot blocks): shorter splits cost more to merge than they save


@dataclass(frozen=True)
class AttentionConfig:
    """How tree_attention launches (chosen from shapes only, never from tensor values)."""

    block_m: int  # packed (token, head) query rows per program
    block_n: int  # slots per inner step
    block_d: int  # head dim padded to a power of two
    split_len: int  # slots per split (a multiple of block_n)
    n_splits: int  # programs along the slot range; > 1 adds the combine kernel
    num_warps: int
    num_stages: int


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # the interpreter: plan as for an H100


def attention_config(
    batch: int,  # B
    width: int,  # T
    heads: int,  # H
    kv_heads: int,  # Hkv
    head_dim: int,  # D
    kv_len: int,  # S, about max(starts + n_new): sizes the splits (the last one runs to the end)
    device: torch.device | str = "cuda",
    split_len: int | None = None,  # force slots per split (rounded up to block_n)
    block_n: int | None = None,  # force slots per inner step (a power of two >= 16)
    elem_bytes: int = 2,  # q/k/v element size: 4 for fp32
) -> AttentionConfig:
    rows = (heads // kv_heads) * width  # packed query rows per (sequence, kv head)
    block_d = max(16, triton.next_power_of_2(head_dim))
    # Tiles sized so that sm_80/sm_90 builds do not spill (checked with ptxas for D = 128). fp32
    # dots run in exact ("ieee") precision on CUDA cores, not tensor cores: small tiles, and a
    # correctness path rather than a fast one.
    if elem_bytes >= 4:
        block_m, default_n = 16, 32
    else:
        block_m, default_n = min(max(16, triton.next_power_of_2(rows)), 64), 64
    if block_n is None:
        block_n = default_n if block_d <= 128 else 32
    if block_n < 16 or block_n & (block_n - 1):
        raise ValueError(f"kernels/attention.py: block_n must be a power of two >= 16; "
                         f"got {block_n}")
    kv_len = max(kv_len, 1)
    if split_len is None:
        # Split the slots only when the (sequence, kv head, query tile) programs leave SMs idle:
        # then aim at two programs per SM, never below _MIN_SPLIT slots per split.
        programs = batch * kv_heads * triton.cdiv(rows, block_m)
        sms = _num_sms(torch.device(device))
        want = 1 if programs >= sms else triton.cdiv(2 * sms, programs)
        n_splits = max(1, min(want, kv_len // _MIN_SPLIT))
        split_len = triton.cdiv(kv_len, n_splits)
    split_len = triton.cdiv(split_len, block_n) * block_n
    n_splits = triton.cdiv(kv_len, split_len)
    return AttentionConfig(block_m=block_m, block_n=block_n, block_d=block_d, split_len=split_len,
                           n_splits=n_splits, num_warps=4, num_stages=2)


def _fail(msg: str) -> None:
    raise ValueError(f"kernels/attention.py: tree_attention: {msg}")


def _check_index(name: str, t: torch.Tensor, shape: tuple[int, ...], device: torch.device) -> None:
    if t.shape != shape or t.dtype != torch.long or t.device != device:
        _fail(f"{name} must be int64 {list(shape)} on {device}; "
              f"got {t.dtype} {list(t.shape)} on {t.device}")


def tree_attention(
    q: torch.Tensor,  # [B, T, H, D], last dim contiguous
    k_cache: torch.Tensor,  # [R, Hkv, C, D]
    v_cache: torch.Tensor,  # [R, Hkv, C, D]
    rows: torch.Tensor,  # [B] int64
    starts: torch.Tensor,  # [B] int64
    n_new: torch.Tensor,  # [B] int64, 1 <= n_new <= T
    tree_bits: torch.Tensor | None,  # [B, T] int64 (T <= 64), None = causal
    kv_rows: torch.Tensor | None = None,  # [B, S] int64, S >= max(starts + window)
    sm_scale: float | None = None,  # default 1/sqrt(D)
    *,
    window: torch.Tensor | None = None,  # [B] int64 pending slots, >= n_new; None = n_new
    kv_len: int | None = None,  # sizes the split-K grid: ~max(starts + window); default S or C
    split_len: int | None = None,  # force the split-K split size (slots)
    block_n: int | None = None,  # force the slots per inner step
) -> torch.Tensor:  # [B, T, H, D] in q's dtype; rows i >= n_new[b] are unspecified (finite)
    """Attention of each sequence's new tokens over its cache slots, read in place (see the
    module docstring). The launch depends on shapes only, so it can be captured in a CUDA graph:
    kv_len (e.g. the plan's Step.kv_len) only sizes the split-K grid; without it the grid covers
    kv_rows' S slots, or the capacity C. window's values are not checked (that would sync):
    pending slots past the 64th are never visible, and a window past the cache reads past it."""
    if triton is None:
        raise RuntimeError("kernels/attention.py: tree_attention needs the `triton` package (not "
                           "installed); use tree_attention_ref on this machine")
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("kernels/attention.py: tree_attention runs on CUDA tensors (or on the "
                           f"CPU under TRITON_INTERPRET=1); got q on {q.device}")
    if q.dim() != 4 or q.stride(-1) != 1:
        _fail(f"q must be [B, T, H, D] with a contiguous last dim; got {list(q.shape)} "
              f"strides {q.stride()}")
    B, T, H, D = q.shape
    if q.dtype not in _DTYPES:
        _fail(f"q must be fp32/bf16/fp16; got {q.dtype}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 4 or c.shape[3] != D or c.stride(-1) != 1:
            _fail(f"{name} must be [R, Hkv, C, {D}] with a contiguous last dim; got "
                  f"{list(c.shape)} strides {c.stride()}")
        if c.dtype != q.dtype or c.device != q.device:
            _fail(f"{name} must be {q.dtype} on {q.device} like q; got {c.dtype} on {c.device}")
    if v_cache.shape != k_cache.shape:
        _fail(f"v_cache {list(v_cache.shape)} must match k_cache {list(k_cache.shape)}")
    R, Hkv, C, _ = k_cache.shape
    if H % Hkv:
        _fail(f"q's {H} heads must be a multiple of the cache's {Hkv} kv heads")
    if window is None:
        window = n_new
    for name, t in (("rows", rows), ("starts", starts), ("n_new", n_new), ("window", window)):
        _check_index(name, t, (B,), q.device)
    if tree_bits is not None:
        if T > 64:
            _fail(f"tree_bits holds 64 bits per token: T must be <= 64; got T = {T}")
        _check_index("tree_bits", tree_bits, (B, T), q.device)
    if kv_rows is not None:
        if kv_rows.dim() != 2:
            _fail(f"kv_rows must be [B, S]; got {list(kv_rows.shape)}")
        _check_index("kv_rows", kv_rows, (B, kv_rows.shape[1]), q.device)
    if kv_len is None:
        kv_len = C if kv_rows is None else min(kv_rows.shape[1], C)
    G = H // Hkv
    cfg = attention_config(B, T, H, Hkv, D, kv_len, q.device, split_len, block_n,
                           q.element_size())
    rows, starts, n_new = rows.contiguous(), starts.contiguous(), n_new.contiguous()
    window = window.contiguous()
    bits = tree_bits if tree_bits is not None else rows  # a placeholder pointer when unused
    kvr = kv_rows if kv_rows is not None else rows.view(B, 1)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(D)

    out = torch.empty(B, T, H, D, dtype=q.dtype, device=q.device)
    if B * T == 0:
        return out
    partial = cfg.n_splits > 1
    # Triton's interpreter (3.9) gets bf16 wrong twice: tl.dot multiplies bf16 operands as their
    # raw uint16 bits, and fp32 -> bf16 casts truncate (the GPU rounds to nearest even). There the
    # kernels upcast the dot operands to fp32 (exact: a bf16 x bf16 product fits in fp32, as on
    # the tensor cores) and round to bf16 by hand before casting. On a GPU neither happens.
    emulate_bf16 = q.dtype == torch.bfloat16 and not q.is_cuda
    if partial:
        pm = torch.empty(B * Hkv, cfg.n_splits, G * T, dtype=torch.float32, device=q.device)
        pl = torch.empty_like(pm)
        pa = torch.empty(B * Hkv, cfg.n_splits, G * T, D, dtype=torch.float32, device=q.device)
    else:
        pm = pl = pa = out  # unused
    n_tiles = triton.cdiv(G * T, cfg.block_m)
    _tree_attention_kernel[(n_tiles, B * Hkv, cfg.n_splits)](
        q, k_cache, v_cache, rows, starts, n_new, window, bits, kvr, out, pm, pl, pa,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        bits.stride(0), bits.stride(-1),
        kvr.stride(0), kvr.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        T, Hkv, cfg.n_splits, cfg.split_len, sm_scale * math.log2(math.e),
        G=G, HEAD_DIM=D, HAS_TREE=tree_bits is not None, HAS_KV_ROWS=kv_rows is not None,
        PARTIAL=partial, IN_PREC="ieee" if q.dtype == torch.float32 or emulate_bf16 else "tf32",
        EMULATE_BF16=emulate_bf16,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_D=cfg.block_d,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if partial:
        _combine_splits_kernel[(n_tiles, B * Hkv)](
            pm, pl, pa, out,
            out.stride(0), out.stride(1), out.stride(2),
            T, Hkv, cfg.n_splits,
            G=G, HEAD_DIM=D, EMULATE_BF16=emulate_bf16, BLOCK_M=cfg.block_m,
            BLOCK_D=cfg.block_d, num_warps=4,
        )
    return out
