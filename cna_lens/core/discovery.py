"""Discovery: the whole CNA pipeline from two prompt sets to a :class:`Circuit`.

attribute both sets -> flag universal neurons -> select the top-k by a neuron score
(|delta| by default; see :mod:`cna_lens.core.scores`). Every setting lives in one frozen
:class:`DiscoveryConfig`, which every entry point takes and which round-trips through JSON.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from functools import partial
from typing import Any

from cna_lens._validate import (
    Integral,
    Real,
    check_bool,
    check_int,
    check_layers,
    check_real,
    dataclass_fields,
)
from cna_lens.core.activations import activation_stats
from cna_lens.core.attribution import Attribution
from cna_lens.core.circuit import Circuit, Neuron, Provenance
from cna_lens.core.scores import Score, compute_score, get_score, score_name
from cna_lens.core.selection import resolve_k, select_top_k
from cna_lens.core.universal import UniversalNeurons, universal_neurons_from
from cna_lens.errors import CNAError
from cna_lens.models.loading import (
    MLP_HOOK,
    PromptList,
    model_fingerprint,
    model_id,
    prompt_set_hash,
    validate_prompts,
)

__all__ = [
    "Discovery",
    "DiscoveryConfig",
    "circuit_from_attribution",
    "discover",
    "discover_full",
    "discover_with",
]


def _fraction(name: str, value: Any) -> float:
    return check_real(name, value, low=0.0, high=1.0, low_open=True)


@dataclass(frozen=True, kw_only=True)
class DiscoveryConfig:
    """Everything discovery needs besides the model and the two prompt sets.

    Attributes:
        fraction: Circuit size as a fraction of all MLP neurons (default 0.1%, at least 1).
        top_k: Circuit size as a count; overrides ``fraction`` (which is then set to None).
        exclude_layers: Layers to leave out of the selection (none by default).
        universal_filter: Remove universal neurons (default on).
        universal_prompts: Diverse prompts for the filter (None: the shipped set).
        universal_top_fraction: Per-prompt top fraction for the filter (0.1%).
        universal_threshold: Fraction of prompts that makes a neuron universal (80%).
        score: What selection ranks by: a registered name (``"abs_delta"``, the paper's
            rule, or ``"effect_size"``; see :data:`cna_lens.core.scores.SCORES`) or a function
            ``attribution -> [n_layers, d_mlp]`` (its ``__name__`` is recorded).
        batch_size: Prompts per forward pass.
        prefix_reuse: Compute the token prefix all prompts share (a chat template's system
            turn) once and continue every batch from its KV cache (see
            :func:`cna_lens.iter_activations`); False: every prompt whole, through the
            bridge's hook points.

    Example:
        >>> cfg = DiscoveryConfig(top_k=20, score="effect_size", universal_filter=False)
        >>> DiscoveryConfig.from_dict(cfg.to_dict()) == cfg
        True
    """

    # __post_init__ checks every field and raises CNAError naming it (numbers of any
    # numeric type, e.g. np.int64, are accepted and converted); a runtime type checker
    # checking __init__ first would pre-empt those messages.
    __no_type_check__ = True

    fraction: Real | None = 0.001
    top_k: Integral | None = None
    exclude_layers: Sequence[int] = ()
    universal_filter: bool = True
    universal_prompts: Sequence[str] | None = None
    universal_top_fraction: Real = 0.001
    universal_threshold: Real = 0.8
    score: str | Score = "abs_delta"
    batch_size: Integral = 32
    prefix_reuse: bool = True

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if self.top_k is not None:
            put("fraction", None)
            put("top_k", check_int("top_k", self.top_k, low=1))
        elif self.fraction is None:
            raise CNAError("give exactly one of fraction (e.g. 0.001) or top_k")
        else:
            put("fraction", _fraction("fraction", self.fraction))
        layers = self.exclude_layers
        if isinstance(layers, (str, bytes)) or not isinstance(layers, (list, tuple, range)):
            raise CNAError(
                f"exclude_layers must be a list of layer indices (e.g. [0, 1]), got "
                f"{type(layers).__name__} {layers!r:.60}"
            )
        for layer in layers:
            if isinstance(layer, bool) or not isinstance(layer, numbers.Integral) or layer < 0:
                raise CNAError(f"exclude_layers has {layer!r}; valid layers are integers >= 0")
        put("exclude_layers", tuple(int(layer) for layer in layers))
        if not isinstance(self.universal_filter, bool):
            raise CNAError(f"universal_filter must be True or False, got {self.universal_filter!r}")
        if self.universal_prompts is not None:
            put(
                "universal_prompts",
                tuple(validate_prompts(list(self.universal_prompts), "universal prompts")),
            )
        put(
            "universal_top_fraction",
            _fraction("universal_top_fraction", self.universal_top_fraction),
        )
        put("universal_threshold", _fraction("universal_threshold", self.universal_threshold))
        get_score(self.score)  # unknown names fail here, listing the valid ones
        put("batch_size", check_int("batch_size", self.batch_size, low=1))
        check_bool("prefix_reuse", self.prefix_reuse)

    @property
    def score_name(self) -> str:
        """The score's name as recorded in provenance."""
        return score_name(self.score)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (a score function is written as its name)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["exclude_layers"] = list(self.exclude_layers)
        d["universal_prompts"] = (
            None if self.universal_prompts is None else list(self.universal_prompts)
        )
        d["score"] = self.score_name
        return d

    @classmethod
    def from_dict(cls, d: Any) -> DiscoveryConfig:
        """Build a config from :meth:`to_dict` output.

        A score written by name must be registered (:func:`cna_lens.register_score`)
        before loading.

        Raises:
            CNAError: not a mapping, unknown keys, or invalid values.
        """
        d = dataclass_fields(cls, d, "discovery config")
        for key in ("exclude_layers", "universal_prompts"):
            if isinstance(d.get(key), list):
                d[key] = tuple(d[key])
        return cls(**d)

    @classmethod
    def build(cls, config: DiscoveryConfig | None, options: dict[str, Any]) -> DiscoveryConfig:
        """``config``, or a config from keyword ``options`` (the convenience keywords).

        Raises:
            CNAError: both given, or an unknown option (the message lists the valid ones).
        """
        if config is not None:
            if options:
                raise CNAError(
                    f"pass either config=DiscoveryConfig(...) or keyword options, "
                    f"not both (got config and {sorted(options)})"
                )
            return config
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise CNAError(f"unknown discovery options {unknown}; valid: {sorted(known)}")
        if options.get("top_k") is not None:
            options = {**options, "fraction": None}
        return cls(**options)


