"""APAR on the tuned default model: latency, forks, KV memory, quality and serving, in one run.

    python perf/bench_apar.py --questions ../shared/data/vicuna80/sot_router_labels.csv \
        [--model DIR] [--n 0] [--max-new-tokens 256] [--serving 8] [--apar-base sd] [--draft ngram]

Questions: the Vicuna-80 questions whose SoT router label is 1 (answers that split into points),
chat template applied, greedy, --max-new-tokens per request (APAR: summed over its streams). The
APAR model is `treadle train apar`'s output (default: the cached one); the original is the
embedded default model; both load with the same --weights (float32: what the tuning wrote). Per
question, one at a time (batch 1), each timed as one call:
    AR original   the original model, plain AR (the reference answer of the quality proxies)
    AR same       the APAR model, plain AR with [Fork] and [Child] banned (its answer in one stream)
    APAR          the APAR model, APAR(); the answer reassembled from its fork tree
    APAR+SD       APAR whose streams each decode with --apar-base (sd: chain SD, gsd) and --draft
Reported:
    seconds per request = mean wall seconds of a call; speedup = mean(AR) / mean(APAR variant)
    tokens/s            = generated tokens (all streams) / seconds, summed over the questions
    fork rate           = fraction of questions whose APAR run has more than one stream
    streams per request = mean streams of the APAR fork trees (the request's own included)
    KV bytes            = slots x 2 (K, V) x layers x kv_heads x head_dim x bytes per element;
                          shared: each fork tree's root sequence once + each child's own tail
                          (its [Child] and tokens: a child reads its parent's prefix in place);
                          unshared: every stream holding its whole sequence. Summed over questions.
    quality proxies     = perf/eval_quality.py's ROUGE-L F1 of each variant's text against the
                          original's AR text, and the ORIGINAL model's mean NLL per token of each
                          variant's text (re-encoded, teacher forced after the same prompt)
    serving             = the first --serving questions submitted together (llm.submit, then
                          llm.step until all end): throughput = generated tokens / wall seconds,
                          latency = seconds from submission to a request's last stream ending;
                          APAR against AR of the same model (bans as above)
Bars (issue 12): APAR >= 1.5x AR same; APAR+SD >= 2x; fork rate >= 60%.
Results: perf/results/bench_apar-<tag>.json with the machine and the command.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import treadle  # noqa: E402
from bench_decode import machine  # noqa: E402
from eval_quality import rouge_l, teacher_forced  # noqa: E402
from treadle.runtime.apar import APAR, reassemble  # noqa: E402
from treadle.runtime.methods import AR, Speculative  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def label1_questions(path: Path) -> list[str]:
    """The `request`s whose `label` is 1 in SoT's `label;request` file."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter=";"))
    if not rows or not {"label", "request"} <= set(rows[0]):
        raise SystemExit(f"{path}: expected a 'label;request' CSV (SoT router labels)")
    return [r["request"] for r in rows if r["label"].strip() == "1"]


def banned(ids: list[int]):
    """A logit processor that never lets `ids` be sampled (APAR's control tokens, in AR)."""

    def process(context, logits):
        out = logits.clone()
        out[ids] = -float("inf")
        return out

    return process


def ar_banned(llm, question: str, params, ban) -> dict:
    t0 = time.perf_counter()
    s = llm.submit(question, params, chat=True, processor=ban)
    for _ in llm.engine.run([s]):
        pass
    r = s.request
    return {"seconds": time.perf_counter() - t0, "text": r.text, "tokens": len(r.tokens),
            "eos": r.finish_reason == "eos"}


def plain(llm, question: str, params) -> dict:
    t0 = time.perf_counter()
    done = llm.generate(question, params, chat=True)
    return {"seconds": time.perf_counter() - t0, "text": done.text, "tokens": len(done.tokens),
            "eos": done.finish_reason == "eos"}


