"""APAR's fork machinery on tiny random models with scripted forks: every stream decodes exactly as
its own prompt alone, the KV prefix is stored once, the bans hold, and the answer reassembles."""

from __future__ import annotations

import random
from dataclasses import asdict

import pytest
import torch
from tiny_models import load_tiny
from treadle.runtime.apar import APAR, Family, reassemble
from treadle.runtime.engine import Engine, Stream, Worker
from treadle.runtime.gsd import GSDParams, NgramDraft
from treadle.runtime.methods import AR, Speculative, make_policy
from treadle.runtime.request import Request
from treadle.runtime.sampling import SamplingParams
from treadle.runtime.stats import DecodeStats

FORK, CHILD, EOS = 200, 201, 5
GSD = GSDParams(k=2, tau=0, max_depth=3, node_budget=12, prob_threshold=0.0,
                sibling_threshold=0.0)


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return load_tiny("llama_gqa_tied", tmp_path_factory.mktemp("a"), num_layers=2)


def script(prompt_len: int, fork_at: set[int], eos_at: set[int] = frozenset()):
    """Boost [Fork] (or EOS) at given generated positions of the root stream (a child's context
    holds [Child]): scripted forks, which the bans may still overrule."""

    def process(context, logits):
        if CHILD in context:
            return logits
        out = logits.clone()
        pos = len(context) - prompt_len
        if pos in fork_at:
            out[FORK] += 1e4
        if pos in eos_at:
            out[EOS] += 1e4
        return out

    return process


def run(model, method, prompt, n, processor=None, draft=None, temperature=0.0, seed=None):
    worker = Worker(model, 256)
    engine = Engine(worker, lambda m: make_policy(m, worker.executor, draft))
    params = SamplingParams(max_new_tokens=n, temperature=temperature, seed=seed)
    gen = torch.Generator().manual_seed(seed or 0)
    root = engine.add(Stream(Request(list(prompt), params, frozenset({EOS})), method,
                             list(prompt), gen, DecodeStats("apar"), processor))
    peak = 0
    while root.group.live():
        engine.step()
        peak = max(peak, root.group.live())
    return root.group, worker, peak


def alone(model, prompt, n, processor):
    worker = Worker(model, 256)
    engine = Engine(worker, lambda m: make_policy(m, worker.executor))
    s = engine.add(Stream(Request(list(prompt), SamplingParams(max_new_tokens=n),
                                  frozenset({EOS})), AR(), list(prompt), None, DecodeStats("ar"),
                          processor))
    for _ in engine.run([s]):
        pass
    return s.request.tokens


def ban(ids):
    def process(context, logits):
        out = logits.clone()
        out[list(ids)] = -float("inf")
        return out

    return process


@pytest.mark.parametrize("base", ["ar", "gsd-ngram"])
def test_every_stream_decodes_as_its_own_prompt_alone(model, base):
    rng = random.Random(1)
    prompt = [rng.randrange(20) for _ in range(6)] * 2
    method = APAR(base=None if base == "ar" else Speculative(draft="ngram", **asdict(GSD)),
                  fork_id=FORK, child_id=CHILD)
    draft = None if base == "ar" else NgramDraft()
    family, worker, _ = run(model, method, prompt, 60, script(len(prompt), {2, 7}), draft)
    root, children = family.root, [s for s in family.streams if s.parent is not None]
    assert len(children) == 2 and family.max_depth() == 2
    assert [family.fork_at[id(c)] for c in children] == [2, 7]
    assert sum(family.tokens_per_stream()) <= 60
    # The root, with its forks, is what it would be without them (same processor, Child banned).
    n_root = len(root.request.tokens)
    root_alone = alone(model, prompt, n_root, lambda c, lg: ban([CHILD])(c, script(
        len(prompt), {2, 7})(c, lg)))
    assert root.request.tokens == root_alone
    for child in children:
        # A child is its own prompt (the parent's sequence to its [Fork], then [Child]) decoded
        # alone, with both control tokens banned at depth 2.
        own_prompt = child.request.prompt
        got = child.request.tokens
        assert got[0] == CHILD and own_prompt[-1] == CHILD and own_prompt[-2] == FORK
        assert got[1:] == alone(model, own_prompt, len(got) - 1, ban([FORK, CHILD]))
    worker.prefixes.clear()
    assert worker.cache.in_use() == 0


