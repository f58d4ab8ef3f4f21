"""CAA: the contrastive activation addition baseline that CNA is compared against.

The CAA vector of layer ``L`` is the mean difference of residual-stream activations
``blocks.{L}.hook_resid_post`` at the last prompt token, positive minus negative,
streamed batch by batch like :mod:`cna_lens.core.activations`. Steering adds
``alpha * vector`` to the residual stream at every position of the chosen layers
(``alpha = 0`` installs no hook: the model is bit-identical; ``alpha < 0`` pushes away from
the positive behaviour, ``alpha > 0`` towards it).

Default layer set: **one middle layer**, ``n_layers // 2``. The paper's public code could
not be consulted when this was written; a single middle layer is the usual CAA choice
(Rimsky et al. steer one layer around the middle of the network), so this is *our* choice,
not a claim about the paper's. Pass ``layers=`` to steer others.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor
from tqdm.auto import tqdm

from cna_lens._validate import Integral, check_layer_set, check_real
from cna_lens.errors import CNAError
from cna_lens.models.loading import tokenize_prompts, validate_prompts
from cna_lens.steering.conditions import IDENTITY, HookOp, register_condition
from cna_lens.steering.hooks import hooked

__all__ = [
    "CAA",
    "RESID_HOOK",
    "CAAVectors",
    "caa_steer",
    "compute_caa",
    "default_caa_layers",
    "residual_means",
]

RESID_HOOK = "blocks.{layer}.hook_resid_post"


def default_caa_layers(n_layers: int) -> tuple[int, ...]:
    """The default CAA layer set: the single middle layer ``n_layers // 2`` (our choice)."""
    if n_layers < 1:
        raise CNAError(f"n_layers must be >= 1, got {n_layers}")
    return (n_layers // 2,)


def _resid_names(model: Any) -> list[str]:
    names = [RESID_HOOK.format(layer=layer) for layer in range(int(model.cfg.n_layers))]
    missing = [n for n in names if n not in model.hook_dict]
    if missing:
        raise CNAError(
            f"model has no residual-stream hook at {missing[:3]}; CAA needs "
            "blocks.{L}.hook_resid_post at every layer"
        )
    return names


def residual_means(
    model: Any,
    prompts: Sequence[str],
    *,
    batch_size: Integral = 32,
    progress: bool = False,
    desc: str = "residual",
) -> Float[Tensor, "n_layers d_model"]:
    """Mean last-prompt-token residual stream (``hook_resid_post``) per layer, float64, CPU.

    Streams left-padded batches (the last column is every prompt's last token) and keeps
    only a running sum, so memory does not grow with the number of prompts.

    Raises:
        CNAError: bad prompts, batch size, or a model without residual hooks.
    """
    prompts = validate_prompts(prompts)
    names = _resid_names(model)
    total: Tensor | None = None
    batches = tokenize_prompts(model, prompts, batch_size=batch_size)
    bar = tqdm(total=len(prompts), desc=desc, unit="prompt", disable=not progress, leave=False)
    try:
        for batch in batches:
            with torch.inference_mode():
                _, cache = model.run_with_cache(
                    batch.input_ids,
                    attention_mask=batch.attention_mask,
                    names_filter=names,
                    pos_slice=-1,
                    return_type=None,
                )
            acts = torch.stack([cache[n][:, -1] for n in names], dim=1).to(torch.float64)
            part = acts.sum(0).cpu()
            total = part if total is None else total + part
            bar.update(len(batch.indices))
    finally:
        bar.close()
    assert total is not None
    return total / len(prompts)


@dataclass(frozen=True)
class CAAVectors:
    """Per-layer CAA vectors: mean residual (positive) minus mean residual (negative)."""

    vectors: Float[Tensor, "n_layers d_model"]
    n_positive: int
    n_negative: int

    def __post_init__(self) -> None:
        if self.vectors.ndim != 2:
            raise CNAError(f"vectors must be [n_layers, d_model], got {tuple(self.vectors.shape)}")
        if not torch.isfinite(self.vectors).all():
            raise CNAError("CAA vectors have NaN or infinite entries")

    @property
    def n_layers(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.vectors.shape[1])

    def norms(self) -> list[float]:
        """L2 norm of each layer's vector."""
        return [float(x) for x in self.vectors.norm(dim=1)]


def compute_caa(
    model: Any,
    positive: Sequence[str],
    negative: Sequence[str],
    *,
    batch_size: Integral = 32,
    progress: bool = False,
) -> CAAVectors:
    """The CAA vectors of every layer from two prompt sets.

    Args:
        model: A bridge from :func:`cna_lens.load_model`.
        positive: Prompts of the target behaviour (e.g. harmful requests).
        negative: Prompts of its opposite.
        batch_size: Prompts per forward pass.
        progress: Show progress bars.

    Raises:
        CNAError: bad prompt sets.
    """
    positive = validate_prompts(positive, "positive prompts")
    negative = validate_prompts(negative, "negative prompts")
    pos = residual_means(
        model, positive, batch_size=batch_size, progress=progress, desc="caa positive"
    )
    neg = residual_means(
        model, negative, batch_size=batch_size, progress=progress, desc="caa negative"
    )
    return CAAVectors((pos - neg).to(torch.float32), len(positive), len(negative))


class AddOp:
    """Returns ``act + alpha * vector`` (a new tensor; the activation is never written in
    place), with the scaled vector moved to the activation's device and dtype once."""

    def __init__(self, vector: Tensor, alpha: float):
        self.vector_cpu = vector
        self.alpha = alpha
        self._cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def __call__(self, act: Tensor) -> Tensor:
        key = (act.device, act.dtype)
        if key not in self._cache:
            self._cache[key] = (self.alpha * self.vector_cpu.to(torch.float32)).to(
                device=act.device, dtype=act.dtype
            )
        return act + self._cache[key]


@dataclass(frozen=True)
class CAA:
    """A CAA condition: add ``alpha * vectors[L]`` to ``blocks.{L}.hook_resid_post`` at every
    position of ``layers`` (default: the middle layer). ``alpha = 0`` changes nothing.

    Example:
        >>> generate(model, prompts, steering=CAA(vectors, -1.0))  # doctest: +SKIP
    """

    # __post_init__ checks the fields with CNAError messages (a runtime type checker
    # checking __init__ first would pre-empt them).
    __no_type_check__ = True

    vectors: CAAVectors
    alpha: float
    layers: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.vectors, CAAVectors):
            raise CNAError(
                f"vectors must be CAAVectors (from compute_caa), got {type(self.vectors).__name__}"
            )
        object.__setattr__(self, "alpha", check_real("alpha", self.alpha))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(int(x) for x in self.layers))

    def chosen_layers(self, model: Any) -> tuple[int, ...]:
        """The layers steered on ``model`` (checked against its shape).

        Raises:
            CNAError: vectors of another shape, or layers out of range.
        """
        shape = (int(model.cfg.n_layers), int(model.cfg.d_model))
        if (self.vectors.n_layers, self.vectors.d_model) != shape:
            raise CNAError(
                f"CAA vectors are [{self.vectors.n_layers}, {self.vectors.d_model}] but the "
                f"model has n_layers={shape[0]}, d_model={shape[1]}"
            )
        if self.layers is None:
            return default_caa_layers(shape[0])
        return check_layer_set(self.layers, shape[0], hint=" to steer")


