"""Evaluation: metrics, the one engine, the grids built on it, and the shipped prompt sets.

* :mod:`~cna_lens.evaluation.metrics` — refusal (keyword classifier), output quality
  (1 - repeated 4-grams), capability, judges; each a registered :class:`Metric`.
* :mod:`~cna_lens.evaluation.engine` — :func:`evaluate` (generate every set under every
  :class:`Arm`, score, one tidy table) and :func:`summarize`.
* :mod:`~cna_lens.evaluation.grids` — the paper's grid (:func:`sweep`), the dose grid
  (:func:`dose_sweep`, ``cna_lens.sweep``) and the ablation variants.
* :mod:`~cna_lens.evaluation.prompts` — the project's English prompt sets and prompt-file
  readers.

Imports: models, core, steering and generation.
"""

from cna_lens.evaluation.engine import (
    DEFAULT_METRICS,
    Arm,
    content_shift,
    evaluate,
    evaluation_sets,
    score_generations,
    summarize,
)
from cna_lens.evaluation.grids import (
    CAA_ALPHAS,
    CNA_MULTIPLIERS,
    PAPER_COLUMNS,
    VARIANTS,
    dose_grid,
    dose_sweep,
    paper_grid,
    paper_sweep,
    variants_grid,
)
from cna_lens.evaluation.metrics import (
    EMPTY_QUALITY,
    METRICS,
    REFUSAL_PATTERNS,
    RUBRIC_PROMPT,
    CapabilityItem,
    Metric,
    Responses,
    capability_correct,
    get_metric,
    is_refusal,
    judge_metric,
    judge_scores,
    load_capability,
    output_quality,
    paper_metrics,
    refusal_classifier,
    refusal_metric,
    register_metric,
    rubric_judge,
    rubric_score,
)

sweep = paper_sweep
"""``cna_lens.evaluation.sweep``: the paper's grid (``cna_lens.sweep`` is the dose grid)."""

COLUMNS = PAPER_COLUMNS

__all__ = [
    "CAA_ALPHAS",
    "CNA_MULTIPLIERS",
    "COLUMNS",
    "DEFAULT_METRICS",
    "EMPTY_QUALITY",
    "METRICS",
    "PAPER_COLUMNS",
    "REFUSAL_PATTERNS",
    "RUBRIC_PROMPT",
    "VARIANTS",
    "Arm",
    "CapabilityItem",
    "Metric",
    "Responses",
    "capability_correct",
    "content_shift",
    "dose_grid",
    "dose_sweep",
    "evaluate",
    "evaluation_sets",
    "get_metric",
    "is_refusal",
    "judge_metric",
    "judge_scores",
    "load_capability",
    "output_quality",
    "paper_grid",
    "paper_metrics",
    "paper_sweep",
    "refusal_classifier",
    "refusal_metric",
    "register_metric",
    "rubric_judge",
    "rubric_score",
    "score_generations",
    "summarize",
    "sweep",
    "variants_grid",
]
