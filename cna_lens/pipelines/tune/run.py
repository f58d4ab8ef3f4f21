"""``tune``: the sparsest circuit steering that removes refusal, within a time budget.

Sequence (each step one function): load the model; discover once (every circuit size,
score and layer window comes from these statistics); build the kept passes (the refusal
proxy's harmful prompts, the KL reference's harmless prompts, both from the first layer a
circuit may use); compute the attribution-patching gradients when ``atp`` is searched;
then ask an Optuna study (multi-objective TPE, minimising the refusal proxy and the KL,
with the over-refusal constraint; SQLite storage, so an interrupted study resumes and
several processes can share one) for trials until the budget leaves just enough time to
confirm; confirm the chosen Pareto points with full generation on held-out prompts; write
the tables, the figure, the recommended circuit and steering, and a report.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
import torch
from tqdm.auto import tqdm

from cna_lens.core.discovery import Discovery, DiscoveryConfig, discover_full
from cna_lens.core.gradients import attribution_patching_score, neuron_gradients
from cna_lens.core.scores import register_score
from cna_lens.errors import CNAError
from cna_lens.evaluation import Arm, evaluate
from cna_lens.evaluation.kl import KLReference
from cna_lens.evaluation.proxy import RefusalProxy
from cna_lens.generation import FastBackend
from cna_lens.io import atomic_write_text
from cna_lens.models.loading import load_model, model_id
from cna_lens.models.names import resolve_model
from cna_lens.pipelines.tune.config import (
    TuneConfig,
    TunePrompts,
    load_tune_prompts,
    overlap_counts,
)
from cna_lens.pipelines.tune.confirm import (
    PAPER_TOP_K,
    choose,
    confirm,
    confirmation_arms,
    spread,
)
from cna_lens.pipelines.tune.search import (
    Objectives,
    Point,
    pareto_front,
    points,
    run_trial,
    steering_of,
)
from cna_lens.steering import Steering
from cna_lens.viz import pareto_figure, save_figures, write_report

__all__ = ["TuneResult", "spearman", "tune", "validate_proxy"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TuneResult:
    """What a tuning run found.

    Attributes:
        points: Every trial of the study (this run's and earlier runs').
        front: The feasible Pareto front of the search.
        confirmed: One row per confirmed condition (held-out refusal, over-refusal,
            quality, KL, k).
        recommended: The recommended steering (None when no tuned point met the
            over-refusal constraint).
        summary: What ``tune.json`` holds.
        files: The files written, by name.
    """

    points: list[Point]
    front: list[Point]
    confirmed: pd.DataFrame
    recommended: Steering | None
    summary: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


class _Clock:
    def __init__(self, minutes: float):
        self.t0 = time.perf_counter()
        self.deadline = self.t0 + 60 * minutes
        self.stages: dict[str, float] = {}
        self._last = self.t0

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.stages[name] = round(now - self._last, 1)
        self._last = now

    @property
    def left(self) -> float:
        return self.deadline - time.perf_counter()


CALIBRATION_TOKENS = 8
"""Tokens of the unsteered answers the refusal proxy learns its openings from (a refusal
shows in its first words)."""

GRADIENT_PROMPTS = 32
"""Discovery prompts the attribution-patching gradients are averaged over."""

WHERE_IT_LIVES = 0.9
"""The default first layer of the search: the lowest one such that the layers from it up hold
this share of the discovery's 1% circuit (where the circuit lives)."""


def _first_layer(cfg: TuneConfig, found: Discovery) -> int:
    n_layers = found.attribution.shape[0]
    if cfg.first_layer is not None:
        if not 0 <= cfg.first_layer < n_layers:
            raise CNAError(f"first_layer must be in 0..{n_layers - 1}, got {cfg.first_layer}")
        return cfg.first_layer
    counts = found.circuit_at(fraction=0.01).per_layer_counts()
    total, above = sum(counts), 0
    for layer in range(n_layers - 1, -1, -1):
        above += counts[layer]
        if above >= WHERE_IT_LIVES * total:
            return layer
    return 0


