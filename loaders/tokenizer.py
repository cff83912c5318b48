"""The tokenizer of an HF-layout model directory: tokenizer.json (via `tokenizers`: byte-level BPE
as in SmolLM2, Llama-3, Qwen2) or tokenizer.model (via `sentencepiece`: Llama-2, TinyLlama,
Mistral),
its special tokens, its Jinja chat template, and a streaming detokenizer.

HF spreads one tokenizer over several files; they are read here, and only here:
  tokenizer_config.json      bos/eos/unk/pad token strings, add_bos_token / add_eos_token, legacy,
                             added_tokens_decoder, chat_template
  special_tokens_map.json    the same token strings (older layout; tokenizer_config wins)
  chat_template.jinja / .json  the chat template (newer layout; wins over tokenizer_config's)
  generation_config.json, config.json  bos/eos ids when the token strings are absent, extra eos ids

Deliberate differences from `transformers` 5: decode never applies `clean_up_tokenization_spaces`
(" ." -> ".") since that rewrites what the model produced; a sentencepiece text that starts with a
space is encoded as sentencepiece encodes it (HF's converter drops the dummy "▁" then); a
sentencepiece model whose config does not say add_bos_token prepends BOS (as transformers 4 did).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path

import jinja2
import sentencepiece
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

_NAMED_TOKENS = ("bos", "eos", "unk", "pad")
_MAX_PENDING = 8  # StreamDecoder: tokens held back before it looks for a safe place to cut


class TokenizerError(ValueError):
    """A tokenizer file is missing or malformed, or the chat template failed."""


def _read_json(path: Path) -> dict:
    """The JSON object in `path`; {} when the file does not exist."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _token_str(value: object) -> str | None:
    """A token as tokenizer_config.json writes it: a string, an AddedToken object, or null."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _ids(*values: object) -> list[int]:
    """The token ids in config values (an `eos_token_id` is an int, a list of ints, or null),
    in order, without repeats."""
    flat = [v for value in values for v in (value if isinstance(value, list) else [value])]
    return list(dict.fromkeys(v for v in flat if type(v) is int and v >= 0))


class _TokenizersJson:
    """tokenizer.json through the `tokenizers` library (it splits added tokens out of the text)."""

    def __init__(self, path: Path):
        try:
            self.tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the Rust side raises a bare Exception
            raise TokenizerError(f"{path}: not a valid tokenizer.json ({e})") from None
        added = self.tok.get_added_tokens_decoder()
        self.special_ids = {i for i, t in added.items() if t.special}
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(i)

    def own_bos_eos(self) -> tuple[list[int], list[int]]:
        return [], []  # a tokenizer.json does not name them

    def default_added_ids(self) -> tuple[list[int], list[int]]:
        """The ids the file's post-processor puts before and after a text (Llama-3: its BOS)."""
        plain = self.tok.encode("a", add_special_tokens=False).ids
        full = self.tok.encode("a", add_special_tokens=True).ids
        n = len(plain)
        start = next((s for s in range(len(full) - n + 1) if full[s : s + n] == plain), 0)
        return full[:start], full[start + n :]


