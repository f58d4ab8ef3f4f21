"""``cna-lens reproduce``: flags derived from :class:`ReproduceConfig`, on top of a preset."""

from __future__ import annotations

import argparse
import dataclasses
import textwrap
from collections.abc import Callable
from typing import Any

from cna_lens.cli.args import (
    DISCOVERY_HELP,
    config_args,
    config_from_args,
    discovery_args,
    discovery_from_args,
)
from cna_lens.pipelines.pairs import list_pairs
from cna_lens.pipelines.reproduce import (
    ReproduceConfig,
    default_discovery,
    format_summary,
    preset,
    reproduce,
)

__all__ = ["CONFIG_HELP", "config_from_namespace", "register"]

CONFIG_HELP: dict[str, str] = {
    "out": "output folder",
    "model": "instruct model: hub name, local dir, .gguf file, zoo:NAME or organism:instruct "
    "(none: the organism)",
    "base_model": "base model (none: the organism's base with the organism; no base stages "
    "with any other --model)",
    "pair": "an untuned/tuned pair on pretrained weights (see --list-pairs): the tuned model "
    "as the instruct model, the untuned one as the base",
    "pair_variant": "the pair's tuned model: lora (the shipped adapter) or full (the "
    "full-weight fine-tune, trained locally by `cna-lens pair train NAME --variant full`)",
    "prompts": "folder of prompt-set JSON files (none: the organism's sets on the organism, "
    "the shipped English sets otherwise)",
    "multipliers": "CNA multipliers",
    "caa_alphas": "CAA strengths; write --caa-alphas=-4,0,4 for negatives",
    "caa_layers": "layers CAA steers (none: the middle layer)",
    "n_discovery": "prompts per discovery set (none: all)",
    "n_eval": "prompts per evaluation set (none: all)",
    "n_capability": "capability questions (none: all)",
    "n_universal": "diverse prompts of the universal filter (none: all)",
    "n_bootstrap": "bootstrap resamples",
    "n_cards": "neuron cards in report.html",
    "max_new_tokens": "generated tokens per answer",
    "batch_size": "prompts per batch",
    "prefix_reuse": "compute the prompts' shared chat-template prefix once (discovery and "
    "generation; --no-prefix-reuse: every prompt whole)",
    "seed": "seed of the random control and the bootstrap",
    "device": "cpu, cuda, ... (none: cuda if available)",
    "threads": "torch CPU threads (none: 1 for models under 100M parameters)",
    "png": "also write PNG figures (needs kaleido and a Chromium)",
    "overwrite": "write into a non-empty --out that is not a previous reproduce output",
    "backend": "generation backend: fast, or bridge (the reference path; the same texts)",
}
"""Help of each :class:`ReproduceConfig` field that is a flag (the discovery flags come
from :class:`~cna_lens.DiscoveryConfig`)."""

PNG_HINT = (
    "no PNG figures (HTML written): install kaleido and a Chromium, e.g. "
    "`pip install 'cna-lens[png]'` and `apt-get install -y chromium`"
)


def config_from_namespace(args: argparse.Namespace) -> ReproduceConfig:
    """The run's config: the preset (``--quick`` / ``--pair``), then every given flag; the
    discovery flags go on top of the model's default discovery."""
    if args.obvious:
        args.backend = "bridge"
    cfg = config_from_args(preset(quick=args.quick, pair=args.pair), args, CONFIG_HELP)
    names = ["fraction", "top_k", "universal_prompts", *DISCOVERY_HELP]
    if any(getattr(args, n) is not None for n in names):
        base = default_discovery(cfg)
        cfg = dataclasses.replace(cfg, discovery=discovery_from_args(args, base=base))
    return cfg


def _cmd_reproduce(args: argparse.Namespace) -> int:
    if args.list_pairs:
        print("\n".join(list_pairs()))
        return 0
    cfg = config_from_namespace(args)
    result = reproduce(cfg, progress=True)
    print(format_summary(result.summary))
    meta = result.summary.meta
    for stage, why in result.summary.skipped.items():
        print(f"skipped {stage}: {why}")
    if meta.get("scope"):
        print("\n" + textwrap.fill(meta["scope"], width=100))
    if cfg.png and meta.get("png_error"):
        print("\n" + PNG_HINT)
    print(f"\nwrote {len(result.files)} files to {cfg.out}/ in {meta['seconds']:.0f} s")
    return 0


def register(sub: Any, handlers: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    """Add the ``reproduce`` command."""
    p = sub.add_parser(
        "reproduce",
        help="check every claim of the paper on an instruct/base pair "
        "(default: the organism); writes figures and summary.json",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small subsets and sweeps: a smoke run of the whole pipeline",
    )
    p.add_argument(
        "--list-pairs", action="store_true", help="print the available pairs, one per line"
    )
    p.add_argument("--obvious", action="store_true", help="the same as --backend bridge")
    config_args(p, ReproduceConfig, CONFIG_HELP)
    discovery_args(p, model_default="0.01 on the organism, 0.001 otherwise", prefix=False)
    handlers["reproduce"] = _cmd_reproduce
