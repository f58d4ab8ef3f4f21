"""The fast backend: exactly the token ids of the bridge backend (one steered ``generate``
per condition through the bridge), for every condition kind, with no hook left behind and
the bridge's weights untouched."""

from __future__ import annotations

import pytest
import torch

import cna_lens
from cna_lens import CNAError, Steering, organism
from cna_lens.core.analysis import random_control_circuit
from cna_lens.evaluation import dose_sweep, sweep
from cna_lens.generation import FastBackend, generate_many, generate_token_ids
from cna_lens.generation.fast import _GroupHook
from cna_lens.steering.caa import CAA, compute_caa
from cna_lens.steering.interventions import _REGISTRY, Intervention

PROMPTS = [
    "How do I pick a lock? Please explain step by step.",
    "Write a poem about the ocean and the moon.",
    "What is the capital of France?",
    "lock pick",
    "Explain how vaccines train the immune system, in detail, for a child.",
    "def add(a, b): return a + b",
    "Numbers 1 2 3",
]
KW = dict(max_new_tokens=10, batch_size=5)


def _n_hooks(model) -> int:
    points = {id(hp): hp for hp in model.hook_dict.values()}
    return sum(len(hp._forward_hooks) for hp in points.values())


def _n_plain_hooks(gen: FastBackend) -> int:
    """Steering hooks on the plain model (transformers adds output-recording hooks of its
    own on the first forward pass; those are not counted)."""
    assert gen.hf is not None
    return sum(
        isinstance(h, _GroupHook)
        for m in gen.hf.modules()
        for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values())
    )


@pytest.fixture(scope="module")
def circuits(load):
    pos, neg = PROMPTS[:4], PROMPTS[4:]
    return {
        arch: cna_lens.discover(load(arch), pos, neg, top_k=40, universal_filter=False)
        for arch in ("llama", "qwen2", "gemma2", "gpt2")
    }


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gpt2"])
def test_fast_ids_equal_obvious_ids(arch, load, circuits):
    model, circuit = load(arch), circuits[arch]
    steerings = [None] + [Steering(circuit=circuit, multiplier=m) for m in (0.0, 1.0, 2.0, 0.75)]
    steerings += [
        Steering(circuit=circuit, multiplier=0.0, sign="positive"),
        Steering(circuit=circuit, multiplier=3.0, positions="generated"),
        Steering(circuit=circuit, multiplier=0.0, positions="prompt"),
    ]
    obvious = [generate_token_ids(model, PROMPTS, steering=s, **KW) for s in steerings]
    assert len({str(o) for o in obvious}) > 1  # steering changes the ids: the test can fail
    with FastBackend(model) as gen:
        single = [
            generate_token_ids(model, PROMPTS, steering=s, backend=gen, **KW) for s in steerings
        ]
        many = generate_many(model, PROMPTS, steerings, backend=gen, **KW).token_ids
        assert _n_plain_hooks(gen) == 0
    assert single == obvious
    assert many == obvious
    assert _n_hooks(model) == 0


def test_fast_texts_equal_generate_texts(llama, circuits):
    s = Steering(circuit=circuits["llama"], multiplier=0.0)
    fast = cna_lens.generate(llama, PROMPTS, steering=s, backend="fast", **KW)
    assert fast == cna_lens.generate(llama, PROMPTS, steering=s, **KW)


def test_random_control_and_mean_intervention(llama, circuits):
    control = random_control_circuit(circuits["llama"], seed=0)
    steerings = [
        Steering(circuit=control, multiplier=0.0),
        Steering(circuit=circuits["llama"], intervention="mean", multiplier=0.0),
    ]
    with FastBackend(llama) as gen:
        for s in steerings:
            assert generate_token_ids(llama, PROMPTS, steering=s, backend=gen, **KW) == (
                generate_token_ids(llama, PROMPTS, steering=s, **KW)
            )


def test_caa_equals_the_bridge_backend(llama):
    caa = compute_caa(llama, PROMPTS[:4], PROMPTS[4:])
    conditions = [CAA(caa, a, (1,)) for a in (-2.0, 0.0, 4.0)]
    texts = generate_many(llama, PROMPTS, conditions, backend="fast", **KW).texts
    for condition, fast in zip(conditions, texts, strict=True):
        assert fast == cna_lens.generate(llama, PROMPTS, steering=condition, **KW)
    assert texts[0] != texts[1]
    assert _n_hooks(llama) == 0


def test_dropping_finished_rows_changes_nothing(llama, circuits):
    s = Steering(circuit=circuits["llama"], multiplier=2.0)
    with FastBackend(llama, compact=False) as full, FastBackend(llama, min_rows=1) as tight:
        kw = dict(steering=s, max_new_tokens=24, batch_size=7)
        assert generate_token_ids(llama, PROMPTS, backend=full, **kw) == (
            generate_token_ids(llama, PROMPTS, **kw)
        )
        assert full.compact is False
        # which rows go on: unfinished ones, topped up to min_rows, in batch order
        active = torch.tensor([False, True, False, False, True, False])
        assert tight._rows_to_keep(active).tolist() == [1, 4]
        assert full._rows_to_keep(active) is None
    with FastBackend(llama) as gen:
        assert gen._rows_to_keep(active).tolist() == [0, 1, 2, 4]
        assert gen._rows_to_keep(torch.tensor([True, False, False, False])) is None


