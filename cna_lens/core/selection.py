"""Selection: the top-k neurons of a score across all layers, as a :class:`Circuit`.

The circuit size is a fraction of all MLP neurons (at least one) or a count
(:func:`resolve_k`); excluded layers and neurons (universal ones) never enter; ties are
broken by position so selection is deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from cna_lens._validate import Integral, Real, check_int, check_layers, check_real
from cna_lens.core.circuit import Circuit, Neuron, Provenance
from cna_lens.errors import CNAError

__all__ = ["resolve_k", "select_top_k"]


def resolve_k(
    n_available: int, n_total: int, *, fraction: Real | None = None, top_k: Integral | None = None
) -> int:
    """The circuit size: ``top_k``, or ``max(1, round(fraction * n_total))``.

    Raises:
        CNAError: both or neither given, fraction outside (0, 1], k < 1, or k larger than
            the ``n_available`` neurons left after exclusions and filtering.
    """
    if (fraction is None) == (top_k is None):
        raise CNAError("give exactly one of fraction (e.g. 0.001) or top_k")
    if fraction is not None:
        fraction = check_real("fraction", fraction, low=0.0, high=1.0, low_open=True)
        k = max(1, round(fraction * n_total))
    else:
        k = check_int("top_k", top_k, low=1)
    if k > n_available:
        raise CNAError(
            f"k={k} is larger than the {n_available} neurons available after exclusions and "
            f"filtering (of {n_total}); choose top_k <= {n_available}"
        )
    return k


def select_top_k(
    delta: Float[Tensor, "n_layers d_mlp"],
    *,
    fraction: Real | None = None,
    top_k: Integral | None = None,
    exclude_layers: Sequence[int] = (),
    exclude: Bool[Tensor, "n_layers d_mlp"] | None = None,
    provenance: Provenance | None = None,
    score: Float[Tensor, "n_layers d_mlp"] | None = None,
) -> Circuit:
    """The top-k neurons by |delta| (or by ``score``) across all layers, sign kept, in rank order.

    Ties are broken by the lower (layer, neuron) index, so the result is deterministic.

    Args:
        delta: Per-neuron contrast.
        fraction: k as a fraction of all neurons (``n_layers * d_mlp``), at least 1.
        top_k: k as a count (instead of ``fraction``).
        exclude_layers: Layers never to select from (explicit; nothing is dropped silently).
        exclude: Neurons never to select (e.g. universal neurons).
        provenance: Recorded on the circuit; ``rule``, ``fraction``, ``k`` and
            ``exclude_layers`` are filled in.
        score: What to rank by (default ``|delta|``; see :mod:`cna_lens.core.scores`); the
            neurons still record their signed delta.

    Raises:
        CNAError: bad k or fraction, a non-finite delta or score, or a layer index out of
            range.
    """
    n_layers, d_mlp = delta.shape
    if not torch.isfinite(delta).all():
        raise CNAError("delta has NaN or infinite entries; check the activations")
    allowed = torch.ones(n_layers, d_mlp, dtype=torch.bool, device=delta.device)
    exclude_layers = check_layers("exclude_layers", exclude_layers, n_layers)
    for layer in exclude_layers:
        allowed[layer] = False
    if exclude is not None:
        if tuple(exclude.shape) != (n_layers, d_mlp):
            raise CNAError(f"exclude mask is {tuple(exclude.shape)}, expected {(n_layers, d_mlp)}")
        allowed &= ~exclude.to(delta.device)
    n_total = n_layers * d_mlp
    k = resolve_k(int(allowed.sum()), n_total, fraction=fraction, top_k=top_k)
    if score is None:
        score = delta.abs()
    elif tuple(score.shape) != (n_layers, d_mlp) or not torch.isfinite(score).all():
        raise CNAError(
            f"score must be a finite tensor of shape {[n_layers, d_mlp]}, got {list(score.shape)}"
        )
    # Excluded neurons rank below every allowed one (k never exceeds the allowed count).
    score = torch.where(
        allowed,
        score.to(device=delta.device, dtype=torch.float64),
        torch.full_like(delta, -math.inf, dtype=torch.float64),
    ).flatten()
    order = torch.sort(score, descending=True, stable=True).indices[:k].tolist()
    flat = delta.flatten().tolist()
    neurons = tuple(Neuron(i // d_mlp, i % d_mlp, float(flat[i])) for i in order)
    base = provenance or Provenance()
    prov_fields = asdict(base)
    prov_fields.update(
        rule="fraction" if fraction is not None else "top_k",
        fraction=check_real("fraction", fraction) if fraction is not None else None,
        k=k,
        exclude_layers=tuple(sorted(exclude_layers)),
    )
    return Circuit(neurons, int(n_layers), int(d_mlp), Provenance(**prov_fields))
