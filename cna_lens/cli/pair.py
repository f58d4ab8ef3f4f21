"""``cna-lens pair list | path | train | check``."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cna_lens.models import zoo
from cna_lens.pipelines.pairs import (
    PAIRS,
    behaviour,
    get_pair,
    list_pairs,
    merge_adapter,
    pair_paths,
    train_adapter,
)
from cna_lens.pipelines.pairs.config import DATA

__all__ = ["register"]


def _cmd_check(args: argparse.Namespace) -> int:
    if args.adapter is None:
        untuned, tuned = pair_paths(args.name)
    else:
        untuned = zoo.model_path(get_pair(args.name).base, hf=True)
        tuned = Path(args.adapter).with_name(Path(args.adapter).name + "-merged")
        merge_adapter(untuned, args.adapter, tuned)
    table = behaviour(
        {"untuned": untuned, "tuned": tuned},
        n_eval=args.n_eval,
        max_new_tokens=args.max_new_tokens,
        progress=True,
    )
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    pair = get_pair(args.name)
    cfg = pair.train
    if args.max_steps is not None:
        cfg = dataclasses.replace(cfg, max_steps=args.max_steps)
    out = Path(args.out) if args.out else DATA / pair.name
    record = train_adapter(
        zoo.model_path(pair.base, hf=True), out, cfg, base_name=f"zoo:{pair.base}", progress=True
    )
    print(
        f"trained {record['steps']} steps on {record['examples']} in {record['seconds']:.0f} s; "
        f"final loss {record['losses'][-1]:.3f}; adapter in {out}"
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
        untuned, tuned = pair_paths(args.name)
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
    train = psub.add_parser(
        "train", help="retrain a pair's adapter deterministically (default: over the shipped one)"
    )
    train.add_argument("name")
    train.add_argument("--out", default=None, help="adapter folder (default: the shipped one)")
    train.add_argument("--max-steps", type=int, default=None, help="stop after N steps")
    check = psub.add_parser(
        "check", help="unsteered refusal, quality and capability of both models of a pair"
    )
    check.add_argument("name")
    check.add_argument(
        "--adapter", default=None, help="check this adapter folder instead of the shipped one"
    )
    check.add_argument("--n-eval", type=int, default=None, help="prompts per set (default all)")
    check.add_argument("--max-new-tokens", type=int, default=32)
    handlers["pair"] = _cmd_pair
