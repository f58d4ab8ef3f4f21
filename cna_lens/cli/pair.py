"""``cna-lens pair list | path | train | check``."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cna_lens.io import atomic_write_text
from cna_lens.models import zoo
from cna_lens.pipelines.pairs import (
    PAIRS,
    VARIANTS,
    behaviour,
    check_targets,
    get_pair,
    list_pairs,
    merge_adapter,
    pair_paths,
    train_pair,
)

__all__ = ["register"]


def _cmd_check(args: argparse.Namespace) -> int:
    pair = get_pair(args.name)
    if args.adapter is None:
        untuned, tuned = pair_paths(args.name, args.variant)
    else:
        untuned = zoo.model_path(pair.base, hf=True)
        tuned = Path(args.adapter).with_name(Path(args.adapter).name + "-merged")
        merge_adapter(untuned, args.adapter, tuned, pair.chat)
    table = behaviour(
        {"untuned": untuned, "tuned": tuned},
        n_eval=args.n_eval,
        max_new_tokens=args.max_new_tokens,
        reference=zoo.model_path(pair.teacher, hf=True) if pair.teacher else None,
        progress=True,
    )
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    targets = check_targets(table)
    for t in targets:
        print(
            f"{'met   ' if t['met'] else 'MISSED'} {t['model']:8s} {t['target']:28s} {t['value']:.3f}"
        )
    if args.json:
        record = {
            "pair": pair.name,
            "variant": args.variant
            if args.adapter is None
            else f"adapter {Path(args.adapter).name}",
            "n_eval": args.n_eval,
            "max_new_tokens": args.max_new_tokens,
            "table": table.to_dict(orient="records"),
            "targets": targets,
        }
        atomic_write_text(Path(args.json), json.dumps(record, indent=1) + "\n")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    out, record = train_pair(
        args.name, args.variant, out=args.out, max_steps=args.max_steps, progress=True
    )
    print(
        f"trained {record['steps']} steps on {record['examples']} in {record['seconds']:.0f} s; "
        f"final loss {record['losses'][-1]:.3f}; {args.variant} model in {out}"
    )
    return 0


def _cmd_pair(args: argparse.Namespace) -> int:
    if args.pair_command == "check":
        return _cmd_check(args)
    if args.pair_command == "list":
        for name in list_pairs():
            print(f"{name}\t{PAIRS[name].description}")
        return 0
    if args.pair_command == "path":
        untuned, tuned = pair_paths(args.name, args.variant)
        print(tuned if args.which == "tuned" else untuned)
        return 0
    return _cmd_train(args)


def register(sub: Any, handlers: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    """Add the ``pair`` command (list, path, train, check)."""
    p = sub.add_parser(
        "pair", help="untuned/tuned pairs on pretrained weights: list, path, train, check"
    )
    psub = p.add_subparsers(dest="pair_command", required=True)
    psub.add_parser("list", help="the available pairs, one per line")
    path = psub.add_parser("path", help="the HF directory of a pair's model (merged once)")
    path.add_argument("name")
    path.add_argument("which", choices=("tuned", "untuned"))
    path.add_argument("--variant", choices=VARIANTS, default="lora")
    train = psub.add_parser(
        "train", help="retrain a pair's adapter deterministically (default: over the shipped one)"
    )
    train.add_argument("name")
    train.add_argument(
        "--out",
        default=None,
        help="output folder (default: the shipped adapter's; --variant full: the cache)",
    )
    train.add_argument("--max-steps", type=int, default=None, help="stop after N steps")
    train.add_argument(
        "--variant",
        choices=VARIANTS,
        default="lora",
        help="lora: the shipped LoRA of every layer; full: every weight (pairs that define it)",
    )
    check = psub.add_parser(
        "check", help="unsteered refusal, quality and capability of both models of a pair"
    )
    check.add_argument("name")
    check.add_argument(
        "--adapter", default=None, help="check this adapter folder instead of the shipped one"
    )
    check.add_argument("--variant", choices=VARIANTS, default="lora")
    check.add_argument("--n-eval", type=int, default=None, help="prompts per set (default all)")
    check.add_argument("--max-new-tokens", type=int, default=32)
    check.add_argument("--json", default=None, help="also write the table and targets here")
    handlers["pair"] = _cmd_pair
