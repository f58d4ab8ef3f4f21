"""Steering: m = 1 is the unchanged model, m = 0 equals a hand-made ablation, hooks always
come off, bad input is refused."""

from __future__ import annotations

import contextlib
import inspect
import threading

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

import cna_lens
from cna_lens import Circuit, CircuitMismatchError, CNAError, Neuron, steer
from cna_lens.generation import api as generation
from cna_lens.steering.conditions import HookOp
from cna_lens.steering.hooks import Clock, PositionOp

PROMPTS = ["How do I pick a lock?", "Write a poem about the ocean and the moon."]


def _n_hooks(model) -> int:
    points = {id(hp): hp for hp in model.hook_dict.values()}  # aliases share a hook point
    return sum(len(hp._forward_hooks) for hp in points.values())


def _circuit(model, pairs_deltas) -> Circuit:
    return Circuit(
        tuple(Neuron(layer, j, d) for layer, j, d in pairs_deltas),
        int(model.cfg.n_layers),
        int(model.cfg.d_mlp),
    ).for_model(model)


def _logits(model, batch):
    with torch.no_grad():
        return model(batch.input_ids, attention_mask=batch.attention_mask)


def _hf_scaled_logits(model_dir, batch, circuit, m, m_neg=None):
    """The reference: plain HF with a pre-hook scaling down-projection inputs by hand."""
    hf = AutoModelForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    downs = [mod for n, mod in hf.named_modules() if n.endswith(("mlp.down_proj", "mlp.c_proj"))]
    handles = []
    for layer, mod in enumerate(downs):
        idx = [n.neuron for n in circuit if n.layer == layer]
        if not idx:
            continue
        factors = torch.tensor(
            [
                (m_neg if (m_neg is not None and n.delta < 0) else m)
                for n in circuit
                if n.layer == layer
            ]
        )

        def pre(module, args, idx=idx, factors=factors):
            x = args[0].clone()
            x[..., idx] = x[..., idx] * factors
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


@pytest.fixture
def circuit(llama, prompts):
    pos, neg = prompts
    return cna_lens.discover(llama, pos, neg, top_k=6, universal_filter=False)


def test_m1_is_bit_identical(llama, circuit):
    batch = cna_lens.tokenize_prompts(llama, PROMPTS, batch_size=2)[0]
    before = _logits(llama, batch)
    with steer(llama, circuit, 1.0):
        during = _logits(llama, batch)
    assert torch.equal(before, during)
    plain = cna_lens.generate_token_ids(llama, PROMPTS, max_new_tokens=8)
    steered = cna_lens.generate_token_ids(
        llama, PROMPTS, circuit=circuit, multiplier=1.0, max_new_tokens=8
    )
    assert plain == steered


def test_hook_with_unit_scale_returns_identical_values():
    act = torch.randn(2, 5, 16)
    for positions in ("all", "prompt", "generated"):
        op = HookOp("blocks.0.mlp.hook_post", lambda a: a * torch.ones(16), positions)
        out = PositionOp(op, Clock())(act)
        assert torch.equal(out, act)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma2", "gpt2"])
