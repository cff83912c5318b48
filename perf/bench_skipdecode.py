"""SkipDecode vs AR vs lossless self-speculation: wall-clock speed and output quality, one run.

    python perf/bench_skipdecode.py --prompts ../shared/data/mt_bench/question.jsonl \
        [--n-prompts 8] [--max-new-tokens 128] [--speedups 1.5,2,3] [--selfspec-k 2,4] \
        [--repeats 2] [--extra-batches 1,32]

Default model, greedy. The first --n-prompts MT-Bench first turns (round-robin over categories,
chat template) go into ONE `generate` call (batch = n-prompts, 8 by default).
Speed: SamplingParams(max_new_tokens=N, ignore_eos=True), so every method generates the same N
tokens per sequence. Each method runs --repeats times, the methods interleaved per repeat, after
one untimed warm-up call per method; the best repeat is reported (all are kept in the JSON).
    tokens/s          = B * N / wall seconds of the generate call (prefill + decode + detokenize);
                        the best (shortest) repeat
    speedup           = tokens/s(method) / tokens/s(AR), same run (end to end)
    decode tokens/s   = B * (N - 1) / (wall - prefill wall), prefill wall = the best of the
                        prompt-only calls (max_new_tokens=1) timed in each repeat: every method
                        runs the same full-depth prefill, which the ideal below leaves out
    decode speedup    = decode tokens/s(method) / decode tokens/s(AR)
    mean layers       = DecodeStats.mean_layers: layers run per generated token (the first token
                        comes from the full-depth prompt step); the schedule's target is L / S.
                        For SelfSpec the runtime counts draft + warm-up + verify layer passes
                        (k*|draft| + w + (k+1)*(L-w) per round) per emitted token: work, not a
                        depth, so it is not comparable with L / S.
    ideal (SkipDecode)= cost(AR) / cost(skip), decode being weight-bandwidth bound and the LM head
                        never skipped: cost per token = layers * layer_bytes + head_bytes, with
                        layer_bytes = the mean over layers of the bytes of its Linear weights
                        (qkv, o, gate_up, down, + biases), head_bytes = lm_head weight bytes.
                        ideal = (L*lb + hb) / (m*lb + hb), m = measured mean layers
                        (ideal_schedule uses m = L / S).
    fraction of ideal = decode speedup / ideal (fraction_of_ideal_end_to_end: speedup / ideal)
    ideal (SelfSpec)  = the same byte model given the measured acceptance: a round reads the
                        weights k times for the draft (|draft|*lb + hb), once for the warm-up
                        layers of the last draft (w*lb) and once for the verify ((L-w)*lb + hb);
                        ideal = steps(AR) * (L*lb + hb) / (rounds * round_bytes).
Quality (same prompts, normal EOS stopping, same batch): perf/eval_quality.py's ROUGE-L vs AR's
output, the full model's NLL of each method's output, the fraction of clean (EOS) stops.
--extra-batches re-runs AR and the 2x schedule at other batch sizes (the first B prompts).
Results: perf/results/bench_skipdecode-<host>.json and .png (tokens/s and ROUGE-L vs target
speedup).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eval_quality as eq  # noqa: E402  (perf/ is not a package)

RESULTS = Path(__file__).resolve().parent / "results"

FORMULA = (
    "tokens/s = B*N / wall s of generate(); speedup = tokens/s / tokens/s(AR) same run; "
    "decode tokens/s = B*(N-1) / (wall - prefill wall [generate with max_new_tokens=1]); "
    "ideal(skip) = (L*lb + hb) / (m*lb + hb), m = measured mean layers/token, lb = mean Linear "
    "weight bytes per layer, hb = LM head bytes; fraction = decode speedup / ideal "
    "(end-to-end fraction = speedup / ideal); "
    "ideal(selfspec) = steps_AR*(L*lb+hb) / (rounds*(k*(|draft|*lb+hb) + w*lb + (L-w)*lb + hb))"
)


def weight_costs(llm) -> tuple[float, int]:
    """(mean bytes of one layer's Linear weights and biases, LM head bytes)."""
    w = llm.model.weights

    def nbytes(lin):
        b = lin.weight.numel() * lin.weight.element_size()
        if lin.bias is not None:
            b += lin.bias.numel() * lin.bias.element_size()
        return b

    per_layer = [sum(nbytes(x) for x in (lw.qkv, lw.o, lw.gate_up, lw.down)) for lw in w.layers]
    head = w.lm_head.weight.numel() * w.lm_head.weight.element_size()
    return sum(per_layer) / len(per_layer), head


def timed_generate(llm, prompts, method, n_new: int) -> dict:
    import treadle

    params = treadle.SamplingParams(max_new_tokens=n_new, ignore_eos=True)
    t0, c0 = time.perf_counter(), time.process_time()
    outs = llm.generate(prompts, params, chat=True, method=method)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    outs = outs if isinstance(outs, list) else [outs]
    counts = [len(o.tokens) for o in outs]
    s = outs[0].stats
    row = {
        "wall_seconds": wall,
        "cpu_seconds": cpu,  # process CPU time: well below wall means the process was descheduled
        "tokens": sum(counts),
        "tokens_per_second": sum(counts) / wall,
        "stats_tokens_per_second": s.tokens_per_second,
        "stats_seconds": s.seconds,
        "mean_layers": s.mean_layers,
        "steps": s.steps,
        "all_sequences_full_length": all(c == n_new for c in counts),
    }
    if s.accepted:
        row |= {
            "mean_accepted": s.mean_accepted,
            "draft_seconds": s.draft_seconds,
            "verify_seconds": s.verify_seconds,
        }
    return row


def speed_runs(llm, prompts, methods: dict, n_new: int, repeats: int, log) -> dict:
    """Per method, `repeats` timed runs (methods interleaved); "prefill" holds the matching
    prompt-only runs (max_new_tokens=1, AR: the same full-depth prefill every method does)."""
    from treadle.runtime.methods import AR

    runs: dict[str, list[dict]] = {name: [] for name in ["prefill", *methods]}
    for name, m in methods.items():  # warm-up (first-call allocations, caches)
        timed_generate(llm, prompts, m, min(8, n_new))
    for rep in range(repeats):
        r = timed_generate(llm, prompts, AR(), 1)
        runs["prefill"].append(r)
        log(f"  rep {rep} {'prefill':<10} {r['wall_seconds']:6.2f} s (cpu {r['cpu_seconds']:.2f})")
        for name, m in methods.items():
            r = timed_generate(llm, prompts, m, n_new)
            runs[name].append(r)
            log(f"  rep {rep} {name:<10} {r['tokens_per_second']:7.1f} tok/s  "
                f"{r['wall_seconds']:6.2f} s (cpu {r['cpu_seconds']:.2f})  "
                f"mean layers {r['mean_layers']:.2f}"
                + (f"  accepted {r['mean_accepted']:.2f}" if "mean_accepted" in r else ""))
    return runs


def summarize(runs: dict, methods: dict, L: int, lb: float, hb: float) -> dict:
    from treadle.runtime.methods import SelfSpec, SkipDecode

    prefill = min(r["wall_seconds"] for r in runs["prefill"])
    best = {n: min(runs[n], key=lambda r: r["wall_seconds"]) for n in methods}
    ar_name = next(n for n, m in methods.items() if type(m).__name__ == "AR")
    batch = round(best[ar_name]["tokens"] / (best[ar_name]["steps"] + 1))

    def decode_tps(b):  # the first token of each sequence comes from the prefill
        return (b["tokens"] - batch) / max(b["wall_seconds"] - prefill, 1e-9)

    ar = best[ar_name]
    full = L * lb + hb
    out = {}
    for name, m in methods.items():
        b = best[name]
        s = {
            "method": repr(m),
            "tokens_per_second": b["tokens_per_second"],
            "tokens_per_second_all_repeats": [r["tokens_per_second"] for r in runs[name]],
            "speedup": b["tokens_per_second"] / ar["tokens_per_second"],
            "decode_tokens_per_second": decode_tps(b),
            "decode_speedup": decode_tps(b) / decode_tps(ar),
            "prefill_seconds": prefill,
            "cpu_over_wall": b["cpu_seconds"] / b["wall_seconds"],
            "mean_layers": b["mean_layers"],
            "steps": b["steps"],
            "all_sequences_full_length": all(r["all_sequences_full_length"] for r in runs[name]),
        }
        if isinstance(m, SkipDecode):
            ml = b["mean_layers"]
            s["target_speedup"] = m.speedup
            s["schedule_layers"] = L / m.speedup
            s["ideal"] = full / (ml * lb + hb)
            s["ideal_schedule"] = full / (L / m.speedup * lb + hb)
        elif isinstance(m, SelfSpec):
            draft = m.draft_layers(L)
            w = m.warmup_layers
            round_bytes = m.k * (len(draft) * lb + hb) + w * lb + (L - w) * lb + hb
            s["k"] = m.k
            s["draft_layers"] = len(draft)
            s["mean_accepted"] = b.get("mean_accepted")
            s["ideal"] = ar["steps"] * full / (b["steps"] * round_bytes) if b["steps"] else None
            s["draft_seconds"] = b.get("draft_seconds")
            s["verify_seconds"] = b.get("verify_seconds")
        else:
            s["target_speedup"] = 1.0
            s["schedule_layers"] = float(L)
            s["ideal"] = s["ideal_schedule"] = 1.0
        s["fraction_of_ideal"] = s["decode_speedup"] / s["ideal"] if s["ideal"] else None
        s["fraction_of_ideal_end_to_end"] = s["speedup"] / s["ideal"] if s["ideal"] else None
        out[name] = s
    return out


def format_table(summary: dict, quality: dict | None) -> str:
    head = (f"{'method':<11}{'tok/s':>7}{'spdup':>7}{'dec/s':>7}{'spdup':>7}{'layers':>8}"
            f"{'L/S':>6}{'ideal':>7}{'frac':>6}{'acc':>6}{'ROUGE-L':>9}{'NLL':>7}{'clean':>7}")
    lines = [head, "-" * len(head)]
    nan = float("nan")
    for name, s in summary.items():
        q = (quality or {}).get(name)
        acc = s.get("mean_accepted")
        lines.append(
            f"{name:<11}{s['tokens_per_second']:>7.1f}{s['speedup']:>7.2f}"
            f"{s['decode_tokens_per_second']:>7.1f}{s['decode_speedup']:>7.2f}"
            f"{s['mean_layers']:>8.2f}{s.get('schedule_layers', nan):>6.1f}"
            f"{s['ideal'] or nan:>7.2f}{s['fraction_of_ideal'] or nan:>6.2f}"
            + (f"{acc:>6.2f}" if acc else f"{'':>6}")
            + (f"{q['rouge_l']:>9.3f}{q['nll']:>7.3f}{q['clean_stop']:>7.2f}" if q else "")
        )
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, quality = result["speed"]["summary"], result.get("quality", {}).get("summary", {})
    skip = [(s["target_speedup"], n) for n, s in summary.items() if "target_speedup" in s]
    skip.sort()
    xs = [x for x, _ in skip]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    a1.plot(xs, [summary[n]["tokens_per_second"] for _, n in skip], "o-",
            label="AR / SkipDecode, end to end")
    a1.plot(xs, [summary[n]["decode_tokens_per_second"] for _, n in skip], "o-",
            label="AR / SkipDecode, decode only")
    ar_tps = next(summary[n]["decode_tokens_per_second"] for x, n in skip if x == 1.0)
    ideal = [ar_tps * (summary[n].get("ideal_schedule") or 1.0) for _, n in skip]
    a1.plot(xs, ideal, "k:", label="ideal decode (weights read, head never skipped)")
    a1.plot(xs, [ar_tps * x for x in xs], color="0.7", ls="--", label="AR decode x target")
    for n, s in summary.items():
        if "k" in s:
            a1.axhline(s["decode_tokens_per_second"], ls="-.", lw=1,
                       color="C2" if s["k"] == 2 else "C3", label=f"{n} decode (lossless)")
    notes = [
        f"skip2 at B={b}: decode {ex['summary']['skip2']['decode_speedup']:.2f}x "
        f"(ideal {ex['summary']['skip2']['ideal']:.2f}x)"
        for b, ex in result.get("extra_batches", {}).items()
    ]
    if notes:
        a1.text(0.02, 0.02, "\n".join(notes), transform=a1.transAxes, fontsize=7, va="bottom")
    a1.set_xlabel("SkipDecode target speedup (L / mean layers)")
    a1.set_ylabel(f"tokens/s (batch {result['batch']}, {result['max_new_tokens']} tokens)")
    a1.set_title("speed")
    a1.legend(fontsize=7)
    a1.grid(alpha=0.3)
    if quality:
        a2.plot(xs, [quality[n]["rouge_l"] for _, n in skip], "o-", label="ROUGE-L vs AR")
        a2.plot(xs, [quality[n]["clean_stop"] for _, n in skip], "s--", label="clean EOS stops")
        for n, s in summary.items():
            if "k" in s and n in quality:
                a2.plot([1.0], [quality[n]["rouge_l"]], "*", ms=10,
                        color="C2" if s["k"] == 2 else "C3", label=f"{n} ROUGE-L")
        a2.set_ylim(-0.05, 1.05)
        a2.set_xlabel("SkipDecode target speedup")
        a2.set_ylabel("fraction")
        a2.set_title("quality (greedy, EOS stopping)")
        a2.legend(fontsize=7)
        a2.grid(alpha=0.3)
    fig.suptitle(f"SkipDecode on {Path(result['model']).name} "
                 f"({result['machine']['cpu']}, {result['machine']['cores']} cores)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", required=True, help="MT-Bench question.jsonl")
    ap.add_argument("--n-prompts", type=int, default=8, help="the batch (one generate call)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--speedups", default="1.5,2,3")
    ap.add_argument("--selfspec-k", default="2,4")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--extra-batches", default="", help="e.g. 1,32: AR and skip2 at those batches")
    ap.add_argument("--extra-repeats", type=int, default=2)
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (the PNG goes beside it)")
    args = ap.parse_args(argv)

    import treadle
    from treadle.runtime.methods import AR, SelfSpec, SkipDecode

    t_start = time.perf_counter()
    command = " ".join([Path(sys.executable).name, *sys.argv])
    print(f"command: {command}")
    print(f"formula: {FORMULA}")
    methods = {"ar": AR()}
    for s in (x for x in args.speedups.split(",") if x):
        methods[f"skip{s}"] = SkipDecode(speedup=float(s))
    for k in (x for x in args.selfspec_k.split(",") if x):
        methods[f"selfspec{k}"] = SelfSpec(k=int(k))

    llm = treadle.load()
    info = eq.machine()
    L = llm.config.num_layers
    lb, hb = weight_costs(llm)
    print(f"model {llm.model_dir.name}: L={L}, layer_bytes={lb / 1e6:.2f} MB, "
          f"head_bytes={hb / 1e6:.2f} MB (head = {hb / lb:.1f} layers)")
    items = eq.mt_bench_prompts(args.prompts, args.n_prompts)
    prompts = [it["prompt"] for it in items]
    B, N = len(prompts), args.max_new_tokens

    print(f"speed: batch {B}, {N} tokens, ignore_eos, greedy, {args.repeats} repeats")
    runs = speed_runs(llm, prompts, methods, N, args.repeats, print)
    summary = summarize(runs, methods, L, lb, hb)

    quality = None
    if not args.no_quality:
        print("quality: same prompts, EOS stopping")
        quality = eq.evaluate(llm, prompts, methods, N, batch_size=B)

    extra = {}
    for b in (int(x) for x in args.extra_batches.split(",") if x):
        bp = [it["prompt"] for it in eq.mt_bench_prompts(args.prompts, b)]
        if len(bp) < b:
            print(f"batch {b}: only {len(bp)} prompts in the file, skipped")
            continue
        ms = {"ar": AR(), "skip2": SkipDecode(speedup=2.0)}
        print(f"extra batch {b}: AR vs skip2")
        er = speed_runs(llm, bp, ms, N, args.extra_repeats, print)
        extra[str(b)] = {"summary": summarize(er, ms, L, lb, hb), "runs": er}

    print(format_table(summary, quality and quality["summary"]))
    for b, ex in extra.items():
        a, s = ex["summary"]["ar"], ex["summary"]["skip2"]
        print(f"batch {b:>3}: AR {a['tokens_per_second']:.1f} tok/s "
              f"({a['decode_tokens_per_second']:.1f} decode), skip2 "
              f"{s['tokens_per_second']:.1f} tok/s ({s['decode_tokens_per_second']:.1f} decode): "
              f"speedup {s['speedup']:.2f} end to end, {s['decode_speedup']:.2f} decode "
              f"(ideal {s['ideal']:.2f}, fraction {s['fraction_of_ideal']:.2f})")
    total = time.perf_counter() - t_start
    print(f"total {total:.1f} s")

    result = {
        "benchmark": "bench_skipdecode",
        "command": command,
        "machine": info,
        "model": str(llm.model_dir),
        "prompts_file": str(args.prompts),
        "question_ids": [it["id"] for it in items],
        "batch": B,
        "max_new_tokens": N,
        "repeats": args.repeats,
        "extra_repeats": args.extra_repeats,
        "num_layers": L,
        "layer_bytes": lb,
        "head_bytes": hb,
        "formula": FORMULA,
        "quality_formulas": eq.FORMULAS,
        "speed": {"summary": summary, "runs": runs},
        "quality": quality,
        "extra_batches": extra,
        "total_seconds": total,
    }
    out = args.out or RESULTS / f"bench_skipdecode-{platform.node() or 'host'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    png = out.with_suffix(".png")
    plot(result, png)
    print(f"wrote {out} and {png}")


if __name__ == "__main__":
    main()
