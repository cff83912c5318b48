"""The data pipeline of the target's own generations (train/data.py): the built-in prompts, the
split into greedy and sampled answers, the cache, its key, and resuming an interrupted run."""

from __future__ import annotations

import os
import random

import pytest
from tiny_models import make_hf_model, save_hf_model
from treadle.train import data
from treadle.train.data import (
    GenerationRecipe,
    batches,
    instruction_prompts,
    pack,
    target_answers,
)

VOCAB = 211


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return save_hf_model(make_hf_model("llama_gqa_tied", VOCAB), tmp_path_factory.mktemp("t"))


class FakeTarget:
    """A generator that answers prompt p with ids derived from p, the temperature and the seed,
    and can be told to fail after some calls (a killed run)."""

    def __init__(self, fail_after: int | None = None):
        self.calls: list[tuple[int, float]] = []
        self.fail_after = fail_after

    def __call__(self, prompts, *, max_new_tokens, temperature, seed):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt
        self.calls.append((len(prompts), temperature))
        return [
            ([len(p) % 50 + 3], [(sum(map(ord, p)) + seed + int(10 * temperature)) % 100 + 3] * 2)
            for p in prompts
        ]


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
    n_plain = len(data.TEMPLATES) * len(data.TOPICS)
    assert not any(p.endswith(data.STYLES) for p in instruction_prompts(n_plain))


def test_greedy_then_sampled_in_chunks(target, tmp_path):
    gen = FakeTarget()
    recipe = GenerationRecipe(n_prompts=20, max_new_tokens=5, sampled_fraction=0.25)
    got = target_answers(
        target, recipe, generate_fn=gen, cache=tmp_path, chunk_prompts=8, progress=False
    )
    # chunks of 8 over 15 greedy then 5 sampled prompts; one call per temperature in a chunk
    assert gen.calls == [(8, 0.0), (7, 0.0), (1, 0.7), (4, 0.7)]
    assert got.greedy == [True] * 15 + [False] * 5 and len(got.data) == 20
    assert got.chunks == 3 and got.chunks_cached == 0
    assert sorted(p.name for p in got.cache.iterdir()) == [f"chunk-0000{i}.pt" for i in range(3)]


def test_cached_answers_are_reused_and_keyed(target, tmp_path):
    recipe = GenerationRecipe(n_prompts=12, max_new_tokens=5)
    kw = dict(cache=tmp_path, chunk_prompts=4, progress=False)
    first = target_answers(target, recipe, generate_fn=FakeTarget(), **kw)
    again = FakeTarget()
    second = target_answers(target, recipe, generate_fn=again, **kw)
    assert again.calls == [] and second.chunks_cached == 3
    assert second.data == first.data and second.greedy == first.greedy
    for other in (
        GenerationRecipe(n_prompts=12, max_new_tokens=5, seed=1),
        GenerationRecipe(n_prompts=12, max_new_tokens=6),
        GenerationRecipe(n_prompts=12, max_new_tokens=5, temperature=0.9),
    ):
        fresh = FakeTarget()
        target_answers(target, other, generate_fn=fresh, **kw)
        assert fresh.calls, other  # other settings: other answers
    assert len(list(tmp_path.iterdir())) == 4


def test_an_interrupted_run_keeps_its_finished_chunks(target, tmp_path):
    recipe = GenerationRecipe(n_prompts=16, max_new_tokens=5, sampled_fraction=0.0)
    kw = dict(cache=tmp_path, chunk_prompts=4, progress=False)
    with pytest.raises(KeyboardInterrupt):
        target_answers(target, recipe, generate_fn=FakeTarget(fail_after=2), **kw)
    (folder,) = tmp_path.iterdir()
    assert sorted(p.name for p in folder.iterdir()) == ["chunk-00000.pt", "chunk-00001.pt"]
    rest = FakeTarget()
    resumed = target_answers(target, recipe, generate_fn=rest, **kw)
    assert rest.calls == [(4, 0.0), (4, 0.0)] and resumed.chunks_cached == 2
    whole = target_answers(target, recipe, generate_fn=FakeTarget(), **{**kw, "cache": False})
    assert resumed.data == whole.data  # the same answers as an uninterrupted run


def test_a_corrupt_chunk_is_generated_again(target, tmp_path):
    recipe = GenerationRecipe(n_prompts=8, max_new_tokens=5)
    kw = dict(cache=tmp_path, chunk_prompts=4, progress=False)
    first = target_answers(target, recipe, generate_fn=FakeTarget(), **kw)
    (first.cache / "chunk-00001.pt").write_bytes(b"not a torch file")
    gen = FakeTarget()
    again = target_answers(target, recipe, generate_fn=gen, **kw)
    assert len(gen.calls) >= 1 and again.chunks_cached == 1 and again.data == first.data


@pytest.mark.default_model
def test_the_real_generator_is_treadles_batched_greedy_decoding(tmp_path):
    import treadle
    from treadle.loaders.default_model import DefaultModelMissing, default_model_dir

    try:
        target = default_model_dir(progress=False)
    except DefaultModelMissing as e:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(e))
    recipe = GenerationRecipe(n_prompts=3, max_new_tokens=4, sampled_fraction=0.0)
    got = target_answers(target, recipe, batch=2, cache=False, progress=False)
    llm = treadle.load(target)
    params = treadle.SamplingParams(max_new_tokens=4)
    for prompt, (ids, answer) in zip(recipe.prompts(), got.data):
        assert ids == llm.encode(prompt, chat=True)
        assert answer == list(llm.generate(prompt, params, chat=True).tokens)


def test_batches_cover_every_example_once_within_the_token_budget():
    rng = random.Random(3)
    data = [
        ([1] * rng.randint(1, 20), [2] * rng.randint(1, 30)) for _ in range(150)
    ]  # lengths 2..50
    order = list(range(150))
    rng.shuffle(order)
    got = batches(data, 128, order)
    assert sorted(i for b in got for i in b) == list(range(150))
    for b in got:
        longest = max(len(data[i][0]) + len(data[i][1]) - 1 for i in b)
        assert len(b) == 1 or len(b) * longest <= 128


def test_pack_teacher_forces_the_answer_positions():
    data = [([10, 11, 12], [20, 21]), ([30], [40, 41, 42])]
    tokens, where, labels = pack(data, [0, 1], "cpu")
    # inputs drop each sequence's last token and are right-padded with 0
    assert tokens.tolist() == [[10, 11, 12, 20], [30, 40, 41, 0]]
    # the positions whose next token is an answer token, and those tokens
    assert where.tolist() == [2, 3, 4, 5, 6] and labels.tolist() == [20, 21, 40, 41, 42]
    assert tokens.flatten()[where].tolist() == [12, 20, 30, 40, 41]


def test_a_recipe_after_another_has_only_prompts_the_other_lacks():
    first = set(GenerationRecipe(n_prompts=300, seed=2).prompts())
    later = GenerationRecipe(n_prompts=200, seed=2, after=300).prompts()
    assert len(later) == len(set(later)) == 200 and not first & set(later)
    assert GenerationRecipe(n_prompts=300, seed=2, after=0).prompts() == \
        GenerationRecipe(n_prompts=300, seed=2).prompts()
