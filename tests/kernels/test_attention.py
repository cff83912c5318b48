"""kernels/attention.py: tree_attention (Triton) against tree_attention_ref, and the ref against a
brute-force loop over the visibility rule: causal prefill, ragged decode (split-K too), random
token trees, GSD's draft steps over a pending window wider than the step, prefix sharing, GQA, odd
sizes, fp32/bf16/fp16.

Runs under TRITON_INTERPRET=1 on the CPU (set here unless the runner set it); with
TRITON_INTERPRET=0 on a CUDA machine the same tests check the compiled kernel.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import math
import random
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from treadle.kernels import attention as A
from treadle.kernels.attention import (
    attention_config,
    mask_from_tree_bits,
    tree_attention,
    tree_attention_ref,
    tree_bits_from_mask,
)

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
DEVICE = "cpu" if INTERPRET else "cuda"


def _kernel_skip_reason() -> str | None:
    if A.triton is None:
        return "needs the triton package"
    if not INTERPRET:
        return None if torch.cuda.is_available() else "TRITON_INTERPRET=0 needs a CUDA device"
    from triton.runtime.interpreter import InterpretedFunction

    if not isinstance(A._tree_attention_kernel, InterpretedFunction):
        return ("triton compiled the kernels: kernels/attention.py was imported before "
                "TRITON_INTERPRET=1 was set (set it in the environment or tests/conftest.py)")
    return None


_reason = _kernel_skip_reason()
kernel_test = pytest.mark.skipif(_reason is not None, reason=_reason or "")


# --- building cases ---------------------------------------------------------------------------
def tree_from_parents(parents: list[int]) -> torch.Tensor:
    """[T, T] visibility: node i sees itself and its ancestors (parents[i] < i, -1 = root)."""
    vis = torch.eye(len(parents), dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            vis[i] |= vis[p]
    return vis


def random_parents(rng: random.Random, width: int) -> list[int]:
    return [rng.randrange(-1, i) for i in range(width)]


def window_tree(rng: random.Random, n_new: int, width: int, window: int) -> torch.Tensor:
    """[T, W] visibility of one of GSD's level-by-level draft steps: a tree of `window` pending
    nodes, n_new of them (any, in order) the step's queries, each seeing its node's ancestor chain;
    padding queries (i >= n_new) see garbage that must not matter."""
    dag = tree_from_parents(random_parents(rng, window))  # [W, W]
    queries = sorted(rng.sample(range(window), n_new))
    tree = torch.rand(width, window, generator=torch.Generator().manual_seed(window)) < 0.5
    tree[:n_new] = dag[queries]
    return tree


@dataclass
class Case:
    q: torch.Tensor  # [B, T, H, D]
    k: torch.Tensor  # [R, Hkv, C, D]
    v: torch.Tensor
    rows: torch.Tensor  # [B]
    starts: torch.Tensor  # [B]
    n_new: torch.Tensor  # [B]
    bits: torch.Tensor | None  # [B, T]
    kv_rows: torch.Tensor | None  # [B, S]
    window: torch.Tensor | None = None  # [B] pending slots; None = n_new

    def pending(self) -> torch.Tensor:
        return self.n_new if self.window is None else self.window

    def kw(self, device: str = "cpu") -> dict:
        return {} if self.window is None else {"window": self.window.to(device)}

    def args(self, dtype: torch.dtype | None = None):
        cast = (lambda t: t) if dtype is None else (lambda t: t.to(dtype))
        return (cast(self.q), cast(self.k), cast(self.v), self.rows, self.starts, self.n_new,
                self.bits, self.kv_rows)


def on_device(args: tuple) -> tuple:
    return tuple(None if t is None else t.to(DEVICE) for t in args)


def make_case(
    starts: list[int],
    n_new: list[int],
    width: int,
    heads: int,
    kv_heads: int,
    head_dim: int,
    trees: list[torch.Tensor] | None = None,  # per sequence [T, T] (or [T, W]); None = causal
    share: list[tuple[int, int]] | None = None,  # per sequence (lender b', n slots) or None
    seed: int = 0,
    window: list[int] | None = None,  # per sequence pending slots (>= n_new); None = n_new
) -> Case:
    """A cache with one row per sequence plus a spare, rows shuffled; with `share`, sequence b
    reads its first n slots from sequence b''s row (which holds at least n committed slots)."""
    g = torch.Generator().manual_seed(seed)
    batch = len(starts)
    n_rows = batch + 1
    pending = n_new if window is None else window
    kv_len = max(s + n for s, n in zip(starts, pending))
    capacity = kv_len + 3
    rows = torch.randperm(n_rows, generator=g)[:batch]
    q = torch.randn(batch, width, heads, head_dim, generator=g)
    k = torch.randn(n_rows, kv_heads, capacity, head_dim, generator=g)
    v = torch.randn(n_rows, kv_heads, capacity, head_dim, generator=g)
    bits = None
    if trees is not None:
        bits = torch.stack([tree_bits_from_mask(t) for t in trees])
    kv_rows = None
    if share is not None:
        kv_rows = rows[:, None].repeat(1, kv_len)
        for b, lend in enumerate(share):
            if lend is not None:
                src, n = lend
                assert n <= starts[b] and n <= starts[src]
                kv_rows[b, :n] = rows[src]
    return Case(q, k, v, rows, torch.tensor(starts), torch.tensor(n_new), bits, kv_rows,
                None if window is None else torch.tensor(window))


def poisoned(case: Case, dtype: torch.dtype) -> tuple:
    """The case's kernel arguments with NaN in every cache slot no sequence may read and in every
    padding query: the kernel must read neither."""
    q, k, v, rows, starts, n_new, bits, kv_rows = case.args(dtype)
    q, k, v = q.clone(), k.clone(), v.clone()
    used = torch.zeros(k.shape[0], k.shape[2], dtype=torch.bool)  # [R, C]
    pending = case.pending()
    for b in range(len(rows)):
        for s in range(int(starts[b] + pending[b])):
            used[int(rows[b] if kv_rows is None else kv_rows[b, s]), s] = True
        q[b, int(n_new[b]):] = float("nan")
    unused = ~used[:, None, :, None].expand_as(k)
    k[unused] = float("nan")
    v[unused] = float("nan")
    return q, k, v, rows, starts, n_new, bits, kv_rows


# --- checking ---------------------------------------------------------------------------------
def valid_rows(out: torch.Tensor, n_new: torch.Tensor) -> torch.Tensor:
    return torch.cat([out[b, : int(n)] for b, n in enumerate(n_new)])


def upcast(args: tuple) -> tuple:
    return tuple(t.float() if t is not None and t.is_floating_point() else t for t in args)


def check(case: Case, dtype: torch.dtype = torch.float32, **launch) -> None:
    out = tree_attention(*on_device(poisoned(case, dtype)), **case.kw(DEVICE), **launch).cpu()
    assert out.dtype == dtype and out.shape == case.q.shape
    assert out.isfinite().all(), "padding rows must stay finite too"
    got = valid_rows(out, case.n_new).float()
    # The reference in fp32 on the same (rounded) inputs.
    want = valid_rows(tree_attention_ref(*upcast(case.args(dtype)), **case.kw()), case.n_new)
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-5)
        return
    # Low precision: within about 2x torch's own error against fp32 (Liger's rule).
    torch_err = valid_rows(tree_attention_ref(*case.args(dtype), **case.kw()), case.n_new)
    torch_err = torch_err.float() - want
    torch_err = torch_err.abs().max()
    err = (got - want).abs().max()
    assert err <= 2 * torch_err + 1e-3, f"{dtype}: kernel error {err:.2e}, torch's {torch_err:.2e}"


def brute_force(case: Case, sm_scale: float | None = None) -> torch.Tensor:
    """Per query, straight from the rule: slot s < starts[b], or pending slot j visible to i."""
    q, k, v, rows, starts, n_new, bits, kv_rows = case.args(torch.float64)
    pending = case.pending()
    batch, width, heads, dim = q.shape
    group = heads // k.shape[1]
    scale = sm_scale if sm_scale is not None else 1 / math.sqrt(dim)
    out = torch.zeros_like(q)
    for b in range(batch):
        start = int(starts[b])
        for i in range(int(n_new[b])):
            slots = list(range(start))
            for j in range(int(pending[b])):
                sees = j <= i if bits is None else j < 64 and (int(bits[b, i]) >> j) & 1
                if sees:
                    slots.append(start + j)
            row = [int(rows[b] if kv_rows is None else kv_rows[b, s]) for s in slots]
            for h in range(heads):
                keys = k[row, h // group, slots]  # [n, D]
                vals = v[row, h // group, slots]
                w = torch.softmax(keys @ q[b, i, h] * scale, dim=0)
                out[b, i, h] = w @ vals
    return out


# --- tree bits --------------------------------------------------------------------------------
@pytest.mark.parametrize("width", [1, 5, 63, 64])
def test_tree_bits_round_trip(width):
    g = torch.Generator().manual_seed(width)
    tree = torch.rand(3, width, width, generator=g) < 0.5
    bits = tree_bits_from_mask(tree)
    assert bits.shape == (3, width) and bits.dtype == torch.long
    assert torch.equal(mask_from_tree_bits(bits), tree)
    assert torch.equal(tree_bits_from_mask(tree[1]), bits[1])  # [T, T] -> [T]


@pytest.mark.parametrize(("width", "window"), [(1, 5), (3, 9), (7, 64)])
def test_tree_bits_over_a_window(width, window):
    g = torch.Generator().manual_seed(window)
    tree = torch.rand(2, width, window, generator=g) < 0.5  # [B, T, W], W > T
    bits = tree_bits_from_mask(tree)
    assert bits.shape == (2, width)
    assert torch.equal(mask_from_tree_bits(bits, window), tree)
    with pytest.raises(ValueError, match="W <= 64"):
        tree_bits_from_mask(torch.ones(2, 3, 65, dtype=torch.bool))


def test_tree_bits_values():
    tree = tree_from_parents([-1, 0, 0, 1])
    assert tree_bits_from_mask(tree).tolist() == [0b1, 0b11, 0b101, 0b1011]
    full = torch.ones(64, 64, dtype=torch.bool).tril()
    assert int(tree_bits_from_mask(full)[-1]) == -1  # all 64 bits set


# --- the reference against the rule ------------------------------------------------------------
REF_CASES = {
    "causal_prefill": dict(starts=[0, 4], n_new=[6, 3], width=6, heads=4, kv_heads=2),
    "ragged_decode": dict(starts=[5, 1, 9], n_new=[1, 1, 1], width=1, heads=3, kv_heads=1),
    "tree": dict(starts=[3, 6], n_new=[5, 4], width=5, heads=2, kv_heads=2,
                 trees=[tree_from_parents([-1, 0, -1, 1, 2]),
                        tree_from_parents([-1, -1, 0, 2, 3])]),
    "shared_prefix": dict(starts=[5, 7, 3], n_new=[2, 3, 1], width=3, heads=4, kv_heads=4,
                          share=[None, (0, 4), (0, 3)]),
    "window": dict(starts=[4, 0], n_new=[3, 2], width=3, heads=2, kv_heads=1, window=[7, 5],
                   trees=[window_tree(random.Random(1), 3, 3, 7),
                          window_tree(random.Random(2), 2, 3, 5)]),
    "causal_window": dict(starts=[2, 6], n_new=[2, 3], width=3, heads=2, kv_heads=2,
                          window=[4, 3]),
}


@pytest.mark.parametrize("name", sorted(REF_CASES))
def test_ref_matches_brute_force(name):
    case = make_case(head_dim=8, seed=1, **REF_CASES[name])
    want = brute_force(case)
    got = tree_attention_ref(*case.args(torch.float64), **case.kw())
    torch.testing.assert_close(valid_rows(got, case.n_new), valid_rows(want, case.n_new))
    scaled = tree_attention_ref(*case.args(torch.float64), sm_scale=0.3, **case.kw())
    torch.testing.assert_close(valid_rows(scaled, case.n_new),
                               valid_rows(brute_force(case, 0.3), case.n_new))


# --- the kernel against the reference ----------------------------------------------------------
@kernel_test
@pytest.mark.parametrize("start", [0, 21])
@pytest.mark.parametrize(("heads", "kv_heads", "head_dim"), [(2, 2, 16), (6, 2, 32), (3, 1, 64)])
def test_causal_prefill(start, heads, kv_heads, head_dim):
    case = make_case([start, start // 2], [9, 7], 9, heads, kv_heads, head_dim, seed=start)
    check(case, block_n=16)


@kernel_test
def test_causal_prefill_many_query_tiles():
    # 80 tokens x G=1: two 64-row query tiles; the causal limit cuts the first tile's key range.
    case = make_case([5], [80], 80, 1, 1, 16, seed=2)
    check(case, block_n=16)


@kernel_test
@pytest.mark.parametrize("split_len", [None, 16])
@pytest.mark.parametrize(("heads", "kv_heads"), [(4, 4), (6, 2)])
def test_decode_ragged(split_len, heads, kv_heads):
    # split_len=16: several splits per sequence, with empty splits for the short ones.
    case = make_case([0, 13, 50, 31], [1, 1, 1, 1], 1, heads, kv_heads, 32, seed=3)
    check(case, block_n=16, split_len=split_len)


@kernel_test
def test_decode_splits_by_default_at_long_context():
    cfg = attention_config(1, 1, 32, 8, 128, 8192, "cpu")
    assert cfg.n_splits > 1 and cfg.split_len % cfg.block_n == 0
    case = make_case([600, 300], [1, 1], 1, 2, 1, 16, seed=4)
    assert attention_config(2, 1, 2, 1, 16, 901, "cpu").n_splits > 2
    check(case, kv_len=901)  # the launcher's own split choice, with 64-slot blocks


@kernel_test
@pytest.mark.parametrize("kv_len", [1, 20])
def test_kv_len_hint_too_small_still_reads_every_slot(kv_len):
    # The hint sizes the split grid only: the last split runs to each sequence's end.
    case = make_case([50, 9], [1, 1], 1, 2, 1, 16, seed=15)
    check(case, kv_len=kv_len, block_n=16, split_len=16)


@kernel_test
@pytest.mark.parametrize("width", [1, 5, 16])
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_random_tree(width, kv_heads):
    rng = random.Random(width * 10 + kv_heads)
    n_new = [width, max(1, width - 2)]
    trees = [tree_from_parents(random_parents(rng, width)) for _ in n_new]
    case = make_case([7, 18], n_new, width, 3 * kv_heads, kv_heads, 32, trees=trees,
                     seed=width)
    check(case, block_n=16)


@kernel_test
@settings(max_examples=8, deadline=None)
@given(data=st.data())
def test_random_tree_hypothesis(data):
    width = data.draw(st.integers(1, 12), label="T")
    parents = [data.draw(st.integers(-1, i - 1), label=f"parent[{i}]") for i in range(width)]
    start = data.draw(st.integers(0, 40), label="start")
    n_new = data.draw(st.integers(1, width), label="n_new")
    split = data.draw(st.sampled_from([None, 16]), label="split_len")
    tree = tree_from_parents(parents)
    # The padding rows' bits are garbage on purpose: they must not matter.
    case = make_case([start], [n_new], width, 2, 1, 16, trees=[tree], seed=start)
    case.bits[0, n_new:] = -1
    check(case, block_n=16, split_len=split)


@kernel_test
def test_tree_deep_bit_63():
    # A 64-node chain: the last node's bits include bit 63 (int64's sign bit).
    tree = tree_from_parents(list(range(-1, 63)))
    case = make_case([3], [64], 64, 1, 1, 16, trees=[tree], seed=5)
    check(case, block_n=64)


@kernel_test
@pytest.mark.parametrize(("starts", "n_new", "width", "window", "split_len"), [
    ([7, 18], [4, 2], 4, [9, 6], None),  # T 4 inside windows of 9 and 6 slots
    ([0, 33, 5], [1, 3, 2], 3, [2, 17, 5], 16),  # start 0; split-K cuts the 17-slot window
    ([3], [5], 5, [64], None),  # the widest window: bit 63 (int64's sign bit) addressed
])
def test_window_wider_than_step(starts, n_new, width, window, split_len):
    # GSD's level-by-level draft: the step's queries sit anywhere in a window of earlier nodes.
    rng = random.Random(sum(window))
    trees = [window_tree(rng, n, width, w) for n, w in zip(n_new, window)]
    case = make_case(starts, n_new, width, 6, 2, 32, trees=trees, window=window, seed=width)
    check(case, block_n=16, split_len=split_len)


@kernel_test
def test_window_odd_sizes_prefix_sharing_and_causal():
    # starts 7/12/9, T 3, windows 11/3/6, H 6, Hkv 3, D 24 (padded to 32), a shared prefix.
    rng = random.Random(21)
    trees = [window_tree(rng, n, 3, w) for n, w in zip([3, 1, 2], [11, 3, 6])]
    kw = dict(window=[11, 3, 6], share=[None, (0, 5), (0, 7)], seed=21)
    check(make_case([7, 12, 9], [3, 1, 2], 3, 6, 3, 24, trees=trees, **kw), block_n=16)
    check(make_case([7, 12, 9], [3, 1, 2], 3, 6, 3, 24, **kw), block_n=16)  # causal


@kernel_test
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_window_low_precision(dtype):
    rng = random.Random(22)
    trees = [window_tree(rng, n, 8, w) for n, w in zip([8, 5], [30, 12])]
    case = make_case([40, 3], [8, 5], 8, 4, 1, 64, trees=trees, window=[30, 12], seed=22)
    check(case, dtype, block_n=32)


@kernel_test
@pytest.mark.parametrize("split_len", [None, 16])
def test_prefix_sharing(split_len):
    rng = random.Random(6)
    trees = [tree_from_parents(random_parents(rng, 4)) for _ in range(3)]
    case = make_case([20, 25, 9], [4, 4, 2], 4, 4, 2, 32, trees=trees,
                     share=[None, (0, 17), (0, 9)], seed=6)
    check(case, block_n=16, split_len=split_len)
    causal = make_case([20, 25, 9], [4, 4, 2], 4, 4, 2, 32, share=[None, (0, 17), (0, 9)], seed=7)
    check(causal, block_n=16)


@kernel_test
def test_odd_sizes():
    # starts 7, T 5, H 6, Hkv 2, D 32; one sequence with fewer new tokens than T.
    trees = [tree_from_parents([-1, 0, 1, 0, 3]), tree_from_parents([-1, -1, 1, 2, 2])]
    case = make_case([7, 12], [5, 3], 5, 6, 2, 32, trees=trees, seed=8)
    check(case, block_n=16)
    check(make_case([7, 12], [5, 3], 5, 6, 2, 32, seed=8), block_n=16)


@kernel_test
def test_head_dim_not_power_of_two():
    check(make_case([9], [3], 3, 2, 1, 24, seed=9), block_n=16)


@kernel_test
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["prefill", "decode_split", "tree"])
def test_low_precision(dtype, kind):
    rng = random.Random(10)
    if kind == "prefill":
        case, launch = make_case([0, 30], [16, 11], 16, 6, 2, 64, seed=10), {}
    elif kind == "decode_split":
        case, launch = make_case([70, 33, 1], [1, 1, 1], 1, 4, 1, 64, seed=11), {"split_len": 32}
    else:
        trees = [tree_from_parents(random_parents(rng, 16)) for _ in range(2)]
        case, launch = make_case([40, 23], [16, 9], 16, 3, 1, 64, trees=trees, seed=12), {}
    check(case, dtype, block_n=32, **launch)


@kernel_test
def test_strided_q_and_sm_scale():
    case = make_case([11, 4], [3, 2], 3, 4, 2, 16, seed=13)
    qkv = torch.randn(2, 3, 4 + 2 * 2, 16)
    qkv[:, :, :4] = case.q
    q = qkv[:, :, :4]  # a view into a fused QKV tensor: strided heads and tokens
    assert not q.is_contiguous()
    args = (q, case.k, case.v, case.rows, case.starts, case.n_new, None)
    got = tree_attention(*on_device(args), sm_scale=0.2, block_n=16).cpu()
    want = tree_attention_ref(*args, sm_scale=0.2)
    torch.testing.assert_close(valid_rows(got, case.n_new), valid_rows(want, case.n_new),
                               atol=2e-5, rtol=1e-5)


@kernel_test
def test_padding_rows_that_see_nothing_stay_finite():
    # start 0 and all-zero bits for the padding rows: they see no slot at all.
    case = make_case([0], [2], 4, 2, 2, 16, trees=[torch.eye(4, dtype=torch.bool)], seed=14)
    case.bits[0, 2:] = 0
    for split in (None, 16):
        out = tree_attention(*on_device(case.args()), block_n=16, split_len=split)
        assert out.isfinite().all()


def test_launch_configs():
    decode = attention_config(1, 1, 32, 8, 128, 8192, "cpu")
    assert (decode.block_m, decode.block_n, decode.block_d) == (16, 64, 128)
    assert decode.n_splits * decode.split_len >= 8192
    prefill = attention_config(1, 512, 32, 8, 128, 512, "cpu")
    assert (prefill.block_m, prefill.n_splits) == (64, 1)
    assert attention_config(8, 1, 32, 8, 64, 200, "cpu").n_splits == 1  # too short to split


@kernel_test
def test_bad_inputs_name_the_field():
    case = make_case([3], [2], 2, 2, 1, 16)
    q, k, v, rows, starts, n_new, bits, _ = on_device(case.args())
    with pytest.raises(ValueError, match="starts must be int64"):
        tree_attention(q, k, v, rows, starts.int(), n_new, bits)
    with pytest.raises(ValueError, match="multiple of the cache's"):
        k2 = torch.zeros(2, 2, k.shape[2], 16, device=DEVICE)
        tree_attention(torch.zeros(1, 2, 3, 16, device=DEVICE), k2, k2, rows, starts, n_new, bits)
    with pytest.raises(ValueError, match="v_cache must be"):
        tree_attention(q, k, v.half(), rows, starts, n_new, bits)
    with pytest.raises(ValueError, match="window must be int64"):
        tree_attention(q, k, v, rows, starts, n_new, bits, window=n_new.int())
    with pytest.raises(ValueError, match="T must be <= 64"):
        tree_attention(torch.zeros(1, 65, 2, 16, device=DEVICE), k, v, rows, starts, n_new,
                       torch.zeros(1, 65, dtype=torch.long, device=DEVICE))


# --- GPU compile ------------------------------------------------------------------------------
COMPILE_FOR_SM90 = """
import os
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from treadle.kernels import attention as A

