"""Directional ablation: the abliteration baseline (Arditi et al. 2024), as one condition.

A refusal direction ``r`` is the difference of the mean residual stream at the last
prompt token between harmful and harmless prompts at one layer (the CAA vector of that
layer: :func:`cna_lens.steering.caa.compute_caa`), normalised. :class:`DirectionalAblation`
projects it out of **every write to the residual stream**: the token (and position)
embeddings and every attention and MLP output, at every position,

    x <- x - strength * (x . r) r

so at ``strength = 1`` the residual stream never has a component along ``r`` (up to float
rounding), and at ``strength = 0`` the model is bit-identical (``x - 0`` is ``x``). It is a
registered condition like any other: the bridge and the fast backend, generation, KL and
the evaluation engine all take it. Abliteration tools (heretic, ...) fold the same
projection into the weights; here it runs as hooks, which is the same function.

Architectures whose attention or MLP output is normalised again before it is added to the
residual stream (Gemma 2 and 3: ``post_attention_layernorm`` / ``post_feedforward_layernorm``)
write something other than the hook point's value; they are refused.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from cna_lens._validate import check_int, check_real
from cna_lens.errors import CNAError
from cna_lens.steering.caa import CAAVectors
from cna_lens.steering.conditions import HookOp, register_condition

__all__ = ["DirectionalAblation", "ProjectOut", "residual_writes"]

_POST_NORMS = ("post_feedforward_layernorm", "post_mlp_layernorm")


def residual_writes(model: Any) -> list[str]:
    """The hook points of every write to the residual stream: the embeddings, then each
    layer's attention and MLP outputs.

    Raises:
        CNAError: an architecture that normalises those outputs again before adding them
            (Gemma 2/3), or a model without the hook points.
    """
    layers = [b.original_component for b in model.blocks]
    if any(hasattr(layer, n) for layer in layers[:1] for n in _POST_NORMS):
        raise CNAError(
            f"{type(layers[0]).__name__} normalises its attention/MLP outputs before adding them "
            "to the residual stream, so its hook points are not the residual writes; "
            "directional ablation supports pre-norm models (Llama, Qwen2/3, Mistral, GPT-2)"
        )
    # Learned absolute position embeddings are added to the residual stream; rotary ones
    # (also exposed as hook_pos_embed, holding cos/sin tables) are not a residual write.
    learned = getattr(model.cfg, "positional_embedding_type", None) == "standard"
    names = ["hook_embed"] + (["hook_pos_embed"] if learned else [])
    for layer in range(int(model.cfg.n_layers)):
        names += [f"blocks.{layer}.hook_attn_out", f"blocks.{layer}.hook_mlp_out"]
    missing = [n for n in names if n not in model.hook_dict]
    if missing:
        raise CNAError(f"the model has no hook points {missing[:3]}; cannot ablate a direction")
    return names


class ProjectOut:
    """``act - strength * (act . r) r`` (a new tensor), ``r`` moved to the activation's
    device and dtype once."""

    def __init__(self, direction: Tensor, strength: float):
        self.direction = direction
        self.strength = strength
        self._cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def __call__(self, act: Tensor) -> Tensor:
        key = (act.device, act.dtype)
        if key not in self._cache:
            self._cache[key] = self.direction.to(device=act.device, dtype=act.dtype)
        r = self._cache[key]
        return act - self.strength * (act @ r)[..., None] * r


@dataclass(frozen=True)
class DirectionalAblation:
    """Project the refusal direction of ``layer`` out of every residual write.

    Attributes:
        vectors: Per-layer difference-of-means vectors (:func:`~cna_lens.compute_caa` of
            harmful vs harmless prompts).
        layer: Whose vector is the direction.
        strength: 1 removes the component; 0 changes nothing; other values scale it.

    Example:
        >>> vectors = compute_caa(model, harmful, harmless)  # doctest: +SKIP
        >>> generate(model, prompts, steering=DirectionalAblation(vectors, layer=12))  # doctest: +SKIP
    """

    # __post_init__ checks the fields with CNAError messages.
    __no_type_check__ = True

    vectors: CAAVectors
    layer: int
    strength: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.vectors, CAAVectors):
            raise CNAError(
                f"vectors must be CAAVectors (from compute_caa), got {type(self.vectors).__name__}"
            )
        object.__setattr__(
            self, "layer", check_int("layer", self.layer, low=0, high=self.vectors.n_layers - 1)
        )
        object.__setattr__(self, "strength", check_real("strength", self.strength))
        if float(self.vectors.vectors[self.layer].norm()) == 0.0:
            raise CNAError(f"the vector of layer {self.layer} is zero: no direction to ablate")

    @property
    def direction(self) -> Tensor:
        """The unit direction (float32)."""
        v = self.vectors.vectors[self.layer].to(torch.float32)
        return v / v.norm()


def _ops(model: Any, ablation: DirectionalAblation) -> list[HookOp]:
    d_model = int(model.cfg.d_model)
    if ablation.vectors.d_model != d_model:
        raise CNAError(
            f"the direction has {ablation.vectors.d_model} dimensions, the model d_model={d_model}"
        )
    fn = ProjectOut(ablation.direction, ablation.strength)
    return [HookOp(name, fn) for name in residual_writes(model)]


def _key(ablation: DirectionalAblation) -> tuple[Any, ...]:
    digest = hashlib.sha256(ablation.direction.numpy().tobytes()).hexdigest()[:16]
    return ("ablate", digest, ablation.strength)


register_condition(
    DirectionalAblation,
    ops=_ops,
    key=_key,
    describe=lambda a: f"ablate direction of layer {a.layer} x{a.strength:g}",
)