def apar_run(llm, question: str, params, method: APAR) -> dict:
    """One APAR request (as `generate` runs it), keeping its fork tree for the KV count."""
    t0 = time.perf_counter()
    root = llm.submit(question, params, chat=True, method=method)
    for _ in llm.engine.run([root]):
        pass
    seconds = time.perf_counter() - t0
    family = root.group
    skip = {method.fork_id, method.child_id} | set(llm.eos_ids)
    text = reassemble(family, lambda t: llm.tokenizer.decode([x for x in t if x not in skip]))
    shared = unshared = 0
    for s in family.streams:
        unshared += len(s.context)
        # a child's prompt is its parent's sequence up to the fork, then [Child]: the child
        # reads that prefix in place and owns the rest
        shared += len(s.context) - (len(s.request.prompt) - 1 if s.parent is not None else 0)
    return {"seconds": seconds, "text": text, "tokens": family.generated(),
            "eos": root.request.finish_reason == "eos", "streams": len(family.streams),
            "fork_depth": family.max_depth(), "tokens_per_stream": family.tokens_per_stream(),
            "kv_slots_shared": shared, "kv_slots_unshared": unshared}


def quality(original, prompt_ids: list[int], text: str, reference: str) -> dict:
    ids = original.tokenizer.encode(text, add_special_tokens=False)
    nll = teacher_forced(original, prompt_ids, ids)[0] if ids else None
    return {"rouge_l": rouge_l(text, reference), "nll": nll, "nll_tokens": len(ids)}


