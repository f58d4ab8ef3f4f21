"""Grids: the conditions of the paper's sweep, the dose sweep and the ablation variants.

Each grid is a list of :class:`~cna_lens.evaluation.engine.Arm` run by the one engine
(:func:`~cna_lens.evaluation.engine.evaluate`):

* :func:`paper_grid` / :func:`paper_sweep` — CNA multipliers, CAA strengths and a
  random-neuron control (same size and per-layer counts), one row per prompt x method x
  strength (``cna_lens.evaluation.sweep``);
* :func:`dose_grid` / :func:`dose_sweep` — circuit size x intervention x sign x
  multiplier from one :class:`~cna_lens.Discovery` (every size is selected from its
  statistics, no new forward pass), one row per condition x prompt set (``cna_lens.sweep``);
* :func:`variants_grid` — the same circuit ablated (m = 0) by the other interventions and
  signs.

Conditions that change nothing (``m = 1``, CAA ``alpha = 0``, a sign with no neuron) are
the unsteered model, generated once; so is any condition that repeats an earlier one (two
fractions that round to the same k).

Example:
    >>> found = cl.discover_full(model, harmful, benign, fraction=0.01)  # doctest: +SKIP
    >>> table = cl.sweep(model, found, {"harmful": eval_h, "benign": eval_b},  # doctest: +SKIP
    ...                  fractions=[0.005, 0.01], multipliers=[0.0, 1.0],
    ...                  interventions=("scale", "mean"), signs=("both", "positive"))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, get_args

import pandas as pd

from cna_lens import _compat
from cna_lens._validate import check_choice, check_numbers
from cna_lens.core.analysis import random_control_circuit
from cna_lens.core.circuit import Circuit
from cna_lens.core.discovery import Discovery
from cna_lens.errors import CNAError
from cna_lens.evaluation.engine import Arm, evaluate, evaluation_sets
from cna_lens.evaluation.metrics import (
    CapabilityItem,
    Judge,
    is_refusal,
    paper_metrics,
    refusal_metric,
)
from cna_lens.generation import Decoding
from cna_lens.generation.api import Backend
from cna_lens.steering import CAA, CAAVectors, Sign, Steering, get_intervention, is_identity
from cna_lens.steering.conditions import condition_key

__all__ = [
    "CAA_ALPHAS",
    "CNA_MULTIPLIERS",
    "COLUMNS",
    "PAPER_COLUMNS",
    "VARIANTS",
    "check_fractions",
    "check_multipliers",
    "dose_grid",
    "dose_sweep",
    "paper_grid",
    "paper_sweep",
    "sweep",
    "variants_grid",
]

CNA_MULTIPLIERS: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
"""The paper's CNA multiplier sweep: 0 ablates, 1 is the unchanged model, > 1 amplifies."""

CAA_ALPHAS: tuple[float, ...] = (-4.0, -2.0, -1.0, -0.5, -0.25, 0.0, 0.5, 1.0, 2.0)
"""The default CAA strengths (units of the mean-difference vector; see :mod:`cna_lens.steering.caa`).

``alpha = -1`` moves a harmful prompt's last-token residual at the steered layer onto the
benign mean (the counterpart of CNA's ``m = 0``), ``alpha = +1`` doubles the contrast (the
counterpart of ``m = 2``). The range is finer near 0, where CAA trades refusal against
coherence, and reaches 4x, far enough to show quality collapse where it happens.
"""

PAPER_COLUMNS = [
    "prompt_set",
    "prompt_index",
    "prompt",
    "method",
    "strength",
    "output",
    "refused",
    "quality",
    "correct",
    "judge",
]
"""The columns every paper-grid table has (the engine adds ``condition``, ``tokens`` and
``seconds``)."""

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
"""Columns of :func:`dose_sweep`'s table. ``tokens``: new tokens generated for the set
(sum); ``seconds``: the condition's generation time, shared among the sets by their tokens
(0 when ``reused``); ``identity``: the condition is the unsteered model; ``reused``: outputs
of an identical earlier condition were reused; ``accuracy``: capability accuracy (NaN for
other sets)."""

