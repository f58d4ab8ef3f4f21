"""The refusal model organism: a tiny Llama base + instruct pair shipped with cna_lens.

A 6-layer Llama (gated SiLU MLP, RMSNorm, rotary) trained by
:mod:`cna_lens.organism.train` on a synthetic world (:mod:`cna_lens.organism.world`) in
which a request is harmful iff a violent verb is applied to a person or an animal outside
a fiction frame. The **instruct** model refuses harmful requests with
``"sorry , i cannot help with that ."`` and answers benign ones; the **base** model never
refuses. Both are local Hugging Face directories loaded through the same path as a real
model.

Example:
    >>> from cna_lens import organism
    >>> model = organism.load("instruct")                       # doctest: +SKIP
    >>> harmful = organism.prompts("discovery_harmful")
    >>> len(harmful)
    100
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from cna_lens.models.loading import load_model

__all__ = ["KINDS", "PROMPT_SETS", "DATA_DIR", "CIRCUIT_FRACTION", "path", "load", "prompts"]

DATA_DIR = Path(__file__).resolve().parent / "data"
CIRCUIT_FRACTION = 0.01
"""The documented circuit size for the organism: 1% of its 3,072 MLP neurons = 31 neurons.
(The paper's 0.1% would be 3 neurons here; see README.md beside this file.)"""
KINDS = ("base", "instruct")
PROMPT_SETS = (
    "discovery_harmful",
    "discovery_benign",
    "discovery_harmful_8",
    "discovery_benign_8",
    "eval_harmful",
    "eval_benign",
    "borderline",
    "universal",
    "capability",
)
"""Names accepted by :func:`prompts`. ``capability`` is a list of
``{"question": str, "answer": str, "choices": list[str]}`` dicts (score with
:func:`cna_lens.organism.world.capability_correct`); every other set is a list of str."""


def path(kind: str) -> Path:
    """Directory of the shipped Hugging Face model ``kind`` ("base" | "instruct").

    Raises:
        ValueError: ``kind`` is not one of :data:`KINDS`.
        FileNotFoundError: the package data is missing (e.g. a source checkout without it).
    """
    if kind not in KINDS:
        raise ValueError(f"unknown organism kind {kind!r}; valid kinds: {', '.join(KINDS)}")
    p = DATA_DIR / kind
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"organism {kind!r} not found at {p}; retrain with "
            "`cna-lens organism train --out DIR` or reinstall cna_lens"
        )
    return p


def load(kind: str, **kwargs: Any) -> Any:
    """Load the shipped organism ``kind`` with :func:`cna_lens.load_model`.

    Args:
        kind: "base" or "instruct".
        **kwargs: Passed to :func:`cna_lens.load_model` (``device``, ``dtype``).

    Returns:
        A TransformerLens ``TransformerBridge`` around the organism.
    """
    return load_model(path(kind), **kwargs)


@cache
def _read(name: str) -> str:
    return (DATA_DIR / f"{name}.json").read_text()


def prompts(name: str) -> list[Any]:
    """A fresh copy of the shipped prompt set ``name`` (one of :data:`PROMPT_SETS`).

    Raises:
        ValueError: ``name`` is not one of :data:`PROMPT_SETS`.
    """
    if name not in PROMPT_SETS:
        raise ValueError(f"unknown prompt set {name!r}; valid names: {', '.join(PROMPT_SETS)}")
    return json.loads(_read(name))
