"""LLM-to-SLM on tiny random models, with `transformers` as the oracle: the projected large-model
states enter exactly the prompt positions and only at the prefill; the large model's K/V does not
outlive its prefill; batched, sampled and streamed generation agree; projected K/V never enter the
prefix cache; the stored projector round-trips and a mismatched pair is refused, naming what."""

from __future__ import annotations

import gc
import json
import weakref

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import make_hf_model, save_hf_model
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models
from treadle.loaders.projector import (
    MARKER,
    WEIGHTS,
    ProjectorError,
    ProjectorInfo,
    model_fingerprint,
    read_projector,
    vocab_fingerprint,
)
from treadle.runtime import llm2slm
from treadle.runtime.engine import Stream
from treadle.runtime.llm import LLM
from treadle.runtime.llm2slm import LLM2SLM, PairMismatchError, Projector, layer_states, vocabulary
from treadle.runtime.request import Request
from treadle.runtime.sampling import SamplingParams
from treadle.runtime.stats import DecodeStats

SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2: the tiny models' bos 1 and eos 2
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)
LAYER = 1  # of the large model's 3: an intermediate layer, so only layers 0..1 run
GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)


def char_tokenizer(path, chars=CHARS):
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tok = RawTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "chat_template": CHAT_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def tiny_dir(path, name: str, layers: int, seed: int, chars=CHARS):
    """(HF model, directory) of a tiny random model with the character-level tokenizer."""
    model = make_hf_model(name, vocab_size=len(SPECIALS) + len(CHARS), seed=seed,
                          num_layers=layers)
    return model, char_tokenizer(save_hf_model(model, path), chars)


