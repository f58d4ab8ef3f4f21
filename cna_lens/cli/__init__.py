"""The ``cna-lens`` command line: discover, generate, info (and the organism, reproduce and
dose-response sweep jobs).

The CLI owns the terminal: progress bars are on, results are printed as tables, and a
:class:`~cna_lens.errors.CNAError` becomes a one-line message and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

from cna_lens.errors import CNAError
from cna_lens.evaluation.prompts import read_prompts

__all__ = ["main", "read_prompts"]


def _comma_list(convert: Callable[[str], Any], what: str) -> Callable[[str], tuple[Any, ...]]:
    """An argparse ``type`` reading a comma-separated list (blank items skipped)."""

    def parse(text: str) -> tuple[Any, ...]:
        try:
            return tuple(convert(x.strip()) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected comma-separated {what}, got {text!r}"
            ) from None

    return parse


comma_floats = _comma_list(float, "numbers like 0,1,2")
comma_ints = _comma_list(int, "integers like 0,1")
comma_names = _comma_list(str, "names like a,b")
_layers = _comma_list(int, "layer indices like 0,1")


def _discovery_args(p: argparse.ArgumentParser) -> None:
    """The discovery options shared by ``discover`` and ``sweep`` (besides the size)."""
    from cna_lens.core.scores import SCORES

    p.add_argument("--exclude-layers", type=_layers, default=(), help="e.g. 0,1")
    p.add_argument(
        "--no-universal-filter", action="store_true", help="keep universal neurons in the circuit"
    )
    p.add_argument(
        "--universal-prompts",
        default=None,
        help="diverse prompts for the universal filter (default: shipped set)",
    )
    p.add_argument(
        "--score",
        default="abs_delta",
        help=f"neuron score for selection: {sorted(SCORES)} or a registered name "
        "(default abs_delta, the paper's)",
    )


_PROMPT_FILE_HELP = "prompt file: .txt (one per line), .json, .jsonl or .csv"


def _prompt_column_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prompt-column",
        default=None,
        help="field (.json/.jsonl objects) or header (.csv) holding the prompt in "
        "every prompt file of this command (default: the one column named "
        "prompt, goal or behavior)",
    )


def _model_arg(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--model",
        required=required,
        help="hub name, local HF directory, .gguf file, 'organism:instruct' / "
        "'organism:base', or 'zoo:NAME' (see 'cna-lens models list')",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")


def _load(args: argparse.Namespace) -> Any:
    from cna_lens.models.loading import load_model

    name = args.model
    if name.startswith("organism:"):
        from cna_lens import organism

        try:
            name = str(organism.path(name.split(":", 1)[1]))
        except (ValueError, FileNotFoundError) as exc:
            raise CNAError(f"--model {args.model!r}: {exc}") from exc
    elif name.startswith("zoo:"):
        from cna_lens.models import zoo as zoo

        name = zoo.resolve(name)
    return load_model(name, device=args.device, dtype=args.dtype)


def _cmd_discover(args: argparse.Namespace) -> int:
    from cna_lens.core.discovery import discover
    from cna_lens.io import check_writable_file

    check_writable_file(args.out)  # before any forward pass
    column = args.prompt_column
    positive = read_prompts(args.positive, column=column)
    negative = read_prompts(args.negative, column=column)
    universal = (
        read_prompts(args.universal_prompts, column=column) if args.universal_prompts else None
    )
    model = _load(args)
    circuit = discover(
        model,
        positive,
        negative,
        fraction=None if args.top_k is not None else args.fraction,
        top_k=args.top_k,
        exclude_layers=args.exclude_layers,
        universal_filter=not args.no_universal_filter,
        universal_prompts=universal,
        score=args.score,
        batch_size=args.batch_size,
        progress=True,
    )
    circuit.save(args.out)
    counts = circuit.per_layer_counts()
    print(
        f"circuit: {len(circuit)} neurons of {circuit.n_layers * circuit.d_mlp} "
        f"({circuit.provenance.universal_removed} universal neurons filtered) -> {args.out}"
    )
    print("per layer: " + " ".join(f"L{i}:{c}" for i, c in enumerate(counts) if c))
    print(f"{'rank':>4}  {'neuron':<10} {'delta':>10}")
    for rank, n in enumerate(circuit.neurons[: args.show], 1):
        print(f"{rank:>4}  {n.label:<10} {n.delta:>10.4f}")
    return 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from cna_lens.core.circuit import Circuit
    from cna_lens.io import atomic_write_text, check_writable_file
    from cna_lens.steering.hooks import generate
    from cna_lens.steering.interventions import Steering

    if args.out:
        check_writable_file(args.out)  # before any generation
    prompts = read_prompts(args.prompts, column=args.prompt_column)
    circuit = Circuit.load(args.circuit) if args.circuit else None
    if circuit is None and args.multiplier != 1.0:
        raise CNAError("--multiplier needs --circuit (which neurons to scale)")
    steering = (
        None
        if circuit is None
        else Steering(
            circuit=circuit,
            intervention=args.intervention,
            multiplier=args.multiplier,
            negative_multiplier=args.negative_multiplier,
            sign=args.sign,
            positions=args.positions,
        )
    )
    model = _load(args)
    texts = generate(
        model,
        prompts,
        steering=steering,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        progress=True,
    )
    rows = [
        {
            "prompt": p,
            "output": t,
            "multiplier": args.multiplier if circuit else None,
            "circuit": args.circuit,
        }
        for p, t in zip(prompts, texts, strict=True)
    ]
    for r in rows:
        print(f"> {r['prompt']}\n  {r['output']}")
    if args.out:
        jsonl = "".join(json.dumps(r) + "\n" for r in rows)
        try:
            atomic_write_text(args.out, jsonl)
        except CNAError as exc:
            sys.stdout.write(jsonl)  # never lose finished work
            raise CNAError(
                f"{exc}; the {len(rows)} results were written to stdout as JSON lines instead"
            ) from exc
        print(f"wrote {len(rows)} generations -> {args.out}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from cna_lens.models.loading import is_chat_model, model_fingerprint, model_id

    model = _load(args)
    cfg = model.cfg
    n = int(cfg.n_layers) * int(cfg.d_mlp)
    rows = [
        ("model", model_id(model)),
        ("architecture", getattr(cfg, "architecture", None)),
        ("n_layers", cfg.n_layers),
        ("d_model", cfg.d_model),
        ("d_mlp", cfg.d_mlp),
        ("MLP neurons", n),
        ("0.1% circuit size", max(1, round(0.001 * n))),
        ("n_ctx", cfg.n_ctx),
        ("chat template", is_chat_model(model)),
        ("dtype", str(cfg.dtype)),
        ("device", str(cfg.device)),
        ("fingerprint", model_fingerprint(model)),
        ("neuron hook", "blocks.{L}.mlp.hook_post"),
    ]
    for key, value in rows:
        print(f"{key:<18} {value}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
    from cna_lens.models import zoo as zoo

    if args.models_command == "list":
        print(f"{'name':<30} {'kind':<9} {'arch':<7} {'installed':<9} install")
        for name, m in zoo.REAL_MODELS.items():
            print(
                f"{name:<30} {m.kind:<9} {m.architecture:<7} "
                f"{'yes' if zoo.is_installed(name) else 'no':<9} {m.install}"
            )
        print(f"cache: {zoo.cache_dir()}; use --model zoo:NAME (GGUF) or zoo:NAME:hf")
        return 0
    print(zoo.model_path(args.name, hf=args.hf))
    return 0


def _build_parser() -> tuple[argparse.ArgumentParser, dict[str, Callable[..., int]]]:
    parser = argparse.ArgumentParser(
        prog="cna-lens", description="Contrastive Neuron Attribution on TransformerLens."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    handlers: dict[str, Callable[..., int]] = {}

    p = sub.add_parser("discover", help="find the circuit separating two prompt sets")
    _model_arg(p)
    p.add_argument("--positive", required=True, help=_PROMPT_FILE_HELP)
    p.add_argument("--negative", required=True, help=_PROMPT_FILE_HELP)
    _prompt_column_arg(p)
    size = p.add_mutually_exclusive_group()
    size.add_argument(
        "--fraction",
        type=float,
        default=0.001,
        help="circuit size as a fraction of all MLP neurons (default 0.001)",
    )
    size.add_argument("--top-k", type=int, default=None, help="circuit size as a count")
    _discovery_args(p)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--show", type=int, default=20, help="rows of the circuit table to print")
    p.add_argument("--out", required=True, help="circuit JSON to write")
    handlers["discover"] = _cmd_discover

    p = sub.add_parser("generate", help="generate, optionally with a circuit scaled")
    _model_arg(p)
    p.add_argument("--prompts", required=True, help=_PROMPT_FILE_HELP)
    _prompt_column_arg(p)
    p.add_argument("--circuit", default=None, help="circuit JSON from 'discover'")
    p.add_argument(
        "--multiplier",
        type=float,
        default=1.0,
        help="0 ablates, 1 unchanged, >1 amplifies (default 1)",
    )
    p.add_argument(
        "--negative-multiplier",
        type=float,
        default=None,
        help="separate multiplier for negative-delta neurons",
    )
    p.add_argument("--positions", default="all", choices=["all", "prompt", "generated"])
    p.add_argument(
        "--intervention",
        default="scale",
        help="scale (act * m, default) or mean (negative-set mean + m * (act - "
        "mean)), or a registered name",
    )
    p.add_argument(
        "--sign",
        default="both",
        choices=["both", "positive", "negative"],
        help="steer neurons with delta > 0, < 0, or both (default)",
    )
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--out", default=None, help="write results as JSON lines")
    handlers["generate"] = _cmd_generate

    p = sub.add_parser("info", help="describe a model's neuron grid and formatting")
    _model_arg(p)
    handlers["info"] = _cmd_info

    p = sub.add_parser(
        "models", help="real models carried by PyPI packages (GGUF): list, locate, convert"
    )
    msub = p.add_subparsers(dest="models_command", required=True)
    msub.add_parser("list", help="known real models, whether installed, how to install")
    q = msub.add_parser("path", help="print a loadable path for an installed real model")
    q.add_argument("name", help="a name from 'cna-lens models list'")
    q.add_argument(
        "--hf",
        action="store_true",
        help="convert to a plain HF directory once (cached) and print that",
    )
    handlers["models"] = _cmd_models

    _add_optional_commands(sub, handlers)
    return parser, handlers


def _add_optional_commands(sub: Any, handlers: dict[str, Callable[..., int]]) -> None:
    """Commands of the organism and reproduction stages (registered by those modules)."""
    for module_name in (
        "cna_lens.organism.cli",
        "cna_lens.pipelines.reproduce.run",
        "cna_lens.evaluation.grids",
        "cna_lens.pipelines.pairs",
    ):
        try:
            module = __import__(module_name, fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name and module_name.startswith(exc.name):
                continue
            raise
        module.register(sub, handlers)


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
