"""Output quality of lossy decoding methods against the full model's own greedy output.

    python perf/eval_quality.py --prompts ../shared/data/mt_bench/question.jsonl \
        --n-prompts 16 --methods ar,skip1.5,skip2,skip3 --max-new-tokens 128 [--batch-size 8]

The reference for every prompt is the full model's AR greedy completion (normal EOS stopping,
max_new_tokens cap). Each method generates greedily from the same chat-templated prompts, in
batches of --batch-size prompts per `generate` call, and is scored per prompt by:
    ROUGE-L F1   = 2 P R / (P + R), P = LCS / |candidate|, R = LCS / |reference|, over word tokens
                   (lowercased \\w+ runs; LCS = longest common subsequence). Both empty -> 1.
    target NLL   = -1/G * sum_{j<G} log p_full(g_j | prompt, g_<j), the full model (all layers)
                   teacher-forced over prompt + generation; G counts every generated token, the
                   EOS token included when the method emitted one.
    argmax agree = fraction of the G generated tokens equal to the full model's argmax at that
                   position (greedy AR itself scores 1.0 up to float ties: a check of the NLL pass).
    clean stop   = finish_reason == "eos" (the model ended its answer before max_new_tokens).
Per method: ROUGE-L is the mean over prompts, NLL the token-weighted mean (total NLL / total
tokens), clean stop the fraction of prompts. Caveat: a repetitive degenerate output can have a low
NLL (repeats are likely under the model), so read NLL beside ROUGE-L and clean stops.

Prompts are MT-Bench first turns taken round-robin over the categories (so a small N covers them
all). Results go to perf/results/eval_quality-<name>.json (machine, command, formulas, per-method
summary, per-prompt rows, sample outputs).

Methods on the command line: ar, skip<S> (SkipDecode, target speedup S), selfspec<K> (lossless
SelfSpec with draft length K). Other methods plug in by passing a Method object to `evaluate`, or by
adding a prefix to METHOD_PREFIXES.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLES_PER_METHOD = 4
SAMPLE_CHARS = 200

FORMULAS = {
    "rouge_l": "F1 = 2PR/(P+R), P = LCS/|cand|, R = LCS/|ref|; tokens = re.findall(r'\\w+', "
    "text.lower()); mean over prompts; reference = full-model AR greedy output",
    "nll": "-(1/G) sum_j log p_full(g_j | prompt, g_<j), full model teacher-forced; G = all "
    "generated tokens incl. EOS; method value = total NLL / total tokens over prompts",
    "ppl": "exp(nll)",
    "argmax_agree": "fraction of generated tokens equal to the full model's teacher-forced argmax",
    "clean_stop": "fraction of prompts with finish_reason == 'eos'",
    "exact_match": "fraction of prompts whose generated token ids equal the reference's exactly",
}


# --- metrics ----------------------------------------------------------------------------------
def words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def lcs_length(a: list, b: list) -> int:
    """Length of the longest common subsequence, O(|a| |b|) time, O(|b|) memory."""
    if len(a) < len(b):
        a, b = b, a
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(candidate: str, reference: str) -> float:
    """ROUGE-L F1 between two texts on lowercased word tokens (symmetric)."""
    c, r = words(candidate), words(reference)
    if not c and not r:
        return 1.0
    if not c or not r:
        return 0.0
    lcs = lcs_length(c, r)
    if lcs == 0:
        return 0.0
    p, rec = lcs / len(c), lcs / len(r)
    return 2 * p * rec / (p + rec)


def teacher_forced(llm, prompt_ids: list[int], gen_ids: list[int]) -> tuple[float, float]:
    """(mean NLL per generated token, argmax agreement) of gen_ids after prompt_ids under the full
    model (every layer), one teacher-forced forward over prompt + generation."""
    from treadle.runtime.kv_cache import KVCache

    if not gen_ids:
        raise ValueError("target_nll needs at least one generated token")
    ids = list(prompt_ids) + list(gen_ids)
    p, g = len(prompt_ids), len(gen_ids)
    model = llm.model
    cache = KVCache(llm.config, rows=1, capacity=len(ids), dtype=model.dtype, device=model.device)
    row = cache.allocate()
    with torch.inference_mode():
        step = cache.make_step([row], [ids], logits="all")
        h = model.hidden(step, cache)  # [1, n, d]
        logits = model.logits(h[0, p - 1 : p + g - 1])  # [g, V] fp32: predicts gen_ids
        logp = torch.log_softmax(logits.float(), dim=-1)
        target = torch.tensor(gen_ids, device=logp.device)
        nll = -logp.gather(1, target[:, None]).mean().item()
        agree = (logits.argmax(-1) == target).float().mean().item()
    return nll, agree


def target_nll(llm, prompt_ids: list[int], gen_ids: list[int]) -> float:
    """Mean negative log-likelihood per token of gen_ids given prompt_ids under the full model."""
    return teacher_forced(llm, prompt_ids, gen_ids)[0]


# --- methods ----------------------------------------------------------------------------------
def _ar(_: str):
    from treadle.runtime.methods import AR

    return AR()


def _skip(arg: str):
    from treadle.runtime.methods import SkipDecode

    return SkipDecode(speedup=float(arg))


def _selfspec(arg: str):
    from treadle.runtime.methods import SelfSpec

    return SelfSpec(k=int(arg))


# prefix -> parser of the rest of the name (longest prefix wins); "ar" takes no argument
METHOD_PREFIXES: dict[str, Callable[[str], object]] = {
    "ar": _ar,
    "skip": _skip,
    "selfspec": _selfspec,
}


def parse_method(name: str):
    for prefix in sorted(METHOD_PREFIXES, key=len, reverse=True):
        if name.startswith(prefix):
            rest = name[len(prefix) :]
            if prefix == "ar" and rest:
                continue
            try:
                return METHOD_PREFIXES[prefix](rest)
            except ValueError as e:
                raise SystemExit(f"bad method {name!r}: {e}") from None
    raise SystemExit(f"unknown method {name!r}: expected ar, skip<S>, selfspec<K>")


# --- prompts and machine ----------------------------------------------------------------------
def mt_bench_prompts(path: str | Path, n: int) -> list[dict]:
    """First turns of an MT-Bench question.jsonl, round-robin over categories, first n."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    by_cat: dict[str, list[dict]] = {}
    for r in rows:
        by_cat.setdefault(r["category"], []).append(r)
    ordered, depth = [], max(len(v) for v in by_cat.values())
    for i in range(depth):  # round-robin, keeping every question even if categories differ in size
        for group in by_cat.values():
            if i < len(group):
                ordered.append(group[i])
    return [
        {"id": r.get("question_id"), "category": r["category"], "prompt": r["turns"][0]}
        for r in ordered[:n]
    ]


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {
        "host": platform.node(),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "load_average_at_start": load,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "thread_env": {
            k: os.environ.get(k)
            for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
                      "OMP_WAIT_POLICY")
        },
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


