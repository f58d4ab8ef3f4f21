"""Plots: Plotly figures of circuits, overlaps, steering sweeps and stability.

Every function takes data (circuits, :class:`~cna_lens.core.analysis.Overlap`,
:class:`~cna_lens.core.analysis.Stability`, sweep DataFrames) and returns a
``plotly.graph_objects.Figure``; none shows or writes anything. Save them with
:func:`cna_lens.viz.figures.save_figures` or call ``fig.show()`` in a notebook.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from cna_lens.core.analysis import Overlap, Stability
from cna_lens.core.circuit import Circuit
from cna_lens.errors import CNAError
from cna_lens.evaluation.engine import summarize

__all__ = [
    "capability_figure",
    "dose_figure",
    "layer_histogram",
    "methods_figure",
    "overlap_figure",
    "pareto_figure",
    "stability_figure",
    "steering_figure",
]

_COLORS = {
    "instruct": "#1f77b4",
    "base": "#ff7f0e",
    "cna": "#1f77b4",
    "caa": "#d62728",
    "random": "#7f7f7f",
}
_METHOD_LABELS = {"cna": "CNA (multiplier m)", "caa": "CAA (alpha)"}


def layer_histogram(
    circuits: Mapping[str, Circuit | Sequence[int]],
    *,
    normalize: bool = False,
    title: str = "Circuit neurons per layer",
) -> go.Figure:
    """Neurons per layer of one or more circuits, as side-by-side bars.

    Args:
        circuits: Name -> circuit (or per-layer counts), e.g. {"instruct": c1, "base": c2}.
        normalize: Plot the fraction of each circuit per layer instead of counts.
        title: Figure title.

    Raises:
        CNAError: no circuits, or circuits with different numbers of layers.
    """
    if not circuits:
        raise CNAError("give at least one circuit to plot")
    counts = {
        name: (c.per_layer_counts() if isinstance(c, Circuit) else [int(x) for x in c])
        for name, c in circuits.items()
    }
    n_layers = {len(v) for v in counts.values()}
    if len(n_layers) != 1:
        raise CNAError(
            f"circuits have different numbers of layers: { {k: len(v) for k, v in counts.items()} }"
        )
    fig = go.Figure()
    for name, vals in counts.items():
        total = sum(vals)
        ys = [v / total if total else 0.0 for v in vals] if normalize else vals
        fig.add_bar(
            x=list(range(len(vals))),
            y=ys,
            name=f"{name} (k={total})",
            marker_color=_COLORS.get(name),
        )
    fig.update_layout(
        title=title,
        barmode="group",
        xaxis_title="layer",
        yaxis_title="fraction of circuit" if normalize else "neurons",
        xaxis=dict(tickmode="linear", dtick=1),
        template="plotly_white",
    )
    return fig


def overlap_figure(
    overlap: Overlap, *, names: tuple[str, str] = ("instruct", "base"), title: str | None = None
) -> go.Figure:
    """Per layer: each circuit's neurons, the neurons they share, and the chance expectation.

    Args:
        overlap: From :func:`cna_lens.core.analysis.circuit_overlap` (A = ``names[0]``).
        names: Labels of circuit A and circuit B.
        title: Figure title (default: the overall overlap and its chance level).
    """
    layers = list(range(len(overlap.per_layer_a)))
    fig = go.Figure()
    fig.add_bar(
        x=layers,
        y=list(overlap.per_layer_a),
        name=names[0],
        opacity=0.35,
        marker_color=_COLORS.get(names[0]),
    )
    fig.add_bar(
        x=layers,
        y=list(overlap.per_layer_b),
        name=names[1],
        opacity=0.35,
        marker_color=_COLORS.get(names[1]),
    )
    fig.add_bar(
        x=layers, y=list(overlap.per_layer_intersection), name="shared", marker_color="#2ca02c"
    )
    fig.add_scatter(
        x=layers,
        y=list(overlap.per_layer_chance),
        name="shared by chance",
        mode="lines+markers",
        line=dict(color="black", dash="dash"),
    )
    fig.update_layout(
        title=title
        or (
            f"{names[0]} vs {names[1]}: overlap {overlap.overlap_fraction:.0%} "
            f"(chance {overlap.chance_overlap_fraction:.1%}), "
            f"Jaccard {overlap.jaccard:.2f}"
        ),
        barmode="group",
        xaxis_title="layer",
        yaxis_title="neurons",
        xaxis=dict(tickmode="linear", dtick=1),
        template="plotly_white",
    )
    return fig


def _summary(results: pd.DataFrame) -> pd.DataFrame:
    if "refusal_rate" in results.columns:
        return results
    if "refused" not in results.columns:
        raise CNAError(
            "expected a sweep DataFrame (from cna_lens.evaluation.metrics.sweep) or its "
            "summary (from summarize)"
        )
    return summarize(results)


def _methods(summary: pd.DataFrame) -> list[str]:
    return [m for m in ("cna", "caa") if m in set(summary["method"])]


def _quality_and_control(
    fig: go.Figure,
    s: pd.DataFrame,
    rows: pd.DataFrame,
    sets: tuple[str, str],
    method: str,
    col: int,
) -> None:
    """The quality line of one method's panel, and the random control (CNA panel)."""
    q = rows[rows["prompt_set"].isin(list(sets))].groupby("strength", as_index=False)["quality"]
    q = q.mean()
    if not q.empty:
        fig.add_scatter(
            x=q["strength"],
            y=q["quality"],
            name="output quality",
            legendgroup="quality",
            showlegend=col == 1,
            mode="lines+markers",
            line=dict(color="#2ca02c"),
            row=1,
            col=col,
        )
    ctrl = s[(s["method"] == "random") & (s["prompt_set"] == sets[0])]
    if method == "cna" and not ctrl.empty:
        fig.add_scatter(
            x=ctrl["strength"],
            y=ctrl["refusal_rate"],
            name="refusal, random neurons",
            mode="markers",
            marker=dict(symbol="diamond", size=11, color="#7f7f7f"),
            row=1,
            col=col,
        )


