"""The evaluation engine: generate every prompt set under every condition, score, tabulate.

:func:`evaluate` is the one generate-then-score loop of cna_lens. It takes prompt sets and a
list of :class:`Arm` (a condition with the tags that name it in the table), generates each
*distinct* condition once per set (every identity condition is the unsteered model, run
once; repeats are reused) through one generation backend, scores the texts with registered
metrics (:mod:`cna_lens.evaluation.metrics`), and returns a tidy table: one row per arm x
set x prompt, with the tags, the condition's label, the prompt, the generated text, its
token count, the generation's seconds and one column per metric. :func:`summarize`
aggregates it. The paper's grid, the dose grid, the intervention variants and a pair's
behaviour check are grid builders over it (:mod:`cna_lens.evaluation.grids`).

All sets are generated together per condition (one prompt list, so fewer partial batches)
and split afterwards. With ``texts=PATH`` every generated text is written as JSON lines
(tags, condition, set, prompt, text).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from difflib import SequenceMatcher
from pathlib import Path
from typing import Any

import pandas as pd

from cna_lens._progress import Progress
from cna_lens.errors import CNAError
from cna_lens.evaluation.metrics import (
    CapabilityItem,
    Judge,
    Metric,
    Responses,
    get_metric,
    is_refusal,
    paper_metrics,
)
from cna_lens.generation import Decoding, generate_many
from cna_lens.generation.api import Backend, resolve_condition
from cna_lens.io import atomic_write_text
from cna_lens.models.loading import validate_prompts
from cna_lens.steering.conditions import condition_key, describe_condition

__all__ = [
    "DEFAULT_METRICS",
    "Arm",
    "content_shift",
    "evaluate",
    "evaluation_sets",
    "score_generations",
    "summarize",
]

DEFAULT_METRICS: tuple[str, ...] = ("refused", "quality", "correct")
"""The metrics :func:`evaluate` scores unless told otherwise."""

SUMMARY_NAMES: dict[str, str] = {"refused": "refusal_rate", "correct": "accuracy"}
"""Metric columns whose mean :func:`summarize` names differently (a rate, an accuracy)."""


@dataclass(frozen=True)
class Arm:
    """One condition of an evaluation, with the tags that name it in the table.

    Attributes:
        condition: None (unsteered), a Steering, a CAA, any registered condition kind, or
            the path of a saved steering.
        tags: Columns of the table for this arm (e.g. ``{"method": "cna", "strength": 0}``).
        label: The ``condition`` column (default: a description of the condition).
    """

    condition: Any
    tags: Mapping[str, Any] = field(default_factory=dict)
    label: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "condition", resolve_condition(self.condition))
        object.__setattr__(self, "tags", dict(self.tags))
        if not self.label:
            object.__setattr__(self, "label", describe_condition(self.condition))


def evaluation_sets(
    prompt_sets: Mapping[str, Sequence[str]], capability: Sequence[CapabilityItem] | None = None
) -> dict[str, list[str]]:
    """The prompts of an evaluation by set name, validated, with the capability questions
    as the set ``"capability"``.

    Raises:
        CNAError: a bad prompt, no sets at all, or a set named "capability" beside
            capability items.
    """
    sets = {str(k): validate_prompts(v, f"prompt set {k!r}") for k, v in prompt_sets.items()}
    if capability is not None:
        if "capability" in sets:
            raise CNAError("prompt set name 'capability' is reserved for the capability items")
        sets["capability"] = [it.question for it in capability]
    if not sets:
        raise CNAError("no prompt sets to evaluate")
    return sets


def _metrics(metrics: Sequence[str] | Mapping[str, str | Metric]) -> dict[str, Metric]:
    named = metrics if isinstance(metrics, Mapping) else {m: m for m in metrics}
    return {str(name): get_metric(m) for name, m in named.items()}


def _arms(arms: Sequence[Any]) -> list[Arm]:
    out = [a if isinstance(a, Arm) else Arm(a) for a in arms]
    if not out:
        raise CNAError("no conditions to evaluate; give at least one arm (None is unsteered)")
    return out


def _passes(sets: Mapping[str, list[str]], n: int, decoding: Decoding) -> int:
    """Work units of a run (conditions x batches), for the progress bar."""
    return n * sum(math.ceil(len(ps) / decoding.batch_size) for ps in sets.values())


def _columns(records: list[dict[str, Any]], metric_dtypes: dict[str, str]) -> pd.DataFrame:
    table = pd.DataFrame.from_records(records)
    for name, dtype in metric_dtypes.items():
        if dtype == "bool":
            table[name] = pd.array(table[name].tolist(), dtype="boolean")
    return table


def evaluate(
    model: Any,
    prompt_sets: Mapping[str, Sequence[str]],
    arms: Sequence[Arm | Any],
    *,
    capability: Sequence[CapabilityItem] | None = None,
    metrics: Sequence[str] | Mapping[str, str | Metric] = DEFAULT_METRICS,
    decoding: Decoding | None = None,
    backend: str | Backend = "fast",
    progress: bool = False,
    texts: str | Path | None = None,
) -> pd.DataFrame:
    """Generate every prompt set under every arm's condition and score the texts.

    Args:
        model: A bridge from :func:`cna_lens.load_model`.
        prompt_sets: Set name -> prompts (e.g. ``{"harmful": [...], "benign": [...]}``).
        arms: :class:`Arm` values (or bare conditions), in table order.
        capability: Capability items, generated and scored as the set "capability".
        metrics: Metric names (:data:`cna_lens.METRICS`), or column name -> metric.
        decoding: Generation length, batch size, sampling (default ``Decoding()``).
        backend: "fast" (default), "bridge", or an open backend.
        progress: One progress bar over the whole run (conditions x batches, tokens/s).
        texts: Write every generated text as JSON lines here.

    Returns:
        One row per arm x set x prompt: the arms' tags, ``condition`` (label),
        ``prompt_set``, ``prompt_index``, ``prompt``, ``output``, ``tokens``, ``seconds``
        (the condition's generation time, shared among the sets by their tokens; 0 for a
        repeat of a condition) and one column per
        metric (missing values where a metric does not apply).

    Raises:
        CNAError: no arms or sets, a bad prompt, condition, metric or decoding.
    """
    sets = evaluation_sets(prompt_sets, capability)
    arm_list = _arms(arms)
    chosen = _metrics(metrics)
    dec = decoding or Decoding()
    distinct: dict[Any, Any] = {}
    for arm in arm_list:
        distinct.setdefault(condition_key(arm.condition), arm.condition)
    # All sets in one generation per condition (fewer partial batches); split afterwards.
    flat = [p for ps in sets.values() for p in ps]
    n_passes = len(distinct) * math.ceil(len(flat) / dec.batch_size)
    with Progress(n_passes, "evaluate", enabled=progress) as bar:
        gens = generate_many(
            model, flat, list(distinct.values()), decoding=dec, backend=backend, progress=bar
        )
    scored: dict[Any, dict[str, _Scored]] = {}
    for key, ids, outs, secs in zip(
        distinct, gens.token_ids, gens.texts, gens.seconds, strict=True
    ):
        scored[key] = _score(sets, capability, ids, outs, secs, chosen)
    if texts is not None:
        _write_texts(Path(texts), arm_list, sets, scored)
    table = _columns(_records(arm_list, sets, scored), {c: m.dtype for c, m in chosen.items()})
    table.attrs["metrics"] = list(chosen)
    return table


@dataclass(frozen=True)
class _Scored:
    """One condition's generations on one set, scored."""

    responses: Responses
    values: dict[str, list[Any]]
    seconds: float


