"""Batched sampling from logits: temperature, top-k and top-p per row, seeded, without a sort.

Row b of logits l [B, V] with temperature T_b, top_k k_b and top_p P_b becomes the distribution
    T_b = 0:  one-hot at argmax_v l(v) (the first maximum)
    T_b > 0:  s = l / T_b
              top-k (0 < k_b < V): keep v with l(v) >= t_k, t_k = the k_b-th largest logit
              p(v) = exp(s(v) - max s) / Z over the kept v (softmax restricted to them)
              top-p (P_b < 1): keep v with p(v) >= t_p, t_p = the largest value such that the
                  kept mass sum_{p(u) >= t_p} p(u) >= P_b; renormalise
and a token is drawn from it. This is runtime/sampling.py's `probabilities` with per-row parameters
(top-k is applied before the softmax, top-p after it, on the top-k-renormalised distribution).
Ties at a threshold: every token equal to the threshold value is kept. For top-k this is also
`probabilities`' rule (logits >= kth); for top-p `probabilities` cuts a sorted list, which keeps
an arbitrary subset of the tokens tied at the boundary, while here all of them stay. Without ties
the kept sets are the same.

No sort. A row's logits map to uint32 keys that order like the floats (flip the sign bit of
non-negative floats, all bits of negative ones; -0.0 is first made +0.0). Each threshold is the
largest key t with pred(t) true, for a predicate that only weakens as t grows:
    top-k: count(key >= t) >= k           top-p: mass(key >= t) >= P * Z
found bit by bit from the top (ans |= bit when pred(ans | bit)): 32 fixed passes over the row,
exact, and the result is always the key of a logit in the row. On a GPU sorting 32k-150k floats
per row is the expensive part of sampling; these passes read the row from L2 instead.
Passes per row: 1 (max, argmax, online-softmax Z) + [32 count + 1 mass] for top-k + [32 mass] for
top-p + 1 to write the probabilities or to draw. Rows whose parameter turns a filter off run the
passes anyway (a fixed trip count); pass a Python scalar parameter (0 / 1.0) to compile the filter
out for the whole batch.

Numerics: the kernels scale by l * (1 / T) where the refs divide (1-ulp differences in p); keys
are taken on l itself, which orders like l / T for T > 0 (two logits that l / T rounds to the same
float count as distinct here and tied in `probabilities`). Mass comparisons are fp32 sums in a
different order from a sorted cumsum, so a top_p within ~1e-6 of a partial sum may cut one token
differently.

Drawing: inverse CDF, the first v whose running sum of the kept exp(s - max s) exceeds u * Z,
u ~ U[0, 1) from Philox (key = seed + row, counter = (lane, offset mod 2^32, offset >> 32, stream)):
row b always uses key seed + b, as runtime/sampling.py seeds sequence b with seed + b. Advance
`offset` by one per call. `philox_uniforms` returns the exact uniforms, so a test can recompute
every draw. The refs draw from a torch.Generator instead (same distribution, other numbers).
"""

from __future__ import annotations

import math
import os

import torch

try:
    import triton
    import triton.language as tl

    def jit(**kwargs):
        return triton.jit(**kwargs)
except ImportError:  # CPU-only install: the refs below still work, the launchers raise
    triton = tl = None

    def jit(**kwargs):
        return lambda fn: fn


SAMPLE_STREAM = 0  # Philox counter word 3 of sample(); kernels/verify.py uses 1


# ----------------------------------------------------------------------------- references


def _params(logits: torch.Tensor, temperature, top_k, top_p, op: str):
    """Broadcast scalar parameters to [B] tensors on logits' device and check them."""
    if logits.dim() != 2 or logits.shape[1] < 1 or not logits.dtype.is_floating_point:
        raise ValueError(f"kernels/sampling.py: {op}: logits must be a float [B, V] tensor with "
                         f"V >= 1; got {logits.dtype} {tuple(logits.shape)}")
    B = logits.shape[0]
    out = []
    for name, value, dtype in (("temperature", temperature, torch.float32),
                               ("top_k", top_k, torch.int32), ("top_p", top_p, torch.float32)):
        t = torch.as_tensor(value, device=logits.device)
        if t.dim() == 0:
            t = t.expand(B)
        if tuple(t.shape) != (B,):
            raise ValueError(f"kernels/sampling.py: {op}: {name} must be a scalar or a [B={B}] "
                             f"tensor; got shape {tuple(t.shape)}")
        if t.device != logits.device:
            raise ValueError(f"kernels/sampling.py: {op}: {name} is on {t.device}, logits on "
                             f"{logits.device}")
        out.append(t.to(dtype).contiguous())
    return out