def steering_figure(
    results: pd.DataFrame,
    *,
    harmful: str = "harmful",
    benign: str = "benign",
    borderline: str | None = "borderline",
    title: str = "Refusal and output quality vs steering strength",
) -> go.Figure:
    """Refusal (harmful), over-refusal (benign) and quality vs strength, CNA and CAA side by side.

    Args:
        results: A sweep DataFrame or its :func:`~cna_lens.evaluation.metrics.summarize` table.
        harmful: Prompt set whose refusal rate is plotted as "refusal".
        benign: Prompt set plotted as "over-refusal".
        borderline: Prompt set plotted as "borderline refusal" where present (None: skip).
        title: Figure title.

    The random-neuron control's refusal appears as grey diamonds in the CNA panel.
    Quality is the mean over the harmful and benign sets.
    """
    s = _summary(results)
    methods = _methods(s)
    if not methods:
        raise CNAError("the results have no 'cna' or 'caa' rows to plot")
    fig = make_subplots(
        rows=1,
        cols=len(methods),
        shared_yaxes=True,
        subplot_titles=[_METHOD_LABELS[m] for m in methods],
    )
    series = [
        (harmful, "refusal (harmful)", "solid", "#d62728"),
        (benign, "over-refusal (benign)", "dot", "#9467bd"),
    ]
    if borderline:
        series.append((borderline, "refusal (borderline)", "dashdot", "#8c564b"))
    for col, method in enumerate(methods, 1):
        rows = s[s["method"] == method]
        for pset, label, dash, color in series:
            r = rows[rows["prompt_set"] == pset].sort_values("strength")
            if r.empty:
                continue
            fig.add_scatter(
                x=r["strength"],
                y=r["refusal_rate"],
                name=label,
                legendgroup=label,
                showlegend=col == 1,
                mode="lines+markers",
                line=dict(dash=dash, color=color),
                row=1,
                col=col,
            )
        _quality_and_control(fig, s, rows, (harmful, benign), method, col)
        fig.update_xaxes(title_text="m" if method == "cna" else "alpha", row=1, col=col)
    fig.update_yaxes(title_text="rate / quality", range=[-0.03, 1.03], row=1, col=1)
    fig.update_layout(title=title, template="plotly_white")
    return fig


