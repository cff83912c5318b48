"""Tokenizer tests on two tiny tokenizers trained here (no hub, no network): a sentencepiece BPE
with byte fallback (Llama-2 style) and a byte-level BPE with ChatML special tokens (SmolLM2 style).
`transformers`, loading the same local directories, is the oracle; its sentencepiece conversion
needs `protobuf`, so those comparisons skip without it (raw sentencepiece is compared regardless).
"""

import io
import json
import random
import re
import shutil

import pytest
import sentencepiece
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from treadle.loaders.tokenizer import Tokenizer, TokenizerError

# Training text. What it lacks ("🦙", "ещё", "한국어") becomes byte tokens, which split characters.
WORDS = (
    "the quick brown fox jumps over a lazy dog hello world model token cat sat on mat "
    "héllo naïve café über straße 123 4567 2024 日本語 😀 ✓ don't it's (yes) [no] {x: 1}"
)
TEXTS = [
    "hello world",
    "The quick brown fox, 12345 times!",
    "café über straße naïve",
    "emoji 😀🦙 ✓ 日本語 ещё 한국어",
    "tabs\tand\nnewlines\n\n  double  spaces",
    "x",
    "",
]

LLAMA2_TEMPLATE = """\
{% if messages[0]['role'] == 'system' %}
    {% set system = messages[0]['content'] %}
    {% set messages = messages[1:] %}
{% else %}
    {% set system = false %}
{% endif %}
{% for message in messages %}
    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{ raise_exception('Conversation roles must alternate user/assistant/user/...') }}
    {% endif %}
    {% if loop.index0 == 0 and system %}
        {% set content = '<<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content'] %}
    {% else %}
        {% set content = message['content'] %}
    {% endif %}
    {% if message['role'] == 'user' %}
        {{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}
    {% else %}
        {{ ' ' + content.strip() + ' ' + eos_token }}
    {% endif %}
{% endfor %}
"""
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": "Hello. "},
    {"role": "user", "content": "Say 😀"},
]


def sentences(n: int = 300) -> list[str]:
    rng, words = random.Random(0), WORDS.split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def write_json(path, data) -> None:
    path.write_text(json.dumps(data), encoding="utf-8")


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    """tokenizer.model like Llama-2's: BPE, byte fallback, no normalization, split digits."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences()),
        model_writer=model,
        model_type="bpe",
        vocab_size=400,  # byte fallback alone takes 256 pieces
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    path = tmp_path_factory.mktemp("sp")
    (path / "tokenizer.model").write_bytes(model.getvalue())
    special = {"special": True, "lstrip": False, "rstrip": False, "normalized": False}
    write_json(
        path / "tokenizer_config.json",
        {
            "tokenizer_class": "LlamaTokenizer",
            "add_bos_token": True,
            "add_eos_token": False,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "legacy": False,
            "added_tokens_decoder": {
                str(i): {"content": t, **special} for i, t in enumerate(["<unk>", "<s>", "</s>"])
            },
            "chat_template": LLAMA2_TEMPLATE,
        },
    )
    return path


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """tokenizer.json like SmolLM2's: digits split one by one, then byte-level BPE."""
    raw = RawTokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    raw.decoder = decoders.ByteLevel()
    raw.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(sentences(), trainer)
    path = tmp_path_factory.mktemp("bpe")
    raw.save(str(path / "tokenizer.json"))
    write_json(
        path / "tokenizer_config.json",
        {
            "tokenizer_class": "GPT2Tokenizer",
            "add_prefix_space": False,
            "bos_token": "<|im_start|>",
            "eos_token": "<|im_end|>",
            "unk_token": "<|endoftext|>",
            "clean_up_tokenization_spaces": False,
            "chat_template": CHATML_TEMPLATE,
        },
    )
    write_json(path / "generation_config.json", {"bos_token_id": 1, "eos_token_id": [2, 0]})
    return path


@pytest.fixture(scope="module")
def sp_tok(sp_dir):
    return Tokenizer.from_dir(sp_dir)


@pytest.fixture(scope="module")
def bpe_tok(bpe_dir):
    return Tokenizer.from_dir(bpe_dir)


@pytest.fixture(scope="module")
def toks(sp_tok, bpe_tok):
    return {"sp": sp_tok, "bpe": bpe_tok}


