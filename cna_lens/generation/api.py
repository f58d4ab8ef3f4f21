"""Generation: one entry point over conditions, two backends with the same token ids.

:func:`generate_many` generates prompts under several conditions (each ``None``, a
:class:`~cna_lens.Steering`, a :class:`~cna_lens.CAA` or any registered kind) and returns
:class:`~cna_lens.generation.decoding.Generations` (token ids, texts, seconds per
condition). Conditions that do the same thing (every identity, repeated steerings) are
generated once. :func:`generate` is the one-condition form that returns texts, with the
paper's keyword form (``circuit=``, ``multiplier=``) as a convenience.

Backends: ``"bridge"`` (the reference: HF ``generate`` on the hooked TransformerBridge,
greedy or sampled) and ``"fast"`` (a plain HF model sharing the bridge's weights, several
conditions side by side, greedy; the same ids, tested). Pass a name, or an open backend
from :func:`open_backend` to reuse it across calls.

Prompts are chat-formatted when the model has a chat template, batched with left padding
(grouped by length) and decoded with a KV cache.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

from cna_lens._progress import Progress
from cna_lens._validate import Integral, Real, check_choice
from cna_lens.core.circuit import Circuit
from cna_lens.errors import CNAError
from cna_lens.generation.bridge import BridgeBackend
from cna_lens.generation.decoding import Decoding, Generations
from cna_lens.generation.fast import FastBackend
from cna_lens.models.loading import PromptList
from cna_lens.steering.conditions import condition_key, condition_kind
from cna_lens.steering.hooks import check_model
from cna_lens.steering.interventions import Positions, Steering, check_circuit, check_strength

__all__ = [
    "BACKENDS",
    "Backend",
    "generate",
    "generate_many",
    "generate_token_ids",
    "open_backend",
    "resolve_condition",
]

BACKENDS: tuple[str, ...] = ("bridge", "fast")
BackendName = Literal["bridge", "fast"]
Backend = BridgeBackend | FastBackend


def open_backend(model: Any, backend: BackendName | str = "bridge", **options: Any) -> Backend:
    """An open backend for ``model`` (use it as a context manager, or ``close()`` it).

    Args:
        model: A bridge from :func:`cna_lens.load_model`.
        backend: "bridge" or "fast".
        **options: For "fast": ``compact``, ``min_rows``, ``max_rows``.

    Raises:
        CNAError: an unknown backend, or options the backend does not take.
    """
    check_model(model)
    check_choice("backend", backend, BACKENDS)
    if backend == "fast":
        return FastBackend(model, **options)
    if options:
        raise CNAError(f"the bridge backend takes no options, got {sorted(options)}")
    return BridgeBackend(model)


def _decoding(decoding: Decoding | None, options: dict[str, Any]) -> Decoding:
    if decoding is not None and options:
        raise CNAError(
            f"pass either decoding=Decoding(...) or its fields as keywords, not both "
            f"(got decoding and {sorted(options)})"
        )
    if decoding is not None:
        if not isinstance(decoding, Decoding):
            raise CNAError(f"decoding must be a Decoding, got {type(decoding).__name__}")
        return decoding
    known = set(Decoding.__dataclass_fields__)
    unknown = sorted(set(options) - known)
    if unknown:
        raise CNAError(f"unknown generation options {unknown}; valid: {sorted(known)}")
    return Decoding(**options)


def resolve_condition(condition: Any) -> Any:
    """A condition value from a condition, None, or a path to a saved steering (JSON).

    Raises:
        CNAError: not a registered condition kind, or an unreadable steering file.
    """
    if isinstance(condition, (str, os.PathLike)):
        return Steering.load(condition)
    if condition is not None:
        condition_kind(condition)  # unknown kinds fail here, listing the valid ones
    return condition


def generate_many(
    model: Any,
    prompts: PromptList,
    conditions: Sequence[Any],
    *,
    decoding: Decoding | None = None,
    backend: BackendName | str | Backend = "bridge",
    progress: bool | Progress = False,
    **decoding_options: Any,
) -> Generations:
    """Generate ``prompts`` under every condition.

    Args:
        model: A bridge from :func:`cna_lens.load_model`.
        prompts: Prompt texts.
        conditions: Each None (unsteered), a Steering, a CAA, any registered kind, or a
            path to a saved steering; equal conditions are generated once.
        decoding: Length, batching and sampling (default ``Decoding()``); or its fields as
            keywords (``max_new_tokens=``, ``batch_size=``, ...).
        backend: "bridge" (default, the reference), "fast", or an open backend.
        progress: Show a progress bar (or advance the caller's :class:`Progress`).

    Returns:
        Token ids, texts and seconds per condition, in the order given.

    Raises:
        CNAError: bad prompts, conditions, decoding options or backend; a circuit of
            another model (``CircuitMismatchError``); the model in use by another thread.
    """
    check_model(model)
    dec = _decoding(decoding, decoding_options)
    conds = tuple(resolve_condition(c) for c in conditions)
    if not conds:
        raise CNAError("no conditions to generate; pass at least one (None is the unsteered model)")
    distinct: dict[Any, Any] = {}
    for c in conds:
        distinct.setdefault(condition_key(c), c)
    opened = open_backend(model, backend) if isinstance(backend, str) else backend
    try:
        batches = opened.prepare(prompts, dec)
    except BaseException:
        if opened is not backend:
            opened.close()
        raise
    units = len(distinct) * len(batches)
    bar = (
        progress
        if isinstance(progress, Progress)
        else Progress(units, "generate", enabled=bool(progress))
    )
    try:
        ids, seconds = opened.run(batches, list(distinct.values()), dec, on_pass=bar.advance)
    finally:
        if bar is not progress:
            bar.close()
        if opened is not backend:
            opened.close()
    index = {key: i for i, key in enumerate(distinct)}
    tok = model.tokenizer
    texts = [[tok.decode(t, skip_special_tokens=True).strip() for t in rows] for rows in ids]
    order = [index[condition_key(c)] for c in conds]
    seen: set[int] = set()
    shares = []
    for i in order:  # a repeated condition costs nothing
        shares.append(0.0 if i in seen else seconds[i])
        seen.add(i)
    return Generations(
        conditions=conds,
        token_ids=[ids[i] for i in order],
        texts=[texts[i] for i in order],
        seconds=shares,
    )


def _single(
    circuit: Any, multiplier: Any, negative_multiplier: Any, positions: Any, steering: Any
) -> Any:
    """The one condition of :func:`generate`'s arguments."""
    if steering is not None:
        if (
            circuit is not None
            or multiplier != 1.0
            or negative_multiplier is not None
            or (positions != "all")
        ):
            raise CNAError(
                "pass either steering=... or circuit=/multiplier=/negative_multiplier=/"
                "positions=, not both"
            )
        return steering
    if circuit is None:
        check_strength(multiplier, negative_multiplier, positions)  # checked, as always
        return None
    return Steering(
        circuit=check_circuit(circuit),
        multiplier=multiplier,
        negative_multiplier=negative_multiplier,
        positions=positions,
    )


def _one(model: Any, prompts: PromptList, args: dict[str, Any]) -> Generations:
    """:func:`generate_many` of the one condition in :func:`generate`'s arguments."""
    condition = _single(
        args["circuit"],
        args["multiplier"],
        args["negative_multiplier"],
        args["positions"],
        args["steering"],
    )
    options = dict(args["sampling"])
    for name in ("max_new_tokens", "batch_size"):
        if args[name] is not None:
            options[name] = args[name]
    return generate_many(
        model,
        prompts,
        [condition],
        decoding=args["decoding"],
        backend=args["backend"],
        progress=args["progress"],
        **options,
    )


def generate_token_ids(
    model: Any,
    prompts: PromptList,
    *,
    steering: Any = None,
    circuit: Circuit | None = None,
    multiplier: Real = 1.0,
    negative_multiplier: Real | None = None,
    positions: Positions | str = "all",
    backend: BackendName | str | Backend = "bridge",
    decoding: Decoding | None = None,
    max_new_tokens: Integral | None = None,
    batch_size: Integral | None = None,
    progress: bool = False,
    **sampling: Any,
) -> list[list[int]]:
    """Generated token ids per prompt (new tokens only, up to and excluding EOS).

    See :func:`generate` for the arguments.
    """
    return _one(model, prompts, locals()).token_ids[0]


def generate(
    model: Any,
    prompts: PromptList,
    *,
    steering: Any = None,
    circuit: Circuit | None = None,
    multiplier: Real = 1.0,
    negative_multiplier: Real | None = None,
    positions: Positions | str = "all",
    backend: BackendName | str | Backend = "bridge",
    decoding: Decoding | None = None,
    max_new_tokens: Integral | None = None,
    batch_size: Integral | None = None,
    progress: bool = False,
    **sampling: Any,
) -> list[str]:
    """Generate a completion per prompt, unsteered or under one condition.

    Args:
        model: A bridge from :func:`cna_lens.load_model`.
        prompts: Prompt texts.
        steering: The condition: a :class:`~cna_lens.Steering` (any intervention, sign
            selection, positions), a :class:`~cna_lens.CAA`, any registered kind, or the
            path of a steering file (:meth:`Steering.save`). None: the unsteered model.
        circuit: Instead of ``steering``, the neurons to scale (the paper's form) ...
        multiplier: ... by this factor (0 ablates, 1 unchanged, > 1 amplifies) ...
        negative_multiplier: ... and negative-delta neurons by this one (default: same) ...
        positions: ... at "all" positions, only the "prompt" or only "generated" tokens.
        backend: "bridge" (default, the reference), "fast" (greedy only), or an open
            backend from :func:`open_backend`.
        decoding: A :class:`~cna_lens.Decoding`; or its fields as keywords:
            ``max_new_tokens`` (64), ``batch_size`` (16), ``do_sample``, ``temperature``,
            ``top_p``, ``seed``.
        max_new_tokens: Tokens to generate at most.
        batch_size: Prompts per batch.
        progress: Show a progress bar.

    Returns:
        The generated texts (new tokens only, special tokens removed), in prompt order.

    Raises:
        CNAError: bad prompts, circuit, multiplier, positions, lengths, sampling arguments
            (``temperature`` must be > 0, ``top_p`` in (0, 1], ``seed`` >= 0), both a
            steering and the keyword form, or the model is in use by another thread.
        CircuitMismatchError: the circuit belongs to another model.
    """
    return _one(model, prompts, locals()).texts[0]
