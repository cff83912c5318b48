"""RoPE bandwidth: Triton rope_ (in place, position gather inside) vs rope_ref, at real shapes.

    python perf/bench_rope.py    # needs CUDA

Results go to perf/results/bench_rope-<gpu name>.json.

Shapes: the q and k heads of a fused QKV output [1, T, (H + 2*Hkv) * Dh], viewed as
x [1, T, H + Hkv, Dh], for T tokens in (1, 8, 512) and two models: hidden 2048 (H=32, Hkv=8,
Dh=64, Llama-3.2-1B) and hidden 4096 (H=32, Hkv=8, Dh=128, Llama-3-8B); bf16 on the GPU (fp32
when run("cpu") times the ref), fp32 tables [8192, Dh]. Impls:
    triton = kernels.rope.rope_(x, positions, cos_table, sin_table), in place on the strided view
    ref    = rope_ref(x, cos_table[positions], sin_table[positions]), the eager torch formulation
             (out of place, table gather included). torch has no fused RoPE op: no "torch" row.
Bytes the op must move (the same formula for every impl):
    2 * T * (H + Hkv) * Dh * elem  +  2 * T * Dh * 4  +  T * 8
    (read and write x; read a cos and a sin row per token; read the positions)
GB/s = bytes / time. Time: triton.testing.do_bench median on CUDA; median of perf_counter on CPU.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path

import torch
from treadle.kernels.rope import rope_, rope_ref, rope_tables

RESULTS = Path(__file__).resolve().parent / "results"
TOKENS = (1, 8, 512)
MODELS = {2048: (32, 8, 64), 4096: (32, 8, 128)}  # hidden -> (H, Hkv, Dh)
MAX_POSITIONS = 8192


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


def run(device: str) -> list[dict]:
    """Rows {op, shape, impl, ms, gbps, formula}; the Triton kernel only on CUDA."""
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    elem = torch.tensor([], dtype=dtype).element_size()
    formula = "2*T*(H+Hkv)*Dh*elem + 2*T*Dh*4 + T*8"
    rows = []
    for hidden, (H, Hkv, Dh) in MODELS.items():
        inv_freq = 1.0 / 500000.0 ** (torch.arange(0, Dh, 2, dtype=torch.float32) / Dh)
        cos, sin = (t.to(device) for t in rope_tables(inv_freq, MAX_POSITIONS))
        for T in TOKENS:
            qkv = torch.randn(1, T, (H + 2 * Hkv) * Dh, dtype=dtype, device=device)
            x = qkv[..., : (H + Hkv) * Dh].view(1, T, H + Hkv, Dh)  # [1, T, H + Hkv, Dh] strided
            positions = torch.randint(0, MAX_POSITIONS, (1, T), device=device)
            nbytes = 2 * T * (H + Hkv) * Dh * elem + 2 * T * Dh * 4 + T * 8
            impls = {
                "triton": lambda: rope_(x, positions, cos, sin),
                "ref": lambda: rope_ref(x, cos[positions], sin[positions]),
            }
            for impl, fn in impls.items():
                if impl == "triton" and not cuda:
                    continue
                ms = time_ms(fn, device)
                rows.append({
                    "op": "rope", "impl": impl, "ms": ms, "gbps": nbytes / (ms * 1e-3) / 1e9,
                    "shape": f"hidden={hidden} T={T} H+Hkv={H + Hkv} Dh={Dh} "
                             f"{str(dtype).removeprefix('torch.')}",
                    "formula": formula,
                })
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"{'op':<6} {'shape':<46} {'impl':<7} {'ms':>9} {'GB/s':>9}")
    for r in rows:
        print(f"{r['op']:<6} {r['shape']:<46} {r['impl']:<7} {r['ms']:>9.4f} {r['gbps']:>9.1f}")


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_rope: the GPU benchmark needs CUDA; no CUDA device here, nothing run")
        return 0
    import triton

    rows = run("cuda")
    print_rows(rows)
    name = torch.cuda.get_device_name()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"bench_rope-{re.sub(r'[^A-Za-z0-9._]+', '-', name)}.json"
    path.write_text(json.dumps({
        "device": name, "torch": torch.__version__, "triton": triton.__version__,
        "command": "python perf/bench_rope.py", "rows": rows,
    }, indent=1) + "\n")
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
