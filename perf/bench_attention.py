"""Tree attention over the KV cache: Triton tree_attention vs tree_attention_ref vs torch SDPA.

    python perf/bench_attention.py   # needs CUDA; -> perf/results/bench_attention-<gpu>.json

Models (bf16): llama7b H=32 Hkv=32 D=128 (MHA), llama3-8b H=32 Hkv=8 D=128, llama1b H=32 Hkv=8
D=64. Ops, all reading a cache [B, Hkv, C, D] (one row per sequence, C = S):
    decode   B in (1, 8), one new token after S - 1 committed (S = 512, 2048, 8192 slots read)
    verify   B = 1, a random token tree of T in (8, 16, 32, 64) nodes over a 1024-token prefix
    prefill  B = 1, T = 512 new tokens from an empty cache, causal
Impls:
    triton      kernels.attention.tree_attention, reading the cache in place
    ref         kernels.attention.tree_attention_ref: gather K/V, build the dense mask, SDPA
    torch_sdpa  F.scaled_dot_product_attention on K/V already gathered to [B, Hkv, S, D] (gather
                and mask outside the timing); the faster of enable_gqa=True and K/V expanded to H
                heads beforehand ("variant" says which); decode without a mask, verify with the
                tree mask, prefill with is_causal
Formulas (the same for every impl, elem = 2 bytes):
    GB/s     = K+V bytes read / time,  bytes = 2 * B * Hkv * S * D * elem
    TFLOP/s  = 4 * B * H * T * S_avg * D / time  (QK^T and PV, 2 flops per multiply-add), with
               S_avg = S for decode and verify (the tree mask skips a few new slots: ignored) and
               S_avg = (T + 1) / 2 for causal prefill from an empty cache (causal halves it)
Rows report both; read GB/s for decode and verify (memory-bound), TFLOP/s for prefill.
Time: triton.testing.do_bench median. Each shape first checks triton against ref ("max_err").
"""

from __future__ import annotations

import json
import os
import random
import re
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from treadle.kernels.attention import tree_attention, tree_attention_ref, tree_bits_from_mask

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {"llama7b": (32, 32, 128), "llama3-8b": (32, 8, 128), "llama1b": (32, 8, 64)}
# (op, B, T new tokens, S slots read)
CASES = (
    [("decode", b, 1, s) for b in (1, 8) for s in (512, 2048, 8192)]
    + [("verify", 1, t, 1024 + t) for t in (8, 16, 32, 64)]
    + [("prefill", 1, 512, 512)]
)


def time_ms(fn, device: str) -> float:
    if device.startswith("cuda"):
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()  # warm-up
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def random_tree(width: int, rng: random.Random) -> torch.Tensor:
    """[T, T] visibility of a random token tree (parent of node i < i; -1: child of the prefix)."""
    vis = torch.eye(width, dtype=torch.bool)
    for i in range(width):
        parent = rng.randrange(-1, i)
        if parent >= 0:
            vis[i] |= vis[parent]
    return vis