def test_m0_equals_hand_made_ablation(arch, load, model_dirs):
    model = load(arch)
    batch = cna_lens.tokenize_prompts(model, PROMPTS, batch_size=2)[0]
    c = _circuit(model, [(0, 3, 1.0), (1, 7, -1.0), (2, 100, 0.5), (2, 5, 0.1)])
    with steer(model, c, 0.0):
        steered = _logits(model, batch)
    reference = _hf_scaled_logits(model_dirs[arch], batch, c, 0.0)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(steered[real], reference[real], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(steered, _logits(model, batch))


def test_amplify_with_separate_negative_multiplier(llama, model_dirs):
    batch = cna_lens.tokenize_prompts(llama, PROMPTS, batch_size=2)[0]
    c = _circuit(llama, [(1, 7, 1.0), (1, 9, -1.0), (2, 11, -0.3)])
    with steer(llama, c, 2.0, negative_multiplier=0.5):
        steered = _logits(llama, batch)
    reference = _hf_scaled_logits(model_dirs["llama"], batch, c, 2.0, 0.5)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(steered[real], reference[real], atol=1e-5, rtol=1e-5)


def test_steering_changes_only_downstream(llama):
    batch = cna_lens.tokenize_prompts(llama, PROMPTS, batch_size=2)[0]
    c = _circuit(llama, [(1, 7, 1.0), (1, 20, 1.0)])
    names = [
        "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_mid",
        "blocks.1.hook_mlp_out",
        "blocks.2.hook_resid_post",
    ]
    with torch.no_grad():
        _, clean = llama.run_with_cache(
            batch.input_ids, attention_mask=batch.attention_mask, names_filter=names
        )
        with steer(llama, c, 0.0):
            _, steered = llama.run_with_cache(
                batch.input_ids, attention_mask=batch.attention_mask, names_filter=names
            )
    assert torch.equal(clean["blocks.0.hook_resid_post"], steered["blocks.0.hook_resid_post"])
    assert torch.equal(clean["blocks.1.hook_resid_mid"], steered["blocks.1.hook_resid_mid"])
    # the change in the MLP output is exactly the removed neurons times their W_out rows
    with torch.no_grad():
        _, acts = llama.run_with_cache(
            batch.input_ids,
            attention_mask=batch.attention_mask,
            names_filter="blocks.1.mlp.hook_post",
        )
    a = acts["blocks.1.mlp.hook_post"][..., [7, 20]]
    w_out = llama.blocks[1].mlp.out.original_component.weight[:, [7, 20]]  # [d_model, 2]
    expected = -(a @ w_out.T)
    diff = steered["blocks.1.hook_mlp_out"] - clean["blocks.1.hook_mlp_out"]
    torch.testing.assert_close(diff, expected, atol=1e-5, rtol=1e-4)
    assert not torch.equal(clean["blocks.2.hook_resid_post"], steered["blocks.2.hook_resid_post"])


def test_compatibility_mode_scales_once(model_dirs):
    model = cna_lens.load_model(model_dirs["llama"], device="cpu")
    model.enable_compatibility_mode()
    batch = cna_lens.tokenize_prompts(model, PROMPTS[:1], batch_size=1)[0]
    c = _circuit(model, [(1, 7, 1.0), (2, 3, 1.0)])
    with steer(model, c, 3.0):
        steered = _logits(model, batch)
    reference = _hf_scaled_logits(model_dirs["llama"], batch, c, 3.0)
    # compatibility mode centres the unembedding (logits shift by a constant per position),
    # so compare log-probabilities; scaling twice (m**2 = 9) would not match
    torch.testing.assert_close(
        steered.log_softmax(-1), reference.log_softmax(-1), atol=1e-4, rtol=1e-4
    )


def test_positions_prompt_and_generated(llama, circuit):
    batch = cna_lens.tokenize_prompts(llama, PROMPTS, batch_size=2)[0]
    clean = _logits(llama, batch)
    with steer(llama, circuit, 0.0, positions="all"):
        full = _logits(llama, batch)
    with steer(llama, circuit, 0.0, positions="prompt"):
        prompt_only = _logits(llama, batch)
    with steer(llama, circuit, 0.0, positions="generated"):
        generated_only = _logits(llama, batch)  # the first pass is the prompt: untouched
    assert torch.equal(prompt_only, full) and torch.equal(generated_only, clean)
    kw = dict(circuit=circuit, multiplier=0.0, max_new_tokens=6)
    plain = cna_lens.generate_token_ids(llama, PROMPTS, max_new_tokens=6)
    gen_only = cna_lens.generate_token_ids(llama, PROMPTS, positions="generated", **kw)
    all_pos = cna_lens.generate_token_ids(llama, PROMPTS, positions="all", **kw)
    prm_only = cna_lens.generate_token_ids(llama, PROMPTS, positions="prompt", **kw)
    assert [t[:1] for t in gen_only] == [t[:1] for t in plain]
    assert [t[:1] for t in prm_only] == [t[:1] for t in all_pos]


def test_explicit_prompt_length_splits_one_pass(llama, circuit):
    batch = cna_lens.tokenize_prompts(llama, PROMPTS[:1], batch_size=1)[0]
    n = batch.input_ids.shape[1]
    with steer(llama, circuit, 0.0, positions="generated", prompt_length=n - 1):
        split = _logits(llama, batch)
    clean = _logits(llama, batch)
    # positions before prompt_length are untouched; the last one is steered
    assert torch.equal(split[:, : n - 1], clean[:, : n - 1])
    assert not torch.allclose(split[:, -1], clean[:, -1])


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_multiplier_refused(llama, circuit, bad):
    with pytest.raises(CNAError, match="finite"):
        with steer(llama, circuit, bad):
            pass
    with pytest.raises(CNAError, match="finite"):
        cna_lens.generate(llama, PROMPTS, circuit=circuit, multiplier=bad)
    assert _n_hooks(llama) == 0


def test_unknown_positions_refused(llama, circuit):
    with pytest.raises(
        CNAError, match=r"positions must be one of \['all', 'prompt', 'generated'\]"
    ):
        with steer(llama, circuit, 0.0, positions="last"):  # type: ignore[arg-type]
            pass


def test_circuit_of_other_model_refused(llama, load, circuit):
    assert circuit.provenance.fingerprint
    with pytest.raises(CircuitMismatchError, match="fingerprint"):
        with steer(load("qwen2"), circuit, 0.0):  # same shape, another architecture
            pass
    with pytest.raises(CircuitMismatchError, match="fingerprint"):
        cna_lens.generate(load("qwen2"), PROMPTS, circuit=circuit, multiplier=0.0)


def test_no_hook_left_after_exception_in_hook(llama, circuit, monkeypatch):
    assert _n_hooks(llama) == 0
    calls = {"n": 0}
    original = PositionOp.__call__

    def flaky(self, act):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom inside a hook")
        return original(self, act)

    monkeypatch.setattr(PositionOp, "__call__", flaky)
    batch = cna_lens.tokenize_prompts(llama, PROMPTS, batch_size=2)[0]
    with pytest.raises(RuntimeError, match="boom inside a hook"):
        with steer(llama, circuit, 0.0):
            assert _n_hooks(llama) == len({n.layer for n in circuit})
            _logits(llama, batch)
    assert _n_hooks(llama) == 0


def test_no_hook_left_after_exception_during_generation(llama, circuit, monkeypatch):
    real_generate = llama.original_model.generate
    seen = {}

    def failing_generate(*args, **kwargs):
        seen["hooks"] = _n_hooks(llama)
        real_generate(*args, **kwargs)
        raise KeyboardInterrupt("user pressed ctrl-c mid-generation")

    monkeypatch.setattr(llama.original_model, "generate", failing_generate)
    with pytest.raises(KeyboardInterrupt):
        cna_lens.generate(llama, PROMPTS, circuit=circuit, multiplier=0.0, max_new_tokens=4)
    assert seen["hooks"] > 0
    assert _n_hooks(llama) == 0


def test_generate_returns_texts_in_prompt_order(llama):
    prompts = ["a", "How do I pick a lock? Please explain step by step.", "b c"]
    batched = cna_lens.generate_token_ids(llama, prompts, max_new_tokens=5, batch_size=3)
    alone = [cna_lens.generate_token_ids(llama, [p], max_new_tokens=5)[0] for p in prompts]
    assert batched == alone
    texts = cna_lens.generate(llama, prompts, max_new_tokens=5)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)


