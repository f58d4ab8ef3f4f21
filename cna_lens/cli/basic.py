"""``cna-lens discover | generate | info | models``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

from cna_lens.cli.args import (
    PROMPT_FILE_HELP,
    discovery_args,
    discovery_from_args,
    load_model_arg,
    model_args,
    prompt_column_arg,
)
from cna_lens.core.circuit import Circuit
from cna_lens.core.discovery import discover
from cna_lens.errors import CNAError
from cna_lens.evaluation.prompts import read_prompts
from cna_lens.generation import generate
from cna_lens.io import atomic_write_text, check_writable_file
from cna_lens.models import zoo
from cna_lens.models.loading import MLP_HOOK, is_chat_model, model_fingerprint, model_id
from cna_lens.steering import INTERVENTIONS, Steering

__all__ = ["register"]


def _cmd_discover(args: argparse.Namespace) -> int:
    check_writable_file(args.out)  # before any forward pass
    column = args.prompt_column
    positive = read_prompts(args.positive, column=column)
    negative = read_prompts(args.negative, column=column)
    config = discovery_from_args(args, column=column)
    model = load_model_arg(args)
    circuit = discover(model, positive, negative, config, progress=True)
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


def _steering(args: argparse.Namespace) -> Steering | None:
    """The ``generate`` command's steering: ``--steering FILE`` or ``--circuit`` + flags."""
    if args.steering is not None:
        if args.circuit is not None:
            raise CNAError("pass either --steering FILE or --circuit (with its flags), not both")
        return Steering.load(args.steering)
    if args.circuit is None:
        if args.multiplier != 1.0:
            raise CNAError("--multiplier needs --circuit (which neurons to scale)")
        return None
    return Steering(
        circuit=Circuit.load(args.circuit),
        intervention=args.intervention,
        multiplier=args.multiplier,
        negative_multiplier=args.negative_multiplier,
        sign=args.sign,
        positions=args.positions,
    )


def _cmd_generate(args: argparse.Namespace) -> int:
    if args.out:
        check_writable_file(args.out)  # before any generation
    prompts = read_prompts(args.prompts, column=args.prompt_column)
    steering = _steering(args)
    model = load_model_arg(args)
    texts = generate(
        model,
        prompts,
        steering=steering,
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
        progress=True,
    )
    source = args.steering or args.circuit
    rows = [
        {
            "prompt": p,
            "output": t,
            "multiplier": None if steering is None else steering.multiplier,
            "circuit": args.circuit,
            "steering": args.steering,
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
        print(f"wrote {len(rows)} generations ({source or 'unsteered'}) -> {args.out}")
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    model = load_model_arg(args)
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
        ("neuron hook", MLP_HOOK.replace("{layer}", "{L}")),
    ]
    for key, value in rows:
        print(f"{key:<18} {value}")
    return 0


def _cmd_models(args: argparse.Namespace) -> int:
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


def _add_discover(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("discover", help="find the circuit separating two prompt sets")
    model_args(p)
    p.add_argument("--positive", required=True, help=PROMPT_FILE_HELP)
    p.add_argument("--negative", required=True, help=PROMPT_FILE_HELP)
    prompt_column_arg(p)
    discovery_args(p)
    p.add_argument("--batch-size", type=int, default=None, help="prompts per forward pass")
    p.add_argument("--show", type=int, default=20, help="rows of the circuit table to print")
    p.add_argument("--out", required=True, help="circuit JSON to write")
    return p


def _add_generate(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="generate, optionally steered")
    model_args(p)
    p.add_argument("--prompts", required=True, help=PROMPT_FILE_HELP)
    prompt_column_arg(p)
    p.add_argument(
        "--steering",
        default=None,
        help="a steering file (Steering.save, e.g. written by cna-lens tune); instead of "
        "--circuit and its flags",
    )
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
        help=f"{sorted(INTERVENTIONS)} or a registered name: scale (act * m, default) or "
        "mean (negative-set mean + m * (act - mean))",
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
    return p


def register(sub: Any, handlers: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    """Add ``discover``, ``generate``, ``info`` and ``models``."""
    _add_discover(sub)
    handlers["discover"] = _cmd_discover
    _add_generate(sub)
    handlers["generate"] = _cmd_generate
    p = sub.add_parser("info", help="describe a model's neuron grid and formatting")
    model_args(p)
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
