"""Circuit: exact top-k selection, immutability, JSON round-trip, validation, bad input."""

from __future__ import annotations

import dataclasses
import json
import threading

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import cna_lens
from cna_lens import Circuit, CircuitMismatchError, CNAError, Neuron, Provenance
from cna_lens.core.selection import select_top_k


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
    n0 = c.neurons[0]
    assert data["neurons"][0] == {
        "layer": n0.layer,
        "neuron": n0.neuron,
        "delta": n0.delta,
        "mean_positive": n0.mean_positive,
        "mean_negative": n0.mean_negative,
    }
    assert n0.mean_positive - n0.mean_negative == pytest.approx(n0.delta, abs=1e-12)
    prov = data["provenance"]
    for key in (
        "model_id",
        "fingerprint",
        "hook",
        "k",
        "universal_removed",
        "positive_hash",
        "negative_hash",
        "package_version",
        "universal_threshold",
    ):
        assert key in prov, key
    assert prov["hook"] == "blocks.{layer}.mlp.hook_post"


@pytest.mark.parametrize(
    ("content", "match"),
    [
        ('{"format": "cna_lens.circuit", "neu', "not valid JSON"),
        ("[1, 2]", "not a cna_lens circuit"),
        ('{"format": "cna_lens.circuit", "format_version": 99}', "format_version 99"),
        (
            '{"format": "cna_lens.circuit", "format_version": 1, "n_layers": 2, "d_mlp": 4,'
            ' "neurons": [{"layer": 0}]}',
            "malformed",
        ),
        (
            '{"format": "cna_lens.circuit", "format_version": 1, "n_layers": 2, "d_mlp": 4,'
            ' "neurons": [{"layer": 5, "neuron": 0, "delta": 1.0}]}',
            "out of range",
        ),
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
    from cna_lens.models.testing import make_random_model_dir

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


# ---- hardening: every bad file or field is a CNAError naming it --------------------------


def _valid_dict(**changes):
    c = Circuit(
        (Neuron(0, 1, 0.5, 1.25, 0.75), Neuron(1, 2, -0.25)),
        n_layers=2,
        d_mlp=4,
        provenance=Provenance(fingerprint="0123456789abcdef", rule="top_k", k=2),
    )
    d = c.to_dict()
    for key, value in changes.items():
        if key.startswith("provenance."):
            d["provenance"][key.split(".", 1)[1]] = value
        elif key.startswith("neuron0."):
            d["neurons"][0][key.split(".", 1)[1]] = value
        else:
            d[key] = value
    return d


@pytest.mark.parametrize("raw", [b"\xe3\n", b"\x00\xff\xfe\x80binary", "{}".encode("utf-16-le")])
def test_undecodable_circuit_files_are_refused(tmp_path, raw):
    path = tmp_path / "c.json"
    path.write_bytes(raw)
    with pytest.raises(
        CNAError,
        match=r"c\.json.*not valid UTF-8.*UTF-16 is read only with a "
        r"byte-order mark",
    ):
        Circuit.load(path)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig"])
def test_circuit_file_with_a_byte_order_mark_loads(tmp_path, encoding):
    c = Circuit.from_dict(_valid_dict())
    path = tmp_path / "c.json"
    path.write_bytes(c.to_json().encode(encoding))
    assert Circuit.load(path) == c


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"neuron0.delta": "x"}, "delta must be a real number"),
        ({"neuron0.delta": "0.5"}, "delta must be a real number"),
        ({"neuron0.delta": True}, "delta must be a real number"),
        ({"neuron0.layer": 0.5}, "layer must be a non-negative integer"),
        ({"neuron0.mean_negative": "0.5"}, "mean_negative must be a real number or null"),
        ({"neuron0.mean_positive": [1.0]}, "mean_positive must be a real number or null"),
        ({"neuron0.mean_positive": False}, "mean_positive must be a real number or null"),
        ({"neuron0.mean_negative": float("nan")}, "mean_negative must be finite or None"),
        ({"neuron0.surprise": 1.0}, r"neurons\[0\] must be an object"),
        ({"provenance.score": 3}, "provenance.score must be a string"),
        ({"provenance.score": None}, "provenance.score must be a string"),
        ({"provenance": "made by hand"}, "provenance must be a JSON object, got str"),
        ({"provenance": 5}, "provenance must be a JSON object, got int"),
        ({"provenance.exclude_layers": ["a"]}, "provenance.exclude_layers entry"),
        ({"provenance.exclude_layers": "10"}, "provenance.exclude_layers must be a list"),
        ({"provenance.k": "many"}, "provenance.k must be a positive integer"),
        ({"provenance.fraction": 2.0}, r"provenance.fraction must be in \(0, 1\]"),
        ({"provenance.universal_filter": "yes"}, "provenance.universal_filter"),
        ({"provenance.model_id": 3}, "provenance.model_id must be a string"),
        ({"provenance.positive_hash": []}, "provenance.positive_hash"),
        ({"provenance.fingerprint": "xyz"}, "provenance.fingerprint must be 16 lowercase hex"),
        ({"provenance.fingerprint": 7}, "provenance.fingerprint"),
        ({"provenance.surprise": 1}, "unknown provenance keys"),
        ({"neurons": {}}, "neurons must be a JSON list"),
        ({"neurons": ""}, "neurons must be a JSON list"),
        ({"neurons": None}, "neurons must be a JSON list"),
        ({"neurons": []}, "circuit has no neurons"),
        ({"neurons": [[0, 1, 0.5]]}, r"neurons\[0\] must be an object"),
        ({"n_layers": "2"}, "n_layers must be a positive integer"),
        ({"d_mlp": True}, "d_mlp must be a positive integer"),
        ({"format_version": True}, "format_version True"),
        ({"extra": 1}, "unknown circuit keys"),
    ],
)
def test_ill_typed_fields_are_refused_naming_the_field(tmp_path, changes, match):
    d = _valid_dict(**changes)
    with pytest.raises(CNAError, match=match):
        Circuit.from_dict(d)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(d))
    with pytest.raises(CNAError, match="c.json"):
        Circuit.load(path)


