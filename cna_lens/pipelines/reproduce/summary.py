"""The typed result of a reproduction run: what ``summary.json`` holds.

Each section is a frozen dataclass: the steering results here, and the analyses' own values
(:class:`~cna_lens.LayerDistribution`, :class:`~cna_lens.Overlap`). :class:`Summary`
serialises to and from the JSON that ``cna-lens reproduce`` writes
(``Summary.from_dict(json.load(f))`` reads it back, summaries of cna_lens 0.1 included), so
other code reads fields, not string keys. A section of a stage that did not run is ``None``
and its name is in ``Summary.skipped``. :func:`build_summary` makes one from a run's tables
and analyses (pure: no model).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pandas as pd

from cna_lens._validate import dataclass_fields
from cna_lens.core.analysis import LayerDistribution, Overlap, Stability, layer_distribution
from cna_lens.core.discovery import Discovery
from cna_lens.errors import CNAError
from cna_lens.evaluation import content_shift, summarize

__all__ = [
    "BaseResult",
    "CAAResult",
    "InstructResult",
    "RunResults",
    "Summary",
    "build_summary",
]

Rate = float | None
"""A rate in [0, 1], or None where the stage had no such prompts."""


def _build(cls: type, data: Any, where: str) -> Any:
    kwargs = dataclass_fields(cls, data, f"summary {where} section")
    try:
        return cls(**kwargs)
    except TypeError as exc:
        raise CNAError(f"summary: {where}: {exc}") from exc


@dataclass(frozen=True, kw_only=True)
class InstructResult:
    """The instruct model under CNA steering (held-out prompts)."""

    refusal_baseline: Rate
    refusal_ablated: Rate
    relative_drop: Rate
    over_refusal_baseline: Rate
    over_refusal_ablated: Rate
    quality_min_cna: Rate
    quality_by_multiplier: dict[str, float]
    refusal_by_multiplier: dict[str, Rate]
    over_refusal_by_multiplier: dict[str, Rate]
    capability_baseline: Rate
    capability_ablated: Rate
    capability_by_multiplier: dict[str, Rate]
    random_control_refusal: Rate
    amplified_multiplier: float
    refusal_amplified_borderline: Rate
    refusal_baseline_borderline: Rate
    circuit_size: int
    universal_removed: int
    judge_baseline: Rate = None
    judge_ablated: Rate = None
    refusal_borderline_by_multiplier: dict[str, Rate] = field(default_factory=dict)
    changed_ablated: Rate = None
    """Fraction of harmful prompts whose answer at m = 0 differs from the unsteered one."""
    similarity_ablated: Rate = None
    """Mean word-level similarity (difflib ratio) of the m = 0 and unsteered answers."""
    variants: dict[str, dict[str, Rate]] = field(default_factory=dict)
    """Ablation (m = 0) by intervention and sign ("scale/positive", "mean/both", ...):
    refusal, over_refusal, quality."""


@dataclass(frozen=True, kw_only=True)
class BaseResult:
    """The base model under the same intervention (its own circuit, same k)."""

    refusal_baseline: Rate
    refusal_ablated: Rate
    refusal_amplified: Rate
    over_refusal_baseline: Rate
    circuit_size: int
    universal_removed: int
    over_refusal_ablated: Rate = None
    quality_baseline: Rate = None
    quality_ablated: Rate = None
    capability_baseline: Rate = None
    capability_ablated: Rate = None
    refusal_borderline_by_multiplier: dict[str, Rate] = field(default_factory=dict)
    changed_ablated: Rate = None
    """Fraction of harmful prompts whose answer at m = 0 differs from the unsteered one
    (content shift; refusal_ablated vs refusal_baseline is the behaviour)."""
    similarity_ablated: Rate = None


@dataclass(frozen=True, kw_only=True)
class CAAResult:
    """The CAA baseline on the instruct model, per strength alpha."""

    layers: list[int]
    refusal_by_alpha: dict[str, Rate]
    over_refusal_by_alpha: dict[str, Rate]
    quality_by_alpha: dict[str, float]
    capability_by_alpha: dict[str, Rate]
    max_alpha: float


@dataclass(frozen=True, kw_only=True)
class Summary:
    """Everything ``summary.json`` holds.

    Attributes:
        instruct: The instruct model's steering results.
        base: The base model's results; None when no base model was given.
        caa: The CAA baseline.
        layers: Layer distribution per model ("instruct", and "base" when run).
        overlap: Base vs instruct overlap; None without a base model.
        stability: Bootstrap stability of the instruct circuit (mean/min/std/quantiles).
        meta: The run's record: models (portable ids), prompt sets, sizes, config, timings.
        skipped: Stages that did not run, each with the reason.
    """

    instruct: InstructResult
    base: BaseResult | None
    caa: CAAResult
    layers: dict[str, LayerDistribution]
    overlap: Overlap | None
    stability: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return {
            "instruct": asdict(self.instruct),
            "base": None if self.base is None else asdict(self.base),
            "caa": asdict(self.caa),
            "layers": {k: v.to_dict() for k, v in self.layers.items()},
            "overlap": None if self.overlap is None else self.overlap.to_dict(),
            "stability": dict(self.stability),
            "meta": dict(self.meta),
            "skipped": dict(self.skipped),
        }

    @classmethod
    def from_dict(cls, data: Any) -> Summary:
        """Read back what :meth:`to_dict` wrote.

        Raises:
            CNAError: a section is missing, of the wrong kind, or has unknown keys.
        """
        if not isinstance(data, Mapping):
            raise CNAError(f"summary must be an object, got {type(data).__name__}")
        for key in ("instruct", "caa", "layers", "stability"):
            if key not in data:
                raise CNAError(f"summary has no {key!r} section")
        layers = data["layers"]
        if not isinstance(layers, Mapping):
            raise CNAError("summary: layers must be an object of per-model sections")
        return cls(
            instruct=_build(InstructResult, data["instruct"], "instruct"),
            base=None if data.get("base") is None else _build(BaseResult, data["base"], "base"),
            caa=_build(CAAResult, data["caa"], "caa"),
            layers={k: LayerDistribution.from_dict(v) for k, v in layers.items()},
            overlap=None if data.get("overlap") is None else Overlap.from_dict(data["overlap"]),
            stability=dict(data["stability"]),
            meta=dict(data.get("meta") or {}),
            skipped=dict(data.get("skipped") or {}),
        )


# ----------------------------------------------------------------------------- building
def _key(x: float) -> str:
    return f"{x:g}"


class _Rates:
    """Lookups in a :func:`cna_lens.summarize` table of the paper's grid."""

    def __init__(self, results: pd.DataFrame):
        self.s = summarize(results)

    def __call__(
        self, method: str, strength: float, prompt_set: str, column: str = "refusal_rate"
    ) -> float | None:
        s = self.s
        if column not in s.columns:
            return None
        row = s[
            (s["method"] == method) & (s["strength"] == strength) & (s["prompt_set"] == prompt_set)
        ]
        if row.empty:
            return None
        value = float(row[column].iloc[0])
        return None if math.isnan(value) else value

    def by(
        self, method: str, strengths: Sequence[float], prompt_set: str, column: str = "refusal_rate"
    ) -> dict[str, float | None]:
        return {_key(x): self(method, x, prompt_set, column) for x in strengths}

    def quality(self, method: str) -> dict[str, float]:
        """Mean output quality on the harmful and benign sets per strength of ``method``."""
        rows = self.s[self.s["prompt_set"].isin(["harmful", "benign"])]
        q = rows[rows["method"] == method].groupby("strength")["quality"].mean()
        return {_key(k): float(v) for k, v in q.items()}