def write_projector(path, projector: Projector, large_dir, small_dir, layer: int) -> None:
    """A projector directory in loaders/projector.py's format (what train/llm2slm.py writes)."""
    path.mkdir()
    save_file({k: v.contiguous() for k, v in projector.state_dict().items()}, str(path / WEIGHTS))
    tok = LLM(large_dir).tokenizer
    info = ProjectorInfo(str(large_dir), model_fingerprint(large_dir), layer, str(small_dir),
                         model_fingerprint(small_dir), projector.inp.in_features,
                         projector.inp.out_features, vocab_fingerprint(vocabulary(tok)))
    (path / MARKER).write_text(json.dumps(info.to_json()))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(large LLM, HF large, HF small, projector dir, random projector): width 64 -> 72."""
    root = tmp_path_factory.mktemp("llm2slm")
    hf_large, large_dir = tiny_dir(root / "large", "llama_gqa_tied", 3, seed=0)
    hf_small, small_dir = tiny_dir(root / "small", "llama_odd_untied", 2, seed=1)
    torch.manual_seed(5)
    projector = Projector(64, 72)
    with torch.no_grad():  # a fresh projector adds nothing: give it an output to see
        projector.out.weight.normal_(0, 0.3)
        projector.out.bias.normal_(0, 0.3)
    write_projector(root / "proj", projector, large_dir, small_dir, LAYER)
    return LLM(large_dir), hf_large, hf_small, root / "proj", projector


def oracle_embeds(hf_large, projector, ids: list[int]) -> torch.Tensor:
    """[T, d_small]: transformers' residual stream after layer LAYER, the large model's final
    RMSNorm, then the projector."""
    with torch.no_grad():
        h = hf_large(torch.tensor([ids]), output_hidden_states=True).hidden_states[LAYER + 1][0]
        normed = hf_large.model.norm(h)
        return projector(normed)


def oracle_logits(hf_small, ids: list[int], embeds: torch.Tensor, prompt_len: int,
                  everywhere: bool = False) -> torch.Tensor:
    """[T, V] the small model over `ids` with `embeds` added at the first prompt_len positions
    (everywhere=True: at every position, the projection repeated as if decode steps added it)."""
    with torch.no_grad():
        x = hf_small.model.embed_tokens(torch.tensor([ids]))[0].clone()
        x[:prompt_len] += embeds
        if everywhere:
            x[prompt_len:] += embeds[-1]
        return hf_small(inputs_embeds=x[None]).logits[0]


def test_layer_states_are_the_normed_residual_stream_of_that_layer(pair):
    large, hf_large, *_ = pair
    prompts = [[1, 40, 41, 42, 43, 44], [1, 50, 51]]
    states = layer_states(large.model, prompts, [0, LAYER, 2])  # ragged, batched
    for ids, s in zip(prompts, states):
        assert s.shape == (3, len(ids), 64)
        with torch.no_grad():
            hs = hf_large(torch.tensor([ids]), output_hidden_states=True).hidden_states
        for n, layer in enumerate((0, LAYER)):
            torch.testing.assert_close(s[n], hf_large.model.norm(hs[layer + 1][0]),
                                       atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(s[2], hs[-1][0], atol=1e-5, rtol=1e-5)  # HF's last: normed


def test_projection_enters_exactly_the_prompt_positions_and_only_at_prefill(pair):
    large, hf_large, hf_small, proj_dir, projector = pair
    p = large.llm2slm(LLM2SLM(projector=str(proj_dir)))
    prompts = ["the quick brown fox", "hi"]  # batched, ragged
    seen = [[] for _ in prompts]

    def recorder(b):
        def process(context, logits):
            seen[b].append(logits.clone())
            return logits
        return process

    streams = [p.submit(q, GREEDY, processor=recorder(b)) for b, q in enumerate(prompts)]
    for _ in p.small.engine.run(streams):
        pass
    for b, s in enumerate(streams):
        prompt, gen = s.request.prompt, s.request.tokens
        assert len(gen) == GREEDY.max_new_tokens
        e = oracle_embeds(hf_large, projector, prompt)
        ids = prompt + gen[:-1]
        ref = oracle_logits(hf_small, ids, e, len(prompt))[len(prompt) - 1:]  # predicts gen
        got = torch.stack(seen[b])
        torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)
        # Not vacuous: without the projection, or with it added at decode steps too, the logits
        # differ; the tokens are the oracle's argmax.
        plain = oracle_logits(hf_small, ids, torch.zeros_like(e), len(prompt))[len(prompt) - 1:]
        assert (plain - ref).abs().max() > 1e-2
        again = oracle_logits(hf_small, ids, e, len(prompt), everywhere=True)[len(prompt) - 1:]
        assert (again[1:] - ref[1:]).abs().max() > 1e-2
        assert gen == ref.argmax(-1).tolist()


def test_the_large_models_kv_does_not_outlive_its_prefill(pair, monkeypatch):
    large, _, _, proj_dir, _ = pair
    made = []

    class Recorded(llm2slm.KVCache):
        def __init__(self, cfg, *a, **k):
            super().__init__(cfg, *a, **k)
            made.append((weakref.ref(self), cfg.num_layers))

    monkeypatch.setattr(llm2slm, "KVCache", Recorded)
    rows, capacity = large.worker.cache.rows, large.worker.cache.capacity
    out = large.generate(["abc", "de fgh"], GREEDY, method=LLM2SLM(projector=str(proj_dir)))
    assert all(len(c.tokens) == GREEDY.max_new_tokens for c in out)
    gc.collect()
    assert [n for _, n in made] == [LAYER + 1]  # one scratch cache, of the layers run
    assert made[0][0]() is None  # freed once the prefill returned
    cache = large.worker.cache  # the large model's own cache was never touched
    assert (cache.rows, cache.capacity, cache.in_use()) == (rows, capacity, 0)
    assert large.worker.prefixes.entries == []


def test_batched_sampled_and_streamed_agree(pair):
    large, _, _, proj_dir, _ = pair
    method = LLM2SLM(projector=str(proj_dir))
    prompts = ["one two three", "x", "a longer prompt here"]
    batch = large.generate(prompts, GREEDY, method=method)
    for q, c in zip(prompts, batch):
        assert large.generate(q, GREEDY, method=method).tokens == c.tokens
    assert "".join(large.stream(prompts[0], GREEDY, method=method)) == batch[0].text
    assert large.last_completion.tokens == batch[0].tokens
    assert large.last_completion.stats.method == "llm2slm"
    sampled = SamplingParams(max_new_tokens=8, temperature=0.9, seed=3, ignore_eos=True)
    a = large.generate(prompts, sampled, method=method)
    b = large.generate(prompts, sampled, method=method)
    assert [c.tokens for c in a] == [c.tokens for c in b]
    assert [c.tokens for c in a] != [c.tokens for c in batch]


def test_projected_kv_never_enters_the_prefix_cache(pair):
    large, _, _, proj_dir, _ = pair
    p = large.llm2slm(LLM2SLM(projector=str(proj_dir)))
    prompt = "a prompt long enough to be cached, twice over"
    plain = p.small.generate(prompt, GREEDY).tokens  # the small model alone, kept as a prefix
    entries = len(p.small.worker.prefixes.entries)
    projected = p.generate(prompt, GREEDY)
    assert projected.stats.reused_tokens == 0  # the plain prefix was not matched
    assert len(p.small.worker.prefixes.entries) == entries  # and nothing projected was kept
    assert projected.tokens != plain
    again = p.small.generate(prompt, GREEDY)
    assert again.tokens == plain and again.stats.reused_tokens > 0


def test_prompt_embeds_of_the_wrong_shape_are_refused(pair):
    large, *_ = pair
    req = Request([1, 40, 41], GREEDY, large.eos_ids)
    with pytest.raises(ValueError, match=r"prompt_embeds has shape \(2, 64\), expected"):
        large.engine.add(Stream(req, None, [1, 40, 41], None, DecodeStats("ar"),
                                prompt_embeds=torch.zeros(2, 64)))


def test_the_stored_projector_round_trips(pair):
    _, _, _, proj_dir, projector = pair
    info, state = read_projector(proj_dir)
    assert (info.d_large, info.d_small, info.layer) == (64, 72, LAYER)
    for k, v in projector.state_dict().items():
        assert torch.equal(state[k], v)
    (proj_dir / "broken").mkdir()
    (proj_dir / "broken" / MARKER).write_text(json.dumps({**info.to_json(), "layer": "one"}))
    with pytest.raises(ProjectorError, match="field 'layer' should be a int"):
        read_projector(proj_dir / "broken")


def test_a_mismatched_pair_is_refused_naming_what(pair, tmp_path):
    large, _, _, proj_dir, projector = pair
    info = json.loads((proj_dir / MARKER).read_text())
    small_dir = info["small_dir"]
    # another large model: same shapes, other weights
    _, other_large = tiny_dir(tmp_path / "large2", "llama_gqa_tied", 3, seed=7)
    with pytest.raises(PairMismatchError, match="trained on another large model"):
        LLM(other_large).generate("hi", GREEDY, method=LLM2SLM(projector=str(proj_dir)))
    # another tokenizer: two characters swapped
    _, swapped = tiny_dir(tmp_path / "swapped", "llama_odd_untied", 2, seed=1,
                          chars=[CHARS[1], CHARS[0]] + CHARS[2:])
    with pytest.raises(PairMismatchError, match=r"another tokenizer: token id 3 is '!' there"):
        large.generate("hi", GREEDY, method=LLM2SLM(projector=str(proj_dir), small=str(swapped)))
    # another width than the projector writes
    _, narrow = tiny_dir(tmp_path / "narrow", "llama_gqa_tied", 1, seed=2)
    with pytest.raises(PairMismatchError, match="states of width 72 .* hidden_size 64"):
        large.generate("hi", GREEDY, method=LLM2SLM(projector=str(proj_dir), small=str(narrow)))
    # another small model of the same width
    _, other_small = tiny_dir(tmp_path / "small2", "llama_odd_untied", 2, seed=9)
    with pytest.raises(PairMismatchError, match="trained with another small model"):
        large.generate("hi", GREEDY,
                       method=LLM2SLM(projector=str(proj_dir), small=str(other_small)))
    # the one it was trained with is accepted when named explicitly
    out = large.generate("hi", GREEDY, method=LLM2SLM(projector=str(proj_dir), small=small_dir))
    assert len(out.tokens) == GREEDY.max_new_tokens


def test_a_missing_projector_says_how_to_make_it(pair, tmp_path, monkeypatch):
    large, *_ = pair
    monkeypatch.setenv("TREADLE_CACHE", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="treadle train llm2slm --tune-small"):
        large.generate("hi", GREEDY, method=LLM2SLM(projector="tuned"))
    with pytest.raises(FileNotFoundError, match="not a finished LLM-to-SLM projector"):
        large.generate("hi", GREEDY, method=LLM2SLM(projector=str(tmp_path)))


def test_cli_generates_with_llm2slm(pair, capsys):
    from treadle.__main__ import main

    large, _, _, proj_dir, _ = pair
    rc = main(["generate", "hello", "--model", str(large.model_dir), "--method", "llm2slm",
               "--projector", str(proj_dir), "--max-new-tokens", "5", "--ignore-eos"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "[5 tokens" in out and "llm2slm: 5 tokens" in out


def test_the_small_model_is_stored_as_the_large_one(pair):
    """Both read comparable bytes per token: an int8 large model gets an int8 small model."""
    from treadle.graph.weights import WeightFormat

    large, _, _, proj_dir, _ = pair
    int8 = LLM(large.model_dir, weights="int8")
    p = int8.llm2slm(LLM2SLM(projector=str(proj_dir)))
    assert set(p.small.model.weights.formats()) == {WeightFormat.INT8}
    p32 = int8.llm2slm(LLM2SLM(projector=str(proj_dir), small_weights="float32"))
    assert set(p32.small.model.weights.formats()) == {WeightFormat.FLOAT32}
