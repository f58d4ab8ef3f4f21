"""Dose-response sweeps: refusal and quality over circuit size x intervention x sign x multiplier.

:func:`sweep` takes one :class:`~cna_lens.Discovery` and selects every circuit size from
its statistics (:meth:`~cna_lens.Discovery.circuit_at`: no new forward pass), then
generates every prompt set under every condition (fraction x intervention x sign x
multiplier) and scores the outputs. Conditions that change nothing (``m = 1``, or a sign
with no neuron in the circuit) are the unsteered model: it is generated once and reused,
and so is any condition that steers exactly the same neurons the same way as an earlier
one (two fractions that round to the same k). The result is a tidy DataFrame, one row per
condition x prompt set; :func:`dose_figure` plots it, and ``cna-lens sweep`` runs it from
the command line.

Example:
    >>> found = cl.discover_full(model, harmful, benign, fraction=0.01)  # doctest: +SKIP
    >>> table = cl.sweep(model, found, {"harmful": eval_h, "benign": eval_b},  # doctest: +SKIP
    ...                  fractions=[0.005, 0.01], multipliers=[0.0, 1.0],
    ...                  interventions=("scale", "mean"), signs=("both", "positive"))
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, get_args

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from tqdm.auto import tqdm

from cna_lens.core.discovery import Discovery
from cna_lens.errors import CNAError
from cna_lens.evaluation.metrics import (
    CapabilityItem,
    capability_correct,
    evaluation_sets,
    is_refusal,
    output_quality,
)
from cna_lens.steering.interventions import Sign, Steering, get_intervention

__all__ = ["COLUMNS", "check_fractions", "check_multipliers", "dose_figure", "register", "sweep"]

logger = logging.getLogger(__name__)

COLUMNS = [
    "fraction",
    "k",
    "intervention",
    "sign",
    "multiplier",
    "prompt_set",
    "n",
    "refusal_rate",
    "quality",
    "accuracy",
    "tokens",
    "seconds",
    "identity",
    "reused",
]
"""Columns of :func:`sweep`'s table. ``tokens``: new tokens generated for the set (sum);
``seconds``: wall time of that generation (0 when ``reused``); ``identity``: the condition
is the unsteered model; ``reused``: outputs of an identical earlier condition were reused;
``accuracy``: capability accuracy (NaN for other sets)."""


def _check_grid(
    name: str, values: Iterable[Any], ok: Callable[[float], bool], rule: str
) -> tuple[float, ...]:
    vals = tuple(values)
    if not vals:
        raise CNAError(f"{name} is empty; give at least one value ({rule})")
    for v in vals:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(float(v)):
            raise CNAError(f"{name} must be {rule}; got {v!r} in {list(vals)}")
    if len(set(vals)) != len(vals):
        raise CNAError(f"{name} has duplicates: {list(vals)}; give each value once")
    if list(vals) != sorted(vals):
        raise CNAError(f"{name} must be sorted ascending, got {list(vals)}")
    return tuple(float(v) for v in vals)


def check_fractions(values: Iterable[Any]) -> tuple[float, ...]:
    """Circuit-size fractions: non-empty, ascending, distinct, each in (0, 1].

    Raises:
        CNAError: otherwise (the message repeats the list).
    """
    return _check_grid("fractions", values, lambda v: 0.0 < v <= 1.0, "numbers in (0, 1]")


def check_multipliers(values: Iterable[Any]) -> tuple[float, ...]:
    """Multipliers: non-empty, ascending, distinct, finite and >= 0.

    Negative multipliers (flipping a neuron's sign) are refused: they are outside the
    paper's range and, for ``"mean"``, mirror the activation around the negative mean,
    which is rarely what a dose-response curve means to show.

    Raises:
        CNAError: otherwise (the message repeats the list).
    """
    return _check_grid(
        "multipliers", values, lambda v: math.isfinite(v) and v >= 0.0, "finite numbers >= 0"
    )


def _check_names(name: str, values: Iterable[str], check: Callable[[str], Any]) -> tuple[str, ...]:
    vals = tuple(values)
    if not vals:
        raise CNAError(f"{name} is empty; give at least one")
    if len(set(vals)) != len(vals):
        raise CNAError(f"{name} has duplicates: {list(vals)}")
    for v in vals:
        check(v)
    return vals


def _check_sign(sign: str) -> None:
    if sign not in get_args(Sign):
        raise CNAError(f"sign must be one of {list(get_args(Sign))}, got {sign!r}")


def sweep(
    model: Any,
    discovery: Discovery,
    prompt_sets: Mapping[str, Sequence[str]],
    *,
    fractions: Iterable[float],
    multipliers: Iterable[float],
    interventions: Iterable[str] = ("scale",),
    signs: Iterable[str] = ("both",),
    capability: Sequence[CapabilityItem] | None = None,
    classifier: Callable[[str], bool] = is_refusal,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: bool = False,
    fast: bool = True,
) -> pd.DataFrame:
    """Generate and score every prompt set under every dose condition.

    Args:
        model: The bridge the discovery was made on.
        discovery: From :func:`cna_lens.discover_full` (statistics, universal neurons and
            settings); every circuit size is selected from it without a forward pass.
        prompt_sets: Set name -> prompts, e.g. ``{"harmful": [...], "benign": [...]}``.
        fractions: Circuit sizes as fractions of all MLP neurons (ascending, in (0, 1]).
        multipliers: ``m`` values (ascending, finite, >= 0; 1 is the unsteered model).
        interventions: Names in :data:`cna_lens.INTERVENTIONS` ("scale", "mean", ...).
        signs: Which neurons to steer: "both", "positive", "negative".
        capability: Capability items, scored as the prompt set "capability" (accuracy).
        classifier: Refusal classifier on the generated text.
        max_new_tokens: Generation length.
        batch_size: Prompts per generation batch.
        progress: Show a progress bar over conditions.
        fast: Generate with :class:`cna_lens.generation.fast.FastGenerator`: every condition of a
            prompt set in one pass, the same texts as the obvious path (``fast=False``:
            one steered generation per condition and set through the bridge); ``seconds``
            is then the pass's time shared evenly among its conditions.

    Returns:
        One row per condition x prompt set with the columns :data:`COLUMNS`, in
        fraction, intervention, sign, multiplier, prompt set order.

    Raises:
        CNAError: bad grids (empty, unsorted, duplicates, out of range), unknown
            intervention or sign, an intervention the circuit lacks data for, no prompts,
            or a prompt set named "capability" next to ``capability``.
    """
    from cna_lens.steering.hooks import generate_token_ids

    fracs = check_fractions(fractions)
    mults = check_multipliers(multipliers)
    ivs = _check_names("interventions", interventions, get_intervention)
    sgns = _check_names("signs", signs, _check_sign)
    sets = evaluation_sets(prompt_sets, capability)
    circuits = {f: discovery.circuit_at(fraction=f) for f in fracs}
    conditions = [
        Steering(circuit=circuits[f], intervention=iv, multiplier=m, sign=s)
        for f in fracs
        for iv in ivs
        for s in sgns
        for m in mults
    ]
    for c in conditions:
        c.circuit.validate(model)
    tok = model.tokenizer
    cache: dict[tuple[Any, ...], dict[str, tuple[list[str], int, float]]] = {}

    def key(steering: Steering) -> tuple[Any, ...]:
        if steering.is_identity:
            return ("identity",)
        return (steering.intervention, tuple((n.layer, n.neuron, m) for n, m in steering.steered()))

    def run(steering: Steering) -> dict[str, tuple[list[str], int, float]]:
        out = {}
        for name, prompts in sets.items():
            start = time.perf_counter()
            ids = generate_token_ids(
                model,
                prompts,
                steering=None if steering.is_identity else steering,
                max_new_tokens=max_new_tokens,
                batch_size=batch_size,
            )
            seconds = time.perf_counter() - start
            texts = [tok.decode(t, skip_special_tokens=True).strip() for t in ids]
            out[name] = (texts, sum(len(t) for t in ids), seconds)
        return out

    if fast:
        from cna_lens.generation.fast import Condition, FastGenerator

        unique = {key(c): c for c in conditions}
        with FastGenerator(model) as gen:
            by_set = {}
            for name, prompts in sets.items():
                start = time.perf_counter()
                ids = gen.generate_many_token_ids(
                    prompts,
                    [Condition(None if c.is_identity else c) for c in unique.values()],
                    max_new_tokens=max_new_tokens,
                    batch_size=batch_size,
                )
                by_set[name] = (ids, (time.perf_counter() - start) / len(unique))
        for i, k_ in enumerate(unique):
            cache[k_] = {
                name: (
                    [tok.decode(t, skip_special_tokens=True).strip() for t in ids[i]],
                    sum(len(t) for t in ids[i]),
                    seconds,
                )
                for name, (ids, seconds) in by_set.items()
            }
    seen: set[tuple[Any, ...]] = set()
    rows = []
    bar = tqdm(conditions, desc="dose sweep", unit="condition", disable=not progress, leave=False)
    try:
        for steering in bar:
            k_ = key(steering)
            reused = k_ in seen
            seen.add(k_)
            if k_ not in cache:
                cache[k_] = run(steering)
            prov = steering.circuit.provenance
            for name, (texts, tokens, seconds) in cache[k_].items():
                correct = (
                    [capability_correct(o, it) for o, it in zip(texts, capability, strict=True)]
                    if name == "capability" and capability is not None
                    else None
                )
                rows.append(
                    {
                        "fraction": prov.fraction,
                        "k": len(steering.circuit),
                        "intervention": steering.intervention,
                        "sign": steering.sign,
                        "multiplier": steering.multiplier,
                        "prompt_set": name,
                        "n": len(texts),
                        "refusal_rate": sum(map(bool, map(classifier, texts))) / len(texts),
                        "quality": sum(map(output_quality, texts)) / len(texts),
                        "accuracy": sum(correct) / len(correct) if correct else math.nan,
                        "tokens": tokens,
                        "seconds": 0.0 if reused else seconds,
                        "identity": steering.is_identity,
                        "reused": reused,
                    }
                )
    finally:
        bar.close()
    logger.info("dose sweep: %d conditions, %d generated", len(conditions), len(cache))
    return pd.DataFrame(rows, columns=COLUMNS)


# ----------------------------------------------------------------------------- figures
_METRICS = {"refusal_rate": "refusal rate", "quality": "output quality"}


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
    if x not in ("k", "multiplier"):
        raise CNAError(f"x must be 'k' or 'multiplier', got {x!r}")
    missing = [
        c
        for c in ("k", "multiplier", "intervention", "sign", "prompt_set", *_METRICS)
        if c not in results.columns
    ]
    if missing:
        raise CNAError(
            f"expected a dose sweep table (cna_lens.evaluation.grids.sweep); missing {missing}"
        )
    sets = (
        list(prompt_sets) if prompt_sets is not None else list(dict.fromkeys(results["prompt_set"]))
    )
    unknown = [s for s in sets if s not in set(results["prompt_set"])]
    if unknown or not sets:
        raise CNAError(
            f"prompt sets {unknown or sets} not in the table; it has "
            f"{sorted(set(results['prompt_set']))}"
        )
    line_by = ["intervention", "sign", "multiplier" if x == "k" else "k"]
    fig = make_subplots(
        rows=len(_METRICS),
        cols=len(sets),
        shared_xaxes=True,
        subplot_titles=[f"{_METRICS[m]}: {s}" for m in _METRICS for s in sets],
    )
    colors = [
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
    ]
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


# ----------------------------------------------------------------------------- CLI
def _cmd_sweep(args: argparse.Namespace) -> int:
    from cna_lens.cli import _load, read_prompts
    from cna_lens.core.discovery import DiscoveryConfig, discover_full
    from cna_lens.io import atomic_write_text
    from cna_lens.viz.figures import save_figures

    fractions = check_fractions(args.fractions)
    check_multipliers(args.multipliers)
    out = Path(args.out)
    if out.exists() and not out.is_dir():  # before any forward pass
        raise CNAError(f"--out {str(out)!r} is an existing file; give a directory")
    positive, negative = read_prompts(args.positive), read_prompts(args.negative)
    sets = {
        "harmful": read_prompts(args.prompts_harmful),
        "benign": read_prompts(args.prompts_benign),
    }
    universal = read_prompts(args.universal_prompts) if args.universal_prompts else None
    config = DiscoveryConfig(
        fraction=fractions[-1],
        exclude_layers=tuple(args.exclude_layers),
        universal_filter=not args.no_universal_filter,
        universal_prompts=None if universal is None else tuple(universal),
        score=args.score,
        batch_size=args.batch_size,
    )
    model = _load(args)
    found = discover_full(model, positive, negative, config, progress=True)
    table = sweep(
        model,
        found,
        sets,
        fractions=fractions,
        multipliers=args.multipliers,
        interventions=args.intervention,
        signs=args.sign,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        progress=True,
        fast=not args.obvious,
    )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "sweep.csv", table.to_csv(index=False))
    record = {
        "discovery": config.to_dict(),
        "circuit": found.circuit.to_dict(),
        "max_new_tokens": args.max_new_tokens,
        "rows": json.loads(table.to_json(orient="records")),
    }
    atomic_write_text(out / "sweep.json", json.dumps(record, indent=1))
    saved = save_figures(
        {"dose_vs_k": dose_figure(table, x="k"), "dose_vs_m": dose_figure(table, x="multiplier")},
        out,
        png=False,
    )
    show = table[
        ["k", "intervention", "sign", "multiplier", "prompt_set", "refusal_rate", "quality"]
    ]
    # the CLI owns the terminal
    print(show.to_string(index=False, float_format=lambda v: f"{v:.3f}"))  # noqa: T201
    print(f"wrote sweep.csv, sweep.json and {len(saved.html)} figures -> {out}")  # noqa: T201
    return 0


def register(sub: Any, handlers: dict[str, Callable[..., int]]) -> None:
    """Add the ``sweep`` command to the ``cna-lens`` parser."""
    from cna_lens.cli import _discovery_args, _model_arg, comma_floats, comma_names
    from cna_lens.steering.interventions import INTERVENTIONS

    p = sub.add_parser(
        "sweep",
        help="dose-response sweep: refusal and quality over circuit "
        "size x multiplier x intervention x sign",
    )
    _model_arg(p)
    p.add_argument("--positive", required=True, help="discovery prompts of the behaviour")
    p.add_argument("--negative", required=True, help="discovery prompts of its opposite")
    p.add_argument("--prompts-harmful", required=True, help="evaluation prompts (refusal)")
    p.add_argument("--prompts-benign", required=True, help="evaluation prompts (over-refusal)")
    p.add_argument(
        "--fractions",
        type=comma_floats,
        default=[0.0005, 0.001, 0.003, 0.01],
        help="circuit sizes, ascending (default 0.0005,0.001,0.003,0.01)",
    )
    p.add_argument(
        "--multipliers",
        type=comma_floats,
        default=[0.0, 1.0, 2.0],
        help="multipliers, ascending (default 0,1,2)",
    )
    p.add_argument(
        "--intervention",
        type=comma_names,
        default=["scale"],
        help=f"comma list of {sorted(INTERVENTIONS)} (default scale)",
    )
    p.add_argument(
        "--sign",
        type=comma_names,
        default=["both"],
        help="comma list of both, positive, negative (default both)",
    )
    _discovery_args(p)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument(
        "--obvious",
        action="store_true",
        help="one steered generation per condition through the bridge (same texts as the "
        "default fast path, slower)",
    )
    p.add_argument("--out", required=True, help="folder for sweep.csv, sweep.json, figures")
    handlers["sweep"] = _cmd_sweep
