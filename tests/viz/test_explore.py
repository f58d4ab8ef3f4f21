"""Exploring a circuit: the activation cache, neuron cards and the circuit map."""

from __future__ import annotations

import types

import pytest
import torch

import cna_lens as cl
from cna_lens import viz as ex
from cna_lens.core.activations import NeuronStats
from cna_lens.core.circuit import Circuit, Neuron
from cna_lens.errors import CNAError
from cna_lens.models.loading import MLP_HOOK
from cna_lens.viz import explore


@pytest.fixture
def sets(prompts):
    """(positive, negative, both) from conftest's prompt sets."""
    pos, neg = prompts
    return pos, neg, pos + neg


def _hook(layer: int) -> str:
    return MLP_HOOK.format(layer=layer)


# ----------------------------------------------------------------------------- the cache
def test_cache_last_token_equals_discovery_activations_bit_for_bit(llama, sets):
    positive, negative, texts = sets
    cache = cl.activation_cache(llama, texts, batch_size=4)
    assert sorted(cache.keys()) == sorted(_hook(layer) for layer in range(llama.cfg.n_layers))
    seen = 0
    stats = None
    for batch, acts in cl.iter_activations(llama, texts, batch_size=4):
        for row, i in enumerate(batch.indices):
            for layer in range(llama.cfg.n_layers):
                assert torch.equal(cache[_hook(layer)][i], acts[row, layer])
            seen += 1
        # Discovery's statistics, rebuilt from the cache's rows of this batch, are identical.
        rows = torch.stack(
            [
                torch.stack([cache[_hook(layer)][i] for layer in range(llama.cfg.n_layers)])
                for i in batch.indices
            ]
        )
        part = NeuronStats.of(rows)
        stats = part if stats is None else stats.merge(part)
    assert seen == len(texts)
    reference, _ = cl.activation_stats(llama, texts, batch_size=4)
    assert torch.equal(stats.total, reference.total)
    assert torch.equal(stats.total_sq, reference.total_sq)


def test_cache_all_positions_layout(llama, sets):
    positive, negative, texts = sets
    last = cl.activation_cache(llama, texts, layers=[1], batch_size=4)
    full = cl.activation_cache(llama, texts, layers=[1], positions="all", batch_size=4)
    act = full[_hook(1)]
    mask = full.attention_mask
    assert act.shape[:2] == mask.shape == full.input_ids.shape
    assert act.shape[0] == len(texts)
    assert torch.equal(act[:, -1], last[_hook(1)])  # left padding: the last column is real
    assert torch.all(act[mask == 0] == 0)
    assert [len(t) for t in full.str_tokens] == mask.sum(1).tolist()
    assert full.prompts == texts and full.layers == [1] and full.positions == "all"
    # Real positions of a prompt alone equal a plain run of the bridge on it.
    single = cl.activation_cache(llama, texts[2:3], layers=[1], positions="all", batch_size=1)
    batch = cl.tokenize_prompts(llama, texts[2:3], batch_size=1)[0]
    with torch.inference_mode():
        _, ref = llama.run_with_cache(batch.input_ids, names_filter=[_hook(1)])
    assert torch.equal(single[_hook(1)], ref[_hook(1)])
    assert single.str_tokens[0] == [
        llama.tokenizer.decode([i]) for i in batch.input_ids[0].tolist()
    ]


def test_cache_layer_subset_including_the_last_layer(llama, sets):
    positive, negative, texts = sets
    everything = cl.activation_cache(llama, texts, batch_size=8)
    last = llama.cfg.n_layers - 1
    some = cl.activation_cache(llama, texts, layers=[last, 0], batch_size=8)
    assert sorted(some.keys()) == sorted([_hook(0), _hook(last)])
    assert some.layers == [0, last]
    for layer in (0, last):
        assert torch.equal(some[_hook(layer)], everything[_hook(layer)])
    assert not llama.hook_dict[_hook(last)].fwd_hooks  # no hook left behind


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(layers=[]), "layers is empty"),
        (dict(layers=[0, 7]), r"layers \[7\] out of range; valid layers are 0\.\.2"),
        (dict(layers=[-1]), "out of range"),
        (dict(positions="first"), r"positions must be one of \['last', 'all'\], got 'first'"),
    ],
)
def test_cache_bad_input(llama, kwargs, match, sets):
    positive, negative, texts = sets
    with pytest.raises(CNAError, match=match):
        cl.activation_cache(llama, texts, **kwargs)