VARIANTS: tuple[tuple[str, str], ...] = (
    ("scale", "positive"),
    ("mean", "both"),
    ("mean", "positive"),
)
"""Ablations (m = 0) beside the paper's ("scale", "both") in :func:`variants_grid`."""


def _decoding(
    decoding: Decoding | None, max_new_tokens: int | None, batch_size: int | None
) -> Decoding:
    if decoding is not None and (max_new_tokens is not None or batch_size is not None):
        raise CNAError("pass either decoding=Decoding(...) or max_new_tokens/batch_size")
    if decoding is not None:
        return decoding
    return Decoding(max_new_tokens=max_new_tokens or 64, batch_size=batch_size or 16)


# ----------------------------------------------------------------------------- paper grid
def paper_grid(
    circuit: Circuit | None = None,
    caa: CAAVectors | None = None,
    *,
    multipliers: Iterable[float] = CNA_MULTIPLIERS,
    caa_alphas: Iterable[float] = CAA_ALPHAS,
    caa_layers: Sequence[int] | None = None,
    random_control: bool = True,
    control_multipliers: Iterable[float] = (0.0,),
    seed: int = 0,
) -> list[Arm]:
    """The paper's conditions, tagged ``method`` ("cna", "caa", "random") and ``strength``:
    CNA at each multiplier (with ``circuit``), CAA at each alpha (with ``caa``), and a
    random-neuron control circuit of the same size and per-layer counts (seeded, see
    :func:`cna_lens.random_control_circuit`) at ``control_multipliers``.

    Raises:
        CNAError: a strength that is not a finite number.
    """
    arms: list[Arm] = []
    if circuit is not None:
        for m in check_numbers("multipliers", multipliers):
            arms.append(_paper_arm(Steering(circuit=circuit, multiplier=m), "cna", m))
    if caa is not None:
        layers = None if caa_layers is None else tuple(caa_layers)
        for a in check_numbers("caa_alphas", caa_alphas):
            arms.append(_paper_arm(CAA(caa, a, layers), "caa", a))
    if circuit is not None and random_control:
        control = random_control_circuit(circuit, seed=seed)
        for m in check_numbers("control_multipliers", control_multipliers):
            arms.append(_paper_arm(Steering(circuit=control, multiplier=m), "random", m))
    return arms


def _paper_arm(condition: Any, method: str, strength: float) -> Arm:
    return Arm(condition, {"method": method, "strength": float(strength)}, f"{method} {strength:g}")


