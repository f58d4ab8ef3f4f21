"""Interventions: what a steering hook does to the selected circuit neurons, as one value.

An intervention is a function ``(act, params) -> new_act`` applied to the activations of
one layer's selected neurons at ``blocks.{L}.mlp.hook_post``: ``act`` is
``Float[Tensor, "... k"]`` (the ``k`` selected neurons of that layer, at every position)
and ``params`` a :class:`LayerParams` holding, for those neurons, their multiplier, delta
and set means, already on ``act``'s device and in its dtype. Two ship (steering-vectors
style operators):

* ``"scale"`` — ``act * m`` (the paper): 0 ablates, 1 leaves it, > 1 amplifies.
* ``"mean"`` — ``mean_neg + m * (act - mean_neg)``: ``m = 0`` replaces the activation by
  its mean on the negative (e.g. benign) discovery set, ``m = 1`` leaves it, ``m > 1``
  pushes it away from that mean. Needs each neuron's ``mean_negative``, which
  :func:`cna_lens.discover` records (circuits from older versions lack it).

Contract: every intervention is the identity at ``m = 1``. Neurons whose multiplier is
exactly 1 are therefore never touched, and a :class:`Steering` that steers no neuron
registers no hook at all, so the model stays bit-identical for *every* intervention
(``mean`` at ``m = 1`` would otherwise round: ``mu + 1 * (a - mu)`` need not equal ``a``).

:class:`Steering` is the whole steering decision as one frozen, JSON-serialisable value:
circuit, intervention, multiplier, negative_multiplier, sign selection (steer the
``"positive"``-delta neurons, the ``"negative"``-delta ones, or ``"both"``) and positions.
:func:`cna_lens.steer` and :func:`cna_lens.generate` take it.

Add an intervention by writing one function and registering it::

    def shift(act, p):  # add (m - 1) * delta: m = 0 removes the contrast on average
        return act + (p.multiplier - 1) * p.delta

    register_intervention("shift", shift)
    steer(model, Steering(circuit=circuit, intervention="shift", multiplier=0.0))
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from jaxtyping import Float, Int
from torch import Tensor

from cna_lens._registry import Registry
from cna_lens._validate import Real, check_choice, check_real
from cna_lens.core.circuit import Circuit, Neuron
from cna_lens.errors import CNAError
from cna_lens.io import atomic_write_text, read_text_file

__all__ = [
    "BAKEABLE",
    "as_steering",
    "check_circuit",
    "check_fits_dtype",
    "check_strength",
    "model_dtype",
    "INTERVENTIONS",
    "Intervention",
    "LayerOp",
    "LayerParams",
    "Positions",
    "Sign",
    "Steering",
    "get_intervention",
    "mean_intervention",
    "register_intervention",
    "scale_intervention",
]

Positions = Literal["all", "prompt", "generated"]
Sign = Literal["both", "positive", "negative"]

BAKEABLE: tuple[str, ...] = ("scale",)
"""Interventions :func:`cna_lens.bake` can fold into down-projection weights (column scaling).
``"mean"`` would need a bias term on the down projection, which most modern MLPs
(Llama, Qwen, Gemma) do not have; it is refused rather than approximated."""

NEURON_FIELDS = ("delta", "mean_positive", "mean_negative")

STEERING_FORMAT = "cna_lens.steering"
"""The ``format`` field of a saved steering."""


@dataclass(frozen=True)
class LayerParams:
    """Per-neuron values of one layer's selected neurons (index order), for an intervention.

    ``mean_positive``/``mean_negative`` are None when the circuit does not record them
    (an intervention that needs them declares it with ``requires=``).
    """

    index: Int[Tensor, " k"]
    multiplier: Float[Tensor, " k"]
    delta: Float[Tensor, " k"]
    mean_positive: Float[Tensor, " k"] | None = None
    mean_negative: Float[Tensor, " k"] | None = None

    def to(self, device: torch.device | str, dtype: torch.dtype) -> LayerParams:
        """A copy with the index on ``device`` and the values in ``dtype`` there."""

        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device=device, dtype=dtype)

        return LayerParams(
            self.index.to(device),
            self.multiplier.to(device=device, dtype=dtype),
            self.delta.to(device=device, dtype=dtype),
            move(self.mean_positive),
            move(self.mean_negative),
        )


InterventionFn = Callable[[Tensor, LayerParams], Tensor]
"""``(act: Float[Tensor, "... k"], params: LayerParams) -> Float[Tensor, "... k"]``."""


@dataclass(frozen=True)
class Intervention:
    """A registered intervention: its function and the neuron fields it needs."""

    name: str
    fn: InterventionFn
    requires: tuple[str, ...] = ()


def scale_intervention(act: Tensor, p: LayerParams) -> Tensor:
    """``act * m`` (the paper's intervention)."""
    return act * p.multiplier


def mean_intervention(act: Tensor, p: LayerParams) -> Tensor:
    """``mean_neg + m * (act - mean_neg)``: m = 0 sets the negative-set mean."""
    assert p.mean_negative is not None  # guaranteed by requires=("mean_negative",)
    return p.mean_negative + p.multiplier * (act - p.mean_negative)


_REGISTRY: Registry[Intervention] = Registry(
    "intervention",
    "cna_lens.register_intervention(name, fn)",
    [
        ("scale", Intervention("scale", scale_intervention)),
        ("mean", Intervention("mean", mean_intervention, ("mean_negative",))),
    ],
)
INTERVENTIONS = _REGISTRY.view
"""Registered interventions by name (read-only view; add with :func:`register_intervention`)."""


def register_intervention(
    name: str, fn: InterventionFn, *, requires: Sequence[str] = (), overwrite: bool = False
) -> Intervention:
    """Register ``fn(act, params) -> new_act`` as the intervention ``name``.

    ``fn`` must be the identity at multiplier 1 (neurons at 1 are skipped anyway) and must
    not modify ``act`` in place. ``requires`` names the :class:`~cna_lens.Neuron` fields
    it reads that may be unknown (``"mean_positive"``, ``"mean_negative"``); steering a
    circuit that lacks them is refused with a clear message.

    Raises:
        CNAError: empty name, ``fn`` not callable, unknown ``requires`` field, or a taken
            name (unless ``overwrite``).
    """
    if not callable(fn):
        raise CNAError(f"intervention {name!r} must be callable (act, params) -> act, got {fn!r}")
    bad = [r for r in requires if r not in NEURON_FIELDS]
    if bad:
        raise CNAError(
            f"intervention {name!r} requires unknown neuron fields {bad}; valid: "
            f"{list(NEURON_FIELDS)}"
        )
    return _REGISTRY.add(name, Intervention(name, fn, tuple(requires)), overwrite=overwrite)


def get_intervention(name: str) -> Intervention:
    """The registered intervention ``name``.

    Raises:
        CNAError: unknown name (the message lists the registered ones).
    """
    return _REGISTRY.lookup(name)


class LayerOp:
    """What a hook applies to one layer's activation ``[..., d_mlp]``.

    Index and value tensors are built once (CPU, float64) when the op is made and moved
    to an activation's device and dtype once per (device, dtype), then reused; the call
    gathers the selected neurons, applies the intervention, and returns a *new* tensor
    (``index_copy``, out of place), so the input and any cache holding it stay intact.
    """

    def __init__(self, intervention: Intervention, params: LayerParams):
        self.intervention = intervention
        self.params = params
        self._moved: dict[tuple[torch.device, torch.dtype], LayerParams] = {}

    def params_for(self, act: Tensor) -> LayerParams:
        key = (act.device, act.dtype)
        if key not in self._moved:
            self._moved[key] = self.params.to(act.device, act.dtype)
        return self._moved[key]

    def __call__(self, act: Float[Tensor, "... d_mlp"]) -> Float[Tensor, "... d_mlp"]:
        p = self.params_for(act)
        new = self.intervention.fn(act.index_select(-1, p.index), p)
        if new.shape != act.shape[:-1] + p.index.shape:
            raise CNAError(
                f"intervention {self.intervention.name!r} returned shape "
                f"{list(new.shape)} for input {list(act.shape[:-1]) + [len(p.index)]}"
            )
        return act.index_copy(-1, p.index, new.to(act.dtype))


@dataclass(frozen=True, kw_only=True)
class Steering:
    """One steering decision: which neurons, what to do to them, how strongly, where.

    Attributes:
        circuit: The neurons (validated against the model when used).
        intervention: A name in :data:`INTERVENTIONS` (``"scale"``, ``"mean"``, ...).
        multiplier: ``m`` for the steered neurons (positive-delta ones when
            ``negative_multiplier`` is set). 1 is always the unchanged model.
        negative_multiplier: Separate ``m`` for neurons with delta < 0 (default: same).
        sign: Steer ``"both"`` signs, only ``"positive"`` (delta > 0) or only
            ``"negative"`` (delta < 0) neurons; the others are left untouched. With
            ``"both"``, neurons with delta == 0 (hand-made circuits) count as positive.
        positions: "all" positions, only the "prompt" (the first forward pass of a
            generation), or only "generated" tokens.

    Example:
        >>> c = Circuit((Neuron(0, 1, 0.5), Neuron(1, 2, -0.3)), n_layers=2, d_mlp=4)
        >>> s = Steering(circuit=c, multiplier=0.0, sign="positive")
        >>> [(n.label, m) for n, m in s.steered()]
        [('L0N1', 0.0)]
    """

    # __post_init__ checks and converts the fields (NumPy numbers included) with CNAError
    # messages; a runtime type checker checking __init__ first would pre-empt them.
    __no_type_check__ = True

    circuit: Circuit
    intervention: str = "scale"
    multiplier: Real = 0.0
    negative_multiplier: Real | None = None
    sign: Sign | str = "both"
    positions: Positions | str = "all"
    _steered: tuple[tuple[Neuron, float], ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.circuit, Circuit):
            raise CNAError(f"circuit must be a Circuit, got {type(self.circuit).__name__}")
        entry = get_intervention(self.intervention)
        multiplier, negative = check_strength(
            self.multiplier, self.negative_multiplier, self.positions
        )
        object.__setattr__(self, "multiplier", multiplier)
        object.__setattr__(self, "negative_multiplier", negative)
        check_choice("sign", self.sign, get_args(Sign))
        neg = self.multiplier if self.negative_multiplier is None else self.negative_multiplier
        steered = []
        for n in self.circuit:
            if (self.sign == "positive" and n.delta <= 0) or (
                self.sign == "negative" and n.delta >= 0
            ):
                continue
            m = neg if n.delta < 0 else self.multiplier
            if m != 1.0:
                steered.append((n, m))
        for n, _ in steered:
            missing = [r for r in entry.requires if getattr(n, r) is None]
            if missing:
                raise CNAError(
                    f"intervention {self.intervention!r} needs each neuron's {missing[0]}, "
                    f"but circuit neuron {n.label} has none (a hand-made circuit or a file "
                    "from an older cna_lens); rediscover the circuit with this version "
                    "(cna_lens.discover records the set means), or use intervention='scale'"
                )
        object.__setattr__(self, "_steered", tuple(steered))

    # ---- views -------------------------------------------------------------------------
    def steered(self) -> list[tuple[Neuron, float]]:
        """The neurons this steering changes, in circuit order, with their multipliers.

        Neurons outside the sign selection and neurons at multiplier 1 are left out.
        """
        return list(self._steered)

    @property
    def is_identity(self) -> bool:
        """True when no neuron is changed (the model runs unhooked, bit-identical)."""
        return not self._steered

    @property
    def key(self) -> tuple[Any, ...]:
        """What the steering does, as a hashable value: two steerings with one key change
        the same neurons the same way (all identities share ``("identity",)``)."""
        if self.is_identity:
            return ("identity",)
        changes = tuple((n.layer, n.neuron, m) for n, m in self._steered)
        return ("steering", self.intervention, self.positions, changes)

    def layer_params(self) -> dict[int, LayerParams]:
        """Per steered layer, the index and value tensors (CPU, float64, index order)."""
        by_layer: dict[int, list[tuple[Neuron, float]]] = {}
        for n, m in sorted(self._steered, key=lambda nm: (nm[0].layer, nm[0].neuron)):
            by_layer.setdefault(n.layer, []).append((n, m))
        out = {}
        for layer, entries in sorted(by_layer.items()):

            def vec(values: list[float | None]) -> Tensor | None:
                if any(v is None for v in values):
                    return None
                return torch.tensor(values, dtype=torch.float64)

            out[layer] = LayerParams(
                index=torch.tensor([n.neuron for n, _ in entries], dtype=torch.long),
                multiplier=torch.tensor([m for _, m in entries], dtype=torch.float64),
                delta=torch.tensor([n.delta for n, _ in entries], dtype=torch.float64),
                mean_positive=vec([n.mean_positive for n, _ in entries]),
                mean_negative=vec([n.mean_negative for n, _ in entries]),
            )
        return out

    def layer_ops(self) -> dict[int, LayerOp]:
        """Per steered layer, the op its hook applies (precomputed once)."""
        entry = get_intervention(self.intervention)
        return {layer: LayerOp(entry, p) for layer, p in self.layer_params().items()}

    def scale_vectors(self) -> dict[int, Float[Tensor, " d_mlp"]]:
        """For a bakeable steering: per layer, float32 ones with the multipliers (for baking).

        Raises:
            CNAError: the intervention cannot be baked, or positions are not "all".
        """
        if self.intervention not in BAKEABLE:
            raise CNAError(
                f"intervention {self.intervention!r} cannot be baked into weights; only "
                f"{list(BAKEABLE)} fold into the down-projection weights (column scaling). "
                "Steer with hooks instead (cna_lens.steer / cna_lens.generate)"
            )
        if self.positions != "all":
            raise CNAError(
                f"only positions='all' can be baked (weights do not know "
                f"positions), got positions={self.positions!r}"
            )
        out: dict[int, Tensor] = {}
        for n, m in self._steered:
            out.setdefault(n.layer, torch.ones(self.circuit.d_mlp, dtype=torch.float32))
            out[n.layer][n.neuron] = m
        return out

    # ---- JSON and files ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": STEERING_FORMAT,
            "format_version": 1,
            "circuit": self.circuit.to_dict(),
            "intervention": self.intervention,
            "multiplier": self.multiplier,
            "negative_multiplier": self.negative_multiplier,
            "sign": self.sign,
            "positions": self.positions,
        }

    @classmethod
    def from_dict(cls, d: Any) -> Steering:
        """Build a steering from :meth:`to_dict` output (``format`` may be absent, as in
        files of cna_lens 0.1).

        Raises:
            CNAError: not a mapping, missing circuit, another format, unknown keys, or
                invalid values.
        """
        keys = {"circuit", "intervention", "multiplier", "negative_multiplier", "sign", "positions"}
        if not isinstance(d, dict) or "circuit" not in d:
            raise CNAError("not a cna_lens steering: expected a JSON object with a 'circuit'")
        d = dict(d)
        fmt, version = d.pop("format", STEERING_FORMAT), d.pop("format_version", 1)
        if fmt != STEERING_FORMAT or version != 1:
            raise CNAError(
                f"not a cna_lens steering of format version 1: format={fmt!r}, "
                f"format_version={version!r}"
            )
        unknown = sorted(set(d) - keys)
        if unknown:
            raise CNAError(f"unknown steering keys {unknown}; valid: {sorted(keys)}")
        rest = {k: v for k, v in d.items() if k != "circuit"}
        return cls(circuit=Circuit.from_dict(d["circuit"]), **rest)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> Steering:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CNAError(f"steering is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the steering (with its circuit and the circuit's provenance) as JSON,
        atomically; :meth:`load`, ``cna-lens generate --steering FILE`` and
        ``cl.generate(..., steering=FILE)`` read it.

        Raises:
            CNAError: the path is a directory or cannot be written.
        """
        return atomic_write_text(Path(path), self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Steering:
        """Read a steering written by :meth:`save`.

        Raises:
            CNAError: the file is missing, unreadable, not JSON, or not a steering.
        """
        text = read_text_file(path, "steering file", writer="Steering.save")
        try:
            return cls.from_json(text)
        except CNAError as exc:
            raise CNAError(f"{path}: {exc}") from exc


def check_strength(
    multiplier: Any, negative_multiplier: Any, positions: Any
) -> tuple[float, float | None]:
    """The multipliers as floats, once ``positions`` is known to be valid.

    Raises:
        CNAError: a multiplier that is not a finite real number, or unknown ``positions``.
    """
    m = check_real("multiplier", multiplier)
    neg = (
        None
        if negative_multiplier is None
        else check_real("negative_multiplier", negative_multiplier)
    )
    check_choice("positions", positions, get_args(Positions))
    return m, neg


def check_circuit(circuit: Any) -> Circuit:
    """``circuit`` if it is a :class:`Circuit`.

    Raises:
        CNAError: otherwise (the message says how to get one).
    """
    if not isinstance(circuit, Circuit):
        raise CNAError(
            f"circuit must be a cna_lens Circuit (e.g. Circuit.load(path)), got "
            f"{type(circuit).__name__} {circuit!r:.60}"
        )
    return circuit


def as_steering(
    circuit: Any,
    multiplier: Any = None,
    negative_multiplier: Any = None,
    positions: Any = None,
) -> Steering:
    """A :class:`Steering` from either one, or a circuit and the keyword form's arguments.

    The arguments are typed ``Any`` because this function checks them itself (``circuit``
    must be a :class:`Circuit` or a :class:`Steering`), with CNAError messages.

    Raises:
        CNAError: not a circuit or a Steering, or a Steering together with
            multiplier/negative_multiplier/positions.
    """
    if isinstance(circuit, Steering):
        given = [
            name
            for name, v in (
                ("multiplier", multiplier),
                ("negative_multiplier", negative_multiplier),
                ("positions", positions),
            )
            if v is not None
        ]
        if given:
            raise CNAError(
                f"pass either a Steering or a circuit with {given}, not both; set "
                "them on the Steering (dataclasses.replace(steering, ...))"
            )
        return circuit
    return Steering(
        circuit=check_circuit(circuit),
        multiplier=0.0 if multiplier is None else multiplier,
        negative_multiplier=negative_multiplier,
        positions="all" if positions is None else positions,
    )


def model_dtype(model: Any) -> torch.dtype:
    """The floating-point dtype the model computes in."""
    dtype = getattr(getattr(model, "cfg", None), "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return next(model.parameters()).dtype
    except (AttributeError, StopIteration):
        return torch.float32


def check_fits_dtype(steering: Steering, dtype: torch.dtype) -> None:
    """Refuse multipliers that are not finite in ``dtype`` (e.g. 1e5 in float16).

    Raises:
        CNAError: ``|multiplier|`` or ``|negative_multiplier|`` exceeds ``finfo(dtype).max``.
    """
    limit = torch.finfo(dtype).max
    for name, m in (
        ("multiplier", steering.multiplier),
        ("negative_multiplier", steering.negative_multiplier),
    ):
        if m is not None and abs(float(m)) > limit:
            raise CNAError(
                f"{name}={m:g} overflows the model's dtype {dtype} (largest finite "
                f"value {limit:g}); choose |{name}| <= {limit:g}"
            )