def run(device: str, models: dict | None = None, cases: tuple | None = None) -> list[dict]:
    """Rows {op, shape, impl, ms, gbps, tflops, formula}. The Triton kernel runs on CUDA (or on
    the CPU under TRITON_INTERPRET=1, for a smoke test at tiny shapes)."""
    cuda = device.startswith("cuda")
    with_triton = cuda or os.environ.get("TRITON_INTERPRET") == "1"
    dtype = torch.bfloat16 if cuda else torch.float32
    elem = torch.tensor([], dtype=dtype).element_size()
    rng = random.Random(0)
    out = []
    for model, (H, Hkv, D) in (models or MODELS).items():
        G = H // Hkv
        for op, B, T, S in cases or CASES:
            start = S - T
            q = torch.randn(B, T, H, D, dtype=dtype, device=device)
            k_cache = torch.randn(B, Hkv, S, D, dtype=dtype, device=device)
            v_cache = torch.randn(B, Hkv, S, D, dtype=dtype, device=device)
            rows = torch.arange(B, device=device)
            starts = torch.full((B,), start, dtype=torch.long, device=device)
            n_new = torch.full((B,), T, dtype=torch.long, device=device)
            bits = None
            if op == "verify":
                tree = torch.stack([random_tree(T, rng) for _ in range(B)])  # [B, T, T]
                bits = tree_bits_from_mask(tree).to(device)
            args = (q, k_cache, v_cache, rows, starts, n_new, bits)

            # torch SDPA on gathered K/V: the mask (verify only) is built outside the timing.
            qh = q.transpose(1, 2)  # [B, H, T, D]
            mask = None
            if op == "verify":
                slot = torch.arange(S)
                mask = torch.ones(B, 1, T, S, dtype=torch.bool)
                mask[:, 0, :, start:] = tree[:, :, slot[start:] - start]
                mask = mask.to(device)
            causal = op == "prefill"
            k_rep = k_cache.repeat_interleave(G, dim=1) if G > 1 else k_cache
            v_rep = v_cache.repeat_interleave(G, dim=1) if G > 1 else v_cache
            sdpa = {
                "enable_gqa": lambda: F.scaled_dot_product_attention(
                    qh, k_cache, v_cache, attn_mask=mask, is_causal=causal, enable_gqa=G > 1),
                "expanded_kv": lambda: F.scaled_dot_product_attention(
                    qh, k_rep, v_rep, attn_mask=mask, is_causal=causal),
            }

            nbytes = 2 * B * Hkv * S * D * elem
            s_avg = (T + 1) / 2 if causal else S
            flops = 4 * B * H * T * s_avg * D
            shape = f"{model} B={B} T={T} S={S} H={H} Hkv={Hkv} D={D}"
            formula = (f"GB/s = 2*B*Hkv*S*D*{elem} / t; TFLOP/s = 4*B*H*T*S_avg*D / t, "
                       f"S_avg = {'(T+1)/2 (causal)' if causal else 'S'}")

            def row(impl: str, ms: float, **extra) -> dict:
                return {"op": op, "shape": shape, "impl": impl, "ms": ms,
                        "gbps": nbytes / (ms * 1e-3) / 1e9, "tflops": flops / (ms * 1e-3) / 1e12,
                        "formula": formula, **extra}

            ref = tree_attention_ref(*args)
            if with_triton:
                fn = lambda: tree_attention(*args, kv_len=S)  # noqa: E731
                err = (fn().float() - ref.float()).abs().max().item()
                out.append(row("triton", time_ms(fn, device), max_err=err))
            out.append(row("ref", time_ms(lambda: tree_attention_ref(*args), device)))
            timed = {name: time_ms(fn, device) for name, fn in sdpa.items()}
            best = min(timed, key=timed.get)
            out.append(row("torch_sdpa", timed[best], variant=best))
    return out


def print_rows(rows: list[dict]) -> None:
    print(f"{'op':<8} {'shape':<44} {'impl':<10} {'ms':>9} {'GB/s':>8} {'TFLOP/s':>8}  note")
    for r in rows:
        note = f"max_err={r['max_err']:.1e}" if "max_err" in r else r.get("variant", "")
        print(f"{r['op']:<8} {r['shape']:<44} {r['impl']:<10} {r['ms']:>9.4f} "
              f"{r['gbps']:>8.1f} {r['tflops']:>8.2f}  {note}")


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_attention: the benchmark needs a CUDA GPU; no CUDA device here, nothing run")
        return 0
    import triton

    rows = run("cuda")
    print_rows(rows)
    name = torch.cuda.get_device_name()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"bench_attention-{re.sub(r'[^A-Za-z0-9._]+', '-', name)}.json"
    path.write_text(json.dumps({
        "device": name, "torch": torch.__version__, "triton": triton.__version__,
        "command": "python perf/bench_attention.py", "rows": rows,
    }, indent=1) + "\n")
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