def capability_figure(
    results: pd.DataFrame,
    *,
    prompt_set: str = "capability",
    title: str = "Capability accuracy vs steering strength",
) -> go.Figure:
    """Capability accuracy vs strength, CNA and CAA side by side.

    Raises:
        CNAError: the results have no scored capability rows.
    """
    s = _summary(results)
    s = s[(s["prompt_set"] == prompt_set) & s["accuracy"].notna()]
    methods = _methods(s)
    if not methods:
        raise CNAError(f"no scored {prompt_set!r} rows for CNA or CAA in the results")
    fig = make_subplots(
        rows=1,
        cols=len(methods),
        shared_yaxes=True,
        subplot_titles=[_METHOD_LABELS[m] for m in methods],
    )
    for col, method in enumerate(methods, 1):
        r = s[s["method"] == method].sort_values("strength")
        fig.add_scatter(
            x=r["strength"],
            y=r["accuracy"],
            name=method.upper(),
            mode="lines+markers",
            line=dict(color=_COLORS[method]),
            row=1,
            col=col,
        )
        fig.update_xaxes(title_text="m" if method == "cna" else "alpha", row=1, col=col)
    fig.update_yaxes(title_text="accuracy", range=[-0.03, 1.03], row=1, col=1)
    fig.update_layout(title=title, template="plotly_white")
    return fig


def stability_figure(
    stability: Stability | Sequence[float],
    *,
    title: str = "Circuit stability under bootstrap resampling",
) -> go.Figure:
    """Histogram of the Jaccard similarity of resampled circuits to the full circuit.

    Raises:
        CNAError: no Jaccard values.
    """
    values = list(stability.jaccards if isinstance(stability, Stability) else stability)
    if not values:
        raise CNAError("no Jaccard values to plot")
    mean = sum(values) / len(values)
    fig = go.Figure()
    fig.add_histogram(
        x=values,
        xbins=dict(start=0.0, end=1.0001, size=0.05),
        name="resamples",
        marker_color="#1f77b4",
    )
    fig.add_vline(x=mean, line_dash="dash", annotation_text=f"mean {mean:.2f}")
    fig.update_layout(
        title=f"{title} (n={len(values)})",
        xaxis_title="Jaccard vs full circuit",
        yaxis_title="resamples",
        xaxis=dict(range=[0, 1.02]),
        template="plotly_white",
    )
    return fig


_METRICS = {"refusal_rate": "refusal rate", "quality": "output quality"}


