"""Hooks: apply a condition's operations to the bridge, and take them off again.

:func:`steer` multiplies each circuit neuron's activation by ``m`` at
``blocks.{L}.mlp.hook_post`` (``m = 0`` ablates, ``m = 1`` leaves the model bit-identical,
``m > 1`` amplifies), or applies another intervention (one :class:`~cna_lens.Steering`
value), with one hook per layer. :func:`hooked` does the same for any condition
(:mod:`cna_lens.steering.conditions`). Hooks are registered through TransformerLens hook
points by ``model.hooks``, which removes exactly the handles it added when the block exits,
exception or not.

Positions: an op with ``positions="prompt"`` or ``"generated"`` needs to know where a
sequence starts. A :class:`Clock` reads it off every forward pass of the model itself (a
pre-hook on the Hugging Face model inside the bridge): a pass without a KV cache, or with an
empty one, starts a new sequence at position 0, and its length is the prompt length; a pass
with a cache continues from the cache's length. So a context can be reused for any number of
generations or forward passes without a reset (``handle.reset()`` is kept and harmless).

Threads: hooks live on the model, so steering contexts are per model and not thread-safe.
Entering :func:`steer`, :func:`cna_lens.bake` or generation on a model while another thread
is inside one of them on the same model raises :class:`CNAError`; use one model per thread.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from cna_lens import _model_state
from cna_lens._validate import Integral, Real, check_int
from cna_lens.core.circuit import Circuit
from cna_lens.errors import CNAError
from cna_lens.steering.conditions import HookOp, condition_ops
from cna_lens.steering.interventions import Positions, Steering, as_steering

__all__ = ["Clock", "PositionOp", "SteeringHandle", "check_model", "hooked", "steer"]


def check_model(model: Any) -> None:
    """Refuse anything but a bridge from :func:`cna_lens.load_model`.

    Raises:
        CNAError: ``model`` has no hook points or no TransformerLens config.
    """
    if not hasattr(model, "hooks") or not hasattr(model, "cfg"):
        raise CNAError(
            f"model must be a TransformerBridge from cna_lens.load_model, got "
            f"{type(model).__name__}"
        )


class Clock:
    """Where the current forward pass starts in its sequence, and the prompt's length.

    :meth:`attach` adds a forward pre-hook to a Hugging Face model that sets
    :attr:`start` from the pass's KV cache (0 without one) and, at the start of a new
    sequence, :attr:`prompt_length` from its length (unless given).
    """

    def __init__(self, prompt_length: int | None = None):
        self.given = prompt_length
        self.start = 0
        self.prompt_length = prompt_length

    def reset(self) -> None:
        """Start a new sequence (what the next uncached forward pass does by itself)."""
        self.start = 0
        self.prompt_length = self.given

    def observe(self, start: int, length: int) -> None:
        """Record a forward pass of ``length`` positions from ``start``."""
        if start == 0:
            self.reset()
        if self.prompt_length is None:
            self.prompt_length = start + length
        self.start = start

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = args[0] if args else kwargs.get("input_ids")
        if ids is None:
            ids = kwargs.get("inputs_embeds")
            length = int(ids.shape[-2]) if ids is not None else 0
        else:
            length = int(ids.shape[-1])
        seq_length = getattr(kwargs.get("past_key_values"), "get_seq_length", None)
        start = int(seq_length()) if seq_length is not None else 0
        self.observe(start, length)

    @contextmanager
    def attach(self, hf_model: nn.Module) -> Iterator[Clock]:
        """Keep the clock on ``hf_model``'s forward passes inside the block."""
        handle = hf_model.register_forward_pre_hook(self._pre_hook, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()


class PositionOp:
    """A :class:`HookOp`'s function restricted to its positions (all, prompt, generated).

    The activation is never written in place: the op returns a new tensor, so a cache that
    captured ``act`` earlier in the same forward pass stays intact.
    """

    def __init__(self, op: HookOp, clock: Clock):
        self.fn = op.fn
        self.positions = op.positions
        self.prompt_length = op.prompt_length
        self.clock = clock

    def __call__(self, act: Tensor) -> Tensor:
        if self.positions == "all":
            return self.fn(act)
        start, n = self.clock.start, act.shape[-2]
        prompt = self.prompt_length or self.clock.prompt_length or start + n
        pos = torch.arange(start, start + n, device=act.device)
        selected = pos < prompt
        if self.positions == "generated":
            selected = ~selected
        if bool(selected.all()):
            return self.fn(act)
        if not bool(selected.any()):
            return act
        return torch.where(selected[:, None], self.fn(act), act)


def needs_clock(ops: Sequence[HookOp]) -> bool:
    """Whether any op depends on positions."""
    return any(op.positions != "all" for op in ops)


class SteeringHandle:
    """What :func:`steer` yields: the steering, and ``reset()`` (kept for old code: every
    new sequence resets the positions by itself)."""

    def __init__(self, steering: Steering | None, clock: Clock):
        self.steering = steering
        self._clock = clock

    def reset(self) -> None:
        """Start a new sequence (not needed: an uncached forward pass starts one)."""
        self._clock.reset()


@contextmanager
def hooked(model: Any, condition: Any, *, prompt_length: int | None = None) -> Iterator[Clock]:
    """Run the bridge under ``condition`` (any registered kind, or None) inside the block.

    Yields the :class:`Clock` that tracks positions. An identity condition registers no
    hook at all.

    Raises:
        CNAError: the condition does not fit the model, or the model is in use by another
            thread.
    """
    check_model(model)
    ops = condition_ops(model, condition)
    clock = Clock(prompt_length)

    def bridge_fn(fn: Callable[[Tensor], Tensor]) -> Callable[[Tensor, Any], Tensor]:
        return lambda act, hook: fn(act)

    fwd_hooks = [(op.hook, bridge_fn(PositionOp(op, clock))) for op in ops]
    with ExitStack() as stack:
        stack.enter_context(_model_state.hold(model, "a steering context"))
        if needs_clock(ops):
            stack.enter_context(clock.attach(model.original_model))
        # model.hooks() registers inside its try block and removes exactly the handles it
        # added in its finally block, so a failure half-way leaves no hook behind.
        stack.enter_context(model.hooks(fwd_hooks=fwd_hooks))
        yield clock


@contextmanager
def steer(
    model: Any,
    circuit: Circuit | Steering,
    multiplier: Real | None = None,
    *,
    negative_multiplier: Real | None = None,
    positions: Positions | str | None = None,
    prompt_length: Integral | None = None,
) -> Iterator[SteeringHandle]:
    """Steer the circuit's neurons inside the ``with`` block.

    ``steer(model, Steering(...))`` applies any intervention with sign selection;
    ``steer(model, circuit, m)`` scales the circuit by ``m`` (the paper's intervention).

    Args:
        model: A bridge from :func:`cna_lens.load_model`.
        circuit: A :class:`~cna_lens.Steering`, or the neurons to scale; validated
            against ``model``.
        multiplier: 0 ablates (default), 1 is the unchanged model, > 1 amplifies.
        negative_multiplier: Separate factor for neurons with delta < 0.
        positions: "all" (default), "prompt" or "generated". Each uncached forward pass
            starts a new sequence, so the context can be reused across generations.
        prompt_length: Number of prompt positions; default: the first forward pass.

    Steering contexts are per model and not thread-safe: entering ``steer`` (or ``bake`` /
    generation) on a model while another thread is inside one on the same model raises
    :class:`CNAError`. Nesting within one thread is fine.

    Raises:
        CNAError: not a circuit, a non-finite multiplier or one that overflows the model's
            dtype, bad ``prompt_length``, unknown ``positions``, intervention or sign, a
            Steering combined with the keyword form, an intervention the circuit lacks data
            for, or the model is in use by another thread.
        CircuitMismatchError: the circuit was made for another model (or has no
            fingerprint: see :meth:`Circuit.validate`).

    Example:
        >>> with steer(model, circuit, 0.0):  # doctest: +SKIP
        ...     logits = model(tokens)
        >>> with steer(model, Steering(circuit=circuit, intervention="mean",  # doctest: +SKIP
        ...                            multiplier=0.0, sign="positive")):
        ...     logits = model(tokens)
    """
    check_model(model)
    steering = as_steering(circuit, multiplier, negative_multiplier, positions)
    if prompt_length is not None:
        prompt_length = check_int("prompt_length", prompt_length, low=1)
    with hooked(model, steering, prompt_length=prompt_length) as clock:
        yield SteeringHandle(steering, clock)
