"""Activations: batched last-token activations equal one-prompt-at-a-time ones; statistics
stream and merge exactly."""

from __future__ import annotations

import pytest
import torch

import cna_lens
from cna_lens import NeuronStats
from cna_lens.models.loading import mlp_hook_names

MIXED = [
    "a",
    "How do I pick a lock? Please explain step by step.",
    "the fox",
    "What is the capital of France?",
    "x y z",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000.",
]


def _one_by_one(model, prompts):
    rows = []
    for p in prompts:
        ((_, acts),) = list(cna_lens.iter_activations(model, [p], batch_size=1))
        rows.append(acts[0])
    return torch.stack(rows)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gpt2"])
def test_batched_equals_single_prompt(arch, load):
    model = load(arch)
    single = _one_by_one(model, MIXED)
    batched = torch.empty_like(single)
    for batch, acts in cna_lens.iter_activations(model, MIXED, batch_size=4):
        assert batch.attention_mask[:, 0].eq(0).any() or len(set(map(len, MIXED))) == 1
        batched[list(batch.indices)] = acts
    torch.testing.assert_close(batched, single, atol=1e-5, rtol=1e-5)


def test_activations_are_the_last_real_token_of_the_cache(llama):
    prompt = "How do I pick a lock?"
    ((batch, acts),) = list(cna_lens.iter_activations(llama, [prompt], batch_size=1))
    _, cache = llama.run_with_cache(batch.input_ids, names_filter=mlp_hook_names(llama))
    for layer in range(llama.cfg.n_layers):
        torch.testing.assert_close(
            acts[0, layer], cache[f"blocks.{layer}.mlp.hook_post"][0, -1], atol=0, rtol=0
        )


def test_stats_stream_and_merge_exactly(llama):
    stats, _ = cna_lens.activation_stats(llama, MIXED, batch_size=2)
    a, _ = cna_lens.activation_stats(llama, MIXED[:3], batch_size=5)
    b, _ = cna_lens.activation_stats(llama, MIXED[3:], batch_size=5)
    merged = a.merge(b)
    assert merged.count == stats.count == len(MIXED)
    # different batch compositions change fp32 activations by float noise only
    torch.testing.assert_close(merged.total, stats.total, atol=1e-6, rtol=1e-5)
    single = _one_by_one(llama, MIXED).double()
    torch.testing.assert_close(stats.mean, single.mean(0), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(stats.var, single.var(0), atol=1e-6, rtol=1e-5)
    assert stats.total.dtype == torch.float64


def test_merge_is_the_statistics_of_the_union():
    x = torch.randn(7, 3, 5, dtype=torch.float64)
    merged = NeuronStats.of(x[:3]).merge(NeuronStats.of(x[3:]))
    whole = NeuronStats.of(x)
    assert merged.count == 7
    torch.testing.assert_close(merged.total, whole.total, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(merged.var, x.var(0), atol=1e-12, rtol=1e-10)


def test_stats_validation_and_json_round_trip():
    s = NeuronStats.of(torch.randn(5, 2, 3))
    back = NeuronStats.from_dict(s.to_dict())
    assert (
        back.count == 5
        and torch.equal(back.total, s.total)
        and torch.equal(back.total_sq, s.total_sq)
    )
    with pytest.raises(cna_lens.CNAError, match="cannot merge"):
        s.merge(NeuronStats.of(torch.randn(2, 3, 3)))
    with pytest.raises(cna_lens.CNAError, match="no prompts"):
        NeuronStats.zeros(2, 3).mean  # noqa: B018


def test_top_counts_match_brute_force(llama):
    single = _one_by_one(llama, MIXED)
    _, counts = cna_lens.activation_stats(llama, MIXED, batch_size=4, top_fraction=0.01)
    n_total = single.shape[1] * single.shape[2]
    k = max(1, round(0.01 * n_total))
    expected = torch.zeros(n_total, dtype=torch.long)
    for row in single.abs().flatten(1):
        expected[row.topk(k).indices] += 1
    assert torch.equal(counts.flatten(), expected)
