"""The engine: streams that join, fork and leave mid-flight decode exactly as they would alone; the
prefix cache reuses K/V across calls and refcounts free everything; drafts accept deeply."""

from __future__ import annotations

import random
from dataclasses import asdict

import pytest
import torch
from tiny_models import load_tiny
from treadle.runtime.engine import Engine, Stream, Worker
from treadle.runtime.gsd import GSDParams, ModelDraft, NgramDraft
from treadle.runtime.kv_cache import KVCacheError
from treadle.runtime.methods import AR, Speculative, make_policy, run_requests
from treadle.runtime.request import Request
from treadle.runtime.sampling import SamplingParams
from treadle.runtime.stats import DecodeStats

CHAIN = GSDParams(k=1, tau=-1, max_depth=4, node_budget=5, prob_threshold=0.0)
GSD = GSDParams(k=2, tau=0, max_depth=3, node_budget=16, prob_threshold=0.0,
                sibling_threshold=0.0)


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return load_tiny("llama_gqa_tied", tmp_path_factory.mktemp("t"), num_layers=3)


@pytest.fixture(scope="module")
def draft(tmp_path_factory):
    return load_tiny("llama_gqa_tied", tmp_path_factory.mktemp("d"), seed=7, num_layers=1)


def params(n):
    return SamplingParams(max_new_tokens=n, ignore_eos=True)


def alone(model, prompt, n, method=AR(), draft=None):
    req = Request(list(prompt), params(n), frozenset())
    for _ in run_requests(Worker(model, 256), [req], method, draft):
        pass
    return req.tokens


def methods(draft_model):
    return {
        "ar": (AR(), None),
        "sd": (Speculative(draft="test", **asdict(CHAIN)), "model"),
        "gsd": (Speculative(draft="test", **asdict(GSD)), "model"),
        "gsd-ngram": (Speculative(draft="ngram", **asdict(GSD)), NgramDraft()),
    }


@pytest.mark.parametrize("name", ["ar", "sd", "gsd", "gsd-ngram"])
def test_streams_join_fork_and_leave_mid_flight(target, draft, name):
    method, src = methods(draft)[name]
    worker = Worker(target, 256)

    def draft_source():  # a fresh draft cache per engine, as LLM keeps one per draft
        return ModelDraft(Worker(draft, 256)) if src == "model" else src

    source = draft_source()
    engine = Engine(worker, lambda m: make_policy(m, worker.executor, source))
    rng = random.Random(3)
    pa = [rng.randrange(20) for _ in range(7)] * 2
    pb = [rng.randrange(211) for _ in range(5)]
    pc = pa[:9] + [rng.randrange(211) for _ in range(4)]  # shares a prefix with a

    def stream(prompt, n):
        return Stream(Request(list(prompt), params(n), frozenset()), method, list(prompt), None,
                      DecodeStats(name))

    a = engine.add(stream(pa, 18))
    engine.step()
    engine.step()
    b = engine.add(stream(pb, 6))  # joins mid-flight, leaves early
    engine.step()
    fork_ctx = list(a.context) + [17]
    child = engine.fork(a, [17], Request(fork_ctx, params(12), frozenset()))
    c = engine.add(stream(pc, 10))
    while any(not s.finished for s in (a, b, c, child)):
        engine.step()
        assert all(s in engine.live for s in (a, b, c, child) if not s.finished)
    assert a.request.tokens == alone(target, pa, 18, method, draft_source())
    assert b.request.tokens == alone(target, pb, 6, method, draft_source())
    assert c.request.tokens == alone(target, pc, 10, method, draft_source())
    assert child.request.tokens[0] == 17
    assert child.request.tokens[1:] == alone(target, fork_ctx, 11, method, draft_source())
    # Every row is either free or held by the prefix cache, which lets go of all of them.
    assert not engine.live
    worker.prefixes.clear()
    assert worker.cache.in_use() == 0


