"""SkipDecode: the schedule, KV consistency without recomputation, the lossless self-spec mode."""

from __future__ import annotations

import math
import random

import pytest
import torch
from tiny_models import load_tiny
from treadle.graph.skip import ScheduleError, SkipSchedule
from treadle.runtime.engine import Worker
from treadle.runtime.kv_cache import KVCache
from treadle.runtime.methods import SelfSpec, SkipDecode, run_requests
from treadle.runtime.request import Request
from treadle.runtime.sampling import SamplingParams, probabilities
from treadle.runtime.stats import DecodeStats


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_tiny("llama_gqa_tied", tmp_path_factory.mktemp("s"), num_layers=8)


def test_schedule_shape_and_monotonicity():
    s = SkipSchedule(num_layers=12, max_layers=10, min_layers=4, warmup_layers=2, decay_length=20)
    counts = [s.layer_count(t) for t in range(40)]
    assert counts[0] == 10 and counts[-1] == 4
    assert all(a >= b for a, b in zip(counts, counts[1:]))
    for t in range(40):
        layers = s.layers_at(t)
        assert layers[:2] == [0, 1] and layers[2:] == list(range(12 - (counts[t] - 2), 12))
        if t:  # a later token's layers are a subset of an earlier token's
            assert set(layers) <= set(s.layers_at(t - 1))


@pytest.mark.parametrize("speedup", [1.5, 2.0, 3.0])
def test_schedule_for_speedup_hits_the_mean(speedup):
    s = SkipSchedule.for_speedup(30, speedup, tokens=128)
    assert abs(s.mean_layers(128) - 30 / speedup) <= 0.5


def test_bad_schedules_are_clear_errors():
    with pytest.raises(ScheduleError, match="warmup_layers < min_layers"):
        SkipSchedule(num_layers=8, max_layers=6, min_layers=2, warmup_layers=2, decay_length=4)
    with pytest.raises(ScheduleError, match="max_layers <= num_layers"):
        SkipSchedule(num_layers=8, max_layers=9, min_layers=4, warmup_layers=1, decay_length=4)
    with pytest.raises(ScheduleError, match="speedup 0.5"):
        SkipSchedule.for_speedup(8, 0.5, 10)