def test_empty_circuit_only_when_allowed(tmp_path):
    d = _valid_dict(neurons=[])
    assert len(Circuit.from_dict(d, allow_empty=True)) == 0
    (tmp_path / "e.json").write_text(json.dumps(d))
    assert len(Circuit.load(tmp_path / "e.json", allow_empty=True)) == 0
    c = Circuit.from_dict(_valid_dict())
    assert Circuit.from_json(c.top(0).to_json(), allow_empty=True) == c.top(0)


def test_deeply_nested_file_is_refused(tmp_path):
    path = tmp_path / "deep.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(CNAError, match="nested too deeply"):
        Circuit.load(path)


def test_directory_is_not_reported_missing(tmp_path):
    with pytest.raises(CNAError, match="is a directory"):
        Circuit.load(tmp_path)


def test_neuron_fields_are_checked():
    with pytest.raises(CNAError, match="neuron layer must be a non-negative integer"):
        Neuron(0.5, 1)  # type: ignore[arg-type]
    with pytest.raises(CNAError, match="delta must be a real number"):
        Neuron(0, 1, "0.5")  # type: ignore[arg-type]
    assert Neuron(np.int64(1), np.int32(2), np.float32(0.5)) == Neuron(1, 2, 0.5)
    assert type(Neuron(np.int64(1), 2).layer) is int
    with pytest.raises(CNAError, match="mean_positive must be a real number or null"):
        Neuron(0, 1, 0.5, "1.0")  # type: ignore[arg-type]
    n = Neuron(0, 1, 0.5, np.float32(1.5), np.int64(2))
    assert (n.mean_positive, n.mean_negative) == (1.5, 2.0)
    assert type(n.mean_positive) is float and type(n.mean_negative) is float


@pytest.mark.parametrize("fingerprint", ["", None, "unknown", "MISSING"])
def test_missing_fingerprint_is_unknown_and_refused_unless_not_strict(llama, fingerprint):
    d = Circuit((Neuron(0, 1, 0.5),), int(llama.cfg.n_layers), int(llama.cfg.d_mlp)).to_dict()
    if fingerprint == "MISSING":
        del d["provenance"]["fingerprint"]
    else:
        d["provenance"]["fingerprint"] = fingerprint
    c = Circuit.from_dict(d)
    assert c.provenance.fingerprint == "unknown"
    with pytest.raises(CircuitMismatchError, match="no architecture fingerprint"):
        c.validate(llama)
    c.validate(llama, strict=False)
    with pytest.raises(CircuitMismatchError, match="no architecture fingerprint"):
        cna_lens.generate(llama, ["hi"], circuit=c, multiplier=0.0, max_new_tokens=1)
    bound = c.for_model(llama)
    bound.validate(llama)
    assert bound.provenance.fingerprint == cna_lens.model_fingerprint(llama)


