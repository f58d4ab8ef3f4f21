"""``cna-lens export``: a steering folded into the weights, as GGUF (llama.cpp) or HF files."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from cna_lens.errors import CNAError
from cna_lens.io import check_writable_file
from cna_lens.models.loading import load_model
from cna_lens.models.names import resolve_model
from cna_lens.steering import Steering, export_steered
from cna_lens.steering.gguf_export import export_gguf

__all__ = ["register"]


def _cmd_export(args: argparse.Namespace) -> int:
    if (args.gguf is None) == (args.hf is None):
        raise CNAError("give exactly one of --gguf FILE.gguf or --hf DIR")
    steering = Steering.load(args.steering)
    source = resolve_model(args.model)
    began = time.perf_counter()
    if args.gguf is not None:
        check_writable_file(args.gguf)  # before any work
        out = export_gguf(source, steering, args.gguf, method=args.method, converter=args.converter)
        grew = out.bytes - out.source_bytes
        print(
            f"wrote {out.path} ({out.bytes / 1e6:.1f} MB, {grew / 1e6:+.2f} MB against the source) "
            f"in {time.perf_counter() - began:.1f} s: {len(out.tensors)} tensors changed by "
            f"method {out.method!r}: {', '.join(f'{n} ({t})' for n, t in out.tensors.items())}"
        )
        return 0
    model = load_model(source, device="cpu")
    path = export_steered(model, steering, None, args.hf)
    print(f"wrote the steered HF directory {path} in {time.perf_counter() - began:.1f} s")
    return 0


def register(sub: Any, handlers: dict[str, Callable[[argparse.Namespace], int]]) -> None:
    """Add the ``export`` command."""
    p = sub.add_parser(
        "export",
        help="fold a steering (scale, all positions) into the weights: a .gguf for llama.cpp, "
        "Ollama, LM Studio, or a HF directory",
    )
    p.add_argument(
        "--model",
        required=True,
        help="the source: a .gguf file or zoo:NAME (GGUF), or an HF directory / zoo:NAME:hf",
    )
    p.add_argument(
        "--steering", required=True, help="a steering file (Steering.save, cna-lens tune)"
    )
    p.add_argument("--gguf", default=None, help="write this .gguf file")
    p.add_argument("--hf", default=None, help="write this HF directory instead")
    p.add_argument(
        "--method",
        choices=("auto", "up", "down"),
        default="auto",
        help="GGUF: scale ffn_up rows in place (up; gated MLPs), re-encode ffn_down columns "
        "(down), or pick (auto, default)",
    )
    p.add_argument(
        "--converter",
        default=None,
        help="llama.cpp's convert_hf_to_gguf.py, for a GGUF from an HF source",
    )
    handlers["export"] = _cmd_export