def paper_sweep(
    model: Any,
    prompt_sets: Mapping[str, Sequence[str]],
    *,
    circuit: Circuit | None = None,
    caa: CAAVectors | None = None,
    capability: Sequence[CapabilityItem] | None = None,
    multipliers: Iterable[float] = CNA_MULTIPLIERS,
    caa_alphas: Iterable[float] = CAA_ALPHAS,
    caa_layers: Sequence[int] | None = None,
    random_control: bool = True,
    control_multipliers: Iterable[float] = (0.0,),
    seed: int = 0,
    classifier: Callable[[str], bool] = is_refusal,
    judge: Judge | None = None,
    judge_sets: Sequence[str] = ("harmful",),
    decoding: Decoding | None = None,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    backend: str | Backend = "fast",
    progress: bool = False,
    texts: Any = None,
) -> pd.DataFrame:
    """Generate every prompt set under the paper's conditions (:func:`paper_grid`) and score
    them (refused, quality, correct, judge).

    Args:
        model: A bridge from :func:`cna_lens.load_model`.
        prompt_sets: Set name -> prompts (e.g. {"harmful": [...], "benign": [...]}).
        circuit, caa, multipliers, caa_alphas, caa_layers, random_control,
            control_multipliers, seed: The grid (see :func:`paper_grid`).
        capability: Capability items, scored as the prompt set "capability".
        classifier: Refusal classifier (any ``str -> bool``).
        judge: Optional harmfulness judge, applied to the sets in ``judge_sets``.
        decoding: Generation settings; or ``max_new_tokens`` / ``batch_size`` alone.
        backend: "fast" (default) or "bridge" (the reference; the same texts).
        progress: One progress bar for the run.
        texts: Write every generated text as JSON lines to this path.

    Returns:
        One row per prompt x method x strength (:data:`PAPER_COLUMNS` and the engine's
        ``condition``, ``tokens``, ``seconds``); empty without a circuit and CAA vectors.

    Raises:
        CNAError: no prompts, a "capability" set name clash, or bad strengths.
    """
    arms = paper_grid(
        circuit,
        caa,
        multipliers=multipliers,
        caa_alphas=caa_alphas,
        caa_layers=caa_layers,
        random_control=random_control,
        control_multipliers=control_multipliers,
        seed=seed,
    )
    if not arms:
        evaluation_sets(prompt_sets, capability)  # bad sets are refused all the same
        return pd.DataFrame(columns=PAPER_COLUMNS)
    return evaluate(
        model,
        prompt_sets,
        arms,
        capability=capability,
        metrics=paper_metrics(classifier, judge, judge_sets),
        decoding=_decoding(decoding, max_new_tokens, batch_size),
        backend=backend,
        progress=progress,
        texts=texts,
    )


def variants_grid(circuit: Circuit, variants: Sequence[tuple[str, str]] = VARIANTS) -> list[Arm]:
    """The circuit ablated (m = 0) by each (intervention, sign) of ``variants``, tagged
    ``method = "cna-INTERVENTION-SIGN"``, ``strength = 0``."""
    return [
        _paper_arm(
            Steering(circuit=circuit, intervention=iv, sign=sign, multiplier=0.0),
            f"cna-{iv}-{sign}",
            0.0,
        )
        for iv, sign in variants
    ]


# ----------------------------------------------------------------------------- dose grid
def check_fractions(values: Iterable[Any]) -> tuple[float, ...]:
    """Circuit-size fractions: non-empty, ascending, distinct, each in (0, 1].

    Raises:
        CNAError: otherwise (the message repeats the list).
    """
    return check_numbers(
        "fractions",
        values,
        rule="numbers in (0, 1]",
        ok=lambda v: 0.0 < v <= 1.0,
        ordered=True,
        empty=False,
    )