def _score(
    sets: Mapping[str, list[str]],
    capability: Sequence[CapabilityItem] | None,
    ids: list[list[int]],
    outs: list[str],
    seconds: float,
    metrics: Mapping[str, Metric],
) -> dict[str, _Scored]:
    """Split one condition's generations (all sets in order) by set and score each; the
    condition's seconds are shared among the sets by their tokens."""
    out, start = {}, 0
    total = max(1, sum(map(len, ids)))
    for name, prompts in sets.items():
        part_ids, part = ids[start : start + len(prompts)], outs[start : start + len(prompts)]
        start += len(prompts)
        items = list(capability) if name == "capability" and capability is not None else None
        resp = Responses(name, prompts, part, part_ids, items)
        share = seconds * sum(map(len, part_ids)) / total
        out[name] = _Scored(resp, {c: m(resp) for c, m in metrics.items()}, share)
    return out


def _records(
    arms: Sequence[Arm], sets: Mapping[str, list[str]], scored: Mapping[Any, dict[str, _Scored]]
) -> list[dict[str, Any]]:
    """The table's rows: arm-major, then set, then prompt (a repeated condition's seconds
    are 0: it was generated once)."""
    records: list[dict[str, Any]] = []
    seen: set[Any] = set()
    for arm in arms:
        key = condition_key(arm.condition)
        for name in sets:
            entry = scored[key][name]
            resp = entry.responses
            seconds = 0.0 if key in seen else entry.seconds
            for i, (prompt, out) in enumerate(zip(resp.prompts, resp.outputs, strict=True)):
                records.append(
                    {
                        "prompt_set": name,
                        "prompt_index": i,
                        "prompt": prompt,
                        **arm.tags,
                        "condition": arm.label,
                        "output": out,
                        "tokens": len(resp.token_ids[i]),
                        "seconds": seconds,
                        **{col: v[i] for col, v in entry.values.items()},
                    }
                )
        seen.add(key)
    return records


