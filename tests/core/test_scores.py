"""Scores: effect size equals a hand computation, selection ranks by the score while
recording delta, bad scores are refused by name; DiscoveryConfig round-trips and drives
every discovery entry point."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import NEGATIVE, POSITIVE

import cna_lens
from cna_lens import Attribution, CNAError, DiscoveryConfig, NeuronStats
from cna_lens.core.analysis import bootstrap_stability
from cna_lens.core.discovery import circuit_from_attribution
from cna_lens.core.scores import EFFECT_SIZE_EPS, SCORES, compute_score, register_score


def _acts(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randn(7, 3, 10, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, 10)
    neg = torch.randn(5, 3, 10, generator=g, dtype=torch.float64)
    pos[:, 1, 2] += 0.8  # small shift, no extra noise
    pos[:, 2, 9] += 2.0  # larger shift on the noisiest neuron
    return pos, neg


def _attribution(pos, neg) -> Attribution:
    return Attribution(NeuronStats.of(pos), NeuronStats.of(neg))


def test_effect_size_equals_hand_computation():
    pos, neg = _acts()
    a = _attribution(pos, neg)
    n1, n2 = pos.shape[0], neg.shape[0]
    v1, v2 = pos.var(0, unbiased=True), neg.var(0, unbiased=True)
    pooled = ((n1 - 1) * v1 + (n2 - 1) * v2) / (n1 + n2 - 2)
    expected = (pos.mean(0) - neg.mean(0)).abs() / (pooled.sqrt() + EFFECT_SIZE_EPS)
    torch.testing.assert_close(compute_score("effect_size", a), expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(
        compute_score("abs_delta", a), (pos.mean(0) - neg.mean(0)).abs(), rtol=1e-12, atol=1e-12
    )


def test_constant_neurons_get_finite_effect_size():
    pos = torch.zeros(4, 1, 3, dtype=torch.float64)
    neg = torch.zeros(4, 1, 3, dtype=torch.float64)
    pos[:, 0, 1] = 2.0  # constant in both sets, different means: perfect separation
    s = compute_score("effect_size", _attribution(pos, neg))
    assert s.tolist() == [[0.0, 2.0 / EFFECT_SIZE_EPS, 0.0]]


def test_selection_ranks_by_score_and_records_delta():
    pos, neg = _acts(1)
    a = _attribution(pos, neg)
    es = compute_score("effect_size", a)
    c = circuit_from_attribution(a, top_k=4, score="effect_size")
    top = torch.sort(es.flatten(), descending=True, stable=True).indices[:4].tolist()
    assert [n.layer * 10 + n.neuron for n in c] == top
    delta = a.delta
    assert [n.delta for n in c] == [float(delta[n.layer, n.neuron]) for n in c]
    assert [n.mean_negative for n in c] == [float(a.negative.mean[n.layer, n.neuron]) for n in c]
    assert c.provenance.score == "effect_size"
    assert circuit_from_attribution(a, top_k=4).provenance.score == "abs_delta"


def test_user_score_callable_and_registry():
    pos, neg = _acts(2)
    a = _attribution(pos, neg)

    def positive_only(attribution):
        return attribution.delta.clamp_min(0)

    c = circuit_from_attribution(a, top_k=3, score=positive_only)
    assert c.provenance.score == "positive_only" and all(n.delta > 0 for n in c)
    register_score("positive_only_test", positive_only)
    try:
        assert "positive_only_test" in SCORES
        cfg = DiscoveryConfig(top_k=3, score="positive_only_test")
        assert DiscoveryConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
        with pytest.raises(CNAError, match="already registered"):
            register_score("positive_only_test", lambda a: a.delta)
    finally:
        from cna_lens.core import scores as scores

        scores._REGISTRY.pop("positive_only_test")


@pytest.mark.parametrize(
    ("fn", "match"),
    [
        (lambda a: a.delta[0], r"score 'bad' returned shape \[10\], expected"),
        (lambda a: a.delta * float("nan"), "score 'bad' returned 30 NaN or infinite"),
        (lambda a: a.delta.tolist(), "score 'bad' returned list"),
    ],
)
def test_bad_user_scores_are_refused_by_name(fn, match):
    fn.__name__ = "bad"
    with pytest.raises(CNAError, match=match):
        circuit_from_attribution(_attribution(*_acts()), top_k=2, score=fn)


def test_unknown_score_lists_valid_ones():
    with pytest.raises(
        CNAError,
        match=r"unknown score 'cohen'; valid scores: \['abs_delta', "
        r"'effect_size'",
    ):
        DiscoveryConfig(score="cohen")


def test_discovery_config_json_round_trip():
    cfg = DiscoveryConfig(
        top_k=12,
        exclude_layers=[0, 2],
        universal_prompts=["a b", "c"],
        universal_top_fraction=0.01,
        universal_threshold=0.5,
        score="effect_size",
        batch_size=4,
    )
    assert cfg.fraction is None and cfg.exclude_layers == (0, 2)
    back = DiscoveryConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    assert DiscoveryConfig.from_dict(DiscoveryConfig().to_dict()) == DiscoveryConfig()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(fraction=0.0), r"fraction must be in \(0, 1\]"),
        (dict(fraction=None), "exactly one of fraction"),
        (dict(top_k=0), "top_k must be a positive integer"),
        (dict(universal_threshold=1.5), r"universal_threshold must be in \(0, 1\]"),
        (dict(batch_size=0), "batch_size must be a positive integer"),
        (dict(exclude_layers=(-1,)), "exclude_layers"),
        (dict(universal_prompts=[]), "empty"),
    ],
)
def test_discovery_config_validates(kwargs, match):
    with pytest.raises(CNAError, match=match):
        DiscoveryConfig(**kwargs)


def test_from_dict_and_options_refuse_unknown_keys(llama):
    with pytest.raises(CNAError, match=r"unknown discovery config keys \['topk'\]"):
        DiscoveryConfig.from_dict({"topk": 3})
    with pytest.raises(CNAError, match=r"unknown discovery options \['topk'\]"):
        cna_lens.discover(llama, POSITIVE, NEGATIVE, topk=3)
    with pytest.raises(CNAError, match="not both"):
        cna_lens.discover(llama, POSITIVE, NEGATIVE, DiscoveryConfig(top_k=3), top_k=3)
    with pytest.raises(CNAError, match="valid layers are 0..2"):
        cna_lens.discover(llama, POSITIVE, NEGATIVE, top_k=3, exclude_layers=[7])


def test_discover_with_config_equals_keywords(llama):
    kw = dict(
        top_k=7,
        exclude_layers=[0],
        universal_prompts=POSITIVE + NEGATIVE,
        universal_top_fraction=0.02,
        universal_threshold=0.5,
        batch_size=4,
    )
    old = cna_lens.discover_full(llama, POSITIVE, NEGATIVE, **kw)
    new = cna_lens.discover_full(llama, POSITIVE, NEGATIVE, DiscoveryConfig(**kw))
    assert new.circuit == old.circuit and new.config == old.config
    assert torch.equal(new.attribution.delta, old.attribution.delta)
    es = cna_lens.discover(
        llama, POSITIVE, NEGATIVE, DiscoveryConfig(**{**kw, "score": "effect_size"})
    )
    assert es.provenance.score == "effect_size"
    assert es == circuit_from_attribution(
        old.attribution,
        top_k=7,
        exclude_layers=[0],
        score="effect_size",
        universal=old.universal,
        provenance=es.provenance,
    )
    # another size from the same statistics, no forward pass
    assert new.circuit_at(top_k=3).labels == new.circuit.labels[:3]


def test_bootstrap_uses_the_score():
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(30, 2, 16, generator=g) * 0.1
    neg = torch.randn(30, 2, 16, generator=g) * 0.1
    pos[:, 0, 3] += 0.5  # small but clean shift: top by effect size
    pos[:, 1, 5] += 3.0 * torch.randn(30, generator=g).abs() + 1.0  # large, noisy
    s_abs = bootstrap_stability(pos, neg, top_k=1, n_resamples=5)
    s_es = bootstrap_stability(pos, neg, top_k=1, n_resamples=5, score="effect_size")
    assert s_abs.mean == 1.0 and s_es.mean == 1.0
    a = _attribution(pos.double(), neg.double())
    assert circuit_from_attribution(a, top_k=1).labels == ["L1N5"]
    assert circuit_from_attribution(a, top_k=1, score="effect_size").labels == ["L0N3"]
    with pytest.raises(CNAError, match="unknown score"):
        bootstrap_stability(pos, neg, top_k=1, score="nope")
