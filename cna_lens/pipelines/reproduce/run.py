"""Reproduce: the CNA paper's claims checked on an instruct model (and a base model), in stages.

``cna-lens reproduce [--model M] [--base-model B] [--prompts DIR] [--quick] [--out DIR]``
(or :func:`reproduce` from Python). With no ``--model`` it runs on the shipped model
organism (instruct + base, the organism's prompt sets). With ``--model`` alone (a hub name,
an HF directory, a ``.gguf`` file or ``zoo:NAME``) it runs the instruct stages only, on the
project's English prompt sets (:mod:`cna_lens.evaluation.prompts`), and the summary says the
base stages were skipped; ``--base-model`` adds them. A real model is never paired with the
organism's base.

The stages (:mod:`cna_lens.pipelines.reproduce.stages`), sequenced by :func:`reproduce`:
inputs (capped prompt sets), discovery, CAA vectors, the paper's sweep, the ablation
variants, neuron cards, the base model's discovery and sweep (optional), analysis (overlap,
stability), then figures, ``report.html``, the sweep tables with every generation
(``sweep_instruct.jsonl``; read with ``pandas.read_json(path, lines=True, dtype=False)``),
the circuits and ``summary.json`` (a :class:`~cna_lens.pipelines.reproduce.summary.Summary`,
whose meta is complete before it or the report is written).

Artifacts name models by portable ids (``organism:instruct``, a file or directory name, a
hub name), never by an absolute path of the machine that ran them.

``--prompts DIR`` holds ``discovery_harmful.json``, ``discovery_benign.json``,
``eval_harmful.json``, ``eval_benign.json`` (lists of strings, or of objects with a
``"prompt"`` key) and optionally ``borderline.json``, ``universal.json`` and
``capability.json`` (a list of ``{"question", "answer"[, "choices"]}``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm.auto import tqdm

from cna_lens._version import __version__
from cna_lens.core.circuit import Circuit
from cna_lens.core.discovery import DiscoveryConfig
from cna_lens.generation import open_backend
from cna_lens.io import atomic_write_text, check_out_dir
from cna_lens.models.loading import load_model, model_id
from cna_lens.models.names import resolve_model
from cna_lens.pipelines.pairs import pair_paths
from cna_lens.pipelines.reproduce.config import (
    ORGANISM_SCOPE,
    Inputs,
    ReproduceConfig,
    discovery_config,
    load_inputs,
)
from cna_lens.pipelines.reproduce.stages import (
    analyse_stage,
    base_stage,
    caa_stage,
    cards_stage,
    discover_stage,
    figures_stage,
    sweep_instruct_stage,
    variants_stage,
)
from cna_lens.pipelines.reproduce.summary import RunResults, Summary, build_summary
from cna_lens.viz import NeuronCard, SavedFigures, save_figures, write_report

__all__ = ["Reproduction", "reproduce", "resolve_models"]


@dataclass(frozen=True)
class Reproduction:
    """The results of a run: ``summary`` is what ``summary.json`` holds."""

    summary: Summary
    instruct_results: pd.DataFrame
    base_results: pd.DataFrame | None
    circuits: dict[str, Circuit]
    figures: dict[str, Any]
    files: dict[str, Path] = field(default_factory=dict)


def resolve_models(cfg: ReproduceConfig) -> tuple[str, str | None]:
    """The instruct and (optional) base model paths of a run.

    The organism's base is used only with the organism's instruct model: a real model is
    never paired with it. A pair gives its tuned (instruct) and untuned (base) models.

    Raises:
        CNAError: an unknown organism kind or zoo model, or a pair whose base is missing.
    """
    if cfg.pair is not None:
        untuned, tuned = pair_paths(cfg.pair, cfg.pair_variant)
        return str(tuned), str(untuned)
    instruct = resolve_model(cfg.model or "organism:instruct")
    if cfg.base_model is not None:
        return instruct, resolve_model(cfg.base_model)
    return instruct, (resolve_model("organism:base") if cfg.on_organism else None)


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

    def close(self) -> None:
        self.finish()
        self.bar.close()


def _save_table(out: Path, name: str, df: pd.DataFrame) -> Path:
    """``out/name.jsonl``, one generation per line (any generated text round-trips)."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.jsonl"
    atomic_write_text(path, df.to_json(orient="records", lines=True, force_ascii=False))
    return path