def test_parent_may_finish_before_its_fork(target):
    worker = Worker(target, 256)
    engine = Engine(worker, lambda m: make_policy(m, worker.executor))
    prompt = list(range(3, 15))
    parent = engine.add(Stream(Request(prompt, params(3), frozenset()), AR(), list(prompt),
                               None, DecodeStats("ar")))
    engine.step()
    ctx = parent.context + [9]
    child = engine.fork(parent, [9], Request(ctx, params(20), frozenset()))
    lender = parent.row
    while not child.finished:
        engine.step()
        if parent.finished:
            assert worker.cache.refs[lender] >= 1  # still read by the child, so still there
    assert child.request.tokens[1:] == alone(target, ctx, 19)
    worker.prefixes.clear()
    assert worker.cache.in_use() == 0


def test_a_draft_that_is_the_target_accepts_every_token(target):
    """The target drafting for itself: rounds accept as deep as the tree goes, through chains,
    trees and merged DAG nodes."""
    prompt = [5, 9, 2, 7, 1, 4]
    n = 40
    want = alone(target, prompt, n)
    for p, depth in ((CHAIN, 4), (GSD, 3)):
        stats = DecodeStats("self")
        req = Request(prompt, params(n), frozenset())
        method = Speculative(draft="test", **asdict(p))
        for _ in run_requests(Worker(target, 256), [req], method, ModelDraft(Worker(target, 256)),
                              stats):
            pass
        assert req.tokens == want
        # Full depth in (nearly) every round: a draft step and the verify step compute the same
        # logits through different shapes, so a near-tie may rarely round the other way.
        full = sum(a == depth for a in stats.accepted)
        assert full >= 0.85 * len(stats.accepted) and min(stats.accepted) >= 1, stats.accepted
        if p is GSD:
            assert stats.merged_nodes > 0  # the accepted paths ran through a DAG with merges


def test_prefix_cache_reuses_kv_across_calls(target):
    worker = Worker(target, 256)
    rng = random.Random(5)
    system = [rng.randrange(211) for _ in range(40)]
    q1, q2 = system + [3, 4, 5], system + [6, 7]
    first, second = DecodeStats("1"), DecodeStats("2")
    r1 = Request(q1, params(8), frozenset())
    r2 = Request(q2, params(8), frozenset())
    for _ in run_requests(worker, [r1], stats=first):
        pass
    for _ in run_requests(worker, [r2], stats=second):
        pass
    assert first.reused_tokens == 0 and first.prefill_tokens == len(q1)
    assert second.reused_tokens == len(system) and second.prefill_tokens == 2
    assert r2.tokens == alone(target, q2, 8)
    # The same question again reuses everything but its last token.
    r3 = Request(q1, params(8), frozenset())
    third = DecodeStats("3")
    for _ in run_requests(worker, [r3], stats=third):
        pass
    assert third.prefill_tokens == 1 and r3.tokens == r1.tokens


def test_no_leak_after_1000_requests_and_eviction_within_budget(target):
    # A budget of a few rows forces the prefix cache to evict as requests come and go.
    worker = Worker(target, 64, kv_cache_mb=0.8)
    rng = random.Random(0)
    most = worker.kv_cache_bytes // worker.cache.row_bytes()
    for call in range(100):
        reqs = [Request([rng.randrange(211) for _ in range(rng.randrange(2, 9))], params(2),
                        frozenset()) for _ in range(10)]
        for _ in run_requests(worker, reqs):
            pass
        assert worker.cache.rows <= most
    worker.prefixes.clear()
    assert worker.cache.in_use() == 0


def test_the_same_prompts_again_and_again_stay_within_a_small_budget(target):
    # Each call's rows fork the previous call's rows (same prompts, new answers). Were a fork of a
    # fork to borrow from its direct source, every call would pin a longer chain of rows that the
    # prefix cache could not evict (each one borrowed from), and the budget would run out.
    worker = Worker(target, 64, kv_cache_mb=0.8)
    most = worker.kv_cache_bytes // worker.cache.row_bytes()
    rng = random.Random(1)
    prompts = [[5] * 9 + [rng.randrange(211) for _ in range(6)] for _ in range(3)]
    for call in range(4 * most):
        reqs = [Request(p, SamplingParams(max_new_tokens=3, temperature=1.0, seed=call),
                        frozenset()) for p in prompts]
        for _ in run_requests(worker, reqs):
            pass
        cache = worker.cache
        depth = max(_chain(cache, r) for r in range(cache.rows) if cache.refs[r])
        assert depth <= 3 and worker.cache.rows <= most  # common prefix -> prompt -> live row
    worker.prefixes.clear()
    assert worker.cache.in_use() == 0


