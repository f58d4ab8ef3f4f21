"""Model names: one resolver for ``organism:KIND``, ``zoo:NAME[:hf]`` and plain paths.

Every ``--model`` on the command line and every model name in a config goes through
:func:`resolve_model`, which turns it into something :func:`cna_lens.load_model` loads: the
shipped organism's directory, an installed zoo model's cached file or directory, or the
string itself (a local path or a hub name).
"""

from __future__ import annotations

from typing import Any

from cna_lens import organism
from cna_lens.errors import CNAError
from cna_lens.models import zoo
from cna_lens.models.loading import load_model

__all__ = ["load_named", "resolve_model"]


def resolve_model(name: str) -> Any:
    """A loadable path (or hub name) for a model name.

    ``organism:instruct`` / ``organism:base`` give the shipped organism; ``zoo:NAME``
    (GGUF), ``zoo:NAME:hf`` (converted once into the cache) an installed real model; any
    other string is returned unchanged.

    Raises:
        CNAError: an unknown organism kind, or a zoo model that is unknown or not
            installed (the message gives the install command).
    """
    if not isinstance(name, str):
        return name  # load_model says what a model name must be
    if name.startswith("zoo:"):
        return zoo.resolve(name)
    if name.startswith("organism:"):
        kind = name.split(":", 1)[1]
        try:
            return str(organism.path(kind))
        except (FileNotFoundError, ValueError) as exc:
            raise CNAError(f"{name!r}: {exc}; valid: organism:instruct, organism:base") from exc
    return name


def load_named(name: str, **kwargs: Any) -> Any:
    """:func:`cna_lens.load_model` of :func:`resolve_model` ``(name)``."""
    return load_model(resolve_model(name), **kwargs)
