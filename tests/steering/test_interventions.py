"""Interventions: every one is bit-identical at m = 1, "mean" at m = 0 equals a hand-made
replacement, sign selection leaves the other neurons alone, Steering round-trips, and what
cannot be done is refused with a clear message."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from test_hooks import PROMPTS, _hf_scaled_logits, _logits, _n_hooks
from transformers import AutoModelForCausalLM

import cna_lens
from cna_lens import INTERVENTIONS, Circuit, CNAError, Neuron, Steering, steer
from cna_lens.steering.bake import bake
from cna_lens.steering.interventions import register_intervention


@pytest.fixture(scope="module")
def found(llama):
    from conftest import NEGATIVE, POSITIVE

    return cna_lens.discover(llama, POSITIVE, NEGATIVE, top_k=8, universal_filter=False)


def _batch(model):
    return cna_lens.tokenize_prompts(model, PROMPTS, batch_size=2)[0]


def _hf_replaced_logits(model_dir, batch, circuit, values):
    """Plain HF with a pre-hook on each down projection writing ``values[label]`` by hand."""
    hf = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    downs = [mod for n, mod in hf.named_modules() if n.endswith(("mlp.down_proj", "mlp.c_proj"))]
    handles = []
    for layer, mod in enumerate(downs):
        entries = [
            (n.neuron, values[n.label]) for n in circuit if n.layer == layer and n.label in values
        ]
        if not entries:
            continue

        def pre(module, args, entries=entries):
            x = args[0].clone()
            for j, fn in entries:
                x[..., j] = fn(x[..., j])
            return (x,)

        handles.append(mod.register_forward_pre_hook(pre))
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
    try:
        with torch.no_grad():
            return hf(
                input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos
            ).logits
    finally:
        for h in handles:
            h.remove()


def _close_on_real(a, b, batch):
    real = batch.attention_mask.bool()
    torch.testing.assert_close(a[real], b[real], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("intervention", sorted(INTERVENTIONS))
@pytest.mark.parametrize("sign", ["both", "positive", "negative"])
def test_every_intervention_is_bit_identical_at_m1(llama, found, intervention, sign):
    batch = _batch(llama)
    before = _logits(llama, batch)
    s = Steering(circuit=found, intervention=intervention, multiplier=1.0, sign=sign)
    assert s.is_identity
    with steer(llama, s):
        assert _n_hooks(llama) == 0
        during = _logits(llama, batch)
    assert torch.equal(before, during)


def test_empty_sign_subset_is_identity(llama):
    c = Circuit((Neuron(0, 1, 0.5), Neuron(1, 2, 0.25)), llama.cfg.n_layers, llama.cfg.d_mlp)
    assert Steering(circuit=c, multiplier=0.0, sign="negative").is_identity


@pytest.mark.parametrize("m", [0.0, 2.5])
def test_mean_intervention_equals_hand_made_replacement(llama, model_dirs, found, m):
    batch = _batch(llama)
    with steer(llama, Steering(circuit=found, intervention="mean", multiplier=m)):
        steered = _logits(llama, batch)
    if m == 0.0:
        values = {n.label: (lambda x, mu=n.mean_negative: torch.full_like(x, mu)) for n in found}
    else:
        values = {n.label: (lambda x, mu=n.mean_negative: mu + m * (x - mu)) for n in found}
    reference = _hf_replaced_logits(model_dirs["llama"], batch, found, values)
    _close_on_real(steered, reference, batch)
    assert not torch.allclose(steered, _logits(llama, batch))


@pytest.mark.parametrize("sign", ["positive", "negative"])
def test_sign_selection_leaves_the_other_neurons_untouched(llama, model_dirs, found, sign):
    assert {n.sign for n in found} == {1, -1}, "the fixture circuit should have both signs"
    batch = _batch(llama)
    with steer(llama, Steering(circuit=found, multiplier=0.0, sign=sign)):
        steered = _logits(llama, batch)
    keep = 1 if sign == "positive" else -1
    subset = Circuit(tuple(n for n in found if n.sign == keep), found.n_layers, found.d_mlp)
    reference = _hf_scaled_logits(model_dirs["llama"], batch, subset, 0.0)
    _close_on_real(steered, reference, batch)
    # at the first layer with a selected neuron, the cache (whose hook runs after the
    # steering hook) sees exactly the clean activations except for the selected neurons
    layer = min(n.layer for n in subset)
    name = f"blocks.{layer}.mlp.hook_post"
    with torch.no_grad():
        _, clean = llama.run_with_cache(
            batch.input_ids, attention_mask=batch.attention_mask, names_filter=name
        )
        with steer(llama, Steering(circuit=found, multiplier=0.0, sign=sign)):
            _, hooked = llama.run_with_cache(
                batch.input_ids, attention_mask=batch.attention_mask, names_filter=name
            )
    chosen = [n.neuron for n in subset if n.layer == layer]
    others = [j for j in range(found.d_mlp) if j not in chosen]
    assert torch.equal(hooked[name][..., others], clean[name][..., others])
    assert torch.equal(hooked[name][..., chosen], torch.zeros_like(clean[name][..., chosen]))


def test_sign_both_with_negative_multiplier(llama, model_dirs, found):
    batch = _batch(llama)
    s = Steering(circuit=found, multiplier=2.0, negative_multiplier=0.5)
    with steer(llama, s):
        steered = _logits(llama, batch)
    with steer(llama, found, 2.0, negative_multiplier=0.5):
        old_form = _logits(llama, batch)
    assert torch.equal(steered, old_form)
    _close_on_real(steered, _hf_scaled_logits(model_dirs["llama"], batch, found, 2.0, 0.5), batch)


def test_generate_takes_a_steering(llama, found):
    s = Steering(circuit=found, multiplier=0.0)
    kw = dict(max_new_tokens=5)
    assert cna_lens.generate_token_ids(
        llama, PROMPTS, steering=s, **kw
    ) == cna_lens.generate_token_ids(llama, PROMPTS, circuit=found, multiplier=0.0, **kw)
    with pytest.raises(CNAError, match="not both"):
        cna_lens.generate(llama, PROMPTS, steering=s, circuit=found, **kw)
    with pytest.raises(CNAError, match="not both"):
        with steer(llama, s, 0.0):
            pass


def test_steering_json_round_trip(found):
    s = Steering(
        circuit=found,
        intervention="mean",
        multiplier=0.25,
        negative_multiplier=2.0,
        sign="positive",
        positions="generated",
    )
    back = Steering.from_json(s.to_json())
    assert back == s and back.steered() == s.steered()
    with pytest.raises(CNAError, match=r"unknown steering keys \['m'\]"):
        Steering.from_dict({**s.to_dict(), "m": 1})


def test_registered_intervention_is_one_function(llama, model_dirs, found):
    def shift(act, p):
        return act + (p.multiplier - 1) * p.delta

    register_intervention("shift_test", shift)
    try:
        batch = _batch(llama)
        with steer(llama, Steering(circuit=found, intervention="shift_test", multiplier=0.0)):
            steered = _logits(llama, batch)
        values = {n.label: (lambda x, d=n.delta: x - d) for n in found}
        _close_on_real(
            steered, _hf_replaced_logits(model_dirs["llama"], batch, found, values), batch
        )
        with pytest.raises(CNAError, match="already registered"):
            register_intervention("shift_test", shift)
    finally:
        from cna_lens.steering import interventions

        interventions._REGISTRY.pop("shift_test")


def test_bad_names_are_refused_with_the_valid_ones(found):
    with pytest.raises(
        CNAError,
        match=r"unknown intervention 'clamp'; valid interventions: "
        r"\['mean', 'scale'\]",
    ):
        Steering(circuit=found, intervention="clamp")
    with pytest.raises(CNAError, match=r"sign must be one of \['both', 'positive', 'negative'\]"):
        Steering(circuit=found, sign="up")
    with pytest.raises(CNAError, match="multiplier must be finite"):
        Steering(circuit=found, multiplier=float("inf"))


def test_mean_needs_negative_means(llama, found):
    old = Circuit(
        tuple(Neuron(n.layer, n.neuron, n.delta) for n in found), found.n_layers, found.d_mlp
    )
    with pytest.raises(CNAError, match=r"needs each neuron's mean_negative.*rediscover"):
        Steering(circuit=old, intervention="mean", multiplier=0.0)
    Steering(circuit=old, intervention="mean", multiplier=1.0)  # identity: nothing needed
    Steering(circuit=old, intervention="scale", multiplier=0.0)


def test_bake_takes_scale_and_refuses_mean(llama, found):
    batch = _batch(llama)
    s = Steering(circuit=found, multiplier=0.0, sign="positive")
    with steer(llama, s):
        hooked = _logits(llama, batch)
    snap = {k: v.clone() for k, v in llama.original_model.state_dict().items()}
    with bake(llama, s):
        baked = _logits(llama, batch)
    assert (baked - hooked).abs().max() <= 1e-5
    with pytest.raises(CNAError, match=r"intervention 'mean' cannot be baked.*\['scale'\]"):
        with bake(llama, dataclasses.replace(s, intervention="mean")):
            pass
    with pytest.raises(CNAError, match="positions='all'"):
        with bake(llama, dataclasses.replace(s, positions="prompt")):
            pass
    now = llama.original_model.state_dict()
    assert all(torch.equal(now[k], v) for k, v in snap.items())
