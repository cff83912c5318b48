"""Every kernel against its `_ref` and torch's best equivalent, on the GPU, in one run.

    python perf/bench_kernels.py [--ops rmsnorm,rope,swiglu,kv_commit,attention,verify,sampling]

Each op's benchmark lives beside it (perf/bench_<op>.py, mirroring kernels/<op>.py) and states its
byte or FLOP formula in every row: GB/s = bytes read + written / time; TFLOP/s = FLOPs / time,
timed with triton.testing.do_bench (median). This script runs them all and writes, named with the
GPU, perf/results/bench_kernels-<gpu>.json (rewritten after every op, so a run cut short keeps what
it measured) and .csv (the same rows, one per line, with the kernel's name). An op that fails is
recorded with its error and the others still run; the exit code is then 1. Needs CUDA; prints why
and exits 0 without it.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import re
import sys
import traceback
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
OPS = ("rmsnorm", "rope", "swiglu", "kv_commit", "attention", "verify", "sampling")


def load_bench(op: str):
    spec = importlib.util.spec_from_file_location(f"bench_{op}", HERE / f"bench_{op}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def device_label(name: str) -> str:
    """A GPU name as a file-name part: 'NVIDIA H200' -> 'NVIDIA_H200'."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_")


def save(result: dict, stem: Path) -> None:
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    rows = result["rows"]
    fields = ["kernel"] + sorted({k for r in rows for k in r} - {"kernel"})
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--out-dir", type=Path, default=HERE / "results")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels needs a CUDA GPU; none here, nothing measured.")
        return 0
    ops = args.ops.split(",")
    unknown = [op for op in ops if op not in OPS]
    if unknown:
        ap.error(f"--ops: unknown {unknown}; known: {', '.join(OPS)}")
    gpu = torch.cuda.get_device_name()
    stem = args.out_dir / f"bench_kernels-{device_label(gpu)}"
    result = {
        "benchmark": "kernels vs their _ref and torch", "gpu": gpu, "torch": torch.__version__,
        "command": " ".join([Path(sys.executable).name, *sys.argv]), "rows": [], "errors": {},
    }
    for op in ops:
        try:
            for row in load_bench(op).run("cuda"):
                row = {"kernel": op, **row}
                result["rows"].append(row)
                print(json.dumps(row), flush=True)
        except Exception:  # the other ops still run; the exit code says one failed
            result["errors"][op] = traceback.format_exc(limit=-8)
            print(f"bench_kernels: {op} failed:\n{result['errors'][op]}", file=sys.stderr)
        save(result, stem)
    print(f"saved {stem}.json, .csv" + (f"; failed: {', '.join(result['errors'])}"
                                        if result["errors"] else ""))
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
