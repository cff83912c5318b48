"""AR greedy decode speed: treadle vs Hugging Face `transformers` generate, same weights, same run.

    python perf/bench_decode.py --prompts ../shared/data/mt_bench/question.jsonl [--n-prompts 10]

For each of the first N MT-Bench questions (first turn, chat template applied), both runtimes
generate exactly --max-new-tokens tokens greedily (EOS ignored) from the same converted weights in
fp32 at batch 1. Reported per runtime:
    tokens/s = generated tokens / wall seconds of the whole call (prefill included), all prompts
    decode tokens/s (treadle) = (tokens - 1) / seconds after the first token
    bandwidth limit = copy bandwidth / weight bytes read per token
        weight bytes per token = every weight matrix + norms + the LM head (the embedding row read
        is negligible); copy bandwidth is measured here with a 512 MiB numpy copy, counting the
        bytes read plus the bytes written (the STREAM convention). The read bandwidth of a
        multi-threaded BLAS matrix-vector product over a 512 MiB matrix is reported beside it:
        decode only reads its weights, so that is the tighter limit.
Results go to perf/results/bench_decode-<host>.json with the machine and the command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu, flags = "unknown", []
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
    except OSError:
        pass
    # The vector extensions that decide which product paths are fast here (the "AMD EPYC" of the
    # development VMs has been both a Zen 3 without AVX-512 and a Zen 4 with AVX-512 BF16).
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16")
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cpu_features": [f for f in wanted if f in flags],
        "cores": os.cpu_count(),
        "memory_gib": round(mem, 1),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def bandwidth_gbs() -> tuple[float, float]:
    """(copy GB/s counting read + write, matrix-vector read GB/s), best of 5 over 512 MiB."""
    src = np.ones(2**27, dtype=np.float32)
    dst = np.empty_like(src)
    matrix = src.reshape(-1, 1024)  # [131072, 1024]
    vec = np.ones(1024, dtype=np.float32)
    copy = read = 0.0
    for _ in range(5):
        t = time.perf_counter()
        np.copyto(dst, src)
        copy = max(copy, 2 * src.nbytes / (time.perf_counter() - t) / 1e9)
        t = time.perf_counter()
        matrix @ vec
        read = max(read, src.nbytes / (time.perf_counter() - t) / 1e9)
    return copy, read


def mt_bench_prompts(path: Path, n: int) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    # Round-robin over the categories so a small N still covers all of them.
    by_cat: dict[str, list[str]] = {}
    for r in rows:
        by_cat.setdefault(r["category"], []).append(r["turns"][0])
    ordered = [q for group in zip(*by_cat.values()) for q in group]
    return ordered[:n]


def weight_bytes(llm) -> int:
    w = llm.model.weights
    total = w.norm.numel() + w.lm_head.weight.numel()
    for lw in w.layers:
        total += lw.attn_norm.numel() + lw.mlp_norm.numel()
        total += sum(lin.weight.numel() for lin in (lw.qkv, lw.o, lw.gate_up, lw.down))
    return total * w.embed.element_size()


def run_treadle(llm, prompt_ids: list[list[int]], n_new: int):
    from treadle.runtime.methods import run_requests
    from treadle.runtime.request import Request
    from treadle.runtime.sampling import SamplingParams

    torch.set_num_threads(1)
    params = SamplingParams(max_new_tokens=n_new, ignore_eos=True)
    rows = []
    with torch.inference_mode():
        for ids in prompt_ids:
            req = Request(ids, params, llm.eos_ids)
            t0 = time.perf_counter()
            first = None
            for _ in run_requests(llm.worker, [req]):
                if first is None:
                    first = time.perf_counter()
            t1 = time.perf_counter()
            rows.append({"tokens": req.tokens, "seconds": t1 - t0, "decode_seconds": t1 - first})
    return rows


def run_transformers(model_dir: Path, prompt_ids: list[list[int]], n_new: int, threads: int):
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    rows = []
    with torch.inference_mode():
        for ids in prompt_ids:
            x = torch.tensor([ids])
            t0 = time.perf_counter()
            out = model.generate(
                x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=n_new,
                min_new_tokens=n_new,
                do_sample=False,
                pad_token_id=0,
            )
            rows.append(
                {"tokens": out[0, len(ids) :].tolist(), "seconds": time.perf_counter() - t0}
            )
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--prompts", type=Path, required=True, help="MT-Bench question.jsonl")
    ap.add_argument("--n-prompts", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--model", help="model directory (default: the embedded default model)")
    ap.add_argument(
        "--hf-threads",
        type=int,
        default=os.cpu_count(),
        help="torch threads for transformers (its best setting here)",
    )
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--out", type=Path, help="results file (default perf/results/...)")
    args = ap.parse_args()

    import treadle

    llm = treadle.load(args.model)
    model_dir = llm.model_dir
    questions = mt_bench_prompts(args.prompts, args.n_prompts)
    prompt_ids = [llm.encode(q, chat=True) for q in questions]
    copy_gbs, read_gbs = bandwidth_gbs()
    wbytes = weight_bytes(llm)

    # Warm both up on a short prompt so one-time costs do not land on the first measured prompt.
    run_treadle(llm, prompt_ids[:1], 8)
    ours = run_treadle(llm, prompt_ids, args.max_new_tokens)
    theirs = None
    if not args.skip_transformers:
        run_transformers(model_dir, prompt_ids[:1], 8, args.hf_threads)
        theirs = run_transformers(model_dir, prompt_ids, args.max_new_tokens, args.hf_threads)

    n_tok = sum(len(r["tokens"]) for r in ours)
    ours_tps = n_tok / sum(r["seconds"] for r in ours)
    decode_tps = sum(len(r["tokens"]) - 1 for r in ours) / sum(r["decode_seconds"] for r in ours)
    limit_copy = copy_gbs * 1e9 / wbytes
    limit_read = read_gbs * 1e9 / wbytes
    result = {
        "benchmark": "AR greedy decode, batch 1, fp32",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "model": str(model_dir),
        "prompts": f"{args.prompts} (first turns, first {len(questions)} round-robin by category)",
        "max_new_tokens": args.max_new_tokens,
        "weight_bytes_per_token": wbytes,
        "copy_bandwidth_gbs": round(copy_gbs, 2),
        "read_bandwidth_gbs": round(read_gbs, 2),
        "limit_tokens_per_s_copy": round(limit_copy, 1),
        "limit_tokens_per_s_read": round(limit_read, 1),
        "formula": "tokens/s = generated tokens / wall seconds (prefill included); "
        "limit = bandwidth / weight bytes per token",
        "treadle": {
            "tokens_per_s": round(ours_tps, 2),
            "decode_tokens_per_s": round(decode_tps, 2),
            "fraction_of_copy_limit": round(ours_tps / limit_copy, 3),
            "fraction_of_read_limit": round(ours_tps / limit_read, 3),
            "per_prompt_seconds": [round(r["seconds"], 3) for r in ours],
        },
    }
    lines = [
        f"weights {wbytes / 1e9:.3f} GB/token; copy {copy_gbs:.1f} GB/s -> limit "
        f"{limit_copy:.1f} tok/s; read {read_gbs:.1f} GB/s -> limit {limit_read:.1f} tok/s",
        f"treadle       {ours_tps:6.1f} tok/s  (decode only {decode_tps:.1f}; "
        f"{ours_tps / limit_copy:.0%} of the copy limit)",
    ]
    if theirs is not None:
        hf_tps = sum(len(r["tokens"]) for r in theirs) / sum(r["seconds"] for r in theirs)
        same = sum(a["tokens"] == b["tokens"] for a, b in zip(ours, theirs))
        agree = [
            next(
                (i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y),
                len(a["tokens"]),
            )
            for a, b in zip(ours, theirs)
        ]
        result["transformers"] = {
            "tokens_per_s": round(hf_tps, 2),
            "threads": args.hf_threads,
            "per_prompt_seconds": [round(r["seconds"], 3) for r in theirs],
        }
        result["speedup_vs_transformers"] = round(ours_tps / hf_tps, 3)
        result["identical_outputs"] = f"{same}/{len(ours)}"
        result["agreeing_prefix_tokens"] = agree
        lines.append(f"transformers  {hf_tps:6.1f} tok/s  ({args.hf_threads} threads)")
        lines.append(
            f"speedup {ours_tps / hf_tps:.2f}x; identical greedy outputs {same}/{len(ours)}"
        )
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    out = args.out or RESULTS / f"bench_decode-{platform.node() or 'host'}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
