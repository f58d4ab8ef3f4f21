"""Steering: change circuit neurons at ``blocks.{L}.mlp.hook_post`` and generate text.

``steer`` is a context manager that multiplies each circuit neuron's activation by ``m``
(``m = 0`` ablates, ``m = 1`` leaves the model bit-identical, ``m > 1`` amplifies), or
applies another intervention (:mod:`cna_lens.steering.interventions`, passed as one
:class:`~cna_lens.Steering` value), with one hook per layer, registered through
TransformerLens hook points and always removed when the context exits, exception or not. ``generate`` runs batched, left-padded,
KV-cached generation (greedy by default) under such a context and returns the texts.

Positions: with ``positions="prompt"`` or ``"generated"`` a hook counts the positions it
has seen since the start of a sequence. :func:`generate` starts a new sequence for every
batch it runs, and resets the counters of every steering context active on the model at
the start of each batch, including a context the caller opened around the call; so one
``generate`` call is correct however many batches it makes, and a context can be reused
across ``generate`` calls. Forward passes you run yourself continue the count: call
``handle.reset()`` between your own sequences.

Threads: hooks live on the model, so steering contexts are per model and not
thread-safe. Entering :func:`steer`, :func:`cna_lens.bake` or :func:`generate` on a model
while another thread is inside one of them on the same model raises :class:`CNAError`;
use one model per thread.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, get_args

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from cna_lens import _model_state
from cna_lens._validate import Integral, Real, check_int, check_real
from cna_lens.core.circuit import Circuit
from cna_lens.errors import CNAError
from cna_lens.models.loading import MLP_HOOK, PromptList, _pad_id, tokenize_prompts
from cna_lens.steering.interventions import Positions, Steering

__all__ = [
    "Positions",
    "Steering",
    "SteeringConfig",
    "generate",
    "generate_token_ids",
    "layer_scales",
    "steer",
]


def _check_multiplier(name: str, value: Any) -> float:
    return check_real(name, value)


def model_dtype(model: Any) -> torch.dtype:
    """The floating-point dtype the model computes in."""
    dtype = getattr(getattr(model, "cfg", None), "dtype", None)
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return next(model.parameters()).dtype
    except (AttributeError, StopIteration):
        return torch.float32


def check_fits_dtype(config: SteeringConfig, dtype: torch.dtype) -> None:
    """Refuse multipliers that are not finite in ``dtype`` (e.g. 1e5 in float16).

    Raises:
        CNAError: ``|multiplier|`` or ``|negative_multiplier|`` exceeds ``finfo(dtype).max``.
    """
    limit = torch.finfo(dtype).max
    for name, m in (
        ("multiplier", config.multiplier),
        ("negative_multiplier", config.negative_multiplier),
    ):
        if m is not None and abs(m) > limit:
            raise CNAError(
                f"{name}={m:g} overflows the model's dtype {dtype} (largest finite "
                f"value {limit:g}); choose |{name}| <= {limit:g}"
            )


def _check_circuit(circuit: Any) -> Circuit:
    if not isinstance(circuit, Circuit):
        raise CNAError(
            f"circuit must be a cna_lens Circuit (e.g. Circuit.load(path)), got "
            f"{type(circuit).__name__} {circuit!r:.60}"
        )
    return circuit


def _check_model(model: Any) -> None:
    if not hasattr(model, "hooks") or not hasattr(model, "cfg"):
        raise CNAError(
            f"model must be a TransformerBridge from cna_lens.load_model, got "
            f"{type(model).__name__}"
        )


@dataclass(frozen=True, kw_only=True)
class SteeringConfig:
    """How to scale a circuit.

    Attributes:
        multiplier: Factor for circuit neurons (for positive-delta neurons when
            ``negative_multiplier`` is set). 0 ablates, 1 is the unchanged model.
        negative_multiplier: Separate factor for neurons with delta < 0 (default: same).
        positions: "all" positions, only the "prompt" (the first forward pass of a
            generation), or only "generated" tokens (later, incremental decoding steps).
    """

    # __post_init__ checks and converts the fields (NumPy numbers included) with CNAError
    # messages; a runtime type checker checking __init__ first would pre-empt them.
    __no_type_check__ = True

    multiplier: float = 0.0
    negative_multiplier: float | None = None
    positions: Positions | str = "all"

    def __post_init__(self) -> None:
        object.__setattr__(self, "multiplier", _check_multiplier("multiplier", self.multiplier))
        if self.negative_multiplier is not None:
            object.__setattr__(
                self,
                "negative_multiplier",
                _check_multiplier("negative_multiplier", self.negative_multiplier),
            )
        if self.positions not in get_args(Positions):
            raise CNAError(
                f"positions must be one of {list(get_args(Positions))}, got {self.positions!r}"
            )

    @property
    def is_identity(self) -> bool:
        neg = self.multiplier if self.negative_multiplier is None else self.negative_multiplier
        return self.multiplier == 1.0 and neg == 1.0


def _make_config(
    multiplier: Real, negative_multiplier: Real | None, positions: Positions | str
) -> SteeringConfig:
    """A :class:`SteeringConfig` from multipliers of any real type, checked and converted here.

    Raises:
        CNAError: a multiplier that is not a finite real number, or unknown ``positions``.
    """
    return SteeringConfig(
        multiplier=_check_multiplier("multiplier", multiplier),
        negative_multiplier=None
        if negative_multiplier is None
        else _check_multiplier("negative_multiplier", negative_multiplier),
        positions=positions,
    )


def layer_scales(circuit: Circuit, config: SteeringConfig) -> dict[int, Float[Tensor, " d_mlp"]]:
    """Per steered layer, a float32 vector of ones with the circuit neurons' multipliers."""
    neg = config.multiplier if config.negative_multiplier is None else config.negative_multiplier
    scales: dict[int, Tensor] = {}
    for n in circuit:
        vec = scales.setdefault(n.layer, torch.ones(circuit.d_mlp, dtype=torch.float32))
        vec[n.neuron] = neg if n.delta < 0 else config.multiplier
    return scales


