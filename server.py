"""`treadle serve`: an OpenAI-compatible HTTP server on one model's continuous batching.

One thread owns the engine. HTTP handlers never touch it: they validate a request, encode its
prompt and hand a `Job` to `EngineThread.submit`; before every step the engine thread drains those
jobs into the running batch (`LLM.submit`), so a request that arrives mid-generation joins at the
next step. Text comes back through each job's asyncio queue (fed with `call_soon_threadsafe` from
the stream's `on_text`), and a final `Done` carries the finish reason and the token counts. A client
that goes away cancels its job; the engine thread then ends the stream, which leaves the engine at
the end of the next step.

Endpoints: POST /v1/completions, POST /v1/chat/completions (both with `stream: true` as
server-sent events in OpenAI's chunk format), GET /v1/models, GET /health. Extensions to OpenAI's
fields: `top_k`, `ignore_eos`, and `method` ("ar", "skipdecode", "selfspec", and "sd" / "gsd" with
prompt-lookup drafts).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

from .loaders.tokenizer import TokenizerError
from .runtime.engine import Stream
from .runtime.llm import LLM, PromptError
from .runtime.methods import AR, Method, SelfSpec, SkipDecode, Speculative
from .runtime.sampling import SamplingError, SamplingParams

log = logging.getLogger("treadle.server")

# The `method` field: each decoding method with its defaults. The speculative ones draft by prompt
# lookup, which needs no second model (a derived draft fits the default model only).
METHODS: dict[str, Method] = {
    "ar": AR(),
    "skipdecode": SkipDecode(),
    "selfspec": SelfSpec(),
    "sd": Speculative.chain(draft="ngram"),
    "gsd": Speculative.gsd(draft="ngram"),
}
# The engine's finish reasons as OpenAI names them.
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context


class BadRequest(Exception):
    """A request the server refuses (HTTP 400), naming the field at fault."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.message, self.param = message, param


# --- the engine thread ------------------------------------------------------------------------
@dataclass
class Done:
    finish_reason: str  # the engine's: "eos" | "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int


@dataclass
class Failed:
    message: str


@dataclass(eq=False)
class Job:
    """One request on its way through the engine thread, and its way back to its handler."""

    prompt: list[int]
    params: SamplingParams
    method: Method
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # text pieces (str), then one Done or Failed
    cancelled: bool = False  # set under EngineThread's lock
    stream: Stream | None = None  # engine thread only

    def post(self, item: str | Done | Failed) -> None:
        """Called from the engine thread."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the handler's loop is closed: nobody is listening
            pass


class EngineThread:
    """The one thread that steps `llm`'s engine: it sleeps while no stream is live."""

    def __init__(self, llm: LLM):
        self.llm = llm
        self._wake = threading.Condition()
        self._inbox: list[Job] = []
        self._closing = False
        self._jobs: list[Job] = []  # submitted and not yet done (engine thread only)
        # Figures for tests and /health.
        self.steps = 0
        self.max_live = 0  # the most unfinished streams one step has advanced
        self.cancelled = 0  # streams ended because their client went away
        self._thread = threading.Thread(target=self._run, name="treadle-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def close(self, timeout: float = 30) -> None:
        """Cancel what is still live and stop the thread."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join(timeout)

    def submit(self, job: Job) -> None:
        with self._wake:
            self._inbox.append(job)
            self._wake.notify()

    def cancel(self, job: Job) -> None:
        with self._wake:
            job.cancelled = True
            self._wake.notify()

    def _run(self) -> None:
        engine = self.llm.engine
        while True:
            with self._wake:
                while not (self._inbox or self._closing or engine.live):
                    self._wake.wait()
                new, self._inbox = self._inbox, []
                closing = self._closing
            # `cancelled` is a flag set once: read without the lock, it is at worst seen a step
            # late.
            for job in new:
                if not job.cancelled:
                    self._start(job)
            for job in self._jobs:
                if (job.cancelled or closing) and not job.stream.finished:
                    # The stream leaves at the end of the next step (Engine.step).
                    job.stream.request.finish_reason = "cancelled"
                    self.cancelled += 1
            if closing and not engine.live:
                return
            self.max_live = max(self.max_live, sum(not s.finished for s in engine.live))
            try:
                self.llm.step()
            except Exception as e:  # noqa: BLE001 - fail the live requests, keep serving
                log.exception("engine step failed")
                self._fail_all(f"the engine failed: {type(e).__name__}: {e}")
            self.steps += 1
            for job in [j for j in self._jobs if j.stream.finished]:
                r = job.stream.request
                job.post(Done(r.finish_reason, len(r.prompt), len(r.tokens)))
                self._jobs.remove(job)

    def _start(self, job: Job) -> None:
        try:
            job.stream = self.llm.submit(job.prompt, job.params, method=job.method,
                                         on_text=job.post)
        except Exception as e:  # noqa: BLE001 - KVCacheError (full), a method that cannot run
            job.post(Failed(f"{type(e).__name__}: {e}"))
            return
        self._jobs.append(job)

    def _fail_all(self, message: str) -> None:
        for s in self.llm.engine.live:
            s.request.finish_reason = s.request.finish_reason or "error"
        try:
            self.llm.step()  # every stream is finished: the step only lets them leave
        except Exception:  # noqa: BLE001
            log.exception("could not release the failed streams")
            self.llm.engine.live.clear()
        for job in self._jobs:  # told once their streams are gone
            job.post(Failed(message))
        self._jobs = []


# --- requests ---------------------------------------------------------------------------------
def _field(body: dict, name: str, default=None):
    value = body.get(name)
    return default if value is None else value


def sampling_params(body: dict, max_tokens: int) -> SamplingParams:
    """SamplingParams from OpenAI's fields (and the top_k / ignore_eos extensions)."""
    stop = _field(body, "stop", [])
    if isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list):
        stop = tuple(stop)
    else:
        raise BadRequest(f"stop={stop!r}: expected a string or a list of strings", "stop")
    names = {"max_new_tokens": "max_tokens"}
    if body.get("max_tokens") is None and body.get("max_completion_tokens") is not None:
        names["max_new_tokens"] = "max_completion_tokens"
    values = {
        "max_new_tokens": _field(body, names["max_new_tokens"], max_tokens),
        "temperature": _field(body, "temperature", 1.0),
        "top_p": _field(body, "top_p", 1.0),
        "top_k": _field(body, "top_k", 0),
        "seed": body.get("seed"),
    }
    for key, value in values.items():
        if isinstance(value, bool):  # JSON true is no number, though Python's bool is an int
            name = names.get(key, key)
            raise BadRequest(f"{name}={value!r}: expected a number, found a boolean", name)
    try:
        return SamplingParams(**values, stop=stop, ignore_eos=bool(body.get("ignore_eos")))
    except SamplingError as e:
        # "SamplingParams.temperature=-1: expected ..." -> "temperature=-1: expected ..."
        m = re.match(r"SamplingParams\.(\w+)", str(e))
        name = names.get(m.group(1), m.group(1)) if m else None
        message = str(e)[m.end():] if m else str(e)
        raise BadRequest(f"{name or ''}{message}", name) from None


