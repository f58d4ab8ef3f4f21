"""Dose-response sweeps: grids are checked, rows are one per condition x prompt set with the
values a direct generation gives, the unsteered model is generated once, the CLI writes
its files."""

from __future__ import annotations

import json

import pandas as pd
import plotly.graph_objects as go
import pytest
from conftest import NEGATIVE, POSITIVE

import cna_lens
from cna_lens import CNAError, Steering, organism
from cna_lens.cli import main
from cna_lens.evaluation.grids import COLUMNS, check_fractions, check_multipliers
from cna_lens.evaluation.metrics import is_refusal, output_quality
from cna_lens.viz import dose_figure


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ([], "fractions is empty"),
        ([0.01, 0.005], "sorted ascending"),
        ([0.01, 0.01], "duplicates"),
        ([0.0, 0.01], r"numbers in \(0, 1\]; got 0.0"),
        ([0.5, 1.5], r"numbers in \(0, 1\]; got 1.5"),
    ],
)
def test_bad_fractions(values, match):
    with pytest.raises(CNAError, match=match):
        check_fractions(values)


@pytest.mark.parametrize(
    ("values", "match"),
    [
        ([], "multipliers is empty"),
        ([2.0, 1.0], "sorted ascending"),
        ([1.0, 1.0], "duplicates"),
        ([-1.0, 0.0], "finite numbers >= 0; got -1.0"),
        ([0.0, float("inf")], "finite numbers >= 0; got inf"),
    ],
)
def test_bad_multipliers(values, match):
    with pytest.raises(CNAError, match=match):
        check_multipliers(values)
    assert check_multipliers([0, 0.5, 2]) == (0.0, 0.5, 2.0)


@pytest.fixture(scope="module")
def instruct():
    try:
        return organism.load("instruct", device="cpu")
    except FileNotFoundError:
        pytest.skip("the model organism is not built into cna_lens/organism/data")


@pytest.fixture(scope="module")
def found(instruct):
    return cna_lens.discover_full(
        instruct,
        organism.prompts("discovery_harmful"),
        organism.prompts("discovery_benign"),
        fraction=0.01,
        universal_prompts=organism.prompts("universal"),
    )


SETS = {
    "harmful": organism.prompts("eval_harmful")[:4],
    "benign": organism.prompts("eval_benign")[:3],
}


def test_sweep_on_the_organism(instruct, found, monkeypatch):
    from cna_lens.generation import bridge
    from cna_lens.steering import is_identity

    calls = []
    real = bridge.hooked

    def counting(model, condition, **kw):
        calls.append(condition)
        return real(model, condition, **kw)

    monkeypatch.setattr(bridge, "hooked", counting)
    table = cna_lens.sweep(
        instruct,
        found,
        SETS,
        fractions=[0.005, 0.01],
        multipliers=[0, 1],
        interventions=("scale", "mean"),
        signs=("both", "positive"),
        max_new_tokens=8,
        backend="bridge",
    )  # counts the reference backend's conditions
    assert list(table.columns) == COLUMNS
    assert len(table) == 2 * 2 * 2 * 2 * len(SETS)
    assert sorted(set(table["k"])) == [15, 31]  # 0.5% and 1% of 3,072 neurons
    identity = table[table["multiplier"] == 1.0]
    assert identity["identity"].all() and (~table[table["multiplier"] == 0.0]["identity"]).all()
    # the unsteered model ran once; 8 steered conditions ran once each (all sets together)
    assert sum(is_identity(c) for c in calls) == 1
    assert len(calls) == 1 + 8
    assert identity["reused"].sum() == len(identity) - len(SETS)
    assert (table[table["reused"]]["seconds"] == 0.0).all()
    for pset in SETS:
        rates = identity[identity["prompt_set"] == pset]["refusal_rate"]
        assert rates.nunique() == 1
    # every row holds what a direct generation under that condition gives
    row = table[
        (table["k"] == 31)
        & (table["intervention"] == "mean")
        & (table["sign"] == "positive")
        & (table["multiplier"] == 0.0)
        & (table["prompt_set"] == "harmful")
    ].iloc[0]
    s = Steering(
        circuit=found.circuit_at(fraction=0.01),
        intervention="mean",
        multiplier=0.0,
        sign="positive",
    )
    texts = cna_lens.generate(instruct, SETS["harmful"], steering=s, max_new_tokens=8)
    assert row["refusal_rate"] == sum(map(is_refusal, texts)) / len(texts)
    assert row["quality"] == sum(map(output_quality, texts)) / len(texts)
    assert row["n"] == len(SETS["harmful"])
    # the organism refuses every harmful prompt; ablating its 1% circuit stops that
    base = identity[identity["prompt_set"] == "harmful"]["refusal_rate"].iloc[0]
    ablated = table[
        (table["k"] == 31)
        & (table["intervention"] == "scale")
        & (table["sign"] == "both")
        & (table["multiplier"] == 0.0)
        & (table["prompt_set"] == "harmful")
    ]["refusal_rate"].iloc[0]
    assert base == 1.0 and ablated < base
    for x in ("k", "multiplier"):
        fig = dose_figure(table, x=x)
        assert isinstance(fig, go.Figure)
        assert len(fig.data) == 8 * 2 * len(SETS)  # lines x metrics x prompt sets


