"""The one-page HTML report: content, plotly.js embedded once, and rendering in Chromium."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import plotly.graph_objects as go
import pytest

from cna_lens.core.circuit import Circuit, Neuron, Provenance
from cna_lens.errors import CNAError
from cna_lens.viz.report import flatten_summary, write_report

CHROMIUM = "/usr/bin/chromium"


def _figures() -> dict[str, go.Figure]:
    return {
        "refusal vs m": go.Figure(go.Scatter(x=[0, 1, 2], y=[0.1, 0.9, 1.0])),
        "layers": go.Figure(go.Bar(x=[0, 1, 2], y=[3, 1, 4])),
        "strip": go.Figure(go.Heatmap(z=[[1.0, -2.0, 0.5]])),
    }


def _circuit() -> Circuit:
    return Circuit(
        (Neuron(2, 7, 1.25), Neuron(0, 3, -0.5)),
        n_layers=3,
        d_mlp=16,
        provenance=Provenance(model_id="tiny", rule="top_k", k=2),
    )


SUMMARY = {
    "model": "tiny",
    "refusal": {"m=1": 0.975, "m=0": {"harmful": 0.1}},
    "layers": [2, 0],
    "empty": {},
}


def test_flatten_summary():
    assert flatten_summary(SUMMARY) == [
        ("model", "tiny"),
        ("refusal.m=1", "0.975"),
        ("refusal.m=0.harmful", "0.1"),
        ("layers", "[2, 0]"),
        ("empty", "{}"),
    ]


def test_report_is_one_self_contained_page(tmp_path):
    figures = _figures()
    path = write_report(
        tmp_path / "run", summary=SUMMARY, figures=figures, circuit=_circuit(), title="Tiny <run>"
    )
    assert path == tmp_path / "run" / "report.html"
    page = path.read_text()
    assert page.count("window.PlotlyConfig") == 1  # plotly.js inlined exactly once
    assert page.count("Plotly.newPlot(") == len(figures)
    assert not re.search(r"<script[^>]*\bsrc=", page)  # nothing fetched from the network
    assert "<title>Tiny &lt;run&gt;</title>" in page
    for key, value in flatten_summary(SUMMARY):
        assert f"<td>{key}</td>" in page and f"<td>{value}</td>" in page
    for label in ("L2N7", "L0N3"):
        assert f"<td>{label}</td>" in page
    for name in figures:
        assert f"<h3>{name}</h3>" in page
    other = write_report(tmp_path / "x" / "page.html", summary={}, figures={})
    assert other == tmp_path / "x" / "page.html" and "Plotly.newPlot(" not in other.read_text()


def test_report_rejects_a_non_figure(tmp_path):
    with pytest.raises(CNAError, match="figure 'layers' is a dict, expected a plotly"):
        write_report(tmp_path, summary={}, figures={"layers": {"data": []}})


def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=10000",
        *args,
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)


@pytest.mark.slow
def test_every_figure_renders_in_headless_chromium(tmp_path):
    if not Path(CHROMIUM).is_file() and not shutil.which("chromium"):
        pytest.skip(f"{CHROMIUM} is not installed (apt-get install -y chromium)")
    figures = _figures()
    path = write_report(tmp_path, summary=SUMMARY, figures=figures, circuit=_circuit())
    run = _chromium("--dump-dom", path.as_uri(), profile=tmp_path / "profile")
    assert run.returncode == 0, run.stderr[-2000:]
    dom = run.stdout
    plotted = re.findall(r'<div id="[^"]+" class="plotly-graph-div js-plotly-plot"', dom)
    assert len(plotted) == len(figures)  # Plotly marked every figure div as drawn
    assert dom.count('class="main-svg"') >= len(figures)
    chunks = dom.split('class="plotly-graph-div js-plotly-plot"')[1:]
    assert all('class="main-svg"' in chunk for chunk in chunks)
