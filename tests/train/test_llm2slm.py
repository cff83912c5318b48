"""LLM-to-SLM training (train/llm2slm.py) on a tiny random pair: a few steps of the projector lower
the small model's held-out loss against a zero projector, the build writes a projector that
generation reads (and a tuned small model with --tune-small), a killed run resumes to the same
weights, a finished build is kept, a mismatched pair is refused, and the layer study and the CLI
run.

The real projector of the default model is never trained here (that takes minutes)."""

from __future__ import annotations

import json
import random

import pytest
import torch
from tiny_models import make_hf_model, save_hf_model
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models
from treadle.loaders.gguf_import import OutputExistsError
from treadle.loaders.projector import (
    MARKER,
    TUNED_SMALL,
    find_projector,
    model_fingerprint,
    read_projector,
)
from treadle.runtime.llm import LLM
from treadle.runtime.llm2slm import LLM2SLM, PairMismatchError, Projector
from treadle.runtime.sampling import SamplingParams
from treadle.train import llm2slm
from treadle.train.draft import load_target
from treadle.train.llm2slm import (
    build_projector,
    heldout_loss,
    large_states,
    load_small,
    study_layers,
    train_projector,
)

SPECIALS = ["<unk>", "<s>", "</s>"]
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
VOCAB = len(SPECIALS) + len(CHARS)


def tiny_dir(path, name: str, layers: int, seed: int, chars=CHARS):
    save_hf_model(make_hf_model(name, vocab_size=VOCAB, seed=seed, num_layers=layers), path)
    vocab = {t: i for i, t in enumerate(SPECIALS + chars)}
    tok = RawTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True,
         "chat_template": "{% for m in messages %}<s>{{ m['content'] }}\n{% endfor %}"
                          "{% if add_generation_prompt %}<s>:{% endif %}"}))
    return path


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    return (tiny_dir(root / "large", "llama_gqa_tied", 3, seed=0),
            tiny_dir(root / "small", "llama_odd_untied", 1, seed=1))


@pytest.fixture(scope="module")
def answers(dirs):
    """The tiny large model's own greedy answers to random prompts (what train/data.py gives)."""
    large = LLM(dirs[0])
    rng = random.Random(0)
    prompts = [[1] + [rng.randrange(3, VOCAB) for _ in range(rng.randint(4, 12))]
               for _ in range(96)]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    return [(p, c.tokens) for p, c in zip(prompts, large.generate(prompts, params))]


def test_a_few_steps_lower_the_heldout_loss_against_a_zero_projector(dirs, answers):
    large_dir, small_dir = dirs
    train, held = answers[:80], answers[80:]
    states = large_states(load_target(large_dir), answers, [2], progress=False)[2]
    small = load_small(small_dir)
    torch.manual_seed(0)
    projector = Projector(64, 72)
    zero = heldout_loss(small, projector, held, states[80:])  # a fresh projector adds nothing
    assert zero == pytest.approx(heldout_loss(small, None, held, states[80:]), abs=1e-6)
    frozen = [p.clone() for p in (small.weights.embed, small.weights.layers[0].qkv.weight)]
    out = train_projector(small, projector, train, states[:80], epochs=4, lr=3e-3,
                          batch_tokens=256, progress=False)
    trained = heldout_loss(small, projector, held, states[80:])
    assert trained < zero - 0.3, (zero, trained, out)
    # the small model is frozen unless asked: only the projector moved
    assert torch.equal(frozen[0], small.weights.embed)
    assert torch.equal(frozen[1], small.weights.layers[0].qkv.weight)


def test_the_build_writes_what_generation_reads(dirs, answers, tmp_path):
    large_dir, small_dir = dirs
    out = build_projector(tmp_path / "proj", large_dir=large_dir, small_dir=small_dir, layer=1,
                          generations=answers, epochs=4, lr=3e-3, batch_tokens=256,
                          progress=False)
    info, state = read_projector(out)
    assert (info.layer, info.d_large, info.d_small) == (1, 64, 72)
    assert info.large_fingerprint == model_fingerprint(large_dir)
    assert info.small_path(out) == small_dir.resolve()
    rec = info.record
    assert rec["heldout_loss"] < rec["heldout_loss_small_alone"]
    assert rec["steps"] > 0 and rec["wall_time_s"] > 0 and "train_s" in rec["timings_s"]
    assert not (tmp_path / ".proj.checkpoint").exists()  # removed once the build is published
    large = LLM(large_dir)
    pair = large.llm2slm(LLM2SLM(projector=str(out)))
    for k, v in pair.projector.state_dict().items():
        assert torch.equal(v, state[k])
    done = large.generate("hello", SamplingParams(max_new_tokens=4, ignore_eos=True),
                          method=LLM2SLM(projector=str(out)))
    assert len(done.tokens) == 4