def hf_tokenizer(path, kind: str):
    transformers = pytest.importorskip("transformers")
    if kind == "sp":
        pytest.importorskip("google.protobuf", reason="transformers reads tokenizer.model with it")
    return transformers.AutoTokenizer.from_pretrained(str(path))


def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte-level alphabet: printable bytes are themselves, the rest chr(256+k)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) if b in printable else chr(256 + others.index(b)) for b in range(256)}


BYTE_LEVEL = byte_level_alphabet()


def byte_token(tok: Tokenizer, b: int) -> int:
    is_sp = tok.token_to_id("<0x41>") is not None
    return tok.token_to_id(f"<0x{b:02X}>" if is_sp else BYTE_LEVEL[b])


# --- sentencepiece ---------------------------------------------------------------------------


def test_sp_properties(sp_tok):
    assert (sp_tok.vocab_size, sp_tok.bos_id, sp_tok.eos_ids, sp_tok.add_bos) == (
        400,
        1,
        (2,),
        True,
    )
    assert sp_tok.token_to_id("<s>") == 1 and sp_tok.id_to_token(2) == "</s>"
    assert sp_tok.token_to_id("no such piece") is None and sp_tok.id_to_token(10**6) is None
    assert sp_tok.chat_template == LLAMA2_TEMPLATE


@pytest.mark.parametrize("text", TEXTS)
def test_sp_matches_sentencepiece(sp_tok, sp_dir, text):
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    ids = sp_tok.encode(text)
    assert ids == [1, *sp.encode(text)]
    assert sp_tok.encode(text, add_special_tokens=False) == sp.encode(text)
    assert sp_tok.decode(ids) == sp.decode(ids) == text


def test_sp_special_tokens_in_text(sp_tok, sp_dir):
    # Text after a special token gets no dummy "▁" (legacy=False); with legacy=True it does.
    sp = sentencepiece.SentencePieceProcessor(model_file=str(sp_dir / "tokenizer.model"))
    ids = sp_tok.encode("<s>hello</s> world", add_special_tokens=False)
    assert ids[0] == 1 and ids.count(2) == 1
    assert sp_tok.decode(ids) == "hello world"
    assert sp_tok.decode(ids, skip_special_tokens=False) == "<s>hello</s> world"
    assert ids[1 : ids.index(2)] != sp.encode("hello")  # sp.encode adds the dummy prefix

    # legacy=False is also the default, as in transformers 5.
    config = json.loads((sp_dir / "tokenizer_config.json").read_text())
    del config["legacy"]
    cases = {
        "default": ({}, sp_tok.encode("<s>hello", add_special_tokens=False)),
        "legacy": ({"legacy": True}, [1, *sp.encode("hello")]),
    }
    for name, (flag, expected) in cases.items():
        shutil.copytree(sp_dir, sp_dir.parent / name)
        write_json(sp_dir.parent / name / "tokenizer_config.json", {**config, **flag})
        assert Tokenizer.from_dir(sp_dir.parent / name).encode("<s>hello", False) == expected


@pytest.mark.parametrize("text", [*TEXTS, "<s>hello</s> world", "a <unk> b </s>"])
def test_sp_matches_transformers(sp_tok, sp_dir, text):
    # (transformers' converted tokenizer drops the dummy "▁" before a text's leading space, unlike
    # sentencepiece; treadle follows sentencepiece, so no text here starts with a space.)
    hf = hf_tokenizer(sp_dir, "sp")
    ids = sp_tok.encode(text)
    assert ids == hf.encode(text)
    assert sp_tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert sp_tok.decode(ids, skip_special_tokens=False) == hf.decode(ids)


# --- tokenizer.json --------------------------------------------------------------------------


def test_bpe_properties(bpe_tok, bpe_dir):
    raw = RawTokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    assert bpe_tok.vocab_size == raw.get_vocab_size()
    assert (bpe_tok.bos_id, bpe_tok.eos_ids, bpe_tok.add_bos) == (1, (2, 0), False)
    ids = bpe_tok.encode("<|im_start|>user\nhi<|im_end|><|endoftext|>")
    assert ids[0] == 1 and ids[-2:] == [2, 0] and ids.count(1) == ids.count(2) == 1
    assert bpe_tok.decode(ids) == "user\nhi"
    assert (
        bpe_tok.decode(ids, skip_special_tokens=False)
        == "<|im_start|>user\nhi<|im_end|><|endoftext|>"
    )


