"""Sampling parameters, the processed distribution, seeded draws."""

from __future__ import annotations

import math

import pytest
import torch
from treadle.runtime.sampling import (
    SamplingError,
    SamplingParams,
    make_generators,
    probabilities,
    sample,
)


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_new_tokens", 0),
        ("max_new_tokens", 1.5),
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("top_k", -1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("seed", "x"),
        ("stop", ("",)),
    ],
)
def test_invalid_params_name_the_field(field, value):
    with pytest.raises(SamplingError, match=f"SamplingParams.{field}="):
        SamplingParams(**{field: value})


def test_a_single_stop_string_is_accepted():
    assert SamplingParams(stop="END").stop == ("END",)


def brute_force(logits: torch.Tensor, t: float, k: int, p: float) -> torch.Tensor:
    """Reference written from the definitions, one row at a time, without sorting tricks."""
    out = []
    for row in logits.double():
        probs = torch.softmax(row / t, -1)
        order = sorted(range(len(row)), key=lambda i: -float(row[i]))
        keep = set(order[:k]) if k else set(order)
        kept = [i for i in order if i in keep]
        mass, nucleus = 0.0, []
        sub = probs[kept] / probs[kept].sum()
        for i, q in zip(kept, sub.tolist()):
            nucleus.append(i)
            mass += q
            if mass >= p:
                break
        dist = torch.zeros_like(probs)
        dist[nucleus] = probs[nucleus]
        out.append(dist / dist.sum())
    return torch.stack(out).float()


@pytest.mark.parametrize(
    "t,k,p",
    [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.9, 7, 0.6), (2.0, 1, 1.0), (0.5, 0, 0.05)],
)
def test_probabilities_match_definition(t, k, p):
    logits = torch.randn(4, 23, generator=torch.Generator().manual_seed(0)) * 3
    got = probabilities(logits, SamplingParams(temperature=t, top_k=k, top_p=p))
    torch.testing.assert_close(got, brute_force(logits, t, k, p), atol=1e-6, rtol=1e-5)


def test_greedy_is_argmax_and_one_hot():
    logits = torch.randn(3, 50)
    assert sample(logits, SamplingParams(), []) == logits.argmax(-1).tolist()
    assert torch.equal(probabilities(logits, SamplingParams()).argmax(-1), logits.argmax(-1))


def test_seeded_sampling_is_reproducible_and_per_sequence():
    logits = torch.randn(1, 100).expand(3, 100)
    params = SamplingParams(temperature=1.0, seed=42)

    def draws():
        return sample(logits, params, make_generators(params, 3))

    assert draws() == draws()
    # Sequence i of a batch uses seed + i: the same as sampling it alone with that seed.
    alone_params = SamplingParams(temperature=1.0, seed=43)
    alone = sample(logits[:1], alone_params, make_generators(alone_params, 1))
    assert alone[0] == draws()[1]


def test_empirical_distribution_matches_chi_square():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0]])
    params = SamplingParams(temperature=0.8, top_p=0.95, seed=0)
    expected = probabilities(logits, params)[0]
    gen = make_generators(params, 1)
    n = 6000
    counts = torch.zeros(6)
    for _ in range(n):
        counts[sample(logits, params, gen)[0]] += 1
    kept = expected > 0
    assert counts[~kept].sum() == 0, "a token outside the nucleus was drawn"
    chi2 = float((((counts - n * expected) ** 2) / (n * expected))[kept].sum())
    dof = int(kept.sum()) - 1
    assert chi2 < dof + 4 * math.sqrt(2 * dof) + 10, chi2  # far out in the chi-square tail
