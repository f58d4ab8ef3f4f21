"""Universal neurons: neurons that fire strongly whatever the prompt says.

A neuron is universal when it ranks in the top ``top_fraction`` of all MLP neurons (by
|activation| at the last prompt token) for at least ``threshold`` of a diverse set of
unrelated prompts. Such neurons are removed from every circuit by default. A diverse
default set of prompts ships with the package.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from importlib import resources
from typing import Any

import torch
from jaxtyping import Bool, Int
from torch import Tensor

from cna_lens._validate import Integral, Real, check_real
from cna_lens.core.activations import activation_stats
from cna_lens.errors import CNAError
from cna_lens.models.loading import PromptList, prompt_set_hash, validate_prompts

__all__ = [
    "UniversalNeurons",
    "default_universal_prompts",
    "find_universal_neurons",
    "universal_from_counts",
    "universal_neurons_from",
]


def default_universal_prompts() -> list[str]:
    """The shipped diverse prompt set (questions, tasks, fragments, code) for the filter."""
    text = resources.files("cna_lens").joinpath("data/universal_prompts.json").read_text()
    return list(json.loads(text))


@dataclass(frozen=True)
class UniversalNeurons:
    """The flagged neurons and how they were found."""

    mask: Bool[Tensor, "n_layers d_mlp"]
    counts: Int[Tensor, "n_layers d_mlp"]
    n_prompts: int
    top_fraction: float
    threshold: float
    prompts_hash: str | None = None

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return [(int(a), int(b)) for a, b in self.mask.nonzero().tolist()]

    def __len__(self) -> int:
        return int(self.mask.sum())


def _check_threshold(threshold: Real, name: str = "threshold") -> float:
    return check_real(name, threshold, low=0.0, high=1.0, low_open=True)


def universal_from_counts(
    counts: Int[Tensor, "n_layers d_mlp"],
    n_prompts: int,
    *,
    top_fraction: Real = 0.001,
    threshold: Real = 0.8,
    prompts_hash: str | None = None,
) -> UniversalNeurons:
    """Flag neurons whose top-``top_fraction`` count reaches ``threshold * n_prompts``."""
    threshold = _check_threshold(threshold)
    top_fraction = check_real("top_fraction", top_fraction, low=0.0, high=1.0, low_open=True)
    if n_prompts < 1:
        raise CNAError(f"n_prompts must be >= 1, got {n_prompts}")
    mask = counts.to(torch.float64) >= threshold * n_prompts - 1e-9
    return UniversalNeurons(mask, counts, n_prompts, top_fraction, threshold, prompts_hash)


def find_universal_neurons(
    model: Any,
    prompts: PromptList | None = None,
    *,
    top_fraction: Real = 0.001,
    threshold: Real = 0.8,
    batch_size: Integral = 32,
    progress: bool = False,
) -> UniversalNeurons:
    """Run the diverse prompts and flag the neurons that are always among the strongest.

    Args:
        model: A bridge from :func:`cna_lens.load_model`.
        prompts: Diverse, unrelated prompts (default: the shipped set).
        top_fraction: Per prompt, the top fraction of all neurons by |activation| (0.1%).
        threshold: Fraction of prompts a neuron must be in the top for (80%).
        batch_size: Prompts per forward pass.
        progress: Show a progress bar.
    """
    stats_fn = partial(activation_stats, model, batch_size=batch_size, progress=progress)
    return universal_neurons_from(stats_fn, prompts, top_fraction=top_fraction, threshold=threshold)


def universal_neurons_from(
    stats_fn: Callable[..., Any],
    prompts: PromptList | None = None,
    *,
    top_fraction: Real = 0.001,
    threshold: Real = 0.8,
) -> UniversalNeurons:
    """:func:`find_universal_neurons` with the forward passes done by ``stats_fn``.

    ``stats_fn(prompts, desc=..., top_fraction=...)`` returns ``(stats, top_counts)`` like
    :func:`cna_lens.activation_stats` (or its sharded twin in :mod:`cna_lens.core.distributed`).
    """
    threshold = _check_threshold(threshold)
    top_fraction = check_real("top_fraction", top_fraction, low=0.0, high=1.0, low_open=True)
    prompts = validate_prompts(
        default_universal_prompts() if prompts is None else prompts, "universal prompts"
    )
    _, counts = stats_fn(prompts, desc="universal", top_fraction=top_fraction)
    assert counts is not None
    return universal_from_counts(
        counts.cpu(),
        len(prompts),
        top_fraction=top_fraction,
        threshold=threshold,
        prompts_hash=prompt_set_hash(prompts),
    )
