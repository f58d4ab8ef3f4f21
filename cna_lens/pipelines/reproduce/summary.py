"""The typed result of a reproduction run: what ``summary.json`` holds.

Each section is a frozen dataclass; :class:`Summary` serialises to and from the JSON that
``cna-lens reproduce`` writes (``Summary.from_dict(json.load(f))`` reads it back), so other
code reads fields, not string keys. A section of a stage that did not run is ``None`` and
its name is in ``Summary.skipped``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from cna_lens.errors import CNAError

__all__ = ["BaseResult", "CAAResult", "InstructResult", "LayerResult", "OverlapResult", "Summary"]

Rate = float | None
"""A rate in [0, 1], or None where the stage had no such prompts."""


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, Mapping):
        raise CNAError(f"summary: {where} must be an object, got {type(data).__name__}")
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise CNAError(f"summary: {where} has unknown keys {unknown}; valid: {sorted(names)}")
    try:
        return cls(**data)
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
class LayerResult:
    """Where a circuit's neurons sit (see :func:`cna_lens.evaluation.analysis.layer_distribution`)."""

    frac_last_quarter: float
    frac_last_3: float
    frac_last_layer: float
    frac_last_10pct: float
    per_layer: list[int]


@dataclass(frozen=True, kw_only=True)
class OverlapResult:
    """Base vs instruct circuit overlap with its chance level."""

    overlap_fraction: float
    jaccard: float
    chance_overlap_fraction: float
    intersection: int
    layer_similarity: float
    layer_cosine: float
    per_layer: dict[str, list[Any]]


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
    layers: dict[str, LayerResult]
    overlap: OverlapResult | None
    stability: dict[str, Any]
    meta: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready data."""
        return asdict(self)

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
            layers={k: _build(LayerResult, v, f"layers.{k}") for k, v in layers.items()},
            overlap=(
                None
                if data.get("overlap") is None
                else _build(OverlapResult, data["overlap"], "overlap")
            ),
            stability=dict(data["stability"]),
            meta=dict(data.get("meta") or {}),
            skipped=dict(data.get("skipped") or {}),
        )
