"""The public handle on a loaded model: `treadle.load(path) -> LLM`, then `generate` / `stream`."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..graph.config import ModelConfig
from ..graph.model import Transformer
from ..graph.skip import read_tuned_schedule
from ..graph.weights import ModelWeights, WeightFormat
from ..loaders.default_model import cache_dir
from ..loaders.quantized_weights import has_quantized, read_quantized
from ..loaders.safetensors_weights import checkpoint_dtype, read_state_dict
from ..loaders.tokenizer import Tokenizer
from .apar import APAR, reassemble
from .engine import Engine, LogitProcessor, Stream, Worker
from .gsd import ModelDraft, NgramDraft, NgramTable
from .llm2slm import LLM2SLM, Pair
from .methods import AR, Method, Speculative, for_tuned_model, make_policy
from .request import Request
from .sampling import SamplingParams, make_generators
from .skeleton import SkeletonMethod
from .stats import DecodeStats

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The `weights=` options: a WeightFormat's name, or "native" (what the checkpoint holds).
WEIGHTS = ("native", *(f.value for f in WeightFormat))
# Whether a GGUF file and the default model load their own int4/int8 matrices ("native") when no
# `weights` / `weight_dtype` is given. The goal, once perf/bench_decode.py measures native faster
# end to end on a quiet machine of the CI class (its products are ~1.8x faster at one row on the
# AVX2 VMs: graph/products.py). Until then they load as `dtype`: the numbers the transformers
# oracle and the golden tests check (native rounds each product's input and output to bf16, as
# bf16 inference does, and greedy choices at near-ties can differ).
GGUF_NATIVE_BY_DEFAULT = False


DRAFT_SLACK = 65  # the largest tree envelope (64 nodes) + its root
APAR_TOKENS = ("[Fork]", "[Child]")  # the control tokens of an APAR-tuned model


class PromptError(ValueError):
    """A prompt the model cannot take (empty, or longer than the context)."""


@dataclass
class Completion:
    text: str
    tokens: list[int]
    prompt_tokens: int
    finish_reason: str  # "eos" | "stop" | "length"
    seconds: float  # wall time of the whole call (prefill + decode), shared by a batch
    stats: DecodeStats  # the whole call's figures (shared by a batch)

    @property
    def tokens_per_second(self) -> float:
        return len(self.tokens) / self.seconds if self.seconds > 0 else float("inf")


class LLM:
    def __init__(
        self,
        model_dir: str | Path,
        dtype: str | torch.dtype = "float32",
        device: str = "cpu",
        max_seq_len: int = 4096,
        weight_dtype: str | torch.dtype | None = None,
        kv_cache_mb: float = 2048,
        prefix_cache: bool = True,
        weights: str | None = None,
    ):
        """`kv_cache_mb` bounds the KV cache (live streams and the prefix cache together);
        `prefix_cache` keeps finished sequences' K/V for later calls that share their prefix.

        `dtype` is what the forward computes in (activations, KV cache); `weights` is what the
        matrices are stored and multiplied in: "float32" / "bfloat16" / "float16", "int8" / "int4"
        (weight-only integers, quantized here on load: graph/weights.py), or "native", what the
        checkpoint holds (a GGUF import's integer matrices, else the file's float dtype). Default:
        `weight_dtype` (the older name for the float formats), else `dtype`. Narrower weights than
        the activations halve (bf16) to ~1/7 (int4) the bytes per token, and torch's weight-only
        products keep a k-token verification step near the cost of one token on CPUs with the
        vector units for them (kernels/linear.py; graph/products.py picks the product per machine
        and row count)."""
        dtype = _dtype(dtype, "dtype")
        self.weights = _weights_option(weights, weight_dtype, dtype)
        self.model_dir = Path(model_dir)
        self.config = ModelConfig.from_json(self.model_dir)
        fmt = _weight_format(self.weights, self.model_dir, self.config)
        quantized = read_quantized(self.model_dir, self.config) if fmt is None else {}
        state = read_state_dict(self.model_dir, self.config, dtype, skip=quantized)
        state = {name: t.to(device) for name, t in (state | quantized).items()}
        model_weights = ModelWeights.from_state_dict(state, self.config, fmt)
        formats = model_weights.formats()
        # The float dtype every matrix is stored in, None when some matrix is not a float one.
        only = next(iter(formats)) if len(formats) == 1 else None
        self.weight_dtype = only.dtype if only is not None and not only.quantized else None
        if torch.device(device).type == "cpu":
            if set(formats) == {WeightFormat.FLOAT32}:
                # fp32 weights stream through numpy's BLAS threads; torch's own pool only runs the
                # small per-token ops, where a second thread loses more to contention than it
                # gains (a decode step ran 4x slower with both pools at 2 threads).
                torch.set_num_threads(1)
            else:  # the products run in torch (oneDNN, weight-only kernels): its pool is busy
                torch.set_num_threads(_physical_cores())
        self.max_seq_len = min(max_seq_len, self.config.max_position_embeddings)
        # Drafting may write up to DRAFT_SLACK slots past a full context (a speculative tree's
        # nodes before verification cuts them), so the RoPE tables reach that far. The weight
        # products are timed on first use and the choice cached per machine (graph/products.py).
        self.model = Transformer(self.config, model_weights,
                                 max_positions=self.max_seq_len + DRAFT_SLACK,
                                 product_cache=cache_dir() / "products")
        self.tokenizer = Tokenizer.from_dir(self.model_dir)
        if self.tokenizer.vocab_size > self.config.vocab_size:
            raise ValueError(
                f"{self.model_dir}: the tokenizer has {self.tokenizer.vocab_size} tokens but "
                f"config.json's vocab_size is {self.config.vocab_size}"
            )
        eos = set(self.tokenizer.eos_ids) | set(self.config.eos_token_ids)
        self.eos_ids = frozenset(eos)
        # The SkipDecode schedule these weights were fine-tuned for (train/skipdecode.py), if any:
        # SkipDecode / SelfSpec without their own schedule run it (runtime/methods.py).
        self.skip_schedule = read_tuned_schedule(self.model_dir)
        self.kv_cache_mb, self.prefix_cache = kv_cache_mb, prefix_cache
        # One worker (KV cache, prefix cache, executor and its plans) and one engine per loaded
        # model, kept across calls.
        self.worker = Worker(self.model, self.max_seq_len + DRAFT_SLACK, kv_cache_mb, prefix_cache)
        self.engine = Engine(self.worker, self._policy_for)
        self.last_completion: Completion | None = None  # set when a `stream` ends
        self._drafts: dict[str, LLM] = {}
        self._draft_sources: dict[str, ModelDraft | NgramDraft] = {}
        self._tables: dict[Path, NgramTable] = {}
        self._pairs: dict[LLM2SLM, Pair] = {}  # LLM-to-SLM: this model as the large one

    # --- prompts ----------------------------------------------------------------------------
    def encode(self, prompt: str | list[int], chat: bool = False, system: str | None = None):
        """Prompt text (or ids) -> ids; with chat=True the model's chat template is applied."""
        if isinstance(prompt, list):
            ids = prompt
        elif chat:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}
            ]
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        else:
            ids = self.tokenizer.encode(prompt)
        if not ids:
            raise PromptError("the prompt is empty (no tokens)")
        if len(ids) >= self.max_seq_len:
            raise PromptError(
                f"the prompt has {len(ids)} tokens but the context holds {self.max_seq_len} "
                f"(max_seq_len; the model's limit is {self.config.max_position_embeddings})"
            )
        return ids

    def _requests(self, prompts, params, chat, system) -> list[Request]:
        requests = []
        for p in prompts:
            ids = self.encode(p, chat, system)
            room = self.max_seq_len - len(ids)  # generation stops when the context is full
            req_params = params
            if params.max_new_tokens > room:
                req_params = replace(params, max_new_tokens=room)
            requests.append(Request(ids, req_params, self.eos_ids, self.tokenizer.stream_decoder()))
        return requests

    def _streams(self, requests: list[Request], method: Method, stats: DecodeStats,
                 processor: LogitProcessor | None = None,
                 embeds: list[torch.Tensor] | None = None) -> list[Stream]:
        gens = make_generators(requests[0].params, len(requests), self.model.device)
        embeds = embeds if embeds is not None else [None] * len(requests)
        if len(embeds) != len(requests):
            raise PromptError(f"{len(embeds)} prompt_embeds for {len(requests)} prompts")
        return [self.engine.add(Stream(r, method, list(r.prompt), g, stats, processor,
                                       prompt_embeds=e))
                for r, g, e in zip(requests, gens, embeds)]

    def _run(self, requests: list[Request], method: Method, stats: DecodeStats,
             out: list[Stream] | None = None, embeds: list[torch.Tensor] | None = None):
        """(request index, new text) pairs of one generation, timed into `stats`; `out` receives
        the streams. Streams of other callers (a server's) may share its steps."""
        t0 = time.perf_counter()
        streams = self._streams(requests, method, stats, embeds=embeds)
        if out is not None:
            out += streams
        index = {id(s): i for i, s in enumerate(streams)}
        try:
            for s, text in self.engine.run(streams):
                if id(s) in index:
                    yield index[id(s)], text
        finally:
            stats.seconds = time.perf_counter() - t0

    def _policy_for(self, method: Method):
        if isinstance(method, APAR):
            method = self.apar_ids(method)
            draft = self._draft_source(method.base)
        else:
            draft = self._draft_source(method)
        method = for_tuned_model(method, self.skip_schedule, self.model_dir)
        return make_policy(method, self.worker.executor, draft, self.tokenizer.stream_decoder)

    def apar_ids(self, method: APAR) -> APAR:
        """APAR with its control token ids: the given ones, else this model's [Fork] / [Child]
        tokens (an APAR-tuned model has them)."""
        if method.fork_id is not None and method.child_id is not None:
            return method
        ids = [self.tokenizer.token_to_id(t) for t in APAR_TOKENS]
        if None in ids:
            raise ValueError(
                f"{self.model_dir}: the tokenizer has no {' / '.join(APAR_TOKENS)} tokens, so this "
                "model was not tuned for APAR: pass APAR(fork_id=..., child_id=...) for a model "
                "with other control tokens"
            )
        return replace(method, fork_id=ids[0], child_id=ids[1])

    def describe(self) -> str:
        """What runs where: the backend, each op's implementation, and every op or step kind that
        runs a slower reference or an eager step, with the reason."""
        ops = self.model.ops
        formats = ", ".join(f"{n} {f.value}" for f, n in self.model.weights.formats().items())
        lines = [f"model {self.model_dir} on {self.model.device}, backend {ops.backend.value}, "
                 f"activations {self.model.dtype}, weights={self.weights} ({formats} matrices)"]
        for name in ("rmsnorm", "add_rmsnorm", "rope", "swiglu", "attention", "linear"):
            fn = getattr(ops, name)
            lines.append(f"  {name}: {fn.__module__}.{fn.__name__}")
        if self.model.products is not None:
            lines += [f"    {line}" for line in self.model.products.describe()]
        ex = self.worker.executor
        lines.append(f"  steps: {'static plans' if ex.static else 'eager'}"
                     f"{' + CUDA graphs' if ex.cuda_graphs else ''}, {len(ex.plans)} plans built")
        lines += [f"  fallback: {f}" for f in fallbacks(self)]
        cache = self.worker.cache
        lines.append(f"  KV cache: {cache.rows} rows x {cache.capacity} slots "
                     f"({cache.rows * cache.row_bytes() / 2**20:.0f} MiB of kv_cache_mb="
                     f"{self.kv_cache_mb:g}), {cache.in_use()} in use, "
                     f"{len(self.worker.prefixes.entries)} prefix-cache entries, "
                     f"{self.worker.prefixes.reused_tokens} prompt tokens reused so far")
        return "\n".join(lines)

    # --- drafts -----------------------------------------------------------------------------
    def draft_model(self, spec: str) -> LLM:
        """The draft model named by a Speculative method ("default" or a path), loaded once and
        checked against this model's vocabulary."""
        if spec not in self._drafts:
            if spec == "default":
                from ..loaders.draft_model import find_draft

                path = find_draft()
                if path is None:
                    raise FileNotFoundError(
                        "no draft for the default model has been built yet: run "
                        "`treadle draft build` (minutes on a CPU), or pass a draft directory"
                    )
            else:
                path = spec
            draft = load(
                path,
                dtype=self.model.dtype,
                device=str(self.model.device),
                max_seq_len=self.max_seq_len,
                weights=self.draft_weights(),
            )
            check_draft_vocab(self, draft)
            self._drafts[spec] = draft
        return self._drafts[spec]

    def draft_weights(self) -> str:
        """A draft model's `weights`: this model's, with "native" read as the format most of this
        model's matrices are in (a draft is not held to the target's numerics, only to its speed,
        and one thread setting serves both: see __init__)."""
        if self.weights != "native":
            return self.weights
        formats = self.model.weights.formats()
        return max(formats, key=formats.get).value

    def llm2slm(self, method: LLM2SLM) -> Pair:
        """This model as LLM-to-SLM's large model, with `method`'s projector and small model:
        loaded once and checked to belong together (runtime/llm2slm.py)."""
        if method not in self._pairs:
            self._pairs[method] = Pair.open(self, method, load)
        return self._pairs[method]

    def ngram_table(self, draft: str | Path | None = None) -> NgramTable:
        """The n-gram table of a derived draft (default: the default model's), loaded once."""
        from ..loaders.draft_model import find_draft, read_ngram_table

        path = find_draft(draft)
        if path is None:
            raise FileNotFoundError(
                "no draft for the default model has been built yet: run `treadle draft build`"
            )
        if path not in self._tables:
            self._tables[path] = NgramTable(*read_ngram_table(path, self.config.vocab_size))
        return self._tables[path]

    def resolve_draft(self, spec: str) -> str:
        """'auto' -> 'default' when the derived draft is built, else 'ngram'."""
        if spec != "auto":
            return spec
        from ..loaders.draft_model import find_draft

        return "default" if find_draft() is not None else "ngram"

    def _draft_source(self, method: Method | None):
        if not isinstance(method, Speculative):
            return None
        spec = self.resolve_draft(method.draft)
        if spec not in self._draft_sources:
            if spec == "ngram":
                source = NgramDraft()
            elif spec == "ngram+default":
                source = NgramDraft(table=self.ngram_table())
            else:
                draft = self.draft_model(spec)
                source = ModelDraft(draft.worker, vocab_size=self.config.vocab_size)
            self._draft_sources[spec] = source
        return self._draft_sources[spec]

    # --- generation -------------------------------------------------------------------------
    def stream(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        chat: bool = False,
        system: str | None = None,
        method: Method = AR(),
        prompt_embeds: torch.Tensor | None = None,
    ) -> Iterator[str]:
        """Text of one completion, piece by piece as it is produced. `prompt_embeds` [prompt
        tokens, hidden_size], if given, is added to the prompt's token embeddings at its prefill
        (the encoded prompt: with chat=True, the templated one)."""
        if isinstance(method, LLM2SLM):  # the small model writes (runtime/llm2slm.py)
            pair = self.llm2slm(method)
            yield from pair.stream(prompt, params, chat, system)
            self.last_completion = pair.last_completion
            return
        if isinstance(method, SkeletonMethod):  # SGD / SoT drive the engines (runtime/sgd.py)
            from .sgd import stream_skeleton

            self.last_completion = yield from stream_skeleton(
                self, prompt, params or SamplingParams(), chat, system, method)
            return
        requests = self._requests([prompt], params or SamplingParams(), chat, system)
        stats = DecodeStats(self._method_name(method))
        streams = []
        embeds = None if prompt_embeds is None else [prompt_embeds]
        for _, text in self._run(requests, method, stats, streams, embeds):
            if text:  # APAR: the request's own stream; the answer is reassembled at the end
                yield text
        if isinstance(method, APAR):
            self.last_completion = _apar_completion(self, streams[0], stats)
        else:
            self.last_completion = _completion(requests[0], stats)

    def generate(
        self,
        prompts: str | list[int] | list[str] | list[list[int]],
        params: SamplingParams | None = None,
        chat: bool = False,
        system: str | None = None,
        method: Method = AR(),
        prompt_embeds: torch.Tensor | list[torch.Tensor] | None = None,
    ) -> Completion | list[Completion]:
        """Complete one prompt (returns a Completion) or a batch (returns a list, in order).
        `prompt_embeds`: as `stream`'s, one per prompt (a list for a batch)."""
        if not isinstance(prompts, str) and len(prompts) == 0:
            raise PromptError("no prompt given (an empty list is neither a prompt nor a batch)")
        if isinstance(method, LLM2SLM):  # the small model writes (runtime/llm2slm.py)
            return self.llm2slm(method).generate(prompts, params, chat, system)
        single = isinstance(prompts, str) or isinstance(prompts[0], int)
        batch = [prompts] if single else list(prompts)
        if isinstance(method, SkeletonMethod):  # SGD / SoT drive the engines (runtime/sgd.py)
            from .sgd import generate_skeleton

            out = generate_skeleton(self, batch, params or SamplingParams(), chat, system, method)
            return out[0] if single else out
        if single and prompt_embeds is not None:
            prompt_embeds = [prompt_embeds]
        requests = self._requests(batch, params or SamplingParams(), chat, system)
        stats = DecodeStats(self._method_name(method))
        # No autograd state to avoid (no weight requires grad), and no inference_mode: the cache
        # outlives the call and must stay writable by later calls made outside such a mode.
        streams = []
        for _ in self._run(requests, method, stats, streams, prompt_embeds):
            pass
        if isinstance(method, APAR):
            out = [_apar_completion(self, s, stats) for s in streams]
        else:
            out = [_completion(r, stats) for r in requests]
        return out[0] if single else out


    def _method_name(self, method: Method) -> str:
        if isinstance(method, Speculative) and method.draft == "auto":
            return replace(method, draft=self.resolve_draft("auto")).name
        if isinstance(method, APAR):
            return f"apar[{self._method_name(method.base) if method.base else 'ar'}]"
        return method.name

    def submit(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        chat: bool = False,
        system: str | None = None,
        method: Method = AR(),
        on_text=None,
        processor: LogitProcessor | None = None,
        prompt_embeds: torch.Tensor | None = None,
    ) -> Stream:
        """Join a request to the engine's live streams (continuous batching) without running it:
        `step()` advances every live stream; `on_text(piece)` receives its text as it comes.
        `prompt_embeds`: as `stream`'s. LLM-to-SLM runs on the small model's engine: submit to
        `llm2slm(method)`."""
        if isinstance(method, LLM2SLM):
            raise ValueError("LLM2SLM decodes on the small model's engine: submit to "
                             "llm.llm2slm(method) and step that")
        (request,) = self._requests([prompt], params or SamplingParams(), chat, system)
        (stream,) = self._streams([request], method, DecodeStats(self._method_name(method)),
                                  processor, None if prompt_embeds is None else [prompt_embeds])
        stream.on_text = on_text
        return stream

    def step(self) -> list[tuple[Stream, str]]:
        """One engine step over every live stream (see runtime/engine.py)."""
        return self.engine.step()


