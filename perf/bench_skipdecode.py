"""SkipDecode off the shelf and fine-tuned, against AR and lossless self-speculation: wall clock and
output quality, in one run.

    python perf/bench_skipdecode.py --prompts ../shared/data/mt_bench/question.jsonl \
        [--tuned DIR ...] [--n-prompts 16] [--speed-prompts 8] [--batches 1,8] \
        [--max-new-tokens 128] [--speedups 1.5,2,3] [--selfspec-k 4] [--adaptive] \
        [--repeats 1] [--weights float32]

Rows (greedy, chat template, MT-Bench first turns round-robin over the categories):
    ar                   AR of the original (default) model: every row's reference
    skip<S>              SkipDecode on the original model, the schedule for speedup S (off the
                         shelf)
    selfspec<K>          lossless self-speculation on the original model, K drafts per round
                         (every round drafts unless --adaptive)
    tuned<S>             a model fine-tuned for its schedule (`treadle train skipdecode`; one
                         --tuned DIR per speedup or layer choice; -upper when only the upper layers
                         trained) running its stored schedule
    tuned<S>-selfspec<K> self-speculation on it, drafting with its stored schedule: lossless with
                         respect to its own full depth, tuned<S>-ar
    tuned<S>-ar          the tuned model at full depth (what its self-speculation reproduces)
Speed, per batch size B of --batches: the first --speed-prompts prompts in generate calls of B
prompts each, SamplingParams(max_new_tokens=N, ignore_eos=True), so every row generates the same N
tokens per sequence. One untimed warm-up call per row, then --repeats timed passes, the rows
interleaved per pass; the best pass is reported (all are kept in the JSON).
    tokens/s          = sequences * N / wall seconds of the calls (prefill + decode + detokenize)
    speedup           = tokens/s(row) / tokens/s(ar), same batch size, same run
    decode tokens/s   = sequences * (N - 1) / (wall - prefill wall), prefill wall = the best of the
                        prompt-only passes (AR, max_new_tokens=1) timed in each repeat: every row
                        runs the same full-depth prefill
    decode speedup    = decode tokens/s(row) / decode tokens/s(ar)
    mean layers       = DecodeStats.mean_layers: layers run per generated token (the first token
                        comes from the full-depth prompt step). For self-speculation it counts
                        draft + warm-up + verify layer passes per emitted token: work, not a depth.
    ideal (skip)      = (L*lb + hb) / (m*lb + hb): decode is weight-bandwidth bound and the LM head
                        is never skipped; lb = mean Linear weight bytes of a layer, hb = LM head
                        bytes, m = measured mean layers (ideal_schedule: m = L / S)
    ideal (selfspec)  = steps(ar) * (L*lb + hb) / (rounds * (k*(d*lb + hb) + w*lb + (L-w)*lb + hb)
                        + plain steps * (L*lb + hb)), d = draft layers per draft token (the
                        schedule's mean over N for a tuned model), given the measured rounds
    fraction of ideal = decode speedup / ideal
Quality (all --n-prompts prompts, normal EOS stopping, generate calls of --quality-batch prompts):
perf/eval_quality.py's ROUGE-L against ar's output, the ORIGINAL model's NLL of each row's output,
argmax agreement, clean (EOS) stops. Then, for each tuned<S> with a skip<S> beside it:
    recovery (ROUGE-L) = (R(tuned<S>) - R(skip<S>)) / (R(ar) - R(skip<S>))
    recovery (NLL)     = (NLL(skip<S>) - NLL(tuned<S>)) / (NLL(skip<S>) - NLL(ar))
    (the fraction of the off-the-shelf model's loss that tuning wins back; 1 = none left)
and for each tuned<S>-selfspec<K>: identical = the fraction of prompts whose tokens equal
tuned<S>-ar's (lossless: 1.0).
Results: perf/results/bench_skipdecode-<host>.json and .png.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import eval_quality as eq  # noqa: E402  (perf/ is not a package)

RESULTS = Path(__file__).resolve().parent / "results"

FORMULA = (
    "tokens/s = seqs*N / wall s of the generate calls (B prompts each); speedup = tokens/s / "
    "tokens/s(ar) same B, same run; decode tokens/s = seqs*(N-1) / (wall - prefill wall [ar, "
    "max_new_tokens=1]); ideal(skip) = (L*lb + hb) / (m*lb + hb), m = measured mean layers/token, "
    "lb = mean Linear weight bytes per layer, hb = LM head bytes; fraction = decode speedup / "
    "ideal; ideal(selfspec) = steps_ar*(L*lb+hb) / (rounds*(k*(d*lb+hb) + w*lb + (L-w)*lb + hb) "
    "+ plain_steps*(L*lb+hb)); "
    "recovery(ROUGE-L) = (R_tuned - R_skip) / (R_ar - R_skip); recovery(NLL) = (NLL_skip - "
    "NLL_tuned) / (NLL_skip - NLL_ar)"
)


@dataclass
class Row:
    name: str
    llm: object  # the treadle LLM that runs it
    method: object  # as given (a tuned model resolves its defaults: runtime/methods.py)
    speedup: float | None = None  # the schedule's target (skip rows)
    tuned: str | None = None  # tuned<S> tag of a tuned model's rows

    @property
    def resolved(self):
        """The method as the model runs it (a tuned model's stored schedule filled in)."""
        from treadle.runtime.methods import for_tuned_model

        return for_tuned_model(self.method, self.llm.skip_schedule, self.llm.model_dir)


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


def timed_generate(llm, prompts, method, n_new: int, batch: int) -> dict:
    """One pass over `prompts` in generate calls of `batch` prompts, every sequence N tokens."""
    import treadle

    params = treadle.SamplingParams(max_new_tokens=n_new, ignore_eos=True)
    counts, stats = [], []
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(0, len(prompts), batch):
        outs = llm.generate(prompts[i : i + batch], params, chat=True, method=method)
        counts += [len(o.tokens) for o in outs]
        stats.append(outs[0].stats)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    generated = sum(s.generated_tokens for s in stats)
    accepted = [a for s in stats for a in s.accepted]
    row = {
        "wall_seconds": wall,
        "cpu_seconds": cpu,  # process CPU time: well below wall means the process was descheduled
        "sequences": len(counts),
        "tokens": sum(counts),
        "tokens_per_second": sum(counts) / wall,
        "mean_layers": sum(s.layers_computed for s in stats) / generated if generated else 0.0,
        "steps": sum(s.steps for s in stats),
        "all_sequences_full_length": all(c == n_new for c in counts),
    }
    if accepted:
        row |= {
            "mean_accepted": sum(a + 1 for a in accepted) / len(accepted),
            "plain_steps": sum(s.plain_steps for s in stats),
            "draft_seconds": sum(s.draft_seconds for s in stats),
            "verify_seconds": sum(s.verify_seconds for s in stats),
        }
    return row


def speed_runs(rows: list[Row], prompts, n_new: int, batch: int, repeats: int, log) -> dict:
    """Per row, `repeats` timed passes (rows interleaved); "prefill" holds the matching
    prompt-only passes (ar, max_new_tokens=1: the full-depth prefill every row runs)."""
    from treadle.runtime.methods import AR

    runs: dict[str, list[dict]] = {name: [] for name in ["prefill", *(r.name for r in rows)]}
    for r in rows:  # warm-up (first-call allocations, caches)
        timed_generate(r.llm, prompts[:batch], r.method, min(8, n_new), batch)
    for rep in range(repeats):
        p = timed_generate(rows[0].llm, prompts, AR(), 1, batch)
        runs["prefill"].append(p)
        log(f"  B={batch} rep {rep} {'prefill':<22} {p['wall_seconds']:6.2f} s "
            f"(cpu {p['cpu_seconds']:.2f})")
        for r in rows:
            t = timed_generate(r.llm, prompts, r.method, n_new, batch)
            runs[r.name].append(t)
            log(f"  B={batch} rep {rep} {r.name:<22} {t['tokens_per_second']:7.1f} tok/s "
                f"{t['wall_seconds']:6.2f} s (cpu {t['cpu_seconds']:.2f})  mean layers "
                f"{t['mean_layers']:.2f}"
                + (f"  accepted {t['mean_accepted']:.2f}" if "mean_accepted" in t else ""))
    return runs


def summarize(runs: dict, rows: list[Row], n_new: int, L: int, lb: float, hb: float) -> dict:
    from treadle.runtime.methods import SelfSpec, SkipDecode

    prefill = min(r["wall_seconds"] for r in runs["prefill"])
    best = {r.name: min(runs[r.name], key=lambda x: x["wall_seconds"]) for r in rows}

    def decode_tps(b):  # the first token of each sequence comes from the prefill
        return (b["tokens"] - b["sequences"]) / max(b["wall_seconds"] - prefill, 1e-9)

    ar = best["ar"]
    full = L * lb + hb
    out = {}
    for r in rows:
        b, m = best[r.name], r.resolved
        s = {
            "method": repr(m),
            "model": str(r.llm.model_dir),
            "tokens_per_second": b["tokens_per_second"],
            "tokens_per_second_all_repeats": [x["tokens_per_second"] for x in runs[r.name]],
            "speedup": b["tokens_per_second"] / ar["tokens_per_second"],
            "decode_tokens_per_second": decode_tps(b),
            "decode_speedup": decode_tps(b) / decode_tps(ar),
            "prefill_seconds": prefill,
            "cpu_over_wall": b["cpu_seconds"] / b["wall_seconds"],
            "mean_layers": b["mean_layers"],
            "steps": b["steps"],
            "all_sequences_full_length": all(x["all_sequences_full_length"] for x in runs[r.name]),
        }
        if isinstance(m, SkipDecode):
            speedup = r.speedup
            s["target_speedup"] = speedup
            s["schedule_layers"] = L / speedup
            s["ideal"] = full / (b["mean_layers"] * lb + hb)
            s["ideal_schedule"] = full / (L / speedup * lb + hb)
        elif isinstance(m, SelfSpec):
            if m.schedule is not None:
                w = m.schedule.warmup_layers
                d = m.schedule.mean_layers(n_new)
            else:
                w, d = m.warmup_layers, len(m.draft_layers(L))
            # steps count each call's rounds once (accepted counts them per sequence)
            rounds = b["steps"] - b.get("plain_steps", 0)
            round_bytes = m.k * (d * lb + hb) + w * lb + (L - w) * lb + hb
            plain = b.get("plain_steps", 0) * full
            s |= {"k": m.k, "draft_layers": d, "mean_accepted": b.get("mean_accepted"),
                  "rounds": rounds, "plain_steps": b.get("plain_steps", 0),
                  "draft_seconds": b.get("draft_seconds"),
                  "verify_seconds": b.get("verify_seconds")}
            s["ideal"] = (ar["steps"] * full / (rounds * round_bytes + plain)
                          if rounds or plain else None)
        else:
            s["ideal"] = 1.0
        s["fraction_of_ideal"] = s["decode_speedup"] / s["ideal"] if s["ideal"] else None
        out[r.name] = s
    return out


def quality(rows: list[Row], prompts, n_new: int, batch: int, k: int | None) -> dict:
    """eval_quality over every row's model: the original's rows first (its AR is the reference),
    then each tuned model's, scored by the original. Adds the recovery and lossless figures."""
    orig = rows[0].llm
    own = {r.name: r.method for r in rows if r.tuned is None}
    res = eq.evaluate(orig, prompts, own, n_new, batch_size=batch)
    reference = res.pop("reference_outputs")
    for tag in dict.fromkeys(r.tuned for r in rows if r.tuned is not None):
        mine = [r for r in rows if r.tuned == tag]
        part = eq.evaluate(mine[0].llm, prompts, {r.name: r.method for r in mine}, n_new,
                           batch_size=batch, reference=reference, scorer=orig)
        part.pop("reference_outputs")
        for key in ("summary", "samples", "tokens"):
            res[key] |= part[key]
        res["rows"] += part["rows"]
    summary, tokens = res["summary"], res["tokens"]
    for r in rows:
        if r.tuned is None or r.name != r.tuned:
            continue
        off = next((x.name for x in rows if x.tuned is None and x.speedup == r.speedup), None)
        if off is None:
            continue
        a, o, t = summary["ar"], summary[off], summary[r.name]
        lost_r, lost_n = a["rouge_l"] - o["rouge_l"], o["nll"] - a["nll"]
        t["vs_off_the_shelf"] = off
        t["recovery_rouge_l"] = (t["rouge_l"] - o["rouge_l"]) / lost_r if lost_r else None
        t["recovery_nll"] = (o["nll"] - t["nll"]) / lost_n if lost_n else None
    for r in rows:
        if r.tuned is not None and k is not None and r.name == f"{r.tuned}-selfspec{k}":
            ref = tokens[f"{r.tuned}-ar"]
            same = [x == y for x, y in zip(tokens[r.name], ref)]
            summary[r.name]["identical_to_own_ar"] = sum(same) / len(same)
    return res


def format_table(speed: dict, quality_summary: dict | None) -> str:
    head = (f"{'row':<22}{'B':>3}{'tok/s':>7}{'spdup':>7}{'dec/s':>7}{'spdup':>7}{'layers':>8}"
            f"{'ideal':>7}{'frac':>6}{'acc':>6}{'ROUGE-L':>9}{'NLL':>7}{'clean':>7}")
    lines = [head, "-" * len(head)]
    nan = float("nan")
    for b, summary in speed.items():
        for name, s in summary.items():
            q = (quality_summary or {}).get(name)
            acc = s.get("mean_accepted")
            lines.append(
                f"{name:<22}{b:>3}{s['tokens_per_second']:>7.1f}{s['speedup']:>7.2f}"
                f"{s['decode_tokens_per_second']:>7.1f}{s['decode_speedup']:>7.2f}"
                f"{s['mean_layers']:>8.2f}{s['ideal'] or nan:>7.2f}"
                f"{s['fraction_of_ideal'] or nan:>6.2f}"
                + (f"{acc:>6.2f}" if acc else f"{'':>6}")
                + (f"{q['rouge_l']:>9.3f}{q['nll']:>7.3f}{q['clean_stop']:>7.2f}" if q else "")
            )
    return "\n".join(lines)


def bars(speed: dict, quality_summary: dict | None) -> list[str]:
    """The issue's bars, as measured: 2x wall clock at batch 8, quality recovery, self-spec."""
    out = []
    b8 = speed.get("8", {})
    for name in ("skip2", "tuned2", "tuned2-upper"):
        if name in b8:
            out.append(f"{name} at B=8: {b8[name]['speedup']:.2f}x AR end to end "
                       f"({b8[name]['decode_speedup']:.2f}x decode); bar >= 1.5x")
    for name, q in (quality_summary or {}).items():
        if "recovery_rouge_l" in q:
            rr, rn = q["recovery_rouge_l"], q["recovery_nll"]
            out.append(f"{name} vs {q['vs_off_the_shelf']}: recovers "
                       f"{rr if rr is None else round(rr, 2)} of the ROUGE-L loss, "
                       f"{rn if rn is None else round(rn, 2)} of the NLL loss; bar >= 0.5 both")
        if "identical_to_own_ar" in q:
            speeds = ", ".join(f"B={b} {s[name]['speedup']:.2f}x" for b, s in speed.items()
                               if name in s)
            out.append(f"{name}: identical to its model's AR on {q['identical_to_own_ar']:.2f} of "
                       f"prompts (lossless: 1.00); {speeds} AR; bar >= 1.2x")
    return out


def plot(result: dict, path: Path) -> bool:
    """The speed and quality figure; False (no file) when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return False

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    speed, qual = result["speed"], (result.get("quality") or {}).get("summary", {})
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for b, summary in speed.items():
        for kind, marker in (("off the shelf", "o-"), ("tuned", "s--")):
            pts = sorted((s["target_speedup"], s["speedup"]) for n, s in summary.items()
                         if "target_speedup" in s and n.startswith("tuned") == (kind == "tuned")
                         and not n.endswith("-upper"))
            if pts:
                a1.plot(*zip(*pts), marker, label=f"SkipDecode {kind}, B={b}")
    xs = sorted({s["target_speedup"] for summary in speed.values() for s in summary.values()
                 if "target_speedup" in s})
    if xs:
        a1.plot(xs, xs, color="0.7", ls=":", label="target")
    a1.axhline(1.0, color="k", lw=0.8)
    a1.set_xlabel("schedule's target speedup (L / mean layers)")
    a1.set_ylabel("end-to-end speedup over AR")
    a1.set_title("speed")
    a1.legend(fontsize=7)
    a1.grid(alpha=0.3)
    if qual:
        for kind, marker in (("off the shelf", "o-"), ("tuned", "s--")):
            names = [n for n, s in speed[next(iter(speed))].items() if "target_speedup" in s
                     and n.startswith("tuned") == (kind == "tuned") and not n.endswith("-upper")]
            pts = sorted((speed[next(iter(speed))][n]["target_speedup"], qual[n]["rouge_l"])
                         for n in names if n in qual)
            if pts:
                a2.plot(*zip(*pts), marker, label=f"ROUGE-L vs AR, {kind}")
        a2.set_ylim(-0.05, 1.05)
        a2.set_xlabel("schedule's target speedup")
        a2.set_ylabel("ROUGE-L against the original model's AR")
        a2.set_title("quality (greedy, EOS stopping)")
        a2.legend(fontsize=7)
        a2.grid(alpha=0.3)
    fig.suptitle(f"SkipDecode on {Path(result['model']).name} "
                 f"({result['machine']['cpu']}, {result['machine']['cores']} cores)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def make_rows(llm, tuned_dirs: list[Path], speedups: list[float], ks: list[int],
              weights: str, adaptive: bool) -> list[Row]:
    import treadle
    from treadle.runtime.methods import AR, SelfSpec, SkipDecode

    rows = [Row("ar", llm, AR())]
    rows += [Row(f"skip{s:g}", llm, SkipDecode(speedup=s), speedup=s) for s in speedups]
    rows += [Row(f"selfspec{k}", llm, SelfSpec(k=k, adaptive=adaptive)) for k in ks]
    for path in tuned_dirs:
        tuned = treadle.load(path, kv_cache_mb=llm.kv_cache_mb, weights=weights)
        if tuned.skip_schedule is None:
            raise SystemExit(f"--tuned {path}: no skipdecode.json (made by `treadle train "
                             "skipdecode`)")
        tag = eq.tuned_name(path)
        speedup = json.loads((Path(path) / "skipdecode.json").read_text())["speedup"]
        rows.append(Row(tag, tuned, SkipDecode(), speedup=speedup, tuned=tag))
        rows += [Row(f"{tag}-selfspec{k}", tuned, SelfSpec(k=k, adaptive=adaptive), tuned=tag)
                 for k in ks]
        rows.append(Row(f"{tag}-ar", tuned, AR(), tuned=tag))
    names = [r.name for r in rows]
    if len(set(names)) != len(names):
        raise SystemExit(f"two rows share a name: {names} (two --tuned dirs of the same kind?)")
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", required=True, help="MT-Bench question.jsonl")
    ap.add_argument("--tuned", action="append", default=[], type=Path,
                    help="a model dir made by `treadle train skipdecode` (repeatable)")
    ap.add_argument("--n-prompts", type=int, default=16, help="prompts of the quality evaluation")
    ap.add_argument("--speed-prompts", type=int, default=8, help="prompts of the speed runs")
    ap.add_argument("--batches", default="1,8", help="batch sizes of the speed runs")
    ap.add_argument("--quality-batch", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--speedups", default="1.5,2,3")
    ap.add_argument("--selfspec-k", default="4")
    ap.add_argument("--adaptive", action="store_true",
                    help="self-speculation may fall back to plain steps when drafting measures "
                    "slower (the default runs every round as a draft round: its acceptance and "
                    "its speed are the drafting's own)")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--kv-cache-mb", type=float, default=512)
    ap.add_argument("--weights", default="float32",
                    help="the matrices' format for every model (treadle.load's `weights`): the "
                    "original and the tuned models run alike (default %(default)s)")
    ap.add_argument("--no-quality", action="store_true")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (the PNG goes beside it)")
    args = ap.parse_args(argv)

    import treadle

    t_start = time.perf_counter()
    command = " ".join([Path(sys.executable).name, *sys.argv])
    print(f"command: {command}")
    print(f"formula: {FORMULA}")
    speedups = [float(x) for x in args.speedups.split(",") if x]
    ks = [int(x) for x in args.selfspec_k.split(",") if x]
    llm = treadle.load(kv_cache_mb=args.kv_cache_mb, weights=args.weights)
    rows = make_rows(llm, args.tuned, speedups, ks, args.weights, args.adaptive)
    info = eq.machine()
    L = llm.config.num_layers
    lb, hb = weight_costs(llm)
    print(f"model {llm.model_dir.name}: L={L}, layer_bytes={lb / 1e6:.2f} MB, "
          f"head_bytes={hb / 1e6:.2f} MB (head = {hb / lb:.1f} layers); rows "
          f"{[r.name for r in rows]}")
    items = eq.mt_bench_prompts(args.prompts, max(args.n_prompts, args.speed_prompts))
    prompts = [it["prompt"] for it in items]
    N = args.max_new_tokens

    speed, runs = {}, {}
    for b in (int(x) for x in args.batches.split(",") if x):
        sp = prompts[: args.speed_prompts]
        print(f"speed: {len(sp)} prompts in calls of {b}, {N} tokens, ignore_eos, greedy, "
              f"{args.repeats} repeats")
        runs[str(b)] = speed_runs(rows, sp, N, b, args.repeats, print)
        speed[str(b)] = summarize(runs[str(b)], rows, N, L, lb, hb)

    qual = None
    if not args.no_quality:
        print(f"quality: {args.n_prompts} prompts, EOS stopping, calls of {args.quality_batch}")
        qual = quality(rows, prompts[: args.n_prompts], N, args.quality_batch,
                       ks[0] if ks else None)

    print(format_table(speed, qual and qual["summary"]))
    for line in bars(speed, qual and qual["summary"]):
        print(line)
    total = time.perf_counter() - t_start
    print(f"total {total:.1f} s")

    result = {
        "benchmark": "bench_skipdecode",
        "command": command,
        "machine": info,
        "model": str(llm.model_dir),
        "weights": args.weights,
        "tuned": {r.tuned: str(r.llm.model_dir) for r in rows if r.tuned},
        "prompts_file": str(args.prompts),
        "question_ids": [it["id"] for it in items],
        "speed_prompts": args.speed_prompts,
        "quality_prompts": args.n_prompts,
        "max_new_tokens": N,
        "repeats": args.repeats,
        "num_layers": L,
        "layer_bytes": lb,
        "head_bytes": hb,
        "formula": FORMULA,
        "quality_formulas": eq.FORMULAS,
        "speed": speed,
        "speed_runs": runs,
        "quality": qual,
        "bars": bars(speed, qual and qual["summary"]),
        "total_seconds": total,
    }
    out = args.out or RESULTS / f"bench_skipdecode-{platform.node() or 'host'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    png = out.with_suffix(".png")
    if plot(result, png):
        print(f"wrote {out} and {png}")
    else:
        print(f"wrote {out} (no plot: matplotlib is not installed)")


if __name__ == "__main__":
    main()
