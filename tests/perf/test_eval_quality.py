"""perf/eval_quality.py's pure pieces: ROUGE-L, LCS, the method names and the prompt order."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parents[2] / "perf" / "eval_quality.py"


@pytest.fixture(scope="module")
def eq():
    spec = importlib.util.spec_from_file_location("perf_eval_quality", PATH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def test_rouge_l_identical_is_one(eq):
    assert eq.rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0


def test_rouge_l_disjoint_is_zero(eq):
    assert eq.rouge_l("alpha beta gamma", "delta epsilon") == 0.0


def test_rouge_l_known_lcs(eq):
    # cand: police killed the gunman (4), ref: the police kill the gunman (5)
    # LCS = police the gunman (3): P = 3/4, R = 3/5, F1 = 2PR/(P+R) = 2/3
    assert eq.lcs_length("police killed the gunman".split(),
                         "the police kill the gunman".split()) == 3
    assert eq.rouge_l("police killed the gunman", "the police kill the gunman") == pytest.approx(
        2 / 3
    )


def test_rouge_l_word_tokens_ignore_case_and_punctuation(eq):
    assert eq.rouge_l("Hello, World!", "hello world") == 1.0
    assert eq.words("It's 2+2=4.") == ["it", "s", "2", "2", "4"]


def test_rouge_l_symmetric_and_empty(eq):
    a, b = "a b c d e", "b d f e a"
    assert eq.rouge_l(a, b) == pytest.approx(eq.rouge_l(b, a))
    assert eq.rouge_l("", "") == 1.0
    assert eq.rouge_l("", "x") == 0.0 and eq.rouge_l("x", "...") == 0.0


def test_lcs_against_brute_force(eq):
    import itertools
    import random

    rng = random.Random(0)
    for _ in range(50):
        a = [rng.choice("abc") for _ in range(rng.randint(0, 6))]
        b = [rng.choice("abc") for _ in range(rng.randint(0, 6))]
        best = 0
        for n in range(len(a), -1, -1):
            subs = {tuple(c) for c in itertools.combinations(a, n)}
            if any(_is_subsequence(s, b) for s in subs):
                best = n
                break
        assert eq.lcs_length(a, b) == best


def _is_subsequence(s, b):
    it = iter(b)
    return all(x in it for x in s)


def test_parse_method(eq):
    from treadle.runtime.methods import AR, SelfSpec, SkipDecode

    assert eq.parse_method("ar") == AR()
    assert eq.parse_method("skip1.5") == SkipDecode(speedup=1.5)
    assert eq.parse_method("selfspec4") == SelfSpec(k=4)
    with pytest.raises(SystemExit):
        eq.parse_method("nonsense")
    with pytest.raises(SystemExit):
        eq.parse_method("skipx")


def test_mt_bench_round_robin(eq, tmp_path):
    rows = [
        {"question_id": i, "category": cat, "turns": [f"{cat}{i}", "second turn"]}
        for i, cat in enumerate(["w", "w", "w", "m", "m", "c"])
    ]
    f = tmp_path / "q.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    got = [it["prompt"] for it in eq.mt_bench_prompts(f, 10)]
    assert got == ["w0", "m3", "c5", "w1", "m4", "w2"]
    assert [it["prompt"] for it in eq.mt_bench_prompts(f, 2)] == ["w0", "m3"]