def serving(llm, questions: list[str], params, method, ban) -> dict:
    """All `questions` submitted at once; step until every request's streams have ended."""
    t0 = time.perf_counter()
    roots = [llm.submit(q, params, chat=True, method=method,
                        processor=None if isinstance(method, APAR) else ban) for q in questions]
    ended: dict[int, float] = {}
    while len(ended) < len(roots):
        llm.step()
        now = time.perf_counter() - t0
        for i, s in enumerate(roots):
            if i not in ended and all(t.finished for t in s.tree()):
                ended[i] = now
    wall = time.perf_counter() - t0
    tokens = sum(len(t.request.tokens) for s in roots for t in s.tree())
    lat = [ended[i] for i in range(len(roots))]
    return {"requests": len(roots), "wall_s": wall, "tokens": tokens,
            "throughput_tok_s": tokens / wall, "latency_mean_s": statistics.mean(lat),
            "latency_max_s": max(lat), "streams": sum(len(s.tree()) for s in roots)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--questions", type=Path, required=True,
                    help="vicuna80/sot_router_labels.csv (label;request)")
    ap.add_argument("--model", type=Path, default=None,
                    help="the APAR model dir (default: `treadle train apar`'s output)")
    ap.add_argument("--original", type=Path, default=None,
                    help="the model it was tuned from (default: the embedded default model)")
    ap.add_argument("--n", type=int, default=0, help="first N label-1 questions (0: all)")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--serving", type=int, default=8, help="concurrent requests (0: skip)")
    ap.add_argument("--apar-base", default="sd", choices=["sd", "gsd", "none"],
                    help="APAR+SD row: how each stream decodes (none: skip the row)")
    ap.add_argument("--draft", default="ngram",
                    help="APAR+SD's draft: ngram (prompt lookup) or a model dir with the APAR "
                    "model's vocabulary")
    ap.add_argument("--weights", default="float32",
                    help="weight format of both models (load(weights=...)): float32 (default: "
                    "the tuning's own format; the default model alone would load as int4), "
                    "bfloat16, int8, int4, ...")
    ap.add_argument("--tag", default="vm", help="results file: bench_apar-<tag>.json")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)

    from treadle.train.apar import find_apar, read_info

    model_dir = args.model or find_apar()
    if model_dir is None:
        raise SystemExit("no tuned APAR model: run `treadle train apar` or pass --model DIR")
    questions = label1_questions(args.questions)
    questions = questions[: args.n] if args.n else questions
    llm = treadle.load(model_dir, weights=args.weights)
    original = treadle.load(args.original, weights=args.weights)
    m = llm.apar_ids(APAR())
    ban = banned([m.fork_id, m.child_id])
    params = treadle.SamplingParams(max_new_tokens=args.max_new_tokens)
    variants = {"apar": m}
    if args.apar_base != "none":
        base = (Speculative.chain(depth=4, draft=args.draft) if args.apar_base == "sd"
                else Speculative.gsd(draft=args.draft))
        variants["apar_sd"] = APAR(base=base, fork_id=m.fork_id, child_id=m.child_id)

    # warm-up: every code path once, untimed
    warm = treadle.SamplingParams(max_new_tokens=8)
    original.generate(questions[0], warm, chat=True)
    ar_banned(llm, questions[0], warm, ban)
    for method in variants.values():
        apar_run(llm, questions[0], warm, method)

    rows = []
    for q in questions:
        ref = plain(original, q, params)
        row = {"question": q, "ar_original": ref, "ar_same": ar_banned(llm, q, params, ban)}
        for name, method in variants.items():
            row[name] = apar_run(llm, q, params, method)
        prompt_ids = original.encode(q, chat=True)
        for name in ("ar_original", "ar_same", *variants):
            row[name]["quality"] = quality(original, prompt_ids, row[name]["text"], ref["text"])
        rows.append(row)
        print(f"{len(rows)}/{len(questions)} {q[:50]!r}: " + ", ".join(
            f"{n} {row[n]['seconds']:.1f}s" for n in ("ar_original", "ar_same", *variants))
            + f", streams {row['apar']['streams']}", flush=True)

    cfg = llm.config
    slot_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * llm.model.dtype.itemsize
    names = ["ar_original", "ar_same", *variants]
    mean_s = {n: statistics.mean(r[n]["seconds"] for r in rows) for n in names}

    def summary(n: str) -> dict:
        qs = [r[n]["quality"] for r in rows]
        scored = [x for x in qs if x["nll"] is not None]
        tokens = sum(x["nll_tokens"] for x in scored)
        return {
            "seconds_per_request": mean_s[n],
            "tokens_per_request": statistics.mean(r[n]["tokens"] for r in rows),
            "tokens_per_s": sum(r[n]["tokens"] for r in rows) / sum(r[n]["seconds"] for r in rows),
            "clean_stop": statistics.mean(r[n]["eos"] for r in rows),
            "rouge_l_vs_original_ar": statistics.mean(x["rouge_l"] for x in qs),
            "original_nll": (sum(x["nll"] * x["nll_tokens"] for x in scored) / tokens
                             if tokens else None),
        }

    forks = [r["apar"]["streams"] > 1 for r in rows]
    result = {
        "machine": machine(),
        "command": " ".join(["python"] + sys.argv),
        "questions": str(args.questions),
        "n_questions": len(rows),
        "max_new_tokens": args.max_new_tokens,
        "apar_model": str(model_dir),
        "apar_model_info": {k: v for k, v in (read_info(model_dir) or {}).items()
                            if k in ("recipe", "data", "heldout_after", "steps")},
        "original_model": str(original.model_dir),
        "weights": args.weights,
        "variants": {n: summary(n) for n in names},
        "speedup": {
            "apar_vs_ar_same": mean_s["ar_same"] / mean_s["apar"],
            "apar_vs_ar_original": mean_s["ar_original"] / mean_s["apar"],
            **({"apar_sd_vs_ar_same": mean_s["ar_same"] / mean_s["apar_sd"]}
               if "apar_sd" in variants else {}),
        },
        "fork_rate": statistics.mean(forks),
        "streams_per_request": statistics.mean(r["apar"]["streams"] for r in rows),
        "kv_bytes": {
            n: {"shared": slot_bytes * sum(r[n]["kv_slots_shared"] for r in rows),
                "unshared": slot_bytes * sum(r[n]["kv_slots_unshared"] for r in rows)}
            for n in variants
        },
        "apar_sd": {"draft": args.draft, "base": args.apar_base,
                    "same_text_as_apar": statistics.mean(r["apar_sd"]["text"] == r["apar"]["text"]
                                                         for r in rows)}
        if "apar_sd" in variants else None,
        "rows": rows,
    }
    if args.serving:
        qs = (questions * args.serving)[: args.serving]
        result["serving"] = {
            "ar_same": serving(llm, qs, params, AR(), ban),
            "apar": serving(llm, qs, params, m, ban),
        }
        s = result["serving"]
        s["throughput_ratio"] = s["apar"]["throughput_tok_s"] / s["ar_same"]["throughput_tok_s"]
        s["latency_ratio"] = s["apar"]["latency_mean_s"] / s["ar_same"]["latency_mean_s"]
    sp = result["speedup"]
    result["bars"] = {
        "apar_1.5x_ar_same": sp["apar_vs_ar_same"] >= 1.5,
        "apar_sd_2x_ar_same": sp.get("apar_sd_vs_ar_same", 0) >= 2.0,
        "fork_rate_60pct": result["fork_rate"] >= 0.6,
    }
    short = {k: result[k] for k in ("speedup", "fork_rate", "streams_per_request", "kv_bytes",
                                    "bars")}
    short["variants"] = result["variants"]
    short["serving"] = result.get("serving")
    print(json.dumps(short, indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench_apar-{args.tag}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
