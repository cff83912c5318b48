"""KV cache and the Step: ragged batches, shared prefixes, trees, commit/rollback."""

from __future__ import annotations

import random

import pytest
import torch
from tiny_models import make_hf_model, save_hf_model
from treadle.graph.config import ModelConfig
from treadle.graph.model import Transformer
from treadle.graph.step import build_mask, tree_from_parents
from treadle.graph.weights import ModelWeights
from treadle.loaders.safetensors_weights import read_state_dict
from treadle.runtime.engine import Worker
from treadle.runtime.kv_cache import KVCache, KVCacheError
from treadle.runtime.methods import run_requests
from treadle.runtime.request import Request
from treadle.runtime.sampling import SamplingParams


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    path = save_hf_model(make_hf_model("llama_odd_untied"), tmp_path_factory.mktemp("m"))
    cfg = ModelConfig.from_json(path)
    return Transformer(cfg, ModelWeights.from_state_dict(read_state_dict(path, cfg), cfg), 256)


def greedy(model, prompts, n=10, share_prefix=True, rows=None):
    params = SamplingParams(max_new_tokens=n, ignore_eos=True)
    reqs = [Request(p, params, frozenset()) for p in prompts]
    worker = Worker(model, 128, prefix_cache=share_prefix)
    for _ in run_requests(worker, reqs):
        pass
    # Finished rows stay in the prefix cache (with the rows they borrow from); clearing it must
    # free every row.
    assert worker.cache.in_use() >= len(worker.prefixes.entries) > 0 or not share_prefix
    worker.prefixes.clear()
    assert worker.cache.in_use() == 0, "rows leaked"
    return [r.tokens for r in reqs]


def test_ragged_batch_equals_each_prompt_alone(model):
    rng = random.Random(0)
    prompts = [[rng.randrange(211) for _ in range(n)] for n in (5, 11, 8, 1)]
    alone = [greedy(model, [p])[0] for p in prompts]
    assert greedy(model, prompts, share_prefix=False) == alone


def test_prefix_shared_batch_equals_each_prompt_alone(model):
    rng = random.Random(1)
    system = [rng.randrange(211) for _ in range(12)]
    prompts = [system + [rng.randrange(211) for _ in range(n)] for n in (3, 1, 6)]
    prompts.append(list(system))  # a prompt that IS the shared prefix
    alone = [greedy(model, [p])[0] for p in prompts]
    assert greedy(model, prompts, share_prefix=True) == alone


def test_fork_reads_prefix_in_place_and_forks_of_forks(model):
    cfg = model.cfg
    cache = KVCache(cfg, rows=4, capacity=64)
    rng = random.Random(2)
    prompt = [rng.randrange(211) for _ in range(9)]
    a = cache.allocate()
    model.forward(cache.make_step([a], [prompt]), cache)
    cache.extend([a], [9])
    b = cache.fork(a, 6)  # b sees a's first 6 slots
    model.forward(cache.make_step([b], [[7, 8]]), cache)
    cache.extend([b], [2])
    c = cache.fork(b, 7)  # c sees a[0:6] + b[6:7]
    step = cache.make_step([c], [[9]])
    got = model.forward(step, cache)
    assert step.kv_rows[0, :6].tolist() == [a] * 6 and step.kv_rows[0, 6].item() == b
    # Reference: the same tokens in a private row.
    ref_cache = KVCache(cfg, rows=1, capacity=64)
    ref = model.forward(ref_cache.make_step([0], [prompt[:6] + [7, 9]]), ref_cache)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(KVCacheError, match="shared"):
        cache.rollback(a, 5)
    # Refcounted: the lender may be freed before its borrowers; its slots stay readable.
    cache.free(a)
    cache.free(b)
    assert cache.in_use() == 3
    torch.testing.assert_close(model.forward(cache.make_step([c], [[9]]), cache), ref,
                               atol=1e-5, rtol=1e-5)
    cache.free(c)
    assert cache.in_use() == 0 and sorted(cache.free_rows) == [0, 1, 2, 3]