def check_multipliers(values: Iterable[Any]) -> tuple[float, ...]:
    """Multipliers: non-empty, ascending, distinct, finite and >= 0.

    Negative multipliers (flipping a neuron's sign) are refused: they are outside the
    paper's range and, for ``"mean"``, mirror the activation around the negative mean,
    which is rarely what a dose-response curve means to show.

    Raises:
        CNAError: otherwise (the message repeats the list).
    """
    return check_numbers(
        "multipliers",
        values,
        rule="finite numbers >= 0",
        ok=lambda v: v >= 0.0,
        ordered=True,
        empty=False,
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


def dose_grid(
    discovery: Discovery,
    *,
    fractions: Iterable[float],
    multipliers: Iterable[float],
    interventions: Iterable[str] = ("scale",),
    signs: Iterable[str] = ("both",),
) -> list[Arm]:
    """Every fraction x intervention x sign x multiplier, each circuit selected from the
    discovery's statistics; tagged with :data:`COLUMNS`' condition columns.

    Raises:
        CNAError: bad grids (empty, unsorted, duplicates, out of range), unknown
            intervention or sign, or an intervention the circuit lacks data for.
    """
    fracs = check_fractions(fractions)
    mults = check_multipliers(multipliers)
    ivs = _check_names("interventions", interventions, get_intervention)
    sgns = _check_names("signs", signs, lambda s: check_choice("sign", s, get_args(Sign)))
    circuits = {f: discovery.circuit_at(fraction=f) for f in fracs}
    arms, seen = [], set()
    for f in fracs:
        for iv in ivs:
            for s in sgns:
                for m in mults:
                    steering = Steering(circuit=circuits[f], intervention=iv, multiplier=m, sign=s)
                    key = condition_key(steering)
                    tags = {
                        "fraction": steering.circuit.provenance.fraction,
                        "k": len(steering.circuit),
                        "intervention": iv,
                        "sign": s,
                        "multiplier": steering.multiplier,
                        "identity": is_identity(steering),
                        "reused": key in seen,
                    }
                    seen.add(key)
                    arms.append(Arm(steering, tags))
    return arms


def dose_sweep(
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
    decoding: Decoding | None = None,
    max_new_tokens: int | None = None,
    batch_size: int | None = None,
    backend: str | Backend = "fast",
    progress: bool = False,
    texts: Any = None,
) -> pd.DataFrame:
    """Generate and score every prompt set under every dose condition (:func:`dose_grid`).

    Args:
        model: The bridge the discovery was made on.
        discovery: From :func:`cna_lens.discover_full`; every circuit size is selected from
            it without a forward pass.
        prompt_sets: Set name -> prompts, e.g. ``{"harmful": [...], "benign": [...]}``.
        fractions, multipliers, interventions, signs: The grid (see :func:`dose_grid`).
        capability: Capability items, scored as the prompt set "capability" (accuracy).
        classifier: Refusal classifier on the generated text.
        decoding: Generation settings; or ``max_new_tokens`` / ``batch_size`` alone.
        backend: "fast" (default) or "bridge" (the reference; the same texts).
        progress: One progress bar for the run.
        texts: Write every generated text as JSON lines to this path.

    Returns:
        One row per condition x prompt set with the columns :data:`COLUMNS`, in fraction,
        intervention, sign, multiplier, prompt set order.

    Raises:
        CNAError: bad grids, unknown intervention or sign, an intervention the circuit
            lacks data for, no prompts, or a set named "capability" next to ``capability``.
    """
    arms = dose_grid(
        discovery,
        fractions=fractions,
        multipliers=multipliers,
        interventions=interventions,
        signs=signs,
    )
    for arm in arms:
        arm.condition.circuit.validate(model)
    table = evaluate(
        model,
        prompt_sets,
        arms,
        capability=capability,
        metrics={"refused": refusal_metric(classifier), "quality": "quality", "correct": "correct"},
        decoding=_decoding(decoding, max_new_tokens, batch_size),
        backend=backend,
        progress=progress,
        texts=texts,
    )
    return _dose_rows(table)


def _dose_rows(table: pd.DataFrame) -> pd.DataFrame:
    """One row per arm x set of the engine's per-prompt table."""
    keys = ["fraction", "k", "intervention", "sign", "multiplier", "identity", "reused"]
    rows = []
    for (*tags, pset), g in table.groupby([*keys, "prompt_set"], sort=False, dropna=False):
        correct = g["correct"].dropna()
        rows.append(
            {
                **dict(zip(keys, tags, strict=True)),
                "prompt_set": pset,
                "n": len(g),
                "refusal_rate": sum(map(bool, g["refused"])) / len(g),
                "quality": sum(g["quality"]) / len(g),
                "accuracy": sum(map(bool, correct)) / len(correct) if len(correct) else math.nan,
                "tokens": int(g["tokens"].sum()),
                "seconds": float(g["seconds"].iloc[0]),
            }
        )
    return pd.DataFrame(rows, columns=COLUMNS)


sweep = dose_sweep
"""``cna_lens.sweep`` (and the old ``cna_lens.dose.sweep``): the dose sweep."""

__getattr__ = _compat.forward(__name__, {"dose_figure": "cna_lens.viz.plots:dose_figure"})