@dataclass(frozen=True)
class Discovery:
    """A discovered circuit with the statistics and universal neurons behind it.

    ``config`` is the :class:`DiscoveryConfig` it was made with (None when built by hand),
    so other circuit sizes can be selected from the same statistics
    (:meth:`circuit_at`) without another forward pass.
    """

    circuit: Circuit
    attribution: Attribution
    universal: UniversalNeurons | None
    config: DiscoveryConfig | None = None

    def circuit_at(self, *, fraction: float | None = None, top_k: int | None = None) -> Circuit:
        """The circuit of another size, selected from the same statistics and settings.

        Raises:
            CNAError: bad size, or k larger than the neurons left after filtering.
        """
        cfg = self.config or DiscoveryConfig(
            score=self.circuit.provenance.score,
            exclude_layers=self.circuit.provenance.exclude_layers,
        )
        return circuit_from_attribution(
            self.attribution,
            fraction=fraction,
            top_k=top_k,
            exclude_layers=cfg.exclude_layers,
            score=cfg.score,
            universal=self.universal,
            provenance=self.circuit.provenance,
        )


def circuit_from_attribution(
    attribution: Attribution,
    *,
    fraction: Real | None = 0.001,
    top_k: Integral | None = None,
    exclude_layers: Sequence[int] = (),
    score: str | Score = "abs_delta",
    universal: UniversalNeurons | None = None,
    provenance: Provenance | None = None,
) -> Circuit:
    """Select a circuit from precomputed statistics (pure: no model needed).

    The top-k by ``score`` (see :mod:`cna_lens.core.scores`); each neuron records its signed
    delta and its mean activation on both sets (``mean_positive``, ``mean_negative``).

    Raises:
        CNAError: bad size or score (wrong shape, NaN), or k larger than the neurons left.
    """
    if top_k is not None:
        fraction = None
    prov = provenance or Provenance()
    exclude = None
    if universal is not None:
        exclude = universal.mask
        prov = Provenance(
            **{
                **prov.__dict__,
                "universal_filter": True,
                "universal_top_fraction": universal.top_fraction,
                "universal_threshold": universal.threshold,
                "universal_removed": len(universal),
                "universal_prompts_hash": universal.prompts_hash,
            }
        )
    prov = Provenance(
        **{
            **prov.__dict__,
            "n_positive": attribution.positive.count,
            "n_negative": attribution.negative.count,
            "score": score_name(score),
        }
    )
    delta = attribution.delta
    values = compute_score(score, attribution)
    circuit = select_top_k(
        delta,
        fraction=fraction,
        top_k=top_k,
        exclude_layers=exclude_layers,
        exclude=exclude,
        provenance=prov,
        score=values.to(delta.device),
    )
    mean_pos = attribution.positive.mean
    mean_neg = attribution.negative.mean
    neurons = tuple(
        Neuron(
            n.layer,
            n.neuron,
            n.delta,
            float(mean_pos[n.layer, n.neuron]),
            float(mean_neg[n.layer, n.neuron]),
        )
        for n in circuit
    )
    return Circuit(neurons, circuit.n_layers, circuit.d_mlp, circuit.provenance)


