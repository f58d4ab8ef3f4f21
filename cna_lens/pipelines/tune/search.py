"""The search: a trial's parameters -> a steering -> (refusal proxy, KL), and the Pareto front.

One discovery feeds every trial (a circuit of any size, score and layer window is selected
from the same statistics, no forward pass). Each trial runs two forward passes from the
first layer a circuit may use, on residuals kept from the unsteered model: the harmful
search prompts (the refusal proxy) and the harmless ones along the unsteered answers (KL,
and the over-refusal proxy at the first answer token).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import optuna

from cna_lens.core.discovery import Discovery, circuit_from_attribution
from cna_lens.evaluation.kl import KLReference
from cna_lens.evaluation.proxy import RefusalProxy
from cna_lens.pipelines.tune.config import TuneConfig
from cna_lens.steering import Steering

__all__ = ["Objectives", "Point", "pareto_front", "steering_of", "suggest"]


@dataclass(frozen=True)
class Point:
    """One evaluated trial of the search.

    Attributes:
        number: The trial's number in the study.
        params: Its parameters.
        k: Circuit size.
        refusal: Refusal proxy on the harmful search prompts (lower is better).
        kl: KL (mean over the first N answer tokens) on the harmless search prompts.
        kl_first: First-token KL on the same prompts.
        over_refusal: Over-refusal proxy on the harmless search prompts.
        feasible: The over-refusal constraint holds.
    """

    number: int
    params: dict[str, Any]
    k: int
    refusal: float
    kl: float
    kl_first: float
    over_refusal: float
    feasible: bool


def suggest(
    trial: optuna.trial.BaseTrial, cfg: TuneConfig, n_layers: int, first: int
) -> dict[str, Any]:
    """A trial's parameters, drawn from the config's search space."""
    params: dict[str, Any] = {
        "fraction": trial.suggest_float("fraction", *cfg.fractions, log=True),
        "score": trial.suggest_categorical("score", list(cfg.scores)),
        "intervention": trial.suggest_categorical("intervention", list(cfg.interventions)),
        "sign": trial.suggest_categorical("sign", list(cfg.signs)),
        "multiplier": trial.suggest_float("multiplier", *cfg.multipliers),
        "first_layer": trial.suggest_int("first_layer", first, n_layers - 1),
    }
    if params["sign"] == "both":
        params["negative_multiplier"] = trial.suggest_float(
            "negative_multiplier", *cfg.negative_multipliers
        )
    return params


def steering_of(found: Discovery, params: dict[str, Any]) -> Steering:
    """The steering a trial's parameters mean (its circuit selected from ``found``)."""
    n_layers, d_mlp = found.attribution.shape
    k = max(1, round(params["fraction"] * n_layers * d_mlp))
    circuit = circuit_from_attribution(
        found.attribution,
        top_k=k,
        exclude_layers=tuple(range(params["first_layer"])),
        score=params["score"],
        universal=found.universal,
        provenance=found.circuit.provenance,
    )
    return Steering(
        circuit=circuit,
        intervention=params["intervention"],
        multiplier=params["multiplier"],
        negative_multiplier=params.get("negative_multiplier"),
        sign=params["sign"],
    )


class Objectives:
    """The two objectives and the constraint of a trial, from the kept passes."""

    def __init__(self, proxy: RefusalProxy, kl: KLReference, slack: float):
        self.proxy = proxy
        self.kl = kl
        self.slack = slack
        self.baseline_refusal = proxy.score(None)
        self.baseline_over = self.kl.measure(None, mass_ids=proxy.tokens).mass_first or 0.0

    def __call__(self, steering: Any) -> tuple[float, float, float, float]:
        """(refusal proxy, KL mean, KL first, over-refusal proxy) of a condition."""
        refusal = self.proxy.score(steering)
        kl = self.kl.measure(steering, mass_ids=self.proxy.tokens)
        return refusal, kl.mean, kl.first, float(kl.mass_first or 0.0)

    def constraint(self, over_refusal: float) -> float:
        """<= 0 when the over-refusal proxy rose by at most the slack."""
        return over_refusal - self.baseline_over - self.slack


def run_trial(
    study: optuna.Study,
    cfg: TuneConfig,
    found: Discovery,
    objectives: Objectives,
    first: int,
) -> Point:
    """Ask the study for a trial, evaluate it, tell the study."""
    trial = study.ask()
    began = time.perf_counter()
    n_layers = found.attribution.shape[0]
    params = suggest(trial, cfg, n_layers, first)
    steering = steering_of(found, params)
    refusal, kl, kl_first, over = objectives(steering)
    constraint = objectives.constraint(over)
    for key, value in (
        ("k", len(steering.circuit)),
        ("kl_first", kl_first),
        ("over_refusal", over),
        ("constraint", constraint),
        ("seconds", round(time.perf_counter() - began, 2)),
    ):
        trial.set_user_attr(key, value)
    trial.set_constraint("over_refusal", constraint)
    study.tell(trial, [refusal, kl])
    return Point(
        trial.number, params, len(steering.circuit), refusal, kl, kl_first, over, constraint <= 0
    )


def points(study: optuna.Study) -> list[Point]:
    """Every complete trial of the study as a :class:`Point`."""
    out = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)):
        u = t.user_attrs
        out.append(
            Point(
                t.number,
                dict(t.params),
                int(u.get("k", 0)),
                float(t.values[0]),
                float(t.values[1]),
                float(u.get("kl_first", math.nan)),
                float(u.get("over_refusal", math.nan)),
                float(u.get("constraint", math.inf)) <= 0,
            )
        )
    return out


def pareto_front(pts: Sequence[Point]) -> list[Point]:
    """The feasible points no other feasible point beats on both refusal and KL (ties:
    the smaller circuit), sorted by refusal."""
    feasible = [p for p in pts if p.feasible]
    front = []
    for p in feasible:
        dominated = any(
            (q.refusal <= p.refusal and q.kl <= p.kl)
            and (q.refusal < p.refusal or q.kl < p.kl or q.k < p.k)
            for q in feasible
        )
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: (p.refusal, p.kl))
