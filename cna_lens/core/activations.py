"""Activations: stream last-prompt-token MLP neuron activations and their statistics.

Prompts run through the model in left-padded batches; only ``blocks.{L}.mlp.hook_post``
is cached, and only at the last position (the last real prompt token of every row, since
padding is on the left). Per-neuron statistics (count, sum, sum of squares, in float64)
accumulate while streaming, so memory does not grow with the number of prompts, and two
statistics merge exactly (for sharded or distributed discovery).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor
from tqdm.auto import tqdm

from cna_lens._validate import Integral, Real, check_real
from cna_lens.errors import CNAError
from cna_lens.models.loading import PromptList, TokenBatch, mlp_hook_names, tokenize_prompts

__all__ = [
    "NeuronStats",
    "activation_stats",
    "iter_activations",
]


def iter_activations(
    model: Any,
    prompts: PromptList,
    *,
    batch_size: Integral = 32,
    progress: bool = False,
    desc: str = "activations",
) -> Iterator[tuple[TokenBatch, Float[Tensor, "batch n_layers d_mlp"]]]:
    """Yield ``(batch, activations)`` at the last prompt token, one padded batch at a time.

    The activations are read with TransformerLens hooks at every layer's
    ``blocks.{L}.mlp.hook_post``, at the last position only, in the model's dtype, on its
    device. Rows follow ``batch.indices`` (prompts are grouped by length). The forward pass
    stops right after the last layer's ``hook_post`` (TransformerLens's
    ``StopAtLayerException``, as ``run_with_cache(stop_at_layer=...)`` uses), so the last
    down projection, the final norm and the unembedding, which CNA never reads, are not
    computed; the hooks are removed after every batch.

    Raises:
        CNAError: invalid prompts, batch size, or a prompt longer than the context.
    """
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    names = mlp_hook_names(model)
    what = "prompts" if desc == "activations" else f"{desc} prompts"
    batches = tokenize_prompts(model, prompts, batch_size=batch_size, what=what)
    last = len(names) - 1
    store: list[Tensor | None] = [None] * len(names)

    def make_hook(layer: int):
        def hook(act: Tensor, hook: Any) -> None:
            store[layer] = act[:, -1].clone()  # a copy, so the full activation can be freed
            if layer == last:
                raise StopAtLayerException(act)  # caught by the bridge's forward

        return hook

    fwd_hooks = [(name, make_hook(layer)) for layer, name in enumerate(names)]
    bar = tqdm(
        total=sum(len(b.indices) for b in batches),
        desc=desc,
        unit="prompt",
        disable=not progress,
        leave=False,
    )
    try:
        for batch in batches:
            store[:] = [None] * len(names)
            with torch.inference_mode(), model.hooks(fwd_hooks=fwd_hooks):
                model(batch.input_ids, attention_mask=batch.attention_mask, return_type=None)
            captured = [a for a in store if a is not None]
            if len(captured) < len(names):
                missing = [names[i] for i, a in enumerate(store) if a is None]
                raise CNAError(
                    f"the forward pass never reached {missing[:3]}; "
                    "cannot read MLP neuron activations there"
                )
            acts = torch.stack(captured, dim=1)
            bar.update(len(batch.indices))
            yield batch, acts
    finally:
        bar.close()


@dataclass(frozen=True)
class NeuronStats:
    """Streaming per-neuron statistics of activations over a prompt set (float64).

    ``count`` prompts were seen; ``total`` and ``total_sq`` are the per-neuron sums of the
    activations and of their squares. Statistics of disjoint prompt sets add exactly
    (``a.merge(b)``), which is what sharded discovery relies on.
    """

    count: int
    total: Float[Tensor, "n_layers d_mlp"]
    total_sq: Float[Tensor, "n_layers d_mlp"]

    def __post_init__(self) -> None:
        if self.count < 0:
            raise CNAError(f"count must be >= 0, got {self.count}")
        if self.total.shape != self.total_sq.shape or self.total.ndim != 2:
            raise CNAError(
                f"total {tuple(self.total.shape)} and total_sq {tuple(self.total_sq.shape)} "
                "must both be [n_layers, d_mlp]"
            )

    @classmethod
    def zeros(cls, n_layers: int, d_mlp: int, device: torch.device | str = "cpu") -> NeuronStats:
        z = torch.zeros(n_layers, d_mlp, dtype=torch.float64, device=device)
        return cls(0, z, z.clone())

    @classmethod
    def of(cls, acts: Float[Tensor, "batch n_layers d_mlp"]) -> NeuronStats:
        """Statistics of one batch of activations."""
        a = acts.to(torch.float64)
        return cls(int(a.shape[0]), a.sum(0), (a * a).sum(0))

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.total.shape[0]), int(self.total.shape[1]))

    def merge(self, other: NeuronStats) -> NeuronStats:
        """Statistics of the union of the two (disjoint) prompt sets."""
        if self.shape != other.shape:
            raise CNAError(f"cannot merge statistics of shapes {self.shape} and {other.shape}")
        other_total = other.total.to(self.total.device)
        other_sq = other.total_sq.to(self.total.device)
        return NeuronStats(
            self.count + other.count, self.total + other_total, self.total_sq + other_sq
        )

    @property
    def mean(self) -> Float[Tensor, "n_layers d_mlp"]:
        if self.count == 0:
            raise CNAError("no prompts were seen; the mean of an empty set is undefined")
        return self.total / self.count

    @property
    def var(self) -> Float[Tensor, "n_layers d_mlp"]:
        """Unbiased sample variance (0 for a single prompt)."""
        mean = self.mean
        if self.count < 2:
            return torch.zeros_like(mean)
        return ((self.total_sq - self.count * mean * mean) / (self.count - 1)).clamp_min(0.0)

    def to(self, device: torch.device | str) -> NeuronStats:
        return NeuronStats(self.count, self.total.to(device), self.total_sq.to(device))

    def to_dict(self) -> dict[str, Any]:
        return {
            "count": self.count,
            "total": self.total.tolist(),
            "total_sq": self.total_sq.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> NeuronStats:
        return cls(
            int(d["count"]),
            torch.tensor(d["total"], dtype=torch.float64),
            torch.tensor(d["total_sq"], dtype=torch.float64),
        )


def _top_fraction_k(n_total: int, fraction: Real) -> int:
    fraction = check_real("top_fraction", fraction, low=0.0, high=1.0, low_open=True)
    return max(1, round(fraction * n_total))


def activation_stats(
    model: Any,
    prompts: PromptList,
    *,
    batch_size: Integral = 32,
    progress: bool = False,
    desc: str = "activations",
    top_fraction: Real | None = None,
) -> tuple[NeuronStats, Int[Tensor, "n_layers d_mlp"] | None]:
    """Accumulate last-token activation statistics over ``prompts``.

    Args:
        model: A bridge from :func:`cna_lens.load_model`.
        prompts: Prompt texts.
        batch_size: Prompts per forward pass.
        progress: Show a tqdm progress bar.
        desc: Progress bar label.
        top_fraction: If given, also count per neuron how many prompts put it in their top
            ``top_fraction`` of all neurons by |activation| (the universal-neuron test).

    Returns:
        ``(stats, top_counts)``; ``top_counts`` is None unless ``top_fraction`` is given.
    """
    n_layers, d_mlp = int(model.cfg.n_layers), int(model.cfg.d_mlp)
    stats: NeuronStats | None = None
    counts: Tensor | None = None
    k = _top_fraction_k(n_layers * d_mlp, top_fraction) if top_fraction is not None else 0
    for _, acts in iter_activations(
        model, prompts, batch_size=batch_size, progress=progress, desc=desc
    ):
        batch_stats = NeuronStats.of(acts)
        stats = batch_stats if stats is None else stats.merge(batch_stats)
        if top_fraction is not None:
            flat = einops.rearrange(acts.abs().float(), "b l n -> b (l n)")
            top = flat.topk(k, dim=1).indices.flatten()
            if counts is None:
                counts = torch.zeros(n_layers * d_mlp, dtype=torch.long, device=acts.device)
            counts.index_add_(0, top, torch.ones_like(top))
    assert stats is not None  # validate_prompts guarantees at least one prompt
    if counts is not None:
        counts = counts.view(n_layers, d_mlp)
    return stats, counts
