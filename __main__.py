"""The `treadle` command line: generate, convert, models, draft, train."""

from __future__ import annotations

import argparse
import sys

DEFAULT_PROMPT = "What is the capital of France, and why is it famous?"
WEIGHTS = ["native", "float32", "bfloat16", "float16", "int8", "int4"]
WEIGHTS_HELP = ("the format the weight matrices are stored and multiplied in: a float dtype, int8 "
                "(per output channel) or int4 (groups of 32), quantized on load, or native: what "
                "the file holds, e.g. a GGUF's int4/int8 matrices (default: --weight-dtype, else "
                "--dtype)")


def _generate(args) -> int:
    from . import SamplingParams, load
    from .runtime.methods import AR

    params = SamplingParams(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop=tuple(args.stop),
        ignore_eos=args.ignore_eos,
    )
    method = _method(args)
    llm = load(args.model, dtype=args.dtype, device=args.device, weight_dtype=args.weight_dtype,
               kv_cache_mb=args.kv_cache_mb, weights=args.weights)
    chat = not args.raw and llm.tokenizer.chat_template is not None
    if getattr(method, "draft", None) == "auto" or getattr(getattr(method, "base", None), "draft",
                                                           None) == "auto":
        print(f"[draft: {llm.resolve_draft('auto')} (auto: the derived draft if built, else "
              "n-gram prompt lookup)]", file=sys.stderr)
    if args.verbose:
        print(llm.describe(), file=sys.stderr)
    if args.method == "apar":  # the answer is reassembled from the fork tree once it is done
        done = llm.generate(args.prompt, params, chat=chat, system=args.system, method=method)
        sys.stdout.write(done.text)
    else:
        for piece in llm.stream(args.prompt, params, chat=chat, system=args.system,
                                method=method):
            sys.stdout.write(piece)
            sys.stdout.flush()
        done = llm.last_completion
    print(
        f"\n[{len(done.tokens)} tokens, {done.seconds:.2f} s, "
        f"{done.tokens_per_second:.1f} tokens/s, prompt {done.prompt_tokens} tokens, "
        f"finish: {done.finish_reason}]"
    )
    if not isinstance(method, AR):
        print(f"[{done.stats.summary()}]")
    if args.method in ("sgd", "sot"):  # waves, points, routing, fallbacks
        print(f"[{done.report.describe()}]")
    return 0


def _method(args, name: str | None = None):
    from .runtime.methods import APAR, AR, SelfSpec, SkipDecode, Speculative

    name = name or args.method
    if name in ("sgd", "sot"):
        from .runtime.skeleton import SGD, SoT

        node = None if args.node_method == "ar" else _method(args, args.node_method)
        if name == "sot":
            return SoT(node_method=node, router=args.router)
        small = None if args.small in (None, "none") else args.small
        return SGD(node_method=node, router=args.router, small=small, threshold=args.threshold)
    if name == "llm2slm":
        from .runtime.llm2slm import LLM2SLM

        return LLM2SLM(projector=args.projector, small=args.small)
    if name == "apar":
        base = None if args.apar_base == "ar" else _method(args, args.apar_base)
        return APAR(base=base, fork_id=args.fork_id, child_id=args.child_id)
    if name == "ar":
        return AR()
    if name == "skipdecode":
        return SkipDecode(speedup=args.skip_speedup, warmup_layers=args.warmup_layers)
    if name == "selfspec":
        return SelfSpec(k=args.k or 4, draft_speedup=args.skip_speedup,
                        warmup_layers=args.warmup_layers)
    if name == "sd":
        return Speculative.chain(depth=args.depth, draft=args.draft)
    return Speculative.gsd(k=args.k or 4, tau=args.tau, depth=args.depth, budget=args.budget,
                           draft=args.draft)


