"""The draft distillation (train/draft.py) on tiny random targets: the whole pipeline with injected
generations, the written directory and what treadle loads from it, the training loop, caching and
atomicity, and the CLI.

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
from treadle.loaders.draft_model import MARKER, find_draft, read_marker, read_ngram_table
from treadle.loaders.gguf_import import OutputExistsError
from treadle.loaders.safetensors_weights import read_state_dict
from treadle.runtime.kv_cache import KVCache
from treadle.train import draft
from treadle.train.draft import build_draft, hidden, load_target, student_of

VOCAB = 211


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A tiny random tied-embedding GQA Llama with 3 layers."""
    return save_hf_model(
        make_hf_model("llama_gqa_tied", VOCAB, num_layers=3), tmp_path_factory.mktemp("target")
    )


def treadle_logits(model_dir, tokens: torch.Tensor, layers=None) -> torch.Tensor:
    """The inference forward (KV cache, the CPU's numpy products)."""
    cfg = ModelConfig.from_json(model_dir)
    model = Transformer(
        cfg, ModelWeights.from_state_dict(read_state_dict(model_dir, cfg), cfg), 256
    )
    cache = KVCache(cfg, rows=tokens.shape[0], capacity=64)
    step = cache.make_step(list(range(tokens.shape[0])), tokens, logits="all")
    return model.forward(step, cache, layers)


def fake_generations(n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    return [
        (
            [rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 9))],
            [rng.randrange(3, VOCAB) for _ in range(rng.randint(1, 14))],
        )
        for _ in range(n)
    ]


def test_student_is_the_target_with_fewer_layers(target):
    tokens = torch.randint(0, VOCAB, (2, 17), generator=torch.Generator().manual_seed(2))
    student = student_of(target, [0, 2])
    with torch.no_grad():
        ours = student.logits(hidden(student, tokens))
        full = load_target(target)
        torch.testing.assert_close(
            full.logits(hidden(full, tokens)), treadle_logits(target, tokens)
        )
    torch.testing.assert_close(ours, treadle_logits(target, tokens, layers=[0, 2]))
    # each kept layer's two norms and four (fused) matrices, and the final norm
    assert len(draft.trainable_parameters(student.weights)) == 2 * 6 + 1
    assert not student.weights.embed.requires_grad  # the (tied) embedding stays the target's


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
        reloaded = load_target(out)
        ours = reloaded.logits(hidden(reloaded, tokens))
    torch.testing.assert_close(ours, treadle_logits(out, tokens), atol=1e-5, rtol=1e-5)

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
    table, order = read_ngram_table(out, VOCAB)
    assert order == 3 and info["ngram_table"]["contexts"] == len(table) > 0


def test_training_raises_agreement_on_training_data(target):
    """A sanity check of the training loop: on the teacher's own greedy answers, the student learns
    to agree with it."""
    teacher = load_target(target)
    gens = []
    with torch.no_grad():
        for p, _ in fake_generations(12, seed=5):
            seq = list(p)
            for _ in range(12):
                seq.append(
                    int(teacher.logits(hidden(teacher, torch.tensor([seq])))[0, -1].argmax())
                )
            gens.append((p, seq[len(p) :]))
    soft = draft._teacher_pass(teacher, gens, 256, 16, False, "")
    arg = [s[0] for s in soft]
    assert all(a.tolist() == g for a, (_, g) in zip(arg, gens))  # greedy answers: argmax = label
    student = student_of(target, [0])
    before = draft.agreement(student, gens, arg)
    losses = draft.train_student(
        student,
        gens,
        epochs=30,
        lr=3e-3,
        batch_tokens=256,
        soft=soft,
        kl_weight=1.0,
        progress=False,
    )
    assert losses[-1] < losses[0]
    after = draft.agreement(student, gens, arg)
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

    monkeypatch.setattr(draft, "train_student", boom)
    assert build_draft(out, **kw) == out  # same recipe: kept
    assert (out / MARKER).stat().st_mtime_ns == stamp
    with pytest.raises(OutputExistsError):
        build_draft(out, **{**kw, "epochs": 2})


def test_failure_leaves_nothing(target, tmp_path, monkeypatch):
    out = tmp_path / "draft"

    def fail(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(draft, "_write_json", fail)  # fails inside the temp dir
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


def test_data_comes_from_the_pipeline_and_is_reused(target, tmp_path):
    calls = []

    def gen(prompts, *, max_new_tokens, temperature, seed):
        calls.append((len(prompts), temperature, max_new_tokens))
        return [([5, 6, 7], [8 + i % 50, 9]) for i in range(len(prompts))]

    kw = dict(
        target_dir=target,
        layers=(0,),
        n_prompts=20,
        max_new_tokens=7,
        sampled_fraction=0.25,
        generate_fn=gen,
        data_cache=tmp_path / "dc",
        epochs=1,
        progress=False,
    )
    out = build_draft(tmp_path / "d", **kw)
    assert calls == [(15, 0.0, 7), (5, 0.7, 7)]
    info = read_marker(out)
    assert info["data"]["greedy_examples"] == 15 and info["data"]["sampled_examples"] == 5
    assert info["recipe"]["prompts"]["n_prompts"] == 20
    build_draft(tmp_path / "d", **{**kw, "epochs": 2}, overwrite=True)  # other training: reused
    assert len(calls) == 2
    info = read_marker(out)
    assert info["recipe"]["epochs"] == 2 and "generate_s_cached_run" in info["timings_s"]
    build_draft(tmp_path / "e", **{**kw, "seed": 1})  # other data: generated again
    assert len(calls) == 4


def test_info_cli(tmp_path, capsys):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / MARKER).write_text(json.dumps({"format": 1, "x": 1}))
    assert draft.main(["info", "--path", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out)["x"] == 1
    assert draft.main(["info", "--path", str(tmp_path / "nope")]) == 1
    assert "no finished draft" in capsys.readouterr().err


def test_treadle_cli_dispatches_draft_and_train_draft(tmp_path, capsys):
    from treadle.__main__ import main

    (tmp_path / "config.json").write_text("{}")
    (tmp_path / MARKER).write_text(json.dumps({"format": 1, "y": 2}))
    for argv in (
        ["draft", "info", "--path", str(tmp_path)],
        ["train", "draft", "info", "--path", str(tmp_path)],
    ):
        assert main(argv) == 0
        assert json.loads(capsys.readouterr().out)["y"] == 2
