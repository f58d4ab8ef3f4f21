"""Circuit: the selected neurons as an immutable, saveable value, and the selection rule.

A :class:`Circuit` is the top-k neurons by |delta| across all layers, in rank order, with
the sign of delta kept and a record of how it was made (model, hook, rule, filter, prompt
hashes, package version). It round-trips through JSON and refuses to be used with a model
of another shape or architecture.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import torch
from jaxtyping import Bool
from torch import Tensor

from cna_lens._validate import check_int, check_real
from cna_lens._version import __version__
from cna_lens.errors import CircuitMismatchError, CNAError
from cna_lens.io import atomic_write_text, read_text_file
from cna_lens.models.loading import model_fingerprint, model_id

logger = logging.getLogger(__name__)

__all__ = ["Circuit", "Neuron", "Provenance"]

FORMAT = "cna_lens.circuit"
FORMAT_VERSION = 1

UNKNOWN_FINGERPRINT = "unknown"
"""The fingerprint of a circuit that does not say which architecture it belongs to."""

_FINGERPRINT = re.compile(r"[0-9a-f]{16}")


def _package_version() -> str:
    return __version__


@dataclass(frozen=True, order=True)
class Neuron:
    """One circuit neuron: MLP ``layer``, ``neuron`` index in it, and its ``delta``.

    ``mean_positive`` and ``mean_negative`` are its mean activations on the two discovery
    sets (None when unknown, e.g. hand-made circuits or files from older versions); the
    ``"mean"`` intervention needs ``mean_negative``.
    """

    # __post_init__ checks every field and raises CNAError naming it; a runtime type checker
    # (jaxtyping's import hook) checking __init__ first would pre-empt those messages.
    __no_type_check__ = True

    layer: int
    neuron: int
    delta: float = 0.0
    mean_positive: float | None = None
    mean_negative: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layer", check_int("neuron layer", self.layer, low=0))
        object.__setattr__(self, "neuron", check_int("neuron index", self.neuron, low=0))
        if isinstance(self.delta, bool) or not isinstance(self.delta, numbers.Real):
            raise CNAError(
                f"neuron delta must be a real number, got {self.delta!r} "
                f"({type(self.delta).__name__})"
            )
        try:
            object.__setattr__(self, "delta", float(self.delta))
        except OverflowError:
            raise CNAError(f"neuron delta must be finite, got {self.delta!r}") from None
        for name in ("mean_positive", "mean_negative"):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise CNAError(
                    f"neuron {name} must be a real number or null, got {value!r} "
                    f"({type(value).__name__})"
                )
            try:
                object.__setattr__(self, name, float(value))
            except OverflowError:
                raise CNAError(f"neuron {name} must be finite, got {value!r}") from None

    @property
    def label(self) -> str:
        return f"L{self.layer}N{self.neuron}"

    @property
    def sign(self) -> int:
        return 1 if self.delta > 0 else -1 if self.delta < 0 else 0


@dataclass(frozen=True, kw_only=True)
class Provenance:
    """How a circuit was made. Every field is plain JSON data, type-checked on construction.

    ``fingerprint`` is :func:`cna_lens.models.loading.model_fingerprint` of the model the circuit
    was made for (16 hex digits), or ``"unknown"`` (also written as ``""`` or null by older
    files); :meth:`Circuit.validate` refuses an unknown fingerprint unless told not to.
    """

    __no_type_check__ = True  # fields are checked by __post_init__ (see Neuron)

    model_id: str = "unknown"
    fingerprint: str = UNKNOWN_FINGERPRINT
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
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        for name in ("model_id", "hook", "score", "package_version"):
            if not isinstance(getattr(self, name), str):
                raise CNAError(f"provenance.{name} must be a string, got {getattr(self, name)!r}")
        fp = self.fingerprint
        if fp is None or fp == "":
            put("fingerprint", UNKNOWN_FINGERPRINT)
        elif not isinstance(fp, str) or (
            fp != UNKNOWN_FINGERPRINT and not _FINGERPRINT.fullmatch(fp)
        ):
            raise CNAError(
                f"provenance.fingerprint must be 16 lowercase hex digits (as "
                f"cna_lens.models.loading.model_fingerprint writes) or "
                f"{UNKNOWN_FINGERPRINT!r}, got {fp!r}"
            )
        if self.rule not in ("fraction", "top_k", "manual"):
            raise CNAError(
                f"provenance.rule must be 'fraction', 'top_k' or 'manual', got {self.rule!r}"
            )
        for name in ("fraction", "universal_top_fraction", "universal_threshold"):
            if getattr(self, name) is not None:
                put(
                    name,
                    check_real(
                        f"provenance.{name}", getattr(self, name), low=0.0, high=1.0, low_open=True
                    ),
                )
        if self.k is not None:
            put("k", check_int("provenance.k", self.k, low=1))
        for name in ("n_positive", "n_negative"):
            if getattr(self, name) is not None:
                put(name, check_int(f"provenance.{name}", getattr(self, name), low=0))
        put(
            "universal_removed",
            check_int("provenance.universal_removed", self.universal_removed, low=0),
        )
        if not isinstance(self.universal_filter, bool):
            raise CNAError(
                f"provenance.universal_filter must be true or false, got {self.universal_filter!r}"
            )
        for name in ("universal_prompts_hash", "positive_hash", "negative_hash"):
            if getattr(self, name) is not None and not isinstance(getattr(self, name), str):
                raise CNAError(
                    f"provenance.{name} must be a string or null, got {getattr(self, name)!r}"
                )
        layers = self.exclude_layers
        if isinstance(layers, (str, bytes)) or not isinstance(layers, (list, tuple)):
            raise CNAError(
                f"provenance.exclude_layers must be a list of layer indices, got {layers!r}"
            )
        put(
            "exclude_layers",
            tuple(check_int("provenance.exclude_layers entry", x, low=0) for x in layers),
        )

    @classmethod
    def from_dict(cls, d: Any) -> Provenance:
        """Build provenance from :meth:`Circuit.to_dict`'s ``"provenance"`` object.

        Raises:
            CNAError: not an object, an unknown key, or a field of the wrong type.
        """
        if not isinstance(d, dict):
            raise CNAError(f"provenance must be a JSON object, got {type(d).__name__} {d!r:.60}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(str(k) for k in set(d) - known)
        if unknown:
            raise CNAError(f"unknown provenance keys {unknown}; valid: {sorted(known)}")
        return cls(**d)


@dataclass(frozen=True)
class Circuit:
    """An immutable set of MLP neurons in rank order, with provenance.

    Example:
        >>> c = Circuit((Neuron(3, 7, 0.5), Neuron(0, 1, -0.2)), n_layers=4, d_mlp=16)
        >>> c.labels
        ['L3N7', 'L0N1']
    """

    __no_type_check__ = True  # fields are checked by __post_init__ (see Neuron)

    neurons: tuple[Neuron, ...]
    n_layers: int
    d_mlp: int
    provenance: Provenance = field(default_factory=Provenance)

    def __post_init__(self) -> None:
        object.__setattr__(self, "neurons", tuple(self.neurons))
        object.__setattr__(self, "n_layers", check_int("n_layers", self.n_layers, low=1))
        object.__setattr__(self, "d_mlp", check_int("d_mlp", self.d_mlp, low=1))
        if not isinstance(self.provenance, Provenance):
            raise CNAError(f"provenance must be a Provenance, got {type(self.provenance).__name__}")
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
    def validate(self, model: Any, *, strict: bool = True) -> None:
        """Refuse a model of another shape or architecture.

        A circuit whose fingerprint is ``"unknown"`` (hand-made without a model, or a file
        whose fingerprint is missing, blank or null) is refused too, unless ``strict`` is
        false, in which case only the shape is checked (and a warning logged). To say that a
        hand-made circuit belongs to a model, build it with ``Circuit.from_pairs(...,
        model=model)`` or call :meth:`for_model`.

        Raises:
            CircuitMismatchError: n_layers, d_mlp or the architecture fingerprint differ, or
                the fingerprint is unknown and ``strict`` is true.
        """
        if not hasattr(model, "cfg"):
            raise CNAError(
                f"model must be a TransformerBridge from cna_lens.load_model, got "
                f"{type(model).__name__}"
            )

        shape = (int(model.cfg.n_layers), int(model.cfg.d_mlp))
        if shape != (self.n_layers, self.d_mlp):
            raise CircuitMismatchError(
                f"circuit is for n_layers={self.n_layers}, d_mlp={self.d_mlp} "
                f"(model {self.provenance.model_id!r}) but this model has n_layers={shape[0]}, "
                f"d_mlp={shape[1]}"
            )
        fp = self.provenance.fingerprint
        if fp == UNKNOWN_FINGERPRINT:
            if strict:
                raise CircuitMismatchError(
                    f"circuit (model {self.provenance.model_id!r}) has no architecture "
                    "fingerprint, so it cannot be checked against this model; build it with "
                    "Circuit.from_pairs(..., model=model) or circuit.for_model(model), or call "
                    "validate(model, strict=False) to check the shape only"
                )
            logger.warning("circuit has no architecture fingerprint; only its shape was checked")
            return
        if fp != model_fingerprint(model):
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
            "provenance": {
                k: (list(v) if isinstance(v, tuple) else v)
                for k, v in asdict(self.provenance).items()
            },
        }

    def for_model(self, model: Any) -> Circuit:
        """This circuit, recorded as made for ``model`` (its id and architecture fingerprint).

        The explicit way to say that a hand-made circuit belongs to a model, so that
        :meth:`validate` (and steering, baking) accept it.

        Raises:
            CircuitMismatchError: the model's n_layers or d_mlp differ from the circuit's.
        """
        if self.provenance.fingerprint != UNKNOWN_FINGERPRINT:
            self.validate(model)  # a recorded fingerprint must match
        shape = (int(model.cfg.n_layers), int(model.cfg.d_mlp))
        if shape != (self.n_layers, self.d_mlp):
            raise CircuitMismatchError(
                f"circuit is for n_layers={self.n_layers}, d_mlp={self.d_mlp} but this model "
                f"has n_layers={shape[0]}, d_mlp={shape[1]}"
            )
        prov = asdict(self.provenance)
        prov.update(model_id=model_id(model), fingerprint=model_fingerprint(model))
        return Circuit(self.neurons, self.n_layers, self.d_mlp, Provenance(**prov))

    @classmethod
    def from_dict(cls, d: Any, *, allow_empty: bool = False) -> Circuit:
        """Build a circuit from :meth:`to_dict` output, checking every field's type.

        Args:
            d: The parsed JSON object.
            allow_empty: Accept a circuit with no neurons (refused by default: an empty
                circuit steers nothing, which is almost always a broken file).

        Raises:
            CNAError: the data is not a circuit (wrong format, missing, unknown or
                ill-typed fields, an empty neuron list); the message names the field.
        """
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise CNAError(f"not a cna_lens circuit: expected a JSON object with format={FORMAT!r}")
        version = d.get("format_version")
        if isinstance(version, bool) or version != FORMAT_VERSION:
            raise CNAError(
                f"circuit format_version {version!r} is not "
                f"supported; this cna_lens reads version {FORMAT_VERSION}"
            )
        known = {"format", "format_version", "n_layers", "d_mlp", "neurons", "provenance"}
        unknown = sorted(str(k) for k in set(d) - known)
        if unknown:
            raise CNAError(f"unknown circuit keys {unknown}; valid: {sorted(known)}")
        for key in ("n_layers", "d_mlp", "neurons"):
            if key not in d:
                raise CNAError(f"malformed circuit data: missing field {key!r}")
        entries = d["neurons"]
        if not isinstance(entries, list):
            raise CNAError(
                f"malformed circuit data: neurons must be a JSON list of "
                f"{{layer, neuron, delta}} objects, got {type(entries).__name__} "
                f"{entries!r:.60}"
            )
        if not entries and not allow_empty:
            raise CNAError(
                "circuit has no neurons; an empty circuit steers nothing (pass "
                "allow_empty=True to accept one)"
            )
        required = {"layer", "neuron", "delta"}
        optional = {"mean_positive", "mean_negative"}
        neurons = []
        for i, e in enumerate(entries):
            if not isinstance(e, dict) or not required <= set(e) <= required | optional:
                raise CNAError(
                    f"malformed circuit data: neurons[{i}] must be an object with "
                    f"the keys layer, neuron, delta (and optionally mean_positive, "
                    f"mean_negative), got {e!r:.80}"
                )
            try:
                neurons.append(
                    Neuron(
                        e["layer"],
                        e["neuron"],
                        e["delta"],
                        e.get("mean_positive"),
                        e.get("mean_negative"),
                    )
                )
            except CNAError as exc:
                raise CNAError(f"malformed circuit data: neurons[{i}]: {exc}") from None
        provenance = Provenance.from_dict(d.get("provenance", {}))
        return cls(tuple(neurons), d["n_layers"], d["d_mlp"], provenance)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str, *, allow_empty: bool = False) -> Circuit:
        """Parse :meth:`to_json` output (see :meth:`from_dict`)."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CNAError(
                f"circuit file is not valid JSON (corrupt or truncated?): {exc}"
            ) from exc
        except RecursionError:
            raise CNAError("circuit file is not a circuit: its JSON is nested too deeply") from None
        return cls.from_dict(data, allow_empty=allow_empty)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the circuit as JSON, atomically (see :func:`cna_lens.io.atomic_write_text`).

        Raises:
            CNAError: the path is a directory or cannot be written.
        """
        return atomic_write_text(Path(path), self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike[str], *, allow_empty: bool = False) -> Circuit:
        """Read a circuit written by :meth:`save`.

        The file is UTF-8 JSON (a UTF-8 or UTF-16 byte-order mark is honoured).

        Raises:
            CNAError: the file is missing, a directory, unreadable, not UTF-8, corrupt,
                truncated, not a circuit, or empty (unless ``allow_empty``).
        """
        path = Path(path)
        text = read_text_file(path, "circuit file", writer="Circuit.save")
        try:
            return cls.from_json(text, allow_empty=allow_empty)
        except CNAError as exc:
            raise CNAError(f"{path}: {exc}") from exc

    @classmethod
    def from_pairs(
        cls,
        pairs: Iterable[tuple[int, int]],
        *,
        n_layers: int | None = None,
        d_mlp: int | None = None,
        provenance: Provenance | None = None,
        model: Any = None,
    ) -> Circuit:
        """A hand-made circuit from (layer, neuron) pairs (delta 0).

        With ``model``, ``n_layers`` and ``d_mlp`` default to the model's and the circuit
        records the model's id and fingerprint (see :meth:`for_model`); without it the
        fingerprint is unknown and :meth:`validate` refuses the circuit unless
        ``strict=False``.

        Raises:
            CNAError: a pair is not two integers, or the shape is missing or out of range.
        """
        if model is not None:
            n_layers = int(model.cfg.n_layers) if n_layers is None else n_layers
            d_mlp = int(model.cfg.d_mlp) if d_mlp is None else d_mlp
        if n_layers is None or d_mlp is None:
            raise CNAError("from_pairs needs n_layers and d_mlp, or model=")
        neurons = []
        for pair in pairs:
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise CNAError(f"pairs must hold (layer, neuron) pairs, got {pair!r}")
            neurons.append(Neuron(pair[0], pair[1]))
        circuit = cls(tuple(neurons), n_layers, d_mlp, provenance or Provenance())
        return circuit if model is None else circuit.for_model(model)


def _neuron_dict(n: Neuron) -> dict[str, Any]:
    """JSON entry of a neuron; the means only when known, so old readers see old files."""
    d: dict[str, Any] = {"layer": n.layer, "neuron": n.neuron, "delta": n.delta}
    for k in ("mean_positive", "mean_negative"):
        if getattr(n, k) is not None:
            d[k] = getattr(n, k)
    return d
