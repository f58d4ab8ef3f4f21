"""The paper's claims next to a run's numbers, as the plain-text table the CLI prints."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cna_lens.pipelines.reproduce.summary import Summary

__all__ = ["format_summary"]

Row = tuple[str, str, str]
SKIPPED = "skipped: no base model"


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def _key(x: float) -> str:
    return f"{x:g}"


def _steering_rows(s: Summary) -> list[Row]:
    i, c = s.instruct, s.caa
    amp, amax = i.amplified_multiplier, _key(c.max_alpha)
    return [
        (
            "refusal, harmful: m=1 -> m=0",
            "87% -> 2% (Qwen2.5-7B); >50% rel. drop",
            f"{_pct(i.refusal_baseline)} -> {_pct(i.refusal_ablated)} "
            f"(drop {_pct(i.relative_drop)})",
        ),
        (
            "over-refusal, benign: m=1 -> m=0",
            "-",
            f"{_pct(i.over_refusal_baseline)} -> {_pct(i.over_refusal_ablated)}",
        ),
        ("random neurons, same layers, m=0", "-", _pct(i.random_control_refusal)),
        (
            f"borderline refusal: m=1 -> m={amp:g}",
            "m=2 refuses more strongly",
            f"{_pct(i.refusal_baseline_borderline)} -> {_pct(i.refusal_amplified_borderline)}",
        ),
        ("output quality, CNA (min over m)", "> 0.97 at every m", _num(i.quality_min_cna)),
        (
            f"output quality, CAA at alpha={amax}",
            "< 0.60 (6 of 8 models)",
            _num(c.quality_by_alpha.get(amax)),
        ),
        ("refusal, CAA at alpha=" + amax, "-", _pct(c.refusal_by_alpha.get(amax))),
        (
            "capability: m=1 -> m=0",
            "MMLU within 1 point",
            f"{_pct(i.capability_baseline)} -> {_pct(i.capability_ablated)}",
        ),
        (f"capability, CAA at alpha={amax}", "near zero", _pct(c.capability_by_alpha.get(amax))),
    ]


def _base_rows(s: Summary) -> list[Row]:
    i, b = s.instruct, s.base
    amp = i.amplified_multiplier
    return [
        (
            f"base refusal: m=1 -> m=0 -> m={amp:g}",
            "no behavioural change",
            SKIPPED
            if b is None
            else f"{_pct(b.refusal_baseline)} -> {_pct(b.refusal_ablated)} "
            f"-> {_pct(b.refusal_amplified)}",
        ),
        (
            "base content at m=0: answers changed / similarity",
            "content changes",
            SKIPPED
            if b is None
            else f"{_pct(b.changed_ablated)} / {_num(b.similarity_ablated)} "
            f"(instruct: {_pct(i.changed_ablated)} / {_num(i.similarity_ablated)})",
        ),
        (
            "base vs instruct at m=1: quality / capability",
            "-",
            SKIPPED
            if b is None
            else f"{_num(b.quality_baseline)} vs {_num(i.quality_by_multiplier.get('1'))} / "
            f"{_pct(b.capability_baseline)} vs {_pct(i.capability_baseline)}",
        ),
        (
            "borderline refusal by m",
            "m=2 refuses more strongly",
            ", ".join(f"m={k} {_pct(v)}" for k, v in i.refusal_borderline_by_multiplier.items())
            or "n/a",
        ),
        (
            "harmful refusal at m=0 by intervention/sign",
            "-",
            ", ".join(f"{k} {_pct(v.get('refusal'))}" for k, v in i.variants.items()) or "n/a",
        ),
    ]


def _circuit_rows(s: Summary) -> list[Row]:
    i, ov, lay, st = s.instruct, s.overlap, s.layers, s.stability
    n_total = s.meta["n_layers"] * s.meta["d_mlp"]
    return [
        (
            "instruct circuit in last quarter / last 3",
            "95% (Qwen2.5-3B) / 87% (Llama-3.2-1B)",
            f"{_pct(lay['instruct'].frac_last_quarter)} / {_pct(lay['instruct'].frac_last_3)}",
        ),
        (
            "base circuit in last quarter / last 3",
            "-",
            SKIPPED
            if "base" not in lay
            else f"{_pct(lay['base'].frac_last_quarter)} / {_pct(lay['base'].frac_last_3)}",
        ),
        (
            "base vs instruct overlap (chance)",
            "8-29% of pairs",
            SKIPPED
            if ov is None
            else f"{_pct(ov.overlap_fraction)} "
            f"({ov.chance_overlap_fraction:.1%}), Jaccard {ov.jaccard:.2f}",
        ),
        (
            "layer-level similarity (1 - TV)",
            "layer structure preserved",
            SKIPPED if ov is None else _num(ov.layer_similarity),
        ),
        (
            "bootstrap Jaccard mean / min",
            "-",
            f"{_num(st.get('jaccard_mean'))} / {_num(st.get('jaccard_min'))}",
        ),
        (
            "circuit size (universal removed)",
            "0.1% of neurons",
            f"{i.circuit_size} of {n_total} = {i.circuit_size / n_total:.2%} "
            f"({i.universal_removed})",
        ),
    ]


def format_summary(summary: Summary | Mapping[str, Any]) -> str:
    """The paper's claims next to this run's numbers, as a plain-text table."""
    if not isinstance(summary, Summary):
        summary = Summary.from_dict(summary)
    rows = _steering_rows(summary) + _base_rows(summary) + _circuit_rows(summary)
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{'claim':<{w0}}  {'paper':<{w1}}  this run", "-" * (w0 + w1 + 24)]
    lines += [f"{a:<{w0}}  {p:<{w1}}  {r}" for a, p, r in rows]
    return "\n".join(lines)
