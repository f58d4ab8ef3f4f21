"""Neuron scores: the number per neuron that circuit selection ranks by.

A score is any function ``(attribution: Attribution) -> Float[Tensor, "n_layers d_mlp"]``
returning one finite number per MLP neuron; selection takes the top-k of it (larger is
more important). The circuit still records each selected neuron's *signed* delta, whatever
the score. Two scores ship:

* :func:`abs_delta` — ``|mean(positive) - mean(negative)|``, the paper's rule (default).
* :func:`effect_size` — ``|delta| / (pooled_std + EFFECT_SIZE_EPS)`` (Cohen's d), which
  prefers neurons that separate the sets reliably over neurons that merely have a large
  activation scale.

Add a score by writing one function and registering it (steering-vectors style)::

    def max_mean(attribution):
        return torch.maximum(attribution.positive.mean.abs(), attribution.negative.mean.abs())

    register_score("max_mean", max_mean)
    discover(model, harmful, benign, score="max_mean")

or pass the function itself (``score=max_mean``; its ``__name__`` goes into provenance).
"""

from __future__ import annotations

from collections.abc import Callable
from types import MappingProxyType
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from cna_lens.errors import CNAError

if TYPE_CHECKING:
    from cna_lens.core.attribution import Attribution

__all__ = [
    "EFFECT_SIZE_EPS",
    "SCORES",
    "Score",
    "abs_delta",
    "compute_score",
    "effect_size",
    "get_score",
    "register_score",
    "score_name",
]

Score = Callable[["Attribution"], Tensor]
"""``(attribution) -> Float[Tensor, "n_layers d_mlp"]``: one finite score per neuron."""

EFFECT_SIZE_EPS = 1e-6
"""Added to the pooled standard deviation in :func:`effect_size`, so a neuron that is
constant within both sets gets a large finite score (``|delta| / 1e-6``) instead of inf,
and a neuron that never varies and never differs scores 0."""


def abs_delta(attribution: Attribution) -> Float[Tensor, "n_layers d_mlp"]:
    """``|mean(positive) - mean(negative)|`` per neuron (the paper's score)."""
    return attribution.delta.abs()


def effect_size(attribution: Attribution) -> Float[Tensor, "n_layers d_mlp"]:
    """``|delta| / (sqrt(pooled_var) + EFFECT_SIZE_EPS)`` per neuron (absolute Cohen's d).

    ``pooled_var = ((n1 - 1) v1 + (n2 - 1) v2) / (n1 + n2 - 2)`` with ``v1``, ``v2`` the
    unbiased per-neuron variances of the positive and negative sets (``n1 + n2 - 2`` is
    replaced by 1 when both sets hold a single prompt). Computed in float64 from the
    streamed statistics, so it costs no extra forward pass.
    """
    pos, neg = attribution.positive, attribution.negative
    n1, n2 = pos.count, neg.count
    v2 = neg.var.to(pos.total.device)
    pooled = ((n1 - 1) * pos.var + (n2 - 1) * v2) / max(n1 + n2 - 2, 1)
    return attribution.delta.abs() / (pooled.sqrt() + EFFECT_SIZE_EPS)


_REGISTRY: dict[str, Score] = {"abs_delta": abs_delta, "effect_size": effect_size}
SCORES = MappingProxyType(_REGISTRY)
"""Registered scores by name (read-only view; add with :func:`register_score`)."""


def register_score(name: str, fn: Score, *, overwrite: bool = False) -> Score:
    """Register ``fn`` as the score ``name`` (usable as ``DiscoveryConfig(score=name)``).

    Returns ``fn``, so it also works as ``register_score("x", fn)`` inline.

    Raises:
        CNAError: empty name, ``fn`` not callable, or the name is taken (unless
            ``overwrite``).
    """
    if not isinstance(name, str) or not name.strip():
        raise CNAError(f"score name must be a non-empty string, got {name!r}")
    if not callable(fn):
        raise CNAError(f"score {name!r} must be callable (attribution -> tensor), got {fn!r}")
    if name in _REGISTRY and not overwrite and _REGISTRY[name] is not fn:
        raise CNAError(f"score {name!r} is already registered; pass overwrite=True to replace it")
    _REGISTRY[name] = fn
    return fn


def get_score(score: str | Score) -> Score:
    """The score function for a registered name (or ``score`` itself if it is callable).

    Raises:
        CNAError: an unknown name (the message lists the registered ones).
    """
    if callable(score):
        return score
    if isinstance(score, str) and score in _REGISTRY:
        return _REGISTRY[score]
    raise CNAError(
        f"unknown score {score!r}; valid scores: {sorted(_REGISTRY)} "
        "(or register one with cna_lens.register_score(name, fn))"
    )


def score_name(score: str | Score) -> str:
    """The name recorded in provenance: the registry name, or the function's ``__name__``."""
    if isinstance(score, str):
        get_score(score)
        return score
    for name, fn in _REGISTRY.items():
        if fn is score:
            return name
    return str(getattr(score, "__name__", type(score).__name__))


def compute_score(score: str | Score, attribution: Attribution) -> Float[Tensor, "n_layers d_mlp"]:
    """Run a score on ``attribution`` and check its output (float64, on delta's device).

    Raises:
        CNAError: unknown score name, or a result that is not a real tensor of shape
            ``[n_layers, d_mlp]`` with only finite values (the message names the score).
    """
    fn = get_score(score)
    name = score_name(score)
    out = fn(attribution)
    shape = attribution.shape
    if not isinstance(out, Tensor):
        raise CNAError(
            f"score {name!r} returned {type(out).__name__}, expected a tensor of "
            f"shape {list(shape)}"
        )
    if tuple(out.shape) != shape:
        raise CNAError(
            f"score {name!r} returned shape {list(out.shape)}, expected "
            f"[n_layers, d_mlp] = {list(shape)}"
        )
    if out.is_complex() or out.dtype == torch.bool:
        raise CNAError(f"score {name!r} returned dtype {out.dtype}; expected real numbers")
    out = out.to(torch.float64)
    if not torch.isfinite(out).all():
        bad = int((~torch.isfinite(out)).sum())
        raise CNAError(
            f"score {name!r} returned {bad} NaN or infinite values; every neuron "
            "needs a finite score"
        )
    return out