class TrackingCache(KVCache):
    """Records which layers wrote each (row, slot) and asserts every slot a step reads was written
    at that layer: the proof that skipping layers never needs a recomputed key or value."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        L, R = self.k.shape[:2]
        self.written = torch.zeros(L, R, self.capacity + 1, dtype=torch.bool)
        self.reads = 0
        self.layer_tokens = 0  # (layer, new token) pairs the forward actually ran

    def write(self, layer, step, k, v):
        super().write(layer, step, k, v)
        self.layer_tokens += int(step.n_new.sum())
        for b, row in enumerate(step.rows.tolist()):
            s0, n = int(step.starts[b]), int(step.n_new[b])
            self.written[layer, row, s0 : s0 + n] = True

    def read(self, layer, step):
        for b, row in enumerate(step.rows.tolist()):
            end = int(step.starts[b] + step.n_new[b])
            rows = [row] * end if step.kv_rows is None else step.kv_rows[b, :end].tolist()
            for slot, r in enumerate(rows):
                assert self.written[layer, r, slot], f"layer {layer} reads unwritten slot {slot}"
        self.reads += 1
        return super().read(layer, step)


def test_skipdecode_batch_never_reads_a_key_it_did_not_compute(model):
    rng = random.Random(0)
    prompts = [[rng.randrange(211) for _ in range(n)] for n in (3, 9, 5)]
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    reqs = [Request(p, params, frozenset()) for p in prompts]
    cache = TrackingCache(model.cfg, rows=5, capacity=64)
    schedule = SkipSchedule(num_layers=8, max_layers=7, min_layers=3, warmup_layers=1,
                            decay_length=16)
    stats = DecodeStats("skipdecode")
    worker = Worker(model, 64, cache=cache)
    for _ in run_requests(worker, reqs, SkipDecode(schedule=schedule), stats=stats):
        pass
    assert cache.reads > 0 and all(len(r.tokens) == 24 for r in reqs)
    # Mean layers per token: the first token from the full-depth prompt step, then the schedule.
    expected = (8 + sum(schedule.layer_count(t) for t in range(23))) / 24
    assert stats.mean_layers == pytest.approx(expected)
    # ... and that is what the forward ran: every layer run writes its K/V once per token. The
    # prompts ran all 8 layers; each first token is counted at the prompt's depth.
    decode_layer_tokens = cache.layer_tokens - 8 * sum(len(p) for p in prompts)
    assert stats.layers_computed == decode_layer_tokens + 8 * len(prompts)
    assert SkipDecode(schedule=schedule).schedule_for(8, 24) is schedule


def ar_tokens(model, prompts, params):
    reqs = [Request(p, params, frozenset()) for p in prompts]
    for _ in run_requests(Worker(model, 96), reqs):
        pass
    return [r.tokens for r in reqs]


@pytest.mark.parametrize("k,draft", [(1, [0, 7]), (3, [0, 1, 6, 7]), (5, [0, 4, 5, 6, 7]),
                                     (4, list(range(8)))])
def test_selfspec_greedy_is_token_identical_to_ar(model, k, draft):
    rng = random.Random(k)
    prompts = [[rng.randrange(211) for _ in range(n)] for n in (4, 11, 7)]
    params = SamplingParams(max_new_tokens=30, ignore_eos=True)
    reqs = [Request(p, params, frozenset()) for p in prompts]
    cache = TrackingCache(model.cfg, rows=5, capacity=96)
    stats = DecodeStats("selfspec")
    method = SelfSpec(k=k, layers=tuple(draft), adaptive=False)
    for _ in run_requests(Worker(model, 96, cache=cache), reqs, method, stats=stats):
        pass
    assert [r.tokens for r in reqs] == ar_tokens(model, prompts, params)
    if draft == list(range(8)):  # the draft IS the model: every draft token is accepted
        assert all(a == k for a in stats.accepted)


def test_adaptive_selfspec_is_lossless_and_counts_its_plain_steps(model):
    rng = random.Random(9)
    prompts = [[rng.randrange(211) for _ in range(n)] for n in (6, 3)]
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    reqs = [Request(p, params, frozenset()) for p in prompts]
    stats = DecodeStats("selfspec")
    method = SelfSpec(k=3, layers=(0, 7), adaptive=True)
    for _ in run_requests(Worker(model, 96), reqs, method, stats=stats):
        pass
    assert [r.tokens for r in reqs] == ar_tokens(model, prompts, params)
    # It measured both kinds of step: at least one draft round and one plain step.
    assert stats.accepted and stats.plain_steps >= 1
    assert stats.steps == len(stats.accepted) // len(prompts) + stats.plain_steps


def test_adaptive_selfspec_probes_less_often_while_drafting_loses(model, monkeypatch):
    """A probe that loses doubles the plain run before the next one (up to the cap); a probe that
    wins brings the interval back. Timings are scripted: a draft round emits 1 token in 4 time
    units (a losing round), a plain step 1 token in 1 unit."""
    from treadle.runtime import skipdecode

    clock = [0.0]
    monkeypatch.setattr(skipdecode.time, "perf_counter", lambda: clock[0])
    policy = skipdecode.SelfSpecPolicy(Worker(model, 96).executor, [0, 7], k=3, probe_every=4,
                                       max_probe_every=16)
    kinds: list[str] = []
    cost = {"draft": 4.0, "plain": 1.0}

    class FakeRequest:
        tokens: list[int] = []

    class FakeStream:
        request = FakeRequest()
        stats = DecodeStats("selfspec")

    def fake(kind):
        def run(*args):
            kinds.append(kind)
            FakeStream.request.tokens.append(0)
            clock[0] += cost[kind]
        return run

    monkeypatch.setattr(policy, "draft_round", fake("draft"))
    monkeypatch.setattr(policy.plain, "step", fake("plain"))
    for _ in range(60):
        policy.round(None, [FakeStream()])
    runs = "".join("d" if k == "draft" else "." for k in kinds)
    # measure both, then probes after 4, 8, 16, 16, ... plain steps
    assert runs.startswith("d" + "." * 4 + "d" + "." * 8 + "d" + "." * 16 + "d" + "." * 16 + "d")
    cost["draft"] = 0.5  # drafting now pays: within two probes (moving averages) it takes over
    for _ in range(80):
        policy.round(None, [FakeStream()])
    assert kinds[-3:] == ["draft"] * 3 and policy.probe_interval == 4


def test_selfspec_method_draft_layers():
    assert SelfSpec(draft_speedup=2.0, warmup_layers=2).draft_layers(30) == [0, 1] + list(
        range(17, 30))


def test_selfspec_sampling_preserves_the_target_distribution(tmp_path):
    """Chi-square of the second generated token against AR's exact distribution (enumerated)."""
    small = load_tiny("llama_gqa_tied", tmp_path, vocab_size=16, seed=3, num_layers=4)
    prompt = [3, 1, 4, 1, 5]
    params = SamplingParams(max_new_tokens=2, temperature=1.0, ignore_eos=True)
    # Exact: P(t2) = sum_t1 P(t1) P(t2 | t1), from the full model.
    cache = KVCache(small.cfg, rows=1, capacity=16)
    p1 = probabilities(small.forward(cache.make_step([0], [prompt]), cache), params)[0]
    seconds = torch.zeros(16)
    for t1 in range(16):
        c = KVCache(small.cfg, rows=1, capacity=16)
        seconds += p1[t1] * probabilities(small.forward(c.make_step([0], [prompt + [t1]]), c),
                                          params)[0]
    counts = torch.zeros(16)
    batch, calls = 250, 8
    for call in range(calls):
        p = SamplingParams(max_new_tokens=2, temperature=1.0, ignore_eos=True, seed=call * batch)
        reqs = [Request(prompt, p, frozenset()) for _ in range(batch)]
        method = SelfSpec(k=2, layers=(0, 3), adaptive=False)
        for _ in run_requests(Worker(small, 16), reqs, method):
            pass
        for r in reqs:
            counts[r.tokens[1]] += 1
    n = batch * calls
    keep = seconds * n >= 5  # chi-square needs expected counts of at least ~5
    chi2 = float(((counts[keep] - n * seconds[keep]) ** 2 / (n * seconds[keep])).sum())
    dof = int(keep.sum()) - 1
    assert chi2 < dof + 4 * math.sqrt(2 * dof), (chi2, dof)
