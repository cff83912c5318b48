"""Speculative decoding (chain, tree, GSD, n-gram): lossless against AR, and a correct DAG."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, replace

import pytest
import torch
from tiny_models import load_tiny
from treadle.runtime.engine import Worker
from treadle.runtime.gsd import (
    DAG,
    GSDParams,
    ModelDraft,
    NgramDraft,
    NgramTable,
    Node,
    unfold,
)
from treadle.runtime.kv_cache import KVCache
from treadle.runtime.methods import Speculative, run_requests
from treadle.runtime.request import Request
from treadle.runtime.sampling import SamplingParams, probabilities
from treadle.runtime.stats import DecodeStats
from treadle.train.ngram import count_next_tokens


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return load_tiny("llama_gqa_tied", tmp_path_factory.mktemp("t"), num_layers=3)


@pytest.fixture(scope="module")
def draft(tmp_path_factory):
    # A different random model with the same vocabulary: a weak but honest draft.
    return load_tiny("llama_gqa_tied", tmp_path_factory.mktemp("d"), seed=7, num_layers=1)


def prompts_for(seed):
    rng = random.Random(seed)
    # Repetitive prompts give the n-gram draft something to find.
    return [[rng.randrange(20) for _ in range(n)] * 2 for n in (3, 6, 4)]


def ar(target, prompts, params):
    reqs = [Request(p, params, frozenset()) for p in prompts]
    for _ in run_requests(Worker(target, 256), reqs):
        pass
    return [r.tokens for r in reqs]


def speculative(target, draft_src, prompts, params, gsd, check_cache=True):
    reqs = [Request(p, params, frozenset()) for p in prompts]
    worker = Worker(target, 256)
    stats = DecodeStats("spec")
    if draft_src is not None and not isinstance(draft_src, NgramDraft):
        draft_src = ModelDraft(Worker(draft_src, 256))
    method = Speculative(draft="test", **asdict(gsd))
    for _ in run_requests(worker, reqs, method, draft_src, stats):
        pass
    if check_cache:  # every row is back in the pool once the prefix cache lets go
        worker.prefixes.clear()
        assert worker.cache.in_use() == 0
    return [r.tokens for r in reqs], stats


CONFIGS = {
    "chain": GSDParams(k=1, tau=-1, max_depth=4, node_budget=8, prob_threshold=0.0),
    "tree": GSDParams(k=3, tau=-1, max_depth=3, node_budget=16, prob_threshold=0.0,
                      sibling_threshold=0.0),
    "gsd-tau0": GSDParams(k=3, tau=0, max_depth=4, node_budget=16, prob_threshold=0.0,
                          sibling_threshold=0.0),
    "gsd-tau1": GSDParams(k=2, tau=1, max_depth=4, node_budget=12, prob_threshold=0.05),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_greedy_is_token_identical_to_ar(target, draft, name):
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    prompts = prompts_for(1)
    got, stats = speculative(target, draft, prompts, params, CONFIGS[name])
    assert got == ar(target, prompts, params)
    assert stats.steps > 0


@pytest.mark.parametrize("name", ["chain", "gsd-tau0"])
def test_greedy_is_token_identical_to_ar_with_bf16_weights(tmp_path, name):
    # Weight-only bf16 (the fast CPU setting): checks that speculation has no dtype slip on this
    # path (KV writes, draft logits, verify). The tiny model's logit gaps are wide, so the bf16
    # rounding differences between AR's one-row and verify's k-row products cannot flip a token
    # here; on a real model they can at near-ties (README, "Weight precision").
    bf16 = torch.bfloat16
    target = load_tiny("llama_gqa_tied", tmp_path / "t", num_layers=3, weight_dtype=bf16)
    draft = load_tiny("llama_gqa_tied", tmp_path / "d", seed=7, num_layers=1, weight_dtype=bf16)
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    got, stats = speculative(target, draft, prompts_for(4), params, CONFIGS[name])
    assert got == ar(target, prompts_for(4), params)
    assert stats.steps > 0


@pytest.mark.parametrize("name", ["chain", "tree", "gsd-tau0"])
@pytest.mark.parametrize("fmt", ["int4", "int8"])
def test_greedy_is_token_identical_to_ar_with_integer_weights(tmp_path, name, fmt):
    # Integer weights (torch's weight-only CPU kernels, bf16 activations in the products): the
    # products and attention are row-invariant (graph/products.py, graph/backend.py), so a verify
    # step computes every token exactly as AR's one-token steps do.
    from treadle.graph.weights import WeightFormat

    target = load_tiny("llama_gqa_tied", tmp_path / "t", num_layers=3,
                       weight_dtype=WeightFormat(fmt))
    draft = load_tiny("llama_gqa_tied", tmp_path / "d", seed=7, num_layers=1,
                      weight_dtype=WeightFormat(fmt))
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    got, stats = speculative(target, draft, prompts_for(5), params, CONFIGS[name])
    assert got == ar(target, prompts_for(5), params)
    ngram, _ = speculative(target, NgramDraft(), prompts_for(5), params, CONFIGS[name])
    assert ngram == got
    assert stats.steps > 0


def test_the_target_as_its_own_draft_accepts_everything(target):
    params = SamplingParams(max_new_tokens=20, ignore_eos=True)
    p = GSDParams(k=1, tau=-1, max_depth=4, node_budget=8, prob_threshold=0.0)
    got, stats = speculative(target, target, prompts_for(2), params, p)
    assert got == ar(target, prompts_for(2), params)
    assert all(a == 4 for a in stats.accepted[:-3])  # every round but the last accepts all 4


def test_ngram_draft_greedy_is_token_identical(target):
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    got, stats = speculative(target, NgramDraft(), prompts_for(3), params, CONFIGS["gsd-tau0"])
    assert got == ar(target, prompts_for(3), params)


def test_ngram_dag_respects_k_tau_and_budget():
    # Context 7 8 | 1 2 3 | 7 8 | 1 5 | 7 8 | 4 2 3 | 7 8: the three earlier matches of "7 8"
    # continue with 4 2 3 (most recent), 1 5 7 and 1 2 3.
    ctx = [7, 8, 1, 2, 3, 7, 8, 1, 5, 7, 8, 4, 2, 3, 7, 8]
    greedy = SamplingParams()
    draft = NgramDraft(max_ngram=2, max_matches=4)

    def paths(dag):
        tree = unfold(dag, budget=64, max_depth=8)
        leaves = set(range(len(tree.tokens))) - set(tree.parents)
        out = []
        for leaf in sorted(leaves):
            path, i = [], leaf
            while i > 0:
                path.append(tree.tokens[i])
                i = tree.parents[i]
            out.append(path[::-1])
        return sorted(out)

    chain = draft.draft(ctx, GSDParams(k=1, tau=-1, max_depth=3, node_budget=8), greedy)
    assert paths(chain) == [[4, 2, 3]]  # k=1: the most recent continuation alone, a chain
    trie = draft.draft(ctx, GSDParams(k=4, tau=-1, max_depth=3, node_budget=16), greedy)
    assert paths(trie) == [[1, 2, 3], [1, 5, 7], [4, 2, 3]] and trie.merged == 0
    assert len(trie.nodes) == 1 + 3 + 3 + 2  # root, 4 2 3, 1 5 7, 2 3 under the shared 1
    two = draft.draft(ctx, GSDParams(k=2, tau=-1, max_depth=3, node_budget=16), greedy)
    assert paths(two) == paths(trie)  # 1 and 4 are the root's only two next tokens
    merged = draft.draft(ctx, GSDParams(k=4, tau=0, max_depth=3, node_budget=16), greedy)
    # tau=0: the 2 under 1 recurs (not an ancestor) and becomes an edge to the 2 under 4; the 3
    # after it is then already there. The unfolded tree holds the same hypotheses.
    assert merged.merged == 1 and len(merged.nodes) == len(trie.nodes) - 2
    assert paths(merged) == paths(trie)
    for i in range(len(merged.nodes)):
        assert i not in merged.ancestors(i)
    small = draft.draft(ctx, GSDParams(k=4, tau=-1, max_depth=3, node_budget=4), greedy)
    assert len(small.nodes) == 4 and paths(small) == [[4, 2, 3]]
    sampled = draft.draft(ctx, GSDParams(k=4, tau=0, max_depth=3, node_budget=8),
                          SamplingParams(temperature=1.0))
    assert paths(sampled) == [[4, 2, 3]]  # sampling: one chain (a point-mass draft per parent)


def test_ngram_table_draft_greedy_is_token_identical(target):
    # A table that predicts the target's own greedy continuations (counted over them) must be
    # accepted deeply; one counted over noise proposes wrong tokens that must all be rejected.
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    prompts = prompts_for(5)
    want = ar(target, prompts, params)
    rng = random.Random(0)
    noise = [[rng.randrange(211) for _ in range(60)] for _ in range(20)]
    for seqs, deep in (([p + w for p, w in zip(prompts, want)], True), (noise, False)):
        table = NgramTable(count_next_tokens(seqs, order=3, min_count=1), order=3)
        got, stats = speculative(target, NgramDraft(table=table), prompts, params,
                                 CONFIGS["gsd-tau0"])
        assert got == want
        mean = sum(a + 1 for a in stats.accepted) / len(stats.accepted)
        assert (mean > 2.5) if deep else (mean < 2.0), mean


def test_gsd_merges_and_never_makes_a_node_its_own_ancestor(target, draft):
    params = SamplingParams(max_new_tokens=1)
    md = ModelDraft(Worker(draft, 128))
    rows = [md.worker.allocate()]
    draft.forward(md.cache.make_step(rows, [[1, 2, 3]]), md.cache)
    md.cache.extend(rows, [3])
    gen = [torch.Generator()]
    dags = md.draft(rows, [[4]], GSDParams(k=4, tau=0, max_depth=5, node_budget=64,
                                           prob_threshold=0.0, sibling_threshold=0.0), [params],
                    gen)
    dag = dags[0]
    for i in range(len(dag.nodes)):
        assert i not in dag.ancestors(i)
    assert dag.merged > 0, "k=4 over 5 levels of a 211-token random draft should recur"
    tree = unfold(dag, budget=64, max_depth=5)
    # The unfolded tree is a tree over the DAG's edges, BFS-ordered, depth-capped.
    for i, (par, d) in enumerate(zip(tree.parents, tree.dag_ids)):
        if i:
            assert par < i and d in dag.nodes[tree.dag_ids[par]].children
            assert tree.tokens[i] == dag.nodes[d].token
        assert tree.depth(i) <= 5


def test_unfold_duplicates_merged_subtrees_within_budget():
    dag = DAG([Node(9, -1, 0, 1.0, True, in_edges=[])])
    p = GSDParams(k=2, tau=0, max_depth=3, node_budget=64)
    a, _ = dag.add_child(0, 1, 0.5, p, True)  # 9 -> 1
    b, _ = dag.add_child(0, 2, 0.5, p, True)  # 9 -> 2
    c, _ = dag.add_child(a, 3, 0.5, p, True)  # 1 -> 3
    assert dag.add_child(b, 3, 0.5, p, True) == (c, False)  # 2 -> 3 merges into c (tau = 0)
    dag.add_child(c, 4, 0.5, p, True)  # 3 -> 4, reused under both parents
    assert dag.merged == 1 and dag.nodes[b].children == [c]
    tree = unfold(dag, budget=64, max_depth=3)
    assert tree.tokens == [9, 1, 2, 3, 3, 4, 4]
    assert tree.parents == [-1, 0, 0, 1, 2, 3, 4]
    assert unfold(dag, budget=4, max_depth=3).tokens == [9, 1, 2, 3]
    # tau = 1 needs the parent token to match too: 2 -> 3 does not merge with 1 -> 3.
    dag1 = DAG([Node(9, -1, 0, 1.0, True, in_edges=[])])
    p1 = GSDParams(k=2, tau=1, max_depth=3, node_budget=64)
    (a1, _), (b1, _) = dag1.add_child(0, 1, 0.5, p1, True), dag1.add_child(0, 2, 0.5, p1, True)
    dag1.add_child(a1, 3, 0.5, p1, True)
    assert dag1.add_child(b1, 3, 0.5, p1, True)[1]  # a new node


def test_target_cache_holds_only_accepted_tokens(target, draft):
    params = SamplingParams(max_new_tokens=16, ignore_eos=True)
    prompt = prompts_for(4)[0]
    reqs = [Request(prompt, params, frozenset())]
    worker = Worker(target, 256)
    cache = worker.cache
    md = ModelDraft(Worker(draft, 256))
    snapshots = []
    method = Speculative(draft="test", **asdict(CONFIGS["gsd-tau0"]))
    for _ in run_requests(worker, reqs, method, md):
        row = 0
        snapshots.append((cache.lengths[row], cache.k[:, row].clone()))
    tokens = prompt + reqs[0].tokens
    ref = KVCache(target.cfg, rows=1, capacity=128)
    target.forward(ref.make_step([0], [tokens]), ref)
    for length, k in snapshots:
        if length:
            torch.testing.assert_close(k[:, :, :length], ref.k[:, 0, :, :length], atol=1e-4,
                                       rtol=0)


@pytest.mark.parametrize("name", ["chain", "gsd-tau0"])
def test_sampling_preserves_the_target_distribution(tmp_path, name):
    """Chi-square of the second generated token (the first speculated one) against AR's exact
    distribution, on a 16-token vocabulary."""
    small = load_tiny("llama_gqa_tied", tmp_path / "t", vocab_size=16, seed=3, num_layers=2)
    weak = load_tiny("llama_gqa_tied", tmp_path / "d", vocab_size=16, seed=11, num_layers=1)
    prompt = [3, 1, 4, 1, 5]
    params = SamplingParams(max_new_tokens=2, temperature=1.0, ignore_eos=True)
    cache = KVCache(small.cfg, rows=1, capacity=16)
    p1 = probabilities(small.forward(cache.make_step([0], [prompt]), cache), params)[0]
    exact = torch.zeros(16)
    for t1 in range(16):
        c = KVCache(small.cfg, rows=1, capacity=16)
        exact += p1[t1] * probabilities(small.forward(c.make_step([0], [prompt + [t1]]), c),
                                        params)[0]
    gsd = CONFIGS[name]
    counts, n = torch.zeros(16), 0
    for call in range(8):
        p = SamplingParams(max_new_tokens=2, temperature=1.0, ignore_eos=True, seed=call * 250)
        got, _ = speculative(small, weak, [prompt] * 250, p, gsd)
        for toks in got:
            counts[toks[1]] += 1
            n += 1
    keep = exact * n >= 5
    chi2 = float(((counts[keep] - n * exact[keep]) ** 2 / (n * exact[keep])).sum())
    dof = int(keep.sum()) - 1
    assert chi2 < dof + 4 * math.sqrt(2 * dof), (chi2, dof)


def joint_of_three(model, prompt, params):
    """Exact P(t1, t2, t3) of AR sampling under `params` (top-k / top-p included), enumerated:
    [V, V, V]."""
    V = model.cfg.vocab_size

    def next_probs(prefixes):
        cache = KVCache(model.cfg, rows=len(prefixes), capacity=16)
        step = cache.make_step(list(range(len(prefixes))), prefixes)
        return probabilities(model.forward(step, cache), params)  # [N, V]

    p1 = next_probs([prompt])[0]  # [V]
    p2 = next_probs([prompt + [a] for a in range(V)])  # [V, V]
    p3 = next_probs([prompt + [a, b] for a in range(V) for b in range(V)]).view(V, V, V)
    return p1[:, None, None] * p2[:, :, None] * p3


@pytest.mark.parametrize("name,filters", [("chain", dict(top_k=6)), ("gsd-tau0", dict(top_p=0.8))])
def test_sampled_joint_of_three_tokens_matches_ar(tmp_path, name, filters):
    """The joint of the first three generated tokens (two of them speculated, from depth >= 2
    trees), with top-k or top-p, against AR's exact distribution; drafts must be accepted."""
    small = load_tiny("llama_gqa_tied", tmp_path / "t", vocab_size=16, seed=3, num_layers=2)
    near = load_tiny("llama_gqa_tied", tmp_path / "t", vocab_size=16, seed=3, num_layers=2)
    prompt = [3, 1, 4, 1, 5]
    params = SamplingParams(max_new_tokens=3, temperature=1.0, ignore_eos=True, **filters)
    exact = joint_of_three(small, prompt, params).flatten()
    # The same weights as the target: a draft whose proposals the rule should often keep.
    gsd = replace(CONFIGS[name], max_depth=3)
    counts, n, accepted = torch.zeros(exact.numel()), 0, []
    for call in range(6):
        p = replace(params, seed=call * 500)
        got, stats = speculative(small, near, [prompt] * 500, p, gsd)
        accepted += stats.accepted
        for toks in got:
            counts[toks[0] * 256 + toks[1] * 16 + toks[2]] += 1
            n += 1
    assert sum(accepted) / len(accepted) > 1.0  # more than one draft token kept per round
    big = exact * n >= 5
    rest = ~big  # pool the rare cells, so that every cell's expected count is >= 5
    obs = torch.cat([counts[big], counts[rest].sum()[None]])
    exp = torch.cat([exact[big], exact[rest].sum()[None]]) * n
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    dof = int(big.sum())
    assert chi2 < dof + 4 * math.sqrt(2 * dof), (chi2, dof)
