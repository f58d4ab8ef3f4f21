"""GGUF input: a tiny model written as a float32 GGUF file loads into the same bridge as its
HF directory (activations, logits, fingerprint, circuits, steering), and bad files are refused
with a clear error. Every GGUF file here is written by the test itself; nothing is downloaded."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from conftest import NEGATIVE, POSITIVE
from transformers import AutoModelForCausalLM, AutoTokenizer

import cna_lens
from cna_lens import CNAError, steer
from cna_lens.models.gguf import convert_to_hf
from cna_lens.models.loading import (
    format_prompt,
    is_chat_model,
    model_fingerprint,
    model_id,
    tokenize_prompts,
)
from cna_lens.models.testing import GGUF_ARCHITECTURES, write_gguf
from cna_lens.steering.bake import export_steered

TOL = 1e-5
PROMPTS = POSITIVE + NEGATIVE + ["Numbers: 0 1 2 100 \n\n  spaced  é 日本 <|user|>x<|end|>"]


@pytest.fixture(scope="session")
def gguf_files(model_dirs, tmp_path_factory):
    """arch -> a GGUF file of the session's tiny model, alone in its folder (no config.json)."""
    root = tmp_path_factory.mktemp("gguf")
    return {
        arch: write_gguf(model_dirs[arch], root / arch / f"tiny-{arch}.gguf")
        for arch in GGUF_ARCHITECTURES
    }


_bridges: dict[tuple[str, str], object] = {}


@pytest.fixture(scope="session")
def load_gguf_bridge(gguf_files):
    """Load (and memoise) a bridge from the GGUF file ("file") or from its folder ("dir")."""

    def _load(arch: str, how: str = "file"):
        if (arch, how) not in _bridges:
            path = gguf_files[arch] if how == "file" else gguf_files[arch].parent
            _bridges[(arch, how)] = cna_lens.load_model(path, device="cpu")
        return _bridges[(arch, how)]

    return _load


def _batch(model):
    return tokenize_prompts(model, PROMPTS, batch_size=len(PROMPTS))[0]


def _run(model, batch):
    """Logits and every layer's MLP hook_post."""
    names = [f"blocks.{layer}.mlp.hook_post" for layer in range(model.cfg.n_layers)]
    with torch.no_grad():
        logits, cache = model.run_with_cache(
            batch.input_ids, attention_mask=batch.attention_mask, names_filter=names
        )
    return logits, [cache[n] for n in names]


def _max_diff(a, b, mask) -> float:
    real = mask.bool()
    return float((a[real] - b[real]).abs().max())


def _hf_logits(hf, batch):
    """Plain HF forward; position ids from the mask, as HF generate does with left padding."""
    pos = (batch.attention_mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        return hf(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=pos
        ).logits


# --- the writer: transformers reads back exactly the original model and tokenizer ----------


@pytest.mark.parametrize("arch", GGUF_ARCHITECTURES)
def test_written_gguf_reads_back_as_the_original(model_dirs, gguf_files, arch):
    path = gguf_files[arch]
    hf = AutoModelForCausalLM.from_pretrained(model_dirs[arch]).eval()
    back = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    original, state = hf.state_dict(), back.state_dict()
    assert original.keys() == state.keys()
    for name, value in original.items():  # llama's Q/K permutation is undone exactly
        assert torch.equal(value, state[name]), name
    tok = AutoTokenizer.from_pretrained(model_dirs[arch])
    tok_back = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for prompt in PROMPTS:
        assert tok(prompt)["input_ids"] == tok_back(prompt)["input_ids"], prompt
    chat = [{"role": "user", "content": PROMPTS[0]}]
    text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert tok_back.apply_chat_template(chat, add_generation_prompt=True, tokenize=False) == text
    assert (
        tok(text, add_special_tokens=False)["input_ids"]
        == tok_back(text, add_special_tokens=False)["input_ids"]
    )
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, back(ids).logits, atol=TOL, rtol=0)


def test_write_gguf_refuses_other_architectures(model_dirs, tmp_path):
    with pytest.raises(CNAError, match=r"'gpt2'.*supported: \['llama', 'qwen2'\]"):
        write_gguf(model_dirs["gpt2"], tmp_path / "gpt2.gguf")


# --- loading: the same bridge as from the HF directory -----------------------------------


@pytest.mark.parametrize("how", ["file", "dir"])
@pytest.mark.parametrize("arch", GGUF_ARCHITECTURES)
def test_gguf_bridge_equals_hf_bridge(load, load_gguf_bridge, arch, how):
    hf_model, gguf_model = load(arch), load_gguf_bridge(arch, how)
    batch = _batch(hf_model)
    assert torch.equal(batch.input_ids, _batch(gguf_model).input_ids)
    logits, posts = _run(hf_model, batch)
    g_logits, g_posts = _run(gguf_model, batch)
    assert _max_diff(logits, g_logits, batch.attention_mask) <= TOL
    for layer, (a, b) in enumerate(zip(posts, g_posts, strict=True)):
        assert _max_diff(a, b, batch.attention_mask) <= TOL, layer
    assert is_chat_model(gguf_model)


@pytest.mark.parametrize("arch", GGUF_ARCHITECTURES)
def test_model_id_is_the_file_name_and_fingerprint_matches(
    load, load_gguf_bridge, gguf_files, arch
):
    name = gguf_files[arch].name
    from_file, from_dir = load_gguf_bridge(arch, "file"), load_gguf_bridge(arch, "dir")
    assert model_id(from_file) == model_id(from_dir) == name
    assert (
        model_fingerprint(from_file) == model_fingerprint(from_dir) == model_fingerprint(load(arch))
    )


