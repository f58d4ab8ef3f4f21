"""KL divergence from the unsteered model: exactly 0 without a change, equal to a hand
computation, the same from a kept residual as from full passes."""

from __future__ import annotations

import pytest
import torch

import cna_lens
from cna_lens import CNAError, Steering
from cna_lens.evaluation.kl import KLReference
from cna_lens.generation import FastBackend
from cna_lens.generation.forward import Scorer
from cna_lens.models.loading import encode_prompt

PROMPTS = [
    "Write a poem about the ocean and the moon.",
    "What is the capital of France?",
    "Explain how vaccines train the immune system, in detail, for a child.",
    "Numbers 1 2 3",
    "def add(a, b): return a + b",
]


@pytest.fixture(scope="module")
def circuit(llama):
    return cna_lens.discover(llama, PROMPTS[:2], PROMPTS[2:], top_k=30, universal_filter=False)


@pytest.fixture(scope="module")
def backend(llama):
    with FastBackend(llama) as b:
        yield b


@pytest.fixture(scope="module")
def reference(backend):
    return KLReference(backend, PROMPTS, tokens=6, batch_size=2)


def test_no_change_is_exactly_zero(reference, circuit):
    for condition in (None, Steering(circuit=circuit, multiplier=1.0)):
        result = reference.measure(condition)
        assert result.first == 0.0 and result.mean == 0.0
        assert set(result.per_prompt_mean) == {0.0}


def test_equals_a_hand_computation(llama, reference, circuit):
    steering = Steering(circuit=circuit, multiplier=0.0)
    result = reference.measure(steering)
    assert result.mean > 0  # the steering changes the distributions: the test can fail
    for i, (prompt, cont) in enumerate(zip(PROMPTS, reference.continuations, strict=True)):
        cont = cont[: reference.tokens]
        ids = torch.tensor([encode_prompt(llama, prompt) + cont[:-1]])
        with torch.inference_mode():
            plain = torch.log_softmax(llama(ids)[0, -len(cont) :].float(), -1)
            with cna_lens.steer(llama, steering):
                steered = torch.log_softmax(llama(ids)[0, -len(cont) :].float(), -1)
        per_token = (plain.exp() * (plain - steered)).sum(-1)
        assert result.per_prompt_first[i] == pytest.approx(float(per_token[0]), rel=1e-4, abs=1e-6)
        assert result.per_prompt_mean[i] == pytest.approx(
            float(per_token.mean()), rel=1e-4, abs=1e-6
        )


def test_a_kept_residual_gives_the_full_pass_numbers(backend, llama, circuit):
    last = int(llama.cfg.n_layers) - 1
    late = cna_lens.discover(
        llama,
        PROMPTS[:2],
        PROMPTS[2:],
        top_k=10,
        exclude_layers=list(range(last)),
        universal_filter=False,
    )
    steering = Steering(circuit=late, multiplier=0.0)
    full = KLReference(backend, PROMPTS, tokens=4, batch_size=2).measure(steering)
    partial = KLReference(backend, PROMPTS, tokens=4, batch_size=2, start_layer=last)
    assert partial.measure(steering) == full
    with pytest.raises(CNAError, match="below layer"):
        partial.measure(Steering(circuit=circuit, multiplier=0.0))  # touches layer 0


def test_scorer_checks_its_arguments(backend):
    with pytest.raises(CNAError, match="no sequences"):
        Scorer(backend, [], keep=1)
    with pytest.raises(CNAError, match="targets"):
        Scorer(backend, [[1, 2, 3]], keep=2, targets=[3])
