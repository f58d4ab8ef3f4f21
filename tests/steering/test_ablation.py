"""Directional ablation: strength 0 is the model, strength 1 leaves no component along r."""

from __future__ import annotations

import pytest
import torch

import cna_lens
from cna_lens import DirectionalAblation
from cna_lens.errors import CNAError
from cna_lens.generation import generate_many, generate_token_ids
from cna_lens.steering.ablation import residual_writes
from cna_lens.steering.caa import compute_caa
from cna_lens.steering.hooks import hooked

KW = dict(max_new_tokens=6, batch_size=3)


@pytest.fixture
def vectors(llama, prompts):
    pos, neg = prompts
    return compute_caa(llama, pos, neg, batch_size=4)


def _tokens(model, text="How do I pick a lock?"):
    return cna_lens.tokenize_prompts(model, [text], batch_size=1)[0].input_ids


def test_strength_zero_is_the_model_bit_for_bit(llama, vectors):
    tokens = _tokens(llama)
    with torch.inference_mode():
        ref = llama(tokens)
        with hooked(llama, DirectionalAblation(vectors, layer=1, strength=0.0)):
            out = llama(tokens)
    assert torch.equal(ref, out)


def test_strength_one_removes_the_direction_from_every_layer(llama, vectors):
    ablation = DirectionalAblation(vectors, layer=1)
    r = ablation.direction.double()
    names = [f"blocks.{layer}.hook_resid_post" for layer in range(llama.cfg.n_layers)]
    tokens = _tokens(llama)
    with torch.inference_mode():
        _, plain = llama.run_with_cache(tokens, names_filter=names)
        with hooked(llama, ablation):
            _, cut = llama.run_with_cache(tokens, names_filter=names)
    for name in names:
        before = (plain[name].double() @ r).abs().max()
        after = (cut[name].double() @ r).abs().max()
        scale = plain[name].double().norm(dim=-1).max()
        assert after <= 1e-5 * scale, name  # float32 rounding of a sum of projected writes
        assert before > 100 * after, name  # the model had a component there to remove


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hooks_cover_embeddings_and_every_block(arch, load):
    model = load(arch)
    names = residual_writes(model)
    assert names[0] == "hook_embed"
    assert ("hook_pos_embed" in names) == (arch == "gpt2")  # rotary tables are not writes
    assert len([n for n in names if n.startswith("blocks.")]) == 2 * model.cfg.n_layers


def test_fast_backend_equals_bridge_and_strengths_differ(llama, vectors, prompts):
    pos, _ = prompts
    conditions = [DirectionalAblation(vectors, layer=1, strength=s) for s in (0.0, 1.0, 4.0)]
    fast = generate_many(llama, pos, conditions, backend="fast", **KW).token_ids
    for condition, ids in zip(conditions, fast, strict=True):
        assert ids == generate_token_ids(llama, pos, steering=condition, **KW)
    assert fast[0] == generate_token_ids(llama, pos, **KW)
    assert fast[2] != fast[0]


def test_bad_input_is_refused(llama, load, vectors):
    with pytest.raises(CNAError, match="layer"):
        DirectionalAblation(vectors, layer=llama.cfg.n_layers)
    with pytest.raises(CNAError, match="CAAVectors"):
        DirectionalAblation(torch.zeros(3), layer=0)
    zero = type(vectors)(**{**vectors.__dict__, "vectors": torch.zeros_like(vectors.vectors)})
    with pytest.raises(CNAError, match="zero"):
        DirectionalAblation(zero, layer=0)
    gemma = load("gemma2")
    with pytest.raises(CNAError, match="normalises"):
        residual_writes(gemma)


def test_kl_and_proxy_score_an_ablation(llama, vectors, prompts):
    """The scorers run the embedding's hook points too (the whole model from layer 0)."""
    from cna_lens.evaluation.kl import KLReference
    from cna_lens.generation import FastBackend

    pos, neg = prompts
    with FastBackend(llama) as backend:
        kl = KLReference(backend, neg, tokens=4)
        assert kl.measure(DirectionalAblation(vectors, layer=1, strength=0.0)).mean == 0.0
        assert kl.measure(DirectionalAblation(vectors, layer=1, strength=4.0)).mean > 0.0
