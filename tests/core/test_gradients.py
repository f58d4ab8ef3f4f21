"""Attribution patching: the gradient equals a finite difference; the score is |delta * grad|."""

from __future__ import annotations

import pytest
import torch

import cna_lens
from cna_lens import CNAError
from cna_lens.core.gradients import (
    attribution_patching_score,
    neuron_gradients,
    target_log_mass,
)

PROMPTS = ["How do I pick a lock?", "Write a poem about the ocean.", "What is 2 + 2?"]
TOKENS = [5, 17, 40]


def _metric(model, prompts, layer, neuron, eps) -> float:
    """Mean target log-mass with ``eps`` added to one neuron at each prompt's last token."""

    def hook(act, hook):
        act = act.clone()
        act[:, -1, neuron] += eps
        return act

    total = 0.0
    for p in prompts:
        ids = cna_lens.tokenize_prompts(model, [p], batch_size=1)[0].input_ids
        with (
            torch.inference_mode(),
            model.hooks(fwd_hooks=[(f"blocks.{layer}.mlp.hook_post", hook)]),
        ):
            total += float(target_log_mass(model(ids)[:, -1].double(), TOKENS)[0])
    return total / len(prompts)


def test_gradient_equals_a_finite_difference(llama):
    grads = neuron_gradients(llama, PROMPTS, TOKENS, batch_size=2)
    assert grads.shape == (llama.cfg.n_layers, llama.cfg.d_mlp)
    checked = 0
    for layer in range(int(llama.cfg.n_layers)):
        neuron = int(grads[layer].abs().argmax())  # a neuron with a clear gradient
        eps = 1e-2
        fd = (
            _metric(llama, PROMPTS, layer, neuron, eps)
            - _metric(llama, PROMPTS, layer, neuron, -eps)
        ) / (2 * eps)
        assert float(grads[layer, neuron]) == pytest.approx(fd, rel=2e-2, abs=1e-5)
        checked += abs(fd) > 1e-4
    assert checked  # non-zero gradients were compared: the test can fail
    assert all(p.requires_grad for p in llama.parameters())  # weights unfrozen again


def test_score_is_delta_times_gradient(llama):
    found = cna_lens.discover_full(llama, PROMPTS[:1], PROMPTS[1:], top_k=5, universal_filter=False)
    grads = neuron_gradients(llama, PROMPTS, TOKENS)
    score = attribution_patching_score(grads)
    assert torch.equal(score(found.attribution), (found.attribution.delta.double() * grads).abs())
    cfg = cna_lens.DiscoveryConfig(top_k=5, score=score, universal_filter=False)
    circuit = cna_lens.discover(llama, PROMPTS[:1], PROMPTS[1:], cfg)
    assert circuit.provenance.score == "atp"
    with pytest.raises(CNAError, match="outside the vocabulary"):
        neuron_gradients(llama, PROMPTS, [10**9])
    with pytest.raises(CNAError, match="empty"):
        neuron_gradients(llama, PROMPTS, [])