def test_fork_of_a_fork_that_borrows_less_than_its_lender(model):
    # b borrows a's first 6 slots and c only b's first 4: c's slots 4.. are its own, not a's.
    cfg = model.cfg
    cache = KVCache(cfg, rows=3, capacity=64)
    rng = random.Random(3)
    prompt = [rng.randrange(211) for _ in range(9)]
    a = cache.allocate()
    model.forward(cache.make_step([a], [prompt]), cache)
    cache.extend([a], [9])
    b = cache.fork(a, 6)
    model.forward(cache.make_step([b], [[7, 8]]), cache)
    cache.extend([b], [2])
    c = cache.fork(b, 4)
    tail = [5, 6, 7, 8]
    step = cache.make_step([c], [tail])
    got = model.forward(step, cache)
    assert step.kv_rows[0, :8].tolist() == [a] * 4 + [c] * 4
    ref_cache = KVCache(cfg, rows=1, capacity=64)
    ref = model.forward(ref_cache.make_step([0], [prompt[:4] + tail]), ref_cache)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    cache.extend([c], [4])
    ref_cache.extend([0], [8])
    got = model.forward(cache.make_step([c], [[9]]), cache)  # a decode step reads them too
    ref = model.forward(ref_cache.make_step([0], [[9]]), ref_cache)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_a_fork_within_what_its_source_borrows_borrows_from_the_lender(model):
    cfg = model.cfg
    cache = KVCache(cfg, rows=4, capacity=64)
    prompt = [random.Random(4).randrange(211) for _ in range(9)]
    a = cache.allocate()
    model.forward(cache.make_step([a], [prompt]), cache)
    cache.extend([a], [9])
    b = cache.fork(a, 6)
    model.forward(cache.make_step([b], [[7, 8]]), cache)
    cache.extend([b], [2])
    c = cache.fork(b, 4)  # slots a holds: borrowed from a, so b stays free to go
    assert cache.lender[c] == (a, 4) and cache.refs[b] == 1 and cache.refs[a] == 3
    d = cache.fork(b, 7)  # slot 6 is b's own: borrowed from b (which reads 0..5 from a)
    assert cache.lender[d] == (b, 7)
    step = cache.make_step([d], [[3]])
    got = model.forward(step, cache)
    assert step.kv_rows[0, :8].tolist() == [a] * 6 + [b, d]
    ref_cache = KVCache(cfg, rows=1, capacity=64)
    ref = model.forward(ref_cache.make_step([0], [prompt[:6] + [7, 3]]), ref_cache)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    for row in (b, c, d, a):
        cache.free(row)
    assert cache.in_use() == 0


def random_parents(rng, n):
    return [rng.randrange(-1, i) if i else -1 for i in range(n)]


def ancestors_path(parents, i):
    path = []
    while i >= 0:
        path.append(i)
        i = parents[i]
    return path[::-1]


@pytest.mark.parametrize("seed", range(4))
def test_tree_step_equals_each_branch_decoded_as_a_chain(model, seed):
    rng = random.Random(seed)
    prefix = [rng.randrange(211) for _ in range(rng.randrange(1, 10))]
    n = rng.randrange(2, 12)
    parents = random_parents(rng, n)
    nodes = [rng.randrange(211) for _ in range(n)]
    cache = KVCache(model.cfg, rows=2, capacity=64)
    row = cache.allocate()
    model.forward(cache.make_step([row], [prefix]), cache)
    cache.extend([row], [len(prefix)])
    tree_logits = model.forward(
        cache.make_step([row], [nodes], tree=tree_from_parents(parents), logits="all"), cache
    )[0]  # [n, V]
    for i in range(n):
        chain = prefix + [nodes[j] for j in ancestors_path(parents, i)]
        ref_cache = KVCache(model.cfg, rows=1, capacity=64)
        ref = model.forward(ref_cache.make_step([0], [chain]), ref_cache)[0]
        torch.testing.assert_close(tree_logits[i], ref, atol=1e-5, rtol=1e-5)

    # Commit one branch: the cache must equal a cache that only ever saw that branch.
    leaf = rng.randrange(n)
    path = ancestors_path(parents, leaf)
    cache.commit(row, [len(prefix) + j for j in path])
    chain = prefix + [nodes[j] for j in path]
    assert cache.lengths[row] == len(chain)
    ref_cache = KVCache(model.cfg, rows=1, capacity=64)
    model.forward(ref_cache.make_step([0], [chain]), ref_cache)
    k = len(chain)
    torch.testing.assert_close(cache.k[:, row, :, :k], ref_cache.k[:, 0, :, :k], atol=1e-5, rtol=0)
    torch.testing.assert_close(cache.v[:, row, :, :k], ref_cache.v[:, 0, :, :k], atol=1e-5, rtol=0)


