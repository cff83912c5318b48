"""`treadle serve` on a tiny random model: a live uvicorn server on 127.0.0.1, httpx as the client.
Every text is checked against what a second LLM over the same checkpoint generates alone."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
import uvicorn
from tiny_models import make_hf_model, save_hf_model
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models
from treadle.runtime.llm import LLM
from treadle.runtime.sampling import SamplingParams
from treadle.server import create_app

SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2: the tiny models' bos 1 and eos 2
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]  # every generated token decodes to ASCII
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)
GREEDY = {"temperature": 0}
TIMEOUT = 30  # seconds any one request or wait may take
CONTEXT = 2048  # long enough that a client can hang up well before its request would end


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Llama with a character-level tokenizer and a chat template."""
    vocab = {t: i for i, t in enumerate(SPECIALS + CHARS)}
    path = save_hf_model(make_hf_model("llama_gqa_tied", vocab_size=len(vocab)),
                         tmp_path_factory.mktemp("tiny_chat"))
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "max_position_embeddings": CONTEXT}))
    tok = RawTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "chat_template": CHAT_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def ref(model_dir):
    """The reference: an LLM of its own (the server's belongs to its engine thread)."""
    return LLM(model_dir)


@pytest.fixture(scope="module")
def server(model_dir):
    """(base URL, the app's EngineThread) of a live server, shut down after the module."""
    app = create_app(LLM(model_dir), name="tiny")
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a free port, held from here on: no race for it
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + TIMEOUT
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    assert httpx.get(f"{url}/health", timeout=TIMEOUT).json() == {"status": "ok"}
    yield url, app.state.engine
    srv.should_exit = True
    thread.join(TIMEOUT)
    sock.close()
    assert not thread.is_alive(), "the server did not shut down"
    assert not app.state.engine.alive(), "the engine thread outlived the server"


def post(url: str, path: str, body: dict, timeout: float = TIMEOUT) -> httpx.Response:
    return httpx.post(url + path, json=body, timeout=timeout)


def sse_events(lines) -> list[dict | str]:
    """The `data:` payloads of an event stream: JSON objects, then the final "[DONE]"."""
    events = []
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def stream(url: str, path: str, body: dict) -> list[dict | str]:
    with httpx.stream("POST", url + path, json={**body, "stream": True}, timeout=TIMEOUT) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        return sse_events(r.iter_lines())


def test_completion_is_what_generate_gives(server, ref):
    url, _ = server
    r = post(url, "/v1/completions", {"model": "tiny", "prompt": "Hello there", "max_tokens": 12,
                                     **GREEDY})
    assert r.status_code == 200
    out = r.json()
    want = ref.generate("Hello there", SamplingParams(max_new_tokens=12))
    assert out["object"] == "text_completion" and out["model"] == "tiny"
    assert out["choices"][0]["text"] == want.text
    reason = {"eos": "stop", "length": "length"}[want.finish_reason]
    assert out["choices"][0]["finish_reason"] == reason
    n = len(ref.encode("Hello there"))
    assert out["usage"] == {"prompt_tokens": n, "completion_tokens": len(want.tokens),
                            "total_tokens": n + len(want.tokens)}


def test_streamed_deltas_add_up_to_the_completion(server, ref):
    url, _ = server
    body = {"prompt": "Once upon", "max_tokens": 20, "ignore_eos": True, **GREEDY,
            "stream_options": {"include_usage": True}}
    events = stream(url, "/v1/completions", body)
    assert events[-1] == "[DONE]"
    *chunks, usage = events[:-1]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    text = "".join(c["choices"][0]["text"] for c in chunks)
    want = ref.generate("Once upon", SamplingParams(max_new_tokens=20, ignore_eos=True))
    assert text == want.text
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 20
    assert text == post(url, "/v1/completions", body).json()["choices"][0]["text"]


def test_chat_applies_the_template(server, ref):
    url, _ = server
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    body = {"messages": messages, "max_tokens": 16, "ignore_eos": True, **GREEDY}
    out = post(url, "/v1/chat/completions", body).json()
    want = ref.generate("Hi!", SamplingParams(max_new_tokens=16, ignore_eos=True), chat=True,
                        system="Be brief.")
    assert out["object"] == "chat.completion"
    assert out["choices"][0]["message"] == {"role": "assistant", "content": want.text}
    assert out["usage"]["prompt_tokens"] == len(ref.encode("Hi!", chat=True, system="Be brief."))
    events = stream(url, "/v1/chat/completions", body)
    assert events[-1] == "[DONE]"
    deltas = [e["choices"][0]["delta"] for e in events[:-1]]
    assert deltas[0]["role"] == "assistant" and deltas[-1] == {}
    assert "".join(d.get("content", "") for d in deltas) == want.text