class _SentencePiece:
    """tokenizer.model through sentencepiece. sentencepiece knows nothing of HF's added tokens, so
    they are split out of the text here and decoded as their own text, as HF does. Control pieces
    (<s>, </s>) and <unk> count as added tokens: "<s>" in a text is the BOS id."""

    def __init__(self, path: Path, added: dict[str, int], legacy: bool):
        try:
            self.sp = sentencepiece.SentencePieceProcessor(model_proto=path.read_bytes())
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{path}: not a valid sentencepiece model ({e})") from None
        sp, n = self.sp, self.sp.get_piece_size()
        own = {sp.id_to_piece(i): i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)}
        self.added = own | added
        self.added_text = {i: t for t, i in self.added.items()}
        self.special_ids = set(own.values())
        self.vocab_size = max([n, *(i + 1 for i in self.added.values())])
        alternatives = sorted(self.added, key=len, reverse=True)  # longest match first
        self.splitter = re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")
        # legacy=False (transformers' default): text after an added token gets no dummy "▁".
        self.legacy = legacy
        self.anchor = sp.id_to_piece(sp.unk_id())
        self.anchor_ids = sp.encode(self.anchor)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for k, part in enumerate(self.splitter.split(text)):  # odd k: an added token
            if k % 2:
                ids.append(self.added[part])
            elif part:
                ids += self.sp.encode(part) if k == 0 or self.legacy else self._encode_inner(part)
        return ids

    def _encode_inner(self, text: str) -> list[int]:
        """`text` without sentencepiece's dummy prefix "▁" (encode anchor + text, drop anchor)."""
        ids = self.sp.encode(self.anchor + text)
        k = len(self.anchor_ids)
        return ids[k:] if ids[:k] == self.anchor_ids else self.sp.encode(text)

    def decode(self, ids: list[int]) -> str:
        # sentencepiece drops the leading space of what it decodes; only the text's start may.
        parts: list[str] = []
        run: list[int] = []
        for i in [*ids, None]:  # None ends the last run
            if i is not None and i not in self.added_text:
                run.append(i)
                continue
            if run:
                space = " " if parts and self.sp.id_to_piece(run[0]).startswith("▁") else ""
                parts.append(space + self.sp.decode(run))
                run = []
            if i is not None:
                parts.append(self.added_text[i])
        return "".join(parts)

    def own_bos_eos(self) -> tuple[list[int], list[int]]:
        return [self.sp.bos_id()], [self.sp.eos_id()]  # -1 where the model has none

    def default_added_ids(self) -> tuple[list[int], list[int]]:
        """Sentencepiece models prepend BOS (Llama's convention; transformers 4 did by default)."""
        return [self.sp.bos_id()], []

    def token_to_id(self, token: str) -> int | None:
        if token in self.added:
            return self.added[token]
        i = self.sp.piece_to_id(token)  # unknown pieces map to <unk>
        return i if self.sp.id_to_piece(i) == token else None

    def id_to_token(self, i: int) -> str | None:
        if i in self.added_text:
            return self.added_text[i]
        return self.sp.id_to_piece(i) if 0 <= i < self.sp.get_piece_size() else None


def _added_tokens(config: dict, config_path: Path) -> tuple[dict[str, int], set[int]]:
    """tokenizer_config.json's added_tokens_decoder: {text: id} and the ids marked special."""
    added, special = {}, set()
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        content = _token_str(entry)
        if not key.isdigit() or content is None:
            raise TokenizerError(
                f"{config_path}: added_tokens_decoder expects {{id: {{'content': ...}}}}, "
                f"found {key!r}: {entry!r}"
            )
        added[content] = int(key)
        if isinstance(entry, dict) and entry.get("special"):
            special.add(int(key))
    return added, special


def _read_chat_template(path: Path, config: dict) -> tuple[str | None, Path]:
    """The chat template and the file it came from."""
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():
        try:
            return jinja_file.read_text(encoding="utf-8"), jinja_file
        except (OSError, UnicodeDecodeError) as e:
            raise TokenizerError(f"{jinja_file}: cannot read ({e})") from None
    source = path / "chat_template.json"
    template = _read_json(source).get("chat_template")
    if template is None:
        source, template = path / "tokenizer_config.json", config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"{source}: chat_template should be a string, found {template!r:.80}")
    return template, source


