"""Cost of the default model's weight products against the rows multiplied at once, per format.

    python perf/bench_linear.py [--rows 1-32] [--formats float32,bfloat16,int8,int4] [--repeats 5]
    python perf/bench_linear.py --replot perf/results/bench_linear-<host>.json   # the PNG again

A speculative verify step multiplies every weight matrix by M rows (one per tree node) where AR
multiplies by one, so how a product's cost grows with M decides how many tokens a step can check
for the price of one. Shapes are SmolLM2-135M's (30 layers: qkv 960x576, o 576x576, gate_up
3072x576, down 576x1536; the tied LM head 49152x576), random weights stored in each format as
treadle stores them (graph/weights.py; under int4 the head is int8, as `weights="int4"` and the
default model's GGUF have it). Every product treadle can choose for the format on this machine
(graph/products.py's candidates) is timed; per product and M, the best of --repeats passes over
all 121 matrices:
    ms         = wall milliseconds of one pass (= the weight-product time of one forward)
    GB/s       = bytes of one pass (codes + scales, as stored) / seconds
    vs_1_row   = ms(M rows) / ms(1 row) of the same product
    chosen     = the product graph/products.py's rule picks per row bucket from these timings
Threads as LLM sets them: torch at one thread for float32 (numpy/OpenBLAS multiplies), at one per
core for the others (torch multiplies). Results: perf/results/bench_linear-<host>.json and .png
(one panel per format: vs_1_row of each product against M).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import RESULTS, machine  # noqa: E402
from treadle.graph import products as P  # noqa: E402
from treadle.graph.backend import Backend  # noqa: E402
from treadle.graph.weights import Linear, WeightFormat  # noqa: E402

LAYER_SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]
HEAD_SHAPE = (49152, 576)


def matrices(fmt: WeightFormat, layers: int, seed: int = 0) -> list[Linear]:
    """The model's matrices in `fmt` (the head int8 under int4), random N(0, 1/in) weights."""
    g = torch.Generator().manual_seed(seed)
    head_fmt = WeightFormat.INT8 if fmt == WeightFormat.INT4 else fmt
    out = []
    for shape, f in [(s, fmt) for s in LAYER_SHAPES] * layers + [(HEAD_SHAPE, head_fmt)]:
        w = torch.randn(shape, generator=g) / shape[1] ** 0.5
        out.append(Linear.of(w, dtype=f))
    return out


