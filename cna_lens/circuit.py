"""Circuit: the selected neurons as an immutable, saveable value, and the selection rule.

A :class:`Circuit` is the top-k neurons by |delta| across all layers, in rank order, with
the sign of delta kept and a record of how it was made (model, hook, rule, filter, prompt
hashes, package version). It round-trips through JSON and refuses to be used with a model
of another shape or architecture.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from cna_lens.errors import CircuitMismatchError, CNAError

__all__ = ["Circuit", "Neuron", "Provenance", "select_top_k", "resolve_k"]

FORMAT = "cna_lens.circuit"
FORMAT_VERSION = 1


def _package_version() -> str:
    from cna_lens import __version__

    return __version__


@dataclass(frozen=True, order=True)
class Neuron:
    """One circuit neuron: MLP ``layer``, ``neuron`` index in it, and its ``delta``.

    ``mean_positive`` and ``mean_negative`` are its mean activations on the two discovery
    sets (None when unknown, e.g. hand-made circuits or files from older versions); the
    ``"mean"`` intervention needs ``mean_negative``.
    """

    layer: int
    neuron: int
    delta: float = 0.0
    mean_positive: float | None = None
    mean_negative: float | None = None

    @property
    def label(self) -> str:
        return f"L{self.layer}N{self.neuron}"

    @property
    def sign(self) -> int:
        return 1 if self.delta > 0 else -1 if self.delta < 0 else 0


@dataclass(frozen=True, kw_only=True)
class Provenance:
    """How a circuit was made. Every field is plain JSON data."""

    model_id: str = "unknown"
    fingerprint: str = ""
    hook: str = "blocks.{layer}.mlp.hook_post"
    rule: Literal["fraction", "top_k", "manual"] = "manual"
    fraction: float | None = None
    k: int | None = None
    exclude_layers: tuple[int, ...] = ()
    universal_filter: bool = False
    universal_top_fraction: float | None = None
    universal_threshold: float | None = None
    universal_removed: int = 0
    universal_prompts_hash: str | None = None
    positive_hash: str | None = None
    negative_hash: str | None = None
    n_positive: int | None = None
    n_negative: int | None = None
    score: str = "abs_delta"
    package_version: str = field(default_factory=_package_version)

    def __post_init__(self) -> None:
        if self.rule not in ("fraction", "top_k", "manual"):
            raise CNAError(f"rule must be 'fraction', 'top_k' or 'manual', got {self.rule!r}")
        object.__setattr__(self, "exclude_layers", tuple(int(x) for x in self.exclude_layers))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Provenance:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise CNAError(f"unknown provenance keys {unknown}; valid: {sorted(known)}")
        d = dict(d)
        if "exclude_layers" in d:
            d["exclude_layers"] = tuple(d["exclude_layers"])
        return cls(**d)


@dataclass(frozen=True)
class Circuit:
    """An immutable set of MLP neurons in rank order, with provenance.

    Example:
        >>> c = Circuit((Neuron(3, 7, 0.5), Neuron(0, 1, -0.2)), n_layers=4, d_mlp=16)
        >>> c.labels
        ['L3N7', 'L0N1']
    """

    neurons: tuple[Neuron, ...]
    n_layers: int
    d_mlp: int
    provenance: Provenance = field(default_factory=Provenance)

    def __post_init__(self) -> None:
        object.__setattr__(self, "neurons", tuple(self.neurons))
        if self.n_layers < 1 or self.d_mlp < 1:
            raise CNAError(f"n_layers and d_mlp must be >= 1, got {self.n_layers}, {self.d_mlp}")
        seen: set[tuple[int, int]] = set()
        for n in self.neurons:
            if not isinstance(n, Neuron):
                raise CNAError(f"circuit entries must be Neuron, got {type(n).__name__}")
            if not 0 <= n.layer < self.n_layers:
                raise CNAError(f"{n.label}: layer {n.layer} out of range [0, {self.n_layers})")
            if not 0 <= n.neuron < self.d_mlp:
                raise CNAError(f"{n.label}: neuron {n.neuron} out of range [0, {self.d_mlp})")
            if not math.isfinite(n.delta):
                raise CNAError(f"{n.label}: delta must be finite, got {n.delta}")
            for name in ("mean_positive", "mean_negative"):
                value = getattr(n, name)
                if value is not None and not math.isfinite(value):
                    raise CNAError(f"{n.label}: {name} must be finite or None, got {value}")
            if (n.layer, n.neuron) in seen:
                raise CNAError(f"{n.label} appears twice in the circuit")
            seen.add((n.layer, n.neuron))

    # ---- views -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.neurons)

    def __iter__(self):
        return iter(self.neurons)

    @property
    def labels(self) -> list[str]:
        return [n.label for n in self.neurons]

    @property
    def pairs(self) -> frozenset[tuple[int, int]]:
        """The (layer, neuron) index pairs, for set operations."""
        return frozenset((n.layer, n.neuron) for n in self.neurons)

    def per_layer_counts(self) -> list[int]:
        counts = [0] * self.n_layers
        for n in self.neurons:
            counts[n.layer] += 1
        return counts

    def mask(self, device: torch.device | str = "cpu") -> Bool[Tensor, "n_layers d_mlp"]:
        m = torch.zeros(self.n_layers, self.d_mlp, dtype=torch.bool, device=device)
        for n in self.neurons:
            m[n.layer, n.neuron] = True
        return m

    def top(self, k: int) -> Circuit:
        """The first ``k`` neurons (the circuit is in rank order)."""
        if not 0 <= k <= len(self):
            raise CNAError(f"k must be in [0, {len(self)}], got {k}")
        return Circuit(self.neurons[:k], self.n_layers, self.d_mlp, self.provenance)

    # ---- checks ------------------------------------------------------------------------
    def validate(self, model: Any) -> None:
        """Refuse a model of another shape or architecture.

        Raises:
            CircuitMismatchError: n_layers, d_mlp or the architecture fingerprint differ.
        """
        from cna_lens.loading import model_fingerprint

        shape = (int(model.cfg.n_layers), int(model.cfg.d_mlp))
        if shape != (self.n_layers, self.d_mlp):
            raise CircuitMismatchError(
                f"circuit is for n_layers={self.n_layers}, d_mlp={self.d_mlp} "
                f"(model {self.provenance.model_id!r}) but this model has n_layers={shape[0]}, "
                f"d_mlp={shape[1]}"
            )
        fp = self.provenance.fingerprint
        if fp and fp != model_fingerprint(model):
            raise CircuitMismatchError(
                f"circuit fingerprint {fp} (model {self.provenance.model_id!r}) does not match "
                f"this model's architecture fingerprint {model_fingerprint(model)}"
            )

    # ---- JSON --------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "n_layers": self.n_layers,
            "d_mlp": self.d_mlp,
            "neurons": [_neuron_dict(n) for n in self.neurons],
            "provenance": {k: (list(v) if isinstance(v, tuple) else v)
                           for k, v in asdict(self.provenance).items()},
        }

    @classmethod
    def from_dict(cls, d: Any) -> Circuit:
        """Build a circuit from :meth:`to_dict` output.

        Raises:
            CNAError: the data is not a circuit (wrong format, missing or ill-typed fields).
        """
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise CNAError(f"not a cna_lens circuit: expected a JSON object with "
                           f"format={FORMAT!r}")
        if d.get("format_version") != FORMAT_VERSION:
            raise CNAError(f"circuit format_version {d.get('format_version')!r} is not "
                           f"supported; this cna_lens reads version {FORMAT_VERSION}")
        try:
            neurons = tuple(
                Neuron(_int(e["layer"]), _int(e["neuron"]), float(e["delta"]),
                       *(_opt_float(e.get(k)) for k in ("mean_positive", "mean_negative")))
                for e in d["neurons"]
            )
            return cls(neurons, _int(d["n_layers"]), _int(d["d_mlp"]),
                       Provenance.from_dict(dict(d.get("provenance", {}))))
        except (KeyError, TypeError) as exc:
            raise CNAError(f"malformed circuit data: missing or ill-typed field {exc}") from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Circuit:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CNAError(f"circuit file is not valid JSON (corrupt or truncated?): {exc}") from exc
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the circuit as JSON (atomically: a crash leaves no half-written file)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(self.to_json())
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Circuit:
        """Read a circuit written by :meth:`save`.

        Raises:
            CNAError: the file is missing, corrupt, truncated or not a circuit.
        """
        path = Path(path)
        if not path.is_file():
            raise CNAError(f"circuit file {str(path)!r} does not exist")
        try:
            return cls.from_json(path.read_text())
        except CNAError as exc:
            raise CNAError(f"{path}: {exc}") from exc

    @classmethod
    def from_pairs(
        cls, pairs: Iterable[tuple[int, int]], *, n_layers: int, d_mlp: int,
        provenance: Provenance | None = None,
    ) -> Circuit:
        """A hand-made circuit from (layer, neuron) pairs (delta 0)."""
        return cls(tuple(Neuron(int(layer), int(j)) for layer, j in pairs), n_layers, d_mlp,
                   provenance or Provenance())


def _neuron_dict(n: Neuron) -> dict[str, Any]:
    """JSON entry of a neuron; the means only when known, so old readers see old files."""
    d: dict[str, Any] = {"layer": n.layer, "neuron": n.neuron, "delta": n.delta}
    for k in ("mean_positive", "mean_negative"):
        if getattr(n, k) is not None:
            d[k] = getattr(n, k)
    return d


def _opt_float(x: Any) -> float | None:
    return None if x is None else float(x)


def _int(x: Any) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"expected an integer, got {x!r}")
    return x


def resolve_k(n_available: int, n_total: int, *, fraction: float | None = None,
              top_k: int | None = None) -> int:
    """The circuit size: ``top_k``, or ``max(1, round(fraction * n_total))``.

    Raises:
        CNAError: both or neither given, fraction outside (0, 1], k < 1, or k larger than
            the ``n_available`` neurons left after exclusions and filtering.
    """
    if (fraction is None) == (top_k is None):
        raise CNAError("give exactly one of fraction (e.g. 0.001) or top_k")
    if fraction is not None:
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (
            0.0 < fraction <= 1.0
        ):
            raise CNAError(f"fraction must be in (0, 1], got {fraction!r}")
        k = max(1, round(fraction * n_total))
    else:
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise CNAError(f"top_k must be a positive integer, got {top_k!r}")
        k = top_k
    if k > n_available:
        raise CNAError(
            f"k={k} is larger than the {n_available} neurons available after exclusions and "
            f"filtering (of {n_total}); choose top_k <= {n_available}"
        )
    return k


def select_top_k(
    delta: Float[Tensor, "n_layers d_mlp"],
    *,
    fraction: float | None = None,
    top_k: int | None = None,
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
        score: What to rank by (default ``|delta|``; see :mod:`cna_lens.scores`); the
            neurons still record their signed delta.

    Raises:
        CNAError: bad k or fraction, a non-finite delta or score, or a layer index out of
            range.
    """
    n_layers, d_mlp = delta.shape
    if not torch.isfinite(delta).all():
        raise CNAError("delta has NaN or infinite entries; check the activations")
    allowed = torch.ones(n_layers, d_mlp, dtype=torch.bool, device=delta.device)
    for layer in exclude_layers:
        if not 0 <= int(layer) < n_layers:
            raise CNAError(f"exclude_layers has {layer}, valid layers are 0..{n_layers - 1}")
        allowed[int(layer)] = False
    if exclude is not None:
        if tuple(exclude.shape) != (n_layers, d_mlp):
            raise CNAError(f"exclude mask is {tuple(exclude.shape)}, expected {(n_layers, d_mlp)}")
        allowed &= ~exclude.to(delta.device)
    n_total = n_layers * d_mlp
    k = resolve_k(int(allowed.sum()), n_total, fraction=fraction, top_k=top_k)
    if score is None:
        score = delta.abs()
    elif tuple(score.shape) != (n_layers, d_mlp) or not torch.isfinite(score).all():
        raise CNAError(f"score must be a finite tensor of shape {[n_layers, d_mlp]}, got "
                       f"{list(score.shape)}")
    # Excluded neurons rank below every allowed one (k never exceeds the allowed count).
    score = torch.where(allowed, score.to(device=delta.device, dtype=torch.float64),
                        torch.full_like(delta, -math.inf, dtype=torch.float64)).flatten()
    order = torch.sort(score, descending=True, stable=True).indices[:k].tolist()
    flat = delta.flatten().tolist()
    neurons = tuple(Neuron(i // d_mlp, i % d_mlp, float(flat[i])) for i in order)
    base = provenance or Provenance()
    prov_fields = asdict(base)
    prov_fields.update(
        rule="fraction" if fraction is not None else "top_k",
        fraction=float(fraction) if fraction is not None else None,
        k=k,
        exclude_layers=tuple(sorted(int(x) for x in exclude_layers)),
    )
    return Circuit(neurons, int(n_layers), int(d_mlp), Provenance(**prov_fields))