def _template_env() -> ImmutableSandboxedEnvironment:
    """A Jinja environment configured as the HF ecosystem renders chat templates."""

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
        # jinja's own tojson escapes HTML characters; templates expect plain JSON.
        return json.dumps(
            value,
            ensure_ascii=ensure_ascii,
            indent=indent,
            separators=separators,
            sort_keys=sort_keys,
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class Tokenizer:
    """Text <-> token ids for one model, with its special tokens and chat template.

    Build it with `Tokenizer.from_dir(model_dir)`.
    """

    def __init__(
        self,
        backend: _TokenizersJson | _SentencePiece,
        *,
        bos_id: int | None,
        eos_ids: tuple[int, ...],
        add_bos: bool,
        add_eos: bool,
        special_ids: set[int],
        token_strings: dict[str, str],
        chat_template: str | None,
        template_file: Path,
    ):
        self._backend = backend
        self.vocab_size: int = backend.vocab_size
        self.bos_id = bos_id
        self.eos_ids = eos_ids
        self.add_bos = add_bos and bos_id is not None
        self._add_eos = add_eos and bool(eos_ids)
        self._special_ids = frozenset(special_ids)
        self._token_strings = token_strings  # {"bos_token": "<s>", ...}, given to the template
        self.chat_template = chat_template
        self._template_file = template_file
        self._template: jinja2.Template | None = None

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        path = Path(path)
        if not path.is_dir():
            raise TokenizerError(f"{path}: not a directory")
        config_path = path / "tokenizer_config.json"
        config = {**_read_json(path / "special_tokens_map.json"), **_read_json(config_path)}
        added, special_ids = _added_tokens(config, config_path)
        if (path / "tokenizer.json").is_file():
            backend: _TokenizersJson | _SentencePiece = _TokenizersJson(path / "tokenizer.json")
        elif (path / "tokenizer.model").is_file():
            legacy = bool(config.get("legacy", False))
            backend = _SentencePiece(path / "tokenizer.model", added, legacy)
        else:
            raise TokenizerError(f"{path}: found neither tokenizer.json nor tokenizer.model")

        # Named tokens: the configs' strings, else generation_config's / config.json's ids.
        strings = {f"{n}_token": _token_str(config.get(f"{n}_token")) for n in _NAMED_TOKENS}
        named = {k: backend.token_to_id(t) for k, t in strings.items() if t is not None}
        for key in ("bos_token", "eos_token"):
            if key in named and named[key] is None:
                raise TokenizerError(
                    f"{config_path}: {key} {strings[key]!r} is not in the vocabulary"
                )
        generation = _read_json(path / "generation_config.json")
        model = _read_json(path / "config.json")
        own_bos, own_eos = backend.own_bos_eos()
        bos_ids = _ids(
            named.get("bos_token"),
            generation.get("bos_token_id"),
            model.get("bos_token_id"),
            own_bos,
        )
        eos_ids = _ids(
            named.get("eos_token"), generation.get("eos_token_id"), model.get("eos_token_id")
        ) or _ids(own_eos)
        bos_id = bos_ids[0] if bos_ids else None
        for key, ids in (("bos_token", bos_ids), ("eos_token", eos_ids)):
            if strings[key] is None and ids:
                strings[key] = backend.id_to_token(ids[0])

        # (transformers 5 writes extra_special_tokens as {name: token})
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
        extra = extra.values() if isinstance(extra, dict) else extra
        extra_ids = [backend.token_to_id(_token_str(t) or "") for t in extra]
        named_ids = [*named.values(), *extra_ids]
        special_ids |= backend.special_ids | {i for i in named_ids if i is not None}

        # Whether encode() adds BOS/EOS: tokenizer_config's flags, else the format's own habit.
        before, after = backend.default_added_ids()
        add_bos, add_eos = config.get("add_bos_token"), config.get("add_eos_token")
        template, template_file = _read_chat_template(path, config)
        return cls(
            backend,
            bos_id=bos_id,
            eos_ids=tuple(eos_ids),
            add_bos=(before == [bos_id]) if add_bos is None else bool(add_bos),
            add_eos=(bool(after) and after == eos_ids[:1]) if add_eos is None else bool(add_eos),
            special_ids=special_ids,
            token_strings={k: t for k, t in strings.items() if t is not None},
            chat_template=template,
            template_file=template_file,
        )

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special tokens written in the text become their ids. With
        add_special_tokens, BOS is prepended if `add_bos` (and EOS appended if the config says
        so)."""
        ids = self._backend.encode(text)
        if add_special_tokens and self.add_bos:
            ids.insert(0, self.bos_id)
        if add_special_tokens and self._add_eos:
            ids.append(self.eos_ids[0])
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(i) for i in ids]
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        return self._backend.decode(ids)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._backend.id_to_token(i)

    def apply_chat_template(
        self, messages: list[dict[str, str]], add_generation_prompt: bool = True, **extra
    ) -> str:
        """The prompt for `messages` ([{"role": ..., "content": ...}]) in the model's chat format.

        The text holds the template's special tokens (often BOS too): encode it with
        add_special_tokens=False, as HF's apply_chat_template(tokenize=True) does. `extra`
        reaches the template as variables (e.g. tools=..., date_string=...).
        """
        if self.chat_template is None:
            raise TokenizerError(
                f"{self._template_file.parent}: the model has no chat template (none in "
                "tokenizer_config.json, chat_template.jinja or chat_template.json)"
            )
        variables = {**self._token_strings, **extra}
        try:
            if self._template is None:
                self._template = _template_env().from_string(self.chat_template)
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt, **variables
            )
        except jinja2.TemplateError as e:
            raise TokenizerError(f"chat template from {self._template_file}: {e}") from None

    def stream_decoder(self) -> StreamDecoder:
        """A fresh incremental decoder (skipping special tokens) for one generated sequence."""
        return StreamDecoder(self._backend.decode, self._special_ids)


class StreamDecoder:
    """Token ids in, final text out: push() returns only text that later tokens cannot change.

    Each push decodes a short window - the tokens of the previous emission as context, then the
    pending ones - and returns what the pending tokens add to the context's text. The context keeps
    sentencepiece's spaces right ("▁x" decoded alone loses its space). Text ending in U+FFFD is
    held back: the pending tokens may end inside a UTF-8 character (byte tokens). push()es and
    flush() concatenated equal `decode(all_ids)`.

    The window holds at most 2 * (_MAX_PENDING + 1) tokens, so a push costs O(1), unless no token
    boundary among the pending ones falls between characters (back-to-back byte-level tokens that
    each end one character and start the next); it then grows until one does.
    """

    def __init__(self, decode: Callable[[list[int]], str], special_ids: frozenset[int]):
        self._decode = decode
        self._special_ids = special_ids
        self._ids: list[int] = []  # context tokens, then pending tokens
        self._read = 0  # number of context tokens

    def push(self, token_id: int) -> str:
        token_id = int(token_id)
        if token_id in self._special_ids:  # as decode() skips them
            return ""
        self._ids.append(token_id)
        done = self._decode(self._ids[: self._read])
        text = self._decode(self._ids)
        if len(text) > len(done) and not text.endswith("\ufffd"):
            self._ids, self._read = self._ids[self._read :], len(self._ids) - self._read
            return text[len(done) :]
        if len(self._ids) - self._read > _MAX_PENDING:
            return self._cut_pending(done, text)
        return ""

    def _cut_pending(self, done: str, text: str) -> str:
        """Many tokens are pending (invalid UTF-8 keeps the text ending in U+FFFD): emit up to the
        latest token boundary where the decoding splits, text == head + tail, with at least 3
        tokens after it - an incomplete UTF-8 character spans at most 3 bytes, so none straddles
        the cut - and start the window afresh there."""
        for cut in range(len(self._ids) - 3, self._read, -1):
            head = self._decode(self._ids[:cut])
            if head.startswith(done) and text == head + self._decode(self._ids[cut:]):
                self._ids, self._read = self._ids[cut:], 0
                return head[len(done) :]
        return ""

    def flush(self) -> str:
        """The text still held back; the decoder is then empty."""
        done = self._decode(self._ids[: self._read])
        text = self._decode(self._ids)
        self._ids, self._read = [], 0
        return text[len(done) :]