@pytest.mark.parametrize("text", [*TEXTS, " leading space", "<|im_start|>user\nhi<|im_end|>"])
def test_bpe_matches_transformers(bpe_tok, bpe_dir, text):
    hf = hf_tokenizer(bpe_dir, "bpe")
    ids = bpe_tok.encode(text)
    assert ids == hf.encode(text)
    assert bpe_tok.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    assert bpe_tok.decode(ids, skip_special_tokens=False) == hf.decode(ids) == text


def test_bpe_post_processor_bos(bpe_dir, tmp_path):
    # Llama-3 style: no add_bos_token in the config; the tokenizer.json's post-processor adds BOS.
    raw = RawTokenizer.from_file(str(bpe_dir / "tokenizer.json"))
    raw.post_processor = processors.TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)]
    )
    raw.save(str(tmp_path / "tokenizer.json"))
    write_json(
        tmp_path / "tokenizer_config.json",
        {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>"},
    )
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.add_bos) == (0, True)
    assert tok.encode("hi")[0] == 0 and tok.encode("hi", add_special_tokens=False)[0] != 0
    assert tok.encode("hi") == hf_tokenizer(tmp_path, "bpe").encode("hi")


def test_ids_from_model_config(bpe_dir, tmp_path):
    # No tokenizer_config.json: bos/eos come from config.json, the template from
    # chat_template.jinja.
    shutil.copy(bpe_dir / "tokenizer.json", tmp_path)
    write_json(tmp_path / "config.json", {"bos_token_id": 1, "eos_token_id": 2})
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.bos_id, tok.eos_ids, tok.add_bos, tok.chat_template) == (1, (2,), False, None)
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}|{{ messages[0]['content'] }}")
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.apply_chat_template([{"role": "user", "content": "x"}]) == "<|im_start|>|x"


# --- chat templates --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sp", "bpe"])
@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("chat", [CHAT, CHAT[1:2], CHAT[1:]], ids=["system", "one", "no-system"])
def test_chat_template_matches_transformers(kind, toks, sp_dir, bpe_dir, generation_prompt, chat):
    hf = hf_tokenizer(sp_dir if kind == "sp" else bpe_dir, kind)
    expected = hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation_prompt)
    assert toks[kind].apply_chat_template(chat, add_generation_prompt=generation_prompt) == expected


def test_chat_template_raise_exception(sp_tok):
    with pytest.raises(TokenizerError, match="roles must alternate"):
        sp_tok.apply_chat_template([{"role": "user", "content": "a"}] * 2)


