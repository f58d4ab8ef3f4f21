"""The ``cna-lens`` command line, built from the library (the library never imports it).

The CLI owns the terminal: progress bars are on, results are printed as tables, and a
:class:`~cna_lens.errors.CNAError` becomes a one-line message and exit status 2. Each verb
lives in its own module (:mod:`~cna_lens.cli.basic`, :mod:`~cna_lens.cli.sweep`,
:mod:`~cna_lens.cli.reproduce`, :mod:`~cna_lens.cli.pair`, the organism's
:mod:`cna_lens.organism.cli`); flags of config values are derived from the config
dataclasses (:mod:`~cna_lens.cli.args`).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence

from cna_lens.cli import basic, export, pair, reproduce, sweep, tune
from cna_lens.errors import CNAError
from cna_lens.evaluation.prompts import read_prompts
from cna_lens.organism import cli as organism_cli

__all__ = ["main", "read_prompts"]

Handlers = dict[str, Callable[[argparse.Namespace], int]]


def _build_parser() -> tuple[argparse.ArgumentParser, Handlers]:
    parser = argparse.ArgumentParser(
        prog="cna-lens", description="Contrastive Neuron Attribution on TransformerLens."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    handlers: Handlers = {}
    for module in (basic, organism_cli, reproduce, sweep, tune, export, pair):
        module.register(sub, handlers)
    return parser, handlers


def main(argv: Sequence[str] | None = None) -> int:
    parser, handlers = _build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return handlers[args.command](args)
    except CNAError as exc:
        print(f"cna-lens {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