def _check_space(cfg: TuneConfig, n_total: int) -> None:
    low, high = cfg.fractions
    if high * n_total < 0.5:
        raise CNAError(
            f"fractions {cfg.fractions} select fewer than one of the model's {n_total} MLP "
            "neurons; the search space is empty: raise the upper fraction"
        )


def _register_atp(model: Any, prompts: TunePrompts, tokens: Any, cfg: TuneConfig) -> None:
    """Register the run's attribution-patching score ("atp"): |delta * gradient| of the
    refusal openings' log-probability, over the first discovery prompts."""
    grads = neuron_gradients(
        model, prompts.discovery_harmful[:GRADIENT_PROMPTS], tokens, batch_size=cfg.batch_size
    )
    register_score("atp", attribution_patching_score(grads), overwrite=True)


def _discover(model: Any, cfg: TuneConfig, prompts: TunePrompts) -> Discovery:
    base = cfg.discovery or DiscoveryConfig(
        batch_size=cfg.batch_size, prefix_reuse=cfg.prefix_reuse
    )
    dcfg = DiscoveryConfig.from_dict(
        {**base.to_dict(), "fraction": cfg.fractions[1], "top_k": None}
    )
    return discover_full(model, prompts.discovery_harmful, prompts.discovery_benign, dcfg)


def _study(cfg: TuneConfig) -> optuna.Study:
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=10, multivariate=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        storage=cfg.storage_url,
        study_name=cfg.study,
        directions=["minimize", "minimize"],
        sampler=sampler,
        load_if_exists=True,
    )
    space = json.dumps(cfg.search_space(), sort_keys=True)
    stored = study.user_attrs.get("search_space")
    if stored is None:
        study.set_user_attr("search_space", space)
        study.set_user_attr("model", cfg.model)
    elif stored != space or study.user_attrs.get("model") != cfg.model:
        raise CNAError(
            f"study {cfg.study!r} in {cfg.storage_url} was made with another model or search "
            "space; resume it with the same settings, or pass another --study / --out"
        )
    return study


def _seed_paper_point(study: optuna.Study, cfg: TuneConfig, first: int, n_total: int) -> None:
    """Start a new study at the paper's rule (0.1%, scale both signs, m = 0) and the paper
    code's size (``top_k=1600``, the same rule), where they are in the space: the first
    trials then show what the paper's recommendations do, and the ``scale`` intervention
    is measured at two sizes before the sampler's random start (seeded TPE drew ``mean``
    for all nine random trials of a 0.5B study that began with one seeded point)."""
    if study.trials or not (
        "abs_delta" in cfg.scores and "scale" in cfg.interventions and "both" in cfg.signs
    ):
        return
    for fraction in (0.001, PAPER_TOP_K / n_total):
        if cfg.fractions[0] <= fraction <= cfg.fractions[1]:
            study.enqueue_trial(
                {
                    "fraction": fraction,
                    "score": "abs_delta",
                    "intervention": "scale",
                    "sign": "both",
                    "multiplier": max(cfg.multipliers[0], 0.0),
                    "negative_multiplier": max(cfg.negative_multipliers[0], 0.0),
                    "first_layer": first,
                }
            )


def _search(
    study: optuna.Study,
    cfg: TuneConfig,
    found: Discovery,
    objectives: Objectives,
    first: int,
    clock: _Clock,
    reserve: float,
    progress: bool,
) -> int:
    """Trials until the budget leaves ``reserve`` seconds (or ``cfg.trials`` are done)."""
    done = len(study.trials)
    bar = tqdm(total=cfg.trials, initial=done, desc="tune", unit="trial", disable=not progress)
    ran, spent = 0, 0.0
    try:
        while cfg.trials is None or len(study.trials) < cfg.trials:
            per_trial = spent / ran if ran else 0.0
            if clock.left < reserve + per_trial:
                break
            began = time.perf_counter()
            point = run_trial(study, cfg, found, objectives, first)
            spent += time.perf_counter() - began
            ran += 1
            best = pareto_front(points(study))
            bar.update(1)
            bar.set_postfix_str(
                f"refusal {point.refusal:.3f} KL {point.kl:.3f} | front {len(best)} | "
                f"{max(0.0, clock.left - reserve) / 60:.1f} min left"
            )
    finally:
        bar.close()
    return ran


