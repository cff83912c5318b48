"""KV commit bandwidth: Triton kv_commit_ vs kv_commit_ref vs one batched torch index copy.

    python perf/bench_kv_commit.py    # needs CUDA

Results go to perf/results/bench_kv_commit-<gpu name>.json.

Shapes: caches k, v [L, B, Hkv, C, Dh] with C = 256 slots, for two models: hidden 2048 (L=16,
Hkv=8, Dh=64, Llama-3.2-1B) and hidden 4096 (L=32, Hkv=8, Dh=128, Llama-3-8B); B sequences in
(1, 8), each accepting a path of N = 6 nodes (A = 8 columns, padded) out of a tree written after
its committed length; bf16 on the GPU (fp32 when run("cpu") times the refs). Impls:
    triton = kernels.kv_commit.kv_commit_ (one launch for all layers, heads and sequences)
    ref    = kv_commit_ref (a gather-then-scatter per sequence, host loop)
    torch  = k[:, r, :, dst] = k[:, r, :, src] (and v) over all sequences at once, with the flat
             (row, src, dst) index tensors built before timing
Bytes the op must move (the same formula for every impl):  2 * 2 * B * N * L * Hkv * Dh * elem
    (k and v; read each accepted slot's vector and write it to its new slot)
GB/s = bytes / time. Time: triton.testing.do_bench median on CUDA; median of perf_counter on CPU.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path

import torch
from treadle.kernels.kv_commit import kv_commit_, kv_commit_ref

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {2048: (16, 8, 64), 4096: (32, 8, 128)}  # hidden -> (L, Hkv, Dh)
BATCHES = (1, 8)
CAPACITY, WIDTH, N_ACCEPT = 256, 8, 6


def time_ms(fn, device: str) -> float:
    if device.startswith("cuda"):
        from triton.testing import do_bench

        return do_bench(fn, return_mode="median")
    fn()  # warm-up
    times = []
    for _ in range(20):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def commit_inputs(batch: int, device: str):
    """Per sequence: committed length 100 + 10 b, a 24-node tree after it, and an accepted path of
    N_ACCEPT strictly increasing slots inside the tree (padded to WIDTH with -1)."""
    g = torch.Generator().manual_seed(0)
    starts = torch.tensor([100 + 10 * b for b in range(batch)])
    src = torch.full((batch, WIDTH), -1, dtype=torch.long)
    for b in range(batch):
        nodes = torch.randperm(23, generator=g)[: N_ACCEPT - 1].sort().values + 1
        src[b, :N_ACCEPT] = starts[b] + torch.cat((torch.zeros(1, dtype=torch.long), nodes))
    n_accept = torch.full((batch,), N_ACCEPT)
    rows = torch.arange(batch)
    return tuple(t.to(device) for t in (rows, starts, src, n_accept))


def run(device: str) -> list[dict]:
    """Rows {op, shape, impl, ms, gbps, formula}; the Triton kernel only on CUDA."""
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    elem = torch.tensor([], dtype=dtype).element_size()
    out = []
    for hidden, (L, Hkv, Dh) in MODELS.items():
        for B in BATCHES:
            k = torch.randn(L, B, Hkv, CAPACITY, Dh, dtype=dtype, device=device)
            v = torch.randn_like(k)
            rows, starts, src, n_accept = commit_inputs(B, device)
            flat_row = rows.repeat_interleave(N_ACCEPT)  # [B * N]
            flat_src = src[:, :N_ACCEPT].reshape(-1)
            flat_dst = (starts[:, None] + torch.arange(N_ACCEPT, device=device)).reshape(-1)

            def torch_commit():
                for cache in (k, v):
                    cache[:, flat_row, :, flat_dst] = cache[:, flat_row, :, flat_src]

            nbytes = 2 * 2 * B * N_ACCEPT * L * Hkv * Dh * elem
            impls = {
                "triton": lambda: kv_commit_(k, v, rows, starts, src, n_accept),
                "ref": lambda: kv_commit_ref(k, v, rows, starts, src, n_accept),
                "torch": torch_commit,
            }
            for impl, fn in impls.items():
                if impl == "triton" and not cuda:
                    continue
                ms = time_ms(fn, device)
                out.append({
                    "op": "kv_commit", "impl": impl, "ms": ms,
                    "gbps": nbytes / (ms * 1e-3) / 1e9,
                    "shape": f"hidden={hidden} L={L} B={B} Hkv={Hkv} Dh={Dh} N={N_ACCEPT} "
                             f"C={CAPACITY} {str(dtype).removeprefix('torch.')}",
                    "formula": "2*2*B*N*L*Hkv*Dh*elem",
                })
    return out


def print_rows(rows: list[dict]) -> None:
    print(f"{'op':<10} {'shape':<58} {'impl':<7} {'ms':>9} {'GB/s':>9}")
    for r in rows:
        print(f"{r['op']:<10} {r['shape']:<58} {r['impl']:<7} {r['ms']:>9.4f} {r['gbps']:>9.1f}")


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_kv_commit: the GPU benchmark needs CUDA; no CUDA device here, nothing run")
        return 0
    import triton

    rows = run("cuda")
    print_rows(rows)
    name = torch.cuda.get_device_name()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"bench_kv_commit-{re.sub(r'[^A-Za-z0-9._]+', '-', name)}.json"
    path.write_text(json.dumps({
        "device": name, "torch": torch.__version__, "triton": triton.__version__,
        "command": "python perf/bench_kv_commit.py", "rows": rows,
    }, indent=1) + "\n")
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
