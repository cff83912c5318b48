"""SkipDecode fine-tuning (train/skipdecode.py) on tiny random models: the training forward is the
decoding path, training lowers the held-out loss, the schedule travels with the weights (and another
schedule warns), the tuned model decodes (self-speculation included), and a build resumes.

The real tuning of the default model is never run here (that takes minutes to hours).
"""

from __future__ import annotations

import json
import random
import warnings
from dataclasses import replace

import pytest
import torch
from tiny_models import make_hf_model, save_hf_model
from tokenizers import Tokenizer as RawTokenizer
from tokenizers import decoders, models
from treadle.__main__ import main as cli
from treadle.graph.config import ModelConfig
from treadle.graph.skip import SCHEDULE_FILE, ScheduleError, SkipSchedule, read_tuned_schedule
from treadle.loaders.gguf_import import OutputExistsError
from treadle.loaders.safetensors_weights import read_state_dict
from treadle.runtime.engine import Engine, Stream, Worker
from treadle.runtime.llm import LLM
from treadle.runtime.methods import (
    AR,
    SelfSpec,
    SkipDecode,
    TunedScheduleWarning,
    for_tuned_model,
    make_policy,
)
from treadle.runtime.request import Request
from treadle.runtime.sampling import SamplingParams
from treadle.runtime.stats import DecodeStats
from treadle.train import skipdecode as sd
from treadle.train.distill import hidden, load_target, teacher_pass

