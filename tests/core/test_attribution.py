"""Attribution: deltas equal a brute-force per-prompt computation."""

from __future__ import annotations

import pytest
import torch

import cna_lens
from cna_lens.models.loading import mlp_hook_names


def _per_prompt(model, prompts):
    rows = []
    for p in prompts:
        ids = cna_lens.tokenize_prompts(model, [p], batch_size=1)[0].input_ids
        _, cache = model.run_with_cache(ids, names_filter=mlp_hook_names(model))
        rows.append(
            torch.stack(
                [
                    cache[f"blocks.{layer}.mlp.hook_post"][0, -1]
                    for layer in range(model.cfg.n_layers)
                ]
            )
        )
    return torch.stack(rows).double()


@pytest.mark.parametrize("arch", ["llama", "qwen3", "mistral"])
def test_delta_equals_brute_force(arch, load, prompts):
    model = load(arch)
    pos, neg = prompts
    attribution = cna_lens.attribute(model, pos, neg, batch_size=3)
    expected = _per_prompt(model, pos).mean(0) - _per_prompt(model, neg).mean(0)
    torch.testing.assert_close(attribution.delta, expected, atol=1e-6, rtol=1e-5)
    assert attribution.positive.count == len(pos) and attribution.negative.count == len(neg)
    assert attribution.delta.shape == (model.cfg.n_layers, model.cfg.d_mlp)


def test_contrast_is_antisymmetric_and_effect_size_signed(llama, prompts):
    pos, neg = prompts
    a = cna_lens.attribute(llama, pos, neg)
    b = cna_lens.Attribution(a.negative, a.positive)
    assert torch.equal(a.delta, -b.delta)
    assert torch.equal(torch.sign(a.effect_size), torch.sign(a.delta))


@pytest.mark.parametrize("which", ["positive", "negative"])
def test_empty_set_refused(llama, which):
    kwargs = {"positive": ["a"], "negative": ["b"], which: []}
    with pytest.raises(cna_lens.CNAError, match=f"{which} prompts is empty"):
        cna_lens.attribute(llama, **kwargs)