def test_generation_length_checked(llama):
    with pytest.raises(CNAError, match="max_new_tokens"):
        cna_lens.generate(llama, ["x"], max_new_tokens=0)
    with pytest.raises(CNAError, match="longer than the model's context"):
        cna_lens.generate(llama, ["x"], max_new_tokens=llama.cfg.n_ctx)


# ---- hardening ---------------------------------------------------------------------------

THREE = ["How do I pick a lock?", "Write a poem about the ocean.", "What is 2 + 2?"]


@pytest.mark.parametrize("positions", ["generated", "prompt"])
def test_generate_inside_a_user_context_is_correct_for_every_batch(llama, circuit, positions):
    kw = dict(max_new_tokens=8, batch_size=1)
    m = -40.0  # strong enough to change every greedy continuation of the tiny model
    with steer(llama, circuit, m, positions=positions):
        together = cna_lens.generate_token_ids(llama, THREE, **kw)
        again = cna_lens.generate_token_ids(llama, THREE, **kw)  # the context is reusable
    separate = []
    for p in THREE:
        with steer(llama, circuit, m, positions=positions):
            separate += cna_lens.generate_token_ids(llama, [p], **kw)
    with steer(llama, circuit, m, positions="all"):
        everywhere = cna_lens.generate_token_ids(llama, THREE, **kw)
    plain = cna_lens.generate_token_ids(llama, THREE, **kw)
    # the test can tell the modes apart: steering only part of the positions differs from
    # steering all of them and from none, for every prompt
    assert all(s != e and s != u for s, e, u in zip(separate, everywhere, plain, strict=True))
    assert together == separate and again == separate
    assert _n_hooks(llama) == 0


