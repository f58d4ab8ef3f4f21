"""``cna-lens tune``: flags derived from :class:`TuneConfig`."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

from cna_lens.cli.args import config_args, config_from_args
from cna_lens.pipelines.tune import TuneConfig, tune
from cna_lens.pipelines.tune.run import validate_proxy

__all__ = ["CONFIG_HELP", "register"]

CONFIG_HELP: dict[str, str] = {
    "out": "output folder (the study's storage, tables, figure, circuit, steering, report)",
    "budget_minutes": "wall time of the whole command, in minutes",
    "trials": "stop after this many trials in the study (none: as many as the budget allows)",
    "n_search": "prompts per search set (harmful, harmless)",
    "n_heldout": "prompts per held-out set (harmful, harmless)",
    "kl_tokens": "N: the KL is averaged over the first N tokens of the unsteered answer",
    "confirm_tokens": "generated tokens per held-out answer",
    "confirm_points": "Pareto points confirmed on held-out prompts",
    "over_refusal_slack": "how much the harmless refusal may rise",
    "fractions": "circuit-size range searched, as fractions of all MLP neurons (low,high)",
    "scores": "neuron scores tried",
    "interventions": "interventions tried",
    "signs": "sign selections tried",
    "multipliers": "range of the steered neurons' multiplier",
    "negative_multipliers": "range of the negative-delta neurons' multiplier (sign both)",
    "first_layer": "lowest decoder layer a circuit may use (none: where 90%% of the 1%% "
    "circuit lives)",
    "compare": "also confirm the paper's 0.1%% rule and the paper code's top_k=1600",
    "prompts": "folder with search_harmful, search_harmless, heldout_harmful, "
    "heldout_harmless prompt files (none: the shipped sets, split by category)",
    "storage": "Optuna storage URL (none: sqlite in --out); share one to run workers together",
    "study": "study name in the storage",
    "seed": "sampler seed",
    "batch_size": "prompts per pass",
    "prefix_reuse": "compute the prompts' shared chat-template prefix once",
    "device": "cpu, cuda, ... (none: cuda if available)",
    "threads": "torch CPU threads",
}


def _cmd_tune(args: argparse.Namespace) -> int:
    if args.budget is not None:
        args.budget_minutes = args.budget
    cfg = config_from_args(TuneConfig(model=args.model), args, CONFIG_HELP)
    if args.validate_proxy:
        check = validate_proxy(cfg, n_conditions=args.conditions, progress=True)
        print(
            f"proxy vs generated refusal over {check['n']} conditions of the study: Spearman "
            f"{check['spearman']:.3f} (target >= 0.9); table -> {cfg.out}/proxy_validation.csv"
        )
        return 0
    result = tune(cfg, progress=True)
    cols = ["point", "k", "refusal", "over_refusal", "quality", "kl_first", "kl"]
    print(result.confirmed[cols].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    rec = result.summary["recommended"]
    if rec is None:
        print("no tuned point kept the over-refusal within the slack: nothing recommended")
    else:
        print(
            f"recommended: {rec['point']} (k={rec['k']}): refusal {rec['refusal']:.1%}, "
            f"over-refusal {rec['over_refusal']:.1%}, KL {rec['kl']:.3f} -> "
            f"{cfg.out}/steering.json"
        )
    trials = result.summary["trials"]
    print(
        f"{trials['this_run']} trials this run ({trials['in_study']} in the study) in "
        f"{result.summary['seconds']:.0f} s; {len(result.files)} files in {cfg.out}/"
    )
    return 0


def register(sub: Any, handlers: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    """Add the ``tune`` command."""
    p = sub.add_parser(
        "tune",
        help="search the sparsest circuit steering that removes refusal (refusal vs KL, "
        "Pareto front), confirmed on held-out prompts",
    )
    p.add_argument(
        "--model", required=True, help="model name (zoo:NAME[:hf], organism:..., a path)"
    )
    p.add_argument("--budget", type=float, default=None, help="alias of --budget-minutes")
    p.add_argument(
        "--validate-proxy",
        action="store_true",
        help="rank correlation of the refusal proxy with the generated refusal over the "
        "study's own trials (needs a study in --out)",
    )
    p.add_argument("--conditions", type=int, default=20, help="trials --validate-proxy uses")
    defaults = dataclasses.replace(TuneConfig(model="x"))
    config_args(p, TuneConfig, CONFIG_HELP, defaults=defaults)
    handlers["tune"] = _cmd_tune
