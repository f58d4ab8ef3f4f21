"""Universal neurons: flagged from top counts, removed exactly from circuits."""

from __future__ import annotations

import pytest
import torch

import cna_lens
from cna_lens import circuit_from_attribution
from cna_lens.core.universal import universal_from_counts


def test_threshold_flags_exactly_the_frequent_neurons():
    counts = torch.tensor([[10, 8, 7], [0, 9, 1]])
    u = universal_from_counts(counts, 10, threshold=0.8)
    assert u.pairs == [(0, 0), (0, 1), (1, 1)]
    assert len(universal_from_counts(counts, 10, threshold=1.0)) == 1
    with pytest.raises(cna_lens.CNAError, match="threshold"):
        universal_from_counts(counts, 10, threshold=0.0)


def test_filter_removes_exactly_the_flagged_neurons(llama, prompts):
    pos, neg = prompts
    d = cna_lens.discover_full(
        llama,
        pos,
        neg,
        top_k=20,
        universal_filter=True,
        universal_top_fraction=0.01,
        universal_threshold=0.5,
    )
    flagged = set(d.universal.pairs)
    assert flagged, "this setting flags some neurons on the random model"
    assert d.circuit.provenance.universal_removed == len(flagged)
    assert not (d.circuit.pairs & flagged)
    # the filtered circuit is the top-k of |delta| among the unflagged neurons
    unfiltered = circuit_from_attribution(d.attribution, top_k=20 + len(flagged))
    expected = [n for n in unfiltered if (n.layer, n.neuron) not in flagged][:20]
    assert list(d.circuit) == expected


def test_default_prompt_set_is_diverse_and_shipped():
    prompts = cna_lens.default_universal_prompts()
    assert len(prompts) >= 50 and len(set(prompts)) == len(prompts)
