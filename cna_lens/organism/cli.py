"""``cna-lens organism train --out DIR [--seed S] [--quick]``: retrain the model organism.

Registered into the main CLI by :func:`register` (see ``cna_lens.cli``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["register"]


def _cmd_organism(args: argparse.Namespace) -> int:
    from cna_lens.organism.train import main as train_main

    if args.organism_command != "train":
        raise SystemExit("usage: cna-lens organism train --out DIR [--seed S] [--quick]")
    logging.getLogger("cna_lens.organism").setLevel(logging.INFO)
    summary = train_main(args.out, seed=args.seed, quick=args.quick)
    sys.stdout.write(json.dumps(summary, indent=2) + "\n")
    return 0


def register(sub: Any, handlers: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    """Add the ``organism`` command to the main parser's subparsers ``sub``."""
    p = sub.add_parser("organism", help="the refusal model organism (retrain it)")
    osub = p.add_subparsers(dest="organism_command", required=True)
    t = osub.add_parser("train", help="train base + instruct organisms and the prompt sets")
    t.add_argument("--out", required=True, help="output directory")
    t.add_argument("--seed", type=int, default=0, help="seed (default 0)")
    t.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes and few steps: checks the pipeline in seconds",
    )
    handlers["organism"] = _cmd_organism
