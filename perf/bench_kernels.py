"""Every kernel against its `_ref` and torch's best equivalent, on the GPU, in one run.

    python perf/bench_kernels.py [--ops rmsnorm,rope,swiglu,kv_commit,attention,verify,sampling]

Each op's benchmark lives beside it (perf/bench_<op>.py, mirroring kernels/<op>.py) and states its
byte or FLOP formula in every row: GB/s = bytes read + written / time; TFLOP/s = FLOPs / time,
timed with triton.testing.do_bench (median). This script runs them all and writes one file,
perf/results/bench_kernels-<gpu>.json. Needs CUDA; prints why and exits 0 without it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
OPS = ("rmsnorm", "rope", "swiglu", "kv_commit", "attention", "verify", "sampling")


def load_bench(op: str):
    spec = importlib.util.spec_from_file_location(f"bench_{op}", HERE / f"bench_{op}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ops", default=",".join(OPS))
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels needs a CUDA GPU; none here, nothing measured.")
        return 0
    rows = []
    for op in args.ops.split(","):
        for row in load_bench(op).run("cuda"):
            rows.append(row)
            print(json.dumps(row), flush=True)
    gpu = torch.cuda.get_device_name()
    out = HERE / "results" / f"bench_kernels-{gpu.replace(' ', '_')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "kernels vs their _ref and torch", "gpu": gpu, "torch": torch.__version__,
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "rows": rows,
    }, indent=2) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