def decoding_method(body: dict) -> Method:
    name = _field(body, "method", "ar")
    if name not in METHODS:
        raise BadRequest(f"method={name!r}: expected one of {', '.join(METHODS)}", "method")
    return METHODS[name]


def chat_messages(body: dict) -> list[dict[str, str]]:
    """`messages` as the chat template takes them: [{"role": ..., "content": text}]."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages: expected a non-empty list of {role, content} objects",
                         "messages")
    out = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # content parts: only text is understood
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise BadRequest(f"messages[{i}].content: only text parts are supported",
                                 "messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(role, str) or not isinstance(content, str | None):
            raise BadRequest(
                f"messages[{i}]: expected {{'role': str, 'content': str}}, found {m!r:.80}",
                "messages",
            )
        out.append({"role": role, "content": content or ""})
    return out


@dataclass
class Reply:
    """The OpenAI envelope of one response: whole, or chunk by chunk."""

    chat: bool
    model: str
    id: str
    created: int

    @classmethod
    def new(cls, chat: bool, model: str) -> Reply:
        prefix = "chatcmpl" if chat else "cmpl"
        return cls(chat, model, f"{prefix}-{uuid.uuid4().hex}", int(time.time()))

    def _envelope(self, kind: str, choices: list[dict], usage: dict | None = None) -> dict:
        out = {"id": self.id, "object": kind, "created": self.created, "model": self.model,
               "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    def whole(self, text: str, done: Done) -> dict:
        choice = {"index": 0, "finish_reason": finish_reason(done)}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
            return self._envelope("chat.completion", [choice], usage(done))
        choice |= {"text": text, "logprobs": None}
        return self._envelope("text_completion", [choice], usage(done))

    def chunk(self, text: str | None = None, done: Done | None = None, role: bool = False) -> dict:
        reason = None if done is None else finish_reason(done)
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": reason}
            return self._envelope("chat.completion.chunk", [choice])
        choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        return self._envelope("text_completion", [choice])

    def usage_chunk(self, done: Done) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        return self._envelope(kind, [], usage(done))


def finish_reason(done: Done) -> str:
    return FINISH_REASONS.get(done.finish_reason, done.finish_reason)


def usage(done: Done) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


def error_body(message: str, param: str | None = None, kind: str = "invalid_request_error"):
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


def sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


# --- the app ----------------------------------------------------------------------------------
class Api:
    def __init__(self, llm: LLM, name: str | None = None):
        self.llm = llm
        self.name = name or llm.model_dir.name
        self.engine = EngineThread(llm)
        self.created = int(time.time())

    async def completions(self, request: Request):
        body = await _json_object(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]  # a batch of one
        is_ids = isinstance(prompt, list) and all(type(t) is int for t in prompt)
        if not (isinstance(prompt, str) or is_ids):
            raise BadRequest("prompt: expected a string or a list of token ids (one prompt)",
                             "prompt")
        if is_ids and any(not 0 <= t < self.llm.config.vocab_size for t in prompt):
            raise BadRequest(f"prompt: token ids must lie in [0, {self.llm.config.vocab_size})",
                             "prompt")
        ids = self._encode(prompt, "prompt")
        params = sampling_params(body, COMPLETION_MAX_TOKENS)
        return await self._respond(request, body, ids, params, Reply.new(False, self.name))

    async def chat_completions(self, request: Request):
        body = await _json_object(request)
        messages = chat_messages(body)
        try:
            text = self.llm.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        except TokenizerError as e:
            raise BadRequest(f"messages: {e}", "messages") from None
        # As LLM.encode(chat=True) does for one message: the template holds the special tokens.
        ids = self._encode(self.llm.tokenizer.encode(text, add_special_tokens=False), "messages")
        params = sampling_params(body, self.llm.max_seq_len)  # cut to the context's room
        return await self._respond(request, body, ids, params, Reply.new(True, self.name))

    def _encode(self, prompt: str | list[int], field: str) -> list[int]:
        try:
            return self.llm.encode(prompt)
        except PromptError as e:
            raise BadRequest(f"{field}: {e}", field) from None

    async def _respond(self, request: Request, body: dict, ids: list[int],
                       params: SamplingParams, reply: Reply):
        if _field(body, "n", 1) != 1:
            raise BadRequest(f"n={body['n']!r}: only n=1 is supported", "n")
        method = decoding_method(body)
        job = Job(ids, params, method, asyncio.get_running_loop(), asyncio.Queue())
        self.engine.submit(job)
        if body.get("stream"):
            options = _field(body, "stream_options", {})
            include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
            return StreamingResponse(self._events(job, reply, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        watcher = asyncio.ensure_future(self._cancel_on_disconnect(request, job))
        pieces = []
        try:
            while isinstance(item := await job.queue.get(), str):
                pieces.append(item)
        finally:
            watcher.cancel()
        if isinstance(item, Failed):
            return JSONResponse(error_body(item.message, kind="server_error"), 500)
        return JSONResponse(reply.whole("".join(pieces), item))

    async def _events(self, job: Job, reply: Reply, include_usage: bool) -> AsyncIterator[str]:
        # Starlette cancels this generator when the client disconnects: `finally` cancels the job.
        ended = False
        try:
            if reply.chat:
                yield sse(reply.chunk(role=True))
            while isinstance(item := await job.queue.get(), str):
                yield sse(reply.chunk(item))
            ended = True
            if isinstance(item, Failed):
                yield sse(error_body(item.message, kind="server_error"))
            else:
                yield sse(reply.chunk(done=item))
                if include_usage:
                    yield sse(reply.usage_chunk(item))
            yield sse("[DONE]")
        finally:
            if not ended:
                self.engine.cancel(job)

    async def _cancel_on_disconnect(self, request: Request, job: Job) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        self.engine.cancel(job)

    async def models(self, request: Request):
        model = {"id": self.name, "object": "model", "created": self.created,
                 "owned_by": "treadle"}
        return JSONResponse({"object": "list", "data": [model]})

    async def health(self, request: Request):
        if not self.engine.alive():
            return JSONResponse({"status": "engine thread stopped"}, 503)
        return JSONResponse({"status": "ok"})


async def _json_object(request: Request) -> dict:
    try:
        body = json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise BadRequest(f"the request body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise BadRequest(f"the request body should be a JSON object, found {type(body).__name__}")
    return body


async def _bad_request(request: Request, exc: BadRequest):
    return JSONResponse(error_body(exc.message, exc.param), 400)


async def _http_error(request: Request, exc: HTTPException):
    return JSONResponse(error_body(str(exc.detail)), exc.status_code)


def create_app(llm: LLM, name: str | None = None) -> Starlette:
    """The ASGI app serving `llm` as model `name` (default: the model directory's name). Its
    engine thread runs between the app's startup and shutdown (`app.state.engine`)."""
    api = Api(llm, name)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        api.engine.start()
        try:
            yield
        finally:
            api.engine.close()

    app = Starlette(
        routes=[
            Route("/v1/completions", api.completions, methods=["POST"]),
            Route("/v1/chat/completions", api.chat_completions, methods=["POST"]),
            Route("/v1/models", api.models, methods=["GET"]),
            Route("/health", api.health, methods=["GET"]),
        ],
        exception_handlers={BadRequest: _bad_request, HTTPException: _http_error},
        lifespan=lifespan,
    )
    app.state.engine = api.engine
    return app


def serve(llm: LLM, host: str = "127.0.0.1", port: int = 8000, name: str | None = None,
          log_level: str = "info") -> None:
    """Serve `llm` until interrupted."""
    uvicorn.run(create_app(llm, name), host=host, port=port, log_level=log_level)


def main(args) -> int:
    """`treadle serve` (argparse namespace from __main__.py)."""
    from .runtime.llm import load

    llm = load(args.model, dtype=args.dtype, device=args.device, weight_dtype=args.weight_dtype,
               max_seq_len=args.max_seq_len, kv_cache_mb=args.kv_cache_mb, weights=args.weights)
    serve(llm, args.host, args.port, args.name)
    return 0