def test_chat_template_errors(bpe_dir, tmp_path):
    shutil.copy(bpe_dir / "tokenizer.json", tmp_path)
    with pytest.raises(TokenizerError, match="no chat template"):
        Tokenizer.from_dir(tmp_path).apply_chat_template(CHAT)
    (tmp_path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(TokenizerError, match="chat_template.jinja"):
        Tokenizer.from_dir(tmp_path).apply_chat_template(CHAT)
    (tmp_path / "chat_template.jinja").write_text("{{ messages.append(1) }}")  # sandboxed
    with pytest.raises(TokenizerError):
        Tokenizer.from_dir(tmp_path).apply_chat_template(CHAT)


# --- streaming -------------------------------------------------------------------------------


def stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    decoder = tok.stream_decoder()
    return [decoder.push(i) for i in ids] + [decoder.flush()]


@pytest.mark.parametrize("kind", ["sp", "bpe"])
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_stream_random_ids(kind, toks, data):
    # Random ids, stray UTF-8 bytes, and characters spelled out in byte tokens, in any order.
    tok = toks[kind]
    byte_ids = [byte_token(tok, b) for b in range(256)]
    chunk = st.one_of(
        st.integers(0, tok.vocab_size - 1).map(lambda i: [i]),
        st.integers(0x80, 0xFF).map(lambda b: [byte_ids[b]]),
        st.sampled_from("é€😀🦙").map(lambda c: [byte_ids[b] for b in c.encode()]),
    )
    ids = [i for ids in data.draw(st.lists(chunk, max_size=30)) for i in ids]
    assert "".join(stream(tok, ids)) == tok.decode(ids)


@pytest.mark.parametrize("kind", ["sp", "bpe"])
@settings(max_examples=100, deadline=None)
@given(text=st.text(st.sampled_from("ab é€😀🦙日\n"), max_size=30) | st.sampled_from(TEXTS))
def test_stream_text(kind, toks, text):
    tok = toks[kind]
    ids = tok.encode(text)
    pieces = stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


@pytest.mark.parametrize("kind", ["sp", "bpe"])
def test_stream_holds_split_character(kind, toks):
    tok = toks[kind]
    ids = [byte_token(tok, b) for b in "🦙".encode()]
    decoder = tok.stream_decoder()
    assert [decoder.push(i) for i in ids] == ["", "", "", "🦙"]
    assert decoder.flush() == ""


@pytest.mark.parametrize("kind", ["sp", "bpe"])
def test_stream_window_is_bounded(kind, toks):
    # Stray continuation bytes keep the text ending in U+FFFD; the window must not grow with them.
    tok = toks[kind]
    ids = [byte_token(tok, 0x80)] * 100 + [byte_token(tok, b) for b in "é🦙".encode()] * 20
    ids += tok.encode("a tail", add_special_tokens=False) + [byte_token(tok, 0xF0)]
    decoder = tok.stream_decoder()
    longest, decode = 0, decoder._decode

    def spy(window):
        nonlocal longest
        longest = max(longest, len(window))
        return decode(window)

    decoder._decode = spy
    text = "".join(decoder.push(i) for i in ids) + decoder.flush()
    assert text == tok.decode(ids)
    assert longest <= 18  # the previous emission's tokens (<= 9) + pending ones (<= 9)


@pytest.mark.parametrize("kind", ["sp", "bpe"])
def test_stream_cuts_between_characters(kind, toks):
    # Stray bytes keep the text ending in U+FFFD until the decoder cuts its window; the cut must not
    # fall inside a character: neither one still arriving byte by byte, nor one that a token ends
    # while starting the next (byte-level BPE: "\xa5\xe6" is the end of 日 and the start of 本).
    tok = toks[kind]
    stray = byte_token(tok, 0x80)
    chars = [[byte_token(tok, b) for b in "🦙".encode()]]
    if kind == "bpe":
        pieces = [b"\xe6\x97", b"\xa5\xe6", b"\x9c\xac\xe8"]  # 日本 + the start of 語
        chars.append([tok.token_to_id("".join(BYTE_LEVEL[b] for b in p)) for p in pieces])
        assert None not in chars[-1]
    for char in chars:
        for k in range(12):
            for j in range(6):
                ids = [stray] * k + char + [stray] * j + char
                assert "".join(stream(tok, ids)) == tok.decode(ids)


def test_stream_skips_special_tokens(bpe_tok):
    ids = bpe_tok.encode("<|im_start|>assistant\nhi 😀<|im_end|>")
    assert "".join(stream(bpe_tok, ids)) == "assistant\nhi 😀"


# --- errors ----------------------------------------------------------------------------------


def test_missing_files(tmp_path):
    with pytest.raises(TokenizerError, match="neither tokenizer.json nor tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
    with pytest.raises(TokenizerError, match="not a directory"):
        Tokenizer.from_dir(tmp_path / "absent")


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer.model"])
def test_corrupt_tokenizer_file(tmp_path, name):
    (tmp_path / name).write_bytes(bytes(range(256)) * 4)
    with pytest.raises(TokenizerError, match=name):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_config(bpe_dir, tmp_path):
    shutil.copy(bpe_dir / "tokenizer.json", tmp_path)
    (tmp_path / "tokenizer_config.json").write_text('{"bos_token": ')
    with pytest.raises(TokenizerError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)
    write_json(tmp_path / "tokenizer_config.json", {"eos_token": "<|nope|>"})
    with pytest.raises(
        TokenizerError, match=re.escape("eos_token '<|nope|>' is not in the vocabulary")
    ):
        Tokenizer.from_dir(tmp_path)
