"""Cost of the default model's weight products against the number of rows multiplied at once.

    python perf/bench_linear.py [--rows 1,2,3,4,6,8,12,16] [--repeats 5]

A speculative verify step multiplies every weight matrix by k rows (one per tree node) where AR
multiplies by one, so how the product's cost grows with k decides how large a tree can pay off.
Shapes are SmolLM2-135M's (30 layers: qkv 960x576, o 576x576, gate_up 3072x576, down 576x1536;
tied LM head 49152x576), random weights. Per product path, the best of --repeats passes over all
31 matrices:
    ms          = wall milliseconds of one pass (= the weight-product time of one forward)
    GB/s        = weight bytes of one pass / seconds (the bytes a pass must at least read)
    vs 1 row    = ms(k rows) / ms(1 row) of the same path
Paths: fp32 via numpy/OpenBLAS (treadle's fp32 CPU path, kernels/linear.py), the same with the
product always as W @ x.T, fp32 via torch (F.linear, and as W @ x.T), bf16 weights via
torch/oneDNN (F.linear on bf16 inputs: treadle's weight-only bf16 path, kernels/linear.py).
Results: perf/results/bench_linear-<host>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import RESULTS, machine  # noqa: E402

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)] * 30 + [(49152, 576)]


def numpy_fp32(w: np.ndarray, x: np.ndarray) -> np.ndarray:
    return (w @ x.T).T if x.shape[0] == 1 else x @ w.T


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", default="1,2,3,4,6,8,12,16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    w32 = [rng.standard_normal(s, dtype=np.float32) for s in SHAPES]
    t32 = [torch.from_numpy(w) for w in w32]
    t16 = [w.to(torch.bfloat16) for w in t32]
    paths = {
        "fp32 numpy": (lambda i, x: numpy_fp32(w32[i], x), 4),
        "fp32 numpy W @ x.T": (lambda i, x: (w32[i] @ x.T).T, 4),
        "fp32 torch": (lambda i, x: F.linear(torch.from_numpy(x), t32[i]), 4),
        "fp32 torch W @ x.T": (lambda i, x: (t32[i] @ torch.from_numpy(x).T).T, 4),
        "bf16 weights torch": (
            lambda i, x: F.linear(torch.from_numpy(x).to(torch.bfloat16), t16[i]).float(),
            2,
        ),
    }
    load0 = os.getloadavg()
    rows = []
    for k in (int(r) for r in args.rows.split(",")):
        xs = {n: rng.standard_normal((k, n), dtype=np.float32) for n in {s[1] for s in SHAPES}}
        for name, (fn, bytes_per) in paths.items():
            best = float("inf")
            for _ in range(args.repeats):
                t = time.perf_counter()
                for i, (_, n) in enumerate(SHAPES):
                    fn(i, xs[n])
                best = min(best, time.perf_counter() - t)
            nbytes = sum(o * n for o, n in SHAPES) * bytes_per
            rows.append({"path": name, "rows": k, "ms": round(best * 1e3, 2),
                         "GB_per_s": round(nbytes / best / 1e9, 1)})
    for r in rows:
        one = next(x for x in rows if x["path"] == r["path"] and x["rows"] == 1)
        r["vs_1_row"] = round(r["ms"] / one["ms"], 2)
        print(json.dumps(r))
    result = {
        "benchmark": "weight products of one SmolLM2-135M forward vs rows (tree nodes) per step",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "torch_threads": args.threads,
        "load_average_at_start": [round(v, 2) for v in load0],
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
        "formula": "ms = best wall ms of one pass over the 121 matrices; GB/s = weight bytes / s; "
        "vs_1_row = ms(k) / ms(1) on the same path",
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"bench_linear-{platform.node() or 'host'}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