def _convert(args) -> int:
    from .loaders.gguf_import import convert_gguf

    out = convert_gguf(args.gguf, args.out_dir, overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def _draft(args) -> int:
    from .train.draft import main as draft_main

    return draft_main(args.args)


def _train(args) -> int:
    if args.what == "llm2slm":
        from .train.llm2slm import main as llm2slm_main

        return llm2slm_main(args.args, prog="treadle train llm2slm")
    if args.what == "skipdecode":
        from .train.skipdecode import main as skipdecode_main

        return skipdecode_main(args.args, prog="treadle train skipdecode")
    if args.what == "apar":
        from .train.apar import main as apar_main

        return apar_main(args.args, prog="treadle train apar")
    from .train.draft import main as draft_main

    return draft_main(args.args, prog="treadle train draft")


def _serve(args) -> int:
    try:
        from .server import main as serve_main
    except ImportError as e:
        raise RuntimeError(
            f"`treadle serve` needs {e.name}: pip install 'treadle[serve]'"
        ) from None
    return serve_main(args)


def _models(args) -> int:
    from .loaders.default_model import default_model_dir

    print(default_model_dir())
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="treadle", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="complete a prompt, streaming the text")
    gen.add_argument("prompt", nargs="?", default=DEFAULT_PROMPT,
                     help=f"the prompt (default: {DEFAULT_PROMPT!r})")
    gen.add_argument(
        "--model", help="model directory or .gguf file (default: SmolLM2-135M-Instruct)"
    )
    gen.add_argument("--raw", action="store_true",
                     help="send the prompt as it is, without the model's chat template (which is "
                     "applied by default when the model has one)")
    gen.add_argument("--chat", action="store_true", help=argparse.SUPPRESS)  # the default now
    gen.add_argument("--system", help="system message (chat template only)")
    gen.add_argument("--ignore-eos", action="store_true",
                     help="keep generating past EOS up to --max-new-tokens (benchmarks)")
    gen.add_argument("--verbose", action="store_true",
                     help="print what runs where (backend, each op, every reference fallback)")
    gen.add_argument("--kv-cache-mb", type=float, default=2048,
                     help="memory for the KV cache: live streams and the prefix cache")
    gen.add_argument("--max-new-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.add_argument("--method", default="ar",
                     choices=["ar", "sd", "gsd", "skipdecode", "selfspec", "apar", "llm2slm",
                              "sgd", "sot"])
    gen.add_argument("--projector", default="default",
                     help="llm2slm: 'default' / 'tuned' (the default model's projector, "
                     "`treadle train llm2slm [--tune-small]`) or a projector dir")
    gen.add_argument("--small", default=None,
                     help="llm2slm: the small model dir (default: the projector's own); sgd: "
                     "the model for easy points ('default': the derived draft; none: all large)")
    gen.add_argument("--node-method", default="ar",
                     choices=["ar", "sd", "gsd", "skipdecode", "selfspec"],
                     help="sgd/sot: how each point decodes on the large model")
    gen.add_argument("--router", action="store_true",
                     help="sgd/sot: ask the model first whether the question suits a skeleton")
    gen.add_argument("--threshold", type=int, default=2,
                     help="sgd: points of difficulty (1-5) at or under this go to --small")
    gen.add_argument("--apar-base", default="ar", choices=["ar", "sd", "gsd"],
                     help="apar: how each stream decodes (sd/gsd use --draft)")
    gen.add_argument("--fork-id", type=int, help="apar: the [Fork] token id (default: by name)")
    gen.add_argument("--child-id", type=int, help="apar: the [Child] token id (default: by name)")
    gen.add_argument("--draft", default="auto",
                     help="sd/gsd: 'auto' (the derived draft if built, else ngram), "
                     "'default' (the derived draft), 'ngram' (prompt lookup), "
                     "'ngram+default' (lookup + the derived draft's n-gram table), or a model "
                     "dir/GGUF")
    gen.add_argument("--depth", type=int, default=4, help="sd/gsd: draft steps per round")
    gen.add_argument("--tau", type=int, default=0, help="gsd: merge depth (-1: no merging)")
    gen.add_argument("--budget", type=int, default=16, help="gsd: tree nodes verified per step")
    gen.add_argument("--skip-speedup", type=float, default=None,
                     help="skipdecode: total layers / mean layers per token; selfspec: the draft's "
                     "(default: the schedule the model was tuned for, else 2)")
    gen.add_argument("--warmup-layers", type=int, default=2,
                     help="skipdecode/selfspec: lower layers every token runs")
    gen.add_argument("-k", "--k", type=int, default=0,
                     help="selfspec: draft tokens per step (4); gsd: children per node (4)")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    gen.add_argument(
        "--weight-dtype",
        default=None,
        choices=["float32", "bfloat16", "float16"],
        help="store/multiply the weight matrices in this dtype (default: --dtype); bfloat16 "
        "under float32 activations makes speculative verification cheap on AVX-512 BF16 CPUs",
    )
    gen.add_argument("--weights", default=None, choices=WEIGHTS, help=WEIGHTS_HELP)
    gen.add_argument("--device", default="cpu")
    gen.set_defaults(run=_generate)

    conv = sub.add_parser("convert", help="import a GGUF file into an HF-layout directory")
    conv.add_argument("gguf")
    conv.add_argument("out_dir")
    conv.add_argument("--overwrite", action="store_true")
    conv.set_defaults(run=_convert)

    draft = sub.add_parser(
        "draft", help="derive a draft for the default model: `treadle draft build|info --help`"
    )
    draft.add_argument("args", nargs=argparse.REMAINDER)
    draft.set_defaults(run=_draft)

    train = sub.add_parser("train", help="train a derived artifact: `treadle train draft --help`")
    train.add_argument("what", choices=["draft", "skipdecode", "llm2slm", "apar"])
    train.add_argument("args", nargs=argparse.REMAINDER)
    train.set_defaults(run=_train)

    models = sub.add_parser("models", help="prepare the default model and print its directory")
    models.set_defaults(run=_models)

    srv = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (continuous batching)")
    srv.add_argument("--model",
                     help="model directory or .gguf file (default: SmolLM2-135M-Instruct)")
    srv.add_argument("--host", default="127.0.0.1",
                     help="address to listen on (there is no authentication: keep it local)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--name",
                     help="the model id clients see (default: the model directory's name)")
    srv.add_argument("--max-seq-len", type=int, default=4096)
    srv.add_argument("--kv-cache-mb", type=float, default=2048)
    srv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    srv.add_argument("--weight-dtype", default=None, choices=["float32", "bfloat16", "float16"])
    srv.add_argument("--weights", default=None, choices=WEIGHTS, help=WEIGHTS_HELP)
    srv.add_argument("--device", default="cpu")
    srv.set_defaults(run=_serve)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"treadle: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