class _ScaleOp:
    """``act * scale`` with the scale moved to the activation's device/dtype once."""

    def __init__(self, scale: Tensor):
        self.scale_cpu = scale
        self._scale: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def __call__(self, act: Tensor) -> Tensor:
        key = (act.device, act.dtype)
        if key not in self._scale:
            self._scale[key] = self.scale_cpu.to(device=act.device, dtype=act.dtype)
        return act * self._scale[key]


class _LayerHook:
    """Applies one layer's op (an intervention, or a scale vector); tracks positions across
    incremental decoding calls.

    The activation is never written in place: the op returns a new tensor, so a cache
    that captured ``act`` earlier in the same forward pass stays intact. The op's index
    and value tensors are precomputed (:class:`cna_lens.steering.interventions.LayerOp`).
    """

    def __init__(
        self,
        op: Tensor | Callable[[Tensor], Tensor],
        positions: Positions | str,
        prompt_length: int | None,
    ):
        self.op = _ScaleOp(op) if isinstance(op, Tensor) else op
        self.positions = positions
        self.given_prompt_length = prompt_length
        self.prompt_length = prompt_length
        self.seen = 0

    def reset(self) -> None:
        """Start a new sequence: no position seen, the prompt length not yet known."""
        self.seen = 0
        self.prompt_length = self.given_prompt_length

    def __call__(self, act: Tensor, hook: Any) -> Tensor:
        if self.positions == "all":
            return self.op(act)
        start, n = self.seen, act.shape[-2]
        self.seen += n
        if self.prompt_length is None:
            self.prompt_length = n  # the first forward pass is the prompt
        pos = torch.arange(start, start + n, device=act.device)
        selected = pos < self.prompt_length
        if self.positions == "generated":
            selected = ~selected
        if bool(selected.all()):
            return self.op(act)
        if not bool(selected.any()):
            return act
        return torch.where(selected[:, None], self.op(act), act)


class SteeringHandle:
    """What ``steer`` yields: the config (and the full ``steering``), and ``reset()`` to
    start a new generation."""

    def __init__(
        self, config: SteeringConfig, hooks: list[_LayerHook], steering: Steering | None = None
    ):
        self.config = config
        self.steering = steering
        self._hooks = hooks

    def reset(self) -> None:
        """Forget the positions seen so far (call between generations for
        ``positions='prompt'``/``'generated'``)."""
        for h in self._hooks:
            h.reset()


# The steering contexts open on each model (of one thread: see _model_state), so that
# generate can start every batch as a new sequence. Nothing is patched onto the model.
_ACTIVE: weakref.WeakKeyDictionary[Any, list[SteeringHandle]] = weakref.WeakKeyDictionary()


def _reset_active(model: Any) -> None:
    try:
        handles = list(_ACTIVE.get(model, ()))
    except TypeError:
        return
    for handle in handles:
        handle.reset()


