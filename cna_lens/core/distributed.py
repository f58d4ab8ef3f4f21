"""Distributed discovery: shard the prompts over processes, all-reduce the statistics.

Discovery only needs per-neuron sums (count, sum, sum of squares, and the universal
filter's top counts), and sums of disjoint prompt sets add. So each process runs a share
of the prompts and one ``all_reduce(SUM)`` per statistic gives every process the
statistics of the whole set, from which it selects the same circuit as a single process.

Every process is given the *same full* prompt lists. The prompts are tokenized and batched
exactly as a single process would batch them (:func:`cna_lens.tokenize_prompts`, grouped
by length), and the batches are dealt round-robin to the ranks (:func:`shard_prompts`). Each
batch therefore has the same padded shape and yields the same activations as in a single
process; only the order in which the float64 batch sums are added differs (relative
differences around 1e-16). Top counts are integers and reduce exactly.

The caller owns the process group (``torch.distributed.init_process_group``: ``gloo`` on
CPU, ``nccl`` on GPUs, one model per process). Statistics are reduced on the device they
live on (the model's), so with NCCL every process's model must sit on its own GPU. To
shard one *large* model over several GPUs instead, use
``load_model(path, device_map="auto")`` or ``load_model(path, n_devices=N)`` in a single
process; ``dtype="bfloat16"`` halves memory, and statistics still accumulate in float64.

Example (run with ``torchrun --nproc-per-node 4 script.py``):
    >>> import torch.distributed as dist  # doctest: +SKIP
    >>> dist.init_process_group("gloo")  # doctest: +SKIP
    >>> model = load_model(path, device="cpu")  # doctest: +SKIP
    >>> circuit = discover_distributed(model, harmful, benign).circuit  # doctest: +SKIP
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
import torch.distributed as dist
from jaxtyping import Int
from torch import Tensor

from cna_lens._validate import Integral, Real
from cna_lens.core.activations import NeuronStats, activation_stats
from cna_lens.core.discovery import Discovery, DiscoveryConfig, discover_with
from cna_lens.errors import CNAError
from cna_lens.models.loading import (
    PromptList,
    tokenize_prompts,
    validate_prompts,
)

__all__ = [
    "activation_stats_distributed",
    "all_reduce_counts",
    "all_reduce_stats",
    "discover_distributed",
    "shard_prompts",
]


def _rank_world(group: Any, rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is None or world_size is None:
        if not (dist.is_available() and dist.is_initialized()):
            raise CNAError(
                "torch.distributed is not initialised; call "
                "torch.distributed.init_process_group first, or pass rank and "
                "world_size"
            )
        rank = dist.get_rank(group) if rank is None else rank
        world_size = dist.get_world_size(group) if world_size is None else world_size
    if world_size < 1 or not 0 <= rank < world_size:
        raise CNAError(f"rank must be in [0, world_size); got rank={rank}, world_size={world_size}")
    return rank, world_size


def shard_prompts(
    model: Any,
    prompts: PromptList,
    *,
    batch_size: Integral,
    rank: int | None = None,
    world_size: int | None = None,
    group: Any = None,
) -> list[str]:
    """The prompts that ``rank`` runs: whole single-process batches, dealt round-robin.

    The returned prompts, batched again by :func:`cna_lens.tokenize_prompts` with the same
    ``batch_size``, form exactly the batches ``rank, rank + world_size, ...`` of the full
    set, so the activations match a single process. A rank may get no prompts.

    Args:
        model: A bridge from :func:`cna_lens.load_model` (for its tokenizer).
        prompts: The full prompt list (the same on every rank).
        batch_size: Prompts per forward pass.
        rank, world_size: This process's place (default: from the process group).
        group: The process group (default: the world).

    Raises:
        CNAError: invalid prompts or batch size, or no process group and no rank given.
    """
    rank, world_size = _rank_world(group, rank, world_size)
    prompts = validate_prompts(prompts)
    batches = tokenize_prompts(model, prompts, batch_size=batch_size, device="cpu")
    return [prompts[i] for batch in batches[rank::world_size] for i in batch.indices]


def all_reduce_stats(stats: NeuronStats, group: Any = None) -> NeuronStats:
    """Sum ``count``, ``total`` and ``total_sq`` over all ranks (float64, on their device).

    Raises:
        CNAError: torch.distributed is not initialised.
    """
    _rank_world(group, None, None)
    count = torch.tensor([stats.count], dtype=torch.float64, device=stats.total.device)
    total = stats.total.to(torch.float64).clone()
    total_sq = stats.total_sq.to(torch.float64).clone()
    for t in (count, total, total_sq):
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group)
    return NeuronStats(int(count.item()), total, total_sq)


def all_reduce_counts(
    counts: Int[Tensor, "n_layers d_mlp"], group: Any = None
) -> Int[Tensor, "n_layers d_mlp"]:
    """Sum integer counts (e.g. universal-neuron top counts) over all ranks, exactly."""
    _rank_world(group, None, None)
    out = counts.to(torch.int64).clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


def activation_stats_distributed(
    model: Any,
    prompts: PromptList,
    *,
    batch_size: Integral = 32,
    top_fraction: Real | None = None,
    group: Any = None,
    progress: bool = False,
    desc: str = "activations",
    prefix_reuse: bool = True,
) -> tuple[NeuronStats, Int[Tensor, "n_layers d_mlp"] | None]:
    """:func:`cna_lens.activation_stats` over the whole of ``prompts``, run sharded.

    Every rank passes the same ``prompts`` and gets the same reduced result.

    Returns:
        ``(stats, top_counts)`` of the full prompt set; ``top_counts`` is None unless
        ``top_fraction`` is given.
    """
    mine = shard_prompts(model, prompts, batch_size=batch_size, group=group)
    n_layers, d_mlp = int(model.cfg.n_layers), int(model.cfg.d_mlp)
    device = next(model.parameters()).device
    if mine:
        stats, counts = activation_stats(
            model,
            mine,
            batch_size=batch_size,
            progress=progress,
            desc=desc,
            top_fraction=top_fraction,
            prefix_reuse=prefix_reuse,
        )
    else:  # more ranks than batches: contribute zeros
        stats = NeuronStats.zeros(n_layers, d_mlp, device=device)
        counts = (
            torch.zeros(n_layers, d_mlp, dtype=torch.long, device=device)
            if top_fraction is not None
            else None
        )
    stats = all_reduce_stats(stats.to(device), group)
    if counts is not None:
        counts = all_reduce_counts(counts.to(device), group)
    return stats, counts


def discover_distributed(
    model: Any,
    positive: PromptList,
    negative: PromptList,
    config: DiscoveryConfig | None = None,
    *,
    group: Any = None,
    progress: bool = False,
) -> Discovery:
    """:func:`cna_lens.discover_full`, with the forward passes sharded over a process group.

    Call it on every rank with the same arguments; every rank returns the same
    :class:`~cna_lens.Discovery` (circuit, statistics, universal neurons), equal to the
    single-process result (circuit and counts exactly, float64 statistics to ~1e-16).

    Args:
        model: This rank's copy of the model (from :func:`cna_lens.load_model`).
        positive, negative: The full prompt sets (identical on every rank).
        config: The settings (:class:`~cna_lens.DiscoveryConfig`; default the paper's).
        group: The process group (default: the world, which must be initialised).
        progress: Show progress bars.

    Raises:
        CNAError: bad prompts or size, or torch.distributed not initialised.
    """
    _rank_world(group, None, None)
    config = config or DiscoveryConfig()
    stats_fn = partial(
        activation_stats_distributed,
        model,
        batch_size=config.batch_size,
        group=group,
        progress=progress,
        prefix_reuse=config.prefix_reuse,
    )
    return discover_with(stats_fn, model, positive, negative, config)