def test_fingerprint_is_stable_across_loads(load_gguf_bridge, gguf_files):
    again = cna_lens.load_model(gguf_files["llama"], device="cpu")
    assert model_fingerprint(again) == model_fingerprint(load_gguf_bridge("llama"))
    assert model_id(again) == "tiny-llama.gguf"


@pytest.fixture(scope="session")
def gguf_circuit(load_gguf_bridge):
    return cna_lens.discover(
        load_gguf_bridge("llama"), POSITIVE, NEGATIVE, top_k=8, universal_filter=False
    )


@pytest.mark.parametrize("arch", GGUF_ARCHITECTURES)
def test_discover_finds_the_same_circuit(load, load_gguf_bridge, gguf_circuit, arch):
    found = cna_lens.discover(load(arch), POSITIVE, NEGATIVE, top_k=8, universal_filter=False)
    from_gguf = (
        gguf_circuit
        if arch == "llama"
        else cna_lens.discover(
            load_gguf_bridge(arch), POSITIVE, NEGATIVE, top_k=8, universal_filter=False
        )
    )
    assert from_gguf.labels == found.labels
    assert from_gguf.provenance.model_id == f"tiny-{arch}.gguf"


# --- convert_to_hf ------------------------------------------------------------------------


def test_convert_to_hf_writes_a_loadable_identical_dir(load, gguf_files, tmp_path):
    out = convert_to_hf(gguf_files["qwen2"], tmp_path / "converted")
    assert (out / "config.json").is_file()
    converted = cna_lens.load_model(out, device="cpu")
    batch = _batch(converted)
    reference = load("qwen2")
    assert torch.equal(batch.input_ids, _batch(reference).input_ids)
    a, _ = _run(reference, batch)
    b, _ = _run(converted, batch)
    assert _max_diff(a, b, batch.attention_mask) <= TOL
    assert model_fingerprint(converted) == model_fingerprint(reference)


def test_convert_to_hf_refuses_a_non_empty_dir(gguf_files, tmp_path):
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(CNAError, match="exists and is not empty"):
        convert_to_hf(gguf_files["llama"], tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]


# --- bad input ----------------------------------------------------------------------------


def test_truncated_file_is_refused(gguf_files, tmp_path):
    data = gguf_files["llama"].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CNAError, match="truncated or corrupt"):
        cna_lens.load_model(cut, device="cpu")


def test_text_file_is_refused(tmp_path):
    fake = tmp_path / "x.gguf"
    fake.write_text("this is not a model\n")
    with pytest.raises(CNAError, match="not a GGUF file"):
        cna_lens.load_model(fake, device="cpu")


def test_dir_with_two_gguf_files_is_refused(gguf_files, tmp_path):
    for name in ("a.gguf", "b.gguf"):
        (tmp_path / name).write_bytes(gguf_files["llama"].read_bytes())
    with pytest.raises(CNAError, match=r"2 \.gguf files \(a\.gguf, b\.gguf\)"):
        cna_lens.load_model(tmp_path, device="cpu")


def test_unsupported_architecture_is_refused(tmp_path):
    import gguf

    path = tmp_path / "encoder.gguf"
    writer = gguf.GGUFWriter(path, "bert")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CNAError, match=r"architecture 'bert'.*supported: .*llama.*qwen2"):
        cna_lens.load_model(path, device="cpu")


def test_missing_gguf_package_says_how_to_install(gguf_files, monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # `import gguf` now fails
    with pytest.raises(CNAError, match=r"pip install 'cna-lens\[gguf\]'"):
        cna_lens.load_model(gguf_files["llama"], device="cpu")


def test_gguf_without_chat_template_warns_and_uses_raw_text(model_dirs, tmp_path, caplog):
    path = write_gguf(model_dirs["llama"], tmp_path / "base.gguf", chat_template=False)
    with caplog.at_level(logging.WARNING, logger="cna_lens.models.gguf"):
        model = cna_lens.load_model(path, device="cpu")
    assert any("base.gguf" in r.message and "raw text" in r.message for r in caplog.records)
    assert not is_chat_model(model)
    assert format_prompt(model, "hello") == "hello"


# --- steering and export on a GGUF-loaded model -------------------------------------------


def test_steer_at_one_is_bit_identical(load_gguf_bridge, gguf_circuit):
    model = load_gguf_bridge("llama")
    batch = _batch(model)
    plain, _ = _run(model, batch)
    with steer(model, gguf_circuit, 1.0):
        steered, _ = _run(model, batch)
    assert torch.equal(plain, steered)


def test_export_from_gguf_bridge_equals_hook_steering(load_gguf_bridge, gguf_circuit, tmp_path):
    model = load_gguf_bridge("llama")
    batch = _batch(model)
    with steer(model, gguf_circuit, 0.0):
        hooked, _ = _run(model, batch)
    plain, _ = _run(model, batch)
    assert _max_diff(plain, hooked, batch.attention_mask) > 1e-3  # the ablation does something
    out = export_steered(model, gguf_circuit, 0.0, tmp_path / "steered")
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    assert _max_diff(_hf_logits(hf, batch), hooked, batch.attention_mask) <= TOL