SPECIALS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2: the tiny models' bos 1 and eos 2
CHARS = [chr(c) for c in range(32, 127)] + ["\n"]
VOCAB = len(SPECIALS) + len(CHARS)
LAYERS = 6
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)
# Aggressive skipping on the tiny models, so that the skip pass is far from the full model.
RECIPE = sd.TuneRecipe(speedup=2.0, warmup_layers=1, schedule_tokens=8, epochs=4, max_steps=6,
                       lr=1e-3, batch_tokens=96, kl_topk=8)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    """A tiny random Llama (6 layers, tied embeddings) with a character tokenizer and a chat
    template, so that `treadle.load` and the data pipeline run on it."""
    path = save_hf_model(make_hf_model("llama_gqa_tied", VOCAB, num_layers=LAYERS),
                         tmp_path_factory.mktemp("target"))
    tok = RawTokenizer(models.BPE(vocab={t: i for i, t in enumerate(SPECIALS + CHARS)},
                                  merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(path / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
              "add_bos_token": True, "chat_template": CHAT_TEMPLATE}
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def fake_generations(n: int, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    return [([rng.randrange(3, VOCAB) for _ in range(rng.randint(2, 8))],
             [rng.randrange(3, VOCAB) for _ in range(rng.randint(4, 14))]) for _ in range(n)]


@torch.no_grad()
def greedy_answers(teacher, prompts: list[list[int]], n: int) -> list[tuple[list[int], list[int]]]:
    out = []
    for p in prompts:
        seq = list(p)
        for _ in range(n):
            seq.append(int(teacher.logits(hidden(teacher, torch.tensor([seq])))[0, -1].argmax()))
        out.append((list(p), seq[len(p):]))
    return out


def states(path) -> dict[str, torch.Tensor]:
    return read_state_dict(path, ModelConfig.from_json(path))


# --- the training forward is the decoding path -------------------------------------------------
def test_participation_prompt_runs_all_layers_then_the_schedule():
    s = SkipSchedule(num_layers=6, max_layers=5, min_layers=2, warmup_layers=1, decay_length=4)
    runs = sd.participation(s, [3, 1], width=9)  # [L, B, T]
    assert runs[:, 0, :3].all() and runs[:, 1, :1].all()
    for b, p in enumerate([3, 1]):
        for pos in range(p, 9):
            assert runs[:, b, pos].nonzero().flatten().tolist() == s.layers_at(pos - p)
    # each layer runs over a prefix of each sequence: what lets skip_hidden truncate the width
    for layer in range(6):
        for b in range(2):
            r = runs[layer, b].tolist()
            assert r == sorted(r, reverse=True)


def test_training_forward_equals_the_runtime_skipdecode_path(target):
    """Teacher-forced, token by token: the logits of the training forward over whole sequences
    (two ragged sequences in one batch) equal those the engine's SkipDecode policy computes with
    its KV cache, and differ from the full model's (the schedule matters)."""
    schedule = SkipSchedule(num_layers=LAYERS, max_layers=5, min_layers=2, warmup_layers=1,
                            decay_length=6)
    data = fake_generations(2, seed=3)
    data = [(data[0][0][:3], data[0][1][:10]), (data[1][0] + [5, 6, 7], data[1][1][:7])]
    student = sd.student_of(target, None)
    from treadle.train.data import pack

    tokens, _, _ = pack(data, [0, 1], "cpu")
    with torch.no_grad():
        train_logits = student.logits(sd.skip_hidden(student, tokens, [len(p) for p, _ in data],
                                                     schedule))  # [B, T, V]
        full_logits = student.logits(hidden(student, tokens))

    runtime = LLM(target).model  # the inference forward (KV cache, the CPU's products)
    worker = Worker(runtime, 64)
    engine = Engine(worker, lambda m: make_policy(m, worker.executor))
    recorded: list[list[torch.Tensor]] = [[], []]
    streams = []
    for b, (prompt, answer) in enumerate(data):
        def force(context, logits, b=b, prompt=prompt, answer=answer):
            recorded[b].append(logits.clone())
            forced = torch.full_like(logits, float("-inf"))
            forced[answer[len(context) - len(prompt)]] = 0.0
            return forced

        params = SamplingParams(max_new_tokens=len(answer), ignore_eos=True)
        req = Request(prompt, params, frozenset())
        streams.append(engine.add(Stream(req, SkipDecode(schedule=schedule), list(prompt), None,
                                         DecodeStats("skipdecode"), force)))
    for _ in engine.run(streams):
        pass
    for b, (prompt, answer) in enumerate(data):
        assert streams[b].request.tokens == answer
        got = torch.stack(recorded[b])  # [n, V]: logits for answer[t], t = 0..n-1
        pos = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(answer))
        torch.testing.assert_close(train_logits[b, pos], got, atol=1e-4, rtol=1e-4)
        # the first answer token comes from the full-depth prompt step; later ones skip layers
        assert not torch.allclose(full_logits[b, pos[2:]], got[2:], atol=1e-2)


def test_training_lowers_the_heldout_kl_and_ce(target):
    """On the teacher's own greedy answers to prompts it was not trained on. A random model is
    chaotic in its input, so the prompts come from a two-token alphabet (distinct ones: the
    held-out prompts are new) for the answers to share structure that training can find."""
    teacher = load_target(target)
    rng = random.Random(1)
    prompts: set[tuple[int, ...]] = set()
    while len(prompts) < 40:
        prompts.add(tuple(rng.randrange(3, 5) for _ in range(rng.randint(4, 8))))
    gens = greedy_answers(teacher, [list(p) for p in sorted(prompts, key=str)], 10)
    rng.shuffle(gens)
    train, held = gens[:32], gens[32:]
    soft = teacher_pass(teacher, train, 512, 16, False)
    held_soft = teacher_pass(teacher, held, 512, 16, False)
    schedule = SkipSchedule(num_layers=LAYERS, max_layers=4, min_layers=2, warmup_layers=1,
                            decay_length=6)
    student = sd.student_of(target, None)
    before = sd.heldout_figures(student, schedule, held, held_soft)
    assert before["full_vs_original"] == 1.0  # untuned: the full pass is the teacher
    recipe = sd.TuneRecipe(epochs=8, lr=2e-3, batch_tokens=128)
    run = sd.train_skip(student, schedule, train, soft, recipe, progress=False)
    after = sd.heldout_figures(student, schedule, held, held_soft)
    assert run["steps"] == len(run["history"]) >= 16
    assert after["kl"] < 0.85 * before["kl"] and after["ce"] < 0.85 * before["ce"]
    assert after["skip_vs_original"] > before["skip_vs_original"]
    # training the skip pass alone lets the full pass drift; its own KL term holds it closer
    student = sd.student_of(target, None)
    sd.train_skip(student, schedule, train, soft, replace(recipe, full_kl_weight=1.0),
                  progress=False)
    held_full = sd.heldout_figures(student, schedule, held, held_soft)
    assert held_full["full_vs_original"] > after["full_vs_original"]
    assert held_full["kl"] < 0.85 * before["kl"]


# --- the tuned model: its schedule, decoding, self-speculation ---------------------------------
def test_the_schedule_travels_with_the_weights_and_another_one_warns(target, tmp_path):
    out = sd.build_skipdecode(tmp_path / "tuned", target_dir=target, recipe=RECIPE,
                              generations=fake_generations(16), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tuned"]  # no temp or checkpoint dirs
    info = json.loads((out / SCHEDULE_FILE).read_text())
    schedule = RECIPE.schedule(LAYERS)
    assert read_tuned_schedule(out) == schedule == SkipSchedule.from_dict(info["schedule"])
    assert info["steps"] == 6 and info["resumed_from_step"] == 0 and info["seconds_per_step"] > 0
    assert info["heldout_after"]["positions"] > 0 and info["trained"] == ["all layers",
                                                                          "model.norm"]
    state, tstate = states(out), states(target)
    assert torch.equal(state["model.embed_tokens.weight"], tstate["model.embed_tokens.weight"])
    assert not torch.equal(state["model.layers.3.mlp.down_proj.weight"],
                           tstate["model.layers.3.mlp.down_proj.weight"])

    llm = LLM(out)
    assert llm.skip_schedule == schedule and LLM(target).skip_schedule is None
    prompt, n = [5, 9, 11, 4], 12
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", TunedScheduleWarning)
        done = llm.generate(prompt, params, method=SkipDecode())  # the stored schedule
        same = llm.generate(prompt, params, method=SkipDecode(speedup=2.0, warmup_layers=1))
    expected = (LAYERS + sum(schedule.layer_count(t) for t in range(n - 1))) / n
    assert done.stats.mean_layers == pytest.approx(expected)
    assert same.tokens == done.tokens
    with pytest.warns(TunedScheduleWarning, match="fine-tuned for the SkipDecode schedule"):
        llm.generate(prompt, params, method=SkipDecode(speedup=1.5))
    other = SkipSchedule(LAYERS, 4, 3, 1, 5)
    with pytest.warns(TunedScheduleWarning):
        llm.generate(prompt, params, method=SkipDecode(schedule=other))

    # self-speculation drafts with the tuned schedule by default, and stays lossless
    assert for_tuned_model(SelfSpec(), schedule, out) == SelfSpec(schedule=schedule)
    assert for_tuned_model(SelfSpec(draft_speedup=3.0), schedule, out).schedule is None
    ar = llm.generate([prompt, prompt[:2]], SamplingParams(max_new_tokens=20, ignore_eos=True))
    spec = llm.generate([prompt, prompt[:2]], SamplingParams(max_new_tokens=20, ignore_eos=True),
                        method=SelfSpec(k=3, adaptive=False))
    assert [c.tokens for c in spec] == [c.tokens for c in ar]
    assert spec[0].stats.accepted  # it did draft

    # a finished build is kept; a different recipe needs overwrite
    assert sd.build_skipdecode(out, target_dir=target, recipe=RECIPE,
                               generations=fake_generations(16), progress=False) == out
    with pytest.raises(OutputExistsError, match="different recipe"):
        sd.build_skipdecode(out, target_dir=target, recipe=replace(RECIPE, lr=2e-3),
                            generations=fake_generations(16), progress=False)


def test_selfspec_with_a_schedule_is_lossless_for_streams_at_different_positions(target):
    """Streams that join mid-flight share draft steps at different generated positions (the round
    drafts with the earliest one's layer set); every stream still gets exactly its AR tokens."""
    model = LLM(target).model
    schedule = SkipSchedule(num_layers=LAYERS, max_layers=5, min_layers=2, warmup_layers=1,
                            decay_length=10)
    prompts = [[5, 9, 11, 4, 7], [8, 3], [12, 13, 14]]
    params = SamplingParams(max_new_tokens=18, ignore_eos=True)

    def decode(method, join_after: int):
        worker = Worker(model, 64)
        engine = Engine(worker, lambda m: make_policy(m, worker.executor))
        stats = DecodeStats(method.name)
        streams = []
        for i, p in enumerate(prompts):
            streams.append(engine.add(Stream(Request(p, params, frozenset()), method, list(p),
                                             None, stats)))
            for _ in range(join_after * (i < len(prompts) - 1)):
                engine.step()
        for _ in engine.run(streams):
            pass
        return [s.request.tokens for s in streams], stats

    ar, _ = decode(AR(), 0)
    spec, stats = decode(SelfSpec(k=3, adaptive=False, schedule=schedule), 2)
    assert spec == ar and stats.accepted


def test_upper_tuning_leaves_the_warmup_and_skipped_layers_as_they_were(target, tmp_path):
    recipe = replace(RECIPE, tune_layers=sd.TuneLayers.UPPER)
    out = sd.build_skipdecode(tmp_path / "upper", target_dir=target, recipe=recipe,
                              generations=fake_generations(16), progress=False)
    schedule = recipe.schedule(LAYERS)
    upper = sd.tuned_layers(schedule, sd.TuneLayers.UPPER)
    assert upper == [i for i in schedule.layers_at(0) if i >= schedule.warmup_layers]
    state, tstate = states(out), states(target)
    for i in range(LAYERS):
        name = f"model.layers.{i}.self_attn.q_proj.weight"
        assert torch.equal(state[name], tstate[name]) == (i not in upper), i


def test_an_interrupted_build_resumes_from_its_checkpoint(target, tmp_path, monkeypatch):
    gens = fake_generations(16, seed=4)
    whole = sd.build_skipdecode(tmp_path / "whole", target_dir=target, recipe=RECIPE,
                                generations=gens, checkpoint_every=2, progress=False)

    saves = []
    real_save = sd.Checkpoint.save_state

    def save_then_die(self, obj):
        real_save(self, obj)
        saves.append(obj["step"])
        if obj["step"] == 4:
            raise KeyboardInterrupt  # killed right after the step-4 checkpoint

    monkeypatch.setattr(sd.Checkpoint, "save_state", save_then_die)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        sd.build_skipdecode(out, target_dir=target, recipe=RECIPE, generations=gens,
                            checkpoint_every=2, progress=False)
    assert saves == [2, 4] and not out.exists()
    assert (tmp_path / ".resumed.ckpt" / "state.pt").is_file()
    monkeypatch.setattr(sd.Checkpoint, "save_state", real_save)
    sd.build_skipdecode(out, target_dir=target, recipe=RECIPE, generations=gens,
                        checkpoint_every=2, progress=False)
    info = json.loads((out / SCHEDULE_FILE).read_text())
    assert info["resumed_from_step"] == 4 and info["steps"] == 6
    assert not (tmp_path / ".resumed.ckpt").exists()  # gone once the output is published
    a, b = states(whole), states(out)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=1e-5)


def test_cli_trains_on_the_targets_own_answers(target, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = cli(["train", "skipdecode", "--target", str(target), "--out", str(out),
              "--speedup", "1.5", "--warmup-layers", "1", "--schedule-tokens", "6",
              "--n-prompts", "6", "--max-new-tokens", "6", "--max-steps", "2",
              "--batch-tokens", "128", "--no-data-cache", "--quiet"])
    assert rc == 0
    info = json.loads((out / SCHEDULE_FILE).read_text())
    assert info["recipe"]["prompts"]["n_prompts"] == 6 and info["steps"] <= 2
    assert SkipSchedule.from_dict(info["schedule"]) == SkipSchedule.for_speedup(LAYERS, 1.5, 6, 1)
    assert "tuned model:" in capsys.readouterr().out


def test_a_broken_schedule_file_is_a_clear_error(tmp_path):
    (tmp_path / SCHEDULE_FILE).write_text(json.dumps({"schedule": {"num_layers": 6}}))
    with pytest.raises(ScheduleError, match="skipdecode.json: schedule: expected an object"):
        read_tuned_schedule(tmp_path)
    assert read_tuned_schedule(tmp_path / "nothing-here") is None
