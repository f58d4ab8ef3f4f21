"""Baking: weight-folded steering equals hook steering, restores exactly, exports cleanly."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import NEGATIVE, POSITIVE

from cna_lens.baking import bake, bake_, down_projection, export_steered, steered_hf_model
from cna_lens.circuit import Circuit, Neuron, Provenance
from cna_lens.errors import CircuitMismatchError, CNAError
from cna_lens.loading import tokenize_prompts
from cna_lens.steering import generate_token_ids, steer
from cna_lens.testing import ARCHITECTURES

TOL = 1e-5


def _circuit(model, n: int = 12, seed: int = 0) -> Circuit:
    """A circuit spread over all layers, with both signs of delta."""
    n_layers, d_mlp = int(model.cfg.n_layers), int(model.cfg.d_mlp)
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(n_layers * d_mlp, generator=g)[:n].tolist()
    neurons = tuple(Neuron(i // d_mlp, i % d_mlp, (1.0 if k % 2 else -1.0) * (k + 1))
                    for k, i in enumerate(flat))
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
        return hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                  position_ids=pos).logits


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
    circuit = Circuit((Neuron(1, 5, 1.0), Neuron(1, 9, -1.0), Neuron(2, 0, 2.0)),
                      llama.cfg.n_layers, llama.cfg.d_mlp).for_model(llama)
    w = {layer: down_projection(llama, layer)[0].weight.detach().clone() for layer in range(3)}
    with bake(llama, circuit, 2.0, negative_multiplier=0.0):
        now = {layer: down_projection(llama, layer)[0].weight.detach().clone()
               for layer in range(3)}
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
        assert not all(torch.equal(v, snap[k])
                       for k, v in llama.original_model.state_dict().items())
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
    with pytest.raises(CNAError, match="multiplier must be finite"), bake(llama, _circuit(llama),
                                                                          float("nan")):
        pass
    wrong = Circuit((Neuron(0, 1, 1.0),), llama.cfg.n_layers, llama.cfg.d_mlp * 2)
    with pytest.raises(CircuitMismatchError, match="d_mlp"), bake(llama, wrong, 0.0):
        pass
    foreign = Circuit((Neuron(0, 1, 1.0),), llama.cfg.n_layers, llama.cfg.d_mlp,
                      Provenance(fingerprint="0123456789abcdef", model_id="other"))
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
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                               "PATH": "/usr/bin:/bin"}, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    logits = torch.load(tmp_path / "out.pt")
    assert _max_diff(logits, hooked, batch) <= TOL


def test_export_refuses_a_file_as_out_dir(llama, tmp_path):
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(CNAError, match="not a directory"):
        export_steered(llama, _circuit(llama), 0.0, f)
