"""The draft builder on tiny random targets: the training forward against treadle's forward, the
whole pipeline with injected generations, the written directory, caching and atomicity.

The real draft of the default model is never built here (that takes minutes).
"""

from __future__ import annotations

import json
import random

import pytest
import torch
from tiny_models import make_hf_model, save_hf_model
from treadle.graph.config import ModelConfig
from treadle.graph.model import Transformer
from treadle.graph.weights import ModelWeights
from treadle.loaders import draft_model
from treadle.loaders.draft_model import (
    MARKER,
    build_draft,
    find_draft,
    instruction_prompts,
    load_target,
    read_marker,
)
from treadle.loaders.gguf_import import OutputExistsError
from treadle.loaders.safetensors_weights import read_state_dict
from treadle.runtime.kv_cache import KVCache

VOCAB = 211


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A tiny random tied-embedding GQA Llama with 3 layers."""
    return save_hf_model(
        make_hf_model("llama_gqa_tied", VOCAB, num_layers=3), tmp_path_factory.mktemp("target")
    )


def treadle_logits(model_dir, tokens: torch.Tensor) -> torch.Tensor:
    cfg = ModelConfig.from_json(model_dir)
    model = Transformer(
        cfg, ModelWeights.from_state_dict(read_state_dict(model_dir, cfg), cfg), 256
    )
    cache = KVCache(cfg, rows=tokens.shape[0], capacity=64)
    return model.forward(cache.make_step(list(range(tokens.shape[0])), tokens, logits="all"), cache)


def fake_generations(n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    return [
        (
            [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 9))],
            [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 14))],
        )
        for _ in range(n)
    ]


@pytest.mark.parametrize("name", ["llama_gqa_tied", "llama_odd_untied", "qwen2_bias"])
def test_training_forward_matches_treadle(name, tmp_path):
    path = save_hf_model(make_hf_model(name, VOCAB), tmp_path / name)
    tokens = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = load_target(path)(tokens)
    torch.testing.assert_close(ours, treadle_logits(path, tokens), atol=1e-4, rtol=1e-4)


def test_kept_layers_forward_equals_treadle_with_those_layers(target):
    cfg = ModelConfig.from_json(target)
    model = Transformer(cfg, ModelWeights.from_state_dict(read_state_dict(target, cfg), cfg), 256)
    tokens = torch.randint(0, VOCAB, (1, 17), generator=torch.Generator().manual_seed(2))
    cache = KVCache(cfg, rows=1, capacity=64)
    ref = model.forward(cache.make_step([0], tokens, logits="all"), cache, layers=[0, 2])
    with torch.no_grad():
        ours = load_target(target, layers=[0, 2])(tokens)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_build_pipeline_end_to_end(target, tmp_path):
    out = tmp_path / "draft"
    gens = fake_generations(24)
    path = build_draft(
        out,
        target_dir=target,
        layers=(0, 2),
        generations=gens,
        epochs=2,
        lr=1e-3,
        batch_tokens=64,
        kl_weight=1.0,
        kl_topk=8,
        progress=False,
    )
    assert path == out and find_draft(out) == out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["draft"]  # no temp dirs left

    cfg, tcfg = ModelConfig.from_json(out), ModelConfig.from_json(target)
    assert cfg.vocab_size == tcfg.vocab_size and cfg.num_layers == 2
    assert cfg.tie_word_embeddings
    state, tstate = read_state_dict(out, cfg), read_state_dict(target, tcfg)
    # the embedding (= tied LM head) is the target's, exactly; the kept layers trained
    assert torch.equal(state["model.embed_tokens.weight"], tstate["model.embed_tokens.weight"])
    assert not torch.equal(
        state["model.layers.1.mlp.down_proj.weight"], tstate["model.layers.2.mlp.down_proj.weight"]
    )

    # what treadle loads is what was trained and evaluated
    tokens = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = load_target(out)(tokens)
    torch.testing.assert_close(ours, treadle_logits(out, tokens), atol=1e-4, rtol=1e-4)

    info = json.loads((out / MARKER).read_text())
    assert info["recipe"]["layers"] == [0, 2] and info["recipe"]["prompts"] == "given"
    assert info["recipe"]["target"] == str(target.resolve())
    assert info["data"]["examples_train"] + info["data"]["examples_heldout"] == 24
    assert info["data"]["answer_tokens_train"] + info["data"]["answer_tokens_heldout"] == sum(
        len(g) for _, g in gens
    )
    for key in ("torch_version", "wall_time_s", "timings_s", "train_loss_per_epoch"):
        assert key in info
    assert len(info["train_loss_per_epoch"]) == 2
    agree = info["agreement_heldout"]
    assert 0.0 <= agree["agreement"] <= 1.0 and agree["positions"] > 0
    assert set(agree["tokens_per_chain_round"]) == {"1", "2", "3", "4", "6", "8"}
    # the n-gram table, counted over the training examples only
    table, order = draft_model.read_ngram_table(out, VOCAB)
    assert order == 3 and info["ngram_table"]["contexts"] == len(table) > 0


def test_training_raises_agreement_on_training_data(target):
    """A sanity check of the training loop: on the teacher's own greedy answers, the student learns
    to agree with it."""
    teacher = load_target(target).eval()
    gens = []
    with torch.no_grad():
        for p, _ in fake_generations(12, seed=5):
            seq = list(p)
            for _ in range(12):
                seq.append(int(teacher(torch.tensor([seq]))[0, -1].argmax()))
            gens.append((p, seq[len(p) :]))
    soft = draft_model._teacher_pass(teacher, gens, 256, 16, False, "")
    arg = [s[0] for s in soft]
    assert all(a.tolist() == g for a, (_, g) in zip(arg, gens))  # greedy answers: argmax = label
    student = load_target(target, layers=[0])
    before = draft_model.agreement(student, gens, arg)
    draft_model.train_student(
        student,
        gens,
        epochs=30,
        lr=3e-3,
        batch_tokens=256,
        soft=soft,
        kl_weight=1.0,
        progress=False,
    )
    after = draft_model.agreement(student, gens, arg)
    assert after["agreement"] > before["agreement"] + 0.2
    rounds = after["tokens_per_chain_round"]
    assert 1.0 <= rounds["1"] <= 2.0 and rounds["1"] <= rounds["4"] <= rounds["8"] <= 9.0


def test_cached_and_recipe_mismatch(target, tmp_path, monkeypatch):
    out = tmp_path / "draft"
    gens = fake_generations(6)
    kw = dict(
        target_dir=target, layers=(1,), generations=gens, epochs=1, batch_tokens=64, progress=False
    )
    build_draft(out, **kw)
    stamp = (out / MARKER).stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("should not train again")

    monkeypatch.setattr(draft_model, "train_student", boom)
    assert build_draft(out, **kw) == out  # same recipe: kept
    assert (out / MARKER).stat().st_mtime_ns == stamp
    with pytest.raises(OutputExistsError):
        build_draft(out, **{**kw, "epochs": 2})


def test_failure_leaves_nothing(target, tmp_path, monkeypatch):
    out = tmp_path / "draft"

    def fail(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(draft_model, "_write_json", fail)  # fails inside the temp dir
    with pytest.raises(RuntimeError, match="disk full"):
        build_draft(
            out,
            target_dir=target,
            layers=(0,),
            generations=fake_generations(4),
            epochs=1,
            progress=False,
        )
    assert list(tmp_path.iterdir()) == []
    assert find_draft(out) is None


def test_bad_inputs(target, tmp_path):
    with pytest.raises(ValueError, match="layers"):
        build_draft(
            tmp_path / "d", target_dir=target, layers=(2, 0), generations=[], progress=False
        )
    with pytest.raises(ValueError, match="out of range"):
        build_draft(
            tmp_path / "d",
            target_dir=target,
            layers=(0,),
            generations=[([1, 2], [VOCAB + 5])],
            progress=False,
        )
    assert list(tmp_path.iterdir()) == []


def test_injected_generator_gets_prompts(target, tmp_path):
    calls = []

    def gen(target_dir, prompts, *, max_new_tokens, temperature, seed, batch, device, progress):
        calls.append((len(prompts), temperature, max_new_tokens))
        return [([5, 6, 7], [8 + i % 50, 9]) for i in range(len(prompts))]

    out = build_draft(
        tmp_path / "d",
        target_dir=target,
        layers=(0,),
        n_prompts=20,
        max_new_tokens=7,
        sampled_fraction=0.25,
        generate_fn=gen,
        epochs=1,
        progress=False,
    )
    assert calls == [(15, 0.0, 7), (5, 0.7, 7)]
    info = read_marker(out)
    assert info["data"]["greedy_examples"] == 15 and info["data"]["sampled_examples"] == 5
    assert info["recipe"]["prompts"]["n_prompts"] == 20


def test_instruction_prompts(tmp_path):
    a = instruction_prompts(300, seed=0)
    assert len(set(a)) == 300 and a == instruction_prompts(300, seed=0)
    assert a != instruction_prompts(300, seed=1)
    csv = tmp_path / "q.csv"
    csv.write_text('request\n"How do magnets work, really?"\nWhat is love?\n')
    b = instruction_prompts(1000, seed=0, extra_prompts_csv=csv)
    assert "What is love?" in b and "How do magnets work, really?" in b
    with pytest.raises(ValueError):
        instruction_prompts(10**6)
    # the styled prompts only extend the plain set: a small n gets the same prompts either way
    big = instruction_prompts(5000, seed=0)
    assert len(set(big)) == 5000 and any(p.endswith("Keep it brief.") for p in big)
    n_plain = len(draft_model.TEMPLATES) * len(draft_model.TOPICS)
    assert not any(p.endswith(draft_model.STYLES) for p in instruction_prompts(n_plain))


def test_find_draft_and_info(tmp_path, capsys):
    assert find_draft(tmp_path) is None
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / MARKER).write_text(json.dumps({"format": draft_model.DRAFT_FORMAT, "x": 1}))
    assert find_draft(tmp_path) == tmp_path
    assert draft_model.main(["info", "--path", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["x"] == 1
    assert draft_model.main(["info", "--path", str(tmp_path / "nope")]) == 1


def test_generated_answers_are_cached(target, tmp_path, monkeypatch):
    calls = []

    def gen(target_dir, prompts, *, max_new_tokens, temperature, seed, batch, device, progress):
        calls.append(temperature)
        return [([5, 6, 7], [8 + i % 50, 9]) for i in range(len(prompts))]

    monkeypatch.setattr(draft_model, "generate_answers", gen)
    kw = dict(
        target_dir=target,
        layers=(0,),
        n_prompts=12,
        max_new_tokens=5,
        epochs=1,
        data_cache=tmp_path / "dc",
        progress=False,
    )
    build_draft(tmp_path / "a", **kw)
    assert calls == [0.0, 0.7] and len(list((tmp_path / "dc").glob("answers-*.pt"))) == 1
    build_draft(tmp_path / "a", **{**kw, "epochs": 2}, overwrite=True)  # other training: reused
    assert calls == [0.0, 0.7]
    info = read_marker(tmp_path / "a")
    assert info["recipe"]["epochs"] == 2 and "generate_s_cached_run" in info["timings_s"]
    build_draft(tmp_path / "b", **{**kw, "seed": 1})  # other data: generated again
    assert calls == [0.0, 0.7, 0.0, 0.7]


def test_ngram_table_counts_and_round_trips(tmp_path):
    seqs = [[1, 2, 3, 4], [1, 2, 3, 5], [9, 2, 3, 4], [7, 7]]
    table = draft_model.count_next_tokens(seqs, order=2, min_count=2)
    assert table[(2, 3)] == [4, 5]  # 4 seen twice, 5 once; most frequent first
    assert table[(3,)] == [4, 5] and table[(2,)] == [3]
    assert (7,) not in table and (1, 2) in table and (9, 2) not in table  # seen once
    path = tmp_path / draft_model.NGRAM_FILE
    draft_model.write_ngram_table(table, path, vocab_size=10, order=2)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left
    assert draft_model.read_ngram_table(tmp_path, 10) == (table, 2)


def test_ngram_table_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no n-gram table"):
        draft_model.read_ngram_table(tmp_path, 10)
    draft_model.write_ngram_table({(1, 2): [3]}, tmp_path / draft_model.NGRAM_FILE, 10)
    with pytest.raises(ValueError, match="vocabulary of 10 tokens, but the target has 12"):
        draft_model.read_ngram_table(tmp_path, 12)
    (tmp_path / draft_model.NGRAM_FILE).write_text('{"order": 3, "next_tok')  # truncated
    with pytest.raises(ValueError, match="not a treadle n-gram table"):
        draft_model.read_ngram_table(tmp_path, 10)
    draft_model.write_ngram_table({(1, 2): [30]}, tmp_path / draft_model.NGRAM_FILE, 10)
    with pytest.raises(ValueError, match="token id 30 out of range"):
        draft_model.read_ngram_table(tmp_path, 10)
