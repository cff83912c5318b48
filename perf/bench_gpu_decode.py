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
as a multiple of one decode step. Nothing is downloaded: the shapes are below, the weights random.
Results, named with the GPU: perf/results/bench_gpu_decode-<gpu>.json (rewritten after every run,
so a run cut short keeps what it measured), .csv (one row per measurement) and .png (matplotlib,
if installed). Needs CUDA; prints why and exits 0 without it. Exits 1 if a treadle run failed
(a transformers failure is recorded in the results, not fatal: it is only the baseline).
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
import time
import traceback
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
    # A smoke test of this script (any device; on the CPU under TRITON_INTERPRET=1).
    "tiny": dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=96,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=512,
                 tie_word_embeddings=True),
}


def device_label(name: str) -> str:
    """A GPU name as a file-name part: 'NVIDIA H200' -> 'NVIDIA_H200'."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", name).strip("_")


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


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


def random_state(raw: dict, device: str = "cuda", dtype=torch.bfloat16) -> tuple:
    from treadle.graph.config import ModelConfig
    from treadle.graph.weights import expected_shapes

    cfg = ModelConfig.from_dict(raw, source="perf/bench_gpu_decode.py SHAPES")
    g = torch.Generator(device=device).manual_seed(0)
    state = {}
    for name, shape in expected_shapes(cfg).items():
        t = torch.randn(shape, generator=g, device=device, dtype=torch.float32) * 0.02
        if name.endswith("norm.weight"):
            t += 1
        state[name] = t.to(dtype)
    return cfg, state


def time_steps(fn, n: int, device: str) -> float:
    """Seconds per call: one call first (capture / compile / warm-up), then n timed back to back,
    synchronized before and after (the calls queue on the GPU like real decoding)."""
    fn()
    sync(device)
    t = time.perf_counter()
    for _ in range(n):
        fn()
    sync(device)
    return (time.perf_counter() - t) / n


def bench_treadle(cfg, state, batch: int, context: int, steps: int, tree_sizes,
                  device: str = "cuda") -> dict:
    from treadle.graph.backend import Backend
    from treadle.graph.model import Transformer
    from treadle.graph.step import tree_from_parents
    from treadle.graph.weights import ModelWeights
    from treadle.runtime.executor import Executor
    from treadle.runtime.kv_cache import KVCache

    weights = ModelWeights.from_state_dict(dict(state), cfg)
    model = Transformer(cfg, weights, context + steps + 128, backend=Backend.TRITON)
    # Room for the prefill, the warm-up and timed decode steps, and the widest verify tree.
    capacity = context + steps + 1 + max(tree_sizes, default=1) + 16
    cache = KVCache(cfg, rows=batch + 1, capacity=capacity, dtype=state["model.norm.weight"].dtype,
                    device=device)
    # Static plans; CUDA graphs where there is CUDA (the default).
    ex = Executor(model, cache, static=True)
    rows = [cache.allocate() for _ in range(batch)]
    prompt = torch.randint(0, cfg.vocab_size, (batch, context)).tolist()
    with torch.inference_mode():
        model.forward(cache.make_step(rows, prompt), cache)
        cache.extend(rows, [context] * batch)
        tokens = [1] * batch

        def decode():  # the K/V of the step are kept, as in real decoding
            ex.decode(rows, tokens)
            cache.extend(rows, [1] * batch)

        step_s = time_steps(decode, steps, device)
        out = {"decode_step_ms": step_s * 1e3, "tokens_per_s": batch / step_s}
        if batch == 1:
            verify = {}
            for n in tree_sizes:
                # A binary-ish tree: node i's parent is (i - 1) // 2 (node 0 the root).
                tree = tree_from_parents([-1] + [(i - 1) // 2 for i in range(1, n)])[None]
                toks = torch.randint(0, cfg.vocab_size, (1, n))
                verify_s = time_steps(lambda: ex.verify(rows, toks, tree, [n]), 20, device)
                verify[n] = verify_s / step_s
            out["verify_cost_vs_decode"] = verify
    ex.close()
    return out


def bench_transformers(cfg, state, batch: int, context: int, steps: int,
                       device: str = "cuda") -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    hf_cfg = LlamaConfig(**{k: v for k, v in cfg.to_dict().items() if k != "architectures"})
    dtype = state["model.norm.weight"].dtype
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build in bf16 on the device: a 7B model in fp32 is 27 GB
    try:
        with torch.device(device):
            model = LlamaForCausalLM(hf_cfg).eval()
    finally:
        torch.set_default_dtype(default)
    model.load_state_dict(state, strict=False)
    ids = torch.randint(0, cfg.vocab_size, (batch, context), device=device)

    def gen(n):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                       min_new_tokens=n, do_sample=False, pad_token_id=0)

    with torch.inference_mode():
        gen(2)
        sync(device)
        t = time.perf_counter()
        gen(1)
        sync(device)
        one = time.perf_counter() - t
        t = time.perf_counter()
        gen(steps + 1)
        sync(device)
        total = time.perf_counter() - t
    step_s = (total - one) / steps
    return {"decode_step_ms": step_s * 1e3, "tokens_per_s": batch / step_s}


def weight_bytes(cfg, state) -> int:
    # The embedding table is read one row per token; everything else is read whole each step.
    total = sum(t.numel() * t.element_size() for n, t in state.items() if "embed_tokens" not in n)
    if cfg.tie_word_embeddings:
        emb = state["model.embed_tokens.weight"]
        total += emb.numel() * emb.element_size()  # the tied LM head reads the whole table
    return total


def csv_rows(result: dict) -> list[dict]:
    """One flat row per measurement: decode tokens/s per (model, batch, impl), verify cost per
    tree size."""
    rows = []
    for run in result["runs"]:
        base = {"gpu": result["gpu"], "model": run["model"], "batch": run["batch"],
                "weight_gb": run["weight_gb"]}
        rows.append({**base, "metric": "tokens_per_s", "impl": "hbm_limit",
                     "value": run["limit_tokens_per_s"]})
        for impl in ("treadle", "transformers"):
            got = run.get(impl, {})
            if "tokens_per_s" in got:
                rows.append({**base, "metric": "tokens_per_s", "impl": impl,
                             "value": round(got["tokens_per_s"], 2)})
        for n, cost in run.get("treadle", {}).get("verify_cost_vs_decode", {}).items():
            rows.append({**base, "metric": f"verify_cost_vs_decode_n{n}", "impl": "treadle",
                         "value": round(cost, 3)})
    return rows


def plot(result: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e .[perf]): no plot")
        return False
    runs = result["runs"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    labels = [f"{r['model']} b{r['batch']}" for r in runs]
    x = range(len(runs))
    series = [("HBM limit", [r["limit_tokens_per_s"] for r in runs]),
              ("treadle", [r.get("treadle", {}).get("tokens_per_s", 0) for r in runs]),
              ("transformers", [r.get("transformers", {}).get("tokens_per_s", 0) for r in runs])]
    for i, (name, ys) in enumerate(series):
        ax1.bar([xi + (i - 1) * 0.27 for xi in x], ys, width=0.27, label=name)
    ax1.set_xticks(list(x), labels)
    ax1.set_ylabel("decode tokens/s")
    ax1.set_yscale("log")
    ax1.legend()
    for r in runs:
        cost = r.get("treadle", {}).get("verify_cost_vs_decode")
        if cost:
            sizes = sorted(int(n) for n in cost)
            ax2.plot(sizes, [cost[n] if n in cost else cost[str(n)] for n in sizes], marker="o",
                     label=r["model"])
    ax2.set_xlabel("tree nodes verified in one step (batch 1)")
    ax2.set_ylabel("verify step / decode step")
    ax2.axhline(1.0, color="gray", lw=0.5)
    ax2.legend()
    fig.suptitle(f"treadle GPU decode, random bf16 weights ({result['gpu']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


def save(result: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"bench_gpu_decode-{device_label(result['gpu'])}"
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    rows = csv_rows(result)
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["gpu", "model", "batch", "weight_gb", "metric", "impl",
                                          "value"])
        w.writeheader()
        w.writerows(rows)
    return stem


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--models", default="1b,7b", help=f"of {', '.join(SHAPES)}")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--steps", type=int, default=64)
    ap.add_argument("--context", type=int, default=512)
    ap.add_argument("--tree-sizes", default="1,8,16,32,64")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--out-dir", type=Path, default=RESULTS)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_gpu_decode needs a CUDA GPU; none here, nothing measured.")
        return 0
    unknown = [m for m in args.models.split(",") if m not in SHAPES]
    if unknown:
        ap.error(f"--models: unknown {unknown}; known: {', '.join(SHAPES)}")
    bw = device_bandwidth_gbs()
    result = {
        "benchmark": "GPU decode, random bf16 weights at real shapes",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "device_copy_bandwidth_gbs": round(bw, 1),
        "formula": "tokens/s = batch * steps / seconds; limit = batch * bandwidth / weight bytes; "
                   "verify cost = verify step seconds / decode step seconds",
        "context": args.context, "steps": args.steps,
        "runs": [],
    }
    tree_sizes = [int(n) for n in args.tree_sizes.split(",")]
    failed = False
    for name in args.models.split(","):
        cfg, state = random_state(SHAPES[name])
        wb = weight_bytes(cfg, state)
        for batch in (int(b) for b in args.batches.split(",")):
            row = {"model": name, "batch": batch, "weight_gb": round(wb / 1e9, 3),
                   "limit_tokens_per_s": round(batch * bw * 1e9 / wb, 1)}
            try:
                ours = bench_treadle(cfg, state, batch, args.context, args.steps, tree_sizes)
                row["treadle"] = ours
                row["fraction_of_limit"] = round(
                    ours["tokens_per_s"] / row["limit_tokens_per_s"], 3)
            except Exception:  # keep the other runs' numbers; the exit code says it failed
                failed = True
                row["treadle_error"] = traceback.format_exc(limit=-8)
                print(row["treadle_error"], file=sys.stderr)
            torch.cuda.empty_cache()
            if not args.skip_transformers:
                try:
                    theirs = bench_transformers(cfg, state, batch, args.context, args.steps)
                    row["transformers"] = theirs
                    if "treadle" in row:
                        row["speedup_vs_transformers"] = round(
                            row["treadle"]["tokens_per_s"] / theirs["tokens_per_s"], 2)
                except Exception:
                    row["transformers_error"] = traceback.format_exc(limit=-8)
                    print(row["transformers_error"], file=sys.stderr)
                torch.cuda.empty_cache()
            result["runs"].append(row)
            print(json.dumps(row), flush=True)
            stem = save(result, args.out_dir)
        del state
        torch.cuda.empty_cache()
    stem = save(result, args.out_dir)
    plotted = plot(result, stem.with_suffix(".png"))
    print(f"saved {stem}.json, .csv{', .png' if plotted else ''}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
