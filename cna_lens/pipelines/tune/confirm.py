"""Confirmation: the best search points re-run with full generation on held-out prompts.

The search's numbers come from a proxy on search prompts; nothing is reported from them.
The chosen Pareto points (spread along the front), the unsteered model and, for
comparison, the paper's 0.1% rule and the paper code's ``top_k = 1600`` are generated on the
held-out prompts through the evaluation engine and scored by the refusal classifier, the
4-gram quality and the KL on held-out harmless prompts. The recommended point is the
confirmed tuned point that meets the refusal target with the smallest KL (the over-refusal
constraint holding), else the one with the lowest refusal.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pandas as pd

from cna_lens.core.discovery import Discovery, circuit_from_attribution
from cna_lens.evaluation import Arm, evaluate, paper_metrics, summarize
from cna_lens.evaluation.kl import KLReference
from cna_lens.generation import FastBackend
from cna_lens.generation.forward import hook_layer
from cna_lens.pipelines.tune.config import TuneConfig, TunePrompts
from cna_lens.pipelines.tune.search import Point, steering_of
from cna_lens.steering import Steering, condition_key, condition_ops

__all__ = ["PAPER_TOP_K", "choose", "confirm", "confirmation_arms"]

PAPER_TOP_K = 1600
"""The fixed circuit size of the paper's experiment scripts (``top_k=1600``)."""


def spread(front: Sequence[Point], n: int, goal: float) -> list[Point]:
    """Up to ``n`` points of a front (sorted by refusal) worth confirming: spread evenly over
    those whose refusal proxy meets ``goal`` (the lowest refusal and the lowest KL among them
    kept); topped up with the next-lowest refusals when fewer meet it."""
    meeting = [p for p in front if p.refusal <= goal]
    if len(meeting) <= n:
        return (meeting + [p for p in front if p.refusal > goal])[:n]
    idx = sorted({round(i * (len(meeting) - 1) / (n - 1)) for i in range(n)}) if n > 1 else [0]
    return [meeting[i] for i in idx]


def _reference(found: Discovery, k: int, label: str) -> Arm:
    circuit = circuit_from_attribution(
        found.attribution,
        top_k=k,
        score="abs_delta",
        universal=found.universal,
        provenance=found.circuit.provenance,
    )
    return Arm(Steering(circuit=circuit, multiplier=0.0), {"point": label, "k": k, "trial": -1})


def confirmation_arms(found: Discovery, chosen: Sequence[Point], cfg: TuneConfig) -> list[Arm]:
    """The unsteered model, the paper's references (``cfg.compare``) and the chosen points."""
    n = found.attribution.shape[0] * found.attribution.shape[1]
    left = n - (0 if found.universal is None else len(found.universal))
    arms = [Arm(None, {"point": "unsteered", "k": 0, "trial": -1})]
    if cfg.compare:
        arms.append(_reference(found, max(1, round(0.001 * n)), "paper 0.1%"))
        arms.append(_reference(found, min(PAPER_TOP_K, left), f"paper code top_k={PAPER_TOP_K}"))
    for p in chosen:
        steering = steering_of(found, p.params)
        tags = {"point": f"tuned (trial {p.number})", "k": p.k, "trial": p.number}
        arms.append(Arm(steering, tags))
    return arms


def confirm(
    backend: FastBackend,
    prompts: TunePrompts,
    arms: Sequence[Arm],
    cfg: TuneConfig,
    *,
    texts: Any = None,
    progress: bool = False,
) -> pd.DataFrame:
    """One row per arm: held-out refusal, over-refusal, quality, KL (first token and mean
    over N) and the circuit size."""
    model = backend.bridge
    table = evaluate(
        model,
        {"harmful": prompts.heldout_harmful, "benign": prompts.heldout_harmless},
        arms,
        metrics=paper_metrics(),
        decoding=cfg.confirm_decoding,
        backend=backend,
        progress=progress,
        texts=texts,
    )
    rates = summarize(table, by=["point"]).set_index(["point", "prompt_set"])
    kl = KLReference(
        backend,
        prompts.heldout_harmless,
        tokens=cfg.kl_tokens,
        batch_size=cfg.batch_size,
        start_layer=lowest_layer(model, [a.condition for a in arms]),
        prefix_reuse=cfg.prefix_reuse,
    )
    rows = []
    measured: dict[Any, Any] = {}
    for arm in arms:
        key = condition_key(arm.condition)
        if key not in measured:
            measured[key] = kl.measure(arm.condition)
        point = arm.tags["point"]
        rows.append(
            {
                **arm.tags,
                "refusal": float(rates.loc[(point, "harmful"), "refusal_rate"]),
                "over_refusal": float(rates.loc[(point, "benign"), "refusal_rate"]),
                "quality": float(rates.loc[(point, ["harmful", "benign"]), "quality"].mean()),
                "kl_first": measured[key].first,
                "kl": measured[key].mean,
                "seconds": float(
                    table[table["point"] == point].groupby("prompt_set")["seconds"].first().sum()
                ),
            }
        )
    return pd.DataFrame(rows)


def lowest_layer(model: Any, conditions: Sequence[Any]) -> int:
    """The lowest decoder layer any of the conditions changes (0 if one changes anything
    before the first layer; the last layer if none changes anything)."""
    layers = [hook_layer(op.hook) for c in conditions for op in condition_ops(model, c)]
    return max(0, min(layers, default=int(model.cfg.n_layers) - 1))


def choose(confirmed: pd.DataFrame, cfg: TuneConfig, target: float | None) -> pd.Series | None:
    """The recommended confirmed tuned point (see the module docstring), or None."""
    base = confirmed[confirmed["point"] == "unsteered"].iloc[0]
    tuned = confirmed[confirmed["trial"] >= 0]
    ok = tuned[tuned["over_refusal"] <= base["over_refusal"] + cfg.over_refusal_slack + 1e-12]
    if ok.empty:
        return None
    goal = base["refusal"] / 2 if target is None else target
    meeting = ok[ok["refusal"] <= goal + 1e-12]
    if not meeting.empty:
        return meeting.sort_values(["kl", "k"]).iloc[0]
    return ok.sort_values(["refusal", "kl"]).iloc[0]