def _confirm_estimate(cfg: TuneConfig, prompts: TunePrompts, kl_seconds: float) -> float:
    """Seconds the confirmation will take, from the KL reference's own generation (one
    condition, ``kl_tokens`` tokens per prompt): side-by-side generation of several
    conditions of twice as many tokens costs about 0.3 of it per token, and the held-out KL
    reference what the search's did, per prompt (calibrated on Qwen2.5-Coder-0.5B, where
    0.4 and 1.5 x overestimated a 299 s confirmation by 140 s)."""
    n_arms = 1 + cfg.confirm_points + (2 if cfg.compare else 0)
    per_token = kl_seconds / max(1, len(prompts.search_harmless) * cfg.kl_tokens)
    n_prompts = len(prompts.heldout_harmful) + len(prompts.heldout_harmless)
    generation = 0.3 * n_arms * n_prompts * cfg.confirm_tokens * per_token
    kl = kl_seconds * len(prompts.heldout_harmless) / max(1, len(prompts.search_harmless))
    return generation + kl + 15.0  # + files


def tune(config: TuneConfig, *, progress: bool = False) -> TuneResult:
    """Search, confirm on held-out prompts, and write the outputs (see the module docstring).

    Raises:
        CNAError: bad settings, an empty search space, a budget that cannot fit one trial
            and the confirmation, or a stored study made with other settings.
    """
    cfg = config
    clock = _Clock(cfg.budget_minutes)
    prompts = load_tune_prompts(cfg)
    overlaps = {k: v for k, v in overlap_counts(prompts).items() if v}
    for what, count in overlaps.items():
        logger.warning("%d prompts occur in both %s sets", count, what)
    study = _study(cfg)
    old_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        model = load_model(resolve_model(cfg.model), device=cfg.device)
        n_layers, d_mlp = int(model.cfg.n_layers), int(model.cfg.d_mlp)
        _check_space(cfg, n_layers * d_mlp)
        clock.lap("load")
        found = _discover(model, cfg, prompts)
        first = _first_layer(cfg, found)
        clock.lap("discover")
        with FastBackend(model) as backend:
            return _run(
                model, backend, cfg, prompts, found, study, first, clock, progress, overlaps
            )
    finally:
        torch.set_num_threads(old_threads)