def test_tune_small_writes_the_tuned_small_model(dirs, answers, tmp_path):
    large_dir, small_dir = dirs
    out = build_projector(tmp_path / "tuned", large_dir=large_dir, small_dir=small_dir,
                          tune_small=True, generations=answers[:40], epochs=1, batch_tokens=256,
                          small_lr=1e-3, progress=False)
    info, _ = read_projector(out)
    assert info.small_dir == TUNED_SMALL and info.small_path(out) == out / TUNED_SMALL
    assert info.small_fingerprint == model_fingerprint(out / TUNED_SMALL)
    assert info.small_fingerprint != model_fingerprint(small_dir)  # it did train
    large = LLM(large_dir)
    done = large.generate("hi", SamplingParams(max_new_tokens=3, ignore_eos=True),
                          method=LLM2SLM(projector=str(out)))
    assert len(done.tokens) == 3
    with pytest.raises(PairMismatchError, match="another small model"):  # not the untuned one
        large.generate("hi", method=LLM2SLM(projector=str(out), small=str(small_dir)))


def test_a_killed_run_resumes_to_the_same_weights(dirs, answers, tmp_path, monkeypatch):
    large_dir, small_dir = dirs
    kw = dict(large_dir=large_dir, small_dir=small_dir, generations=answers[:48], epochs=2,
              batch_tokens=128, checkpoint_every=3, tune_small=True, progress=False)
    straight = build_projector(tmp_path / "a", **kw)
    real = llm2slm.batch_loss
    calls = []

    def dies_at_step_8(*a, **k):
        calls.append(1)
        if len(calls) == 8:
            raise KeyboardInterrupt("killed")
        return real(*a, **k)

    monkeypatch.setattr(llm2slm, "batch_loss", dies_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        build_projector(tmp_path / "b", **kw)
    assert find_projector(tmp_path / "b") is None and (tmp_path / ".b.checkpoint").is_dir()
    monkeypatch.setattr(llm2slm, "batch_loss", real)
    resumed = build_projector(tmp_path / "b", **kw)
    assert read_projector(resumed)[0].record["resumed_at_step"] == 6
    for k, v in read_projector(straight)[1].items():
        torch.testing.assert_close(read_projector(resumed)[1][k], v)
    assert model_fingerprint(straight / TUNED_SMALL) == model_fingerprint(resumed / TUNED_SMALL)


def test_a_finished_build_is_kept_and_another_recipe_refused(dirs, answers, tmp_path,
                                                              monkeypatch):
    large_dir, small_dir = dirs
    kw = dict(large_dir=large_dir, small_dir=small_dir, generations=answers[:20], epochs=1,
              progress=False)
    out = build_projector(tmp_path / "p", **kw)
    stamp = (out / MARKER).stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("should not train again")

    monkeypatch.setattr(llm2slm, "train_projector", boom)
    assert build_projector(tmp_path / "p", **kw) == out
    assert (out / MARKER).stat().st_mtime_ns == stamp
    with pytest.raises(OutputExistsError):
        build_projector(tmp_path / "p", **{**kw, "layer": 0})


def test_a_mismatched_pair_is_refused_before_training(dirs, tmp_path):
    large_dir, _ = dirs
    other = tiny_dir(tmp_path / "other", "llama_odd_untied", 1, seed=1,
                     chars=[CHARS[1], CHARS[0]] + CHARS[2:])
    with pytest.raises(PairMismatchError, match="another tokenizer: token id 3"):
        build_projector(tmp_path / "p", large_dir=large_dir, small_dir=other,
                        generations=[([1, 5], [6])], progress=False)
    with pytest.raises(ValueError, match="layer=3: the large model has layers 0..2"):
        build_projector(tmp_path / "p", large_dir=large_dir, small_dir=dirs[1], layer=3,
                        generations=[([1, 5], [6])], progress=False)


def test_the_layer_study_reports_every_candidate(dirs, answers):
    res = study_layers([0, 2], large_dir=dirs[0], small_dir=dirs[1], steps=4, batch_tokens=256,
                       generations=answers[:40], progress=False)
    assert set(res["heldout_loss_per_layer"]) == {"0", "2"}
    assert res["best_layer"] in (0, 2)
    assert all(v < res["heldout_loss_small_alone"] for v in res["heldout_loss_per_layer"].values())


def test_treadle_train_llm2slm_runs_the_pipeline(dirs, tmp_path, capsys):
    from treadle.__main__ import main

    out = tmp_path / "cli"
    rc = main(["train", "llm2slm", "--large", str(dirs[0]), "--small", str(dirs[1]), "--out",
               str(out), "--n-prompts", "6", "--max-new-tokens", "4", "--epochs", "1",
               "--no-data-cache", "--quiet", "--layer", "1"])
    assert rc == 0
    assert "held-out loss per answer token" in capsys.readouterr().out
    assert read_projector(out)[0].layer == 1


def test_the_projectors_data_skip_what_a_derived_draft_was_trained_on(tmp_path):
    small = tmp_path / "draft"
    small.mkdir()
    assert llm2slm.unseen_after(small, 0, None) == 0  # not a derived draft: nothing to skip
    prompts = {"n_prompts": 512, "seed": 0, "extra_prompts_csv": None}
    (small / "treadle-draft.json").write_text(json.dumps(
        {"format": 1, "recipe": {"prompts": prompts}}))
    assert llm2slm.unseen_after(small, 0, None) == 512
    assert llm2slm.unseen_after(small, 1, None) == 0  # another seed: another order
