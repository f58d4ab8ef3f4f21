"""Activations: stream last-prompt-token MLP neuron activations and their statistics.

Prompts run through the model in left-padded batches; only ``blocks.{L}.mlp.hook_post``
is cached, and only at the last position (the last real prompt token of every row, since
padding is on the left). Per-neuron statistics (count, sum, sum of squares, in float64)
accumulate while streaming, so memory does not grow with the number of prompts, and two
statistics merge exactly (for sharded or distributed discovery).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Any

import einops
import torch
from jaxtyping import Float, Int
from torch import Tensor, nn
from tqdm.auto import tqdm

from cna_lens._validate import Integral, Real, check_bool, check_int, check_real
from cna_lens.errors import CNAError
from cna_lens.models.hf import hook_module, module_names, plain_model
from cna_lens.models.loading import (
    PromptList,
    TokenBatch,
    encode_prompts,
    mlp_hook_names,
    pad_id,
    tokenize_prompts,
)
from cna_lens.models.prefix import expand, positions, prefix_batches, run_prefix

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
    prefix_reuse: bool = True,
) -> Iterator[tuple[TokenBatch, Float[Tensor, "batch n_layers d_mlp"]]]:
    """Yield ``(batch, activations)`` at the last prompt token, one padded batch at a time.

    The activations are read at every layer's ``blocks.{L}.mlp.hook_post``, at the last
    position only, in the model's dtype, on its device. Rows follow ``batch.indices``
    (prompts are grouped by length). The forward pass stops right after the last layer's
    ``hook_post`` (the last down projection, the final norm and the unembedding, which CNA
    never reads, are not computed); the hooks are removed after every batch.

    Two paths, the same activations:

    * **Through the bridge** (prompts without a shared prefix, or ``prefix_reuse=False``):
      TransformerLens hooks at the hook points, and TransformerLens's
      ``StopAtLayerException`` (as ``run_with_cache(stop_at_layer=...)`` uses) to stop.
    * **With the shared prefix computed once** (``prefix_reuse``, when the formatted
      prompts share at least :data:`cna_lens.models.prefix.MIN_PREFIX` tokens, as a chat
      template's system turn makes them): a plain Hugging Face model that shares the
      bridge's weights runs the prefix once and every batch continues from its KV cache;
      each ``hook_post`` is read as the input of its down projection (the very tensor the
      bridge's hook point sees). Equal to the bridge path up to float rounding (about 1e-6
      relative in float32, see :mod:`cna_lens.models.prefix`).

    Raises:
        CNAError: invalid prompts, batch size, or a prompt longer than the context.
    """
    what = "prompts" if desc == "activations" else f"{desc} prompts"
    batch_size = check_int("batch_size", batch_size, low=1)
    batches: list[TokenBatch] = []
    if check_bool("prefix_reuse", prefix_reuse):
        encoded = encode_prompts(model, prompts, what=what)
        batches = prefix_batches(
            encoded, batch_size=batch_size, pad=pad_id(model), device=model.cfg.device
        )
    if not batches or not batches[0].prefix:
        batches = tokenize_prompts(model, prompts, batch_size=batch_size, what=what)
        reader: Callable[[TokenBatch], Tensor] = _BridgeReader(model)
    else:
        reader = _PrefixReader(model, batches[0].prefix)
    bar = tqdm(
        total=sum(len(b.indices) for b in batches),
        desc=desc,
        unit="prompt",
        disable=not progress,
        leave=False,
    )
    try:
        for batch in batches:
            acts = reader(batch)
            bar.update(len(batch.indices))
            yield batch, acts
    finally:
        bar.close()


class _Stop(Exception):
    """Raised in the last layer's hook: nothing after it is needed."""


class _Store:
    """The last-position activation of every layer of one pass."""

    def __init__(self, names: list[str]):
        self.names = names
        self.acts: list[Tensor | None] = [None] * len(names)

    def put(self, layer: int, act: Tensor) -> None:
        self.acts[layer] = act[:, -1].clone()  # a copy, so the full activation can be freed

    def stacked(self) -> Float[Tensor, "batch n_layers d_mlp"]:
        captured = [a for a in self.acts if a is not None]
        if len(captured) < len(self.names):
            missing = [self.names[i] for i, a in enumerate(self.acts) if a is None]
            raise CNAError(
                f"the forward pass never reached {missing[:3]}; "
                "cannot read MLP neuron activations there"
            )
        self.acts = [None] * len(self.names)
        return torch.stack(captured, dim=1)


class _BridgeReader:
    """Activations of a batch through the bridge's hook points."""

    def __init__(self, model: Any):
        from transformer_lens.model_bridge.exceptions import StopAtLayerException

        self.model = model
        self.store = _Store(mlp_hook_names(model))
        last = len(self.store.names) - 1

        def make_hook(layer: int) -> Callable[[Tensor, Any], None]:
            def hook(act: Tensor, hook: Any) -> None:
                self.store.put(layer, act)
                if layer == last:
                    raise StopAtLayerException(act)  # caught by the bridge's forward

            return hook

        self.hooks = [(name, make_hook(layer)) for layer, name in enumerate(self.store.names)]

    def __call__(self, batch: TokenBatch) -> Tensor:
        with torch.inference_mode(), self.model.hooks(fwd_hooks=self.hooks):
            self.model(batch.input_ids, attention_mask=batch.attention_mask, return_type=None)
        return self.store.stacked()


class _PrefixReader:
    """Activations of a batch continuing the shared prefix's KV cache, in a plain HF model
    sharing the bridge's weights (``hook_post`` read as the down projection's input)."""

    def __init__(self, model: Any, prefix: tuple[int, ...]):
        self.hf = plain_model(model.original_model, share=True)
        self.store = _Store(mlp_hook_names(model))
        names, modules = module_names(model), dict(self.hf.named_modules())
        self.targets: list[tuple[nn.Module, bool]] = []
        for name in self.store.names:
            module, side = hook_module(model, name)
            plain = modules.get(names.get(id(module), ""))
            if plain is None:
                raise CNAError(f"{name}: no matching module in the plain model")
            self.targets.append((plain, side == "post"))
        self.device = next(self.hf.parameters()).device
        self.cache = run_prefix(self.hf, prefix, 1, self.device)

    def __call__(self, batch: TokenBatch) -> Tensor:
        last = len(self.targets) - 1

        def make_hook(layer: int) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...], output: Any = None) -> None:
                act = args[0] if output is None else output
                self.store.put(layer, act[0] if isinstance(act, tuple) else act)
                if layer == last:
                    raise _Stop

            return hook

        ids, mask = batch.input_ids, batch.attention_mask
        with ExitStack() as stack, torch.inference_mode():
            for layer, (module, post) in enumerate(self.targets):
                hook = make_hook(layer)
                handle = (
                    module.register_forward_hook(hook)
                    if post
                    else module.register_forward_pre_hook(hook)
                )
                stack.callback(handle.remove)
            try:
                self.hf(
                    input_ids=ids,
                    attention_mask=mask,
                    position_ids=positions(mask, ids.shape[1]),
                    past_key_values=expand(self.cache, ids.shape[0]),
                    use_cache=True,
                    logits_to_keep=1,
                )
            except _Stop:
                pass
        return self.store.stacked()


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
    prefix_reuse: bool = True,
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
        prefix_reuse: Compute the prompts' shared prefix once (see :func:`iter_activations`).

    Returns:
        ``(stats, top_counts)``; ``top_counts`` is None unless ``top_fraction`` is given.
    """
    n_layers, d_mlp = int(model.cfg.n_layers), int(model.cfg.d_mlp)
    stats: NeuronStats | None = None
    counts: Tensor | None = None
    k = _top_fraction_k(n_layers * d_mlp, top_fraction) if top_fraction is not None else 0
    for _, acts in iter_activations(
        model,
        prompts,
        batch_size=batch_size,
        progress=progress,
        desc=desc,
        prefix_reuse=prefix_reuse,
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