# ----------------------------------------------------------------------------- logit lens
def test_logit_lens_equals_hand_computation_rmsnorm(llama):
    layer, j = 1, 17
    w_norm = llama.ln_final.original_component.weight
    hand = ((llama.W_out[layer][j] * w_norm) @ llama.W_U).detach()
    logits = ex.neuron_logits(llama, (layer, j))
    assert torch.equal(logits, hand)
    table = ex.logit_lens(llama, f"L{layer}N{j}", k=4)
    promoted = table[table["direction"] == "promoted"]
    suppressed = table[table["direction"] == "suppressed"]
    assert promoted["token_id"].iloc[0] == int(hand.argmax())
    assert suppressed["token_id"].iloc[0] == int(hand.argmin())
    assert promoted["logit"].is_monotonic_decreasing
    assert suppressed["logit"].is_monotonic_increasing
    for _, row in table.iterrows():
        assert row["logit"] == float(hand[row["token_id"]])
        assert row["token"] == llama.tokenizer.decode([row["token_id"]])


def test_logit_lens_gemma_norm_uses_one_plus_weight(load):
    gemma = load("gemma2")
    module = gemma.ln_final.original_component
    x = torch.randn(gemma.cfg.d_model, generator=torch.Generator().manual_seed(0))
    rms = x.pow(2).mean().add(module.eps).sqrt()
    with torch.no_grad():
        torch.testing.assert_close(module(x), x / rms * (1.0 + module.weight))
    layer, j = 2, 5
    hand = (gemma.W_out[layer][j] * (1.0 + module.weight)) @ gemma.W_U
    assert torch.equal(ex.neuron_logits(gemma, Neuron(layer, j)), hand.detach())


def test_logit_lens_layernorm_centres_the_direction(load):
    gpt2 = load("gpt2")
    module = gpt2.ln_final.original_component
    layer, j = 0, 3
    column = gpt2.W_out[layer][j]
    with torch.no_grad():  # what the model's norm does to the column, up to 1/std
        normed = module(column) - module.bias
        std = (column.var(unbiased=False) + module.eps).sqrt()
        torch.testing.assert_close(normed * std, (column - column.mean()) * module.weight)
    hand = ((column - column.mean()) * module.weight) @ gpt2.W_U
    torch.testing.assert_close(ex.neuron_logits(gpt2, (layer, j)), hand.detach(), rtol=0, atol=1e-6)


def test_logit_lens_refuses_a_model_without_unembedding(llama):
    class NoUnembed:
        cfg = llama.cfg
        blocks = llama.blocks
        ln_final = llama.ln_final
        tokenizer = llama.tokenizer

        @property
        def W_U(self):
            raise AttributeError("no unembed component")

    with pytest.raises(CNAError, match="no unembedding W_U the logit lens can read"):
        ex.neuron_logits(NoUnembed(), (0, 1))
    no_norm = types.SimpleNamespace(cfg=llama.cfg, W_U=llama.W_U, ln_final=None)
    with pytest.raises(CNAError, match="no final norm"):
        ex.neuron_logits(no_norm, (0, 1))


@pytest.mark.parametrize(
    ("neuron", "match"),
    [
        ((0, 128), r"L0N128: neuron 128 outside the model's 128 neurons per layer \(0\.\.127\)"),
        ((3, 0), r"L3N0: layer 3 outside the model's layers 0\.\.2"),
        ("L1X2", "not of the form"),
        (5, "expected a Neuron, a Circuit"),
    ],
)
def test_neuron_outside_the_model(llama, neuron, match):
    with pytest.raises(CNAError, match=match):
        ex.logit_lens(llama, neuron)


