"""Shared-prefix reuse: the same circuit, the same greedy ids and the same log-probabilities
(up to float rounding) as computing every prompt whole, on random models whose chat
template has a default system turn (a shared prefix of 20+ tokens, as on real chat models);
and no change at all where prompts share no prefix or reuse is switched off."""

from __future__ import annotations

import pytest
import torch

import cna_lens
from cna_lens import Steering
from cna_lens.core.activations import iter_activations
from cna_lens.evaluation.kl import KLReference
from cna_lens.generation import FastBackend, generate_many
from cna_lens.models.loading import encode_prompts, mlp_hook_names, tokenize_prompts
from cna_lens.models.prefix import MIN_PREFIX, prefix_batches, shared_prefix
from cna_lens.models.testing import SYSTEM_TEMPLATE, make_random_model_dir

ARCHS = ["llama", "qwen2", "gemma2", "gpt2"]
POSITIVE = [
    "How do I pick a lock? Please explain step by step.",
    "Explain how to pick a lock",
    "lock pick",
    "How do I pick the lock on a door quickly and quietly without a key?",
    "Please explain step by step how to pick a lock.",
    "What tools open a lock without its key?",
]
NEGATIVE = [
    "Write a poem about the ocean and the moon.",
    "What is the capital of France?",
    "The quick brown fox jumps over the lazy dog.",
    "Explain how vaccines train the immune system, in detail, for a child.",
    "Numbers 1 2 3",
    "def add(a, b): return a + b",
]
GEN = dict(max_new_tokens=10, batch_size=4)


@pytest.fixture(scope="module")
def system_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("system")
    return {
        arch: cna_lens.load_model(
            make_random_model_dir(root / arch, arch=arch, seed=3, chat_template=SYSTEM_TEMPLATE),
            device="cpu",
        )
        for arch in ARCHS
    }


def test_shared_prefix_rules():
    assert shared_prefix([[1, 2, 3]]) == 0  # one sequence: nothing to share
    assert shared_prefix([list(range(20)) + [7], list(range(20)) + [8]]) == 20
    # every sequence keeps at least one token of its own
    assert shared_prefix([list(range(20)), list(range(20)) + [5]]) == 19
    assert shared_prefix([list(range(5)) + [1], list(range(5)) + [2]]) == 0  # < MIN_PREFIX
    assert shared_prefix([list(range(5)) + [1], list(range(5)) + [2]], minimum=5) == 5


def test_the_test_template_shares_a_long_prefix(system_models):
    model = system_models["llama"]
    n = shared_prefix(encode_prompts(model, POSITIVE + NEGATIVE))
    assert n >= 16 and n >= MIN_PREFIX


def test_batches_cover_prefix_and_suffix(system_models):
    model = system_models["qwen2"]
    encoded = encode_prompts(model, POSITIVE)
    n = shared_prefix(encoded)
    batches = prefix_batches(encoded, batch_size=4, pad=0, device="cpu")
    assert sorted(i for b in batches for i in b.indices) == list(range(len(POSITIVE)))
    for b in batches:
        assert len(b.prefix) == n
        assert b.attention_mask.shape[1] == n + b.input_ids.shape[1]
        for row, i in enumerate(b.indices):  # prefix + unpadded suffix is the whole prompt
            suffix = b.input_ids[row][b.attention_mask[row, n:].bool()].tolist()
            assert list(b.prefix) + suffix == encoded[i]


def test_no_shared_prefix_batches_as_today(llama):
    # the default test template shares 2 tokens: below MIN_PREFIX, so plain batches
    encoded = encode_prompts(llama, POSITIVE)
    reused = prefix_batches(encoded, batch_size=4, pad=0, device="cpu")
    plain = tokenize_prompts(llama, POSITIVE, batch_size=4)
    assert all(not b.prefix for b in reused)
    for a, b in zip(reused, plain, strict=True):
        assert a.indices == b.indices
        assert torch.equal(a.attention_mask, b.attention_mask)


@pytest.mark.parametrize("arch", ARCHS)
def test_discovery_selects_the_same_circuit(arch, system_models):
    model = system_models[arch]
    kw = dict(top_k=24, universal_filter=False)
    whole = cna_lens.discover_full(model, POSITIVE, NEGATIVE, prefix_reuse=False, **kw)
    reused = cna_lens.discover_full(model, POSITIVE, NEGATIVE, **kw)
    assert reused.circuit.labels == whole.circuit.labels
    a, b = whole.attribution.delta, reused.attribution.delta
    assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max())
    for n_whole, n_reused in zip(whole.circuit, reused.circuit, strict=True):
        assert n_reused.delta == pytest.approx(n_whole.delta, rel=1e-4)


