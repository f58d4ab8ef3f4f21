"""Discovery: the whole CNA pipeline from two prompt sets to a :class:`Circuit`.

attribute both sets -> flag universal neurons -> select the top-k by |delta|.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

from cna_lens._validate import Integral, Real, check_int, check_real
from cna_lens.activations import activation_stats
from cna_lens.attribution import Attribution
from cna_lens.circuit import Circuit, Provenance, check_layers, resolve_k, select_top_k
from cna_lens.errors import CNAError
from cna_lens.loading import (
    MLP_HOOK,
    PromptList,
    model_fingerprint,
    model_id,
    prompt_set_hash,
    validate_prompts,
)
from cna_lens.universal import UniversalNeurons, universal_neurons_from

__all__ = ["Discovery", "discover", "discover_full", "discover_with", "circuit_from_attribution"]


@dataclass(frozen=True)
class Discovery:
    """A discovered circuit with the statistics and universal neurons behind it."""

    circuit: Circuit
    attribution: Attribution
    universal: UniversalNeurons | None


def circuit_from_attribution(
    attribution: Attribution,
    *,
    fraction: Real | None = 0.001,
    top_k: Integral | None = None,
    exclude_layers: Sequence[int] = (),
    universal: UniversalNeurons | None = None,
    provenance: Provenance | None = None,
) -> Circuit:
    """Select a circuit from precomputed statistics (pure: no model needed)."""
    if top_k is not None:
        fraction = None
    prov = provenance or Provenance()
    exclude = None
    if universal is not None:
        exclude = universal.mask
        prov = Provenance(**{
            **prov.__dict__,
            "universal_filter": True,
            "universal_top_fraction": universal.top_fraction,
            "universal_threshold": universal.threshold,
            "universal_removed": len(universal),
            "universal_prompts_hash": universal.prompts_hash,
        })
    prov = Provenance(**{**prov.__dict__, "n_positive": attribution.positive.count,
                         "n_negative": attribution.negative.count})
    return select_top_k(attribution.delta, fraction=fraction, top_k=top_k,
                        exclude_layers=exclude_layers, exclude=exclude, provenance=prov)


def discover_full(
    model: Any,
    positive: PromptList,
    negative: PromptList,
    *,
    fraction: Real | None = 0.001,
    top_k: Integral | None = None,
    exclude_layers: Sequence[int] = (),
    universal_filter: bool = True,
    universal_prompts: PromptList | None = None,
    universal_top_fraction: Real = 0.001,
    universal_threshold: Real = 0.8,
    batch_size: Integral = 32,
    progress: bool = False,
) -> Discovery:
    """Like :func:`discover`, but also return the statistics and the universal neurons."""
    batch_size = check_int("batch_size", batch_size, low=1)
    return discover_with(
        partial(activation_stats, model, batch_size=batch_size, progress=progress),
        model, positive, negative, fraction=fraction, top_k=top_k,
        exclude_layers=exclude_layers, universal_filter=universal_filter,
        universal_prompts=universal_prompts, universal_top_fraction=universal_top_fraction,
        universal_threshold=universal_threshold,
    )


def discover_with(
    stats_fn: Callable[..., Any],
    model: Any,
    positive: PromptList,
    negative: PromptList,
    *,
    fraction: Real | None = 0.001,
    top_k: Integral | None = None,
    exclude_layers: Sequence[int] = (),
    universal_filter: bool = True,
    universal_prompts: PromptList | None = None,
    universal_top_fraction: Real = 0.001,
    universal_threshold: Real = 0.8,
) -> Discovery:
    """The discovery pipeline with the forward passes done by ``stats_fn``.

    ``stats_fn(prompts, desc=..., top_fraction=None)`` returns ``(stats, top_counts)`` like
    :func:`cna_lens.activation_stats`; :func:`discover_full` passes that function and
    :func:`cna_lens.discover_distributed` its sharded twin. Everything else (validation,
    size check, universal filter, provenance, selection) is shared.
    """
    positive = validate_prompts(positive, "positive prompts")
    negative = validate_prompts(negative, "negative prompts")
    n_total = int(model.cfg.n_layers) * int(model.cfg.d_mlp)
    # Fail on bad arguments before any forward pass (the size is re-checked after filtering).
    resolve_k(n_total, n_total, fraction=None if top_k is not None else fraction, top_k=top_k)
    exclude_layers = check_layers("exclude_layers", exclude_layers, int(model.cfg.n_layers))
    if not isinstance(universal_filter, bool):
        raise CNAError(f"universal_filter must be True or False, got {universal_filter!r}")
    if universal_filter:
        universal_threshold = check_real("universal_threshold", universal_threshold, low=0.0,
                                         high=1.0, low_open=True)
        universal_top_fraction = check_real("universal_top_fraction", universal_top_fraction,
                                            low=0.0, high=1.0, low_open=True)
    pos, _ = stats_fn(positive, desc="positive")
    neg, _ = stats_fn(negative, desc="negative")
    attribution = Attribution(pos, neg)
    universal = None
    if universal_filter:
        universal = universal_neurons_from(
            stats_fn, universal_prompts, top_fraction=universal_top_fraction,
            threshold=universal_threshold,
        )
    provenance = Provenance(
        model_id=model_id(model),
        fingerprint=model_fingerprint(model),
        hook=MLP_HOOK,
        positive_hash=prompt_set_hash(positive),
        negative_hash=prompt_set_hash(negative),
    )
    circuit = circuit_from_attribution(
        attribution, fraction=fraction, top_k=top_k, exclude_layers=exclude_layers,
        universal=universal, provenance=provenance,
    )
    return Discovery(circuit, attribution, universal)


def discover(
    model: Any,
    positive: PromptList,
    negative: PromptList,
    *,
    fraction: Real | None = 0.001,
    top_k: Integral | None = None,
    exclude_layers: Sequence[int] = (),
    universal_filter: bool = True,
    universal_prompts: PromptList | None = None,
    universal_top_fraction: Real = 0.001,
    universal_threshold: Real = 0.8,
    batch_size: Integral = 32,
    progress: bool = False,
) -> Circuit:
    """Find the circuit that separates ``positive`` from ``negative`` prompts.

    Args:
        model: A bridge from :func:`cna_lens.load_model`.
        positive: Prompts of the target behaviour (e.g. harmful requests).
        negative: Prompts of its opposite (e.g. benign requests).
        fraction: Circuit size as a fraction of all MLP neurons (default 0.1%, at least 1).
        top_k: Circuit size as a count; overrides ``fraction``.
        exclude_layers: Layers to leave out of the selection (none by default).
        universal_filter: Remove universal neurons (default on).
        universal_prompts: Diverse prompts for the filter (default: the shipped set).
        universal_top_fraction: Per-prompt top fraction for the filter (0.1%).
        universal_threshold: Fraction of prompts that makes a neuron universal (80%).
        batch_size: Prompts per forward pass.
        progress: Show progress bars.

    Returns:
        The circuit, top-k by |delta| in rank order, with provenance.

    Raises:
        CNAError: bad prompts or size, or k larger than the neurons left after filtering.

    Example:
        >>> circuit = discover(model, harmful, benign, fraction=0.001)  # doctest: +SKIP
        >>> circuit.labels[:3]  # doctest: +SKIP
        ['L5N301', 'L5N17', 'L4N88']
    """
    return discover_full(
        model, positive, negative, fraction=fraction, top_k=top_k,
        exclude_layers=exclude_layers, universal_filter=universal_filter,
        universal_prompts=universal_prompts, universal_top_fraction=universal_top_fraction,
        universal_threshold=universal_threshold, batch_size=batch_size, progress=progress,
    ).circuit
