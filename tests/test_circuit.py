"""Circuit: exact top-k selection, immutability, JSON round-trip, validation, bad input."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

import cna_lens
from cna_lens import Circuit, CircuitMismatchError, CNAError, Neuron
from cna_lens.circuit import select_top_k


def test_selection_is_exact_top_k_with_sign():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(4, 50, generator=g, dtype=torch.float64)
    c = select_top_k(delta, top_k=10)
    flat = delta.flatten()
    expected = flat.abs().topk(10).indices.tolist()
    assert [n.layer * 50 + n.neuron for n in c] == expected
    assert [n.delta for n in c] == [flat[i].item() for i in expected]
    assert any(n.delta < 0 for n in c) and any(n.delta > 0 for n in c)


def test_fraction_gives_rounded_k_at_least_one():
    delta = torch.randn(2, 100, dtype=torch.float64)
    assert len(select_top_k(delta, fraction=0.001)) == 1  # 0.2 -> at least 1
    assert len(select_top_k(delta, fraction=0.05)) == 10
    assert select_top_k(delta, fraction=0.05).provenance.rule == "fraction"


def test_no_layer_dropped_unless_asked():
    delta = torch.zeros(3, 4, dtype=torch.float64)
    delta[0, 1], delta[1, 2], delta[2, 3] = 5.0, -4.0, 3.0
    assert {n.layer for n in select_top_k(delta, top_k=3)} == {0, 1, 2}
    c = select_top_k(delta, top_k=2, exclude_layers=[0])
    assert [n.label for n in c] == ["L1N2", "L2N3"]
    assert c.provenance.exclude_layers == (0,)


def test_exclusion_mask_removes_exactly_those_neurons():
    delta = torch.arange(12, dtype=torch.float64).view(3, 4)
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[2, 3] = mask[2, 1] = True
    c = select_top_k(delta, top_k=3, exclude=mask)
    assert [n.label for n in c] == ["L2N2", "L2N0", "L1N3"]


def test_ties_are_deterministic():
    delta = torch.ones(2, 3, dtype=torch.float64)
    assert select_top_k(delta, top_k=3).labels == ["L0N0", "L0N1", "L0N2"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fraction": 0.0}, r"fraction must be in \(0, 1\]"),
        ({"fraction": 1.5}, r"fraction must be in \(0, 1\]"),
        ({"fraction": None, "top_k": 0}, "top_k must be a positive integer"),
        ({"fraction": None, "top_k": 13}, "larger than the 12 neurons"),
        ({"fraction": None, "top_k": 5, "exclude_layers": [0, 1]}, "larger than the 4 neurons"),
        ({"fraction": 0.1, "exclude_layers": [3]}, "valid layers are 0..2"),
    ],
)
def test_bad_sizes_are_refused(kwargs, match):
    with pytest.raises(CNAError, match=match):
        select_top_k(torch.randn(3, 4, dtype=torch.float64), **kwargs)


def test_nan_delta_refused():
    d = torch.zeros(2, 2, dtype=torch.float64)
    d[0, 0] = float("nan")
    with pytest.raises(CNAError, match="NaN"):
        select_top_k(d, top_k=1)


def test_circuit_is_frozen_and_validates_ranges():
    c = Circuit((Neuron(0, 1, 0.5),), n_layers=2, d_mlp=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.n_layers = 3  # type: ignore[misc]
    with pytest.raises(CNAError, match="layer 2 out of range"):
        Circuit((Neuron(2, 1, 0.5),), n_layers=2, d_mlp=4)
    with pytest.raises(CNAError, match="neuron 4 out of range"):
        Circuit((Neuron(0, 4, 0.5),), n_layers=2, d_mlp=4)
    with pytest.raises(CNAError, match="appears twice"):
        Circuit((Neuron(0, 1, 0.5), Neuron(0, 1, 0.2)), n_layers=2, d_mlp=4)
    with pytest.raises(CNAError, match="finite"):
        Circuit((Neuron(0, 1, float("inf")),), n_layers=2, d_mlp=4)


def test_json_round_trip_is_equal(tmp_path, llama, prompts):
    pos, neg = prompts
    c = cna_lens.discover(llama, pos, neg, fraction=0.02, universal_filter=True)
    path = c.save(tmp_path / "sub" / "c.json")
    back = Circuit.load(path)
    assert back == c
    data = json.loads(path.read_text())
    assert data["neurons"][0] == {"layer": c.neurons[0].layer, "neuron": c.neurons[0].neuron,
                                  "delta": c.neurons[0].delta}
    prov = data["provenance"]
    for key in ("model_id", "fingerprint", "hook", "k", "universal_removed", "positive_hash",
                "negative_hash", "package_version", "universal_threshold"):
        assert key in prov, key
    assert prov["hook"] == "blocks.{layer}.mlp.hook_post"


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"format": "cna_lens.circuit", "neu', "not valid JSON"),
        ("[1, 2]", "not a cna_lens circuit"),
        ('{"format": "cna_lens.circuit", "format_version": 99}', "format_version 99"),
        ('{"format": "cna_lens.circuit", "format_version": 1, "n_layers": 2, "d_mlp": 4,'
         ' "neurons": [{"layer": 0}]}', "malformed"),
        ('{"format": "cna_lens.circuit", "format_version": 1, "n_layers": 2, "d_mlp": 4,'
         ' "neurons": [{"layer": 5, "neuron": 0, "delta": 1.0}]}', "out of range"),
    ],
)
def test_corrupt_or_truncated_files_are_refused(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(CNAError, match=match):
        Circuit.load(path)


def test_truncated_real_file_is_refused(tmp_path):
    c = Circuit((Neuron(0, 1, 0.5), Neuron(1, 2, -0.25)), n_layers=2, d_mlp=4)
    text = c.to_json()
    (tmp_path / "t.json").write_text(text[: len(text) // 2])
    with pytest.raises(CNAError, match="corrupt or truncated"):
        Circuit.load(tmp_path / "t.json")
    with pytest.raises(CNAError, match="does not exist"):
        Circuit.load(tmp_path / "missing.json")


def test_validate_refuses_a_different_model(load, llama, prompts, tmp_path):
    from cna_lens.testing import make_random_model_dir

    pos, neg = prompts
    c = cna_lens.discover(llama, pos, neg, top_k=3, universal_filter=False)
    c.validate(llama)
    wider = cna_lens.load_model(make_random_model_dir(tmp_path / "w", d_mlp=256), device="cpu")
    with pytest.raises(CircuitMismatchError, match="d_mlp=128"):
        c.validate(wider)
    other_arch = load("mistral")  # same shape, other architecture
    with pytest.raises(CircuitMismatchError, match="fingerprint"):
        c.validate(other_arch)


def test_views():
    c = Circuit((Neuron(1, 2, 0.5), Neuron(0, 3, -0.25)), n_layers=2, d_mlp=4)
    assert c.labels == ["L1N2", "L0N3"]
    assert c.per_layer_counts() == [1, 1]
    assert c.pairs == {(1, 2), (0, 3)}
    assert c.mask().sum() == 2 and c.mask()[1, 2]
    assert c.top(1).labels == ["L1N2"]