def fallbacks(llm: LLM) -> list[str]:
    """Every place where this model's steps run a reference or an eager path, and why."""
    out = []
    ex = llm.worker.executor
    if llm.model.ops.backend.value == "torch":
        out.append("every op runs its pure-torch reference (the CPU backend; kernels are for "
                   "CUDA)")
    else:
        out.append("attention of a draft step over a pending window of more than 64 slots (a GSD "
                   "tree past the kernel's 64 visibility bits) runs the reference")
        out.append("accept: the lossless sampled rule runs its reference per sequence (the "
                   "Triton verify_sample kernel draws from Philox, not the per-stream generator)")
    if not ex.static:
        out.append("decode/verify steps run eagerly (static plans pay off only on CUDA)")
    out.append("prefill steps (prompts, a fork's first tokens, a draft's catch-up) run eagerly: "
               "their shapes vary too much for a plan per shape")
    out.append("self-speculation's draft and verify steps run eagerly (partial layer lists "
               "continuing from a saved residual stream have no plan kind yet)")
    if llm.model.products is not None:
        out += llm.model.products.fallbacks()
    return out


class DraftMismatchError(ValueError):
    """A draft whose vocabulary is not the target's."""


def check_draft_vocab(target: LLM, draft: LLM) -> None:
    """The draft must tokenize exactly as the target: the same tokens at the same ids. Embedding
    tables may differ in padding rows past the tokenizer's vocabulary (handled by ModelDraft)."""
    tt, dt = target.tokenizer, draft.tokenizer
    where = f"draft {draft.model_dir} vs target {target.model_dir}"
    if tt.vocab_size != dt.vocab_size:
        raise DraftMismatchError(
            f"{where}: the draft's tokenizer has {dt.vocab_size} tokens, the target's "
            f"{tt.vocab_size}: speculative decoding needs the same vocabulary"
        )
    for i in range(tt.vocab_size):
        if tt.id_to_token(i) != dt.id_to_token(i):
            raise DraftMismatchError(
                f"{where}: token id {i} is {dt.id_to_token(i)!r} in the draft but "
                f"{tt.id_to_token(i)!r} in the target: speculative decoding needs the same "
                "vocabulary"
            )