def processed_probs_ref(
    logits: torch.Tensor,  # [B, V] float
    temperature: torch.Tensor | float,  # [B] or scalar, 0 = greedy
    top_k: torch.Tensor | int,  # [B] or scalar, 0 = off
    top_p: torch.Tensor | float,  # [B] or scalar, 1 = off
) -> torch.Tensor:  # [B, V] float32, each row sums to 1
    """The distribution `sample` draws from, in torch with a sort (the CPU path)."""
    T, k, p_cut = _params(logits, temperature, top_k, top_p, "processed_probs_ref")
    B, V = logits.shape
    logits = logits.float()
    s = logits / torch.where(T > 0, T, 1.0)[:, None]
    k_eff = torch.where((k > 0) & (k < V), k, V).long()
    kth = s.sort(-1, descending=True).values.gather(-1, (k_eff - 1)[:, None])  # [B, 1]
    probs = s.masked_fill(s < kth, -math.inf).softmax(-1)
    sorted_p = probs.sort(-1, descending=True).values
    # The smallest head of the sorted row whose mass reaches top_p; its last value is the threshold.
    n_keep = ((sorted_p.cumsum(-1) - sorted_p) < p_cut[:, None]).sum(-1).clamp_min(1)
    t_p = sorted_p.gather(-1, (n_keep - 1)[:, None])
    keep = (probs >= t_p) | (p_cut >= 1)[:, None]
    probs = probs * keep
    probs = probs / probs.sum(-1, keepdim=True)
    greedy = torch.nn.functional.one_hot(logits.argmax(-1), V).float()
    return torch.where((T > 0)[:, None], probs, greedy)


def sample_ref(
    logits: torch.Tensor,  # [B, V] float
    temperature: torch.Tensor | float,  # [B] or scalar, 0 = greedy
    top_k: torch.Tensor | int,  # [B] or scalar, 0 = off
    top_p: torch.Tensor | float,  # [B] or scalar, 1 = off
    generator: torch.Generator | None = None,
) -> torch.Tensor:  # [B] int64
    """One token per row from processed_probs_ref (greedy rows: the argmax, no draw)."""
    probs = processed_probs_ref(logits, temperature, top_k, top_p)
    if probs.shape[0] == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


# ----------------------------------------------------------------------------- kernels


@jit()
def _uniforms(
    seed,  # Philox key = seed + row
    row,  # int64: the row (program) index
    offset,  # caller's call counter
    lanes,  # int32 scalar or block: which draws of this row in this call
    STREAM: tl.constexpr,  # last counter word: separates the kernels that share a seed
):
    """U[0, 1) floats like lanes, each a function of (seed + row, lane, offset, STREAM)."""
    off = offset.to(tl.int64)
    zero = tl.zeros_like(lanes).to(tl.uint32)
    c1 = (off & 0xFFFFFFFF).to(tl.uint32) + zero
    c2 = ((off >> 32) & 0xFFFFFFFF).to(tl.uint32) + zero
    c3 = zero + STREAM
    r0, _, _, _ = tl.philox(seed.to(tl.int64) + row, lanes, c1, c2, c3)
    return tl.uint_to_uniform_float(r0)


@jit(do_not_specialize=["seed", "offset"])
def _uniforms_kernel(
    out_ptr,  # [R, L] float32 out
    L,  # lanes per row
    seed,  # Philox key base
    offset,  # Philox counter base
    STREAM: tl.constexpr,  # Philox counter word 3
    BLOCK_L: tl.constexpr,  # next power of two >= L
):
    row = tl.program_id(0).to(tl.int64)
    lanes = tl.arange(0, BLOCK_L)
    u = _uniforms(seed, row, offset, lanes, STREAM)
    tl.store(out_ptr + row * L + lanes, u, mask=lanes < L)