def test_sweep_refuses_bad_input(instruct, found):
    kw = dict(fractions=[0.01], multipliers=[0.0], max_new_tokens=2)
    with pytest.raises(CNAError, match=r"unknown intervention 'clamp'"):
        cna_lens.sweep(instruct, found, SETS, interventions=("clamp",), **kw)
    with pytest.raises(CNAError, match="sign must be one of"):
        cna_lens.sweep(instruct, found, SETS, signs=("up",), **kw)
    with pytest.raises(CNAError, match="fractions must be sorted"):
        cna_lens.sweep(instruct, found, SETS, fractions=[0.02, 0.01], multipliers=[0.0])
    with pytest.raises(CNAError, match="no prompt sets"):
        cna_lens.sweep(instruct, found, {}, **kw)
    with pytest.raises(CNAError, match="x must be 'k' or 'multiplier'"):
        dose_figure(pd.DataFrame(columns=COLUMNS), x="m")


def test_cli_sweep_writes_its_files(tmp_path, model_dirs, capsys):
    files = {}
    for name, prompts in (
        ("pos", POSITIVE),
        ("neg", NEGATIVE),
        ("harm", POSITIVE[:2]),
        ("ben", NEGATIVE[:2]),
    ):
        files[name] = tmp_path / f"{name}.txt"
        files[name].write_text("\n".join(prompts))
    out = tmp_path / "out"
    rc = main(
        [
            "sweep",
            "--model",
            str(model_dirs["llama"]),
            "--positive",
            str(files["pos"]),
            "--negative",
            str(files["neg"]),
            "--prompts-harmful",
            str(files["harm"]),
            "--prompts-benign",
            str(files["ben"]),
            "--fractions",
            "0.005,0.01",
            "--multipliers",
            "0,1",
            "--intervention",
            "scale,mean",
            "--sign",
            "positive",
            "--score",
            "effect_size",
            "--no-universal-filter",
            "--max-new-tokens",
            "3",
            "--batch-size",
            "4",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    table = pd.read_csv(out / "sweep.csv")
    assert len(table) == 2 * 2 * 2 * 2
    assert set(table["intervention"]) == {"scale", "mean"} and set(table["sign"]) == {"positive"}
    record = json.loads((out / "sweep.json").read_text())
    assert record["discovery"]["score"] == "effect_size" and len(record["rows"]) == len(table)
    assert record["circuit"]["provenance"]["score"] == "effect_size"
    assert (out / "dose_vs_k.html").is_file() and (out / "dose_vs_m.html").is_file()
    assert "wrote sweep.csv" in capsys.readouterr().out
    # every generated text is kept, with its condition and prompt
    texts = pd.read_json(out / "texts.jsonl", lines=True, dtype=False)
    assert len(texts) == 2 * 2 * 2 * 2 * 2  # conditions x (2 harmful + 2 benign) prompts
    assert {"condition", "prompt_set", "prompt", "output", "multiplier", "k"} <= set(texts)
    assert set(texts["prompt"]) == set(POSITIVE[:2] + NEGATIVE[:2])
    rc = main(
        [
            "sweep",
            "--model",
            str(model_dirs["llama"]),
            "--positive",
            str(files["pos"]),
            "--negative",
            str(files["neg"]),
            "--prompts-harmful",
            str(files["harm"]),
            "--prompts-benign",
            str(files["ben"]),
            "--fractions",
            "0.01,0.005",
            "--out",
            str(tmp_path / "bad"),
        ]
    )
    assert rc == 2 and "sorted ascending" in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    rc = main(
        [
            "sweep",
            "--model",
            str(model_dirs["llama"]),
            "--positive",
            str(files["pos"]),
            "--negative",
            str(files["neg"]),
            "--prompts-harmful",
            str(files["harm"]),
            "--prompts-benign",
            str(files["ben"]),
            "--out",
            str(tmp_path / "afile"),
        ]
    )
    assert rc == 2 and "is an existing file" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "x"