def test_organism_texts_equal(circuits):
    try:
        model = organism.load("instruct", device="cpu")
    except (FileNotFoundError, CNAError):
        pytest.skip("the model organism is not built into cna_lens/organism/data")
    circuit = cna_lens.discover(
        model,
        organism.prompts("discovery_harmful"),
        organism.prompts("discovery_benign"),
        fraction=0.01,
    )
    prompts = organism.prompts("eval_harmful")[:12] + organism.prompts("eval_benign")[:12]
    steerings = [Steering(circuit=circuit, multiplier=m) for m in (0.0, 1.0, 2.0)]
    steerings.append(Steering(circuit=circuit, multiplier=0.0, sign="positive"))
    kw = dict(max_new_tokens=24, batch_size=8)
    obvious = [cna_lens.generate(model, prompts, steering=s, **kw) for s in steerings]
    fast = generate_many(model, prompts, steerings, backend="fast", **kw).texts
    assert fast == obvious
    assert obvious[0] != obvious[1]  # ablating the circuit changes the organism's answers


def test_bridge_weights_shared_and_untouched(llama, circuits):
    before = {n: p.detach().clone() for n, p in llama.original_model.named_parameters()}
    with FastBackend(llama) as gen:
        bridge_ptrs = {p.data_ptr() for p in llama.original_model.parameters()}
        assert gen.hf is not None
        assert {p.data_ptr() for p in gen.hf.parameters()} <= bridge_ptrs  # shared, no copy
        s = Steering(circuit=circuits["llama"], multiplier=0.0)
        cna_lens.generate(llama, PROMPTS, steering=s, backend=gen, **KW)
    for n, p in llama.original_model.named_parameters():
        assert torch.equal(p, before[n]), n
    assert gen.hf is None  # closed


def test_no_hook_left_after_exception(llama, circuits, monkeypatch):
    def boom(act, p):
        raise RuntimeError("boom")

    # registered for this test only (the registry is global)
    monkeypatch.setitem(_REGISTRY, "fastgen_boom", Intervention("fastgen_boom", boom))
    s = Steering(circuit=circuits["llama"], intervention="fastgen_boom", multiplier=0.0)
    with FastBackend(llama) as gen:
        with pytest.raises(RuntimeError, match="boom"):
            cna_lens.generate(llama, PROMPTS, steering=s, backend=gen, **KW)
        assert _n_plain_hooks(gen) == 0
    assert _n_hooks(llama) == 0


def test_bad_arguments_refused(llama, load, circuits):
    gen = FastBackend(llama)
    with pytest.raises(CNAError, match="max_new_tokens"):
        cna_lens.generate(llama, PROMPTS, backend=gen, max_new_tokens=0)
    with pytest.raises(CNAError, match="vectors must be CAAVectors"):
        CAA(None, 1.0)
    with pytest.raises(CNAError, match="no conditions"):
        generate_many(llama, PROMPTS, [], backend=gen)
    with pytest.raises(CNAError, match="alpha must be finite"):
        CAA(compute_caa(llama, PROMPTS[:2], PROMPTS[2:4]), float("nan"))
    with pytest.raises(CNAError, match="min_rows"):
        FastBackend(llama, min_rows=0)
    with pytest.raises(CNAError, match="greedily"):
        cna_lens.generate(llama, PROMPTS, backend=gen, do_sample=True)
    with pytest.raises(cna_lens.CircuitMismatchError):
        s = Steering(circuit=circuits["llama"])
        cna_lens.generate(load("qwen2"), PROMPTS, steering=s, backend="fast")
    gen.close()
    with pytest.raises(CNAError, match="closed"):
        cna_lens.generate(llama, PROMPTS, backend=gen)


def test_evaluation_sweep_fast_equals_obvious(llama, circuits):
    caa = compute_caa(llama, PROMPTS[:4], PROMPTS[4:])
    kw = dict(
        circuit=circuits["llama"],
        caa=caa,
        multipliers=(0.0, 1.0, 2.0),
        caa_alphas=(-1.0, 0.0),
        max_new_tokens=8,
        batch_size=4,
    )
    sets = {"harmful": PROMPTS[:4], "benign": PROMPTS[4:]}
    fast = sweep(llama, sets, **kw)
    obvious = sweep(llama, sets, backend="bridge", **kw)
    cols = [c for c in fast.columns if c != "seconds"]
    assert fast[cols].equals(obvious[cols])
    seen = list(dict.fromkeys(zip(fast["method"], fast["strength"], strict=True)))
    assert seen == [
        ("cna", 0.0),
        ("cna", 1.0),
        ("cna", 2.0),
        ("caa", -1.0),
        ("caa", 0.0),
        ("random", 0.0),
    ]


def test_dose_sweep_fast_equals_obvious(llama):
    found = cna_lens.discover_full(
        llama, PROMPTS[:4], PROMPTS[4:], fraction=0.01, universal_filter=False
    )
    kw = dict(
        fractions=(0.005, 0.01),
        multipliers=(0.0, 1.0),
        signs=("both", "positive"),
        max_new_tokens=8,
        batch_size=4,
    )
    sets = {"harmful": PROMPTS[:4], "benign": PROMPTS[4:]}
    fast = dose_sweep(llama, found, sets, **kw)
    obvious = dose_sweep(llama, found, sets, backend="bridge", **kw)
    cols = [c for c in fast.columns if c != "seconds"]
    assert fast[cols].equals(obvious[cols])


def test_cli_obvious_flags():
    from cna_lens.cli import _build_parser

    parser, _ = _build_parser()
    common = [
        "--model",
        "m",
        "--positive",
        "p",
        "--negative",
        "n",
        "--prompts-harmful",
        "h",
        "--prompts-benign",
        "b",
        "--out",
        "o",
    ]
    assert parser.parse_args(["sweep", *common, "--obvious"]).obvious is True
    assert parser.parse_args(["sweep", *common]).obvious is False
    assert parser.parse_args(["reproduce", "--obvious"]).obvious is True
