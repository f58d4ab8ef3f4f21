"""Analysis: layer distribution, overlap, chance overlap, random control, bootstrap stability."""

from __future__ import annotations

import random

import pytest
import torch

from cna_lens.core.analysis import (
    bootstrap_stability,
    chance_intersection,
    circuit_overlap,
    jaccard,
    layer_distribution,
    random_control_circuit,
)
from cna_lens.core.circuit import Circuit, Neuron
from cna_lens.core.selection import select_top_k
from cna_lens.errors import CNAError


def _circuit(pairs, n_layers=8, d_mlp=16):
    return Circuit.from_pairs(pairs, n_layers=n_layers, d_mlp=d_mlp)


def test_layer_distribution_by_hand():
    # 12 layers: last 10% = ceil(1.2) = 2 layers, last quarter = 3 layers, last 3 = 3 layers
    counts = [1, 0, 0, 0, 0, 0, 0, 0, 0, 2, 3, 4]
    d = layer_distribution(counts)
    assert d.total == 10
    assert d.frac_last_layer == pytest.approx(0.4)
    assert d.frac_last_3 == pytest.approx(0.9)
    assert d.frac_last_10pct == pytest.approx(0.7)
    assert d.frac_last_quarter == pytest.approx(0.9)
    assert d.per_layer == tuple(counts)
    assert sum(d.fractions) == pytest.approx(1.0)


def test_layer_distribution_of_circuit_matches_counts():
    c = _circuit([(7, 1), (7, 2), (6, 0), (0, 3)])
    d = layer_distribution(c)
    assert d.per_layer == (1, 0, 0, 0, 0, 0, 1, 2)
    assert d.frac_last_layer == 0.5
    assert d.frac_last_quarter == 0.75  # last 2 of 8 layers
    assert d.to_dict()["per_layer"] == [1, 0, 0, 0, 0, 0, 1, 2]


def test_layer_distribution_small_models_and_errors():
    d = layer_distribution([2, 2])  # 2 layers: last 3 is both layers, last 10% is 1 layer
    assert d.frac_last_3 == 1.0 and d.frac_last_10pct == 0.5
    assert layer_distribution([0, 0, 0]).frac_last_layer == 0.0
    with pytest.raises(CNAError, match="empty"):
        layer_distribution([])
    with pytest.raises(CNAError, match=">= 0"):
        layer_distribution([1, -1])


def test_overlap_with_itself_is_one():
    c = _circuit([(7, 1), (7, 2), (6, 0), (0, 3)])
    o = circuit_overlap(c, c)
    assert o.overlap_fraction == 1.0 and o.jaccard == 1.0 and o.intersection == 4
    assert o.layer_cosine == pytest.approx(1.0) and o.layer_similarity == pytest.approx(1.0)
    assert o.per_layer_intersection == o.per_layer_a
    assert o.per_layer_overlap_fraction[7] == 1.0 and o.per_layer_overlap_fraction[1] is None


def test_overlap_by_hand():
    a = _circuit([(7, 1), (7, 2), (6, 0), (0, 3)])
    b = _circuit([(7, 1), (7, 5), (5, 0), (0, 3)])
    o = circuit_overlap(a, b)
    assert o.intersection == 2
    assert o.overlap_fraction == 0.5
    assert o.jaccard == pytest.approx(2 / 6)
    assert o.per_layer_intersection == (1, 0, 0, 0, 0, 0, 0, 1)
    # chance: layer 0: 1*1/16, layer 7: 2*2/16 -> 5/16 expected neurons in common, / k = 4
    assert o.chance_intersection == pytest.approx(5 / 16)
    assert o.chance_overlap_fraction == pytest.approx(5 / 64)
    # layer distributions: a = [.25,0,0,0,0,0,.25,.5], b = [.25,0,0,0,0,.25,0,.5] -> TV 0.25
    assert o.layer_similarity == pytest.approx(0.75)
    assert o.layer_cosine == pytest.approx(5 / 6)
    assert o.to_dict()["per_layer_a"] == [1, 0, 0, 0, 0, 0, 1, 2]


def test_overlap_rejects_other_grids():
    with pytest.raises(CNAError, match="different grids"):
        circuit_overlap(_circuit([(0, 1)]), _circuit([(0, 1)], d_mlp=32))