def test_the_shared_prefix_is_stored_once(model):
    prompt = list(range(10, 40))
    method = APAR(fork_id=FORK, child_id=CHILD)
    worker = Worker(model, 256, prefix_cache=False)
    engine = Engine(worker, lambda m: make_policy(m, worker.executor))
    root = engine.add(Stream(Request(prompt, SamplingParams(max_new_tokens=40),
                                     frozenset()), method, list(prompt), None,
                             DecodeStats("apar"), script(len(prompt), {1, 4, 6})))
    measured = []
    while root.group.live():
        engine.step()
        cache = worker.cache
        streams = [s for s in root.group.streams if s.row >= 0 and not s.finished]
        private = sum(cache.lengths[s.row] - (cache.lender[s.row] or (0, 0))[1] for s in streams)
        unshared = sum(cache.lengths[s.row] for s in streams)
        measured.append((private, unshared, len(streams)))
    # With three children reading the root's prefix in place, the slots stored are the root's row
    # once plus each child's own tail: far fewer than every stream holding its whole sequence.
    private, unshared, n = max(measured, key=lambda m: m[2])
    assert n == 4 and private < unshared - 2 * len(prompt)


def test_bans_hold(model):
    prompt = list(range(50, 62))
    # Boost a fork at every position: the bans must still keep [Fork] off right after a control
    # token, out of children (max_depth=2), and the live streams within max_streams.
    method = APAR(fork_id=FORK, child_id=CHILD, max_streams=3)
    family, _, peak = run(model, method, prompt, 50, script(len(prompt), set(range(50))))
    assert peak <= 3
    for s in family.streams:
        toks = s.request.tokens
        assert CHILD not in (toks[1:] if s.parent is not None else toks)
        assert all(not (a in (FORK, CHILD) and b == FORK) for a, b in zip(toks, toks[1:]))
        if s.parent is not None:
            assert FORK not in toks
    assert len(family.streams) == 3  # the root forked until the stream limit


def test_parent_ending_before_its_children(model):
    prompt = list(range(70, 84))
    method = APAR(fork_id=FORK, child_id=CHILD)
    family, worker, _ = run(model, method, prompt, 40, script(len(prompt), {1}, eos_at={3}))
    root, child = family.root, family.streams[1]
    assert root.request.finish_reason == "eos" and len(root.request.tokens) == 4
    assert len(child.request.tokens) > 4  # it went on after its parent ended
    assert child.request.tokens[1:] == alone(model, child.request.prompt,
                                             len(child.request.tokens) - 1, ban([FORK, CHILD]))
    worker.prefixes.clear()
    assert worker.cache.in_use() == 0


def test_sampled_apar_runs_with_the_bans(model):
    method = APAR(fork_id=FORK, child_id=CHILD)
    prompt = list(range(30, 42))
    family, _, _ = run(model, method, prompt, 40, script(len(prompt), {2, 5}), temperature=1.0,
                       seed=3)
    assert len(family.streams) >= 3 and sum(family.tokens_per_stream()) <= 40
    for s in family.streams:
        assert CHILD not in (s.request.tokens[1:] if s.parent else s.request.tokens)


def test_reassembly_of_a_hand_made_fork_tree():
    words = {1: "1. Plan:", 2: " 2. Build:", 3: " Done.", 10: " write it down.", 11: " test it.",
             FORK: "<F>", CHILD: "<C>"}

    def decode(tokens):
        return "".join(words[t] for t in tokens if t not in (FORK, CHILD))

    def stream(tokens, parent=None):
        s = Stream(Request([0], SamplingParams(max_new_tokens=50), frozenset()), AR(), [0],
                   None, DecodeStats("t"), parent=parent)
        s.request.tokens = list(tokens)
        return s

    root = stream([1, FORK, 2, FORK, 3])
    a, b = stream([CHILD, 10], root), stream([CHILD, 11], root)
    family = Family(root, 50, [root, a, b], {id(root): 1, id(a): 2, id(b): 2},
                    {id(a): 1, id(b): 3})
    assert reassemble(family, decode) == (
        "1. Plan:\nwrite it down.\n\n 2. Build:\ntest it.\n\n Done.")
    # A paragraph (not a numbered item) takes its detail after a space.
    words[1] = "Intro."
    assert reassemble(family, decode).startswith("Intro. write it down.\n\n")