def _chain(cache, row: int) -> int:
    n = 1
    while cache.lender[row] is not None:
        row, n = cache.lender[row][0], n + 1
    return n


def test_exhaustion_names_the_setting(target):
    worker = Worker(target, 64, kv_cache_mb=0.05)
    reqs = [Request([1, 2, 3], params(4), frozenset()) for _ in range(64)]
    with pytest.raises(KVCacheError, match="kv_cache_mb"):
        for _ in run_requests(worker, reqs):
            pass
    worker.prefixes.clear()
    assert worker.cache.in_use() == 0  # the failed call gave its rows back


def test_logit_processor_bans_and_forces(target):
    worker = Worker(target, 256)
    engine = Engine(worker, lambda m: make_policy(m, worker.executor))
    prompt = [4, 8, 15, 16, 23, 42]
    free = alone(target, prompt, 6)

    def ban_first_choice(context, logits):  # only at the first generated position
        out = logits.clone()
        if len(context) == len(prompt):
            out[free[0]] = -float("inf")
        return out

    def force_seven(context, logits):
        out = torch.full_like(logits, -float("inf"))
        out[7] = 0.0
        return out

    s1 = engine.add(Stream(Request(prompt, params(6), frozenset()), AR(), list(prompt), None,
                           DecodeStats("ban"), ban_first_choice))
    s2 = engine.add(Stream(Request(prompt, params(3), frozenset()), AR(), list(prompt), None,
                           DecodeStats("force"), force_seven))
    for _ in engine.run([s1, s2]):
        pass
    assert s1.request.tokens[0] != free[0]
    assert s2.request.tokens == [7, 7, 7]


def test_a_long_request_trades_rows_for_capacity_within_the_budget(tmp_path):
    # Many short requests leave many rows (kept prefixes); a long one then needs longer rows,
    # which the budget allows only for fewer of them.
    target = load_tiny("llama_gqa_tied", tmp_path, num_layers=3, max_positions=1024)
    worker = Worker(target, 1024, kv_cache_mb=1.0)
    rng = random.Random(4)
    for _ in range(3):
        short = [Request([rng.randrange(211) for _ in range(5)], params(4), frozenset())
                 for _ in range(4)]
        for _ in run_requests(worker, short):
            pass
    rows_before = worker.cache.rows
    long_prompt = [rng.randrange(211) for _ in range(600)]
    req = Request(long_prompt, params(8), frozenset())
    for _ in run_requests(worker, [req]):
        pass
    assert worker.cache.capacity >= 608 and worker.cache.rows < rows_before
    assert worker.cache.rows * worker.cache.row_bytes() <= worker.kv_cache_bytes
    ref = Request(long_prompt, params(8), frozenset())
    for _ in run_requests(Worker(target, 1024), [ref]):
        pass
    assert req.tokens == ref.tokens


@pytest.mark.parametrize("name", ["sd", "gsd"])
def test_static_plans_for_every_step_kind_equal_eager_steps(target, draft, name):
    """Decode, verify and draft steps replayed from static plans (prefix-shared rows included)
    give the tokens eager steps give."""
    method = methods(draft)[name][0]
    rng = random.Random(11)
    system = [rng.randrange(211) for _ in range(9)]
    prompts = [system + [rng.randrange(211) for _ in range(n)] for n in (2, 5, 3)]

    def run(static):
        reqs = [Request(p, params(14), frozenset()) for p in prompts]
        worker = Worker(target, 256, static=static)
        src = ModelDraft(Worker(draft, 256, static=static))
        for _ in run_requests(worker, reqs, method, src):
            pass
        kinds = {key[0].value for key in worker.executor.plans} | {
            key[0].value for key in src.worker.executor.plans}
        return [r.tokens for r in reqs], kinds

    eager, _ = run(False)
    static, kinds = run(True)
    assert static == eager
    assert kinds == {"verify", "draft"}