def write_outputs(
    out: Path,
    summary: Summary,
    saved: SavedFigures,
    figs: Mapping[str, Any],
    tables: Mapping[str, pd.DataFrame],
    circuits: Mapping[str, Circuit],
    cards: Sequence[NeuronCard],
) -> dict[str, Path]:
    """report.html, the sweep tables (JSON lines), the circuits and summary.json into
    ``out`` (the figures are already there); returns the files written by name."""
    files: dict[str, Path] = {f"{k}.html": v for k, v in saved.html.items()}
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
    path = out / "summary.json"
    files["summary.json"] = atomic_write_text(path, json.dumps(summary.to_dict(), indent=1) + "\n")
    return files


def _meta(
    cfg: ReproduceConfig, inputs: Inputs, dcfg: DiscoveryConfig, facts: dict[str, Any]
) -> dict[str, Any]:
    """The run's record in ``summary.json`` (``facts``: what only the run knows)."""
    config = cfg.to_dict()
    for key in ("model", "base_model", "pair", "prompts", "discovery", "out"):
        config.pop(key)
    return {
        "scope": ORGANISM_SCOPE if cfg.on_organism else None,
        "pair": cfg.pair,
        "instruct_model": facts["instruct_model"],
        "base_model": facts["base_model"],
        "prompts": inputs.source,
        "n_discovery": [len(inputs.positive), len(inputs.negative)],
        "n_eval": {k: len(v) for k, v in inputs.eval_sets.items()},
        "n_capability": len(inputs.capability) if inputs.capability is not None else 0,
        "n_layers": facts["n_layers"],
        "d_mlp": facts["d_mlp"],
        "discovery": dcfg.to_dict() | {"universal_prompts": len(dcfg.universal_prompts or ())},
        "config": config,
        "refusal_classifier": "cna_lens.evaluation.is_refusal",
        "torch_threads": facts["torch_threads"],
        "n_params": facts["n_params"],
        "package_version": __version__,
    }


@dataclass
class _Run:
    """What the stages of one run hand each other."""

    cfg: ReproduceConfig
    inputs: Inputs
    dcfg: DiscoveryConfig
    stages: _Stages
    judge: Callable[[str, str], float] | None
    write: bool
    progress: bool = False
    facts: dict[str, Any] = field(default_factory=dict)
    cards: list[NeuronCard] = field(default_factory=list)