def _caa_ops(model: Any, caa: CAA) -> list[HookOp]:
    chosen = caa.chosen_layers(model)
    names = _resid_names(model)
    if caa.alpha == 0.0:
        return []
    return [HookOp(names[layer], AddOp(caa.vectors.vectors[layer], caa.alpha)) for layer in chosen]


def _caa_key(caa: CAA) -> tuple[Any, ...]:
    if caa.alpha == 0.0:
        return IDENTITY
    digest = hashlib.sha256(caa.vectors.vectors.numpy().tobytes()).hexdigest()[:16]
    return ("caa", digest, caa.alpha, caa.layers)


register_condition(CAA, ops=_caa_ops, key=_caa_key, describe=lambda c: f"CAA alpha={c.alpha:g}")


@contextmanager
def caa_steer(
    model: Any,
    caa: CAAVectors,
    alpha: float,
    *,
    layers: Sequence[int] | None = None,
) -> Iterator[tuple[int, ...]]:
    """Add ``alpha * caa.vectors[L]`` to ``blocks.{L}.hook_resid_post`` inside the block.

    Every position is steered (prompt and generated tokens). ``alpha = 0`` installs no
    hook. Hooks go through ``model.hooks``, which removes exactly the handles it added when
    the block exits, exception or not.

    Args:
        model: A bridge from :func:`cna_lens.load_model`.
        caa: Vectors from :func:`compute_caa` for this model.
        alpha: Strength (0: unchanged; negative: away from the positive set).
        layers: Layers to steer (default: :func:`default_caa_layers`).

    Yields:
        The steered layers.

    Raises:
        CNAError: non-finite alpha, layers out of range, or vectors of another shape.

    Example:
        >>> with caa_steer(model, vectors, -1.0):  # doctest: +SKIP
        ...     logits = model(tokens)
    """
    condition = CAA(caa, alpha, None if layers is None else tuple(layers))
    with hooked(model, condition):
        yield condition.chosen_layers(model)
