"""Reproduce: every claim of the CNA paper checked on one instruct/base pair, in one command.

``cna-lens reproduce [--out DIR] [--model M] [--base-model B] [--quick]`` (or
:func:`reproduce` from Python) runs, by default on the shipped model organism:

1. discovery of the instruct and the base circuit (same prompts, same k, universal
   neurons filtered), keeping the per-prompt activations for the bootstrap;
2. the CAA vectors of the instruct model;
3. the steering sweep of the instruct model: CNA multipliers, CAA strengths and a random
   control circuit on held-out harmful, benign and borderline prompts and the capability
   questions (:func:`cna_lens.evaluation.sweep`);
4. the base model under CNA at ``m = 0``, ``1`` and the largest multiplier;
5. the analyses (layer distribution, base/instruct overlap with its chance level,
   bootstrap stability), the figures (HTML, and PNG where a renderer exists), the sweep
   tables with every generation (``sweep_instruct.jsonl``, ``sweep_base.jsonl``; read them
   with ``pandas.read_json(path, lines=True, dtype=False)``), the circuits, and
   ``summary.json``.

Prompt sets come from :func:`cna_lens.organism.prompts`, or from ``--prompts DIR`` holding
``discovery_harmful.json``, ``discovery_benign.json``, ``eval_harmful.json``,
``eval_benign.json`` (lists of strings) and optionally ``borderline.json``,
``universal.json`` and ``capability.json`` (a list of ``{"question", "answer"[,
"choices"]}``) — so ``--model`` can be any hub name or local directory.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from cna_lens.errors import CNAError
from cna_lens.evaluation import CAA_ALPHAS, CNA_MULTIPLIERS

__all__ = ["QUICK", "ReproduceConfig", "Reproduction", "format_summary", "register", "reproduce"]

logger = logging.getLogger(__name__)

REQUIRED_SETS = ("discovery_harmful", "discovery_benign", "eval_harmful", "eval_benign")
OPTIONAL_SETS = ("borderline", "universal", "capability")


@dataclass(frozen=True, kw_only=True)
class ReproduceConfig:
    """Everything a reproduction run depends on (recorded in ``summary.json``).

    Attributes:
        model: Instruct model (hub name or local dir); None: the organism's instruct model.
        base_model: Base model; None: the organism's base model.
        prompts: Folder of prompt-set JSON files; None: the organism's prompt sets.
        out: Output folder for figures, tables and ``summary.json``.
        fraction: Circuit size as a fraction of all MLP neurons. None (default): the
            organism's documented ``organism.CIRCUIT_FRACTION`` (1% = 31 neurons; the
            paper's 0.1% is 3 neurons there) on the organism, the paper's 0.1% otherwise.
        top_k: Circuit size as a count (overrides ``fraction``).
        multipliers: CNA multipliers of the sweep.
        caa_alphas: CAA strengths of the sweep.
        caa_layers: Layers CAA steers (None: the middle layer).
        n_discovery: Prompts per discovery set (None: all).
        n_eval: Prompts per evaluation set (None: all).
        n_capability: Capability questions (None: all).
        n_universal: Universal-filter prompts (None: all).
        n_bootstrap: Bootstrap resamples for stability.
        max_new_tokens: Generation length.
        batch_size: Prompts per batch (forward passes and generation).
        seed: Seed of the random control and the bootstrap.
        device: Torch device (None: CUDA if available).
        threads: CPU threads for torch during the run (None: 1 thread for models under
            100M parameters, whose many tiny ops run up to 10x slower when two threads
            contend for busy cores; torch's default otherwise). Restored afterwards.
        png: Try PNG export of the figures.
    """

    model: str | None = None
    base_model: str | None = None
    prompts: str | None = None
    out: str = "figures"
    fraction: float | None = None
    top_k: int | None = None
    multipliers: tuple[float, ...] = CNA_MULTIPLIERS
    caa_alphas: tuple[float, ...] = CAA_ALPHAS
    caa_layers: tuple[int, ...] | None = None
    n_discovery: int | None = None
    n_eval: int | None = None
    n_capability: int | None = None
    n_universal: int | None = None
    n_bootstrap: int = 100
    max_new_tokens: int = 32
    batch_size: int = 64
    seed: int = 0
    device: str | None = None
    threads: int | None = None
    png: bool = True

    def __post_init__(self) -> None:
        for name in ("multipliers", "caa_alphas"):
            values = tuple(float(v) for v in getattr(self, name))
            if not values or not all(math.isfinite(v) for v in values):
                raise CNAError(f"{name} must be a non-empty list of finite numbers, got {values}")
            object.__setattr__(self, name, values)
        if 0.0 not in self.multipliers or 1.0 not in self.multipliers:
            raise CNAError(f"multipliers must include 0 (ablation) and 1 (baseline), got "
                           f"{self.multipliers}")
        if 0.0 not in self.caa_alphas:
            raise CNAError(f"caa_alphas must include 0 (baseline), got {self.caa_alphas}")
        for name in ("n_discovery", "n_eval", "n_capability", "n_universal"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise CNAError(f"{name} must be >= 1 or None, got {v}")
        if self.threads is not None and self.threads < 1:
            raise CNAError(f"threads must be >= 1 or None, got {self.threads}")
        if self.n_bootstrap < 1:
            raise CNAError(f"n_bootstrap must be >= 1, got {self.n_bootstrap}")
        if self.caa_layers is not None:
            object.__setattr__(self, "caa_layers", tuple(int(x) for x in self.caa_layers))


QUICK = dict(multipliers=(0.0, 1.0, 3.0), caa_alphas=(-4.0, 0.0, 4.0), n_discovery=16,
             n_eval=16, n_capability=16, n_universal=20, n_bootstrap=20, max_new_tokens=12)
"""Overrides of ``--quick``: a smoke run of the whole pipeline in well under a minute."""


@dataclass(frozen=True)
class Reproduction:
    """The results of a run: ``summary`` is what ``summary.json`` holds."""

    summary: dict[str, Any]
    instruct_results: pd.DataFrame
    base_results: pd.DataFrame
    circuits: dict[str, Any]
    figures: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


# ----------------------------------------------------------------------------- inputs
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise CNAError(f"{path}: not valid JSON ({exc})") from exc


def load_prompt_sets(folder: str | None) -> dict[str, Any]:
    """The prompt sets by name, from ``folder`` or from the organism.

    Raises:
        CNAError: a required set is missing.
    """
    sets: dict[str, Any] = {}
    if folder is None:
        from cna_lens import organism

        for name in REQUIRED_SETS + OPTIONAL_SETS:
            try:
                sets[name] = organism.prompts(name)
            except (FileNotFoundError, ValueError) as exc:
                if name in REQUIRED_SETS:
                    raise CNAError(f"organism prompt set {name!r} is not available ({exc}); "
                                   "pass --prompts DIR") from exc
        return sets
    root = Path(folder)
    if not root.is_dir():
        raise CNAError(f"prompt folder {folder!r} does not exist")
    for name in REQUIRED_SETS + OPTIONAL_SETS:
        path = root / f"{name}.json"
        if path.is_file():
            sets[name] = _read_json(path)
        elif name in REQUIRED_SETS:
            raise CNAError(f"prompt folder {folder!r} has no {name}.json; it needs "
                           f"{', '.join(s + '.json' for s in REQUIRED_SETS)}")
    return sets


def _model_path(name: str | None, kind: str) -> str:
    if name is not None:
        if name.startswith("organism:"):
            kind, name = name.split(":", 1)[1], None
        else:
            return name
    from cna_lens import organism

    try:
        return str(organism.path(kind))
    except (FileNotFoundError, ValueError) as exc:
        raise CNAError(f"the organism's {kind} model is not available ({exc}); pass "
                       f"--{'model' if kind == 'instruct' else 'base-model'}") from exc


def _cap(items: Sequence[Any], n: int | None) -> list[Any]:
    return list(items) if n is None else list(items)[:n]


# ----------------------------------------------------------------------------- stages
def _discover(model: Any, positive: list[str], negative: list[str], universal: list[str] | None,
              cfg: ReproduceConfig) -> tuple[Any, Any, Any, Any]:
    """Circuit, universal neurons, and per-prompt activations of both sets.

    Selects exactly as :func:`cna_lens.discover_full` does, from the same statistics, but
    keeps the per-prompt activations for the bootstrap (one forward pass per prompt set).
    """
    from cna_lens.activations import NeuronStats
    from cna_lens.analysis import prompt_activations
    from cna_lens.attribution import Attribution
    from cna_lens.circuit import Provenance
    from cna_lens.discovery import circuit_from_attribution
    from cna_lens.loading import MLP_HOOK, model_fingerprint, model_id, prompt_set_hash
    from cna_lens.universal import find_universal_neurons

    pos = prompt_activations(model, positive, batch_size=cfg.batch_size, desc="positive")
    neg = prompt_activations(model, negative, batch_size=cfg.batch_size, desc="negative")
    attribution = Attribution(NeuronStats.of(pos), NeuronStats.of(neg))
    uni = find_universal_neurons(model, universal, batch_size=cfg.batch_size)
    provenance = Provenance(model_id=model_id(model), fingerprint=model_fingerprint(model),
                            hook=MLP_HOOK, positive_hash=prompt_set_hash(positive),
                            negative_hash=prompt_set_hash(negative))
    circuit = circuit_from_attribution(
        attribution, fraction=None if cfg.top_k is not None else cfg.fraction,
        top_k=cfg.top_k, universal=uni, provenance=provenance)
    return circuit, uni, pos, neg


def _rate(summary: pd.DataFrame, method: str, strength: float, prompt_set: str,
          column: str = "refusal_rate") -> float | None:
    row = summary[(summary["method"] == method) & (summary["strength"] == strength)
                  & (summary["prompt_set"] == prompt_set)]
    if row.empty:
        return None
    value = float(row[column].iloc[0])
    return None if math.isnan(value) else value


def _key(x: float) -> str:
    return f"{x:g}"


def _build_summary(cfg: ReproduceConfig, inst: pd.DataFrame, base: pd.DataFrame,
                   circuits: dict[str, Any], universal: dict[str, Any], caa_layers: tuple[int, ...],
                   overlap: Any, stability: Any, meta: dict[str, Any]) -> dict[str, Any]:
    from cna_lens.analysis import layer_distribution
    from cna_lens.evaluation import summarize

    s, b = summarize(inst), summarize(base)
    amp = max(cfg.multipliers)
    refusal_baseline = _rate(s, "cna", 1.0, "harmful")
    refusal_ablated = _rate(s, "cna", 0.0, "harmful")
    drop = (None if not refusal_baseline or refusal_ablated is None
            else (refusal_baseline - refusal_ablated) / refusal_baseline)
    pair = s[s["prompt_set"].isin(["harmful", "benign"])]

    def quality_by(method: str) -> dict[str, float]:
        q = pair[pair["method"] == method].groupby("strength")["quality"].mean()
        return {_key(k): float(v) for k, v in q.items()}

    def by_alpha(prompt_set: str, column: str = "refusal_rate") -> dict[str, float | None]:
        return {_key(a): _rate(s, "caa", a, prompt_set, column) for a in cfg.caa_alphas}

    cna_quality = quality_by("cna")
    max_alpha = max(cfg.caa_alphas, key=abs)

    def layers(c: Any) -> dict[str, Any]:
        d = layer_distribution(c)
        return {"frac_last_quarter": d.frac_last_quarter, "frac_last_3": d.frac_last_3,
                "frac_last_layer": d.frac_last_layer, "frac_last_10pct": d.frac_last_10pct,
                "per_layer": list(d.per_layer)}

    return {
        "instruct": {
            "refusal_baseline": refusal_baseline,
            "refusal_ablated": refusal_ablated,
            "relative_drop": drop,
            "over_refusal_baseline": _rate(s, "cna", 1.0, "benign"),
            "over_refusal_ablated": _rate(s, "cna", 0.0, "benign"),
            "quality_min_cna": min(cna_quality.values()),
            "quality_by_multiplier": cna_quality,
            "refusal_by_multiplier": {_key(m): _rate(s, "cna", m, "harmful")
                                      for m in cfg.multipliers},
            "over_refusal_by_multiplier": {_key(m): _rate(s, "cna", m, "benign")
                                           for m in cfg.multipliers},
            "capability_baseline": _rate(s, "cna", 1.0, "capability", "accuracy"),
            "capability_ablated": _rate(s, "cna", 0.0, "capability", "accuracy"),
            "capability_by_multiplier": {_key(m): _rate(s, "cna", m, "capability", "accuracy")
                                         for m in cfg.multipliers},
            "random_control_refusal": _rate(s, "random", 0.0, "harmful"),
            "amplified_multiplier": amp,
            "refusal_amplified_borderline": _rate(s, "cna", amp, "borderline"),
            "refusal_baseline_borderline": _rate(s, "cna", 1.0, "borderline"),
            "circuit_size": len(circuits["instruct"]),
            "universal_removed": len(universal["instruct"]),
        },
        "base": {
            "refusal_baseline": _rate(b, "cna", 1.0, "harmful"),
            "refusal_ablated": _rate(b, "cna", 0.0, "harmful"),
            "refusal_amplified": _rate(b, "cna", amp, "harmful"),
            "over_refusal_baseline": _rate(b, "cna", 1.0, "benign"),
            "circuit_size": len(circuits["base"]),
            "universal_removed": len(universal["base"]),
        },
        "caa": {
            "layers": list(caa_layers),
            "refusal_by_alpha": by_alpha("harmful"),
            "over_refusal_by_alpha": by_alpha("benign"),
            "quality_by_alpha": quality_by("caa"),
            "capability_by_alpha": by_alpha("capability", "accuracy"),
            "max_alpha": max_alpha,
        },
        "layers": {"instruct": layers(circuits["instruct"]), "base": layers(circuits["base"])},
        "overlap": {
            "overlap_fraction": overlap.overlap_fraction,
            "jaccard": overlap.jaccard,
            "chance_overlap_fraction": overlap.chance_overlap_fraction,
            "intersection": overlap.intersection,
            "layer_similarity": overlap.layer_similarity,
            "layer_cosine": overlap.layer_cosine,
            "per_layer": {"instruct": list(overlap.per_layer_a), "base": list(overlap.per_layer_b),
                          "shared": list(overlap.per_layer_intersection),
                          "chance": list(overlap.per_layer_chance)},
        },
        "stability": {k: v for k, v in stability.to_dict().items() if k != "jaccards"},
        "meta": meta,
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def format_summary(summary: Mapping[str, Any]) -> str:
    """The paper's claims next to this run's numbers, as a plain-text table."""
    i, b, c = summary["instruct"], summary["base"], summary["caa"]
    lay, ov, st = summary["layers"], summary["overlap"], summary["stability"]
    amp = i["amplified_multiplier"]
    amax = _key(c["max_alpha"])
    n_total = summary["meta"]["n_layers"] * summary["meta"]["d_mlp"]
    rows = [
        ("refusal, harmful: m=1 -> m=0", "87% -> 2% (Qwen2.5-7B); >50% rel. drop",
         f"{_pct(i['refusal_baseline'])} -> {_pct(i['refusal_ablated'])} "
         f"(drop {_pct(i['relative_drop'])})"),
        ("over-refusal, benign: m=1 -> m=0", "-",
         f"{_pct(i['over_refusal_baseline'])} -> {_pct(i['over_refusal_ablated'])}"),
        ("random neurons, same layers, m=0", "-", _pct(i["random_control_refusal"])),
        (f"borderline refusal: m=1 -> m={amp:g}", "m=2 refuses more strongly",
         f"{_pct(i['refusal_baseline_borderline'])} -> {_pct(i['refusal_amplified_borderline'])}"),
        ("output quality, CNA (min over m)", "> 0.97 at every m", _num(i["quality_min_cna"])),
        (f"output quality, CAA at alpha={amax}", "< 0.60 (6 of 8 models)",
         _num(c["quality_by_alpha"].get(amax))),
        ("refusal, CAA at alpha=" + amax, "-", _pct(c["refusal_by_alpha"].get(amax))),
        ("capability: m=1 -> m=0", "MMLU within 1 point",
         f"{_pct(i['capability_baseline'])} -> {_pct(i['capability_ablated'])}"),
        (f"capability, CAA at alpha={amax}", "near zero",
         _pct(c["capability_by_alpha"].get(amax))),
        (f"base refusal: m=1 -> m=0 -> m={amp:g}", "no behavioural change",
         f"{_pct(b['refusal_baseline'])} -> {_pct(b['refusal_ablated'])} -> "
         f"{_pct(b['refusal_amplified'])}"),
        ("instruct circuit in last quarter / last 3", "95% (Qwen2.5-3B) / 87% (Llama-3.2-1B)",
         f"{_pct(lay['instruct']['frac_last_quarter'])} / {_pct(lay['instruct']['frac_last_3'])}"),
        ("base circuit in last quarter / last 3", "-",
         f"{_pct(lay['base']['frac_last_quarter'])} / {_pct(lay['base']['frac_last_3'])}"),
        ("base vs instruct overlap (chance)", "8-29% of pairs",
         f"{_pct(ov['overlap_fraction'])} ({ov['chance_overlap_fraction']:.1%}), "
         f"Jaccard {ov['jaccard']:.2f}"),
        ("layer-level similarity (1 - TV)", "layer structure preserved",
         _num(ov["layer_similarity"])),
        ("bootstrap Jaccard mean / min", "-",
         f"{_num(st['jaccard_mean'])} / {_num(st['jaccard_min'])}"),
        ("circuit size (universal removed)", "0.1% of neurons",
         f"{i['circuit_size']} of {n_total} = {i['circuit_size'] / n_total:.2%} "
         f"({i['universal_removed']})"),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{'claim':<{w0}}  {'paper':<{w1}}  this run", "-" * (w0 + w1 + 24)]
    lines += [f"{a:<{w0}}  {p:<{w1}}  {r}" for a, p, r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- main job
def _default_fraction(model: str | None) -> float:
    """The organism's documented circuit fraction, or the paper's 0.1% for other models."""
    if model is None:
        from cna_lens.organism import CIRCUIT_FRACTION

        return CIRCUIT_FRACTION
    return 0.001


def reproduce(
    config: ReproduceConfig | None = None,
    *,
    progress: bool = False,
    write: bool = True,
    on_stage: Callable[[str], None] | None = None,
    judge: Callable[[str, str], float] | None = None,
) -> Reproduction:
    """Run the whole reproduction (see the module docstring) and write its outputs.

    Args:
        config: What to run (default: the organism, full sweeps, output to ``figures/``).
        progress: Show a progress bar over the stages.
        write: Write figures, tables, circuits and ``summary.json`` to ``config.out``.
        on_stage: Called with each stage's name as it starts.
        judge: Optional StrongREJECT-style judge ``(prompt, response) -> [0, 1]`` (see
            :func:`cna_lens.evaluation.rubric_judge`) scoring the instruct model's answers
            to harmful prompts; adds ``judge_baseline`` / ``judge_ablated`` to the summary.
            Nothing calls a network unless this does.

    Returns:
        The summary, the sweep tables (every generation kept), circuits and figures.

    Raises:
        CNAError: missing models or prompt sets, or bad settings.
    """
    import torch

    from cna_lens.analysis import bootstrap_stability, circuit_overlap
    from cna_lens.caa import compute_caa, default_caa_layers
    from cna_lens.evaluation import load_capability, sweep
    from cna_lens.figures import save_figures
    from cna_lens.loading import load_model, validate_prompts
    from cna_lens.plots import (
        capability_figure,
        layer_histogram,
        overlap_figure,
        stability_figure,
        steering_figure,
    )

    cfg = config or ReproduceConfig()
    if cfg.fraction is None and cfg.top_k is None:
        cfg = replace(cfg, fraction=_default_fraction(cfg.model))
    t0 = time.perf_counter()
    sets = load_prompt_sets(cfg.prompts)
    instruct_path = _model_path(cfg.model, "instruct")
    base_path = _model_path(cfg.base_model, "base")
    pos = validate_prompts(_cap(sets["discovery_harmful"], cfg.n_discovery), "discovery_harmful")
    neg = validate_prompts(_cap(sets["discovery_benign"], cfg.n_discovery), "discovery_benign")
    universal = (validate_prompts(_cap(sets["universal"], cfg.n_universal), "universal")
                 if "universal" in sets else None)
    if universal is None and cfg.n_universal is not None:
        from cna_lens.universal import default_universal_prompts

        universal = default_universal_prompts()[: cfg.n_universal]
    eval_sets = {"harmful": _cap(sets["eval_harmful"], cfg.n_eval),
                 "benign": _cap(sets["eval_benign"], cfg.n_eval)}
    if "borderline" in sets:
        eval_sets["borderline"] = _cap(sets["borderline"], cfg.n_eval)
    capability = (_cap(load_capability(sets["capability"]), cfg.n_capability)
                  if "capability" in sets else None)

    stages = ["load instruct", "discover instruct", "CAA vectors", "sweep instruct",
              "load base", "discover base", "sweep base", "analyse", "figures"]
    bar = tqdm(total=len(stages), desc="reproduce", unit="stage", disable=not progress)
    timings: dict[str, float] = {}
    old_threads = torch.get_num_threads()

    def stage(name: str) -> None:
        timings[name] = time.perf_counter()
        bar.set_postfix_str(name)
        if on_stage is not None:
            on_stage(name)

    def done() -> None:
        bar.update(1)

    try:
        stage("load instruct")
        model = load_model(instruct_path, device=cfg.device)
        n_params = sum(p.numel() for p in model.original_model.parameters())
        threads = cfg.threads or (1 if n_params < 100_000_000 else old_threads)
        torch.set_num_threads(threads)
        done()
        stage("discover instruct")
        c_inst, u_inst, pos_acts, neg_acts = _discover(model, pos, neg, universal, cfg)
        done()
        stage("CAA vectors")
        caa = compute_caa(model, pos, neg, batch_size=cfg.batch_size)
        caa_layers = cfg.caa_layers or default_caa_layers(int(model.cfg.n_layers))
        done()
        stage("sweep instruct")
        inst_results = sweep(
            model, eval_sets, circuit=c_inst, caa=caa, capability=capability,
            multipliers=cfg.multipliers, caa_alphas=cfg.caa_alphas, caa_layers=caa_layers,
            random_control=True, control_multipliers=(0.0,), seed=cfg.seed, judge=judge,
            max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
            on_condition=lambda m, s: bar.set_postfix_str(f"sweep instruct: {m} {s:g}"))
        done()
        del model
        stage("load base")
        base = load_model(base_path, device=cfg.device)
        done()
        stage("discover base")
        c_base, u_base, _, _ = _discover(base, pos, neg, universal, cfg)
        done()
        stage("sweep base")
        base_mults = tuple(sorted({0.0, 1.0, max(cfg.multipliers)}))
        base_results = sweep(
            base, {k: v for k, v in eval_sets.items() if k in ("harmful", "benign")},
            circuit=c_base, multipliers=base_mults, random_control=False,
            max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size,
            on_condition=lambda m, s: bar.set_postfix_str(f"sweep base: {m} {s:g}"))
        done()
        del base
        stage("analyse")
        if c_inst.n_layers == c_base.n_layers and c_inst.d_mlp == c_base.d_mlp:
            overlap = circuit_overlap(c_inst, c_base)
        else:
            raise CNAError(f"instruct [{c_inst.n_layers}, {c_inst.d_mlp}] and base "
                           f"[{c_base.n_layers}, {c_base.d_mlp}] neuron grids differ; "
                           "overlap needs a matched pair")
        stability = bootstrap_stability(
            pos_acts, neg_acts, fraction=None if cfg.top_k is not None else cfg.fraction,
            top_k=cfg.top_k, exclude=u_inst.mask, n_resamples=cfg.n_bootstrap, seed=cfg.seed)
        done()
        stage("figures")
        figs = {
            "layers": layer_histogram({"instruct": c_inst, "base": c_base}),
            "overlap": overlap_figure(overlap, names=("instruct", "base")),
            "steering": steering_figure(inst_results),
            "stability": stability_figure(stability),
        }
        if capability is not None:
            figs["capability"] = capability_figure(inst_results)
        meta = {
            "instruct_model": instruct_path, "base_model": base_path,
            "prompts": cfg.prompts or "organism",
            "n_discovery": [len(pos), len(neg)],
            "n_eval": {k: len(v) for k, v in eval_sets.items()},
            "n_capability": len(capability) if capability is not None else 0,
            "n_layers": c_inst.n_layers, "d_mlp": c_inst.d_mlp,
            "config": {k: (list(v) if isinstance(v, tuple) else v)
                       for k, v in asdict(cfg).items()},
            "refusal_classifier": "cna_lens.evaluation.is_refusal",
            "torch_threads": threads, "n_params": n_params,
        }
        from cna_lens import __version__

        meta["package_version"] = __version__
        summary = _build_summary(cfg, inst_results, base_results,
                                 {"instruct": c_inst, "base": c_base},
                                 {"instruct": u_inst, "base": u_base}, tuple(caa_layers),
                                 overlap, stability, meta)
        if judge is not None:
            from cna_lens.evaluation import summarize

            js = summarize(inst_results)
            summary["instruct"]["judge_baseline"] = _rate(js, "cna", 1.0, "harmful", "judge")
            summary["instruct"]["judge_ablated"] = _rate(js, "cna", 0.0, "harmful", "judge")
        files: dict[str, Path] = {}
        if write:
            out = Path(cfg.out)
            saved = save_figures(figs, out, png=cfg.png)
            files.update({f"{k}.html": v for k, v in saved.html.items()})
            files.update({f"{k}.png": v for k, v in saved.png.items()})
            summary["meta"]["png_error"] = saved.png_error
            for name, df in (("sweep_instruct", inst_results), ("sweep_base", base_results)):
                path = out / f"{name}.jsonl"  # JSON lines: any generated text round-trips
                df.to_json(path, orient="records", lines=True, force_ascii=False)
                files[path.name] = path
            for name, c in (("circuit_instruct", c_inst), ("circuit_base", c_base)):
                files[f"{name}.json"] = c.save(out / f"{name}.json")
        done()
        summary["meta"]["seconds"] = round(time.perf_counter() - t0, 1)
        ends = list(timings.values())[1:] + [time.perf_counter()]
        summary["meta"]["stage_seconds"] = {k: round(e - s, 1) for (k, s), e in
                                            zip(timings.items(), ends, strict=True)}
        if write:
            path = Path(cfg.out) / "summary.json"
            path.write_text(json.dumps(summary, indent=1) + "\n")
            files["summary.json"] = path
    finally:
        bar.close()
        torch.set_num_threads(old_threads)
    return Reproduction(summary, inst_results, base_results,
                        {"instruct": c_inst, "base": c_base}, figs, files)


# ----------------------------------------------------------------------------- CLI
def _floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _cmd_reproduce(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = dict(QUICK) if args.quick else {}
    explicit = {
        "model": args.model, "base_model": args.base_model, "prompts": args.prompts,
        "out": args.out, "device": args.device, "png": not args.no_png, "seed": args.seed,
        "threads": args.threads,
    }
    for key in ("multipliers", "caa_alphas", "caa_layers", "n_eval", "n_discovery",
                "n_capability", "n_bootstrap", "max_new_tokens", "batch_size", "top_k",
                "fraction"):
        value = getattr(args, key)
        if value is not None:
            explicit[key] = value
    if args.top_k is not None:
        explicit["fraction"] = None
    cfg = replace(ReproduceConfig(), **{**overrides, **explicit})
    result = reproduce(cfg, progress=True)
    print(format_summary(result.summary))  # noqa: T201 - the CLI owns the terminal
    meta = result.summary["meta"]
    png = "" if not meta.get("png_error") else f" (no PNG: {meta['png_error'][:80]})"
    print(f"\nwrote {len(result.files)} files to {cfg.out}/ in {meta['seconds']:.0f} s{png}")  # noqa: T201
    return 0


def register(subparsers: Any, handlers: dict[str, Callable[..., int]]) -> None:
    """Add the ``reproduce`` command to the ``cna-lens`` CLI."""
    p = subparsers.add_parser(
        "reproduce", help="check every claim of the paper on an instruct/base pair "
                          "(default: the organism); writes figures and summary.json")
    p.add_argument("--out", default="figures", help="output folder (default: figures/)")
    p.add_argument("--model", default=None,
                   help="instruct model: hub name or local dir (default: the organism)")
    p.add_argument("--base-model", default=None,
                   help="base model: hub name or local dir (default: the organism)")
    p.add_argument("--prompts", default=None,
                   help="folder of prompt-set JSON files (default: the organism's sets)")
    p.add_argument("--quick", action="store_true",
                   help="small subsets and sweeps: a smoke run of the whole pipeline")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--fraction", type=float, default=None,
                      help="circuit size as a fraction of all MLP neurons (default: 0.01 on the organism, 0.001 otherwise)")
    size.add_argument("--top-k", type=int, default=None, help="circuit size as a count")
    p.add_argument("--multipliers", type=_floats, default=None,
                   help=f"CNA multipliers (default {','.join(map(_key, CNA_MULTIPLIERS))})")
    p.add_argument("--caa-alphas", type=_floats, default=None,
                   help=f"CAA strengths; write --caa-alphas=-4,0,4 for negatives (default {','.join(map(_key, CAA_ALPHAS))})")
    p.add_argument("--caa-layers", type=_ints, default=None,
                   help="layers CAA steers (default: the middle layer)")
    p.add_argument("--n-discovery", type=int, default=None, help="prompts per discovery set")
    p.add_argument("--n-eval", type=int, default=None, help="prompts per evaluation set")
    p.add_argument("--n-capability", type=int, default=None, help="capability questions")
    p.add_argument("--n-bootstrap", type=int, default=None, help="bootstrap resamples")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for models under 100M parameters)")
    p.add_argument("--no-png", action="store_true", help="write HTML figures only")
    handlers["reproduce"] = _cmd_reproduce