# --- evaluation -------------------------------------------------------------------------------
def _generate(llm, prompts: list[str], method, max_new_tokens: int, batch_size: int):
    """Completions for every prompt, batch_size prompts per generate call; and the calls' stats."""
    import treadle

    params = treadle.SamplingParams(max_new_tokens=max_new_tokens)
    outs, stats = [], []
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i : i + batch_size]
        res = llm.generate(batch, params, chat=True, method=method)
        outs.extend(res)
        stats.append(res[0].stats)
    return outs, stats


def evaluate(
    llm,
    prompts: list[str],
    methods: dict,
    max_new_tokens: int = 128,
    batch_size: int = 8,
    reference: list | None = None,
    log: Callable[[str], None] | None = print,
) -> dict:
    """Score each method's greedy outputs against the full model's AR greedy outputs.

    methods: name -> Method. An AR() entry (if any) doubles as the reference; else the reference
    is generated first (or passed in as `reference`, a list of Completions for `prompts`).
    Returns {"summary": {name: {...}}, "rows": [...], "samples": {name: [...]}, "reference": ...}.
    """
    from treadle.runtime.methods import AR

    log = log or (lambda s: None)
    prompt_ids = [llm.encode(p, chat=True) for p in prompts]
    generated: dict[str, tuple[list, list, float]] = {}

    def run(name, method):
        t0 = time.perf_counter()
        outs, stats = _generate(llm, prompts, method, max_new_tokens, batch_size)
        dt = time.perf_counter() - t0
        generated[name] = (outs, stats, dt)
        log(f"  {name}: generated {sum(len(o.tokens) for o in outs)} tokens in {dt:.1f} s")

    ref_name = next((n for n, m in methods.items() if isinstance(m, AR)), None)
    if reference is None:
        if ref_name is None:
            ref_name = "ar (reference)"
            run(ref_name, AR())
        else:
            run(ref_name, methods[ref_name])
        reference = generated[ref_name][0]
    for name, method in methods.items():
        if name not in generated:
            run(name, method)

    rows, summary, samples = [], {}, {}
    nll_cache: dict[tuple[int, tuple[int, ...]], tuple[float, float]] = {}
    t_nll = time.perf_counter()
    for name in methods:
        outs, stats, dt = generated[name]
        m_rows = []
        for i, (o, ref) in enumerate(zip(outs, reference)):
            key = (i, tuple(o.tokens))
            if key not in nll_cache:  # identical outputs (e.g. lossless methods) score once
                nll_cache[key] = teacher_forced(llm, prompt_ids[i], o.tokens)
            nll, agree = nll_cache[key]
            m_rows.append({
                "method": name,
                "prompt_index": i,
                "rouge_l": rouge_l(o.text, ref.text),
                "nll": nll,
                "argmax_agree": agree,
                "tokens": len(o.tokens),
                "finish_reason": o.finish_reason,
                "exact_match": o.tokens == ref.tokens,
            })
        rows.extend(m_rows)
        total_tokens = sum(r["tokens"] for r in m_rows)
        nll = sum(r["nll"] * r["tokens"] for r in m_rows) / total_tokens
        gen = sum(s.generated_tokens for s in stats)
        secs = sum(s.seconds for s in stats)
        layers = sum(s.layers_computed for s in stats)
        summary[name] = {
            "method": repr(methods[name]),
            "rouge_l": sum(r["rouge_l"] for r in m_rows) / len(m_rows),
            "nll": nll,
            "ppl": math.exp(nll),
            "argmax_agree": sum(r["argmax_agree"] * r["tokens"] for r in m_rows) / total_tokens,
            "clean_stop": sum(r["finish_reason"] == "eos" for r in m_rows) / len(m_rows),
            "exact_match": sum(r["exact_match"] for r in m_rows) / len(m_rows),
            "mean_tokens": total_tokens / len(m_rows),
            "mean_layers": layers / gen if gen else 0.0,
            "tokens_per_second": gen / secs if secs else 0.0,
            "generate_seconds": dt,
        }
        samples[name] = [
            {"prompt_index": i, "finish_reason": o.finish_reason, "text": o.text[:SAMPLE_CHARS]}
            for i, o in enumerate(outs[:SAMPLES_PER_METHOD])
        ]
    log(f"  scored {len(nll_cache)} distinct outputs with the full model in "
        f"{time.perf_counter() - t_nll:.1f} s")
    ref_samples = [
        {"prompt_index": i, "finish_reason": o.finish_reason, "text": o.text[:SAMPLE_CHARS]}
        for i, o in enumerate(reference[:SAMPLES_PER_METHOD])
    ]
    return {
        "summary": summary,
        "rows": rows,
        "samples": samples,
        "reference": {"name": ref_name or "given", "samples": ref_samples},
    }