def _write_texts(
    path: Path,
    arms: Sequence[Arm],
    sets: Mapping[str, list[str]],
    scored: Mapping[Any, dict[str, _Scored]],
) -> None:
    """Every generated text, one JSON object per line (written atomically)."""
    lines = []
    for arm in arms:
        for name in sets:
            resp = scored[condition_key(arm.condition)][name].responses
            for i, (prompt, out) in enumerate(zip(resp.prompts, resp.outputs, strict=True)):
                row = {**arm.tags, "condition": arm.label, "prompt_set": name}
                row.update(prompt_index=i, prompt=prompt, output=out)
                lines.append(json.dumps(row, ensure_ascii=False, default=str))
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def summarize(
    results: pd.DataFrame,
    by: Sequence[str] | None = None,
    *,
    metrics: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Mean of every metric per ``by`` x prompt set, with the count ``n``.

    Args:
        results: A table from :func:`evaluate` (or the paper's grid).
        by: The grouping columns (default: ``method``, ``strength`` when the table has
            them, else ``condition``), in sorted order of their values.
        metrics: The metric columns (default: those the engine recorded, else refused,
            quality, correct and judge where present). ``refused`` becomes
            ``refusal_rate`` and ``correct`` ``accuracy``; missing values are NaN.

    Raises:
        CNAError: a grouping column is missing.
    """
    if by is None:
        by = ["method", "strength"] if {"method", "strength"} <= set(results) else ["condition"]
    missing = [c for c in (*by, "prompt_set") if c not in results.columns]
    if missing:
        raise CNAError(f"cannot summarize: columns {missing} are not in the table")
    cols = list(metrics or results.attrs.get("metrics") or [])
    cols = cols or [c for c in ("refused", "quality", "correct", "judge") if c in results]
    frame = results.assign(
        **{c: results[c].astype("Float64").astype(float) for c in cols if c in results}
    )
    grouped = frame.groupby([*by, "prompt_set"], sort=True)
    out = grouped.agg(n=("output", "size"), **{SUMMARY_NAMES.get(c, c): (c, "mean") for c in cols})
    return out.reset_index()


def score_generations(
    prompts: Sequence[str],
    outputs: Sequence[str],
    *,
    prompt_set: str,
    method: str,
    strength: float,
    classifier: Callable[[str], bool] = is_refusal,
    capability: Sequence[CapabilityItem] | None = None,
    judge: Judge | None = None,
) -> pd.DataFrame:
    """One row per prompt of already generated texts, scored with the paper's metrics
    (:func:`~cna_lens.evaluation.metrics.paper_metrics`; the engine's scoring without the
    generation).

    Raises:
        CNAError: lengths differ.
    """
    if len(prompts) != len(outputs):
        raise CNAError(f"{len(prompts)} prompts but {len(outputs)} outputs")
    if capability is not None and len(capability) != len(prompts):
        raise CNAError(f"{len(capability)} capability items for {len(prompts)} prompts")
    chosen = paper_metrics(classifier, judge, (prompt_set,))
    resp = Responses(
        prompt_set, list(prompts), list(outputs), [[] for _ in outputs], _items(capability)
    )
    table = pd.DataFrame(
        {
            "prompt_set": prompt_set,
            "prompt_index": range(len(prompts)),
            "prompt": list(prompts),
            "method": method,
            "strength": float(strength),
            "output": list(outputs),
            **{col: m(resp) for col, m in chosen.items()},
        }
    )
    for col, m in chosen.items():
        if m.dtype == "bool":
            table[col] = pd.array(table[col].tolist(), dtype="boolean")
    table.attrs["metrics"] = list(chosen)
    return table


def _items(capability: Sequence[CapabilityItem] | None) -> list[CapabilityItem] | None:
    return None if capability is None else list(capability)


def content_shift(
    results: pd.DataFrame,
    *,
    method: str = "cna",
    strength: float = 0.0,
    reference: float = 1.0,
    prompt_set: str = "harmful",
) -> tuple[float | None, float | None]:
    """How much a condition changed the answers, as opposed to whether they refuse.

    Compares each prompt's output under ``(method, strength)`` with its output under
    ``(method, reference)`` (the unsteered model for CNA).

    Returns:
        The fraction of prompts whose answer changed at all, and the mean word-level
        similarity (:class:`difflib.SequenceMatcher` ratio, 1 = identical); ``(None, None)``
        when either condition has no rows for ``prompt_set``.
    """
    rows = results[(results["method"] == method) & (results["prompt_set"] == prompt_set)]
    steered = rows[rows["strength"] == strength].set_index("prompt_index")["output"]
    ref = rows[rows["strength"] == reference].set_index("prompt_index")["output"]
    common = steered.index.intersection(ref.index)
    if len(common) == 0:
        return None, None
    changed = sum(steered[i] != ref[i] for i in common) / len(common)
    sims = [SequenceMatcher(None, ref[i].split(), steered[i].split()).ratio() for i in common]
    return float(changed), float(sum(sims) / len(sims))