def _run(
    model: Any,
    backend: FastBackend,
    cfg: TuneConfig,
    prompts: TunePrompts,
    found: Discovery,
    study: optuna.Study,
    first: int,
    clock: _Clock,
    progress: bool,
    overlaps: dict[str, int],
) -> TuneResult:
    proxy = RefusalProxy(
        backend,
        prompts.search_harmful,
        prompts.search_harmless,
        calibration_tokens=CALIBRATION_TOKENS,
        batch_size=cfg.batch_size,
        start_layer=first,
        prefix_reuse=cfg.prefix_reuse,
    )
    began = time.perf_counter()
    kl = KLReference(
        backend,
        prompts.search_harmless,
        tokens=cfg.kl_tokens,
        batch_size=cfg.batch_size,
        start_layer=first,
        prefix_reuse=cfg.prefix_reuse,
    )
    kl_seconds = time.perf_counter() - began
    if "atp" in cfg.scores:
        _register_atp(model, prompts, proxy.tokens, cfg)
    objectives = Objectives(proxy, kl, cfg.over_refusal_slack)
    study.set_user_attr("proxy_tokens", json.dumps(list(proxy.tokens)))
    clock.lap("kept passes")
    reserve = _confirm_estimate(cfg, prompts, kl_seconds)
    if clock.left < reserve:
        raise CNAError(
            f"the budget of {cfg.budget_minutes:g} min cannot fit a trial and the confirmation: "
            f"{clock.left / 60:.1f} min are left after setup, the confirmation needs about "
            f"{reserve / 60:.1f} min; raise --budget or lower --n-heldout / --confirm-points"
        )
    _seed_paper_point(study, cfg, first, model.cfg.n_layers * model.cfg.d_mlp)
    ran = _search(study, cfg, found, objectives, first, clock, reserve, progress)
    clock.lap("search")
    if not ran and not study.trials:
        raise CNAError("no trial ran: the budget or the trial count leaves no time for one")
    pts = points(study)
    front = pareto_front(pts)
    chosen = spread(front, cfg.confirm_points, objectives.baseline_refusal / 2)
    arms = confirmation_arms(found, chosen, cfg)
    out = Path(cfg.out)
    confirmed = confirm(backend, prompts, arms, cfg, texts=out / "confirm.jsonl", progress=progress)
    clock.lap("confirm")
    best = choose(confirmed, cfg, None)
    recommended = None
    if best is not None:
        trial = next(p for p in chosen if p.number == int(best["trial"]))
        recommended = steering_of(found, trial.params)
    summary = _summary(
        cfg, model, prompts, found, objectives, pts, front, confirmed, best, clock, ran
    )
    summary["prompt_overlaps"] = overlaps
    files = _write(out, cfg, pts, front, confirmed, recommended, summary)
    return TuneResult(pts, front, confirmed, recommended, summary, files)


def _summary(
    cfg: TuneConfig,
    model: Any,
    prompts: TunePrompts,
    found: Discovery,
    objectives: Objectives,
    pts: list[Point],
    front: list[Point],
    confirmed: pd.DataFrame,
    best: pd.Series | None,
    clock: _Clock,
    ran: int,
) -> dict[str, Any]:
    n_layers, d_mlp = found.attribution.shape
    return {
        "model": model_id(model),
        "config": cfg.to_dict(),
        "prompts": {
            "source": prompts.source,
            **{
                k: len(getattr(prompts, k))
                for k in TunePrompts.__dataclass_fields__
                if k != "source"
            },
        },
        "neurons": n_layers * d_mlp,
        "universal_removed": 0 if found.universal is None else len(found.universal),
        "proxy_tokens": list(objectives.proxy.tokens),
        "proxy_baseline": {
            "refusal": objectives.baseline_refusal,
            "over_refusal": objectives.baseline_over,
        },
        "trials": {"this_run": ran, "in_study": len(pts), "feasible": sum(p.feasible for p in pts)},
        "front": [p.__dict__ for p in front],
        "confirmed": json.loads(confirmed.to_json(orient="records")),
        "recommended": None if best is None else json.loads(best.to_json()),
        "seconds": round(time.perf_counter() - clock.t0, 1),
        "stage_seconds": dict(clock.stages),
    }


