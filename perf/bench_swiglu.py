"""SwiGLU bandwidth: Triton swiglu vs swiglu_ref vs an in-place torch variant, at real shapes.

    python perf/bench_swiglu.py    # needs CUDA

Results go to perf/results/bench_swiglu-<gpu name>.json.

Shapes: gate_up [T, 2F] for T tokens in (1, 8, 512) and two models: hidden 2048 (F = 8192,
Llama-3.2-1B) and hidden 4096 (F = 14336, Llama-3-8B); bf16 on the GPU (fp32 when run("cpu") times
the refs). Impls:
    triton = kernels.swiglu.swiglu(gate_up)
    ref    = swiglu_ref(gate_up) = F.silu(gate) * up
    torch  = F.silu(gate).mul_(up): torch has no fused silu-and-mul op; this saves one temporary
Bytes the op must move (the same formula for every impl):  3 * T * F * elem  (read 2F, write F)
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
from treadle.kernels.swiglu import swiglu, swiglu_ref

RESULTS = Path(__file__).resolve().parent / "results"
TOKENS = (1, 8, 512)
MODELS = {2048: 8192, 4096: 14336}  # hidden -> intermediate size F


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
    rows = []
    for hidden, n_ff in MODELS.items():
        for T in TOKENS:
            gate_up = torch.randn(T, 2 * n_ff, dtype=dtype, device=device)
            gate, up = gate_up.chunk(2, dim=-1)
            nbytes = 3 * T * n_ff * elem
            impls = {
                "triton": lambda: swiglu(gate_up),
                "ref": lambda: swiglu_ref(gate_up),
                "torch": lambda: F.silu(gate).mul_(up),
            }
            for impl, fn in impls.items():
                if impl == "triton" and not cuda:
                    continue
                ms = time_ms(fn, device)
                rows.append({
                    "op": "swiglu", "impl": impl, "ms": ms, "gbps": nbytes / (ms * 1e-3) / 1e9,
                    "shape": f"hidden={hidden} T={T} F={n_ff} {str(dtype).removeprefix('torch.')}",
                    "formula": "3*T*F*elem",
                })
    return rows


def print_rows(rows: list[dict]) -> None:
    print(f"{'op':<7} {'shape':<38} {'impl':<7} {'ms':>9} {'GB/s':>9}")
    for r in rows:
        print(f"{r['op']:<7} {r['shape']:<38} {r['impl']:<7} {r['ms']:>9.4f} {r['gbps']:>9.1f}")


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_swiglu: the GPU benchmark needs CUDA; no CUDA device here, nothing run")
        return 0
    import triton

    rows = run("cuda")
    print_rows(rows)
    name = torch.cuda.get_device_name()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"bench_swiglu-{re.sub(r'[^A-Za-z0-9._]+', '-', name)}.json"
    path.write_text(json.dumps({
        "device": name, "torch": torch.__version__, "triton": triton.__version__,
        "command": "python perf/bench_swiglu.py", "rows": rows,
    }, indent=1) + "\n")
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