def _instruct_stages(run: _Run, path: str) -> dict[str, Any]:
    """Load, discover, CAA, sweep, variants and cards on the instruct model."""
    cfg, inputs, stages = run.cfg, run.inputs, run.stages
    stages.start("load instruct")
    model = load_model(path, device=cfg.device)
    n_params = sum(p.numel() for p in model.original_model.parameters())
    threads = cfg.threads or (1 if n_params < 100_000_000 else torch.get_num_threads())
    torch.set_num_threads(threads)
    run.facts.update(
        instruct_model=model_id(model),
        n_params=n_params,
        torch_threads=threads,
        n_layers=int(model.cfg.n_layers),
        d_mlp=int(model.cfg.d_mlp),
    )
    stages.start("discover instruct")
    found = discover_stage(model, inputs, run.dcfg)
    circuit = found[0].circuit
    stages.start("CAA vectors")
    caa, caa_layers = caa_stage(model, inputs, cfg)
    with open_backend(model, cfg.backend) as backend:
        stages.start("sweep instruct")
        table = sweep_instruct_stage(
            model,
            inputs,
            circuit,
            caa,
            caa_layers,
            cfg,
            backend=backend,
            judge=run.judge,
            progress=run.progress,
        )
        if run.write:  # keep the expensive generations even if a later stage fails
            _save_table(Path(cfg.out), "sweep_instruct", table)
        stages.start("variants")
        variants = variants_stage(
            model, inputs, circuit, cfg, backend=backend, progress=run.progress
        )
    stages.start("neuron cards")
    run.cards = cards_stage(model, inputs, circuit, cfg) if run.write else []
    return dict(found=found, table=table, variants=variants, caa_layers=caa_layers)


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
            :func:`cna_lens.evaluation.rubric_judge`) scoring the instruct model's answers
            to harmful prompts; fills ``judge_baseline`` / ``judge_ablated``. Nothing calls
            a network unless this does.

    Returns:
        The typed summary, the sweep tables (every generation kept), circuits and figures.

    Raises:
        CNAError: missing models or prompt sets, or bad settings.
    """
    cfg = config or ReproduceConfig()
    t0 = time.perf_counter()
    if write:
        check_out_dir(Path(cfg.out), overwrite=cfg.overwrite)
    instruct_path, base_path = resolve_models(cfg)
    inputs = load_inputs(cfg)
    names = ["load instruct", "discover instruct", "CAA vectors", "sweep instruct"]
    names += ["variants", "neuron cards"]
    names += ["load base", "discover + sweep base"] if base_path is not None else []
    names += ["analyse", "figures + write"]
    stages = _Stages(names, progress, on_stage)
    run = _Run(cfg, inputs, discovery_config(cfg, inputs), stages, judge, write, progress)
    old_threads = torch.get_num_threads()
    try:
        inst = _instruct_stages(run, instruct_path)
        base_found = base_results = None
        run.facts["base_model"] = None
        if base_path is not None:
            run.stages.start("load base")
            base = load_model(base_path, device=cfg.device)
            run.facts["base_model"] = model_id(base)
            run.stages.start("discover + sweep base")
            base_found, base_results = base_stage(
                base, inputs, run.dcfg, cfg, backend=cfg.backend, progress=run.progress
            )
            del base
        run.stages.start("analyse")
        overlap, stability = analyse_stage(inst["found"], base_found, run.dcfg, cfg)
        results = RunResults(
            instruct=inst["table"],
            instruct_found=inst["found"][0],
            variants=inst["variants"],
            caa_layers=inst["caa_layers"],
            stability=stability,
            base=base_results,
            base_found=None if base_found is None else base_found[0],
            overlap=overlap,
        )
        return _finish(run, results, t0)
    finally:
        run.stages.close()
        torch.set_num_threads(old_threads)


def _finish(run: _Run, results: RunResults, t0: float) -> Reproduction:
    """Figures, the complete summary, and the files."""
    cfg = run.cfg
    run.stages.start("figures + write")
    circuits = {"instruct": results.instruct_found.circuit}
    if results.base_found is not None:
        circuits["base"] = results.base_found.circuit
    figs = figures_stage(
        circuits,
        results.instruct,
        results.overlap,
        results.stability,
        run.inputs.capability is not None,
    )
    saved = save_figures(figs, cfg.out, png=cfg.png) if run.write else SavedFigures()
    run.stages.finish()
    meta = _meta(cfg, run.inputs, run.dcfg, run.facts)
    meta["png_error"] = saved.png_error if run.write else None
    meta["seconds"] = round(time.perf_counter() - t0, 1)
    meta["stage_seconds"] = dict(run.stages.seconds)
    summary = build_summary(
        cfg.multipliers, cfg.caa_alphas, results, meta, judged=run.judge is not None
    )
    files: dict[str, Path] = {}
    if run.write:
        tables = {"sweep_instruct": results.instruct}
        if results.variants is not None:
            tables["variants"] = results.variants
        if results.base is not None:
            tables["sweep_base"] = results.base
        files = write_outputs(Path(cfg.out), summary, saved, figs, tables, circuits, run.cards)
    return Reproduction(summary, results.instruct, results.base, circuits, figs, files)