def test_chance_overlap_matches_monte_carlo():
    counts_a, counts_b, d_mlp = [3, 0, 5, 8], [2, 4, 6, 8], 20
    expected = sum(chance_intersection(counts_a, counts_b, d_mlp))
    rng = random.Random(0)
    trials, total = 20_000, 0
    for _ in range(trials):
        for a, b in zip(counts_a, counts_b, strict=True):
            sa = set(rng.sample(range(d_mlp), a))
            total += sum(1 for j in rng.sample(range(d_mlp), b) if j in sa)
    assert total / trials == pytest.approx(expected, rel=0.03)
    assert expected == pytest.approx((3 * 2 + 0 * 4 + 5 * 6 + 8 * 8) / 20)


def test_chance_intersection_validates():
    with pytest.raises(CNAError, match="layers"):
        chance_intersection([1], [1, 2], 8)
    with pytest.raises(CNAError, match="outside"):
        chance_intersection([9], [1], 8)


def test_random_control_same_counts_disjoint_and_seeded():
    c = _circuit([(7, 1), (7, 2), (6, 0), (0, 3), (0, 4)])
    r = random_control_circuit(c, seed=3)
    assert r.per_layer_counts() == c.per_layer_counts()
    assert not (r.pairs & c.pairs)
    assert random_control_circuit(c, seed=3) == r
    assert random_control_circuit(c, seed=4).pairs != r.pairs
    excl = torch.zeros(8, 16, dtype=torch.bool)
    excl[7, :10] = True
    r2 = random_control_circuit(c, seed=0, exclude=excl)
    assert all(n.neuron >= 10 for n in r2 if n.layer == 7)
    full = _circuit([(0, j) for j in range(10)], d_mlp=16)
    with pytest.raises(CNAError, match="fewer than"):
        random_control_circuit(full, seed=0, exclude=torch.ones(8, 16, dtype=torch.bool))


def test_jaccard():
    assert jaccard(frozenset(), frozenset()) == 1.0
    assert jaccard(frozenset({(0, 1)}), frozenset({(0, 2)})) == 0.0


def test_bootstrap_stability_separable_signal_is_stable():
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(40, 4, 32, generator=g) * 0.1
    neg = torch.randn(40, 4, 32, generator=g) * 0.1
    pos[:, 3, :4] += 5.0  # four neurons separate the sets by a wide margin
    s = bootstrap_stability(pos, neg, top_k=4, n_resamples=30, seed=1)
    assert s.n_resamples == 30 and s.k == 4
    assert s.min == 1.0 and s.mean == 1.0
    full = select_top_k(pos.double().mean(0) - neg.double().mean(0), top_k=4)
    assert full.pairs == {(3, 0), (3, 1), (3, 2), (3, 3)}
    d = s.to_dict()
    assert d["jaccard_mean"] == 1.0 and len(d["jaccards"]) == 30


def test_bootstrap_stability_noise_is_unstable_and_seeded():
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(10, 3, 64, generator=g)
    neg = torch.randn(10, 3, 64, generator=g)
    s = bootstrap_stability(pos, neg, top_k=5, n_resamples=40, seed=2)
    assert 0.0 <= s.min <= s.mean < 0.8
    assert bootstrap_stability(pos, neg, top_k=5, n_resamples=40, seed=2) == s


def test_bootstrap_respects_exclusions_and_validates():
    pos = torch.zeros(5, 2, 8)
    neg = torch.zeros(5, 2, 8)
    pos[:, 0, 0] = 10.0
    pos[:, 1, 1] = 1.0
    excl = torch.zeros(2, 8, dtype=torch.bool)
    excl[0, 0] = True
    s = bootstrap_stability(pos, neg, top_k=1, exclude=excl, n_resamples=3)
    assert s.mean == 1.0
    with pytest.raises(CNAError, match="neuron grids"):
        bootstrap_stability(pos, torch.zeros(5, 2, 9), top_k=1)
    with pytest.raises(CNAError, match="n_resamples"):
        bootstrap_stability(pos, neg, top_k=1, n_resamples=0)


def test_circuit_neuron_delta_kept_in_control():
    c = Circuit((Neuron(1, 2, -0.5),), n_layers=2, d_mlp=4)
    r = random_control_circuit(c, seed=0)
    assert len(r) == 1 and r.neurons[0].layer == 1 and r.neurons[0].delta == 0.0
