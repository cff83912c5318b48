"""Skeleton Graph Decoding against Skeleton-of-Thought and AR of the large model, in one run.

    python perf/bench_sgd.py --vicuna ../shared/data/vicuna80/sot_router_labels.csv \
        --mt-bench ../shared/data/mt_bench/question.jsonl [--small default] [--node-method ar] \
        [--n-questions 8] [--max-new-tokens 256] [--point-tokens 48] [--judge default]

Sections (--only, comma-separated):
  parse    the skeleton step alone on HELD_OUT (our own questions, in no evaluation set), with the
           SGD prompt and the SoT prompt: parse rate = skeletons that parse into >= 2 points /
           skeletons; also the fraction of points that carry both annotations and of dependency
           edges dropped (forward, self or unknown: a sign the model copies the examples).
  router   SoT-R's router on all Vicuna-80 questions: predicted positive = score >= margin (the
           calibrated margin, runtime/sgd.py calibrated_margin, unless --router-margin; also 0);
           precision = TP / (TP + FP), recall = TP / (TP + FN) against the SoT labels (1 = the
           answer splits into independent points). The best-F1 margin is listed too; it is fitted
           on these very labels, so it is not a held-out figure.
  compare  the Vicuna label-1 questions and MT-Bench first turns (first --n-questions of each):
           AR, SoT and SGD per question, interleaved, one question at a time (the parallelism is
           inside a question); then, on all Vicuna-80 questions (first --n-questions), AR and
           SGD with the router (SGD-R).
Per method: wall clock summed over questions, speedup = AR seconds / method seconds; quality
against the large model's AR answer to the same question:
  ROUGE-L   F1 of the word LCS (perf/eval_quality.py rouge_l);
  NLL       mean -log p_large(answer token | chat prompt, earlier answer tokens), the answer text
            re-encoded (a skeleton answer's titles were pre-filled, not sampled), token-weighted;
  coverage  fraction of the question's content words (\\w+ of >= 4 letters, not in STOPWORDS)
            whose first 5 letters begin some word of the answer;
  judge     P(answer better than AR's) from a judge model's logits of "A" vs "B" after a pairwise
            prompt, averaged over both answer orders (position bias cancels): sigmoid of the
            logit margin. --judge default: the large model; a directory: any local model;
            none: skipped.
and the fraction of points routed to the small model, the fallback rate (unusable skeletons /
questions), the parse rate of the skeletons written, the router's AR rate.
Timing: one warm-up question per method first (HELD_OUT[0]): the skeleton prompt's few-shot
prefix then stays in the prefix cache, as it does in a server. Results go to
perf/results/bench_sgd-<tag>.json with the machine and the command.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import treadle  # noqa: E402
from bench_decode import machine  # noqa: E402
from eval_quality import mt_bench_prompts, rouge_l, teacher_forced, words  # noqa: E402
from treadle.runtime.methods import AR, SkipDecode, Speculative  # noqa: E402
from treadle.runtime.sgd import calibrated_margin, router_scores, write_skeletons  # noqa: E402
from treadle.runtime.skeleton import SGD, SoT  # noqa: E402

HELD_OUT = [  # our own questions for the parse rate; none is in Vicuna-80 or MT-Bench
    "What are good ways to save money on groceries?",
    "How can a small team run better meetings?",
    "What should I check when buying a used car?",
    "How can a student prepare for a job interview?",
    "What are the advantages of electric bicycles?",
    "How can I make my home more energy efficient?",
    "What are some tips for writing a clear email?",
    "How can a town support its local shops?",
    "What should a beginner know about growing tomatoes?",
    "How can I sleep better at night?",
    "What makes a museum visit enjoyable for children?",
    "How should a family prepare for a long road trip?",
]
STOPWORDS = set("""what which that this these those with from your have will would could should
about into over under their there them they then than when where while were been being does
doing more most some such only also very just like make made each other many much well
explain describe write give tell please""".split())


def coverage(question: str, answer: str) -> float:
    keys = [w for w in set(words(question)) if len(w) >= 4 and w not in STOPWORDS]
    if not keys:
        return 1.0
    stems = {w[:5] for w in words(answer)}
    return sum(k[:5] in stems for k in keys) / len(keys)


class LogitJudge:
    """A pairwise judge from any local model: P(A better) = sigmoid(logit("A") - logit("B")) at
    the first token of its answer, averaged over both orders of the two answers."""

    ASK = ("Here is a question and two answers. Which answer is more helpful, correct and "
           "complete? Reply with A or B only.\n\nQuestion: {q}\n\nAnswer A:\n{a}\n\n"
           "Answer B:\n{b}")

    def __init__(self, llm):
        self.llm = llm
        tok = llm.tokenizer
        self.ids = [tok.encode(x, add_special_tokens=False)[0] for x in ("A", "B")]

    def margin(self, prompt: str) -> float:
        got: list[float] = []

        def record(context, logits):
            got.append(float(logits[self.ids[0]] - logits[self.ids[1]]))
            return logits

        s = self.llm.submit(prompt, treadle.SamplingParams(max_new_tokens=1), chat=True,
                            processor=record)
        while not s.finished:
            self.llm.step()
        return got[0]

    def __call__(self, question: str, answer: str, baseline: str) -> float:
        first = self.margin(self.ASK.format(q=question, a=answer, b=baseline))
        second = self.margin(self.ASK.format(q=question, a=baseline, b=answer))
        return (_sigmoid(first) + _sigmoid(-second)) / 2


def _sigmoid(x: float) -> float:
    return 1 / (1 + math.exp(-x))


# --- sections -----------------------------------------------------------------------------------
def parse_rate(llm, n: int, skeleton_tokens: int, which: list[str]) -> dict:
    out = {}
    params = treadle.SamplingParams(max_new_tokens=skeleton_tokens)
    methods = {"sgd": SGD(skeleton_tokens=skeleton_tokens),
               "sot": SoT(skeleton_tokens=skeleton_tokens)}
    for name, method in ((w, methods[w]) for w in which):
        t0 = time.perf_counter()
        reports = write_skeletons(llm, HELD_OUT[:n], params, True, None, method)
        secs = time.perf_counter() - t0
        nodes = [node for r in reports for node in r.skeleton.nodes]
        dropped = sum("dependency on" in note for r in reports for note in r.skeleton.notes)
        kept = sum(len(node.depends) for node in nodes)
        out[name] = {
            "questions": len(reports),
            "parse_rate": sum(r.skeleton.ok for r in reports) / len(reports),
            "mean_points": len(nodes) / len(reports),
            "annotated_points": sum(nd.annotated for nd in nodes) / len(nodes) if nodes else 0.0,
            "dependency_edges_kept": kept,
            "dependency_edges_dropped": dropped,
            "difficulties": sorted({nd.difficulty for nd in nodes}),
            "seconds": secs,
            "skeletons": [{"question": q, "text": r.skeleton_text, "error": r.skeleton.error}
                          for q, r in zip(HELD_OUT, reports)],
        }
        print(f"parse rate {name}: {out[name]['parse_rate']:.2f} over {len(reports)} held-out "
              f"questions ({secs:.0f} s)")
    return out


def read_labels(path: Path) -> list[tuple[int, str]]:
    with path.open(newline="") as f:
        return [(int(row["label"]), row["request"]) for row in csv.DictReader(f, delimiter=";")]


def router_quality(llm, labels: list[tuple[int, str]], margin: float | None) -> dict:
    t0 = time.perf_counter()
    calibrated = calibrated_margin(llm, chat=True)
    margin = calibrated if margin is None else margin
    scores = router_scores(llm, [q for _, q in labels], chat=True)
    secs = time.perf_counter() - t0

    def at(m: float) -> dict:
        tp = sum(s >= m and y == 1 for s, (y, _) in zip(scores, labels))
        fp = sum(s >= m and y == 0 for s, (y, _) in zip(scores, labels))
        fn = sum(s < m and y == 1 for s, (y, _) in zip(scores, labels))
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        return {"margin": m, "precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r
                else 0.0, "predicted_positive": tp + fp}

    best = max((at(m) for m in sorted(set(scores))), key=lambda d: d["f1"])
    out = {"questions": len(labels), "positives": sum(y for y, _ in labels), "seconds": secs,
           "calibrated_margin": calibrated, "at_margin": at(margin), "at_zero": at(0.0),
           "best_f1_on_these_labels": best,
           "scores": [{"label": y, "score": s, "request": q} for s, (y, q) in zip(scores, labels)]}
    a = out["at_margin"]
    print(f"router: precision {a['precision']:.2f}, recall {a['recall']:.2f} at margin "
          f"{margin:+.2f} "
          f"({a['predicted_positive']} of {len(labels)} predicted positive)")
    return out


def compare(llm, sets: dict[str, list[str]], methods: dict[str, object], params, judge) -> dict:
    out = {}
    for set_name, questions in sets.items():
        rows: dict[str, list[dict]] = {name: [] for name in methods}
        for i, q in enumerate(questions):
            answers = {}
            for name, method in methods.items():
                t0 = time.perf_counter()
                done = llm.generate(q, params, chat=True, method=method)
                answers[name] = (done, time.perf_counter() - t0)
            ar_text = answers["ar"][0].text
            ids = llm.encode(q, chat=True)
            for name, (done, secs) in answers.items():
                gen = llm.tokenizer.encode(done.text, add_special_tokens=False) or \
                    [next(iter(llm.eos_ids))]
                nll, _ = teacher_forced(llm, ids, gen)
                rep = getattr(done, "report", None)
                rows[name].append({
                    "question": q, "seconds": secs, "text": done.text,
                    "tokens": len(gen), "nll": nll, "rouge_l": rouge_l(done.text, ar_text),
                    "coverage": coverage(q, done.text),
                    "judge": None if judge is None or name == "ar" else judge(q, done.text,
                                                                               ar_text),
                    "mode": rep.mode if rep else "plain",
                    "points": len(rep.points) if rep else 0,
                    "small_points": rep.routed_small() if rep else 0,
                    "waves": len(rep.waves) if rep else 0,
                    "parsed": None if rep is None or rep.skeleton is None else rep.skeleton.ok,
                    "phase_seconds": rep.seconds if rep else {},
                })
            print(f"  {set_name} {i + 1}/{len(questions)}: " + ", ".join(
                f"{n} {rows[n][-1]['seconds']:.1f} s" for n in methods), flush=True)
        out[set_name] = {"summary": {n: summarize(r, rows["ar"]) for n, r in rows.items()},
                         "rows": rows}
        for n, s in out[set_name]["summary"].items():
            print(f"{set_name} {n}: {json.dumps({k: v for k, v in s.items() if k != 'method'})}")
    return out


def summarize(rows: list[dict], ar_rows: list[dict]) -> dict:
    n = len(rows)
    secs, ar_secs = sum(r["seconds"] for r in rows), sum(r["seconds"] for r in ar_rows)
    tokens = sum(r["tokens"] for r in rows)
    points = sum(r["points"] for r in rows)
    parsed = [r["parsed"] for r in rows if r["parsed"] is not None]
    judged = [r["judge"] for r in rows if r["judge"] is not None]
    return {
        "questions": n,
        "seconds": secs,
        "speedup_vs_ar": ar_secs / secs if secs else 0.0,
        "rouge_l_vs_ar": sum(r["rouge_l"] for r in rows) / n,
        "nll": sum(r["nll"] * r["tokens"] for r in rows) / tokens,
        "coverage": sum(r["coverage"] for r in rows) / n,
        "judge_win_vs_ar": sum(judged) / len(judged) if judged else None,
        "mean_tokens": tokens / n,
        "fraction_routed_small": sum(r["small_points"] for r in rows) / points if points else 0.0,
        "fallback_rate": sum(r["mode"] == "fallback" for r in rows) / n,
        "router_ar_rate": sum(r["mode"] == "ar" for r in rows) / n,
        "parse_rate": sum(parsed) / len(parsed) if parsed else None,
        "mean_points": points / n,
        "mean_waves": sum(r["waves"] for r in rows) / n,
    }


def node_method(name: str):
    return {"ar": None, "sd": Speculative.chain(depth=4, draft="auto"),
            "gsd": Speculative.gsd(draft="auto"), "skipdecode": SkipDecode()}[name]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vicuna", type=Path, required=True,
                    help="vicuna80/sot_router_labels.csv (label;request)")
    ap.add_argument("--mt-bench", type=Path, required=True, help="mt_bench/question.jsonl")
    ap.add_argument("--only", default="parse,router,compare")
    ap.add_argument("--n-questions", type=int, default=8, help="per question set")
    ap.add_argument("--n-held-out", type=int, default=len(HELD_OUT))
    ap.add_argument("--n-router", type=int, default=80, help="router: first N Vicuna questions")
    ap.add_argument("--parse-methods", default="sgd,sot", help="parse: whose prompts")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="AR's cap")
    ap.add_argument("--point-tokens", type=int, default=48, help="SoT/SGD: each point's cap")
    ap.add_argument("--skeleton-tokens", type=int, default=160)
    ap.add_argument("--small", default="auto",
                    help="SGD's small model: 'default' (the derived draft), a directory, 'none', "
                    "or 'auto' (the derived draft if built, else none)")
    ap.add_argument("--threshold", type=int, default=2)
    ap.add_argument("--node-method", default="ar", choices=["ar", "sd", "gsd", "skipdecode"])
    ap.add_argument("--router-margin", type=float, default=None,
                    help="default: calibrated per model (runtime/sgd.py calibrated_margin)")
    ap.add_argument("--judge", default="default",
                    help="'default' (the large model), a model directory, or 'none'")
    ap.add_argument("--model", help="the large model (default: the default model)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--tag", help="results file suffix (default: vm / vm-amx)")
    args = ap.parse_args(argv)

    llm = treadle.load(args.model)
    small = args.small
    if small == "auto":
        from treadle.loaders.draft_model import find_draft

        small = "default" if find_draft() is not None else "none"
    small = None if small == "none" else small
    node = node_method(args.node_method)
    sot = SoT(node_method=node, point_tokens=args.point_tokens,
              skeleton_tokens=args.skeleton_tokens)
    sgd = SGD(node_method=node, point_tokens=args.point_tokens,
              skeleton_tokens=args.skeleton_tokens, small=small, threshold=args.threshold,
              router_margin=args.router_margin)
    params = treadle.SamplingParams(max_new_tokens=args.max_new_tokens)
    only = args.only.split(",")
    result = {"machine": machine(), "command": " ".join(["python"] + sys.argv),
              "settings": {"small": small, "node_method": args.node_method,
                           "max_new_tokens": args.max_new_tokens,
                           "point_tokens": args.point_tokens, "threshold": args.threshold,
                           "sot": repr(sot), "sgd": repr(sgd)},
              "formulas": __doc__}
    labels = read_labels(args.vicuna)
    tag = args.tag or ("vm-amx" if "amx_bf16" in result["machine"]["cpu_features"] else "vm")
    path = args.out / f"bench_sgd-{tag}.json"
    if "parse" in only:
        result["parse"] = parse_rate(llm, args.n_held_out, args.skeleton_tokens,
                                     args.parse_methods.split(","))
        save(result, path)
    if "router" in only:
        result["router"] = router_quality(llm, labels[:args.n_router], args.router_margin)
        save(result, path)
    if "compare" in only:
        judge = None
        if args.judge != "none":
            judge = LogitJudge(llm if args.judge == "default" else treadle.load(args.judge))
        methods = {"ar": AR(), "sot": sot, "sgd": sgd}
        for method in methods.values():  # warm-up: code paths and the skeleton prompts' prefix
            llm.generate(HELD_OUT[0], replace(params, max_new_tokens=8), chat=True, method=method)
        n = args.n_questions
        sets = {"vicuna_label1": [q for y, q in labels if y == 1][:n],
                "mt_bench": [r["prompt"] for r in mt_bench_prompts(args.mt_bench, n)]}
        result["compare"] = compare(llm, sets, methods, params, judge)
        save(result, path)
        routed = {"ar": AR(), "sgd_router": replace(sgd, router=True)}
        result["compare_router"] = compare(llm, {"vicuna_all": [q for _, q in labels][:n]},
                                           routed, params, judge)
        save(result, path)
    return 0


def save(result: dict, path: Path) -> None:
    """Written after every section, so a long run that is stopped keeps what it measured."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
