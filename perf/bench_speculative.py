"""Speculative decoding on the default model: AR, chain SD, tree SD, GSD and n-gram, in one run.

    python perf/bench_speculative.py --prompts ../shared/data/mt_bench/question.jsonl \
        [--n-prompts 24] [--max-new-tokens 128] [--budgets 4,8,16,32] [--temperatures 0,0.7]

Prompts: the first turns of MT-Bench, round-robin over the 8 categories (24 = 3 per category),
chat template applied, batch 1, --max-new-tokens generated with EOS ignored so every method
produces the same number of tokens. Per method and setting:
    tokens/s        = generated tokens / wall seconds (prefill included), over all prompts
    speedup         = tokens/s / AR tokens/s measured in the same run, at the same temperature
    mean accepted   = tokens emitted per verify step (accepted drafts + the target's own token)
    draft / verify  = seconds spent drafting / verifying, over all prompts
    merged          = draft nodes GSD reused by merging instead of drafting them
Every method, AR included, runs with the same --weights (auto: bf16 weights with fp32
activations on an AVX-512 BF16 CPU, where a k-node verify step costs about one token's step,
perf/bench_linear.py, and the forward is row-invariant, so greedy output stays token-identical;
fp32 weights elsewhere); with bf16 weights a closing row gives AR with fp32 weights for reference.
Greedy rows also check that the output is token-identical to AR. Results: JSON + CSV + a PNG plot
of speedup against the node budget in perf/results/.
"""

from __future__ import annotations

import argparse
import csv
import json
import platform
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_decode import machine, mt_bench_prompts  # noqa: E402


