"""Command-line arguments derived from the library's config dataclasses, and shared options.

:func:`config_args` adds one flag per dataclass field (``--n-eval`` for ``n_eval``), typed
from the field's annotation, defaulting to "not given" (None), with the dataclass's own
default in its help; :func:`config_from_args` puts the given ones on top of a base config.
So a flag's default can never drift from the library's: there is only the dataclass's.
"""

from __future__ import annotations

import argparse
import collections.abc
import dataclasses
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from cna_lens.core.discovery import DiscoveryConfig
from cna_lens.core.scores import SCORES
from cna_lens.evaluation.prompts import read_prompts
from cna_lens.models.names import load_named

__all__ = [
    "PREFIX_HELP",
    "PROMPT_FILE_HELP",
    "comma_floats",
    "comma_ints",
    "comma_names",
    "config_args",
    "config_from_args",
    "discovery_args",
    "discovery_from_args",
    "load_model_arg",
    "model_args",
    "prompt_column_arg",
]


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

PROMPT_FILE_HELP = "prompt file: .txt (one per line), .json, .jsonl or .csv"


def _parser_type(annotation: Any) -> tuple[Any, bool]:
    """(argparse type, is a boolean flag) for a field annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType) and args:
        return _parser_type(args[0])
    if origin in (tuple, list, collections.abc.Sequence):
        item = typing.get_args(annotation)[0]
        return (
            comma_ints if item is int else comma_floats if item is float else comma_names
        ), False
    if origin is typing.Literal:
        return str, False
    if annotation is bool:
        return None, True
    if annotation in (int, float, str):
        return annotation, False
    return str, False


def _hints(cls: type) -> dict[str, Any]:
    """The fields' annotations, evaluated (``typing.get_type_hints`` gives nothing for the
    configs that opt out of runtime type checking with ``__no_type_check__``)."""
    namespace = vars(sys.modules[cls.__module__])
    return {
        f.name: eval(f.type, namespace) if isinstance(f.type, str) else f.type  # noqa: S307
        for f in dataclasses.fields(cls)
    }


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value) or "none"
    return "none" if value is None else str(value)


def config_args(
    parser: argparse.ArgumentParser | Any,
    cls: type,
    helps: Mapping[str, str],
    *,
    defaults: Any = None,
) -> None:
    """Add a flag for each field named in ``helps`` (the help text, without its default).

    Args:
        parser: The parser (or an argument group) to add to.
        cls: A dataclass.
        helps: Field name -> help.
        defaults: An instance whose values the help reports as defaults (default: ``cls()``).
    """
    hints = _hints(cls)
    base = defaults if defaults is not None else cls()
    for name, text in helps.items():
        kind, flag = _parser_type(hints[name])
        shown = f"{text} (default {_shown(getattr(base, name))})"
        dest = name
        if flag:
            parser.add_argument(
                f"--{name.replace('_', '-')}",
                dest=dest,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=shown,
            )
        else:
            parser.add_argument(
                f"--{name.replace('_', '-')}", dest=dest, type=kind, default=None, help=shown
            )


def config_from_args(base: Any, args: argparse.Namespace, names: Iterable[str]) -> Any:
    """``base`` with every given flag among ``names`` replacing its field."""
    given = {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}
    return dataclasses.replace(base, **given) if given else base


def model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """``--model``, ``--device``, ``--dtype``."""
    p.add_argument(
        "--model",
        required=required,
        help="hub name, local HF directory, .gguf file, 'organism:instruct' / "
        "'organism:base', or 'zoo:NAME' (see 'cna-lens models list')",
    )
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, help="float32 (default), bfloat16 or float16")


def load_model_arg(args: argparse.Namespace) -> Any:
    """The model of ``--model`` (``organism:``/``zoo:`` names resolved), on ``--device``."""
    return load_named(args.model, device=args.device, dtype=args.dtype)


def prompt_column_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prompt-column",
        default=None,
        help="field (.json/.jsonl objects) or header (.csv) holding the prompt in "
        "every prompt file of this command (default: the one column named "
        "prompt, goal or behavior)",
    )


DISCOVERY_HELP = {
    "exclude_layers": "layers left out of the circuit, e.g. 0,1",
    "universal_filter": "remove universal neurons from the circuit",
    "universal_top_fraction": "per-prompt top fraction of the universal filter",
    "universal_threshold": "share of diverse prompts that makes a neuron universal",
    "score": f"neuron score for selection: {sorted(SCORES)} or a registered name",
}


PREFIX_HELP = "compute the prompts' shared chat-template prefix once (--no-prefix-reuse: whole)"


def discovery_args(
    p: argparse.ArgumentParser,
    *,
    sizes: bool = True,
    model_default: str | None = None,
    prefix: bool = True,
) -> None:
    """The :class:`DiscoveryConfig` flags (``--fraction`` | ``--top-k``, ``--score``, ...)
    and ``--universal-prompts FILE``.

    Args:
        sizes: Add ``--fraction`` / ``--top-k`` (commands that sweep sizes do not).
        model_default: Text that replaces the size default in the help, when the command's
            default size depends on the model.
        prefix: Add ``--prefix-reuse`` / ``--no-prefix-reuse`` (commands whose own config
            has that field add it themselves).
    """
    if sizes:
        size = p.add_mutually_exclusive_group()
        defaults = DiscoveryConfig()
        frac = f"circuit size as a fraction of all MLP neurons (default {model_default or defaults.fraction})"
        size.add_argument("--fraction", type=float, default=None, help=frac)
        size.add_argument("--top-k", type=int, default=None, help="circuit size as a count")
    config_args(p, DiscoveryConfig, DISCOVERY_HELP)
    if prefix:
        config_args(p, DiscoveryConfig, {"prefix_reuse": PREFIX_HELP})
    p.add_argument(
        "--universal-prompts",
        default=None,
        help="diverse prompts for the universal filter (default: the shipped set)",
    )


def discovery_from_args(
    args: argparse.Namespace, *, base: DiscoveryConfig | None = None, column: str | None = None
) -> DiscoveryConfig:
    """The :class:`DiscoveryConfig` of the discovery flags on top of ``base``."""
    names = [*DISCOVERY_HELP, "batch_size", "prefix_reuse"]
    cfg = config_from_args(base or DiscoveryConfig(), args, names)
    if getattr(args, "top_k", None) is not None:
        cfg = dataclasses.replace(cfg, top_k=args.top_k, fraction=None)
    elif getattr(args, "fraction", None) is not None:
        cfg = dataclasses.replace(cfg, fraction=args.fraction, top_k=None)
    if args.universal_prompts:
        universal = read_prompts(args.universal_prompts, column=column)
        cfg = dataclasses.replace(cfg, universal_prompts=tuple(universal))
    return cfg
