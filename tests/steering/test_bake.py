"""Baking: weight-folded steering equals hook steering, restores exactly, exports cleanly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import NEGATIVE, POSITIVE

from cna_lens import generate_token_ids, steer
from cna_lens.core.circuit import Circuit, Neuron, Provenance
from cna_lens.errors import CircuitMismatchError, CNAError
from cna_lens.models.loading import tokenize_prompts
from cna_lens.models.testing import ARCHITECTURES
from cna_lens.steering.bake import bake, bake_, down_projection, export_steered, steered_hf_model

TOL = 1e-5


def _circuit(model, n: int = 12, seed: int = 0) -> Circuit:
    """A circuit spread over all layers, with both signs of delta."""
    n_layers, d_mlp = int(model.cfg.n_layers), int(model.cfg.d_mlp)
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(n_layers * d_mlp, generator=g)[:n].tolist()
    neurons = tuple(
        Neuron(i // d_mlp, i % d_mlp, (1.0 if k % 2 else -1.0) * (k + 1))
        for k, i in enumerate(flat)
    )
    return Circuit(neurons, n_layers, d_mlp).for_model(model)


def _batch(model):
    return tokenize_prompts(model, POSITIVE + NEGATIVE, batch_size=16)[0]


def _logits(model, batch):
    with torch.inference_mode():
        return model(batch.input_ids, attention_mask=batch.attention_mask).float()


def _max_diff(a, b, batch) -> float:
    """Largest |a - b| over real (non-padding) positions; padded positions are meaningless."""
    real = batch.attention_mask.bool()
    return float((a.float()[real] - b.float()[real]).abs().max())


def _hf_logits(hf, batch):
    """Plain HF forward; position ids from the mask, as HF generate does with left padding."""
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
    with torch.inference_mode():
        return hf(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos
        ).logits


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.original_model.state_dict().items()}


def _assert_same_weights(model, snap) -> None:
    now = model.original_model.state_dict()
    assert now.keys() == snap.keys()
    for k, v in snap.items():
        assert torch.equal(now[k], v), f"{k} changed"


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize(("m", "m_neg"), [(0.0, None), (3.0, -0.5)])
def test_baked_logits_equal_hook_steered(load, arch, m, m_neg):
    model = load(arch)
    circuit = _circuit(model)
    batch = _batch(model)
    plain = _logits(model, batch)
    with steer(model, circuit, m, negative_multiplier=m_neg):
        hooked = _logits(model, batch)
    snap = _snapshot(model)
    with bake(model, circuit, m, negative_multiplier=m_neg) as handle:
        assert not model.hook_dict[f"blocks.{circuit.neurons[0].layer}.mlp.hook_post"].fwd_hooks
        baked = _logits(model, batch)
    assert handle.restored
    _assert_same_weights(model, snap)
    assert (hooked - plain).abs().max() > 1e-3, "the circuit should change the logits"
    assert (baked - hooked).abs().max() <= TOL
    assert torch.equal(_logits(model, batch), plain)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_down_projection_axis_indexes_neurons(load, arch):
    model = load(arch)
    module, axis = down_projection(model, 0)
    assert module.weight.shape[axis] == model.cfg.d_mlp
    assert axis == (0 if arch == "gpt2" else 1)  # GPT-2 Conv1D is [d_mlp, d_model]


def test_bake_scales_exactly_the_circuit_columns(llama):
    circuit = Circuit(
        (Neuron(1, 5, 1.0), Neuron(1, 9, -1.0), Neuron(2, 0, 2.0)),
        llama.cfg.n_layers,
        llama.cfg.d_mlp,
    ).for_model(llama)
    w = {layer: down_projection(llama, layer)[0].weight.detach().clone() for layer in range(3)}
    with bake(llama, circuit, 2.0, negative_multiplier=0.0):
        now = {
            layer: down_projection(llama, layer)[0].weight.detach().clone() for layer in range(3)
        }
    assert torch.equal(now[0], w[0])
    expect1 = w[1].clone()
    expect1[:, 5] *= 2.0
    expect1[:, 9] = 0.0
    assert torch.equal(now[1], expect1)
    expect2 = w[2].clone()
    expect2[:, 0] *= 2.0
    assert torch.equal(now[2], expect2)


def test_weights_restored_after_exception(llama):
    circuit = _circuit(llama, n=20)
    snap = _snapshot(llama)
    with pytest.raises(RuntimeError, match="boom"), bake(llama, circuit, 0.0):
        assert not all(
            torch.equal(v, snap[k]) for k, v in llama.original_model.state_dict().items()
        )
        raise RuntimeError("boom")
    _assert_same_weights(llama, snap)


def test_bake_inplace_restore_and_nesting(llama):
    snap = _snapshot(llama)
    a, b = _circuit(llama, seed=1), _circuit(llama, seed=2)
    h1 = bake_(llama, a, 0.3)
    h2 = bake_(llama, b, 7.0)  # overlapping layers; m=0.3 then 7.0 would not divide back exactly
    h2.restore()
    h1.restore()
    h1.restore()  # idempotent
    _assert_same_weights(llama, snap)


def test_identity_multiplier_touches_nothing(llama):
    snap = _snapshot(llama)
    with bake(llama, _circuit(llama), 1.0):
        _assert_same_weights(llama, snap)


def test_bad_inputs_raise_and_leave_weights(llama):
    snap = _snapshot(llama)
    with (
        pytest.raises(CNAError, match="multiplier must be finite"),
        bake(llama, _circuit(llama), float("nan")),
    ):
        pass
    wrong = Circuit((Neuron(0, 1, 1.0),), llama.cfg.n_layers, llama.cfg.d_mlp * 2)
    with pytest.raises(CircuitMismatchError, match="d_mlp"), bake(llama, wrong, 0.0):
        pass
    foreign = Circuit(
        (Neuron(0, 1, 1.0),),
        llama.cfg.n_layers,
        llama.cfg.d_mlp,
        Provenance(fingerprint="0123456789abcdef", model_id="other"),
    )
    with pytest.raises(CircuitMismatchError, match="fingerprint"), bake(llama, foreign, 0.0):
        pass
    _assert_same_weights(llama, snap)


def test_baked_generation_equals_hook_steered_generation(llama):
    circuit = _circuit(llama, n=24)
    prompts = POSITIVE[:2] + NEGATIVE[:2]
    kw = dict(max_new_tokens=6, batch_size=4)
    hooked = generate_token_ids(llama, prompts, circuit=circuit, multiplier=0.0, **kw)
    plain = generate_token_ids(llama, prompts, **kw)
    with bake(llama, circuit, 0.0):
        baked = generate_token_ids(llama, prompts, **kw)
    assert baked == hooked
    assert plain != hooked


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma2"])
def test_export_reloads_with_plain_transformers(load, arch, tmp_path):
    from transformers import AutoModelForCausalLM

    model = load(arch)
    circuit = _circuit(model)
    batch = _batch(model)
    with steer(model, circuit, 0.0, negative_multiplier=2.0):
        hooked = _logits(model, batch)
    snap = _snapshot(model)
    out = export_steered(model, circuit, 0.0, tmp_path / "steered", negative_multiplier=2.0)
    _assert_same_weights(model, snap)  # exporting never touches the bridge
    files = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "cna_steering.json"} <= files
    assert json.loads((out / "cna_steering.json").read_text())["negative_multiplier"] == 2.0
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    logits = _hf_logits(hf, batch)
    assert _max_diff(logits, hooked, batch) <= TOL


def test_export_from_directory_matches_bridge(model_dirs, load, tmp_path):
    model = load("qwen2")
    circuit = _circuit(model)
    batch = _batch(model)
    with steer(model, circuit, 4.0):
        hooked = _logits(model, batch)
    hf = steered_hf_model(model_dirs["qwen2"], circuit, 4.0)
    logits = _hf_logits(hf, batch)
    assert _max_diff(logits, hooked, batch) <= TOL


def test_export_loads_in_a_process_without_cna_lens(llama, tmp_path):
    circuit = _circuit(llama)
    batch = _batch(llama)
    with steer(llama, circuit, 0.0):
        hooked = _logits(llama, batch)
    out = export_steered(llama, circuit, 0.0, tmp_path / "steered")
    torch.save({"ids": batch.input_ids, "mask": batch.attention_mask}, tmp_path / "in.pt")
    code = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"d = {str(out)!r}\n"
        "m = AutoModelForCausalLM.from_pretrained(d).eval()\n"
        "AutoTokenizer.from_pretrained(d)\n"
        f"x = torch.load({str(tmp_path / 'in.pt')!r})\n"
        "pos = (x['mask'].cumsum(-1) - 1).clamp_min(0)\n"
        "with torch.inference_mode():\n"
        "    y = m(input_ids=x['ids'], attention_mask=x['mask'], position_ids=pos).logits\n"
        f"torch.save(y, {str(tmp_path / 'out.pt')!r})\n"
        "assert not any(k.startswith('cna_lens') for k in sys.modules)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    logits = torch.load(tmp_path / "out.pt")
    assert _max_diff(logits, hooked, batch) <= TOL


def test_export_refuses_a_file_as_out_dir(llama, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CNAError, match="not a directory"):
        export_steered(llama, _circuit(llama), 0.0, f)


# ---- hardening ---------------------------------------------------------------------------


def _overlapping(model):
    """Two circuits sharing neuron (1, 5), each with a neuron of its own."""
    n_layers, d_mlp = int(model.cfg.n_layers), int(model.cfg.d_mlp)
    a = Circuit((Neuron(1, 5, 1.0), Neuron(0, 3, 1.0)), n_layers, d_mlp).for_model(model)
    b = Circuit((Neuron(1, 5, 1.0), Neuron(2, 7, 1.0)), n_layers, d_mlp).for_model(model)
    return a, b


def test_out_of_order_restore_of_overlapping_bakes_is_refused(llama):
    snap = _snapshot(llama)
    a, b = _overlapping(llama)
    h1 = bake_(llama, a, 0.0)
    h2 = bake_(llama, b, 3.0)
    with pytest.raises(CNAError, match="must be restored in reverse order"):
        h1.restore()
    assert not h1.restored
    h2.restore()
    h1.restore()
    _assert_same_weights(llama, snap)


def test_disjoint_bakes_restore_in_any_order(llama):
    snap = _snapshot(llama)
    h1 = bake_(llama, _circuit(llama, n=1, seed=3), 0.0)
    h2 = bake_(llama, _circuit(llama, n=1, seed=4), 2.0)
    assert not h1._overlaps(h2)
    h1.restore()
    h2.restore()
    _assert_same_weights(llama, snap)


def test_baked_weights_that_would_overflow_are_refused(llama):
    snap = _snapshot(llama)
    circuit = _circuit(llama, n=6)
    big = max(circuit.neurons, key=lambda n: n.layer)  # a layer baked after others
    module, axis = down_projection(llama, big.layer)
    with torch.no_grad():
        col = module.weight.index_select(axis, torch.tensor([big.neuron])).clone()
        module.weight.index_fill_(axis, torch.tensor([big.neuron]), 1e38)
    try:
        big_snap = _snapshot(llama)
        with pytest.raises(CNAError, match=r"overflow the model's dtype torch.float32"):
            bake_(llama, circuit, 10.0)
        _assert_same_weights(llama, big_snap)  # earlier layers were restored
    finally:
        with torch.no_grad():
            module.weight.index_copy_(axis, torch.tensor([big.neuron]), col)
    _assert_same_weights(llama, snap)
    with pytest.raises(CNAError, match="overflows the model's dtype"):
        bake_(llama, circuit, 1e39)


def test_failed_re_export_leaves_the_old_export_intact(llama, tmp_path, monkeypatch):
    out = export_steered(llama, _circuit(llama, seed=1), 0.0, tmp_path / "steered")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken_save(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(type(llama.tokenizer), "save_pretrained", broken_save)
    with pytest.raises(CNAError, match="No space left"):
        export_steered(llama, _circuit(llama, seed=2), 2.0, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["steered"]  # no temporary left
    monkeypatch.undo()
    export_steered(llama, _circuit(llama, seed=2), 2.0, out)
    record = json.loads((out / "cna_steering.json").read_text())
    assert record["multiplier"] == 2.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["steered"]


def test_export_refuses_a_foreign_non_empty_directory(llama, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(CNAError, match="not a previous export"):
        export_steered(llama, _circuit(llama), 0.0, tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