def test_batched_trees_over_ragged_prefixes(model):
    rng = random.Random(7)
    cache = KVCache(model.cfg, rows=3, capacity=64)
    prefixes = [[rng.randrange(211) for _ in range(n)] for n in (4, 9)]
    rows = [cache.allocate() for _ in prefixes]
    model.forward(cache.make_step(rows, prefixes), cache)
    cache.extend(rows, [4, 9])
    parents = [[-1, 0, 0, 1], [-1, -1, 1, 2]]
    nodes = [[rng.randrange(211) for _ in range(4)] for _ in rows]
    tree = torch.stack([tree_from_parents(p) for p in parents])
    got = model.forward(cache.make_step(rows, nodes, tree=tree, logits="all"), cache)
    for b in range(2):
        for i in range(4):
            chain = prefixes[b] + [nodes[b][j] for j in ancestors_path(parents[b], i)]
            ref_cache = KVCache(model.cfg, rows=1, capacity=64)
            ref = model.forward(ref_cache.make_step([0], [chain]), ref_cache)[0]
            torch.testing.assert_close(got[b, i], ref, atol=1e-5, rtol=1e-5)


def test_rollback_then_decode_is_as_if_never_decoded(model):
    cache = KVCache(model.cfg, rows=1, capacity=64)
    row = cache.allocate()
    model.forward(cache.make_step([row], [[1, 2, 3]]), cache)
    cache.extend([row], [3])
    model.forward(cache.make_step([row], [[50, 60, 70]]), cache)
    cache.extend([row], [3])
    cache.rollback(row, 3)
    got = model.forward(cache.make_step([row], [[4]]), cache)
    ref_cache = KVCache(model.cfg, rows=1, capacity=64)
    ref = model.forward(ref_cache.make_step([0], [[1, 2, 3, 4]]), ref_cache)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_mask_matches_brute_force():
    rng = random.Random(3)
    for _ in range(20):
        batch, width = rng.randrange(1, 4), rng.randrange(1, 6)
        starts = torch.tensor([rng.randrange(0, 5) for _ in range(batch)])
        n_new = torch.tensor([rng.randrange(1, width + 1) for _ in range(batch)])
        tree = torch.stack([tree_from_parents(random_parents(rng, width)) for _ in range(batch)])
        kv_len = int((starts + n_new).max())
        mask = build_mask(starts, n_new, tree, kv_len)[:, 0]
        for b in range(batch):
            for i in range(int(n_new[b])):
                for s in range(kv_len):
                    rel = s - int(starts[b])
                    want = rel < 0 or (rel < int(n_new[b]) and bool(tree[b, i, rel]))
                    assert bool(mask[b, i, s]) == want, (b, i, s)


def test_exhaustion_is_a_clear_error(model):
    cache = KVCache(model.cfg, rows=1, capacity=8)
    row = cache.allocate()
    with pytest.raises(KVCacheError, match="exhausted.*row 0.*capacity of 8"):
        cache.make_step([row], [list(range(9))])
    with pytest.raises(KVCacheError, match="all 1 rows are in use"):
        cache.allocate()