def time_pass(fns: list, lins: list[Linear], xs: dict[int, torch.Tensor], repeats: int) -> float:
    """Best ms of `repeats` passes computing fns[i](x, lins[i]) for every matrix."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for fn, lin in zip(fns, lins):
            fn(xs[lin.in_features], lin)
        best = min(best, time.perf_counter() - t)
    return best * 1e3


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rows", default="1-32", help="'1-32' or a list like 1,2,4,8")
    ap.add_argument("--formats", default="float32,bfloat16,int8,int4")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layers", type=int, default=30, help="layers of matrices (30: the model)")
    ap.add_argument("--out", type=Path, help="result path (default: perf/results/"
                    "bench_linear-<host>.json; the PNG beside it)")
    ap.add_argument("--replot", type=Path, help="redraw the PNG of a saved result and exit")
    args = ap.parse_args()
    if args.replot:
        _plot(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"))
        return 0
    if "-" in args.rows:
        lo, hi = (int(v) for v in args.rows.split("-"))
        row_counts = list(range(lo, hi + 1))
    else:
        row_counts = [int(r) for r in args.rows.split(",")]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    load0 = os.getloadavg()
    rows, chosen, threads = [], {}, {}
    for fmt in (WeightFormat(f) for f in args.formats.split(",")):
        torch.set_num_threads(1 if fmt == WeightFormat.FLOAT32 else cores)
        threads[fmt.value] = torch.get_num_threads()
        lins = matrices(fmt, args.layers)
        nbytes = sum(lin.nbytes for lin in lins)
        cands = P.candidates(Backend.TORCH, "cpu", fmt)
        g = torch.Generator().manual_seed(1)
        for m in row_counts:
            xs = {k: torch.randn(m, k, generator=g) for k in {lin.in_features for lin in lins}}
            for c in cands:
                if m <= c.rows_per_call:  # in one chunk: the whole-x call, timed as such
                    whole = next(r for r in rows if r["format"] == fmt.value and r["rows"] == m
                                 and r["product"] == cands[0].name)
                    rows.append({**whole, "product": c.name})
                    continue
                # The product under test for the format's matrices; the int8 head of an int4
                # model runs its own format's default product.
                fns = [c.fn if lin.format == fmt else
                       P.candidates(Backend.TORCH, "cpu", lin.format)[0].fn for lin in lins]
                fns[0](xs[lins[0].in_features], lins[0])  # warm up
                ms = time_pass(fns, lins, xs, args.repeats)
                rows.append({"format": fmt.value, "product": c.name, "rows": m,
                             "ms": round(ms, 2), "GB_per_s": round(nbytes / ms / 1e6, 1)})
                print(json.dumps(rows[-1]), flush=True)
        timed = {c.name: [next((r["ms"] for r in rows if r["format"] == fmt.value
                                and r["product"] == c.name and r["rows"] == b), None)
                          for b in P.BUCKETS] for c in cands}
        if all(None not in t for t in timed.values()):
            chosen[fmt.value] = P.pick(fmt, cands, timed)
    for r in rows:
        one = next((x for x in rows if x["format"] == r["format"]
                    and x["product"] == r["product"] and x["rows"] == 1), None)
        r["vs_1_row"] = round(r["ms"] / one["ms"], 2) if one else None
    result = {
        "benchmark": "weight products of one SmolLM2-135M forward vs rows per step, per format",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "torch_threads": threads,
        "load_average_at_start": [round(v, 2) for v in load0],
        "load_average_at_end": [round(v, 2) for v in os.getloadavg()],
        "formula": "ms = best wall ms of one pass over the 121 matrices; GB/s = bytes as stored "
        "(codes + scales) / s; vs_1_row = ms(M) / ms(1) of the same product; chosen = "
        "graph/products.py's pick() over the buckets " + ",".join(map(str, P.BUCKETS)),
        "chosen": chosen,
        "rows": rows,
    }
    out = args.out or RESULTS / f"bench_linear-{platform.node() or 'host'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"chosen per bucket {P.BUCKETS}: {json.dumps(chosen)}")
    print(f"saved {out}")
    _plot(result, out.with_suffix(".png"))
    return 0


def _plot(result: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e .[perf]): no plot; redraw later with "
              f"--replot {path.with_suffix('.json')}")
        return
    rows = result["rows"]
    formats = list(dict.fromkeys(r["format"] for r in rows))
    fig, axes = plt.subplots(1, len(formats), figsize=(4 * len(formats), 3.6), sharey=True,
                             squeeze=False)
    for ax, fmt in zip(axes[0], formats):
        for product in dict.fromkeys(r["product"] for r in rows if r["format"] == fmt):
            pts = sorted((r["rows"], r["vs_1_row"]) for r in rows
                         if r["format"] == fmt and r["product"] == product and r["vs_1_row"])
            one = next(r["ms"] for r in rows
                       if r["format"] == fmt and r["product"] == product and r["rows"] == 1)
            ax.plot(*zip(*pts), marker=".", label=f"{product} ({one:.0f} ms at 1)")
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_title(fmt)
        ax.set_xlabel("rows per step (M)")
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("ms(M) / ms(1)")
    cpu = result["machine"]["cpu"]
    features = " ".join(result["machine"].get("cpu_features", []))
    fig.suptitle(f"{cpu} ({features}), torch threads {result['torch_threads']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


if __name__ == "__main__":
    sys.exit(main())
