"""The engine's bars on the default model: prefix-cache reuse across calls, continuous batching,
and self-speculation against AR, each measured in one run.

    python perf/bench_engine.py --prompts ../shared/data/mt_bench/question.jsonl

1. Prefix cache: two calls with the same ~300-token system prompt and different questions,
   max_new_tokens=1, so each call is its prefill (+ one token). Ratio = first call's prefill
   seconds / second call's (a fresh LLM for the first; the second finds the system prompt's K/V),
   and the same for the whole calls.
   Control: the second call on an LLM with prefix_cache=False.
2. Continuous batching: 16 MT-Bench first turns with mixed lengths (max_new_tokens cycling
   through 16..128, EOS ignored) as one batch, against one at a time. Ratio = sequential seconds /
   batched seconds; outputs must be identical.
3. Self-speculation (adaptive, k=4) against AR on 8 prompts x 64 tokens: tokens/s ratio, greedy
   outputs identical.
Writes perf/results/bench_engine-<host>.json with the machine and the command.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_decode import machine, mt_bench_prompts  # noqa: E402

import treadle  # noqa: E402
from treadle.runtime.methods import AR, SelfSpec  # noqa: E402

SYSTEM = (
    "You are a careful, friendly assistant working for a public library's help desk. Answer "
    "questions from visitors of every age. Follow these rules in every answer. Be accurate: if "
    "you are not sure of a fact, say so plainly and suggest where the visitor could check it, "
    "such as the reference desk, an encyclopedia, or an official government website. Be brief: "
    "most answers should fit in a short paragraph, and lists should have at most five items. "
    "Be kind: never mock a question, and explain any technical word the first time you use it. "
    "Be safe: do not give medical, legal or financial advice beyond general information, and "
    "point the visitor to a qualified professional instead. Respect privacy: never ask for a "
    "visitor's address, phone number, card number or password, and remind them not to share "
    "such details. When a visitor asks for a book recommendation, ask one question about what "
    "they enjoyed reading before, then suggest two or three titles with one sentence each about "
    "why they might like them. When a visitor asks how to use the library, explain opening "
    "hours, how to borrow and return items, how to renew a loan online, and how to reserve a "
    "study room. When a visitor asks for help with homework, guide them to the answer with "
    "questions and hints rather than giving the whole solution at once. If a question is about "
    "an event at the library, say that the events calendar on the front page of the website is "
    "always the most current source. Always end with a short offer to help with anything else."
)


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def prefix_reuse(questions: list[str]) -> dict:
    p = treadle.SamplingParams(max_new_tokens=1)
    cold = treadle.load()
    n_system = len(cold.encode(questions[0], chat=True, system=SYSTEM))
    cold.generate(questions[2], p, chat=True)  # warm the code paths, not the system prompt
    first, t_first = timed(lambda: cold.generate(questions[0], p, chat=True, system=SYSTEM))
    second, t_second = timed(lambda: cold.generate(questions[1], p, chat=True, system=SYSTEM))
    off = treadle.load(prefix_cache=False)
    off.generate(questions[0], p, chat=True, system=SYSTEM)
    _, t_off = timed(lambda: off.generate(questions[1], p, chat=True, system=SYSTEM))
    return {
        "prompt_tokens": n_system,
        "first_prefill_s": first.stats.prefill_seconds,
        "second_prefill_s": second.stats.prefill_seconds,
        "prefill_speedup": first.stats.prefill_seconds / second.stats.prefill_seconds,
        "first_call_s": t_first,
        "second_call_s": t_second,
        "second_call_without_prefix_cache_s": t_off,
        "reused_tokens": second.stats.reused_tokens,
        "prefilled_tokens": second.stats.prefill_tokens,
        "call_speedup": t_first / t_second,
        "formula": "prefill_speedup = first call's prefill seconds / second call's (the engine's "
                   "catch-up step: prefix lookup, row fork, forward over the rest); call_speedup "
                   "= whole generate() calls with max_new_tokens=1",
    }


def continuous_batching(questions: list[str]) -> dict:
    llm = treadle.load(prefix_cache=False)  # batching alone, not prefix reuse
    lengths = [16 + (112 * i) // 15 for i in range(16)]
    lengths = lengths[::2] + lengths[1::2]  # mixed, not sorted
    params = [treadle.SamplingParams(max_new_tokens=n, ignore_eos=True) for n in lengths]
    llm.generate(questions[0], params[0], chat=True)  # warm-up
    alone, t_alone = timed(lambda: [llm.generate(q, p, chat=True)
                                    for q, p in zip(questions, params)])
    t0 = time.perf_counter()
    streams = [llm.submit(q, p, chat=True) for q, p in zip(questions, params)]
    for _ in llm.engine.run(streams):
        pass
    t_batch = time.perf_counter() - t0
    same = all(s.request.tokens == a.tokens for s, a in zip(streams, alone))
    tokens = sum(lengths)
    return {
        "requests": len(questions),
        "max_new_tokens": lengths,
        "sequential_s": t_alone,
        "batched_s": t_batch,
        "sequential_tok_s": tokens / t_alone,
        "batched_tok_s": tokens / t_batch,
        "speedup": t_alone / t_batch,
        "identical_outputs": same,
        "formula": "sequential seconds / batched seconds, same 16 requests",
    }


def selfspec_vs_ar(questions: list[str]) -> dict:
    llm = treadle.load(prefix_cache=False)
    p = treadle.SamplingParams(max_new_tokens=64, ignore_eos=True)
    llm.generate(questions[0], p, chat=True)
    ar, t_ar = timed(lambda: [llm.generate(q, p, chat=True, method=AR()) for q in questions])
    method = SelfSpec(k=4)
    ss, t_ss = timed(lambda: [llm.generate(q, p, chat=True, method=method) for q in questions])
    stats = ss[-1].stats
    return {
        "prompts": len(questions),
        "ar_tok_s": 64 * len(questions) / t_ar,
        "selfspec_tok_s": 64 * len(questions) / t_ss,
        "speedup": t_ar / t_ss,
        "identical_outputs": all(a.tokens == s.tokens for a, s in zip(ar, ss)),
        "last_prompt_stats": stats.summary(),
        "formula": "AR seconds / self-speculation seconds, same prompts, greedy",
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=Path, required=True, help="MT-Bench question.jsonl")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--only", default="prefix,batching,selfspec")
    args = ap.parse_args()
    questions = mt_bench_prompts(args.prompts, 16)
    result = {"machine": machine(), "command": " ".join(["python"] + sys.argv)}
    only = args.only.split(",")
    if "prefix" in only:
        result["prefix_cache"] = prefix_reuse(questions)
        print("prefix cache:", json.dumps(result["prefix_cache"], indent=1))
    if "batching" in only:
        result["continuous_batching"] = continuous_batching(questions)
        print("continuous batching:", json.dumps(result["continuous_batching"], indent=1))
    if "selfspec" in only:
        result["selfspec"] = selfspec_vs_ar(questions[:8])
        print("self-speculation:", json.dumps(result["selfspec"], indent=1))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"bench_engine-{machine_tag()}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    print(f"wrote {path}")
    return 0


def machine_tag() -> str:
    m = machine()
    return "vm-amx" if "amx_bf16" in m["cpu_features"] else "vm"


if __name__ == "__main__":
    sys.exit(main())
