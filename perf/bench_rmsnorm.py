"""RMSNorm bandwidth: Triton rmsnorm / add_rmsnorm vs their _ref vs torch, at real shapes.

    python perf/bench_rmsnorm.py    # needs CUDA

Results go to perf/results/bench_rmsnorm-<gpu name>.json.

Shapes: x [T, D] for T tokens in (1, 8, 512) and hidden D in (2048, 4096), bf16 on the GPU (fp32
when run("cpu") times the refs). Impls:
    rmsnorm      triton = kernels.rmsnorm.rmsnorm, ref = rmsnorm_ref, torch = F.rms_norm
    add_rmsnorm  triton = add_rmsnorm (fused), ref = add_rmsnorm_ref, torch = x + r, then F.rms_norm
Bytes the op must move (the same formula for every impl, so a slower impl shows fewer GB/s):
    rmsnorm      (2 * T * D + D) * elem     read x, write y, read the weight
    add_rmsnorm  (4 * T * D + D) * elem     read x and residual, write y and h, read the weight
GB/s = bytes / time. Time: triton.testing.do_bench median on CUDA; median of perf_counter on CPU.
"""

from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from treadle.kernels.rmsnorm import add_rmsnorm, add_rmsnorm_ref, rmsnorm, rmsnorm_ref

RESULTS = Path(__file__).resolve().parent / "results"
EPS = 1e-5
TOKENS = (1, 8, 512)
HIDDEN = (2048, 4096)


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
    """Rows {op, shape, impl, ms, gbps, formula}; the Triton kernels only on CUDA."""
    cuda = device.startswith("cuda")
    dtype = torch.bfloat16 if cuda else torch.float32
    elem = torch.tensor([], dtype=dtype).element_size()
    rows = []
    for D in HIDDEN:
        for T in TOKENS:
            x = torch.randn(T, D, dtype=dtype, device=device)
            r = torch.randn(T, D, dtype=dtype, device=device)
            w = torch.rand(D, dtype=dtype, device=device) + 0.5
            cases = {
                "rmsnorm": ((2 * T * D + D) * elem, "(2*T*D + D) * elem", {
                    "triton": lambda: rmsnorm(x, w, EPS),
                    "ref": lambda: rmsnorm_ref(x, w, EPS),
                    "torch": lambda: F.rms_norm(x, (D,), w, EPS),
                }),
                "add_rmsnorm": ((4 * T * D + D) * elem, "(4*T*D + D) * elem", {
                    "triton": lambda: add_rmsnorm(x, r, w, EPS),
                    "ref": lambda: add_rmsnorm_ref(x, r, w, EPS),
                    "torch": lambda: F.rms_norm(x + r, (D,), w, EPS),
                }),
            }
            for op, (nbytes, formula, impls) in cases.items():
                for impl, fn in impls.items():
                    if impl == "triton" and not cuda:
                        continue
                    ms = time_ms(fn, device)
                    rows.append({
                        "op": op, "shape": f"T={T} D={D} {str(dtype).removeprefix('torch.')}",
                        "impl": impl, "ms": ms, "gbps": nbytes / (ms * 1e-3) / 1e9,
                        "formula": formula,
                    })
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"{'op':<13} {'shape':<26} {'impl':<7} {'ms':>9} {'GB/s':>9}")
    for r in rows:
        print(f"{r['op']:<13} {r['shape']:<26} {r['impl']:<7} {r['ms']:>9.4f} {r['gbps']:>9.1f}")


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_rmsnorm: the GPU benchmark needs CUDA; no CUDA device here, nothing run")
        return 0
    import triton

    rows = run("cuda")
    print_rows(rows)
    name = torch.cuda.get_device_name()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"bench_rmsnorm-{re.sub(r'[^A-Za-z0-9._]+', '-', name)}.json"
    path.write_text(json.dumps({
        "device": name, "torch": torch.__version__, "triton": triton.__version__,
        "command": "python perf/bench_rmsnorm.py", "rows": rows,
    }, indent=1) + "\n")
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
