"""CAA baseline: vectors are mean residual differences; steering adds alpha * vector exactly."""

from __future__ import annotations

import pytest
import torch

import cna_lens
from cna_lens.errors import CNAError
from cna_lens.steering.caa import (
    CAA,
    CAAVectors,
    caa_steer,
    compute_caa,
    default_caa_layers,
    residual_means,
)


@pytest.fixture
def vectors(llama, prompts):
    pos, neg = prompts
    return compute_caa(llama, pos, neg, batch_size=4)


def _tokens(model, text="How do I pick a lock?"):
    batch = cna_lens.tokenize_prompts(model, [text], batch_size=1)[0]
    return batch.input_ids


def _resid(model, prompt):
    """[n_layers, d_model] residual stream at the last token of one unpadded prompt."""
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(model.cfg.n_layers)]
    batch = cna_lens.tokenize_prompts(model, [prompt], batch_size=1)[0]
    with torch.inference_mode():
        _, cache = model.run_with_cache(batch.input_ids, names_filter=names)
    return torch.stack([cache[n][0, -1] for n in names]).double()


def test_vectors_are_mean_differences_of_last_token_residuals(llama, prompts):
    pos, neg = prompts
    caa = compute_caa(llama, pos, neg, batch_size=2)  # batching and padding must not matter
    assert (caa.n_layers, caa.d_model) == (llama.cfg.n_layers, llama.cfg.d_model)
    want = torch.stack([_resid(llama, p) for p in pos]).mean(0) - torch.stack(
        [_resid(llama, p) for p in neg]
    ).mean(0)
    torch.testing.assert_close(caa.vectors.double(), want, atol=1e-4, rtol=1e-4)
    assert caa.n_positive == len(pos) and caa.n_negative == len(neg)
    assert len(caa.norms()) == llama.cfg.n_layers
    means = residual_means(llama, pos)
    assert means.dtype == torch.float64 and means.shape == caa.vectors.shape


def test_alpha_zero_leaves_logits_exactly_unchanged(llama, vectors):
    tokens = _tokens(llama)
    with torch.inference_mode():
        ref = llama(tokens)
        with caa_steer(llama, vectors, 0.0):
            out = llama(tokens)
    assert torch.equal(ref, out)


def test_steering_adds_alpha_times_vector_at_the_layer(llama, vectors):
    layer = default_caa_layers(llama.cfg.n_layers)[0]
    tokens = _tokens(llama)
    name = f"blocks.{layer}.hook_resid_post"
    with torch.inference_mode():
        _, ref = llama.run_with_cache(tokens, names_filter=[name])
        with caa_steer(llama, vectors, 2.5) as layers:
            _, got = llama.run_with_cache(tokens, names_filter=[name])
            steered_logits = llama(tokens)
        plain_logits = llama(tokens)
    assert layers == (layer,)
    torch.testing.assert_close(got[name], ref[name] + 2.5 * vectors.vectors[layer])
    assert not torch.equal(steered_logits, plain_logits)
    assert torch.equal(plain_logits, llama(tokens))  # hooks gone after the block


def test_hooks_removed_after_exception(llama, vectors):
    tokens = _tokens(llama)
    with torch.inference_mode():
        ref = llama(tokens)
        with pytest.raises(RuntimeError, match="boom"):
            with caa_steer(llama, vectors, 3.0, layers=[0, 1]):
                raise RuntimeError("boom")
        assert torch.equal(ref, llama(tokens))


def test_default_layer_is_the_middle():
    assert default_caa_layers(16) == (8,)
    assert default_caa_layers(3) == (1,)
    assert default_caa_layers(1) == (0,)


def test_validation(llama, vectors):
    with pytest.raises(CNAError, match="out of range"):
        with caa_steer(llama, vectors, 1.0, layers=[99]):
            pass
    with pytest.raises(CNAError, match="finite"):
        with caa_steer(llama, vectors, float("nan")):
            pass
    with pytest.raises(CNAError, match="d_model"):
        with caa_steer(llama, CAAVectors(torch.zeros(2, 5), 1, 1), 1.0):
            pass
    with pytest.warns(DeprecationWarning), pytest.raises(CNAError, match="circuit"):
        cna_lens.caa_generate(llama, ["x"], vectors, 1.0, circuit=None)
    with pytest.raises(CNAError, match="NaN"):
        CAAVectors(torch.full((2, 3), float("nan")), 1, 1)


def test_caa_generate_batched_and_steers(llama, vectors):
    prompts = ["How do I pick a lock?", "Write a poem about the ocean and the moon."]
    plain = cna_lens.generate(llama, prompts, max_new_tokens=6)
    gen = cna_lens.generate
    assert gen(llama, prompts, steering=CAA(vectors, 0.0), max_new_tokens=6) == plain
    strong = gen(llama, prompts, steering=CAA(vectors, 50.0, (0,)), max_new_tokens=6)
    assert strong != plain
    # one prompt at a time gives the same texts as the batch
    single = [
        gen(llama, [p], steering=CAA(vectors, 50.0, (0,)), max_new_tokens=6)[0] for p in prompts
    ]
    assert single == strong
    with pytest.warns(DeprecationWarning, match="caa_generate is deprecated"):
        old = cna_lens.caa_generate(llama, prompts, vectors, 50.0, layers=[0], max_new_tokens=6)
    assert old == strong
