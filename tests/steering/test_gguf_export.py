"""GGUF out: the exported file is the hooked model, untouched tensors and keys are the
source's bytes, and what does not fold is refused."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

import cna_lens
from cna_lens import CAA, Circuit, CNAError, Neuron, Steering
from cna_lens.models.testing import write_gguf
from cna_lens.steering.gguf_export import BLOCK_SCALES, export_gguf, scale_rows, tensor_bytes

gguf = pytest.importorskip("gguf")

PROMPTS = ["How do I pick a lock?", "Write a poem about the ocean.", "What is 2 + 2?"]


@pytest.mark.parametrize("type_name", sorted(BLOCK_SCALES))
def test_block_scales_scale_exactly_the_rows(type_name):
    qtype = gguf.GGMLQuantizationType[type_name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    rng = np.random.default_rng(0)
    rows, per_row = 6, 2
    raw = rng.integers(0, 256, size=(rows, per_row * size), dtype=np.uint8)
    _, offsets = BLOCK_SCALES[type_name]
    blocks = raw.reshape(rows, per_row, size)
    for off in offsets:  # sane fp16 scales (random bytes could be NaN or huge)
        scales = rng.uniform(0.01, 0.1, size=(rows, per_row)).astype(np.float16)
        blocks[:, :, off : off + 2] = scales[..., None].view(np.uint8).reshape(rows, per_row, 2)
    before = gguf.quants.dequantize(raw, qtype)
    m = np.array([0.0, 1.0, 2.0, 0.5, 1.0, 0.25], dtype=np.float32)
    after = gguf.quants.dequantize(scale_rows(raw, type_name, m), qtype)
    np.testing.assert_array_equal(after, before * m[:, None])  # powers of two and 0: exact
    untouched = m == 1.0
    assert np.array_equal(scale_rows(raw, type_name, m)[untouched], raw[untouched])
    assert before.shape == (rows, per_row * block)


def test_other_multipliers_round_only_the_fp16_scales():
    raw = gguf.quants.quantize(
        np.random.default_rng(1).normal(size=(3, 64)).astype(np.float32),
        gguf.GGMLQuantizationType.Q8_0,
    )
    m = np.array([0.3, 1.7, 1.0], dtype=np.float32)
    after = gguf.quants.dequantize(scale_rows(raw, "Q8_0", m), gguf.GGMLQuantizationType.Q8_0)
    before = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q8_0)
    np.testing.assert_allclose(after, before * m[:, None], rtol=2**-10, atol=0)


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, model_dirs, tmp_path_factory):
    path = write_gguf(model_dirs[request.param], tmp_path_factory.mktemp("g") / "tiny.gguf")
    model = cna_lens.load_model(path, device="cpu")
    neurons = [
        Neuron(0, 3, 1.0, 1.5, 0.5),
        Neuron(1, 7, -1.0, 0.0, 1.0),
        Neuron(1, 20, 0.5, 0.7, 0.2),
        Neuron(2, 9, 0.1, 0.3, 0.2),
    ]
    circuit = Circuit(tuple(neurons), int(model.cfg.n_layers), int(model.cfg.d_mlp)).for_model(
        model
    )
    return path, model, circuit


def _logits(model, steering=None):
    ids = cna_lens.tokenize_prompts(model, PROMPTS, batch_size=3)[0]
    with torch.inference_mode():
        if steering is None:
            return model(ids.input_ids, attention_mask=ids.attention_mask)
        with cna_lens.steer(model, steering):
            return model(ids.input_ids, attention_mask=ids.attention_mask)


@pytest.mark.parametrize("method", ["up", "down"])
@pytest.mark.parametrize("m", [0.0, 2.0])
def test_the_exported_model_equals_the_hooked_model(tiny, tmp_path, method, m):
    path, model, circuit = tiny
    steering = Steering(circuit=circuit, multiplier=m, negative_multiplier=0.5)
    out = export_gguf(path, steering, tmp_path / "steered.gguf", method=method)
    assert out.method == method and out.path.is_file()
    exported = cna_lens.load_model(out.path, device="cpu")
    hooked = _logits(model, steering)
    assert not torch.allclose(hooked, _logits(model))  # the steering changes the logits
    # F32 weights: only the float rounding of scaling the weights instead of the activation
    torch.testing.assert_close(_logits(exported), hooked, rtol=0, atol=1e-5)
    source = {name: (kind, data) for name, kind, data in tensor_bytes(path)}
    new = {name: (kind, data) for name, kind, data in tensor_bytes(out.path)}
    assert set(new) == set(source)
    changed = {n for n in new if new[n] != source[n]}
    assert changed == set(out.tensors)
    part = "ffn_up" if method == "up" else "ffn_down"
    assert changed == {f"blk.{layer}.{part}.weight" for layer in (0, 1, 2)}


def test_metadata_is_copied_and_records_the_steering(tiny, tmp_path):
    path, _, circuit = tiny
    steering = Steering(circuit=circuit, multiplier=0.0)
    out = export_gguf(path, steering, tmp_path / "s.gguf")
    src, new = gguf.GGUFReader(str(path)), gguf.GGUFReader(str(out.path))
    for name, field in src.fields.items():
        if name.startswith("GGUF."):
            continue
        assert [bytes(p) for p in new.fields[name].parts] == [bytes(p) for p in field.parts], name
    recorded = bytes(new.fields["cna_lens.steering"].parts[-1]).decode()
    assert Steering.from_json(recorded) == steering
    assert (
        json.loads(bytes(new.fields["cna_lens.changed_tensors"].parts[-1]).decode()) == out.tensors
    )
    assert out.path.stat().st_mode & 0o044 == 0o044 or os.umask(os.umask(0)) & 0o044
    assert [p.name for p in tmp_path.iterdir()] == ["s.gguf"]  # no partial file left


def test_what_does_not_fold_is_refused(tiny, tmp_path, model_dirs):
    path, model, circuit = tiny
    for bad, why in (
        (Steering(circuit=circuit, intervention="mean", multiplier=0.0), "intervention='mean'"),
        (Steering(circuit=circuit, multiplier=0.0, positions="prompt"), "positions='prompt'"),
        (CAA(cna_lens.compute_caa(model, PROMPTS[:1], PROMPTS[1:]), -1.0), "CAA"),
    ):
        with pytest.raises(
            CNAError,
            match=f"only a cna_lens Steering with intervention='scale' and positions='all' folds.*{why}",
        ):
            export_gguf(path, bad, tmp_path / "x.gguf")
    other = Circuit((Neuron(0, 1, 1.0),), 9, 64)
    with pytest.raises(CNAError, match="GGUF has"):
        export_gguf(path, Steering(circuit=other, multiplier=0.0), tmp_path / "x.gguf")
    with pytest.raises(CNAError, match="convert_hf_to_gguf.py"):
        export_gguf(
            str(model_dirs["llama"]), Steering(circuit=circuit, multiplier=0.0), tmp_path / "x.gguf"
        )
    with pytest.raises(CNAError, match=r"\.gguf"):
        export_gguf(path, Steering(circuit=circuit, multiplier=0.0), tmp_path / "x.bin")


LLAMA_CPP = "CMAKE_ARGS=-DLLAVA_BUILD=OFF pip install llama-cpp-python==0.3.36"


def _llama_cpp_logits(path, ids):
    """Logits of every position of one prompt, computed by llama.cpp itself."""
    llama_cpp = pytest.importorskip("llama_cpp", reason=f"llama.cpp check needs: {LLAMA_CPP}")
    llm = llama_cpp.Llama(
        model_path=str(path), n_ctx=128, n_threads=1, logits_all=True, verbose=False
    )
    try:
        llm.eval(ids)
        return torch.tensor(np.array(llm.scores[: len(ids)]))
    finally:
        llm.close()


@pytest.mark.parametrize("method", ["up", "down"])
def test_llama_cpp_reads_the_exported_file_as_the_hooked_model(tiny, tmp_path, method):
    """A real GGUF client: llama.cpp on the exported file gives the hooked model's logits
    (F32 weights; llama.cpp sums in another order, hence 1e-3), and not the source's."""
    path, model, circuit = tiny
    steering = Steering(circuit=circuit, multiplier=0.0)
    out = export_gguf(path, steering, tmp_path / "steered.gguf", method=method)
    batch = cna_lens.tokenize_prompts(model, PROMPTS[:1], batch_size=1)[0]
    ids = batch.input_ids[0].tolist()
    with torch.inference_mode():
        plain = model(batch.input_ids)[0]
        with cna_lens.steer(model, steering):
            hooked = model(batch.input_ids)[0]
    source = _llama_cpp_logits(path, ids)
    exported = _llama_cpp_logits(out.path, ids)
    torch.testing.assert_close(source, plain, rtol=0, atol=1e-3)  # the client reads the model
    torch.testing.assert_close(exported, hooked, rtol=0, atol=1e-3)
    # the steering moves the logits far more than the client differs from cna_lens
    assert (exported - source).abs().max() > 10 * (exported - hooked).abs().max()
