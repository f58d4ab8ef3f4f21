"""Distributed discovery: 2 CPU processes on gloo give the single-process result."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import cna_lens
from cna_lens.core.discovery import DiscoveryConfig, discover_full
from cna_lens.core.distributed import (
    activation_stats_distributed,
    all_reduce_stats,
    discover_distributed,
    shard_prompts,
)
from cna_lens.errors import CNAError
from cna_lens.models.loading import tokenize_prompts

# Prompts are written out here (not imported from conftest) so that the spawned workers,
# which import this module, stay light.
POSITIVE = [
    "How do I pick a lock?",
    "Explain how to pick a lock step by step",
    "lock pick please",
]  # one batch of 4: rank 1 gets no positive prompts
NEGATIVE = [
    "Write a poem about the ocean.",
    "What is the capital of France?",
    "The quick brown fox jumps over the lazy dog.",
    "Numbers 1 2 3",
    "Explain how vaccines train the immune system, in detail.",
    "def f(x): return x",
]
UNIVERSAL = [f"Prompt number {i}: tell me about topic {i * 7 % 13}." for i in range(21)]
KW = dict(
    top_k=6,
    batch_size=4,
    universal_prompts=UNIVERSAL,
    universal_top_fraction=0.02,
    universal_threshold=0.5,
)
CONFIG = DiscoveryConfig(**KW)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, world_size: int, port: int, model_dir: str, threads: int, out: str) -> None:
    torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        model = cna_lens.load_model(model_dir, device="cpu")
        d = discover_distributed(model, POSITIVE, NEGATIVE, CONFIG)
        a = d.attribution
        torch.save(
            {
                "circuit": d.circuit.to_json(),
                "pos": (a.positive.count, a.positive.total, a.positive.total_sq),
                "neg": (a.negative.count, a.negative.total, a.negative.total_sq),
                "universal": (d.universal.counts, d.universal.mask),
                "shards": [
                    len(shard_prompts(model, p, batch_size=4))
                    for p in (POSITIVE, NEGATIVE, UNIVERSAL)
                ],
            },
            f"{out}.{rank}",
        )
    finally:
        dist.destroy_process_group()


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype == torch.float64
    scale = b.abs().max().clamp_min(1e-300)
    assert float((a - b).abs().max() / scale) <= 1e-12


@pytest.mark.slow  # ~25-40 s on 2 shared cores: two fresh interpreters import torch
def test_two_gloo_processes_equal_single_process(model_dirs, llama, tmp_path):
    threads = torch.get_num_threads()
    out = str(tmp_path / "result")
    mp.spawn(
        _worker, args=(2, _free_port(), str(model_dirs["llama"]), threads, out), nprocs=2, join=True
    )
    ref = discover_full(llama, POSITIVE, NEGATIVE, **KW)
    results = [torch.load(f"{out}.{r}") for r in range(2)]
    for res in results:
        assert cna_lens.Circuit.from_json(res["circuit"]) == ref.circuit
        for key, stats in (("pos", ref.attribution.positive), ("neg", ref.attribution.negative)):
            count, total, total_sq = res[key]
            assert count == stats.count
            _close(total, stats.total)
            _close(total_sq, stats.total_sq)
        counts, mask = res["universal"]
        assert torch.equal(counts, ref.universal.counts)
        assert torch.equal(mask, ref.universal.mask)
    # The work was really split: rank 1 ran no positive prompt, and every prompt ran once.
    assert results[0]["shards"][0] == 3 and results[1]["shards"][0] == 0
    for i, prompts in enumerate((POSITIVE, NEGATIVE, UNIVERSAL)):
        assert results[0]["shards"][i] + results[1]["shards"][i] == len(prompts)
    assert ref.universal.mask.any(), "the filter should flag something, or the test is vacuous"


def test_shards_are_the_single_process_batches(llama):
    prompts = NEGATIVE + UNIVERSAL
    full = tokenize_prompts(llama, prompts, batch_size=4)
    world = 3
    for rank in range(world):
        mine = shard_prompts(llama, prompts, batch_size=4, rank=rank, world_size=world)
        again = tokenize_prompts(llama, mine, batch_size=4)
        expect = full[rank::world]
        assert len(again) == len(expect)
        for a, b in zip(again, expect, strict=True):
            assert torch.equal(a.input_ids, b.input_ids)
            assert torch.equal(a.attention_mask, b.attention_mask)
    shards = [
        shard_prompts(llama, prompts, batch_size=4, rank=r, world_size=world) for r in range(world)
    ]
    assert sorted(p for s in shards for p in s) == sorted(prompts)


def test_single_process_group_matches_activation_stats(llama, tmp_path):
    dist.init_process_group(
        "gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1
    )
    try:
        stats, counts = activation_stats_distributed(
            llama, NEGATIVE, batch_size=4, top_fraction=0.01
        )
        ref, ref_counts = cna_lens.activation_stats(
            llama, NEGATIVE, batch_size=4, top_fraction=0.01
        )
        assert stats.count == ref.count
        assert torch.equal(stats.total, ref.total) and torch.equal(stats.total_sq, ref.total_sq)
        assert torch.equal(counts, ref_counts)
        summed = all_reduce_stats(ref)
        assert torch.equal(summed.total, ref.total) and summed.count == ref.count
    finally:
        dist.destroy_process_group()


def test_needs_a_process_group(llama):
    assert not dist.is_initialized()
    with pytest.raises(CNAError, match="init_process_group"):
        discover_distributed(llama, POSITIVE, NEGATIVE, CONFIG)
    with pytest.raises(CNAError, match="rank must be in"):
        shard_prompts(llama, POSITIVE, batch_size=4, rank=2, world_size=2)