def test_from_pairs_with_a_model_is_checked(llama, load):
    c = Circuit.from_pairs([(0, 1), (1, 2)], model=llama)
    assert (c.n_layers, c.d_mlp) == (llama.cfg.n_layers, llama.cfg.d_mlp)
    c.validate(llama)
    with pytest.raises(CircuitMismatchError, match="fingerprint"):
        c.validate(load("mistral"))  # same shape, other architecture
    with pytest.raises(CircuitMismatchError, match="no architecture fingerprint"):
        Circuit.from_pairs(
            [(0, 1)], n_layers=int(llama.cfg.n_layers), d_mlp=int(llama.cfg.d_mlp)
        ).validate(llama)


def test_save_is_collision_safe_under_concurrency(tmp_path):
    circuits = [Circuit((Neuron(0, w, float(w + 1)),), n_layers=2, d_mlp=16) for w in range(8)]
    path = tmp_path / "c.json"
    circuits[0].save(path)
    (tmp_path / "c.json.tmp").write_text("mine")  # a user's own file is never touched
    errors: list[BaseException] = []
    seen: list[Circuit] = []
    stop = threading.Event()

    def write(w: int) -> None:
        try:
            for _ in range(25):
                circuits[w].save(path)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    def read() -> None:
        try:
            while not stop.is_set():
                seen.append(Circuit.load(path))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    writers = [threading.Thread(target=write, args=(w,)) for w in range(8)]
    readers = [threading.Thread(target=read) for _ in range(2)]
    for t in readers + writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert errors == []
    assert seen and all(c in circuits for c in seen)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.json", "c.json.tmp"]
    assert (tmp_path / "c.json.tmp").read_text() == "mine"


def test_save_into_a_directory_path_is_refused(tmp_path):
    c = Circuit((Neuron(0, 1, 0.5),), n_layers=2, d_mlp=4)
    with pytest.raises(CNAError, match="is a directory"):
        c.save(tmp_path)
    assert list(tmp_path.iterdir()) == []


# ---- property tests: any bytes, any JSON-ish value -> a Circuit or CNAError ---------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
_FIELDS = [
    "format",
    "format_version",
    "n_layers",
    "d_mlp",
    "neurons",
    "provenance",
    "neuron0.layer",
    "neuron0.neuron",
    "neuron0.delta",
    "neuron0.mean_positive",
    "neuron0.mean_negative",
] + [f"provenance.{f.name}" for f in dataclasses.fields(Provenance)]


def _load_bytes(tmp_path_factory, raw: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "c.json"
    path.write_bytes(raw)
    try:
        assert isinstance(Circuit.load(path), Circuit)
    except CNAError:
        pass


@settings(max_examples=200, deadline=None)
@given(raw=st.binary(max_size=300))
def test_fuzz_any_bytes(tmp_path_factory, raw):
    _load_bytes(tmp_path_factory, raw)


@settings(max_examples=200, deadline=None)
@given(value=_json)
def test_fuzz_any_json_value(value):
    try:
        assert isinstance(Circuit.from_dict(value), Circuit)
    except CNAError:
        pass


@settings(max_examples=200, deadline=None)
@given(
    changes=st.dictionaries(st.sampled_from(_FIELDS), _json, min_size=1, max_size=3),
    drop=st.lists(st.sampled_from(["n_layers", "d_mlp", "neurons", "provenance"]), max_size=1),
)
def test_fuzz_mutated_valid_circuit(tmp_path_factory, changes, drop):
    # A nested change ("provenance.rule", "neuron0.layer") means nothing once its parent
    # ("provenance", "neurons") is replaced by an arbitrary value: drop it then.
    replaced = {"provenance.": "provenance", "neuron0.": "neurons"}
    d = _valid_dict(
        **{
            k: v
            for k, v in changes.items()
            if not any(k.startswith(p) and parent in changes for p, parent in replaced.items())
        }
    )
    for key in drop:
        d.pop(key, None)
    try:
        c = Circuit.from_dict(d)
    except CNAError:
        return
    assert Circuit.from_json(c.to_json()) == c  # whatever loads, round-trips
    _load_bytes(tmp_path_factory, json.dumps(d).encode())


def test_old_files_without_means_or_score_load(llama, prompts):
    pos, neg = prompts
    c = cna_lens.discover(llama, pos, neg, top_k=3, universal_filter=False)
    data = c.to_dict()
    for entry in data["neurons"]:
        del entry["mean_positive"], entry["mean_negative"]
    del data["provenance"]["score"]
    old = Circuit.from_dict(data)
    assert [n.mean_negative for n in old] == [None] * 3
    assert old.provenance.score == "abs_delta" and old.labels == c.labels
    assert "mean_negative" not in old.to_dict()["neurons"][0]  # written only when known
