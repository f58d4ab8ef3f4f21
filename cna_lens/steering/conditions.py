"""Conditions: what the model runs under, as values, and the hook operations each one means.

A *condition* is ``None`` (the unsteered model), a :class:`~cna_lens.Steering` (circuit
neurons at ``blocks.{L}.mlp.hook_post``), a :class:`~cna_lens.steering.caa.CAA` (a vector
added to ``blocks.{L}.hook_resid_post``), or any kind registered with
:func:`register_condition`. Every consumer (the ``steer`` context on the bridge, both
generation backends, the evaluation engine, KL scoring) asks a condition for the same
thing: a list of :class:`HookOp`, each a TransformerLens hook name and an out-of-place
function of the activation there. A new kind of intervention is therefore one value class
and one ``ops`` function; nothing else changes.

Contract: a condition that changes nothing returns no ops (the model runs unhooked, so it
is bit-identical), and its :func:`condition_key` is ``("identity",)``; two conditions with
one key do the same thing, so the engine generates them once.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from cna_lens._registry import Registry
from cna_lens.errors import CNAError
from cna_lens.models.loading import MLP_HOOK
from cna_lens.steering.interventions import Positions, Steering, check_fits_dtype, model_dtype

__all__ = [
    "IDENTITY",
    "ConditionKind",
    "HookOp",
    "condition_key",
    "condition_kind",
    "condition_ops",
    "describe_condition",
    "is_identity",
    "register_condition",
]

IDENTITY: tuple[str] = ("identity",)
"""The key of every condition that leaves the model unchanged."""


@dataclass(frozen=True)
class HookOp:
    """One change a condition makes: ``fn(act) -> new act`` at the hook point ``hook``.

    Attributes:
        hook: A TransformerLens hook name (``blocks.3.mlp.hook_post``, ...).
        fn: Returns a *new* tensor (never writes ``act`` in place).
        positions: "all", only the "prompt" (positions before the prompt's end) or only
            "generated" tokens.
        prompt_length: Prompt positions, when known in advance (default: the first
            forward pass of each sequence is the prompt).
    """

    hook: str
    fn: Callable[[Tensor], Tensor]
    positions: Positions | str = "all"
    prompt_length: int | None = None


@dataclass(frozen=True)
class ConditionKind:
    """A registered kind of condition: its value class and what it means.

    Attributes:
        name: The kind's name (its class name).
        cls: The value class (conditions are matched with ``isinstance``).
        ops: ``ops(model, condition) -> list[HookOp]``; validates the condition against
            the model (raising :class:`CNAError`) before any forward pass.
        key: ``key(condition) -> hashable``, :data:`IDENTITY` for a no-op.
        describe: A short human-readable label (progress bars, tables).
    """

    name: str
    cls: type
    ops: Callable[[Any, Any], list[HookOp]]
    key: Callable[[Any], Hashable]
    describe: Callable[[Any], str]


_KINDS: Registry[ConditionKind] = Registry(
    "condition kind", "cna_lens.steering.register_condition(cls, ops=..., key=...)"
)


def register_condition(
    cls: type,
    *,
    ops: Callable[[Any, Any], list[HookOp]],
    key: Callable[[Any], Hashable],
    describe: Callable[[Any], str] = repr,
    overwrite: bool = False,
) -> ConditionKind:
    """Register a condition class (see :class:`ConditionKind` for the two functions).

    Raises:
        CNAError: ``cls`` is not a class, or is registered already (unless ``overwrite``).
    """
    if not isinstance(cls, type):
        raise CNAError(f"register_condition needs a class, got {cls!r}")
    kind = ConditionKind(cls.__name__, cls, ops, key, describe)
    return _KINDS.add(cls.__name__, kind, overwrite=overwrite)


def condition_kind(condition: Any) -> ConditionKind:
    """The registered kind of ``condition``.

    Raises:
        CNAError: not a registered kind (the message lists them).
    """
    for kind in _KINDS.values():
        if isinstance(condition, kind.cls):
            return kind
    raise CNAError(
        f"not a condition: {type(condition).__name__} {condition!r:.60}; a condition is None "
        f"(unsteered) or one of {sorted(_KINDS)} (register others with "
        "cna_lens.steering.register_condition)"
    )


def condition_ops(model: Any, condition: Any) -> list[HookOp]:
    """The hook operations of ``condition`` on ``model`` (checked against it); [] for None."""
    if condition is None:
        return []
    return condition_kind(condition).ops(model, condition)


def condition_key(condition: Any) -> Hashable:
    """What ``condition`` does, as a hashable value (:data:`IDENTITY` for no change)."""
    if condition is None:
        return IDENTITY
    return condition_kind(condition).key(condition)


def is_identity(condition: Any) -> bool:
    """True when ``condition`` leaves the model unchanged."""
    return condition_key(condition) == IDENTITY


def describe_condition(condition: Any) -> str:
    """A short label: "unsteered", or the kind's description."""
    if is_identity(condition):
        return "unsteered"
    return condition_kind(condition).describe(condition)


# ----------------------------------------------------------------------------- Steering
def _steering_ops(model: Any, steering: Steering) -> list[HookOp]:
    steering.circuit.validate(model)
    check_fits_dtype(steering, model_dtype(model))
    return [
        HookOp(MLP_HOOK.format(layer=layer), op, steering.positions)
        for layer, op in steering.layer_ops().items()
    ]


def _describe_steering(s: Steering) -> str:
    neg = "" if s.negative_multiplier is None else f"/{s.negative_multiplier:g}"
    return f"{s.intervention} m={s.multiplier:g}{neg} {s.sign} k={len(s.circuit)}"


register_condition(Steering, ops=_steering_ops, key=lambda s: s.key, describe=_describe_steering)