def _variants(variants: pd.DataFrame | None) -> dict[str, dict[str, float | None]]:
    """Refusal, over-refusal and quality of each ablation variant ("scale/positive", ...)."""
    if variants is None or not len(variants):
        return {}
    rate = _Rates(variants)
    out = {}
    for method in sorted(variants["method"].unique()):
        _, intervention, sign = method.split("-", 2)
        harmful = rate.s[(rate.s["method"] == method) & (rate.s["prompt_set"] == "harmful")]
        out[f"{intervention}/{sign}"] = {
            "refusal": rate(method, 0.0, "harmful"),
            "over_refusal": rate(method, 0.0, "benign"),
            "quality": float(harmful["quality"].mean()) if len(harmful) else None,
        }
    return out


def _instruct(
    multipliers: Sequence[float],
    results: pd.DataFrame,
    found: Discovery,
    judged: bool,
    variants: pd.DataFrame | None,
) -> InstructResult:
    rate = _Rates(results)
    amp = max(multipliers)
    baseline, ablated = rate("cna", 1.0, "harmful"), rate("cna", 0.0, "harmful")
    quality = rate.quality("cna")
    changed, similarity = content_shift(results)
    return InstructResult(
        refusal_baseline=baseline,
        refusal_ablated=ablated,
        relative_drop=None if not baseline or ablated is None else (baseline - ablated) / baseline,
        over_refusal_baseline=rate("cna", 1.0, "benign"),
        over_refusal_ablated=rate("cna", 0.0, "benign"),
        quality_min_cna=min(quality.values()) if quality else None,
        quality_by_multiplier=quality,
        refusal_by_multiplier=rate.by("cna", multipliers, "harmful"),
        over_refusal_by_multiplier=rate.by("cna", multipliers, "benign"),
        capability_baseline=rate("cna", 1.0, "capability", "accuracy"),
        capability_ablated=rate("cna", 0.0, "capability", "accuracy"),
        capability_by_multiplier=rate.by("cna", multipliers, "capability", "accuracy"),
        random_control_refusal=rate("random", 0.0, "harmful"),
        amplified_multiplier=amp,
        refusal_amplified_borderline=rate("cna", amp, "borderline"),
        refusal_baseline_borderline=rate("cna", 1.0, "borderline"),
        circuit_size=len(found.circuit),
        universal_removed=0 if found.universal is None else len(found.universal),
        judge_baseline=rate("cna", 1.0, "harmful", "judge") if judged else None,
        judge_ablated=rate("cna", 0.0, "harmful", "judge") if judged else None,
        refusal_borderline_by_multiplier=rate.by("cna", multipliers, "borderline"),
        changed_ablated=changed,
        similarity_ablated=similarity,
        variants=_variants(variants),
    )


