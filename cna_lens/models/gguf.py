"""GGUF input: boot a TransformerBridge from a llama.cpp ``.gguf`` file, offline.

``transformers`` reads a GGUF file (with the optional ``gguf`` package) and dequantises
its weights into an ordinary ``PreTrainedModel``; the bridge then boots from that model.
Dequantising a 0.5B model takes about a minute on 2 CPU cores, so
:func:`convert_to_hf` writes a plain HF directory once and later runs load that instead.

A path is a GGUF input when it is a ``.gguf`` file or a directory that holds exactly one
``.gguf`` file and no ``config.json``. The file is checked before anything is loaded: a
truncated file, a file that is not GGUF, or an architecture that ``transformers`` cannot
read gives a :class:`~cna_lens.errors.CNAError` that says so.
"""

from __future__ import annotations

import logging
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cna_lens.errors import CNAError
from cna_lens.models.hf import plain_model

__all__ = ["GGUFInfo", "convert_to_hf", "gguf_info", "load_gguf", "resolve_gguf"]

logger = logging.getLogger(__name__)

MAGIC = b"GGUF"
INSTALL_HINT = "pip install 'cna-lens[gguf]' (or: pip install gguf)"


def resolve_gguf(path: str | os.PathLike[str]) -> Path | None:
    """The GGUF file that ``path`` names, or None when ``path`` is not a GGUF input.

    Raises:
        CNAError: a directory without ``config.json`` holds several ``.gguf`` files.
    """
    p = Path(path).expanduser()
    if p.is_file():
        return p if p.suffix.lower() == ".gguf" else None
    if p.is_dir() and not (p / "config.json").is_file():
        found = sorted(x for x in p.iterdir() if x.suffix.lower() == ".gguf" and x.is_file())
        if len(found) > 1:
            names = ", ".join(x.name for x in found)
            raise CNAError(
                f"{str(p)!r} holds {len(found)} .gguf files ({names}); "
                "pass the path of the one to load"
            )
        return found[0] if found else None
    return None


@dataclass(frozen=True)
class GGUFInfo:
    """What the file's header says."""

    path: Path
    architecture: str
    name: str | None
    has_chat_template: bool
    n_tensors: int


def _require_gguf() -> Any:
    try:
        import gguf
    except ModuleNotFoundError as exc:
        raise CNAError(f"reading .gguf files needs the gguf package: {INSTALL_HINT}") from exc
    return gguf


def _field_str(reader: Any, key: str) -> str | None:
    field = reader.fields.get(key)
    if field is None or not field.data:
        return None
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")


def gguf_info(path: str | os.PathLike[str]) -> GGUFInfo:
    """Read and check a GGUF file's header (memory-mapped; no weights are dequantised).

    Raises:
        CNAError: the file is missing, not GGUF, truncated, or of an architecture that
            ``transformers`` cannot load from GGUF; or the gguf package is missing.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise CNAError(f"GGUF file {str(p)!r} does not exist")
    with p.open("rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[:4] != MAGIC:
        raise CNAError(f"{str(p)!r} is not a GGUF file (it does not start with the bytes 'GGUF')")
    version = struct.unpack("<I", head[4:8])[0]
    if version not in (1, 2, 3):
        raise CNAError(f"{str(p)!r}: unsupported GGUF version {version} (readable: 1, 2, 3)")
    gguf = _require_gguf()
    try:
        reader = gguf.GGUFReader(str(p))
    except Exception as exc:  # the reader raises ValueError/IndexError/struct.error on bad bytes
        raise CNAError(
            f"{str(p)!r} is truncated or corrupt: the GGUF reader failed "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    arch = _field_str(reader, "general.architecture")
    if arch is None:
        raise CNAError(f"{str(p)!r}: GGUF header has no general.architecture")
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    supported = sorted(a for a in GGUF_SUPPORTED_ARCHITECTURES if a not in ("general", "tokenizer"))
    if arch not in GGUF_SUPPORTED_ARCHITECTURES:
        raise CNAError(
            f"{str(p)!r}: GGUF architecture {arch!r} cannot be loaded by transformers; "
            f"supported: {', '.join(supported)}"
        )
    return GGUFInfo(
        path=p,
        architecture=arch,
        name=_field_str(reader, "general.name"),
        has_chat_template="tokenizer.chat_template" in reader.fields,
        n_tensors=len(reader.tensors),
    )


def load_gguf(
    path: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32
) -> tuple[Any, Any]:
    """Dequantise a GGUF file into a ``transformers`` model and tokenizer (on the CPU).

    The model's ``quantization_config`` (a GGUF marker that stops ``save_pretrained``) is
    dropped: after dequantisation these are plain weights.

    Returns:
        ``(hf_model, tokenizer)``, the model in eval mode.

    Raises:
        CNAError: see :func:`gguf_info`, or transformers failed to build the model.
    """
    info = gguf_info(path)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(info.path.parent), info.path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model: Any = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise CNAError(
            f"transformers could not load {str(info.path)!r} "
            f"(architecture {info.architecture!r}): {exc}"
        ) from exc
    if getattr(model.config, "quantization_config", None) is not None:
        model = plain_model(model, share=True)  # without the marker save_pretrained refuses
    if not getattr(model.config, "architectures", None):
        # a config read from GGUF names no architecture class; TransformerLens picks its
        # adapter by that name and knows e.g. Gemma3ForCausalLM but not model type gemma3_text
        model.config.architectures = [type(model).__name__]
    model.eval()
    if not info.has_chat_template:
        logger.warning("%s has no chat template: prompts are fed as raw text", info.path.name)
    return model, tokenizer


def convert_to_hf(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Dequantise a GGUF file once and write a plain HF directory (safetensors + tokenizer).

    Later runs load ``out_dir`` without dequantising (seconds instead of a minute).

    Raises:
        CNAError: ``out_dir`` exists and is not empty, or see :func:`load_gguf`.
    """
    out = Path(out_dir).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CNAError(
            f"output directory {str(out)!r} exists and is not empty; pass a new directory"
        )
    model, tokenizer = load_gguf(path, dtype=dtype)
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