def _completion(r: Request, stats: DecodeStats) -> Completion:
    return Completion(r.text, r.tokens, len(r.prompt), r.finish_reason, stats.seconds, stats)


def _apar_completion(llm: LLM, stream: Stream, stats: DecodeStats) -> Completion:
    """An APAR request's answer, reassembled from its fork tree; tokens of every stream."""
    family = stream.group
    m = llm.apar_ids(stream.method)
    skip = {m.fork_id, m.child_id} | set(llm.eos_ids)

    def decode(tokens: list[int]) -> str:
        return llm.tokenizer.decode([t for t in tokens if t not in skip])

    stats.streams += len(family.streams)
    stats.fork_depth = max(stats.fork_depth, family.max_depth())
    stats.tokens_per_stream += family.tokens_per_stream()
    tokens = [t for s in family.streams for t in s.request.tokens]
    return Completion(reassemble(family, decode), tokens, len(stream.request.prompt),
                      stream.request.finish_reason, stats.seconds, stats)


def load(
    path: str | Path | None = None,
    dtype: str | torch.dtype = "float32",
    device: str = "cpu",
    max_seq_len: int = 4096,
    weight_dtype: str | torch.dtype | None = None,
    kv_cache_mb: float = 2048,
    prefix_cache: bool = True,
    weights: str | None = None,
) -> LLM:
    """Load a model directory or GGUF file; None loads the embedded default model. `weights`:
    see LLM (default: `weight_dtype`, else `dtype`; "native" for a GGUF file and the default
    model when GGUF_NATIVE_BY_DEFAULT)."""
    gguf = path is None or Path(path).suffix == ".gguf"
    if weights is None and weight_dtype is None and gguf and GGUF_NATIVE_BY_DEFAULT:
        weights = "native"
    if path is None:
        from ..loaders.default_model import default_model_dir

        path = default_model_dir()
    path = Path(path)
    if path.suffix == ".gguf":
        from ..loaders.default_model import converted_gguf_dir

        path = converted_gguf_dir(path)
    return LLM(
        path, dtype=dtype, device=device, max_seq_len=max_seq_len, weight_dtype=weight_dtype,
        kv_cache_mb=kv_cache_mb, prefix_cache=prefix_cache, weights=weights,
    )