_PALETTE = (
    "#1f77b4",
    "#d62728",
    "#2ca02c",
    "#9467bd",
    "#ff7f0e",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


def _dose_sets(results: pd.DataFrame, x: str, prompt_sets: Sequence[str] | None) -> list[str]:
    """The prompt sets a dose figure shows, after checking the table and ``x``."""
    if x not in ("k", "multiplier"):
        raise CNAError(f"x must be 'k' or 'multiplier', got {x!r}")
    needed = ("k", "multiplier", "intervention", "sign", "prompt_set", *_METRICS)
    missing = [c for c in needed if c not in results.columns]
    if missing:
        raise CNAError(f"expected a dose sweep table (cna_lens.sweep); missing {missing}")
    present = list(dict.fromkeys(results["prompt_set"]))
    sets = list(prompt_sets) if prompt_sets is not None else present
    unknown = [s for s in sets if s not in present]
    if unknown or not sets:
        raise CNAError(f"prompt sets {unknown or sets} not in the table; it has {sorted(present)}")
    return sets


def dose_figure(
    results: pd.DataFrame,
    *,
    x: str = "k",
    prompt_sets: Sequence[str] | None = None,
    title: str | None = None,
) -> go.Figure:
    """Refusal rate and quality (rows) per prompt set (columns) against ``k`` or ``m``.

    Args:
        results: The table from :func:`sweep`.
        x: ``"k"`` (one line per intervention / sign / multiplier) or ``"multiplier"``
            (one line per intervention / sign / k).
        prompt_sets: Which sets to show (default: all, in table order).
        title: Figure title.

    Raises:
        CNAError: ``x`` is neither "k" nor "multiplier", or a missing column or set.
    """
    sets = _dose_sets(results, x, prompt_sets)
    line_by = ["intervention", "sign", "multiplier" if x == "k" else "k"]
    fig = make_subplots(
        rows=len(_METRICS),
        cols=len(sets),
        shared_xaxes=True,
        subplot_titles=[f"{_METRICS[m]}: {s}" for m in _METRICS for s in sets],
    )
    colors = _PALETTE
    groups = list(results.groupby(line_by, sort=True))
    for i, (labels, frame) in enumerate(groups):
        iv, sign, other = labels
        name = f"{iv}, {sign}, {'m' if x == 'k' else 'k'}={other:g}"
        for row, metric in enumerate(_METRICS, 1):
            for col, pset in enumerate(sets, 1):
                r = frame[frame["prompt_set"] == pset].sort_values(x)
                fig.add_scatter(
                    x=r[x],
                    y=r[metric],
                    name=name,
                    legendgroup=name,
                    showlegend=row == 1 and col == 1,
                    mode="lines+markers",
                    line=dict(
                        color=colors[i % len(colors)], dash="solid" if sign == "both" else "dot"
                    ),
                    row=row,
                    col=col,
                )
    fig.update_xaxes(title_text="circuit size k" if x == "k" else "multiplier m", row=len(_METRICS))
    fig.update_yaxes(range=[-0.03, 1.03])
    fig.update_layout(
        title=title or f"Dose response vs {'k' if x == 'k' else 'm'}", template="plotly_white"
    )
    return fig


def pareto_figure(
    trials: pd.DataFrame,
    confirmed: pd.DataFrame | None = None,
    *,
    title: str = "Tuning: refusal proxy vs KL (search prompts); confirmed points on held-out prompts",
) -> go.Figure:
    """Every trial of a tuning study (refusal proxy vs KL, colour = circuit size k, the
    feasible Pareto front joined), and the confirmed points (held-out refusal vs KL).

    Args:
        trials: One row per trial with ``refusal``, ``kl``, ``k``, ``feasible`` and
            ``number`` (``trials.csv`` of ``cna-lens tune``).
        confirmed: One row per confirmed condition with ``point``, ``refusal``, ``kl``, ``k``.

    Raises:
        CNAError: a missing column.
    """
    missing = [c for c in ("refusal", "kl", "k", "feasible", "number") if c not in trials]
    if missing:
        raise CNAError(f"expected a trials table (cna-lens tune trials.csv); missing {missing}")
    fig = make_subplots(
        rows=1,
        cols=2 if confirmed is not None else 1,
        subplot_titles=["search (proxy, search prompts)", "confirmed (held-out prompts)"],
    )
    ok = trials[trials["feasible"].astype(bool)]
    bad = trials[~trials["feasible"].astype(bool)]
    fig.add_scatter(
        x=ok["kl"],
        y=ok["refusal"],
        mode="markers",
        name="feasible trial",
        marker=dict(
            color=ok["k"],
            colorscale="Viridis",
            showscale=True,
            size=8,
            colorbar=dict(title="k", x=1.02),
        ),
        text=[f"trial {n}, k={k}" for n, k in zip(ok["number"], ok["k"], strict=True)],
        row=1,
        col=1,
    )
    if not bad.empty:
        fig.add_scatter(
            x=bad["kl"],
            y=bad["refusal"],
            mode="markers",
            name="over-refusal constraint broken",
            marker=dict(symbol="x", color="#bbbbbb", size=7),
            row=1,
            col=1,
        )
    front = _front(ok)
    fig.add_scatter(
        x=front["kl"],
        y=front["refusal"],
        mode="lines",
        name="Pareto front",
        line=dict(color="#d62728", shape="hv"),
        row=1,
        col=1,
    )
    if confirmed is not None:
        fig.add_scatter(
            x=confirmed["kl"],
            y=confirmed["refusal"],
            mode="markers+text",
            text=[f"{p} (k={k})" for p, k in zip(confirmed["point"], confirmed["k"], strict=True)],
            textposition="top center",
            name="confirmed",
            marker=dict(size=11, color="#1f77b4", symbol="diamond"),
            row=1,
            col=2,
        )
        fig.update_xaxes(title_text="KL (mean over the first N answer tokens)", row=1, col=2)
    fig.update_xaxes(title_text="KL (mean over the first N answer tokens)", row=1, col=1)
    fig.update_yaxes(title_text="refusal (proxy / generated)", range=[-0.03, 1.03])
    fig.update_layout(
        title=title,
        template="plotly_white",
        legend=dict(orientation="h", yanchor="top", y=-0.18, x=0),
    )
    return fig


def methods_figure(
    rows: pd.DataFrame | Sequence[Mapping[str, Any]],
    *,
    title: str = "Refusal vs damage, one point per method (held-out prompts)",
) -> go.Figure:
    """Methods side by side: refusal on harmful prompts against the KL divergence on
    harmless ones (left), and over-refusal on benign prompts (right), one labelled point
    per row (e.g. ``benchmarks/peers.py``'s rows: CNA sizes, CAA, directional ablation,
    heretic). Lower-left is better on the left panel.

    Args:
        rows: One row per method with ``row`` (the label), ``refusal``, ``over_refusal``
            and ``kl``; rows without a ``refusal`` (a method that did not run) are left out.

    Raises:
        CNAError: a missing column, or no row with numbers.
    """
    table = pd.DataFrame(list(rows) if not isinstance(rows, pd.DataFrame) else rows)
    missing = [c for c in ("row", "refusal", "over_refusal", "kl") if c not in table]
    if missing:
        raise CNAError(f"expected rows with row, refusal, over_refusal, kl; missing {missing}")
    table = table.dropna(subset=["refusal", "kl"])
    if table.empty:
        raise CNAError("no row has numbers to plot")
    fig = make_subplots(
        rows=1,
        cols=2,
        subplot_titles=["refusal (harmful) vs KL (harmless)", "over-refusal (benign)"],
        column_widths=[0.62, 0.38],
    )
    fig.add_scatter(
        x=table["kl"],
        y=table["refusal"],
        mode="markers+text",
        text=table["row"],
        textposition="top center",
        marker=dict(size=11, color="#1f77b4"),
        showlegend=False,
        row=1,
        col=1,
    )
    fig.add_bar(
        x=table["row"],
        y=table["over_refusal"],
        marker_color="#ff7f0e",
        showlegend=False,
        row=1,
        col=2,
    )
    fig.update_xaxes(title_text="KL (mean over the first 16 answer tokens)", row=1, col=1)
    fig.update_yaxes(title_text="refusal rate", range=[-0.05, 1.05], row=1, col=1)
    fig.update_yaxes(title_text="over-refusal rate", range=[0, 1], row=1, col=2)
    fig.update_layout(title=title, template="plotly_white")
    return fig


def _front(trials: pd.DataFrame) -> pd.DataFrame:
    """The non-dominated rows (minimising refusal and KL), sorted by KL."""
    rows = trials.sort_values(["kl", "refusal"])
    keep, best = [], float("inf")
    for i, r in rows.iterrows():
        if r["refusal"] < best:
            keep.append(i)
            best = r["refusal"]
    return rows.loc[keep]