@jit()
def _keys(x):
    """float32 -> uint32 with the same order (-0.0 folded into +0.0)."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.uint32, bitcast=True)
    sign = tl.full([], 0x80000000, tl.uint32)
    return tl.where((bits & sign) != 0, ~bits, bits | sign)


@jit()
def _row_threshold(
    l_row,  # pointer to the row's V logits (unit stride)
    V,  # vocabulary size
    inv_t,  # 1 / temperature (1 for greedy rows)
    k,  # top-k count in [1, V] (V = off)
    top_p,  # nucleus mass (>= 1 = off)
    HAS_TOP_K: tl.constexpr,  # compile the top-k passes
    HAS_TOP_P: tl.constexpr,  # compile the top-p passes
    BLOCK_V: tl.constexpr,  # chunk of the row per step
):
    """-> (m = max s, amax = first argmax of l, t = uint32 key threshold (keep key >= t),
    Z = sum of exp(s - m) over the kept tokens)."""
    vs = tl.arange(0, BLOCK_V)
    # Pass 1: max and first argmax of l, and Z = sum exp(s - m) by the online rescaling.
    m_l = tl.full([], float("-inf"), tl.float32)
    amax = tl.zeros([], tl.int32)
    m = tl.full([], -3.4e38, tl.float32)  # finite, so the first rescale is exp(0 - ...) not NaN
    z = tl.zeros([], tl.float32)
    for start in range(0, V, BLOCK_V):
        v = start + vs
        x = tl.load(l_row + v, mask=v < V, other=float("-inf")).to(tl.float32)
        c_max = tl.max(x, axis=0)
        c_arg = tl.min(tl.where(x == c_max, v, 2147483647), axis=0)
        amax = tl.where(c_max > m_l, c_arg, amax)  # strict: an earlier chunk keeps a tie
        m_l = tl.maximum(m_l, c_max)
        m_new = tl.maximum(m, c_max * inv_t)
        z = z * tl.exp(m - m_new) + tl.sum(tl.exp(x * inv_t - m_new), axis=0)
        m = m_new
    # top-k: the largest key t with count(key >= t) >= k.
    t = tl.zeros([], tl.uint32)
    if HAS_TOP_K:
        bit = tl.full([], 0x80000000, tl.uint32)
        for _ in range(0, 32):
            cand = t | bit
            cnt = tl.zeros([BLOCK_V], tl.int32)
            for start in range(0, V, BLOCK_V):
                v = start + vs
                x = tl.load(l_row + v, mask=v < V, other=0.0).to(tl.float32)
                cnt += ((_keys(x) >= cand) & (v < V)).to(tl.int32)
            t = tl.where(tl.sum(cnt, axis=0) >= k, cand, t)
            bit = bit >> 1
        acc = tl.zeros([BLOCK_V], tl.float32)
        for start in range(0, V, BLOCK_V):
            v = start + vs
            x = tl.load(l_row + v, mask=v < V, other=0.0).to(tl.float32)
            acc += tl.where((_keys(x) >= t) & (v < V), tl.exp(x * inv_t - m), 0.0)
        z = tl.sum(acc, axis=0)
    # top-p: the largest key t' >= t with mass(key >= t') >= top_p * Z.
    if HAS_TOP_P:
        need = top_p * z
        tp = tl.zeros([], tl.uint32)
        z_p = z
        bit = tl.full([], 0x80000000, tl.uint32)
        for _ in range(0, 32):
            cand = tl.maximum(tp | bit, t)
            acc = tl.zeros([BLOCK_V], tl.float32)
            for start in range(0, V, BLOCK_V):
                v = start + vs
                x = tl.load(l_row + v, mask=v < V, other=0.0).to(tl.float32)
                acc += tl.where((_keys(x) >= cand) & (v < V), tl.exp(x * inv_t - m), 0.0)
            mass = tl.sum(acc, axis=0)
            ok = mass >= need
            tp = tl.where(ok, tp | bit, tp)
            z_p = tl.where(ok, mass, z_p)
            bit = bit >> 1
        off = top_p >= 1.0  # mass comparisons must not drop rounding-level tails
        t = tl.where(off, t, tl.maximum(tp, t))
        z = tl.where(off, z, z_p)
    return m, amax, t, z


@jit()
def _processed_probs_kernel(
    l_ptr,  # [B, V] float logits (unit stride over V)
    t_ptr,  # [B] float32 temperature (0 = greedy)
    k_ptr,  # [B] int32 top-k (0 = off)
    p_ptr,  # [B] float32 top-p (1 = off)
    out_ptr,  # [B, V] float32 out: the distribution sampled from
    stride_l,  # elements between rows of logits
    stride_out,  # elements between rows of out
    V,  # vocabulary size
    HAS_TOP_K: tl.constexpr,  # compile the top-k passes
    HAS_TOP_P: tl.constexpr,  # compile the top-p passes
    BLOCK_V: tl.constexpr,  # chunk of the row per step
):
    row = tl.program_id(0).to(tl.int64)
    l_row = l_ptr + row * stride_l
    temp = tl.load(t_ptr + row)
    greedy = temp <= 0
    inv_t = 1.0 / tl.where(greedy, 1.0, temp)
    k = tl.load(k_ptr + row)
    k = tl.where((k > 0) & (k < V), k, V)
    top_p = tl.load(p_ptr + row)
    m, amax, t, z = _row_threshold(l_row, V, inv_t, k, top_p, HAS_TOP_K, HAS_TOP_P, BLOCK_V)
    inv_z = 1.0 / z
    vs = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        v = start + vs
        x = tl.load(l_row + v, mask=v < V, other=0.0).to(tl.float32)
        p = tl.where(_keys(x) >= t, tl.exp(x * inv_t - m) * inv_z, 0.0)
        p = tl.where(greedy, tl.where(v == amax, 1.0, 0.0), p)
        tl.store(out_ptr + row * stride_out + v, p, mask=v < V)


@jit(do_not_specialize=["seed", "offset"])
def _sample_kernel(
    l_ptr,  # [B, V] float logits (unit stride over V)
    t_ptr,  # [B] float32 temperature (0 = greedy)
    k_ptr,  # [B] int32 top-k (0 = off)
    p_ptr,  # [B] float32 top-p (1 = off)
    out_ptr,  # [B] int64 out: the sampled token
    stride_l,  # elements between rows of logits
    V,  # vocabulary size
    seed,  # Philox key base (key = seed + row)
    offset,  # Philox counter base: advance by one per call
    STREAM: tl.constexpr,  # Philox counter word 3
    HAS_TOP_K: tl.constexpr,  # compile the top-k passes
    HAS_TOP_P: tl.constexpr,  # compile the top-p passes
    BLOCK_V: tl.constexpr,  # chunk of the row per step
):
    row = tl.program_id(0).to(tl.int64)
    l_row = l_ptr + row * stride_l
    temp = tl.load(t_ptr + row)
    greedy = temp <= 0
    inv_t = 1.0 / tl.where(greedy, 1.0, temp)
    k = tl.load(k_ptr + row)
    k = tl.where((k > 0) & (k < V), k, V)
    top_p = tl.load(p_ptr + row)
    m, amax, t, z = _row_threshold(l_row, V, inv_t, k, top_p, HAS_TOP_K, HAS_TOP_P, BLOCK_V)
    # Inverse CDF over the kept weights w = exp(s - m): the first v whose running sum exceeds u Z
    # (w > 0 there); if rounding leaves the running total short of u Z, the last v with w > 0.
    target = _uniforms(seed, row, offset, tl.zeros([], tl.int32), STREAM) * z
    vs = tl.arange(0, BLOCK_V)
    running = tl.zeros([], tl.float32)
    first = tl.full([], 2147483647, tl.int32)
    last_pos = tl.full([], -1, tl.int32)
    for start in range(0, V, BLOCK_V):
        v = start + vs
        x = tl.load(l_row + v, mask=v < V, other=0.0).to(tl.float32)
        w = tl.where((_keys(x) >= t) & (v < V), tl.exp(x * inv_t - m), 0.0)
        cum = running + tl.cumsum(w, axis=0)
        first = tl.minimum(first, tl.min(tl.where((cum > target) & (w > 0), v, 2147483647), axis=0))
        last_pos = tl.maximum(last_pos, tl.max(tl.where(w > 0, v, -1), axis=0))
        running += tl.sum(w, axis=0)
    token = tl.where(first < 2147483647, first, tl.maximum(last_pos, 0))
    token = tl.where(greedy, amax, token)
    tl.store(out_ptr + row, token.to(tl.int64))


# ----------------------------------------------------------------------------- launchers


def _check_triton(device: torch.device, op: str) -> None:
    if triton is None:
        raise RuntimeError(f"kernels/sampling.py: {op} needs the `triton` package (not installed); "
                           "use the pure-torch *_ref functions on this machine")
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(f"kernels/sampling.py: {op} runs on CUDA tensors (or on the CPU under "
                           f"TRITON_INTERPRET=1); got a tensor on {device}")


def _check_seed(seed, offset, op: str) -> None:
    ints = isinstance(seed, int) and isinstance(offset, int)
    if not (ints and 0 <= seed < 2**62 and offset >= 0):
        raise ValueError(f"kernels/sampling.py: {op}: seed and offset must be ints with "
                         f"0 <= seed < 2^62 and offset >= 0; got seed={seed!r} offset={offset!r}")


def _static_filters(top_k, top_p) -> tuple[bool, bool]:
    """A Python scalar that turns a filter off compiles it out; a tensor keeps it (no host sync)."""
    has_k = not (isinstance(top_k, int) and top_k == 0)
    has_p = not (isinstance(top_p, (int, float)) and top_p >= 1)
    return has_k, has_p


def _block_v(V: int, block_v: int, op: str) -> int:
    if block_v < 16 or block_v & (block_v - 1):
        raise ValueError(f"kernels/sampling.py: {op}: block_v must be a power of two >= 16; "
                         f"got {block_v}")
    return min(block_v, max(16, triton.next_power_of_2(V)))


def philox_uniforms(
    rows: int, lanes: int, seed: int, offset: int, stream: int = SAMPLE_STREAM, device="cuda"
) -> torch.Tensor:  # [rows, lanes] float32 in [0, 1)
    """The uniforms the kernels draw: [b, e] = U(Philox(key = seed + b,
    counter = (e, offset mod 2^32, offset >> 32, stream))). sample() uses lane 0 of stream 0,
    verify_sample lanes 0..N-1 of stream 1."""
    op = "philox_uniforms"
    device = torch.device(device)
    _check_triton(device, op)
    _check_seed(seed, offset, op)
    out = torch.empty(rows, lanes, dtype=torch.float32, device=device)
    if rows and lanes:
        _uniforms_kernel[(rows,)](out, lanes, seed, offset, STREAM=stream,
                                  BLOCK_L=triton.next_power_of_2(lanes), num_warps=1)
    return out


def processed_probs(
    logits: torch.Tensor,  # [B, V] float (fp32/bf16/fp16)
    temperature: torch.Tensor | float,  # [B] or scalar, 0 = greedy
    top_k: torch.Tensor | int,  # [B] or scalar, 0 = off
    top_p: torch.Tensor | float,  # [B] or scalar in (0, 1], 1 = off
    *,
    block_v: int = 1024,
) -> torch.Tensor:  # [B, V] float32
    """The exact distribution `sample` draws from (greedy rows one-hot), one launch."""
    op = "processed_probs"
    _check_triton(logits.device, op)
    T, k, p = _params(logits, temperature, top_k, top_p, op)
    has_k, has_p = _static_filters(top_k, top_p)
    B, V = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty(B, V, dtype=torch.float32, device=logits.device)
    if B == 0:
        return out
    BLOCK_V = _block_v(V, block_v, op)
    _processed_probs_kernel[(B,)](
        logits, T, k, p, out, logits.stride(0), out.stride(0), V,
        HAS_TOP_K=has_k, HAS_TOP_P=has_p, BLOCK_V=BLOCK_V, num_warps=4 if BLOCK_V >= 512 else 1,
    )
    return out


def sample(
    logits: torch.Tensor,  # [B, V] float (fp32/bf16/fp16)
    temperature: torch.Tensor | float,  # [B] or scalar, 0 = greedy
    top_k: torch.Tensor | int,  # [B] or scalar, 0 = off
    top_p: torch.Tensor | float,  # [B] or scalar in (0, 1], 1 = off
    seed: int,  # 0 <= seed < 2^62; row b draws with Philox key seed + b
    offset: int,  # >= 0; advance by one per call
    *,
    block_v: int = 1024,
) -> torch.Tensor:  # [B] int64
    """One token per row from processed_probs(...) (greedy rows: the first argmax), one launch."""
    op = "sample"
    _check_triton(logits.device, op)
    T, k, p = _params(logits, temperature, top_k, top_p, op)
    _check_seed(seed, offset, op)
    has_k, has_p = _static_filters(top_k, top_p)
    B, V = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty(B, dtype=torch.int64, device=logits.device)
    if B == 0:
        return out
    BLOCK_V = _block_v(V, block_v, op)
    _sample_kernel[(B,)](
        logits, T, k, p, out, logits.stride(0), V, seed, offset,
        STREAM=SAMPLE_STREAM, HAS_TOP_K=has_k, HAS_TOP_P=has_p, BLOCK_V=BLOCK_V,
        num_warps=4 if BLOCK_V >= 512 else 1,
    )
    return out