# ----------------------------------------------------------------------------- ablation
def test_single_neuron_ablation_equals_two_forward_passes(llama, sets):
    positive, negative, texts = sets
    layer, j = 2, 40
    prompts = texts[:3]
    table = ex.ablation_effect(llama, (layer, j), prompts, batch_size=2)
    ids = ex.refusal_token_ids(llama)
    assert table["token_id"].tolist() == list(ids.values()) * len(prompts)

    def zero(act, hook):
        act = act.clone()
        act[..., j] = 0.0
        return act

    for batch in cl.tokenize_prompts(llama, prompts, batch_size=2):
        with torch.inference_mode():
            clean = llama(batch.input_ids, attention_mask=batch.attention_mask)[:, -1]
            with llama.hooks(fwd_hooks=[(_hook(layer), zero)]):
                ablated = llama(batch.input_ids, attention_mask=batch.attention_mask)[:, -1]
        for row, i in enumerate(batch.indices):
            rows = table[table["prompt"] == prompts[i]]
            for _, r in rows.iterrows():
                t = r["token_id"]
                assert r["clean"] == float(clean[row, t])
                assert r["ablated"] == float(ablated[row, t])
                assert r["change"] == float(ablated[row, t]) - float(clean[row, t])
    assert (table["change"] != 0).any()


def test_refusal_tokens(llama):
    ids = ex.refusal_token_ids(llama)
    assert ids
    for text, i in ids.items():
        assert llama.tokenizer.decode([i]) == text
    assert ex.refusal_token_ids(llama, ["I", "zzqx wholly absent"]) == {"I": ids["I"]}
    with pytest.raises(CNAError, match="is a single token of this tokenizer"):
        ex.refusal_token_ids(llama, ["zzqx wholly absent"])


# ----------------------------------------------------------------------------- the card
def test_distribution_needs_two_prompts_per_set():
    with pytest.raises(CNAError, match=r"the negative set has 1 prompt\(s\); .* >= 2 per set"):
        ex.distribution_figure([1.0, 2.0], [3.0])
    fig = ex.distribution_figure([1.0, 2.0, 4.0], [0.0, 1.0], label="L0N1")
    assert [list(t.y) for t in fig.data] == [[1.0, 2.0, 4.0], [0.0, 1.0]]


def test_neuron_card_values_are_the_caches(llama, sets):
    positive, negative, texts = sets
    found = cl.discover_full(llama, positive, negative, top_k=3, universal_filter=False)
    card = cl.neuron_card(llama, found.circuit, positive, negative, rank=1, k=3)
    n = found.circuit.neurons[1]
    assert card.neuron == n
    pos = cl.activation_cache(llama, positive, layers=[n.layer])[_hook(n.layer)][:, n.neuron]
    neg = cl.activation_cache(llama, negative, layers=[n.layer])[_hook(n.layer)][:, n.neuron]
    assert card.activations["activation"].tolist() == pos.tolist() + neg.tolist()
    assert card.activations["prompt"].tolist() == texts
    # Discovery's statistics hold the same values.
    a = found.attribution
    assert card.activations["activation"][:5].sum() == pytest.approx(
        float(a.positive.total[n.layer, n.neuron]), rel=1e-6
    )
    top = card.top_prompts[card.top_prompts["end"] == "top"]
    bottom = card.top_prompts[card.top_prompts["end"] == "bottom"]
    assert top["activation"].is_monotonic_decreasing and len(top) == 3
    assert bottom["activation"].is_monotonic_increasing
    assert top["activation"].iloc[0] == max(pos.tolist() + neg.tolist())
    assert bottom["activation"].iloc[0] == min(pos.tolist() + neg.tolist())
    by_prompt = dict(zip(card.activations["prompt"], card.activations["activation"], strict=True))
    for _, row in card.top_prompts.iterrows():
        assert by_prompt[row["prompt"]] == row["activation"]
    # The strip is on the most activating prompt, and its last cell is that activation
    # (a batch of one, so equal up to float rounding of the batched run).
    strip = card.strip.data[0]
    assert strip.z[0][-1] == pytest.approx(top["activation"].iloc[0], rel=1e-4, abs=1e-5)
    assert set(card.ablation["prompt"]) == set(top["prompt"])
    assert set(card.figures()) == {f"{n.label}_distribution", f"{n.label}_strip"}
    html = card._repr_html_()
    assert n.label in html and "<table" in html


