"""``cna-lens sweep``: the dose-response sweep from the command line."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cna_lens.cli.args import (
    comma_floats,
    comma_names,
    discovery_args,
    discovery_from_args,
    load_model_arg,
    model_args,
)
from cna_lens.core.discovery import discover_full
from cna_lens.errors import CNAError
from cna_lens.evaluation.grids import check_fractions, check_multipliers, dose_sweep
from cna_lens.evaluation.prompts import read_prompts
from cna_lens.generation.decoding import Decoding
from cna_lens.io import atomic_write_text
from cna_lens.steering import INTERVENTIONS
from cna_lens.viz import dose_figure, save_figures

__all__ = ["register"]


def _cmd_sweep(args: argparse.Namespace) -> int:
    fractions = check_fractions(args.fractions)
    check_multipliers(args.multipliers)
    out = Path(args.out)
    if out.exists() and not out.is_dir():  # before any forward pass
        raise CNAError(f"--out {str(out)!r} is an existing file; give a directory")
    positive, negative = read_prompts(args.positive), read_prompts(args.negative)
    sets = {
        "harmful": read_prompts(args.prompts_harmful),
        "benign": read_prompts(args.prompts_benign),
    }
    args.fraction, args.top_k = fractions[-1], None  # the largest size; the others from it
    config = discovery_from_args(args)
    model = load_model_arg(args)
    found = discover_full(model, positive, negative, config, progress=True)
    table = dose_sweep(
        model,
        found,
        sets,
        fractions=fractions,
        multipliers=args.multipliers,
        interventions=args.intervention,
        signs=args.sign,
        decoding=Decoding(
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            prefix_reuse=config.prefix_reuse,
        ),
        backend="bridge" if args.obvious else args.backend,
        progress=True,
        texts=out / "texts.jsonl",
    )
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "sweep.csv", table.to_csv(index=False))
    record = {
        "discovery": config.to_dict(),
        "circuit": found.circuit.to_dict(),
        "max_new_tokens": args.max_new_tokens,
        "rows": json.loads(table.to_json(orient="records")),
    }
    atomic_write_text(out / "sweep.json", json.dumps(record, indent=1))
    saved = save_figures(
        {"dose_vs_k": dose_figure(table, x="k"), "dose_vs_m": dose_figure(table, x="multiplier")},
        out,
        png=False,
    )
    show = table[
        ["k", "intervention", "sign", "multiplier", "prompt_set", "refusal_rate", "quality"]
    ]
    print(show.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(
        f"wrote sweep.csv, sweep.json, texts.jsonl (every generation) and "
        f"{len(saved.html)} figures -> {out}"
    )
    return 0


def register(sub: Any, handlers: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    """Add the ``sweep`` command."""
    p = sub.add_parser(
        "sweep",
        help="dose-response sweep: refusal and quality over circuit "
        "size x multiplier x intervention x sign",
    )
    model_args(p)
    p.add_argument("--positive", required=True, help="discovery prompts of the behaviour")
    p.add_argument("--negative", required=True, help="discovery prompts of its opposite")
    p.add_argument("--prompts-harmful", required=True, help="evaluation prompts (refusal)")
    p.add_argument("--prompts-benign", required=True, help="evaluation prompts (over-refusal)")
    p.add_argument(
        "--fractions",
        type=comma_floats,
        default=(0.0005, 0.001, 0.003, 0.01),
        help="circuit sizes, ascending (default 0.0005,0.001,0.003,0.01)",
    )
    p.add_argument(
        "--multipliers",
        type=comma_floats,
        default=(0.0, 1.0, 2.0),
        help="multipliers, ascending (default 0,1,2)",
    )
    p.add_argument(
        "--intervention",
        type=comma_names,
        default=("scale",),
        help=f"comma list of {sorted(INTERVENTIONS)} (default scale)",
    )
    p.add_argument(
        "--sign",
        type=comma_names,
        default=("both",),
        help="comma list of both, positive, negative (default both)",
    )
    discovery_args(p, sizes=False)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument(
        "--batch-size", type=int, default=16, help="prompts per batch, discovery and generation"
    )
    p.add_argument(
        "--backend",
        choices=("fast", "bridge"),
        default="fast",
        help="generation backend: fast (default) or bridge (the reference path; same texts)",
    )
    p.add_argument("--obvious", action="store_true", help="the same as --backend bridge")
    p.add_argument("--out", required=True, help="folder for sweep.csv, sweep.json, figures")
    handlers["sweep"] = _cmd_sweep