def _weights_option(weights: str | None, weight_dtype: str | torch.dtype | None,
                    dtype: torch.dtype) -> str:
    """The `weights=` option from the arguments (checked before anything is read)."""
    if weight_dtype is not None:
        name = WeightFormat.of(_dtype(weight_dtype, "weight_dtype")).value
        if weights is not None and weights != name:
            raise ValueError(f"weights={weights!r} and weight_dtype={weight_dtype!r} disagree: "
                             "pass one of them")
        weights = name
    if weights is None:
        return WeightFormat.of(dtype).value
    if weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}: expected one of {', '.join(WEIGHTS)}")
    return weights


def _weight_format(weights: str, model_dir: Path, cfg: ModelConfig) -> WeightFormat | None:
    """The format every matrix is converted to; None keeps a quantized checkpoint's matrices."""
    if weights != "native":
        return WeightFormat(weights)
    if has_quantized(model_dir):
        return None
    return WeightFormat.of(checkpoint_dtype(model_dir, cfg))


def _dtype(value: str | torch.dtype, what: str) -> torch.dtype:
    if isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    if isinstance(value, str) and value in DTYPES:
        return DTYPES[value]
    raise ValueError(f"{what}={value!r}: expected one of {', '.join(DTYPES)}")


def _physical_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
