"""The public API and CLI on the default model: errors for bad input, limits, streaming output."""

from __future__ import annotations

import os

import pytest
import treadle
from treadle.__main__ import main
from treadle.runtime.llm import LLM, PromptError

pytestmark = pytest.mark.default_model


@pytest.fixture(scope="module")
def small_context():
    from treadle.loaders.default_model import DefaultModelMissing

    try:
        return treadle.load(max_seq_len=48)
    except DefaultModelMissing as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))


def test_prompt_past_the_context_is_a_clear_error(small_context):
    with pytest.raises(PromptError, match=r"the prompt has \d+ tokens but the context holds 48"):
        small_context.generate("word " * 60)


def test_empty_prompt_is_a_clear_error(small_context):
    with pytest.raises(PromptError, match="empty"):
        small_context.generate("")
    with pytest.raises(PromptError, match="no prompt given"):
        small_context.generate([])


def test_generation_stops_when_the_context_is_full(small_context):
    ids = small_context.encode("Count from one to one hundred.", chat=True)
    out = small_context.generate(ids, treadle.SamplingParams(max_new_tokens=500, ignore_eos=True))
    assert out.finish_reason == "length"
    assert len(ids) + len(out.tokens) == 48


def test_stop_string(small_context):
    params = treadle.SamplingParams(max_new_tokens=20, stop=("Paris",))
    out = small_context.generate("What is the capital of France?", params, chat=True)
    assert (out.text, out.finish_reason) == ("The capital of France is ", "stop")


def test_cli_generate_streams_then_prints_stats(small_context, capsys):
    assert (
        main(["generate", "--chat", "--max-new-tokens", "8", "What is the capital of France?"]) == 0
    )
    out = capsys.readouterr().out
    assert out.startswith("The capital of France is Paris.")
    assert "tokens/s" in out.strip().splitlines()[-1]


def test_cli_options_before_the_prompt_and_chat_template_by_default(small_context, capsys):
    # No --chat: the default model has a chat template, so it is applied (a raw prompt to an
    # instruct model tends to get EOS at once); options may precede the prompt.
    assert main(["generate", "--max-new-tokens", "8", "What is the capital of France?"]) == 0
    assert capsys.readouterr().out.startswith("The capital of France is Paris.")
    assert main(["generate", "--raw", "--ignore-eos", "--max-new-tokens", "5", "The sky"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("[5 tokens") and "finish: length" in last


def test_cli_verbose_describes_every_fallback_and_auto_draft_says_which(small_context, capsys):
    assert main(["generate", "--verbose", "--method", "sd", "--max-new-tokens", "4", "Hi"]) == 0
    err = capsys.readouterr().err
    assert "backend torch" in err and "fallback:" in err and "attention:" in err
    assert "[draft: " in err and "auto" in err


@pytest.mark.parametrize(
    "args,message",
    [
        (["generate", "--temperature", "-1", "hi"], "SamplingParams.temperature=-1.0"),
        (["generate", "--model", "/nonexistent/dir", "hi"], "/nonexistent/dir"),
        (["convert", "/nonexistent/x.gguf", "/tmp/out"], "/nonexistent/x.gguf"),
    ],
)
def test_cli_errors_exit_2_with_a_message(args, message, capsys):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("treadle: error:") and message in err


@pytest.mark.parametrize("method", ["gsd-ngram", "selfspec"])
def test_drafting_methods_run_up_to_a_full_context(small_context, method):
    from treadle.runtime.methods import SelfSpec, Speculative

    m = Speculative.gsd(draft="ngram", budget=16) if method == "gsd-ngram" else SelfSpec(k=4)
    ids = small_context.encode("Count from one to one hundred.", chat=True)
    params = treadle.SamplingParams(max_new_tokens=500, ignore_eos=True)
    out = small_context.generate(ids, params, method=m)
    ref = small_context.generate(ids, params)
    assert out.finish_reason == "length" and out.tokens == ref.tokens


@pytest.mark.parametrize("kw", [{"dtype": "fp8"}, {"weight_dtype": "int4"}])
def test_unknown_dtype_is_a_clear_error(kw):
    name, value = next(iter(kw.items()))
    with pytest.raises(ValueError, match=rf"{name}='{value}': expected one of float32, bfloat16"):
        LLM("/nonexistent", **kw)


def test_bf16_weights_generate_from_the_cli(small_context, capsys):
    import torch

    threads = torch.get_num_threads()
    try:
        assert main(["generate", "--weight-dtype", "bfloat16", "--max-new-tokens", "6", "Hi"]) == 0
    finally:
        torch.set_num_threads(threads)  # a bf16-weight model takes torch's pool for its products
    assert "6 tokens" in capsys.readouterr().out