def _write(
    out: Path,
    cfg: TuneConfig,
    pts: list[Point],
    front: list[Point],
    confirmed: pd.DataFrame,
    recommended: Steering | None,
    summary: dict[str, Any],
) -> dict[str, Path]:
    files: dict[str, Path] = {}
    table = pd.DataFrame(
        [{**p.__dict__, **{f"param_{k}": v for k, v in p.params.items()}} for p in pts]
    )
    table = table.drop(columns=["params"])
    files["trials.csv"] = atomic_write_text(out / "trials.csv", table.to_csv(index=False))
    front_table = table[table["number"].isin([p.number for p in front])].sort_values("refusal")
    files["pareto.csv"] = atomic_write_text(out / "pareto.csv", front_table.to_csv(index=False))
    files["pareto.json"] = atomic_write_text(
        out / "pareto.json", front_table.to_json(orient="records", indent=1)
    )
    files["confirmed.csv"] = atomic_write_text(out / "confirmed.csv", confirmed.to_csv(index=False))
    files["confirm.jsonl"] = out / "confirm.jsonl"
    figure = pareto_figure(table, confirmed)
    saved = save_figures({"pareto": figure}, out, png=False)
    files.update({f"{k}.html": v for k, v in saved.html.items()})
    if recommended is not None:
        files["steering.json"] = recommended.save(out / "steering.json")
        files["circuit.json"] = recommended.circuit.save(out / "circuit.json")
    files["tune.json"] = atomic_write_text(
        out / "tune.json", json.dumps(summary, indent=1, default=str) + "\n"
    )
    files["report.html"] = write_report(
        out / "report.html",
        summary={
            k: v
            for k, v in summary.items()
            if k in ("model", "prompts", "trials", "recommended", "seconds")
        },
        figures={"pareto": figure},
        circuit=None if recommended is None else recommended.circuit,
        title=f"cna_lens tune: {summary['model']}",
    )
    return files


# ----------------------------------------------------------------------------- validation
def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when a side is constant."""

    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    rx, ry = ranks(x), ranks(y)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry, strict=True))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx and sy else math.nan


def _spaced(pts: list[Point], n: int) -> list[Point]:
    """``n`` points evenly spaced in refusal-proxy order (all of them if fewer)."""
    ordered = sorted(pts, key=lambda p: p.refusal)
    if len(ordered) <= n:
        return ordered
    return [ordered[round(i * (len(ordered) - 1) / (n - 1))] for i in range(n)]


def validate_proxy(
    cfg: TuneConfig, *, n_conditions: int = 20, progress: bool = False
) -> dict[str, Any]:
    """The refusal proxy's rank correlation with the generated refusal rate, over
    ``n_conditions`` trials of the study in ``cfg``'s storage (spread over the proxy's
    range), generated on the search prompts the proxy scored (``cfg.confirm_tokens`` tokens).

    Writes ``proxy_validation.csv`` and ``proxy_validation.json`` into ``cfg.out``.

    Raises:
        CNAError: no study, or fewer than 3 complete trials in it.
    """
    try:
        study = optuna.load_study(storage=cfg.storage_url, study_name=cfg.study)
    except KeyError as exc:
        raise CNAError(
            f"no study {cfg.study!r} in {cfg.storage_url}; run cna-lens tune first"
        ) from exc
    chosen = _spaced(points(study), n_conditions)
    if len(chosen) < 3:
        raise CNAError(f"the study has {len(chosen)} complete trials; a correlation needs >= 3")
    prompts = load_tune_prompts(cfg)
    model = load_model(resolve_model(cfg.model), device=cfg.device)
    found = _discover(model, cfg, prompts)
    if any(p.params["score"] == "atp" for p in chosen):
        tokens = json.loads(study.user_attrs.get("proxy_tokens", "[]"))
        _register_atp(model, prompts, tokens, cfg)
    arms = [Arm(steering_of(found, p.params), {"trial": p.number}) for p in chosen]
    table = evaluate(
        model,
        {"harmful": prompts.search_harmful},
        arms,
        metrics=["refused"],
        decoding=cfg.confirm_decoding,
        progress=progress,
    )
    generated = table.groupby("trial")["refused"].mean()
    rows = [
        {"trial": p.number, "k": p.k, "proxy": p.refusal, "generated": float(generated[p.number])}
        for p in chosen
    ]
    rho = spearman([r["proxy"] for r in rows], [r["generated"] for r in rows])
    out = Path(cfg.out)
    atomic_write_text(out / "proxy_validation.csv", pd.DataFrame(rows).to_csv(index=False))
    record = {"n": len(rows), "spearman": rho, "tokens": cfg.confirm_tokens, "rows": rows}
    atomic_write_text(out / "proxy_validation.json", json.dumps(record, indent=1) + "\n")
    return record
