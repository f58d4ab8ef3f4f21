"""Plots return Figures built from the data given; figures are written as HTML (+ PNG if possible)."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest

from cna_lens.core.analysis import Stability, circuit_overlap
from cna_lens.core.circuit import Circuit
from cna_lens.errors import CNAError
from cna_lens.evaluation import score_generations
from cna_lens.viz import figures as figures
from cna_lens.viz.plots import (
    capability_figure,
    layer_histogram,
    methods_figure,
    overlap_figure,
    stability_figure,
    steering_figure,
)


def _circuit(pairs):
    return Circuit.from_pairs(pairs, n_layers=4, d_mlp=8)


@pytest.fixture
def sweep_df():
    import pandas as pd

    from cna_lens.evaluation.metrics import CapabilityItem

    frames = []
    item = [CapabilityItem("q", "red", ("red", "blue"))]
    for method, strengths in (
        ("cna", (0.0, 1.0, 2.0)),
        ("caa", (-1.0, 0.0, 1.0)),
        ("random", (0.0,)),
    ):
        for s in strengths:
            refuse = "I'm sorry" if s >= (1.0 if method == "cna" else 0.0) else "sure , do it"
            frames.append(
                score_generations(
                    ["h1", "h2"], [refuse, "sure"], prompt_set="harmful", method=method, strength=s
                )
            )
            frames.append(
                score_generations(["b1"], ["sure"], prompt_set="benign", method=method, strength=s)
            )
            frames.append(
                score_generations(
                    ["q"],
                    ["red" if s >= 0 else "blue"],
                    prompt_set="capability",
                    method=method,
                    strength=s,
                    capability=item,
                )
            )
    return pd.concat(frames, ignore_index=True)


def test_layer_histogram_side_by_side():
    a, b = _circuit([(3, 1), (3, 2), (0, 0)]), _circuit([(2, 1), (3, 5), (3, 6)])
    fig = layer_histogram({"instruct": a, "base": b})
    assert isinstance(fig, go.Figure) and fig.layout.barmode == "group"
    assert [list(t.y) for t in fig.data] == [[1, 0, 0, 2], [0, 0, 1, 2]]
    assert fig.data[0].name == "instruct (k=3)"
    norm = layer_histogram({"instruct": [1, 0, 0, 3]}, normalize=True)
    assert list(norm.data[0].y) == [0.25, 0, 0, 0.75]
    with pytest.raises(CNAError, match="different numbers of layers"):
        layer_histogram({"a": [1, 2], "b": [1, 2, 3]})
    with pytest.raises(CNAError, match="at least one"):
        layer_histogram({})


def test_overlap_figure_has_chance_line():
    a, b = _circuit([(3, 1), (3, 2), (0, 0)]), _circuit([(3, 1), (3, 5), (0, 0)])
    o = circuit_overlap(a, b)
    fig = overlap_figure(o, names=("instruct", "base"))
    names = [t.name for t in fig.data]
    assert names == ["instruct", "base", "shared", "shared by chance"]
    assert list(fig.data[2].y) == [1, 0, 0, 1]
    assert list(fig.data[3].y) == pytest.approx([1 / 8, 0, 0, 4 / 8])
    assert "67%" in fig.layout.title.text


def test_steering_figure_panels(sweep_df):
    fig = steering_figure(sweep_df)
    titles = [a.text for a in fig.layout.annotations]
    assert titles == ["CNA (multiplier m)", "CAA (alpha)"]
    refusal = [t for t in fig.data if t.name == "refusal (harmful)"]
    assert list(refusal[0].x) == [0.0, 1.0, 2.0] and list(refusal[0].y) == [0.0, 0.5, 0.5]
    assert any(t.name == "refusal, random neurons" for t in fig.data)
    assert any(t.name == "output quality" for t in fig.data)
    with pytest.raises(CNAError, match="sweep DataFrame"):
        import pandas as pd

        steering_figure(pd.DataFrame({"x": [1]}))


def test_capability_figure(sweep_df):
    fig = capability_figure(sweep_df)
    caa = [t for t in fig.data if t.name == "CAA"][0]
    assert list(caa.x) == [-1.0, 0.0, 1.0] and list(caa.y) == [0.0, 1.0, 1.0]
    with pytest.raises(CNAError, match="no scored"):
        capability_figure(sweep_df[sweep_df.prompt_set != "capability"])


def test_stability_figure():
    fig = stability_figure(Stability((1.0, 0.5, 0.75), k=4, seed=0))
    assert list(fig.data[0].x) == [1.0, 0.5, 0.75]
    assert "n=3" in fig.layout.title.text
    with pytest.raises(CNAError, match="no Jaccard"):
        stability_figure([])


def test_save_figures_html_and_png_failure_does_not_raise(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("no chrome here")

    monkeypatch.setattr(figures, "_export_png", broken)
    saved = figures.save_figures({"layers": stability_figure([0.5])}, tmp_path / "out")
    assert saved.html["layers"].is_file() and saved.png == {}
    assert "no chrome here" in saved.png_error
    assert "<html>" in saved.html["layers"].read_text()[:200].lower()
    with pytest.raises(CNAError, match="plain file stem"):
        figures.save_figures({"../x": stability_figure([0.5])}, tmp_path)


def test_save_figures_without_png(tmp_path):
    saved = figures.save_figures(
        {"s": stability_figure([0.5])}, tmp_path, png=False, plotlyjs="cdn"
    )
    assert saved.png == {} and saved.png_error == "PNG export not requested"
    assert not (tmp_path / "plotly.min.js").exists()


def test_png_export_when_a_renderer_is_available(tmp_path):
    pytest.importorskip("kaleido")
    if figures.find_browser() is None:
        pytest.skip("no Chrome/Chromium for kaleido")
    saved = figures.save_figures({"s": stability_figure([0.5, 1.0])}, tmp_path)
    assert saved.png_error is None
    assert saved.png["s"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_methods_figure_one_point_per_method_that_ran():
    rows = [
        {"row": "unsteered", "refusal": 0.5, "over_refusal": 0.1, "kl": 0.0},
        {"row": "CNA top_k=1600", "refusal": 0.1, "over_refusal": 0.0, "kl": 0.2},
        {"row": "heretic", "error": "not run (--no-heretic)"},
    ]
    fig = methods_figure(rows)
    points, bars = fig.data
    assert list(points.text) == ["unsteered", "CNA top_k=1600"]
    assert list(points.x) == [0.0, 0.2] and list(points.y) == [0.5, 0.1]
    assert list(bars.y) == [0.1, 0.0]
    with pytest.raises(CNAError, match="missing"):
        methods_figure([{"row": "x", "refusal": 0.1}])
    with pytest.raises(CNAError, match="no row"):
        methods_figure([rows[2] | {"refusal": None, "over_refusal": None, "kl": None}])