def discover_with(
    stats_fn: Callable[..., Any],
    model: Any,
    positive: PromptList,
    negative: PromptList,
    config: DiscoveryConfig | None = None,
) -> Discovery:
    """The discovery pipeline with the forward passes done by ``stats_fn``.

    ``stats_fn(prompts, desc=..., top_fraction=None)`` returns ``(stats, top_counts)`` like
    :func:`cna_lens.activation_stats`; :func:`discover_full` passes that function and
    :func:`cna_lens.discover_distributed` its sharded twin. Everything else (validation,
    size check, universal filter, provenance, selection) is shared and set by ``config``
    (default: ``DiscoveryConfig()``; its ``batch_size`` is the caller's to bind into
    ``stats_fn``).
    """
    config = config or DiscoveryConfig()
    positive = validate_prompts(positive, "positive prompts")
    negative = validate_prompts(negative, "negative prompts")
    n_layers = int(model.cfg.n_layers)
    n_total = n_layers * int(model.cfg.d_mlp)
    # Fail on a bad size or layer before any forward pass (re-checked after filtering).
    resolve_k(n_total, n_total, fraction=config.fraction, top_k=config.top_k)
    check_layers("exclude_layers", config.exclude_layers, n_layers)
    pos, _ = stats_fn(positive, desc="positive")
    neg, _ = stats_fn(negative, desc="negative")
    attribution = Attribution(pos, neg)
    universal = None
    if config.universal_filter:
        prompts = None if config.universal_prompts is None else list(config.universal_prompts)
        universal = universal_neurons_from(
            stats_fn,
            prompts,
            top_fraction=config.universal_top_fraction,
            threshold=config.universal_threshold,
        )
    provenance = Provenance(
        model_id=model_id(model),
        fingerprint=model_fingerprint(model),
        hook=MLP_HOOK,
        positive_hash=prompt_set_hash(positive),
        negative_hash=prompt_set_hash(negative),
    )
    circuit = circuit_from_attribution(
        attribution,
        fraction=config.fraction,
        top_k=config.top_k,
        exclude_layers=config.exclude_layers,
        score=config.score,
        universal=universal,
        provenance=provenance,
    )
    return Discovery(circuit, attribution, universal, config)


def discover_full(
    model: Any,
    positive: PromptList,
    negative: PromptList,
    config: DiscoveryConfig | None = None,
    *,
    progress: bool = False,
    **options: Any,
) -> Discovery:
    """Like :func:`discover`, but also return the statistics and the universal neurons."""
    config = DiscoveryConfig.build(config, options)
    return discover_with(
        partial(
            activation_stats,
            model,
            batch_size=config.batch_size,
            progress=progress,
            prefix_reuse=config.prefix_reuse,
        ),
        model,
        positive,
        negative,
        config,
    )


def discover(
    model: Any,
    positive: PromptList,
    negative: PromptList,
    config: DiscoveryConfig | None = None,
    *,
    progress: bool = False,
    **options: Any,
) -> Circuit:
    """Find the circuit that separates ``positive`` from ``negative`` prompts.

    Args:
        model: A bridge from :func:`cna_lens.load_model`.
        positive: Prompts of the target behaviour (e.g. harmful requests).
        negative: Prompts of its opposite (e.g. benign requests).
        config: All settings (:class:`DiscoveryConfig`: size, excluded layers, universal
            filter, score, batch size). Default: ``DiscoveryConfig()``, the paper's rule.
        progress: Show progress bars.
        **options: Instead of ``config``, its fields as keywords (a convenience:
            ``discover(model, pos, neg, top_k=20)`` is
            ``discover(model, pos, neg, DiscoveryConfig(top_k=20))``).

    Returns:
        The circuit, top-k by the score in rank order, with provenance.

    Raises:
        CNAError: bad prompts, settings or size, or k larger than the neurons left after
            filtering.

    Example:
        >>> circuit = discover(model, harmful, benign, fraction=0.001)  # doctest: +SKIP
        >>> circuit.labels[:3]  # doctest: +SKIP
        ['L5N301', 'L5N17', 'L4N88']
    """
    return discover_full(model, positive, negative, config, progress=progress, **options).circuit
