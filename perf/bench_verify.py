"""Token-tree verification on a GPU: the Triton kernels vs the Python refs vs vectorised torch.

    python perf/bench_verify.py

Shapes: B in {1, 8, 32} sequences, trees of N in {8, 16, 32, 64} nodes, V in {32000, 128256}.
    verify_greedy (no V)
        triton   kernels.verify.verify_greedy: one launch, one program per sequence
        ref      kernels.verify.verify_greedy_ref: .tolist() and list walks (a host sync)
        torch    vectorised over the batch: a depth loop of N - 1 small torch ops, no sync
    verify_sample, two scenarios
        tree     random tree (parents uniform below i), p_target and p_draft independent
                 softmax(randn): most walks reject early and draw from a residual
        chain    a chain of N nodes with p_draft == p_target: every node accepted, the longest walk
        triton   kernels.verify.verify_sample (fp32 distributions)
        ref      kernels.verify.verify_sample_ref (Python loop, float64 rows)
Time: triton.testing.do_bench (median ms). Bandwidth: gbps = bytes / time with
    greedy: bytes = 4 * B*N*8   (tokens, parents, argmax read; path/out written; int64)
    sample: bytes = 2 * 2*B*V*4 (p_target and p_draft rows of the final node, read twice: mass,
                                 then inverse CDF) -- a floor: each residual test adds a pass
Results go to perf/results/bench_verify-<device>.json. Without CUDA it says so and exits 0.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
FORMULA_GREEDY = "4*B*N*8 bytes (tokens, parents, argmax in; path, out_tokens out) / t"
FORMULA_SAMPLE = "2*2*B*V*4 bytes (p_target, p_draft rows at the final node, two passes) / t"


def _greedy_torch(tokens, parents, n_nodes, argmax):
    """The greedy rule vectorised over the batch with torch ops only (no host sync)."""
    B, N = tokens.shape
    idx = torch.arange(N, device=tokens.device)
    valid = (idx >= 1) & (idx < n_nodes[:, None])
    good = valid & (tokens == argmax.gather(1, parents.clamp_min(0)))
    cur = torch.zeros(B, dtype=torch.long, device=tokens.device)
    n_acc = torch.zeros_like(cur)
    path = torch.full((B, N), -1, dtype=torch.long, device=tokens.device)
    for _ in range(N - 1):
        c = torch.where(good & (parents == cur[:, None]), idx, N).min(1).values
        found = c < N
        path.scatter_(1, n_acc[:, None], torch.where(found, c, -1)[:, None])
        n_acc += found
        cur = torch.where(found, c, cur)
    out = torch.where(path >= 0, tokens.gather(1, path.clamp_min(0)), -1)
    out.scatter_(1, n_acc[:, None], argmax.gather(1, cur[:, None]))
    return n_acc, path, out


def _random_tree(B, N, V, device, gen):
    parents = torch.full((B, N), -1, dtype=torch.long)
    for i in range(1, N):
        parents[:, i] = torch.randint(0, i, (B,), generator=gen)
    tokens = torch.randint(0, V, (B, N), generator=gen)
    # The target's argmax is a child's token 80% of the time, so greedy walks go deep.
    argmax = torch.randint(0, V, (B, N), generator=gen)
    for b in range(B):
        for i in range(1, N):
            if torch.rand((), generator=gen) < 0.8:
                argmax[b, parents[b, i]] = tokens[b, i]
    n_nodes = torch.full((B,), N)
    return [t.to(device) for t in (tokens, parents, n_nodes, argmax)]


def run(device: str) -> list[dict]:
    import triton.testing
    from treadle.kernels.verify import (
        verify_greedy,
        verify_greedy_ref,
        verify_sample,
        verify_sample_ref,
    )

    rows = []
    gen = torch.Generator().manual_seed(0)
    for B in (1, 8, 32):
        for N in (8, 16, 32, 64):
            tokens, parents, n_nodes, argmax = _random_tree(B, N, 32000, device, gen)
            want = verify_greedy_ref(tokens, parents, n_nodes, argmax)
            for got in (verify_greedy(tokens, parents, n_nodes, argmax),
                        _greedy_torch(tokens, parents, n_nodes, argmax)):
                assert all(torch.equal(g.cpu(), w.cpu()) for g, w in zip(got, want))
            nbytes = 4 * B * N * 8
            for impl, fn in (("triton", verify_greedy), ("ref", verify_greedy_ref),
                             ("torch", _greedy_torch)):
                ms = triton.testing.do_bench(lambda: fn(tokens, parents, n_nodes, argmax))
                rows.append({"op": "verify_greedy", "shape": f"B={B} N={N}", "impl": impl,
                             "ms": round(ms, 4), "gbps": round(nbytes / ms / 1e6, 3),
                             "formula": FORMULA_GREEDY})

    for V in (32000, 128256):
        for B in (1, 8, 32):
            for N in (8, 16, 32, 64):
                for scenario in ("tree", "chain"):
                    tokens, parents, n_nodes, _ = _random_tree(B, N, V, device, gen)
                    p_target = torch.randn(B, N, V, device=device).softmax(-1)
                    if scenario == "chain":
                        parents = (torch.arange(N, device=device) - 1).expand(B, N).contiguous()
                        p_draft = p_target
                    else:
                        p_draft = torch.randn(B, N, V, device=device).softmax(-1)
                    args = (tokens, parents, n_nodes, p_target, p_draft)
                    if scenario == "chain":  # q == p: every draft node is accepted
                        assert bool((verify_sample(*args, seed=0, offset=0)[0] == N - 1).all())
                    nbytes = 2 * 2 * B * V * 4
                    cases = [("triton", lambda: verify_sample(*args, seed=0, offset=0))]
                    if B * N <= 512:  # the Python ref is slow: skip the largest shapes
                        cases.append(("ref", lambda: verify_sample_ref(*args)))
                    for impl, fn in cases:
                        ms = triton.testing.do_bench(fn)
                        rows.append({"op": f"verify_sample-{scenario}",
                                     "shape": f"B={B} N={N} V={V}", "impl": impl,
                                     "ms": round(ms, 4), "gbps": round(nbytes / ms / 1e6, 2),
                                     "formula": FORMULA_SAMPLE})
    return rows


def main() -> int:
    if not torch.cuda.is_available():
        print("perf/bench_verify.py needs a CUDA GPU (none found); nothing measured.")
        return 0
    name = torch.cuda.get_device_name()
    rows = run("cuda")
    print(f"{'op':<22} {'shape':<22} {'impl':<8} {'ms':>9} {'GB/s':>8}")
    for r in rows:
        print(f"{r['op']:<22} {r['shape']:<22} {r['impl']:<8} {r['ms']:>9.4f} {r['gbps']:>8.2f}")
    RESULTS.mkdir(exist_ok=True)
    slug = "-".join(name.replace("/", " ").split())
    path = RESULTS / f"bench_verify-{slug}.json"
    import triton

    path.write_text(json.dumps({"device": name, "torch": torch.__version__,
                                "triton": triton.__version__, "command": " ".join(sys.argv),
                                "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
