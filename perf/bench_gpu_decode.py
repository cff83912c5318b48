"""End-to-end GPU decode, random weights at real shapes: treadle vs the HBM limit and transformers.

    python perf/bench_gpu_decode.py [--models 1b,7b] [--batches 1,8] [--steps 64] [--context 512]

For each model shape (random bf16 weights; speed does not depend on the values) and batch size:
    treadle tokens/s    = batch * decode steps / seconds, static plans replayed as CUDA graphs
                          (Triton kernels; weight GEMMs on cuBLAS), after a prefill of --context
    HBM limit tokens/s  = batch * device bandwidth / weight bytes read per step
                          (bandwidth measured here: a 1 GiB device-to-device copy, read + write)
    transformers        = the same weights in LlamaForCausalLM, eager, its own KV cache, greedy
                          `generate` of --steps tokens with min_new_tokens (prefill excluded by
                          timing generate(steps) - generate(1))
and the tree-verify cost: one verify step over a tree of N nodes (1, 8, 16, 32, 64) at batch 1,
as a multiple of one decode step. Results: perf/results/bench_gpu_decode-<gpu>.json.
Needs CUDA; prints why and exits 0 without it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"

SHAPES = {
    # Llama-3.2-1B-like and Llama-2-7B-like.
    "1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
               num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192,
               tie_word_embeddings=True),
    "7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008,
               num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
               rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=4096,
               tie_word_embeddings=False),
}


def device_bandwidth_gbs() -> float:
    x = torch.empty(2**29, dtype=torch.float16, device="cuda")  # 1 GiB
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(10):
        t = time.perf_counter()
        y.copy_(x)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return 2 * x.nbytes / best / 1e9


def random_state(raw: dict, dtype=torch.bfloat16) -> tuple:
    from treadle.graph.config import ModelConfig
    from treadle.graph.weights import expected_shapes

    cfg = ModelConfig.from_dict(raw)
    g = torch.Generator(device="cuda").manual_seed(0)
    state = {}
    for name, shape in expected_shapes(cfg).items():
        t = torch.randn(shape, generator=g, device="cuda", dtype=torch.float32) * 0.02
        if name.endswith("norm.weight"):
            t += 1
        state[name] = t.to(dtype)
    return cfg, state


def time_steps(fn, n: int) -> float:
    fn()  # capture / warm up
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n


def bench_treadle(cfg, state, batch: int, context: int, steps: int, tree_sizes) -> dict:
    from treadle.graph.backend import Backend
    from treadle.graph.model import Transformer
    from treadle.graph.step import tree_from_parents
    from treadle.graph.weights import ModelWeights
    from treadle.runtime.executor import Executor
    from treadle.runtime.kv_cache import KVCache

    weights = ModelWeights.from_state_dict(dict(state), cfg)
    model = Transformer(cfg, weights, context + steps + 128, backend=Backend.TRITON)
    capacity = context + steps + 80
    cache = KVCache(cfg, rows=batch + 1, capacity=capacity, dtype=torch.bfloat16, device="cuda")
    ex = Executor(model, cache)
    rows = [cache.allocate() for _ in range(batch)]
    prompt = torch.randint(0, cfg.vocab_size, (batch, context)).tolist()
    with torch.inference_mode():
        model.forward(cache.make_step(rows, prompt), cache)
        cache.extend(rows, [context] * batch)
        tokens = [1] * batch

        def decode():  # the K/V of the step are kept, as in real decoding
            ex.decode(rows, tokens)
            cache.extend(rows, [1] * batch)

        step_s = time_steps(decode, steps)
        out = {"decode_step_ms": step_s * 1e3, "tokens_per_s": batch / step_s}
        if batch == 1:
            verify = {}
            for n in tree_sizes:
                # A binary-ish tree: node i's parent is (i - 1) // 2 (node 0 the root).
                tree = tree_from_parents([-1] + [(i - 1) // 2 for i in range(1, n)])[None]
                toks = torch.randint(0, cfg.vocab_size, (1, n))
                verify[n] = time_steps(lambda: ex.verify(rows, toks, tree, [n]), 20) / step_s
            out["verify_cost_vs_decode"] = verify
    ex.close()
    return out


def bench_transformers(cfg, state, batch: int, context: int, steps: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(**{k: v for k, v in cfg.to_dict().items() if k != "architectures"})
    with torch.device("cuda"):  # build on the GPU: a 7B model in fp32 is 27 GB of host memory
        model = LlamaForCausalLM(hf_cfg).to(torch.bfloat16).eval()
    model.load_state_dict(state, strict=False)
    ids = torch.randint(0, cfg.vocab_size, (batch, context), device="cuda")

    def gen(n):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                       min_new_tokens=n, do_sample=False, pad_token_id=0)

    with torch.inference_mode():
        gen(2)
        torch.cuda.synchronize()
        t = time.perf_counter()
        gen(1)
        torch.cuda.synchronize()
        one = time.perf_counter() - t
        t = time.perf_counter()
        gen(steps + 1)
        torch.cuda.synchronize()
        total = time.perf_counter() - t
    step_s = (total - one) / steps
    torch.cuda.empty_cache()
    return {"decode_step_ms": step_s * 1e3, "tokens_per_s": batch / step_s}


def weight_bytes(cfg, state) -> int:
    # The embedding table is read one row per token; everything else is read whole each step.
    total = sum(t.numel() * t.element_size() for n, t in state.items() if "embed_tokens" not in n)
    if cfg.tie_word_embeddings:
        emb = state["model.embed_tokens.weight"]
        total += emb.numel() * emb.element_size()  # the tied LM head reads the whole table
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default="1b,7b")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--tree-sizes", default="1,8,16,32,64")
    ap.add_argument("--skip-transformers", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu_decode needs a CUDA GPU; none here, nothing measured.")
        return 0
    bw = device_bandwidth_gbs()
    result = {
        "benchmark": "GPU decode, random bf16 weights at real shapes",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "device_copy_bandwidth_gbs": round(bw, 1),
        "formula": "tokens/s = batch * steps / seconds; limit = batch * bandwidth / weight bytes",
        "runs": [],
    }
    tree_sizes = [int(n) for n in args.tree_sizes.split(",")]
    for name in args.models.split(","):
        cfg, state = random_state(SHAPES[name])
        wb = weight_bytes(cfg, state)
        for batch in (int(b) for b in args.batches.split(",")):
            ours = bench_treadle(cfg, state, batch, args.context, args.steps, tree_sizes)
            row = {"model": name, "batch": batch, "weight_gb": round(wb / 1e9, 3),
                   "limit_tokens_per_s": round(batch * bw * 1e9 / wb, 1), "treadle": ours}
            row["fraction_of_limit"] = round(ours["tokens_per_s"] / row["limit_tokens_per_s"], 3)
            if not args.skip_transformers:
                theirs = bench_transformers(cfg, state, batch, args.context, args.steps)
                row["transformers"] = theirs
                row["speedup_vs_transformers"] = round(
                    ours["tokens_per_s"] / theirs["tokens_per_s"], 2)
            result["runs"].append(row)
            print(json.dumps(row))
        del state
        torch.cuda.empty_cache()
    RESULTS.mkdir(exist_ok=True)
    gpu = torch.cuda.get_device_name().replace(" ", "_")
    out = RESULTS / f"bench_gpu_decode-{gpu}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