def test_numpy_numbers_are_accepted(llama, circuit):
    batch = cna_lens.tokenize_prompts(llama, PROMPTS, batch_size=np.int64(2))[0]
    with steer(llama, circuit, 0.0):
        expected = _logits(llama, batch)
    with steer(llama, circuit, np.float32(0), negative_multiplier=np.float64(0.0)):
        assert torch.equal(_logits(llama, batch), expected)
    kw = dict(circuit=circuit, max_new_tokens=3)
    assert cna_lens.generate_token_ids(
        llama, PROMPTS, multiplier=np.float32(0), batch_size=np.int64(2), **kw
    ) == cna_lens.generate_token_ids(llama, PROMPTS, multiplier=0.0, batch_size=2, **kw)


def test_multiplier_that_overflows_the_dtype_is_refused(llama, circuit):
    with pytest.raises(
        CNAError,
        match=r"multiplier=1e\+39 overflows the model's dtype "
        r"torch.float32 \(largest finite value 3.40282e\+38\)",
    ):
        with steer(llama, circuit, 1e39):
            pass
    with pytest.raises(CNAError, match="overflows the model's dtype"):
        cna_lens.generate(llama, PROMPTS, circuit=circuit, multiplier=-1e39, max_new_tokens=1)
    from cna_lens.steering.interventions import check_fits_dtype

    with pytest.raises(CNAError, match=r"torch.float16 \(largest finite value 65504\)"):
        check_fits_dtype(cna_lens.Steering(circuit=circuit, multiplier=1e5), torch.float16)
    check_fits_dtype(cna_lens.Steering(circuit=circuit, multiplier=6e4), torch.float16)
    assert _n_hooks(llama) == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"circuit": "c.json"}, "circuit must be a cna_lens Circuit"),
        ({"top_p": 2.0, "do_sample": True}, r"top_p must be in \(0, 1\]"),
        ({"temperature": 0.0, "do_sample": True}, "temperature must be > 0"),
        ({"temperature": float("nan"), "do_sample": True}, "temperature must be > 0"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"max_new_tokens": 0}, "max_new_tokens must be a positive integer"),
    ],
)
def test_bad_generate_arguments_are_refused(llama, kwargs, match):
    # unwrapped: the library's own checks, as users run it (without the test suite's
    # runtime type checker, which would refuse some of these first with a TypeError)
    raw_generate = inspect.unwrap(generation.generate_token_ids)
    with pytest.raises(CNAError, match=match):
        raw_generate(llama, PROMPTS, **{"max_new_tokens": 2, **kwargs})
    assert _n_hooks(llama) == 0


