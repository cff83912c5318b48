"""Sampling from logits on a GPU: the Triton bisection kernels vs the sort-based torch paths.

    python perf/bench_sampling.py

Shapes: B in {1, 8, 32} rows of fp32 logits, V in {32000, 128256}. Ops and implementations:
    sample (T=0.8, top_k=50, top_p=0.9 as per-row [B] tensors, so every filter runs)
        triton      kernels.sampling.sample: 1 + 33 + 32 + 1 passes over each row, no sort
        ref         kernels.sampling.sample_ref: full sort for top-k and for top-p, multinomial
        torch-sort  the usual recipe: one descending sort, softmax, cumsum cut, multinomial
        torch-topk  topk(50) first, then top-p over the 50 survivors, multinomial (needs a
                    batch-wide top_k > 0, which per-row parameters cannot promise)
    sample-temperature (T=0.8 as a Python scalar, top-k/top-p off: the filter passes compile out)
        triton      kernels.sampling.sample: 2 passes over each row
        torch       softmax(l / T) + multinomial
    processed_probs (the same filters; writes the [B, V] distribution)
        triton / ref
Time: triton.testing.do_bench (median ms). Bandwidth: gbps = bytes / time with
    bytes = B*V*4 (the logits read once; + B*V*4 written for processed_probs)
a floor, not the traffic: the kernels reread each row from L2 once per pass.
Results go to perf/results/bench_sampling-<device>.json. Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
FORMULA = "B*V*4 bytes (logits read once; + B*V*4 written for processed_probs) / t"


def _torch_sort(logits, T, top_k, top_p, gen):
    s = logits / T
    sorted_s, order = s.sort(-1, descending=True)
    sorted_s[:, top_k:] = -float("inf")
    probs = sorted_s.softmax(-1)
    drop = probs.cumsum(-1) - probs >= top_p
    probs = probs.masked_fill(drop, 0)
    pick = torch.multinomial(probs, 1, generator=gen)
    return order.gather(-1, pick).squeeze(1)


def _torch_topk(logits, T, top_k, top_p, gen):
    vals, idx = (logits / T).topk(top_k, -1)  # sorted, descending
    probs = vals.softmax(-1)
    probs = probs.masked_fill(probs.cumsum(-1) - probs >= top_p, 0)
    pick = torch.multinomial(probs, 1, generator=gen)
    return idx.gather(-1, pick).squeeze(1)


def run(device: str) -> list[dict]:
    import triton.testing
    from treadle.kernels.sampling import (
        processed_probs,
        processed_probs_ref,
        sample,
        sample_ref,
    )

    rows = []
    gen = torch.Generator(device=device).manual_seed(0)
    for V in (32000, 128256):
        for B in (1, 8, 32):
            logits = 3 * torch.randn(B, V, device=device)
            T = torch.full((B,), 0.8, device=device)
            k = torch.full((B,), 50, dtype=torch.int32, device=device)
            p = torch.full((B,), 0.9, device=device)
            shape = f"B={B} V={V}"
            nbytes = B * V * 4
            cases = [
                ("sample", "triton", lambda: sample(logits, T, k, p, seed=0, offset=0), nbytes),
                ("sample", "ref", lambda: sample_ref(logits, T, k, p, gen), nbytes),
                ("sample", "torch-sort", lambda: _torch_sort(logits, 0.8, 50, 0.9, gen), nbytes),
                ("sample", "torch-topk", lambda: _torch_topk(logits, 0.8, 50, 0.9, gen), nbytes),
                ("sample-temperature", "triton",
                 lambda: sample(logits, 0.8, 0, 1.0, seed=0, offset=0), nbytes),
                ("sample-temperature", "torch",
                 lambda: torch.multinomial((logits / 0.8).softmax(-1), 1, generator=gen), nbytes),
                ("processed_probs", "triton",
                 lambda: processed_probs(logits, T, k, p), 2 * nbytes),
                ("processed_probs", "ref",
                 lambda: processed_probs_ref(logits, T, k, p), 2 * nbytes),
            ]
            # The kernel and the ref must agree on the distribution before anything is timed.
            torch.testing.assert_close(processed_probs(logits, T, k, p),
                                       processed_probs_ref(logits, T, k, p), atol=1e-5, rtol=1e-4)
            for op, impl, fn, nb in cases:
                ms = triton.testing.do_bench(fn)
                rows.append({"op": op, "shape": shape, "impl": impl, "ms": round(ms, 4),
                             "gbps": round(nb / ms / 1e6, 2), "formula": FORMULA})
    return rows


def main() -> int:
    if not torch.cuda.is_available():
        print("perf/bench_sampling.py needs a CUDA GPU (none found); nothing measured.")
        return 0
    name = torch.cuda.get_device_name()
    rows = run("cuda")
    print(f"{'op':<20} {'shape':<16} {'impl':<12} {'ms':>9} {'GB/s':>8}")
    for r in rows:
        print(f"{r['op']:<20} {r['shape']:<16} {r['impl']:<12} {r['ms']:>9.4f} {r['gbps']:>8.1f}")
    RESULTS.mkdir(exist_ok=True)
    slug = "-".join(name.replace("/", " ").split())
    path = RESULTS / f"bench_sampling-{slug}.json"
    import triton

    path.write_text(json.dumps({"device": name, "torch": torch.__version__,
                                "triton": triton.__version__, "command": " ".join(sys.argv),
                                "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