def as_steering(
    circuit: Any,
    multiplier: Any = None,
    negative_multiplier: Any = None,
    positions: Any = None,
) -> Steering:
    """A :class:`Steering` from either one, or a circuit and the old keyword arguments.

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
        circuit=_check_circuit(circuit),
        multiplier=0.0 if multiplier is None else multiplier,
        negative_multiplier=negative_multiplier,
        positions="all" if positions is None else positions,
    )


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
        positions: "all" (default), "prompt" or "generated" (see :class:`SteeringConfig`).
            "prompt"/"generated" count positions across incremental decoding calls, so
            wrap one generation per context (or call ``handle.reset()`` between them).
        prompt_length: Number of prompt positions; default: the first forward pass.

    Steering contexts are per model and not thread-safe: the hooks live on the model, so
    every thread running it is steered. Entering ``steer`` (or ``bake`` / ``generate``) on
    a model while another thread is inside one on the same model raises :class:`CNAError`;
    use one model per thread. Nesting within one thread is fine. ``generate`` inside the
    context resets the position counters at the start of each of its batches.

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
    _check_model(model)
    steering = as_steering(circuit, multiplier, negative_multiplier, positions)
    config = _make_config(steering.multiplier, steering.negative_multiplier, steering.positions)
    if prompt_length is not None:
        prompt_length = check_int("prompt_length", prompt_length, low=1)
    steering.circuit.validate(model)
    check_fits_dtype(config, model_dtype(model))
    hooks: list[_LayerHook] = []
    fwd_hooks = []
    # An identity steering (m = 1, or no neuron of the selected sign) registers no hook.
    for layer, op in steering.layer_ops().items():
        hook = _LayerHook(op, steering.positions, prompt_length)
        hooks.append(hook)
        fwd_hooks.append((MLP_HOOK.format(layer=layer), hook))
    # model.hooks() registers inside its try block and removes exactly the handles it added
    # in its finally block, so a failure half-way through adding or running leaves no hook.
    handle = SteeringHandle(config, hooks, steering)
    with _model_state.hold(model, "a steering context"), model.hooks(fwd_hooks=fwd_hooks):
        active = _ACTIVE.setdefault(model, [])
        active.append(handle)
        try:
            yield handle
        finally:
            active.remove(handle)


def _eos_ids(model: Any) -> list[int]:
    ids: list[int] = []
    gen_cfg = getattr(model.original_model, "generation_config", None)
    eos = getattr(gen_cfg, "eos_token_id", None)
    for candidate in (eos, model.tokenizer.eos_token_id):
        if candidate is None:
            continue
        for c in candidate if isinstance(candidate, (list, tuple)) else [candidate]:
            if int(c) not in ids:
                ids.append(int(c))
    return ids


def generate_token_ids(
    model: Any,
    prompts: PromptList,
    *,
    circuit: Circuit | None = None,
    multiplier: Real = 1.0,
    negative_multiplier: Real | None = None,
    positions: Positions | str = "all",
    steering: Steering | None = None,
    max_new_tokens: Integral = 64,
    batch_size: Integral = 16,
    do_sample: bool = False,
    temperature: Real = 1.0,
    top_p: Real | None = None,
    seed: Integral | None = None,
    progress: bool = False,
) -> list[list[int]]:
    """Generated token ids per prompt (new tokens only, up to and excluding EOS).

    See :func:`generate` for the arguments.
    """
    # Validate everything before any work.
    _check_model(model)
    max_new_tokens = check_int("max_new_tokens", max_new_tokens, low=1)
    config = _make_config(multiplier, negative_multiplier, positions)
    if not isinstance(do_sample, bool):
        raise CNAError(f"do_sample must be True or False, got {do_sample!r}")
    temperature = check_real("temperature", temperature, low=0.0, low_open=True)
    if top_p is not None:
        top_p = check_real("top_p", top_p, low=0.0, high=1.0, low_open=True)
    if seed is not None:
        seed = check_int("seed", seed, low=0)
    if steering is not None:
        if not isinstance(steering, Steering):
            raise CNAError(
                f"steering must be a cna_lens Steering, got "
                f"{type(steering).__name__} {steering!r:.60}"
            )
        if (
            circuit is not None
            or config.multiplier != 1.0
            or (config.negative_multiplier is not None)
            or config.positions != "all"
        ):
            raise CNAError(
                "pass either steering=Steering(...) or circuit=/multiplier=/"
                "negative_multiplier=/positions=, not both"
            )
    elif circuit is not None:
        steering = Steering(
            circuit=_check_circuit(circuit),
            multiplier=config.multiplier,
            negative_multiplier=config.negative_multiplier,
            positions=config.positions,
        )
    if steering is not None:
        steering.circuit.validate(model)
        check_fits_dtype(
            _make_config(steering.multiplier, steering.negative_multiplier, steering.positions),
            model_dtype(model),
        )
    batches = tokenize_prompts(model, prompts, batch_size=batch_size, max_new_tokens=max_new_tokens)
    eos = _eos_ids(model)
    pad = _pad_id(model)
    results: list[list[int]] = [[] for _ in range(sum(len(b.indices) for b in batches))]
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad, use_cache=True
    )
    if eos:
        kwargs["eos_token_id"] = eos
    if do_sample:
        kwargs["temperature"] = temperature
        if top_p is not None:
            kwargs["top_p"] = top_p
    else:
        kwargs.update(temperature=None, top_p=None, top_k=None)
    if seed is not None:
        torch.manual_seed(seed)
    bar = tqdm(
        total=len(results), desc="generate", unit="prompt", disable=not progress, leave=False
    )
    try:
        for batch in batches:
            ctx = steer_nothing(model) if steering is None else steer(model, steering)
            _reset_active(model)  # a new sequence for the caller's steering contexts too
            with ctx, torch.inference_mode():
                out = model.original_model.generate(
                    input_ids=batch.input_ids, attention_mask=batch.attention_mask, **kwargs
                )
            new = out[:, batch.input_ids.shape[1] :].tolist()
            for row, idx in enumerate(batch.indices):
                toks = new[row]
                cut = next((i for i, t in enumerate(toks) if t in eos), len(toks))
                results[idx] = toks[:cut]
            bar.update(len(batch.indices))
    finally:
        bar.close()
    return results


@contextmanager
def steer_nothing(model: Any) -> Iterator[None]:
    """A stand-in for :func:`steer` that steers nothing (but holds the model for this thread)."""
    with _model_state.hold(model, "generate"):
        yield None


def generate(
    model: Any,
    prompts: PromptList,
    *,
    circuit: Circuit | None = None,
    multiplier: Real = 1.0,
    negative_multiplier: Real | None = None,
    positions: Positions | str = "all",
    steering: Steering | None = None,
    max_new_tokens: Integral = 64,
    batch_size: Integral = 16,
    do_sample: bool = False,
    temperature: Real = 1.0,
    top_p: Real | None = None,
    seed: Integral | None = None,
    progress: bool = False,
) -> list[str]:
    """Generate a completion per prompt, optionally with the circuit scaled.

    Prompts are chat-formatted when the model has a chat template, batched with left
    padding, and decoded with a KV cache; greedy unless ``do_sample``.

    Args:
        model: A bridge from :func:`cna_lens.load_model`.
        prompts: Prompt texts.
        circuit: Neurons to scale (None: the unsteered model).
        multiplier: Scale for circuit neurons (0 ablates, 1 unchanged, > 1 amplifies).
        negative_multiplier: Separate scale for negative-delta neurons.
        positions: "all", "prompt" or "generated".
        steering: Instead of ``circuit``/``multiplier``/``negative_multiplier``/
            ``positions``, one :class:`~cna_lens.Steering` (any intervention, sign
            selection).
        max_new_tokens: Tokens to generate at most.
        batch_size: Prompts per batch.
        do_sample: Sample instead of greedy decoding.
        temperature: Sampling temperature.
        top_p: Nucleus sampling mass.
        seed: Seed for sampling.
        progress: Show a progress bar.

    Returns:
        The generated texts (new tokens only, special tokens removed), in prompt order.

    Raises:
        CNAError: bad prompts, circuit, multiplier, positions, lengths, sampling arguments
            (``temperature`` must be > 0, ``top_p`` in (0, 1], ``seed`` >= 0), or the model
            is in use by another thread.
        CircuitMismatchError: the circuit belongs to another model.
    """
    ids = generate_token_ids(
        model,
        prompts,
        circuit=circuit,
        multiplier=multiplier,
        negative_multiplier=negative_multiplier,
        positions=positions,
        steering=steering,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        do_sample=do_sample,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
        progress=progress,
    )
    tok = model.tokenizer
    return [tok.decode(t, skip_special_tokens=True).strip() for t in ids]