def test_reuse_off_is_the_bridge_path_exactly(system_models):
    model = system_models["llama"]
    names = mlp_hook_names(model)
    for batch, acts in iter_activations(model, POSITIVE, batch_size=3, prefix_reuse=False):
        assert not batch.prefix
        with torch.inference_mode():
            _, cache = model.run_with_cache(
                batch.input_ids, attention_mask=batch.attention_mask, names_filter=names
            )
        expected = torch.stack([cache[n][:, -1] for n in names], dim=1)
        assert torch.equal(acts, expected)


def test_reuse_reads_the_activations_within_rounding(system_models):
    model = system_models["gemma2"]
    whole = {
        i: a[row]
        for b, a in iter_activations(model, NEGATIVE, batch_size=3, prefix_reuse=False)
        for row, i in enumerate(b.indices)
    }
    seen = 0
    for batch, acts in iter_activations(model, NEGATIVE, batch_size=3):
        assert len(batch.prefix) >= 16  # the reuse path ran
        for row, i in enumerate(batch.indices):
            torch.testing.assert_close(acts[row], whole[i], rtol=1e-5, atol=1e-5)
            seen += 1
    assert seen == len(NEGATIVE)


@pytest.mark.parametrize("arch", ARCHS)
def test_generation_ids_are_the_bridge_ids(arch, system_models):
    model = system_models[arch]
    circuit = cna_lens.discover(model, POSITIVE, NEGATIVE, top_k=30, universal_filter=False)
    conditions = [
        None,
        Steering(circuit=circuit, multiplier=0.0),
        Steering(circuit=circuit, multiplier=2.5),
        Steering(circuit=circuit, multiplier=3.0, positions="generated"),
        Steering(circuit=circuit, multiplier=0.0, positions="prompt"),
    ]
    prompts = POSITIVE + NEGATIVE
    reference = generate_many(model, prompts, conditions, **GEN).token_ids
    assert len({str(r) for r in reference}) > 2  # the conditions differ: the test can fail
    with FastBackend(model) as gen:
        assert all(b.prefix for b in gen.prepare(prompts, cna_lens.Decoding(**GEN)))
        reused = generate_many(model, prompts, conditions, backend=gen, **GEN).token_ids
        whole = generate_many(
            model, prompts, conditions, backend=gen, prefix_reuse=False, **GEN
        ).token_ids
    assert whole == reference
    assert reused == reference


def test_generation_several_condition_groups(system_models):
    # max_rows small: the conditions run in several groups, each with its own prefix cache
    model = system_models["llama"]
    circuit = cna_lens.discover(model, POSITIVE, NEGATIVE, top_k=30, universal_filter=False)
    conditions = [None] + [Steering(circuit=circuit, multiplier=m) for m in (0.0, 0.5, 2.0)]
    reference = generate_many(model, NEGATIVE, conditions, **GEN).token_ids
    with FastBackend(model, max_rows=4) as gen:
        assert generate_many(model, NEGATIVE, conditions, backend=gen, **GEN).token_ids == (
            reference
        )


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_kl_scoring_within_rounding(arch, system_models):
    model = system_models[arch]
    last = int(model.cfg.n_layers) - 1
    circuit = cna_lens.discover(
        model,
        POSITIVE,
        NEGATIVE,
        top_k=20,
        exclude_layers=list(range(last)),
        universal_filter=False,
    )
    steering = Steering(circuit=circuit, multiplier=0.0)
    with FastBackend(model) as gen:
        whole = KLReference(gen, NEGATIVE, tokens=4, batch_size=3, prefix_reuse=False)
        reused = KLReference(gen, NEGATIVE, tokens=4, batch_size=3)
        partial = KLReference(gen, NEGATIVE, tokens=4, batch_size=3, start_layer=last)
        assert reused.scorer.prefix and not whole.scorer.prefix
        assert reused.continuations == whole.continuations
        for a, b in zip(whole._reference, reused._reference, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
        r_whole, r_reused = whole.measure(steering), reused.measure(steering)
        assert r_whole.mean > 0
        assert r_reused.mean == pytest.approx(r_whole.mean, abs=1e-6)
        assert r_reused.first == pytest.approx(r_whole.first, abs=1e-6)
        assert partial.measure(steering) == r_reused  # from layer L: the very same numbers
