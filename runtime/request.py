"""One generation request's output state: tokens, streamed text, and when it is finished.

Every decoding method pushes the tokens it produces through `Request.push`, which applies the same
end rules to all of them: EOS, max_new_tokens, and stop strings (which may span tokens, so text that
could still become a stop string is held back from the stream until it is decided).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from .sampling import SamplingParams


class StreamDecoder(Protocol):
    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    eos_ids: frozenset[int]
    decoder: StreamDecoder | None = None  # None: tokens only, no text (and no stop strings)
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # text streamed so far
    finish_reason: str | None = None  # "eos" | "stop" | "length"
    _pending: str = ""  # decoded text held back while it may start a stop string

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def push(self, token: int) -> str:
        """Append one generated token; return the text it releases to the stream."""
        if self.finished:
            raise RuntimeError("push after the request finished")
        self.tokens.append(token)
        if token in self.eos_ids and not self.params.ignore_eos:
            self.finish_reason = "eos"
        elif len(self.tokens) >= self.params.max_new_tokens:
            self.finish_reason = "length"
        if self.decoder is None:
            return ""
        self._pending += self.decoder.push(token)
        if self.finished:
            self._pending += self.decoder.flush()
        return self._release()

    def push_many(self, tokens: list[int]) -> str:
        """Append tokens until the request finishes; the rest are dropped."""
        out = []
        for t in tokens:
            if self.finished:
                break
            out.append(self.push(t))
        return "".join(out)

    def _release(self) -> str:
        stops = self.params.stop
        hits = [i for i in (self._pending.find(s) for s in stops) if i >= 0]
        if hits:
            out, self._pending = self._pending[: min(hits)], ""
            self.finish_reason = "stop"
        elif self.finished or not stops:
            out, self._pending = self._pending, ""
        else:
            # Hold back the longest tail that is a proper prefix of some stop string.
            keep = max(
                (n for s in stops for n in range(1, len(s)) if self._pending.endswith(s[:n])),
                default=0,
            )
            cut = len(self._pending) - keep
            out, self._pending = self._pending[:cut], self._pending[cut:]
        self.text += out
        return out