ints = ("stride_qb stride_qt stride_qh stride_kr stride_kh stride_kc stride_vr stride_vh stride_vc "
        "stride_bb stride_bt stride_kvb stride_kvs stride_ob stride_ot stride_oh T Hkv n_splits "
        "split_len").split()
# (dtype, IN_PREC, BLOCK_M, BLOCK_N, HAS_TREE, HAS_KV_ROWS, PARTIAL): the launcher's bf16 tree
# tile with every option on, and its fp32 causal decode tile.
for dt, prec, bm, bn, tree, kv_rows, partial in [("bf16", "tf32", 64, 64, True, True, True),
                                                 ("fp32", "ieee", 16, 32, False, False, False)]:
    sig = {n: f"*{dt}" for n in ("q_ptr", "k_ptr", "v_ptr", "o_ptr")}
    sig |= {n: "*i64" for n in ("rows_ptr", "starts_ptr", "n_new_ptr", "window_ptr", "bits_ptr",
                                "kv_rows_ptr")}
    sig |= {n: "*fp32" for n in ("pm_ptr", "pl_ptr", "pa_ptr")}
    sig |= {n: "i32" for n in ints} | {"qk_scale": "fp32"}
    consts = dict(G=4, HEAD_DIM=128, HAS_TREE=tree, HAS_KV_ROWS=kv_rows, PARTIAL=partial,
                  IN_PREC=prec, EMULATE_BF16=False, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=128)
    sig |= {k: "constexpr" for k in consts}
    src = triton.compiler.ASTSource(fn=A._tree_attention_kernel, signature=sig, constexprs=consts)
    triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4, num_stages=2))
"""


def test_kernel_compiles_for_a_gpu():
    """The interpreter accepts more than the compiler: build the attention kernel (tree bits over a
    pending window, prefix sharing, split-K; and the fp32 causal tile) to sm_90 machine code
    (Triton's bundled ptxas; no GPU needed) in a process without TRITON_INTERPRET."""
    import subprocess
    import sys

    if A.triton is None:
        pytest.skip("needs the triton package")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-P", "-c", COMPILE_FOR_SM90], env=env,
                         capture_output=True, text=True, timeout=600)
    if res.returncode and "ptxas" in res.stderr and "not found" in res.stderr.lower():
        pytest.skip("Triton's CUDA backend (ptxas) is not available here")
    assert res.returncode == 0, res.stderr[-3000:]