def _base(multipliers: Sequence[float], results: pd.DataFrame, found: Discovery) -> BaseResult:
    rate = _Rates(results)
    quality = rate.quality("cna")
    changed, similarity = content_shift(results)
    strengths = sorted(set(results["strength"][results["method"] == "cna"]))
    return BaseResult(
        refusal_baseline=rate("cna", 1.0, "harmful"),
        refusal_ablated=rate("cna", 0.0, "harmful"),
        refusal_amplified=rate("cna", max(multipliers), "harmful"),
        over_refusal_baseline=rate("cna", 1.0, "benign"),
        circuit_size=len(found.circuit),
        universal_removed=0 if found.universal is None else len(found.universal),
        over_refusal_ablated=rate("cna", 0.0, "benign"),
        quality_baseline=quality.get("1"),
        quality_ablated=quality.get("0"),
        capability_baseline=rate("cna", 1.0, "capability", "accuracy"),
        capability_ablated=rate("cna", 0.0, "capability", "accuracy"),
        refusal_borderline_by_multiplier=rate.by("cna", strengths, "borderline"),
        changed_ablated=changed,
        similarity_ablated=similarity,
    )


def _caa(alphas: Sequence[float], layers: Sequence[int], results: pd.DataFrame) -> CAAResult:
    rate = _Rates(results)
    return CAAResult(
        layers=list(layers),
        refusal_by_alpha=rate.by("caa", alphas, "harmful"),
        over_refusal_by_alpha=rate.by("caa", alphas, "benign"),
        quality_by_alpha=rate.quality("caa"),
        capability_by_alpha=rate.by("caa", alphas, "capability", "accuracy"),
        max_alpha=max(alphas, key=abs),
    )


@dataclass(frozen=True)
class RunResults:
    """What a reproduction run measured, before it is summarised (the tables keep every
    generation).

    Attributes:
        instruct: The instruct model's paper-grid table.
        instruct_found: Its discovery.
        variants: The ablation variants' table.
        caa_layers: The layers CAA steered.
        stability: Bootstrap stability of the instruct circuit.
        base: The base model's paper-grid table (None without a base model).
        base_found: Its discovery.
        overlap: Base vs instruct overlap (None without a base model).
    """

    instruct: pd.DataFrame
    instruct_found: Discovery
    variants: pd.DataFrame | None
    caa_layers: tuple[int, ...]
    stability: Stability
    base: pd.DataFrame | None = None
    base_found: Discovery | None = None
    overlap: Overlap | None = None


def build_summary(
    multipliers: Sequence[float],
    caa_alphas: Sequence[float],
    run: RunResults,
    meta: dict[str, Any],
    *,
    judged: bool = False,
) -> Summary:
    """The typed summary of a run from its tables and analyses (pure)."""
    layers = {"instruct": layer_distribution(run.instruct_found.circuit)}
    base, skipped = None, {}
    if run.base is not None and run.base_found is not None:
        base = _base(multipliers, run.base, run.base_found)
        layers["base"] = layer_distribution(run.base_found.circuit)
    else:
        skipped = {
            name: "no base model given (--base-model)"
            for name in ("load base", "discover base", "sweep base", "overlap")
        }
    return Summary(
        instruct=_instruct(multipliers, run.instruct, run.instruct_found, judged, run.variants),
        base=base,
        caa=_caa(caa_alphas, run.caa_layers, run.instruct),
        layers=layers,
        overlap=run.overlap,
        stability={k: v for k, v in run.stability.to_dict().items() if k != "jaccards"},
        meta=meta,
        skipped=skipped,
    )
