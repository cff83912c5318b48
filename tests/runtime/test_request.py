"""End rules shared by every method: EOS, max tokens, stop strings across tokens, streaming."""

from __future__ import annotations

from treadle.runtime.request import Request
from treadle.runtime.sampling import SamplingParams


class CharDecoder:
    """A stand-in detokenizer: token id i decodes to VOCAB[i]."""

    VOCAB = ["a", "b", "S", "T", "O", "P", "<eos>", " "]

    def __init__(self):
        self.flushed = False

    def push(self, token_id):
        return "" if token_id == 6 else self.VOCAB[token_id]

    def flush(self):
        self.flushed = True
        return ""


def run(tokens, **params):
    req = Request([0], SamplingParams(**params), frozenset({6}), CharDecoder())
    pieces = []
    for t in tokens:
        if req.finished:
            break
        pieces.append(req.push(t))
    return req, "".join(pieces)


def test_eos_ends_and_flushes():
    req, text = run([0, 1, 6, 0])
    assert (req.finish_reason, req.tokens, text) == ("eos", [0, 1, 6], "ab")
    assert req.decoder.flushed


def test_ignore_eos_and_max_tokens():
    req, text = run([0, 6, 1, 1, 1], ignore_eos=True, max_new_tokens=3)
    assert (req.finish_reason, req.tokens, text) == ("length", [0, 6, 1], "ab")


def test_stop_string_across_tokens_is_cut_and_never_streamed():
    req, text = run([0, 2, 3, 4, 5, 1, 1], stop=("STOP",))
    assert req.finish_reason == "stop"
    assert text == req.text == "a"
    assert req.tokens == [0, 2, 3, 4, 5]


def test_partial_stop_prefix_is_released_when_it_does_not_complete():
    req, text = run([0, 2, 3, 1, 6], stop=("STOP",))
    assert (req.finish_reason, text) == ("eos", "aSTb")


def test_push_many_drops_tokens_after_the_end():
    req = Request([0], SamplingParams(max_new_tokens=2), frozenset({6}), CharDecoder())
    assert req.push_many([0, 1, 0, 0]) == "ab" and req.tokens == [0, 1]
