"""The draft's training step through the graph forward (graph/training.py), optionally against the
`Stack` forward it replaced (read from git history), on the default model's shapes.

    python perf/bench_train_step.py [--layers 0,1,2,3] [--batch 2] [--seq 256] [--steps 5]
        [--threads 2] [--compare-stack 974f35d]

One step = forward over B x T tokens (the kept layers, the final norm, the tied LM head over every
position), cross-entropy on the next tokens, backward, grad-norm clip, AdamW step: what
train/draft.py's `train_student` does per batch (its default batch is 512 tokens). Both forwards
start from the same weights and see the same tokens; each runs one untimed warm-up step, then the
two alternate for --steps timed steps each (so load on a shared machine hits both alike).
    ms/step    = the median wall time of a timed step (min_ms: the fastest, the least disturbed by
                 other processes on a shared machine)
    tokens/s   = B * T / (ms/step / 1000)
    ratio      = ms/step(graph) / ms/step(Stack)  (< 1: the graph forward is faster)
--compare-stack REV loads `Stack` from loaders/draft_model.py at git revision REV (it was deleted
after 974f35d). Results: perf/results/bench_train_step-<host>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def old_stack_module(rev: str):
    """loaders/draft_model.py at `rev`, imported as a module of treadle.loaders (its relative
    imports resolve against the current package)."""
    src = subprocess.run(
        ["git", "show", f"{rev}:loaders/draft_model.py"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    path = Path(tempfile.mkdtemp()) / "draft_model_old.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("treadle.loaders._draft_model_old", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", default="0,1,2,3")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--compare-stack", default=None, metavar="REV")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from treadle.graph.training import trainable_parameters
    from treadle.loaders.default_model import default_model_dir
    from treadle.train.draft import hidden, student_of

    target = default_model_dir()
    layers = [int(x) for x in args.layers.split(",")]
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 49152, (args.batch, args.seq + 1), generator=gen)
    inputs, labels = tokens[:, :-1], tokens[:, 1:].flatten()

    graph = student_of(target, layers)
    runners = {
        "graph": (
            graph,
            trainable_parameters(graph.weights),
            lambda: graph.logits(hidden(graph, inputs)),
        )
    }
    if args.compare_stack:
        stack = old_stack_module(args.compare_stack).load_target(target, layers)
        stack.freeze_embeddings()
        runners["Stack"] = (
            stack,
            [p for p in stack.parameters() if p.requires_grad],
            lambda: stack(inputs),
        )

    def step(name: str) -> float:
        _, params, forward = runners[name]
        opt = opts[name]
        t0 = time.perf_counter()
        loss = F.cross_entropy(forward().flatten(0, 1), labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        return time.perf_counter() - t0

    opts = {n: torch.optim.AdamW(r[1], lr=1e-5) for n, r in runners.items()}
    with torch.no_grad():
        if "Stack" in runners:  # the same function before training
            diff = (runners["graph"][2]() - runners["Stack"][2]()).abs().max()
            print(f"max |logits(graph) - logits(Stack)| = {float(diff):.2e}")
    times: dict[str, list[float]] = {n: [] for n in runners}
    for n in runners:
        step(n)  # warm-up
    for _ in range(args.steps):
        for n in runners:
            times[n].append(step(n))
    result = {
        "device": platform.processor() or platform.machine(),
        "threads": args.threads,
        "torch": torch.__version__,
        "layers": layers,
        "batch": args.batch,
        "seq": args.seq,
        "tokens_per_step": args.batch * args.seq,
        "steps": args.steps,
        "stack_rev": args.compare_stack,
        "command": "python perf/bench_train_step.py " + " ".join(sys.argv[1:]),
    }
    for n, ts in times.items():
        ms = 1000 * statistics.median(ts)
        result[n] = {
            "ms_per_step": round(ms, 1),
            "tokens_per_s": round(args.batch * args.seq / ms * 1000, 1),
            "min_ms": round(1000 * min(ts), 1),
            "all_ms": [round(1000 * t, 1) for t in ts],
        }
        print(f"{n:6s} {ms:8.1f} ms/step  {result[n]['tokens_per_s']:8.1f} tokens/s")
    if "Stack" in times:
        result["ratio_graph_over_stack"] = round(
            result["graph"]["ms_per_step"] / result["Stack"]["ms_per_step"], 3
        )
        result["ratio_graph_over_stack_min"] = round(
            result["graph"]["min_ms"] / result["Stack"]["min_ms"], 3
        )
        print(
            f"graph / Stack = {result['ratio_graph_over_stack']} (median), "
            f"{result['ratio_graph_over_stack_min']} (fastest steps)"
        )
    out = args.out or ROOT / "perf" / "results" / f"bench_train_step-{platform.node() or 'vm'}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
