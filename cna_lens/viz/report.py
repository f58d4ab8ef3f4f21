"""Report: one self-contained HTML page of a run — summary, figures, circuit, neuron cards.

:func:`write_report` writes a single ``report.html`` that opens offline: plotly.js is
embedded once, inline, with the first figure; every later figure reuses it.

Example:
    >>> write_report("out", summary={"refusal": {"m=1": 0.97, "m=0": 0.1}},
    ...              figures={"layers": fig}, circuit=circuit)  # doctest: +SKIP
    PosixPath('out/report.html')
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from cna_lens.core.circuit import Circuit
from cna_lens.errors import CNAError
from cna_lens.viz.cards import NeuronCard

__all__ = ["flatten_summary", "write_report"]

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1150px; color: #222; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { margin-top: 2em; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; margin: .5em 0 1.5em; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f4; }
.figure { margin: 1em 0 2em; }
.meta { color: #777; font-size: 12px; }
"""


def _scalar(value: Any) -> Any:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    try:
        return json.dumps(value, default=str)
    except (TypeError, ValueError):
        return str(value)


def flatten_summary(summary: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts -> ``[("a.b.c", value), ...]`` in insertion order.

    Lists and other non-dict values are one row each (lists as JSON text, floats to 6
    significant digits).
    """
    rows: list[tuple[str, Any]] = []
    for key, value in summary.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            rows.extend(flatten_summary(value, name))
        else:
            rows.append((name, _scalar(value)))
    return rows


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, border=0, float_format=lambda x: f"{x:.4g}")


def _circuit_table(circuit: Circuit) -> str:
    df = pd.DataFrame(
        [
            {
                "rank": i + 1,
                "neuron": n.label,
                "layer": n.layer,
                "index": n.neuron,
                "delta": n.delta,
            }
            for i, n in enumerate(circuit)
        ]
    )
    prov = {k: v for k, v in asdict(circuit.provenance).items() if v not in (None, "", ())}
    return (
        f"<p>{len(circuit)} neurons of {circuit.n_layers} x {circuit.d_mlp}; per layer "
        f"{circuit.per_layer_counts()}</p>"
        + _table(df)
        + "<h3>provenance</h3>"
        + _table(pd.DataFrame(flatten_summary(prov), columns=["key", "value"]))
    )


def write_report(
    path: str | os.PathLike[str],
    *,
    summary: Mapping[str, Any],
    figures: Mapping[str, go.Figure],
    circuit: Circuit | None = None,
    cards: Sequence[NeuronCard] = (),
    title: str = "cna_lens report",
) -> Path:
    """Write one self-contained HTML page: summary table, figures, circuit, neuron cards.

    Args:
        path: The ``.html`` file to write, or a folder (``report.html`` is written in it).
            Parent folders are created.
        summary: Nested dict of results; flattened to ``key.sub.key -> value`` rows.
        figures: Title -> figure, shown in order.
        circuit: The circuit, shown as a table with its provenance.
        cards: Neuron cards (:func:`cna_lens.neuron_card`): their tables and figures.
        title: Page title.

    Returns:
        The written file. Plotly JS is embedded once, inline, so it opens without network.

    Raises:
        CNAError: a figure that is not a ``plotly.graph_objects.Figure``.
    """
    out = Path(path)
    if out.suffix.lower() not in (".html", ".htm"):
        out = out / "report.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    all_figures: list[tuple[str, go.Figure]] = list(figures.items())
    for card in cards:
        all_figures.extend(card.figures().items())
    for name, fig in all_figures:
        if not isinstance(fig, go.Figure):
            raise CNAError(
                f"figure {name!r} is a {type(fig).__name__}, expected a plotly.graph_objects.Figure"
            )
    first = [True]

    def fig_html(fig: go.Figure) -> str:
        include = first[0]
        first[0] = False
        body = fig.to_html(full_html=False, include_plotlyjs=include, config={"responsive": True})
        return f'<div class="figure">{body}</div>'

    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        f"<h1>{html.escape(title)}</h1><p class='meta'>written {stamp}</p>",
        "<h2>Summary</h2>",
        _table(pd.DataFrame(flatten_summary(summary), columns=["key", "value"])),
    ]
    if figures:
        parts.append("<h2>Figures</h2>")
        for name, fig in figures.items():
            parts.append(f"<h3>{html.escape(name)}</h3>{fig_html(fig)}")
    if circuit is not None:
        parts.append("<h2>Circuit</h2>" + _circuit_table(circuit))
    if cards:
        parts.append("<h2>Neuron cards</h2>")
        for card in cards:
            parts.append(f"<h3>{html.escape(card.summary)}</h3>")
            for name, table in card.tables().items():
                parts.append(f"<h4>{html.escape(name)}</h4>{_table(table)}")
            for fig in card.figures().values():
                parts.append(fig_html(fig))
    page = (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head>\n<body>\n"
        + "\n".join(parts)
        + "\n</body></html>\n"
    )
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    os.replace(tmp, out)
    return out
