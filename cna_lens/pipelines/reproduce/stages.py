"""The stages of a reproduction run, one function each (sequenced by :func:`reproduce`).

Every stage that generates goes through the one evaluation engine, with a grid builder
(:mod:`cna_lens.evaluation.grids`) saying which conditions to run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd
from torch import Tensor

from cna_lens.core.activations import NeuronStats, activation_stats
from cna_lens.core.analysis import (
    Overlap,
    Stability,
    bootstrap_stability,
    circuit_overlap,
    prompt_activations,
)
from cna_lens.core.circuit import Circuit
from cna_lens.core.discovery import Discovery, DiscoveryConfig, discover_with
from cna_lens.errors import CNAError
from cna_lens.evaluation import evaluate, paper_metrics, paper_sweep, variants_grid
from cna_lens.generation.api import Backend
from cna_lens.pipelines.reproduce.config import Inputs, ReproduceConfig
from cna_lens.steering import CAAVectors, compute_caa, default_caa_layers
from cna_lens.viz import (
    NeuronCard,
    capability_figure,
    layer_histogram,
    neuron_card,
    overlap_figure,
    stability_figure,
    steering_figure,
)

__all__ = [
    "Found",
    "analyse_stage",
    "base_stage",
    "caa_stage",
    "cards_stage",
    "discover_stage",
    "figures_stage",
    "sweep_instruct_stage",
    "variants_stage",
]

Found = tuple[Discovery, Tensor, Tensor]
"""A discovery with the per-prompt activations of both sets behind it (for the bootstrap)."""


def discover_stage(model: Any, inputs: Inputs, dcfg: DiscoveryConfig) -> Found:
    """The circuit, through the same pipeline as :func:`cna_lens.discover_full`, keeping the
    per-prompt activations of both sets for the bootstrap."""
    kept: dict[str, Tensor] = {}

    def stats(
        prompts: Sequence[str], desc: str = "activations", top_fraction: float | None = None
    ) -> tuple[Any, Any]:
        if top_fraction is not None or desc not in ("positive", "negative"):
            return activation_stats(
                model,
                prompts,
                batch_size=dcfg.batch_size,
                desc=desc,
                top_fraction=top_fraction,
                prefix_reuse=dcfg.prefix_reuse,
            )
        acts = prompt_activations(
            model, prompts, batch_size=dcfg.batch_size, desc=desc, prefix_reuse=dcfg.prefix_reuse
        )
        kept[desc] = acts
        return NeuronStats.of(acts), None

    found = discover_with(stats, model, inputs.positive, inputs.negative, dcfg)
    return found, kept["positive"], kept["negative"]


def caa_stage(
    model: Any, inputs: Inputs, cfg: ReproduceConfig
) -> tuple[CAAVectors, tuple[int, ...]]:
    """The CAA vectors of the instruct model and the layers they steer."""
    caa = compute_caa(model, inputs.positive, inputs.negative, batch_size=cfg.batch_size)
    return caa, tuple(cfg.caa_layers or default_caa_layers(int(model.cfg.n_layers)))


def sweep_instruct_stage(
    model: Any,
    inputs: Inputs,
    circuit: Circuit,
    caa: CAAVectors,
    caa_layers: Sequence[int],
    cfg: ReproduceConfig,
    *,
    backend: str | Backend,
    judge: Callable[[str, str], float] | None = None,
    progress: bool = False,
) -> pd.DataFrame:
    """CNA, CAA and the random control on every held-out set (the paper's grid)."""
    return paper_sweep(
        model,
        inputs.eval_sets,
        circuit=circuit,
        caa=caa,
        capability=inputs.capability,
        multipliers=cfg.multipliers,
        caa_alphas=cfg.caa_alphas,
        caa_layers=caa_layers,
        seed=cfg.seed,
        judge=judge,
        decoding=cfg.decoding,
        backend=backend,
        progress=progress,
    )


def variants_stage(
    model: Any,
    inputs: Inputs,
    circuit: Circuit,
    cfg: ReproduceConfig,
    *,
    backend: str | Backend,
    progress: bool = False,
) -> pd.DataFrame:
    """The same circuit ablated (m = 0) by the other interventions and signs
    (:data:`cna_lens.evaluation.VARIANTS`) on the harmful and benign sets; one row per
    prompt x variant (``method`` is ``"cna-INTERVENTION-SIGN"``)."""
    sets = {k: inputs.eval_sets[k] for k in ("harmful", "benign")}
    return evaluate(
        model,
        sets,
        variants_grid(circuit),
        metrics=paper_metrics(),
        decoding=cfg.decoding,
        backend=backend,
        progress=progress,
    )


def cards_stage(
    model: Any, inputs: Inputs, circuit: Circuit, cfg: ReproduceConfig
) -> list[NeuronCard]:
    """Neuron cards of the top ``cfg.n_cards`` circuit neurons (for the report)."""
    sample = 32  # enough prompts for the distributions, cheap on a real model
    return [
        neuron_card(
            model,
            circuit,
            inputs.positive[:sample],
            inputs.negative[:sample],
            rank=r,
            ablation_prompts=inputs.eval_sets["harmful"][:4],
            names=("harmful", "benign"),
            batch_size=cfg.batch_size,
        )
        for r in range(min(cfg.n_cards, len(circuit)))
    ]


def base_stage(
    base: Any,
    inputs: Inputs,
    dcfg: DiscoveryConfig,
    cfg: ReproduceConfig,
    *,
    backend: str,
    progress: bool = False,
) -> tuple[Found, pd.DataFrame]:
    """The base model's own circuit (same rule) and its sweep at m = 0, 1 and the
    amplifying multipliers, on every held-out set and the capability questions."""
    found = discover_stage(base, inputs, dcfg)
    mults = tuple(sorted({0.0, 1.0, *(m for m in cfg.multipliers if m > 1)}))
    results = paper_sweep(
        base,
        inputs.eval_sets,
        circuit=found[0].circuit,
        capability=inputs.capability,
        multipliers=mults,
        random_control=False,
        decoding=cfg.decoding,
        backend=backend,
        progress=progress,
    )
    return found, results


def analyse_stage(
    inst: Found, base: Found | None, dcfg: DiscoveryConfig, cfg: ReproduceConfig
) -> tuple[Overlap | None, Stability]:
    """Base/instruct overlap (None without a base) and bootstrap stability."""
    overlap = None
    found, positive, negative = inst
    if base is not None:
        a, b = found.circuit, base[0].circuit
        if (a.n_layers, a.d_mlp) != (b.n_layers, b.d_mlp):
            raise CNAError(
                f"instruct [{a.n_layers}, {a.d_mlp}] and base [{b.n_layers}, "
                f"{b.d_mlp}] neuron grids differ; overlap needs a matched pair"
            )
        overlap = circuit_overlap(a, b)
    stability = bootstrap_stability(
        positive,
        negative,
        fraction=dcfg.fraction,
        top_k=dcfg.top_k,
        exclude=None if found.universal is None else found.universal.mask,
        exclude_layers=dcfg.exclude_layers,
        n_resamples=cfg.n_bootstrap,
        seed=cfg.seed,
        score=dcfg.score,
    )
    return overlap, stability


def figures_stage(
    circuits: Mapping[str, Circuit],
    inst_results: pd.DataFrame,
    overlap: Overlap | None,
    stability: Stability,
    has_capability: bool,
) -> dict[str, Any]:
    """The Plotly figures of the run."""
    figs = {
        "layers": layer_histogram(dict(circuits)),
        "steering": steering_figure(inst_results),
        "stability": stability_figure(stability),
    }
    if overlap is not None:
        figs["overlap"] = overlap_figure(overlap, names=("instruct", "base"))
    if has_capability:
        figs["capability"] = capability_figure(inst_results)
    return figs