def format_table(summary: dict) -> str:
    head = (f"{'method':<14}{'ROUGE-L':>9}{'NLL':>8}{'PPL':>8}{'argmax':>8}{'clean':>7}"
            f"{'exact':>7}{'tokens':>8}{'layers':>8}{'tok/s':>8}")
    lines = [head, "-" * len(head)]
    for name, s in summary.items():
        lines.append(
            f"{name:<14}{s['rouge_l']:>9.3f}{s['nll']:>8.3f}{s['ppl']:>8.2f}"
            f"{s['argmax_agree']:>8.3f}{s['clean_stop']:>7.2f}{s['exact_match']:>7.2f}"
            f"{s['mean_tokens']:>8.1f}{s['mean_layers']:>8.2f}{s['tokens_per_second']:>8.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", required=True, help="MT-Bench question.jsonl")
    ap.add_argument("--n-prompts", type=int, default=16)
    ap.add_argument("--methods", default="ar,skip1.5,skip2,skip3")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--model", default=None, help="model path (default: the embedded model)")
    ap.add_argument("--name", default=None, help="results file suffix (default: the host name)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)

    import treadle

    t_start = time.perf_counter()
    methods = {name: parse_method(name) for name in args.methods.split(",") if name}
    items = mt_bench_prompts(args.prompts, args.n_prompts)
    llm = treadle.load(args.model)
    info = machine()
    command = " ".join([Path(sys.executable).name, *sys.argv])
    print(f"command: {command}")
    print(f"{len(items)} prompts, methods {list(methods)}, max_new_tokens {args.max_new_tokens}, "
          f"batch {args.batch_size}")
    res = evaluate(llm, [it["prompt"] for it in items], methods, args.max_new_tokens,
                   args.batch_size)
    for r in res["rows"]:
        r["category"] = items[r["prompt_index"]]["category"]
        r["question_id"] = items[r["prompt_index"]]["id"]
    print(format_table(res["summary"]))
    print("formulas:")
    for k, v in FORMULAS.items():
        print(f"  {k}: {v}")
    total = time.perf_counter() - t_start
    print(f"total {total:.1f} s")
    result = {
        "benchmark": "eval_quality",
        "command": command,
        "machine": info,
        "model": str(llm.model_dir),
        "prompts_file": str(args.prompts),
        "n_prompts": len(items),
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "decoding": "greedy, normal EOS stopping",
        "formulas": FORMULAS,
        "total_seconds": total,
        **res,
    }
    name = args.name or platform.node() or "host"
    out = args.out or RESULTS / f"eval_quality-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