def test_neuron_card_measures_delta_of_a_bare_neuron(llama, sets):
    positive, negative, texts = sets
    card = cl.neuron_card(llama, "L0N5", positive, negative, k=2)
    stats = cl.attribute(llama, positive, negative)
    assert card.neuron.label == "L0N5"
    assert card.neuron.delta == pytest.approx(float(stats.delta[0, 5]), rel=1e-5, abs=1e-7)


def test_neuron_card_bad_input(llama, sets):
    positive, negative, texts = sets
    with pytest.raises(CNAError, match=r"the positive set has 1 prompt\(s\).*needs >= 2"):
        cl.neuron_card(llama, (0, 1), positive[:1], negative)
    with pytest.raises(CNAError, match="outside the model"):
        cl.neuron_card(llama, (0, 999), positive, negative)
    circuit = Circuit.from_pairs([(0, 1)], n_layers=3, d_mlp=128)
    with pytest.raises(CNAError, match="rank 1 out of range for a circuit of 1 neurons"):
        cl.neuron_card(llama, circuit, positive, negative, rank=1)


# ----------------------------------------------------------------------------- the map
def test_circuit_map_points_and_hover(llama, sets):
    positive, negative, texts = sets
    found = cl.discover_full(
        llama,
        positive,
        negative,
        top_k=4,
        universal_prompts=negative,
        universal_top_fraction=0.05,
        universal_threshold=0.5,
    )
    assert found.universal is not None and len(found.universal) > 0
    fig = cl.circuit_map(found, top_n_per_layer=3, n_random=20)
    traces = {t.name.split(" ")[0]: t for t in fig.data}
    circuit_labels = [c[0] for c in traces["circuit"].customdata]
    assert sorted(circuit_labels) == sorted(found.circuit.labels)
    universal_labels = {c[0] for c in traces["universal"].customdata}
    assert universal_labels == {f"L{a}N{b}" for a, b in found.universal.pairs}
    n_points = sum(len(t.customdata) for t in fig.data)
    shown = set(found.circuit.pairs) | set(found.universal.pairs)
    delta = found.attribution.delta
    for layer in range(3):
        shown |= {(layer, int(j)) for j in delta[layer].abs().topk(3).indices}
    assert n_points == len(shown) + 20
    effect = found.attribution.effect_size
    for t in fig.data:
        for (label, eff), y in zip(t.customdata, t.y, strict=True):
            n = explore._as_neuron(llama, label)
            assert y == float(delta[n.layer, n.neuron])
            assert eff == float(effect[n.layer, n.neuron])
    assert "random" in fig.layout.title.text


# ----------------------------------------------------------------------------- organism
def _organism():
    try:
        from cna_lens import organism

        return organism, organism.load("instruct", device="cpu")
    except Exception as exc:  # noqa: BLE001 - any missing piece means: skip
        pytest.skip(f"the model organism is not available: {exc}")


def test_organism_card_reads_its_role():
    organism, model = _organism()
    harmful = organism.prompts("discovery_harmful")
    benign = organism.prompts("discovery_benign")
    found = cl.discover_full(
        model,
        harmful,
        benign,
        fraction=organism.CIRCUIT_FRACTION,
        universal_prompts=organism.prompts("universal"),
    )
    ids = ex.refusal_token_ids(model)
    assert "sorry" in ids  # the organism refuses with "sorry , i cannot help with that ."
    for rank in range(3):
        card = cl.neuron_card(
            model, found.circuit, harmful, benign, rank=rank, k=5, names=("harmful", "benign")
        )
        top = card.top_prompts[card.top_prompts["end"] == "top"]
        # The set it fires most on is the one its delta's sign says.
        assert set(top["set"]) == {"harmful" if card.neuron.delta > 0 else "benign"}
        a = found.attribution
        values = card.activations.groupby("set")["activation"].sum()
        n = card.neuron
        assert values["harmful"] == pytest.approx(
            float(a.positive.total[n.layer, n.neuron]), rel=1e-6
        )
