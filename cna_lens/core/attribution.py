"""Attribution: the contrast of mean neuron activations between a positive and a negative set.

``delta[l, j] = mean(a[l, j] | positive) - mean(a[l, j] | negative)``, computed from the
streamed statistics. Everything here after :func:`attribute` is a pure tensor function.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from cna_lens.core.activations import NeuronStats, activation_stats
from cna_lens.errors import CNAError
from cna_lens.models.loading import PromptList, validate_prompts

__all__ = ["Attribution", "attribute", "contrast"]


def contrast(positive: NeuronStats, negative: NeuronStats) -> Float[Tensor, "n_layers d_mlp"]:
    """``mean(positive) - mean(negative)`` per neuron, float64.

    Raises:
        CNAError: the two statistics have different shapes or one is empty.
    """
    if positive.shape != negative.shape:
        raise CNAError(
            f"positive statistics are {positive.shape} but negative are {negative.shape}; "
            "both must come from the same model"
        )
    return positive.mean - negative.mean.to(positive.total.device)


@dataclass(frozen=True)
class Attribution:
    """Per-neuron statistics of both prompt sets, and their contrast."""

    positive: NeuronStats
    negative: NeuronStats

    def __post_init__(self) -> None:
        contrast(self.positive, self.negative)  # validates shapes and non-emptiness

    @property
    def shape(self) -> tuple[int, int]:
        return self.positive.shape

    @property
    def delta(self) -> Float[Tensor, "n_layers d_mlp"]:
        """Mean difference, positive minus negative."""
        return contrast(self.positive, self.negative)

    @property
    def effect_size(self) -> Float[Tensor, "n_layers d_mlp"]:
        """Delta over the pooled standard deviation (Cohen's d); 0 where both sets are constant."""
        n_p, n_n = self.positive.count, self.negative.count
        dof = max(n_p + n_n - 2, 1)
        pooled = (
            (n_p - 1) * self.positive.var
            + (n_n - 1) * self.negative.var.to(self.positive.total.device)
        ) / dof
        sd = pooled.sqrt()
        d = self.delta
        return torch.where(sd > 0, d / sd.clamp_min(1e-30), torch.zeros_like(d))


def attribute(
    model: Any,
    positive: PromptList,
    negative: PromptList,
    *,
    batch_size: int = 32,
    progress: bool = False,
) -> Attribution:
    """Run both prompt sets through ``model`` and return their per-neuron statistics.

    Args:
        model: A bridge from :func:`cna_lens.load_model`.
        positive: Prompts showing the target behaviour (e.g. harmful requests).
        negative: Prompts showing its opposite (e.g. benign requests).
        batch_size: Prompts per forward pass.
        progress: Show progress bars.

    Raises:
        CNAError: an empty prompt set, a non-string prompt, or a prompt too long for the model.
    """
    positive = validate_prompts(positive, "positive prompts")
    negative = validate_prompts(negative, "negative prompts")
    pos, _ = activation_stats(
        model, positive, batch_size=batch_size, progress=progress, desc="positive"
    )
    neg, _ = activation_stats(
        model, negative, batch_size=batch_size, progress=progress, desc="negative"
    )
    return Attribution(pos, neg)