def methods(budgets: list[int], draft: str):
    """(name, node budget, method). Drafts: the derived model (`draft`), prompt lookup ("ngram"),
    and prompt lookup + the derived draft's n-gram table ("ngramtab" = "ngram+default")."""
    from treadle.runtime.methods import AR, Speculative

    yield "ar", None, AR()
    for depth in (2, 3, 4):
        yield f"sd-chain-d{depth}", depth + 1, Speculative.chain(depth=depth, draft=draft)
    for budget in budgets:
        yield f"tree-sd-b{budget}", budget, Speculative.gsd(
            k=4, tau=-1, depth=4, budget=budget, draft=draft)
        for tau in (0, 1):
            yield f"gsd-tau{tau}-b{budget}", budget, Speculative.gsd(
                k=4, tau=tau, depth=4, budget=budget, draft=draft)
    for prefix, source in (("ngram", "ngram"), ("ngramtab", "ngram+default")):
        yield f"{prefix}-chain-d4", 5, Speculative.chain(depth=4, draft=source)
        for budget in budgets:
            yield f"{prefix}-gsd-b{budget}", budget, Speculative.gsd(
                k=4, tau=0, depth=6, budget=budget, draft=source)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--prompts", type=Path, help="MT-Bench question.jsonl (required to run)")
    ap.add_argument("--n-prompts", type=int, default=24)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--budgets", default="4,8,16,32")
    ap.add_argument("--temperatures", default="0,0.7")
    ap.add_argument("--draft", default="default", help="draft model: 'default' or a directory")
    ap.add_argument("--only", help="comma-separated method names to run (plus ar)")
    ap.add_argument("--out", default=None, help="results file stem (default perf/results/...)")
    ap.add_argument(
        "--weights",
        "--weight-dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "int8", "int4", "native"],
        help="weight format for every method, AR included (activations stay fp32; see "
        "treadle.load's weights=). auto: bfloat16 where the CPU has AVX-512 BF16 (a k-token "
        "verify step then costs about one token's step, perf/bench_linear.py), else float32",
    )
    ap.add_argument("--no-fp32-reference", action="store_true",
                    help="skip the closing AR row with fp32 weights")
    ap.add_argument("--replot", type=Path, metavar="JSON",
                    help="only redraw the PNG of a saved results file (no benchmark run)")
    args = ap.parse_args()
    if args.replot:
        _plot(json.loads(args.replot.read_text())["rows"], args.replot.with_suffix(".png"))
        return 0

    if args.prompts is None:
        ap.error("--prompts is required")
    import torch
    import treadle

    if args.weights == "auto":
        bf16 = "avx512_bf16" in machine()["cpu_features"] or torch.cuda.is_available()
        args.weights = "bfloat16" if bf16 else "float32"
    llm = treadle.load(weights=args.weights)
    questions = mt_bench_prompts(args.prompts, args.n_prompts)
    llm_products = []  # which product multiplies each format (filled once they are chosen)
    prompt_ids = [llm.encode(q, chat=True) for q in questions]
    budgets = [int(b) for b in args.budgets.split(",")]
    only = set(args.only.split(",")) | {"ar"} if args.only else None
    rows = []
    for temp in (float(t) for t in args.temperatures.split(",")):
        ar_tokens, ar_tps = None, None
        for name, budget, method in methods(budgets, args.draft):
            if only and name not in only:
                continue
            if temp > 0 and name.startswith(("ngram-gsd", "ngramtab-gsd")):
                continue  # n-gram trees propose a single chain when sampling: same as the chain
            if temp > 0 and name.startswith(("gsd-tau1", "sd-chain-d3", "tree-sd")):
                continue  # keeps the sampled table to one GSD family and the chain ends (time)
            if name.startswith("gsd-tau1") and name not in ("gsd-tau1-b8", "gsd-tau1-b16"):
                continue  # tau=1 at two budgets only (time)
            params_for = [treadle.SamplingParams(max_new_tokens=args.max_new_tokens,
                                                 temperature=temp, seed=1000 + i, ignore_eos=True)
                          for i in range(len(prompt_ids))]
            llm.generate(prompt_ids[0], treadle.SamplingParams(max_new_tokens=8), method=method)
            outs, seconds, stats = [], 0.0, []
            for ids, params in zip(prompt_ids, params_for):
                t0 = time.perf_counter()
                out = llm.generate(ids, params, method=method)
                seconds += time.perf_counter() - t0
                outs.append(out.tokens)
                stats.append(out.stats)
            tokens = sum(len(o) for o in outs)
            tps = tokens / seconds
            if name == "ar":
                ar_tokens, ar_tps = outs, tps
            accepted = [a for s in stats for a in s.accepted]
            row = {
                "method": name, "temperature": temp, "node_budget": budget,
                "tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tps, 2),
                "speedup_vs_ar": round(tps / ar_tps, 3),
                "mean_accepted": round(sum(a + 1 for a in accepted) / len(accepted), 3)
                if accepted else None,
                "draft_seconds": round(sum(s.draft_seconds for s in stats), 2),
                "verify_seconds": round(sum(s.verify_seconds for s in stats), 2),
                "draft_nodes": sum(s.draft_nodes for s in stats),
                "merged_nodes": sum(s.merged_nodes for s in stats),
            }
            if temp == 0:
                row["identical_to_ar"] = outs == ar_tokens
            if name == "ar":
                llm_products[:] = [ln for ln in llm.describe().splitlines()
                                   if " matrices, " in ln]
            rows.append(row)
            print(json.dumps(row), flush=True)
            torch.cuda.empty_cache() if torch.cuda.is_available() else None

    if args.weights != "float32" and not args.no_fp32_reference:
        # The plain fp32 runtime's AR, for reference (the speedups above are against the AR row
        # with the same weights). Loaded last: an fp32 model sets torch's threads for numpy's BLAS.
        del llm
        ref = treadle.load(weights="float32")
        params = treadle.SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
        ref.generate(prompt_ids[0], treadle.SamplingParams(max_new_tokens=8))
        t0 = time.perf_counter()
        n = sum(len(ref.generate(ids, params).tokens) for ids in prompt_ids)
        tps = n / (time.perf_counter() - t0)
        ar0 = next(r for r in rows if r["method"] == "ar" and r["temperature"] == 0)
        row = {"method": "ar-fp32-weights", "temperature": 0.0, "node_budget": None, "tokens": n,
               "tokens_per_s": round(tps, 2), "speedup_vs_ar": round(tps / ar0["tokens_per_s"], 3)}
        rows.append(row)
        print(json.dumps(row), flush=True)

    result = {
        "benchmark": "speculative decoding vs AR, default model, batch 1",
        "weights": args.weights,
        "products": [line.strip() for line in llm_products],
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "prompts": f"{args.prompts} (first turns, {len(questions)} round-robin by category)",
        "max_new_tokens": args.max_new_tokens,
        "draft": args.draft,
        "formula": "tokens/s = generated tokens / wall seconds; speedup = tokens/s / AR tokens/s "
                   "(same run, same temperature); mean accepted = emitted tokens per verify step",
        "rows": rows,
    }
    RESULTS.mkdir(exist_ok=True)
    stem = args.out or f"bench_speculative-{platform.node() or 'host'}"
    (RESULTS / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    with open(RESULTS / f"{stem}.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=sorted({k for r in rows for k in r}))
        w.writeheader()
        w.writerows(rows)
    _plot(rows, RESULTS / f"{stem}.png")
    print(f"saved {RESULTS / stem}.json/.csv/.png")
    return 0


def _plot(rows, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e .[perf]): no plot; redraw later with "
              f"--replot {path.with_suffix('.json')}")
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, temp in zip(axes, (0.0, 0.7)):
        families = ("tree-sd", "gsd-tau0", "gsd-tau1", "ngram-gsd", "ngramtab-gsd")
        for color, family in enumerate(families):  # one color per family in both panels
            pts = sorted((r["node_budget"], r["speedup_vs_ar"]) for r in rows
                         if r["temperature"] == temp and r["method"].startswith(family + "-b"))
            if pts:
                ax.plot(*zip(*pts), marker="o", color=f"C{color}", label=family)
        for r in rows:
            if r["temperature"] == temp and "chain" in r["method"]:
                ax.scatter([r["node_budget"]], [r["speedup_vs_ar"]], marker="x", color="black")
                ax.annotate(r["method"], (r["node_budget"], r["speedup_vs_ar"]), fontsize=7)
        ax.axhline(1.0, color="gray", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_title(f"temperature {temp}")
        ax.set_xlabel("node budget (tree nodes verified per step)")
        ax.legend(fontsize=8)
    axes[0].set_ylabel("speedup over AR (tokens/s)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
