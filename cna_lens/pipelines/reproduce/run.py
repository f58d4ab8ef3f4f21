"""Reproduce: the CNA paper's claims checked on an instruct model (and a base model), in stages.

``cna-lens reproduce [--model M] [--base-model B] [--prompts DIR] [--quick] [--out DIR]``
(or :func:`reproduce` from Python). With no ``--model`` it runs on the shipped model
organism (instruct + base, the organism's prompt sets). With ``--model`` alone (a hub name,
an HF directory, a ``.gguf`` file or ``zoo:NAME``) it runs the instruct stages only, on the
project's English prompt sets (:mod:`cna_lens.evaluation.prompts`), and the summary says the base
stages were skipped; ``--base-model`` adds them. A real model is never paired with the
organism's base.

The stages, each one function of this module, sequenced by :func:`reproduce`:

1. :func:`load_inputs`: prompt sets (capped for ``--quick``), warning on any overlap
   between discovery and evaluation prompts;
2. :func:`discover_stage`: the circuit (:class:`~cna_lens.core.discovery.DiscoveryConfig`, the
   same pipeline as :func:`cna_lens.discover_full`), keeping per-prompt activations for the
   bootstrap;
3. :func:`caa_stage`: the CAA vectors;
4. :func:`sweep_instruct_stage`: CNA multipliers, CAA strengths and a random control on
   held-out harmful, benign, borderline prompts and capability questions;
5. :func:`cards_stage`: neuron cards of the top circuit neurons (for the report);
6. :func:`base_stage` (optional): the base model's circuit and its sweep at m = 0, 1, max;
7. :func:`analyse_stage`: layer distribution, overlap with its chance level, stability;
8. :func:`figures_stage`, :func:`build_summary` and :func:`write_outputs`: figures (HTML,
   PNG where a renderer exists), ``report.html``, the sweep tables with every generation
   (``sweep_instruct.jsonl``; read with ``pandas.read_json(path, lines=True, dtype=False)``),
   the circuits and ``summary.json`` (a :class:`~cna_lens.pipelines.reproduce.summary.Summary`).

Artifacts name models by portable ids (``organism:instruct``, a file or directory name, a
hub name), never by an absolute path of the machine that ran them.

``--prompts DIR`` holds ``discovery_harmful.json``, ``discovery_benign.json``,
``eval_harmful.json``, ``eval_benign.json`` (lists of strings, or of objects with a
``"prompt"`` key) and optionally ``borderline.json``, ``universal.json`` and
``capability.json`` (a list of ``{"question", "answer"[, "choices"]}``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import textwrap
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm.auto import tqdm

from cna_lens.core.discovery import DiscoveryConfig
from cna_lens.errors import CNAError
from cna_lens.evaluation.metrics import CAA_ALPHAS, CNA_MULTIPLIERS
from cna_lens.io import atomic_write_text, check_out_dir
from cna_lens.pipelines.reproduce.summary import (
    BaseResult,
    CAAResult,
    InstructResult,
    LayerResult,
    OverlapResult,
    Summary,
)

__all__ = [
    "QUICK",
    "Inputs",
    "ReproduceConfig",
    "Reproduction",
    "format_summary",
    "register",
    "reproduce",
]

logger = logging.getLogger(__name__)

REQUIRED_SETS = ("discovery_harmful", "discovery_benign", "eval_harmful", "eval_benign")
OPTIONAL_SETS = ("borderline", "universal", "capability")


@dataclass(frozen=True, kw_only=True)
class ReproduceConfig:
    """Everything a reproduction run depends on (recorded in ``summary.json``).

    Attributes:
        model: Instruct model (hub name, local dir, .gguf, ``zoo:NAME``,
            ``organism:instruct``); None: the organism's instruct model.
        base_model: Base model; None: the organism's base model when ``model`` is the
            organism, else no base stages.
        pair: A pair of :mod:`cna_lens.pipelines.pairs` (``--pair NAME``): its tuned model is the
            instruct model and its untuned model the base (excludes model/base_model).
        prompts: Folder of prompt-set JSON files; None: the organism's sets for the
            organism, the shipped English sets otherwise.
        out: Output folder for figures, tables and ``summary.json``.
        discovery: How circuits are found (size rule, score, universal filter). None: the
            defaults, with the fraction below. Its ``universal_prompts`` default to the
            prompt folder's ``universal.json`` or the shipped set.
        fraction: Circuit size when ``discovery`` is None. None: the organism's documented
            ``organism.CIRCUIT_FRACTION`` (1%; the paper's 0.1% is 3 neurons there) on the
            organism, the paper's 0.1% otherwise.
        top_k: Circuit size as a count when ``discovery`` is None (overrides ``fraction``).
        score: Neuron score when ``discovery`` is None (see :mod:`cna_lens.core.scores`).
        multipliers: CNA multipliers of the sweep (must include 0 and 1).
        caa_alphas: CAA strengths of the sweep (must include 0).
        caa_layers: Layers CAA steers (None: the middle layer).
        n_discovery, n_eval, n_capability, n_universal: Caps on the prompt sets (None: all).
        n_bootstrap: Bootstrap resamples for stability.
        n_cards: Neuron cards in ``report.html`` (top circuit neurons).
        max_new_tokens: Generation length.
        batch_size: Prompts per batch (forward passes and generation).
        seed: Seed of the random control and the bootstrap.
        device: Torch device (None: CUDA if available).
        threads: CPU threads for torch (None: 1 thread for models under 100M parameters,
            torch's default otherwise). Restored afterwards.
        png: Try PNG export of the figures.
        overwrite: Write into a non-empty ``out`` that is not a previous reproduce output
            (refused by default, before any model is loaded).
        fast: Generate the sweeps with :class:`cna_lens.generation.fast.FastGenerator` (same texts
            as the obvious path, one steered generation per condition, which False selects).
    """

    model: str | None = None
    base_model: str | None = None
    pair: str | None = None
    prompts: str | None = None
    out: str = "figures"
    discovery: DiscoveryConfig | None = None
    fraction: float | None = None
    top_k: int | None = None
    score: str = "abs_delta"
    multipliers: tuple[float, ...] = CNA_MULTIPLIERS
    caa_alphas: tuple[float, ...] = CAA_ALPHAS
    caa_layers: tuple[int, ...] | None = None
    n_discovery: int | None = None
    n_eval: int | None = None
    n_capability: int | None = None
    n_universal: int | None = None
    n_bootstrap: int = 100
    n_cards: int = 3
    max_new_tokens: int = 32
    batch_size: int = 64
    seed: int = 0
    device: str | None = None
    threads: int | None = None
    png: bool = True
    overwrite: bool = False
    fast: bool = True

    def __post_init__(self) -> None:
        for name in ("multipliers", "caa_alphas"):
            values = tuple(float(v) for v in getattr(self, name))
            if not values or not all(math.isfinite(v) for v in values):
                raise CNAError(f"{name} must be a non-empty list of finite numbers, got {values}")
            object.__setattr__(self, name, values)
        if 0.0 not in self.multipliers or 1.0 not in self.multipliers:
            raise CNAError(
                f"multipliers must include 0 (ablation) and 1 (baseline), got {self.multipliers}"
            )
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
        if self.n_cards < 0:
            raise CNAError(f"n_cards must be >= 0, got {self.n_cards}")
        if self.discovery is not None and (
            self.fraction is not None or self.top_k is not None or self.score != "abs_delta"
        ):
            raise CNAError(
                "pass the circuit size and score either in discovery=DiscoveryConfig(...) or "
                "as fraction/top_k/score, not both"
            )
        if self.caa_layers is not None:
            object.__setattr__(self, "caa_layers", tuple(int(x) for x in self.caa_layers))
        if self.pair is not None:
            from cna_lens.pipelines.pairs import get_pair

            if self.model is not None or self.base_model is not None:
                raise CNAError("pass either pair or model/base_model, not both")
            get_pair(self.pair)  # unknown names fail here, before any model is loaded

    @property
    def on_organism(self) -> bool:
        """Whether the instruct model is the shipped organism."""
        return self.pair is None and (self.model is None or self.model.startswith("organism:"))


QUICK: dict[str, Any] = dict(
    multipliers=(0.0, 1.0, 2.0),
    caa_alphas=(-4.0, 0.0, 4.0),
    n_discovery=48,
    n_eval=24,
    n_capability=24,
    n_universal=20,
    n_bootstrap=20,
    n_cards=2,
    max_new_tokens=16,
)
"""Overrides of ``--quick``: a smoke run of the whole pipeline (under a minute on the
organism, about 10-15 minutes for a 0.5B model on 2 CPU cores)."""

ORGANISM_SCOPE = (
    "The organism speaks to: whether ablating a contrastive circuit removes a trained-in "
    "refusal while random neurons in the same layers do not; output quality and capability "
    "under CNA vs CAA; the pipeline end to end. It cannot speak to: where refusal circuits "
    "sit in depth, how base and instruct circuits overlap (its fine-tune trains only the down "
    "projections, so layer-0 activations are identical in both), or amplification on "
    "borderline prompts. For the base-vs-instruct question on pretrained weights run "
    "`cna-lens reproduce --pair smollm2-refusal`."
)
"""What a run on the organism can and cannot show (in ``summary.meta["scope"]`` and
printed by the CLI)."""

PAIR: dict[str, Any] = dict(
    multipliers=(0.0, 1.0, 2.0, 3.0),
    caa_alphas=(-4.0, 0.0),
    n_capability=64,
    max_new_tokens=24,
    n_bootstrap=50,
)
"""Defaults of ``--pair``: every held-out prompt, m = 0 and the paper's amplification
(2, 3), CAA at its strongest, 64 capability questions and 24 new tokens, so a full run on
the 135M pair fits in 20 minutes on 2 CPU cores."""

PAIR_QUICK: dict[str, Any] = dict(multipliers=PAIR["multipliers"])
"""``--pair --quick``: the quick run with m = 3 as well."""


@dataclass(frozen=True)
class Reproduction:
    """The results of a run: ``summary`` is what ``summary.json`` holds."""

    summary: Summary
    instruct_results: pd.DataFrame
    base_results: pd.DataFrame | None
    circuits: dict[str, Any]
    figures: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


@dataclass(frozen=True)
class Inputs:
    """The prompt sets of a run, capped and validated."""

    positive: list[str]
    negative: list[str]
    universal: list[str] | None
    eval_sets: dict[str, list[str]]
    capability: list[Any] | None
    source: str
    """Where they came from: "organism", "english" or the folder's name."""


@dataclass(frozen=True)
class Discovered:
    """A circuit with its universal neurons and the per-prompt activations behind it."""

    circuit: Any
    universal: Any
    positive_acts: Any
    negative_acts: Any


# ----------------------------------------------------------------------------- inputs
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise CNAError(f"{path}: not UTF-8 text ({exc.reason}); save it as UTF-8") from exc
    except json.JSONDecodeError as exc:
        raise CNAError(f"{path}: not valid JSON ({exc})") from exc


def _texts(items: Any, name: str) -> Any:
    """Prompt objects ({"prompt": ...}) to strings; other sets unchanged."""
    if name == "capability" or not isinstance(items, list):
        return items
    return [x["prompt"] if isinstance(x, Mapping) and "prompt" in x else x for x in items]


def load_prompt_sets(folder: str | None, *, source: str = "organism") -> dict[str, Any]:
    """The prompt sets by name: from ``folder``, else the organism's or the English sets.

    Raises:
        CNAError: a required set is missing.
    """
    sets: dict[str, Any] = {}
    if folder is None and source == "english":
        from cna_lens.evaluation import prompts as prompt_sets

        for name in REQUIRED_SETS + ("borderline",):
            sets[name] = prompt_sets.prompts(name)
        sets["capability"] = prompt_sets.records("capability")
        return sets
    if folder is None:
        from cna_lens import organism

        for name in REQUIRED_SETS + OPTIONAL_SETS:
            try:
                sets[name] = organism.prompts(name)
            except (FileNotFoundError, ValueError) as exc:
                if name in REQUIRED_SETS:
                    raise CNAError(
                        f"organism prompt set {name!r} is not available ({exc}); pass --prompts DIR"
                    ) from exc
        return sets
    root = Path(folder)
    if not root.is_dir():
        raise CNAError(f"prompt folder {folder!r} does not exist")
    for name in REQUIRED_SETS + OPTIONAL_SETS:
        path = root / f"{name}.json"
        if path.is_file():
            sets[name] = _texts(_read_json(path), name)
        elif name in REQUIRED_SETS:
            raise CNAError(
                f"prompt folder {folder!r} has no {name}.json; it needs "
                f"{', '.join(s + '.json' for s in REQUIRED_SETS)}"
            )
    return sets


def _cap(items: Sequence[Any], n: int | None) -> list[Any]:
    return list(items) if n is None else list(items)[:n]


def load_inputs(cfg: ReproduceConfig) -> Inputs:
    """Stage 1: the prompt sets of the run (see :func:`load_prompt_sets`), capped.

    Raises:
        CNAError: a missing or malformed set.
    """
    from cna_lens.evaluation.metrics import load_capability
    from cna_lens.evaluation.prompts import warn_overlap
    from cna_lens.models.loading import validate_prompts

    source = "organism" if cfg.on_organism else "english"
    sets = load_prompt_sets(cfg.prompts, source=source)
    pos = validate_prompts(_cap(sets["discovery_harmful"], cfg.n_discovery), "discovery_harmful")
    neg = validate_prompts(_cap(sets["discovery_benign"], cfg.n_discovery), "discovery_benign")
    universal = (
        validate_prompts(_cap(sets["universal"], cfg.n_universal), "universal")
        if "universal" in sets
        else None
    )
    if universal is None and cfg.n_universal is not None:
        from cna_lens.core.universal import default_universal_prompts

        universal = default_universal_prompts()[: cfg.n_universal]
    eval_sets = {
        "harmful": validate_prompts(_cap(sets["eval_harmful"], cfg.n_eval), "eval_harmful"),
        "benign": validate_prompts(_cap(sets["eval_benign"], cfg.n_eval), "eval_benign"),
    }
    if "borderline" in sets:
        eval_sets["borderline"] = validate_prompts(
            _cap(sets["borderline"], cfg.n_eval), "borderline"
        )
    for prompts in eval_sets.values():
        warn_overlap(pos + neg, prompts)
    capability = (
        _cap(load_capability(sets["capability"]), cfg.n_capability)
        if "capability" in sets
        else None
    )
    label = Path(cfg.prompts).name if cfg.prompts is not None else source
    return Inputs(pos, neg, universal, eval_sets, capability, label)


def _model_path(name: str | None, kind: str) -> str:
    """A loadable path: ``organism:KIND`` / None -> the organism, ``zoo:NAME`` -> the cache."""
    if name is not None and name.startswith("zoo:"):
        from cna_lens.models import zoo as zoo

        return zoo.resolve(name)
    if name is not None and not name.startswith("organism:"):
        return name
    from cna_lens import organism

    kind = name.split(":", 1)[1] if name is not None else kind
    try:
        return str(organism.path(kind))
    except (FileNotFoundError, ValueError) as exc:
        raise CNAError(
            f"the organism has no {kind!r} model ({exc}); valid: organism:instruct, "
            f"organism:base, or pass --{'model' if kind == 'instruct' else 'base-model'}"
        ) from exc


def resolve_models(cfg: ReproduceConfig) -> tuple[str, str | None]:
    """The instruct and (optional) base model paths of a run.

    The organism's base is used only with the organism's instruct model: a real model is
    never paired with it. A pair gives its tuned (instruct) and untuned (base) models.
    """
    if cfg.pair is not None:
        from cna_lens.pipelines.pairs import pair_paths

        untuned, tuned = pair_paths(cfg.pair)
        return str(tuned), str(untuned)
    instruct = _model_path(cfg.model, "instruct")
    if cfg.base_model is not None:
        return instruct, _model_path(cfg.base_model, "base")
    return instruct, (_model_path(None, "base") if cfg.on_organism else None)


def discovery_config(cfg: ReproduceConfig, inputs: Inputs) -> DiscoveryConfig:
    """The run's :class:`DiscoveryConfig`: ``cfg.discovery`` or one from fraction/top_k/score,
    with the run's universal prompts and batch size filled in where not given."""
    if cfg.discovery is not None:
        dcfg = cfg.discovery
    else:
        if cfg.top_k is not None:
            size: dict[str, Any] = {"top_k": cfg.top_k, "fraction": None}
        elif cfg.fraction is not None:
            size = {"fraction": cfg.fraction}
        elif cfg.on_organism:
            from cna_lens.organism import CIRCUIT_FRACTION

            size = {"fraction": CIRCUIT_FRACTION}
        else:
            size = {"fraction": 0.001}
        dcfg = DiscoveryConfig(**size, score=cfg.score, batch_size=cfg.batch_size)
    if dcfg.universal_prompts is None and inputs.universal is not None:
        dcfg = replace(dcfg, universal_prompts=tuple(inputs.universal))
    return dcfg


# ----------------------------------------------------------------------------- stages
def discover_stage(model: Any, inputs: Inputs, dcfg: DiscoveryConfig) -> Discovered:
    """Stage 2: the circuit, through the same pipeline as :func:`cna_lens.discover_full`,
    keeping the per-prompt activations of both sets for the bootstrap."""
    from cna_lens.core.activations import NeuronStats, activation_stats
    from cna_lens.core.discovery import discover_with
    from cna_lens.evaluation.analysis import prompt_activations

    kept: dict[str, Any] = {}

    def stats(
        prompts: Sequence[str], desc: str = "activations", top_fraction: float | None = None
    ) -> tuple[Any, Any]:
        if top_fraction is not None or desc not in ("positive", "negative"):
            return activation_stats(
                model, prompts, batch_size=dcfg.batch_size, desc=desc, top_fraction=top_fraction
            )
        acts = prompt_activations(model, prompts, batch_size=dcfg.batch_size, desc=desc)
        kept[desc] = acts
        return NeuronStats.of(acts), None

    found = discover_with(stats, model, inputs.positive, inputs.negative, dcfg)
    return Discovered(found.circuit, found.universal, kept["positive"], kept["negative"])


def caa_stage(model: Any, inputs: Inputs, cfg: ReproduceConfig) -> tuple[Any, tuple[int, ...]]:
    """Stage 3: the CAA vectors of the instruct model and the layers they steer."""
    from cna_lens.steering.caa import compute_caa, default_caa_layers

    caa = compute_caa(model, inputs.positive, inputs.negative, batch_size=cfg.batch_size)
    return caa, tuple(cfg.caa_layers or default_caa_layers(int(model.cfg.n_layers)))


def sweep_instruct_stage(
    model: Any,
    inputs: Inputs,
    found: Discovered,
    caa: Any,
    caa_layers: Sequence[int],
    cfg: ReproduceConfig,
    *,
    judge: Callable[[str, str], float] | None = None,
    on_condition: Callable[[str, float], None] | None = None,
) -> pd.DataFrame:
    """Stage 4: CNA, CAA and the random control on every held-out set."""
    from cna_lens.evaluation.metrics import sweep

    return sweep(
        model,
        inputs.eval_sets,
        circuit=found.circuit,
        caa=caa,
        capability=inputs.capability,
        multipliers=cfg.multipliers,
        caa_alphas=cfg.caa_alphas,
        caa_layers=caa_layers,
        random_control=True,
        control_multipliers=(0.0,),
        seed=cfg.seed,
        judge=judge,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        on_condition=on_condition,
        fast=cfg.fast,
    )


VARIANTS: tuple[tuple[str, str], ...] = (
    ("scale", "positive"),
    ("mean", "both"),
    ("mean", "positive"),
)
"""Ablations (m = 0) beside the paper's ("scale", "both") in the variants stage."""


def variants_stage(model: Any, inputs: Inputs, found: Discovered, cfg: ReproduceConfig) -> Any:
    """Stage 4b: the same circuit ablated (m = 0) by the other interventions and signs of
    :data:`VARIANTS`, on the harmful and benign sets; one row per prompt x variant
    (``method`` is ``"cna-INTERVENTION-SIGN"``)."""
    from cna_lens.evaluation.metrics import score_sets
    from cna_lens.generation.fast import Condition, FastGenerator
    from cna_lens.steering.interventions import Steering

    sets = {k: inputs.eval_sets[k] for k in ("harmful", "benign")}
    prompts = [p for ps in sets.values() for p in ps]
    conditions = [
        Condition(Steering(circuit=found.circuit, intervention=i, sign=s, multiplier=0.0))
        for i, s in VARIANTS
    ]
    with FastGenerator(model) as gen:
        texts = gen.generate_many(
            prompts, conditions, max_new_tokens=cfg.max_new_tokens, batch_size=cfg.batch_size
        )
    return pd.concat(
        [
            score_sets(sets, outs, method=f"cna-{intervention}-{sign}", strength=0.0)
            for (intervention, sign), outs in zip(VARIANTS, texts, strict=True)
        ],
        ignore_index=True,
    )


def cards_stage(model: Any, inputs: Inputs, found: Discovered, cfg: ReproduceConfig) -> list[Any]:
    """Stage 5: neuron cards of the top ``cfg.n_cards`` circuit neurons (for the report)."""
    from cna_lens.viz.explore import neuron_card

    n = min(cfg.n_cards, len(found.circuit))
    sample = 32  # enough prompts for the distributions, cheap on a real model
    return [
        neuron_card(
            model,
            found.circuit,
            inputs.positive[:sample],
            inputs.negative[:sample],
            rank=r,
            ablation_prompts=inputs.eval_sets["harmful"][:4],
            names=("harmful", "benign"),
            batch_size=cfg.batch_size,
        )
        for r in range(n)
    ]


def base_stage(
    base: Any,
    inputs: Inputs,
    dcfg: DiscoveryConfig,
    cfg: ReproduceConfig,
    *,
    on_condition: Callable[[str, float], None] | None = None,
) -> tuple[Discovered, pd.DataFrame]:
    """Stage 6: the base model's own circuit (same rule) and its sweep at m = 0, 1 and the
    amplifying multipliers, on every held-out set and the capability questions."""
    from cna_lens.evaluation.metrics import sweep

    found = discover_stage(base, inputs, dcfg)
    mults = tuple(sorted({0.0, 1.0, *(m for m in cfg.multipliers if m > 1)}))
    results = sweep(
        base,
        inputs.eval_sets,
        circuit=found.circuit,
        capability=inputs.capability,
        multipliers=mults,
        random_control=False,
        max_new_tokens=cfg.max_new_tokens,
        batch_size=cfg.batch_size,
        on_condition=on_condition,
        fast=cfg.fast,
    )
    return found, results


def analyse_stage(
    inst: Discovered, base: Discovered | None, dcfg: DiscoveryConfig, cfg: ReproduceConfig
) -> tuple[Any, Any]:
    """Stage 7: base/instruct overlap (None without a base) and bootstrap stability."""
    from cna_lens.evaluation.analysis import bootstrap_stability, circuit_overlap

    overlap = None
    if base is not None:
        a, b = inst.circuit, base.circuit
        if (a.n_layers, a.d_mlp) != (b.n_layers, b.d_mlp):
            raise CNAError(
                f"instruct [{a.n_layers}, {a.d_mlp}] and base [{b.n_layers}, "
                f"{b.d_mlp}] neuron grids differ; overlap needs a matched pair"
            )
        overlap = circuit_overlap(a, b)
    stability = bootstrap_stability(
        inst.positive_acts,
        inst.negative_acts,
        fraction=dcfg.fraction,
        top_k=dcfg.top_k,
        exclude=None if inst.universal is None else inst.universal.mask,
        exclude_layers=dcfg.exclude_layers,
        n_resamples=cfg.n_bootstrap,
        seed=cfg.seed,
        score=dcfg.score,
    )
    return overlap, stability


def figures_stage(
    circuits: Mapping[str, Any],
    inst_results: pd.DataFrame,
    overlap: Any,
    stability: Any,
    has_capability: bool,
) -> dict[str, Any]:
    """Stage 8a: the Plotly figures of the run."""
    from cna_lens.viz.plots import (
        capability_figure,
        layer_histogram,
        overlap_figure,
        stability_figure,
        steering_figure,
    )

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


# ----------------------------------------------------------------------------- summary
def _rate(
    summary: pd.DataFrame,
    method: str,
    strength: float,
    prompt_set: str,
    column: str = "refusal_rate",
) -> float | None:
    if column not in summary.columns:
        return None
    row = summary[
        (summary["method"] == method)
        & (summary["strength"] == strength)
        & (summary["prompt_set"] == prompt_set)
    ]
    if row.empty:
        return None
    value = float(row[column].iloc[0])
    return None if math.isnan(value) else value


def _key(x: float) -> str:
    return f"{x:g}"


def _layers(circuit: Any) -> LayerResult:
    from cna_lens.evaluation.analysis import layer_distribution

    d = layer_distribution(circuit)
    return LayerResult(
        frac_last_quarter=d.frac_last_quarter,
        frac_last_3=d.frac_last_3,
        frac_last_layer=d.frac_last_layer,
        frac_last_10pct=d.frac_last_10pct,
        per_layer=list(d.per_layer),
    )


def _quality_by(summary: pd.DataFrame, method: str) -> dict[str, float]:
    """Mean output quality on the harmful and benign sets per strength of ``method``."""
    rows = summary[summary["prompt_set"].isin(["harmful", "benign"])]
    q = rows[rows["method"] == method].groupby("strength")["quality"].mean()
    return {_key(k): float(v) for k, v in q.items()}


def build_summary(
    cfg: ReproduceConfig,
    inst_results: pd.DataFrame,
    base_results: pd.DataFrame | None,
    inst: Discovered,
    base: Discovered | None,
    caa_layers: Sequence[int],
    overlap: Any,
    stability: Any,
    meta: dict[str, Any],
    judged: bool = False,
    variants: pd.DataFrame | None = None,
) -> Summary:
    """The typed summary of a run from the sweep tables and analyses (pure)."""
    from cna_lens.evaluation.metrics import content_shift, summarize

    s = summarize(inst_results)
    amp = max(cfg.multipliers)
    baseline, ablated = _rate(s, "cna", 1.0, "harmful"), _rate(s, "cna", 0.0, "harmful")
    drop = None if not baseline or ablated is None else (baseline - ablated) / baseline

    def by_alpha(prompt_set: str, column: str = "refusal_rate") -> dict[str, float | None]:
        return {_key(a): _rate(s, "caa", a, prompt_set, column) for a in cfg.caa_alphas}

    def by_m(prompt_set: str, column: str = "refusal_rate") -> dict[str, float | None]:
        return {_key(m): _rate(s, "cna", m, prompt_set, column) for m in cfg.multipliers}

    cna_quality = _quality_by(s, "cna")
    changed, similarity = content_shift(inst_results)
    variant_rates: dict[str, dict[str, float | None]] = {}
    if variants is not None and len(variants):
        v = summarize(variants)
        for method in sorted(v["method"].unique()):
            _, intervention, sign = method.split("-", 2)
            harmful = v[(v["method"] == method) & (v["prompt_set"] == "harmful")]
            variant_rates[f"{intervention}/{sign}"] = {
                "refusal": _rate(v, method, 0.0, "harmful"),
                "over_refusal": _rate(v, method, 0.0, "benign"),
                "quality": float(harmful["quality"].mean()) if len(harmful) else None,
            }
    instruct = InstructResult(
        refusal_baseline=baseline,
        refusal_ablated=ablated,
        relative_drop=drop,
        over_refusal_baseline=_rate(s, "cna", 1.0, "benign"),
        over_refusal_ablated=_rate(s, "cna", 0.0, "benign"),
        quality_min_cna=min(cna_quality.values()) if cna_quality else None,
        quality_by_multiplier=cna_quality,
        refusal_by_multiplier=by_m("harmful"),
        over_refusal_by_multiplier=by_m("benign"),
        capability_baseline=_rate(s, "cna", 1.0, "capability", "accuracy"),
        capability_ablated=_rate(s, "cna", 0.0, "capability", "accuracy"),
        capability_by_multiplier=by_m("capability", "accuracy"),
        random_control_refusal=_rate(s, "random", 0.0, "harmful"),
        amplified_multiplier=amp,
        refusal_amplified_borderline=_rate(s, "cna", amp, "borderline"),
        refusal_baseline_borderline=_rate(s, "cna", 1.0, "borderline"),
        circuit_size=len(inst.circuit),
        universal_removed=0 if inst.universal is None else len(inst.universal),
        judge_baseline=_rate(s, "cna", 1.0, "harmful", "judge") if judged else None,
        judge_ablated=_rate(s, "cna", 0.0, "harmful", "judge") if judged else None,
        refusal_borderline_by_multiplier=by_m("borderline"),
        changed_ablated=changed,
        similarity_ablated=similarity,
        variants=variant_rates,
    )
    base_result, skipped = None, {}
    layers = {"instruct": _layers(inst.circuit)}
    if base is not None and base_results is not None:
        b = summarize(base_results)
        base_quality = _quality_by(b, "cna")
        base_changed, base_similarity = content_shift(base_results)
        base_result = BaseResult(
            refusal_baseline=_rate(b, "cna", 1.0, "harmful"),
            refusal_ablated=_rate(b, "cna", 0.0, "harmful"),
            refusal_amplified=_rate(b, "cna", amp, "harmful"),
            over_refusal_baseline=_rate(b, "cna", 1.0, "benign"),
            circuit_size=len(base.circuit),
            universal_removed=0 if base.universal is None else len(base.universal),
            over_refusal_ablated=_rate(b, "cna", 0.0, "benign"),
            quality_baseline=base_quality.get("1"),
            quality_ablated=base_quality.get("0"),
            capability_baseline=_rate(b, "cna", 1.0, "capability", "accuracy"),
            capability_ablated=_rate(b, "cna", 0.0, "capability", "accuracy"),
            refusal_borderline_by_multiplier={
                _key(m): _rate(b, "cna", m, "borderline")
                for m in sorted(set(b["strength"][b["method"] == "cna"]))
            },
            changed_ablated=base_changed,
            similarity_ablated=base_similarity,
        )
        layers["base"] = _layers(base.circuit)
    else:
        skipped = {
            name: "no base model given (--base-model)"
            for name in ("load base", "discover base", "sweep base", "overlap")
        }
    ov = None
    if overlap is not None:
        ov = OverlapResult(
            overlap_fraction=overlap.overlap_fraction,
            jaccard=overlap.jaccard,
            chance_overlap_fraction=overlap.chance_overlap_fraction,
            intersection=overlap.intersection,
            layer_similarity=overlap.layer_similarity,
            layer_cosine=overlap.layer_cosine,
            per_layer={
                "instruct": list(overlap.per_layer_a),
                "base": list(overlap.per_layer_b),
                "shared": list(overlap.per_layer_intersection),
                "chance": list(overlap.per_layer_chance),
            },
        )
    caa = CAAResult(
        layers=list(caa_layers),
        refusal_by_alpha=by_alpha("harmful"),
        over_refusal_by_alpha=by_alpha("benign"),
        quality_by_alpha=_quality_by(s, "caa"),
        capability_by_alpha=by_alpha("capability", "accuracy"),
        max_alpha=max(cfg.caa_alphas, key=abs),
    )
    return Summary(
        instruct=instruct,
        base=base_result,
        caa=caa,
        layers=layers,
        overlap=ov,
        stability={k: v for k, v in stability.to_dict().items() if k != "jaccards"},
        meta=meta,
        skipped=skipped,
    )


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def format_summary(summary: Summary | Mapping[str, Any]) -> str:
    """The paper's claims next to this run's numbers, as a plain-text table."""
    if not isinstance(summary, Summary):
        summary = Summary.from_dict(summary)
    i, b, c, ov = summary.instruct, summary.base, summary.caa, summary.overlap
    lay, st = summary.layers, summary.stability
    amp = i.amplified_multiplier
    amax = _key(c.max_alpha)
    n_total = summary.meta["n_layers"] * summary.meta["d_mlp"]
    skipped = "skipped: no base model"
    rows = [
        (
            "refusal, harmful: m=1 -> m=0",
            "87% -> 2% (Qwen2.5-7B); >50% rel. drop",
            f"{_pct(i.refusal_baseline)} -> {_pct(i.refusal_ablated)} "
            f"(drop {_pct(i.relative_drop)})",
        ),
        (
            "over-refusal, benign: m=1 -> m=0",
            "-",
            f"{_pct(i.over_refusal_baseline)} -> {_pct(i.over_refusal_ablated)}",
        ),
        ("random neurons, same layers, m=0", "-", _pct(i.random_control_refusal)),
        (
            f"borderline refusal: m=1 -> m={amp:g}",
            "m=2 refuses more strongly",
            f"{_pct(i.refusal_baseline_borderline)} -> {_pct(i.refusal_amplified_borderline)}",
        ),
        ("output quality, CNA (min over m)", "> 0.97 at every m", _num(i.quality_min_cna)),
        (
            f"output quality, CAA at alpha={amax}",
            "< 0.60 (6 of 8 models)",
            _num(c.quality_by_alpha.get(amax)),
        ),
        ("refusal, CAA at alpha=" + amax, "-", _pct(c.refusal_by_alpha.get(amax))),
        (
            "capability: m=1 -> m=0",
            "MMLU within 1 point",
            f"{_pct(i.capability_baseline)} -> {_pct(i.capability_ablated)}",
        ),
        (f"capability, CAA at alpha={amax}", "near zero", _pct(c.capability_by_alpha.get(amax))),
        (
            f"base refusal: m=1 -> m=0 -> m={amp:g}",
            "no behavioural change",
            skipped
            if b is None
            else f"{_pct(b.refusal_baseline)} -> {_pct(b.refusal_ablated)} "
            f"-> {_pct(b.refusal_amplified)}",
        ),
        (
            "base content at m=0: answers changed / similarity",
            "content changes",
            skipped
            if b is None
            else f"{_pct(b.changed_ablated)} / {_num(b.similarity_ablated)} "
            f"(instruct: {_pct(i.changed_ablated)} / {_num(i.similarity_ablated)})",
        ),
        (
            "base vs instruct at m=1: quality / capability",
            "-",
            skipped
            if b is None
            else f"{_num(b.quality_baseline)} vs {_num(i.quality_by_multiplier.get('1'))} / "
            f"{_pct(b.capability_baseline)} vs {_pct(i.capability_baseline)}",
        ),
        (
            "borderline refusal by m",
            "m=2 refuses more strongly",
            ", ".join(f"m={k} {_pct(v)}" for k, v in i.refusal_borderline_by_multiplier.items())
            or "n/a",
        ),
        (
            "harmful refusal at m=0 by intervention/sign",
            "-",
            ", ".join(f"{k} {_pct(v.get('refusal'))}" for k, v in i.variants.items()) or "n/a",
        ),
        (
            "instruct circuit in last quarter / last 3",
            "95% (Qwen2.5-3B) / 87% (Llama-3.2-1B)",
            f"{_pct(lay['instruct'].frac_last_quarter)} / {_pct(lay['instruct'].frac_last_3)}",
        ),
        (
            "base circuit in last quarter / last 3",
            "-",
            skipped
            if "base" not in lay
            else f"{_pct(lay['base'].frac_last_quarter)} / {_pct(lay['base'].frac_last_3)}",
        ),
        (
            "base vs instruct overlap (chance)",
            "8-29% of pairs",
            skipped
            if ov is None
            else f"{_pct(ov.overlap_fraction)} "
            f"({ov.chance_overlap_fraction:.1%}), Jaccard {ov.jaccard:.2f}",
        ),
        (
            "layer-level similarity (1 - TV)",
            "layer structure preserved",
            skipped if ov is None else _num(ov.layer_similarity),
        ),
        (
            "bootstrap Jaccard mean / min",
            "-",
            f"{_num(st.get('jaccard_mean'))} / {_num(st.get('jaccard_min'))}",
        ),
        (
            "circuit size (universal removed)",
            "0.1% of neurons",
            f"{i.circuit_size} of {n_total} = {i.circuit_size / n_total:.2%} "
            f"({i.universal_removed})",
        ),
    ]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    lines = [f"{'claim':<{w0}}  {'paper':<{w1}}  this run", "-" * (w0 + w1 + 24)]
    lines += [f"{a:<{w0}}  {p:<{w1}}  {r}" for a, p, r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- writing
def _save_table(out: Path, name: str, df: pd.DataFrame) -> Path:
    """``out/name.jsonl``, one generation per line (any generated text round-trips)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.jsonl"
    atomic_write_text(path, df.to_json(orient="records", lines=True, force_ascii=False))
    return path


def write_outputs(
    out: Path,
    summary: Summary,
    figs: Mapping[str, Any],
    tables: Mapping[str, pd.DataFrame],
    circuits: Mapping[str, Any],
    cards: Sequence[Any],
    png: bool,
) -> tuple[dict[str, Path], str | None]:
    """Stage 8b: figures, report.html, sweep tables (JSON lines) and circuits into ``out``.

    Returns:
        The files written by name, and why PNG export did not happen (None if it did).
    """
    from cna_lens.viz.figures import save_figures
    from cna_lens.viz.report import write_report

    files: dict[str, Path] = {}
    saved = save_figures(dict(figs), out, png=png)
    files.update({f"{k}.html": v for k, v in saved.html.items()})
    files.update({f"{k}.png": v for k, v in saved.png.items()})
    for name, df in tables.items():
        files[f"{name}.jsonl"] = _save_table(out, name, df)
    for name, c in circuits.items():
        files[f"circuit_{name}.json"] = c.save(out / f"circuit_{name}.json")
    files["report.html"] = write_report(
        out / "report.html",
        summary=summary.to_dict(),
        figures=dict(figs),
        circuit=circuits.get("instruct"),
        cards=cards,
        title=f"cna_lens reproduce: {summary.meta.get('instruct_model')}",
    )
    return files, saved.png_error


class _Stages:
    """Times the stages of a run and drives the progress bar."""

    def __init__(
        self, names: Sequence[str], progress: bool, on_stage: Callable[[str], None] | None
    ):
        self.bar = tqdm(total=len(names), desc="reproduce", unit="stage", disable=not progress)
        self.on_stage = on_stage
        self.seconds: dict[str, float] = {}
        self._name: str | None = None
        self._t = 0.0

    def start(self, name: str) -> None:
        self.finish()
        self._name, self._t = name, time.perf_counter()
        self.bar.set_postfix_str(name)
        if self.on_stage is not None:
            self.on_stage(name)

    def finish(self) -> None:
        if self._name is not None:
            self.seconds[self._name] = round(time.perf_counter() - self._t, 1)
            self.bar.update(1)
            self._name = None

    def condition(self, what: str) -> Callable[[str, float], None]:
        return lambda m, s: self.bar.set_postfix_str(f"{what}: {m} {s:g}")

    def close(self) -> None:
        self.finish()
        self.bar.close()


def reproduce(
    config: ReproduceConfig | None = None,
    *,
    progress: bool = False,
    write: bool = True,
    on_stage: Callable[[str], None] | None = None,
    judge: Callable[[str, str], float] | None = None,
) -> Reproduction:
    """Run the stages of a reproduction (see the module docstring) and write the outputs.

    Args:
        config: What to run (default: the organism, full sweeps, output to ``figures/``).
        progress: Show a progress bar over the stages.
        write: Write figures, report, tables, circuits and ``summary.json`` to ``config.out``.
        on_stage: Called with each stage's name as it starts.
        judge: Optional StrongREJECT-style judge ``(prompt, response) -> [0, 1]`` (see
            :func:`cna_lens.evaluation.metrics.rubric_judge`) scoring the instruct model's answers
            to harmful prompts; fills ``judge_baseline`` / ``judge_ablated``. Nothing calls
            a network unless this does.

    Returns:
        The typed summary, the sweep tables (every generation kept), circuits and figures.

    Raises:
        CNAError: missing models or prompt sets, or bad settings.
    """
    import torch

    from cna_lens import __version__
    from cna_lens.models.loading import load_model, model_id

    cfg = config or ReproduceConfig()
    t0 = time.perf_counter()
    if write:
        check_out_dir(Path(cfg.out), overwrite=cfg.overwrite)
    instruct_path, base_path = resolve_models(cfg)
    inputs = load_inputs(cfg)
    dcfg = discovery_config(cfg, inputs)
    names = [
        "load instruct",
        "discover instruct",
        "CAA vectors",
        "sweep instruct",
        "variants",
        "neuron cards",
    ]
    if base_path is not None:
        names += ["load base", "discover + sweep base"]
    names += ["analyse", "figures + write"]
    stages = _Stages(names, progress, on_stage)
    old_threads = torch.get_num_threads()
    base_found = base_results = None
    base_id = None
    try:
        stages.start("load instruct")
        model = load_model(instruct_path, device=cfg.device)
        instruct_id = model_id(model)
        n_params = sum(p.numel() for p in model.original_model.parameters())
        threads = cfg.threads or (1 if n_params < 100_000_000 else old_threads)
        torch.set_num_threads(threads)
        stages.start("discover instruct")
        inst = discover_stage(model, inputs, dcfg)
        stages.start("CAA vectors")
        caa, caa_layers = caa_stage(model, inputs, cfg)
        stages.start("sweep instruct")
        inst_results = sweep_instruct_stage(
            model,
            inputs,
            inst,
            caa,
            caa_layers,
            cfg,
            judge=judge,
            on_condition=stages.condition("sweep instruct"),
        )
        if write:  # keep the expensive generations even if a later stage fails
            _save_table(Path(cfg.out), "sweep_instruct", inst_results)
        stages.start("variants")
        variants = variants_stage(model, inputs, inst, cfg)
        stages.start("neuron cards")
        cards = cards_stage(model, inputs, inst, cfg) if write else []
        n_layers, d_mlp = int(model.cfg.n_layers), int(model.cfg.d_mlp)
        del model
        if base_path is not None:
            stages.start("load base")
            base = load_model(base_path, device=cfg.device)
            base_id = model_id(base)
            stages.start("discover + sweep base")
            base_found, base_results = base_stage(
                base, inputs, dcfg, cfg, on_condition=stages.condition("sweep base")
            )
            del base
        stages.start("analyse")
        overlap, stability = analyse_stage(inst, base_found, dcfg, cfg)
        stages.start("figures + write")
        circuits = {"instruct": inst.circuit}
        if base_found is not None:
            circuits["base"] = base_found.circuit
        figs = figures_stage(
            circuits, inst_results, overlap, stability, inputs.capability is not None
        )
        meta: dict[str, Any] = {
            "scope": ORGANISM_SCOPE if cfg.on_organism else None,
            "pair": cfg.pair,
            "instruct_model": instruct_id,
            "base_model": base_id,
            "prompts": inputs.source,
            "n_discovery": [len(inputs.positive), len(inputs.negative)],
            "n_eval": {k: len(v) for k, v in inputs.eval_sets.items()},
            "n_capability": len(inputs.capability) if inputs.capability is not None else 0,
            "n_layers": n_layers,
            "d_mlp": d_mlp,
            "discovery": dcfg.to_dict() | {"universal_prompts": len(dcfg.universal_prompts or ())},
            "config": {
                k: (list(v) if isinstance(v, tuple) else v)
                for k, v in asdict(replace(cfg, discovery=None)).items()
                if k not in ("model", "base_model", "pair", "prompts", "discovery", "out")
            },
            "refusal_classifier": "cna_lens.evaluation.metrics.is_refusal",
            "torch_threads": threads,
            "n_params": n_params,
            "package_version": __version__,
        }
        summary = build_summary(
            cfg,
            inst_results,
            base_results,
            inst,
            base_found,
            caa_layers,
            overlap,
            stability,
            meta,
            judged=judge is not None,
            variants=variants,
        )
        files: dict[str, Path] = {}
        if write:
            tables = {"sweep_instruct": inst_results, "variants": variants}
            if base_results is not None:
                tables["sweep_base"] = base_results
            files, png_error = write_outputs(
                Path(cfg.out), summary, figs, tables, circuits, cards, cfg.png
            )
            meta["png_error"] = png_error
        stages.finish()
        meta["seconds"] = round(time.perf_counter() - t0, 1)
        meta["stage_seconds"] = dict(stages.seconds)
        if write:
            path = Path(cfg.out) / "summary.json"
            atomic_write_text(path, json.dumps(summary.to_dict(), indent=1) + "\n")
            files["summary.json"] = path
    finally:
        stages.close()
        torch.set_num_threads(old_threads)
    return Reproduction(summary, inst_results, base_results, circuits, figs, files)


# ----------------------------------------------------------------------------- CLI
def _cmd_reproduce(args: argparse.Namespace) -> int:
    if args.list_pairs:
        from cna_lens.pipelines.pairs import list_pairs

        print("\n".join(list_pairs()))  # noqa: T201 - one name per line
        return 0
    overrides: dict[str, Any] = dict(QUICK) if args.quick else {}
    if args.pair is not None:
        overrides.update(PAIR_QUICK if args.quick else PAIR)
    explicit = {
        "model": args.model,
        "base_model": args.base_model,
        "pair": args.pair,
        "prompts": args.prompts,
        "out": args.out,
        "device": args.device,
        "png": not args.no_png,
        "seed": args.seed,
        "threads": args.threads,
        "overwrite": args.overwrite,
        "fast": not args.obvious,
    }
    for key in (
        "multipliers",
        "caa_alphas",
        "caa_layers",
        "n_eval",
        "n_discovery",
        "n_capability",
        "n_bootstrap",
        "max_new_tokens",
        "batch_size",
        "top_k",
        "fraction",
        "score",
    ):
        value = getattr(args, key)
        if value is not None:
            explicit[key] = value
    cfg = replace(ReproduceConfig(), **{**overrides, **explicit})
    result = reproduce(cfg, progress=True)
    print(format_summary(result.summary))  # noqa: T201 - the CLI owns the terminal
    meta = result.summary.meta
    png = "" if not meta.get("png_error") else f" (no PNG: {meta['png_error'][:80]})"
    for stage, why in result.summary.skipped.items():
        print(f"skipped {stage}: {why}")  # noqa: T201
    if meta.get("scope"):
        print("\n" + textwrap.fill(meta["scope"], width=100))  # noqa: T201
    print(f"\nwrote {len(result.files)} files to {cfg.out}/ in {meta['seconds']:.0f} s{png}")  # noqa: T201
    return 0


def register(subparsers: Any, handlers: dict[str, Callable[..., int]]) -> None:
    """Add the ``reproduce`` command to the ``cna-lens`` CLI."""
    from cna_lens.cli import comma_floats, comma_ints

    p = subparsers.add_parser(
        "reproduce",
        help="check every claim of the paper on an instruct/base pair "
        "(default: the organism); writes figures and summary.json",
    )
    p.add_argument("--out", default="figures", help="output folder (default: figures/)")
    p.add_argument(
        "--model",
        default=None,
        help="instruct model: hub name, local dir, .gguf file, zoo:NAME or "
        "organism:instruct (default: the organism)",
    )
    p.add_argument(
        "--base-model",
        default=None,
        help="base model (default: the organism's base with the organism; none, "
        "and the base stages skipped, with any other --model)",
    )
    p.add_argument(
        "--pair",
        default=None,
        metavar="NAME",
        help="an untuned/tuned pair on pretrained weights (see --list-pairs): the tuned "
        "model as the instruct model, the untuned one as the base",
    )
    p.add_argument(
        "--list-pairs", action="store_true", help="print the available pairs, one per line"
    )
    p.add_argument(
        "--prompts",
        default=None,
        help="folder of prompt-set JSON files (default: the organism's sets on the "
        "organism, the shipped English sets otherwise)",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small subsets and sweeps: a smoke run of the whole pipeline",
    )
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--fraction",
        type=float,
        default=None,
        help="circuit size as a fraction of all MLP neurons (default: 0.01 on the organism, 0.001 otherwise)",
    )
    size.add_argument("--top-k", type=int, default=None, help="circuit size as a count")
    p.add_argument(
        "--score",
        default=None,
        help="neuron score of discovery: abs_delta (the paper, default) or effect_size",
    )
    p.add_argument(
        "--multipliers",
        type=comma_floats,
        default=None,
        help=f"CNA multipliers (default {','.join(map(_key, CNA_MULTIPLIERS))})",
    )
    p.add_argument(
        "--caa-alphas",
        type=comma_floats,
        default=None,
        help=f"CAA strengths; write --caa-alphas=-4,0,4 for negatives (default {','.join(map(_key, CAA_ALPHAS))})",
    )
    p.add_argument(
        "--caa-layers",
        type=comma_ints,
        default=None,
        help="layers CAA steers (default: the middle layer)",
    )
    p.add_argument("--n-discovery", type=int, default=None, help="prompts per discovery set")
    p.add_argument("--n-eval", type=int, default=None, help="prompts per evaluation set")
    p.add_argument("--n-capability", type=int, default=None, help="capability questions")
    p.add_argument("--n-bootstrap", type=int, default=None, help="bootstrap resamples")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: 1 for models under 100M parameters)",
    )
    p.add_argument("--no-png", action="store_true", help="write HTML figures only")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="write into a non-empty --out that is not a previous reproduce output",
    )
    p.add_argument(
        "--obvious",
        action="store_true",
        help="generate the sweeps one steered generation per condition through "
        "the bridge (same texts as the default fast path, slower)",
    )
    handlers["reproduce"] = _cmd_reproduce