def test_concurrent_streams_batch_and_keep_their_own_text(server, ref):
    url, engine = server
    prompts = ["The cat", "A long time ago", "Numbers: 1 2 3", "Why?"]
    body = {"max_tokens": 24, "ignore_eos": True, **GREEDY}

    async def one(client: httpx.AsyncClient, prompt: str) -> str:
        payload = {**body, "prompt": prompt, "stream": True}
        async with client.stream("POST", f"{url}/v1/completions", json=payload) as r:
            events = sse_events([line async for line in r.aiter_lines()])
        assert events[-1] == "[DONE]"
        return "".join(e["choices"][0]["text"] for e in events[:-1])

    async def all_at_once() -> list[str]:
        async with httpx.AsyncClient(timeout=TIMEOUT) as client:
            return await asyncio.gather(*(one(client, p) for p in prompts))

    engine.max_live = 0
    texts = asyncio.run(all_at_once())
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    assert texts == [ref.generate(p, params).text for p in prompts]
    assert engine.max_live > 1, "the requests ran one after another, not in one batch"


def test_a_decoding_method_by_name(server, ref):
    url, _ = server
    body = {"prompt": "abcabcabc", "max_tokens": 16, "ignore_eos": True, "method": "selfspec",
            **GREEDY}
    out = post(url, "/v1/completions", body).json()
    want = ref.generate("abcabcabc", SamplingParams(max_new_tokens=16, ignore_eos=True))
    assert out["choices"][0]["text"] == want.text  # self-speculation is lossless


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/completions", {"prompt": "hi", "temperature": -1}, "temperature"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "top_p": 0}, "top_p"),
        ("/v1/completions", {"prompt": "hi", "stop": 5}, "stop"),
        ("/v1/completions", {"prompt": "hi", "method": "magic"}, "method"),
        ("/v1/completions", {"prompt": "hi", "n": 2}, "n"),
        ("/v1/completions", {"prompt": "x" * CONTEXT}, "prompt"),
        ("/v1/completions", {"prompt": []}, "prompt"),
        ("/v1/completions", {"prompt": [1, 10**6]}, "prompt"),
        ("/v1/completions", {}, "prompt"),
        ("/v1/chat/completions", {"messages": "hi"}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, "messages"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(server, path, body, param):
    url, _ = server
    r = post(url, path, {"model": "tiny", "unknown_field": 1, **body})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert error["message"].startswith(param)


def test_a_body_that_is_no_json_object_is_a_400(server):
    url, _ = server
    r = httpx.post(f"{url}/v1/completions", content=b"{nope", timeout=TIMEOUT)
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    assert post(url, "/v1/completions", [1, 2]).status_code == 400


def wait_until_cancelled(engine, before: int) -> None:
    deadline = time.monotonic() + TIMEOUT
    while engine.cancelled == before or engine.llm.engine.live:
        assert time.monotonic() < deadline, "the abandoned request stayed in the engine"
        time.sleep(0.01)
    assert engine.cancelled == before + 1


LONG = {"prompt": "Go on", "max_tokens": CONTEXT - 8, "ignore_eos": True, **GREEDY}


def test_a_client_that_leaves_ends_its_stream(server):
    url, engine = server
    before = engine.cancelled
    with httpx.Client(timeout=TIMEOUT) as client:
        with client.stream("POST", f"{url}/v1/completions", json={**LONG, "stream": True}) as r:
            next(r.iter_lines())  # the first chunk: generation has begun; then hang up
    wait_until_cancelled(engine, before)


def test_a_client_that_leaves_ends_its_whole_request(server):
    url, engine = server
    before = engine.cancelled
    with pytest.raises(httpx.ReadTimeout):
        post(url, "/v1/completions", LONG, timeout=0.3)
    wait_until_cancelled(engine, before)


def test_models_and_health(server):
    url, _ = server
    models = httpx.get(f"{url}/v1/models", timeout=TIMEOUT).json()
    assert [m["id"] for m in models["data"]] == ["tiny"]
    assert httpx.get(f"{url}/health", timeout=TIMEOUT).status_code == 200
    r = httpx.get(f"{url}/v1/nothing", timeout=TIMEOUT)
    assert r.status_code == 404 and "error" in r.json()


def test_an_engine_failure_fails_its_requests_and_serving_goes_on(server, monkeypatch):
    url, engine = server
    step, failed = engine.llm.step, []

    def fail_once():
        if not failed:
            failed.append(True)
            raise RuntimeError("boom")
        return step()

    monkeypatch.setattr(engine.llm, "step", fail_once)
    r = post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 4, **GREEDY})
    assert r.status_code == 500 and "RuntimeError: boom" in r.json()["error"]["message"]
    assert not engine.llm.engine.live  # the failed stream left the engine
    r = post(url, "/v1/completions", {"prompt": "hi", "max_tokens": 4, **GREEDY})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