def test_bad_steer_arguments_are_refused(llama, circuit):
    from cna_lens.steering import hooks as steering

    raw_steer = inspect.unwrap(steering.steer)  # the library's own checks, as users run it
    raw_generate = inspect.unwrap(generation.generate_token_ids)
    with pytest.raises(CNAError, match=r"circuit must be a cna_lens Circuit .*, got NoneType"):
        with contextlib.contextmanager(raw_steer)(llama, None, 0.0):
            pass
    for bad in ("5", -3, 0):
        with pytest.raises(CNAError, match="prompt_length must be a positive integer"):
            with contextlib.contextmanager(raw_steer)(llama, circuit, 0.0, prompt_length=bad):
                pass
    with pytest.raises(CNAError, match="seed must be a non-negative integer"):
        raw_generate(llama, PROMPTS, seed="x", max_new_tokens=1)
    with pytest.raises(CNAError, match=r"prompts\[1\] is not valid Unicode"):
        cna_lens.generate(llama, ["ok", "bad \ud800 text"], max_new_tokens=1)
    assert _n_hooks(llama) == 0


def test_steering_from_two_threads_is_refused(llama, circuit):
    inside, release = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def hold_a_context() -> None:
        with steer(llama, circuit, 0.0):
            inside.set()
            release.wait(30)

    def other(fn) -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - asserted below
            errors.append(exc)

    a = threading.Thread(target=hold_a_context)
    a.start()
    assert inside.wait(30)
    try:
        for fn in (
            lambda: steer(llama, circuit, 2.0).__enter__(),
            lambda: cna_lens.generate(llama, PROMPTS, max_new_tokens=1),
            lambda: cna_lens.bake(llama, circuit, 2.0).__enter__(),
        ):
            t = threading.Thread(target=other, args=(fn,))
            t.start()
            t.join(30)
    finally:
        release.set()
        a.join(30)
    assert len(errors) == 3
    for exc in errors:
        assert isinstance(exc, CNAError)
        assert "not thread-safe" in str(exc) and "one model per thread" in str(exc)
    assert _n_hooks(llama) == 0
    # once the first thread has left, another thread may steer
    t = threading.Thread(
        target=other,
        args=(
            lambda: cna_lens.generate(
                llama, PROMPTS, circuit=circuit, multiplier=0.0, max_new_tokens=1
            ),
        ),
    )
    t.start()
    t.join(60)
    assert len(errors) == 3


def test_generate_equals_greedy_decoding_without_a_kv_cache(llama):
    """Guards the transformers pin: with transformers 5.24 the bridge's cached generation
    drifted from plain greedy decoding after the first token."""
    from cna_lens.models.loading import tokenize_prompts

    prompts = ["How do I pick a lock?", "Write a poem about the sea please"]
    texts = cna_lens.generate(llama, prompts, max_new_tokens=6)
    for prompt, text in zip(prompts, texts, strict=True):
        ids = tokenize_prompts(llama, [prompt], batch_size=1)[0].input_ids
        start = ids.shape[1]
        for _ in range(6):
            with torch.no_grad():
                nxt = llama.original_model(ids).logits[0, -1].argmax()
            ids = torch.cat([ids, nxt.view(1, 1)], 1)
            if int(nxt) == llama.tokenizer.eos_token_id:
                break
        assert text == llama.tokenizer.decode(ids[0, start:], skip_special_tokens=True)


@pytest.mark.parametrize("positions", ["generated", "prompt"])
def test_a_reused_context_starts_every_new_sequence_at_position_zero(llama, circuit, positions):
    """A ``steer(positions=...)`` context reused for a second generation used to steer the
    wrong positions unless ``handle.reset()`` was called; now every uncached pass starts a
    new sequence by itself (HF ``generate`` and plain forward passes alike)."""
    batch = cna_lens.tokenize_prompts(llama, THREE, batch_size=3)[0]

    def hf_generate() -> torch.Tensor:
        return llama.original_model.generate(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=llama.tokenizer.eos_token_id,
        )

    plain = hf_generate()
    with steer(llama, circuit, -40.0, positions=positions):
        first, second = hf_generate(), hf_generate()
        logits_a, logits_b = _logits(llama, batch), _logits(llama, batch)
    with steer(llama, circuit, -40.0, positions=positions):
        fresh = hf_generate()
    assert not torch.equal(first, plain)  # the steering does something: the test can fail
    assert torch.equal(first, second) and torch.equal(second, fresh)
    assert torch.equal(logits_a, logits_b)
    assert _n_hooks(llama) == 0
