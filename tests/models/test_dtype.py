"""dtype: a bf16 model finds (nearly) the fp32 circuit; statistics are float64 either way.

Measured on the random models (cna_lens.models.testing, seed 1, 3 layers x d_mlp 128, the
conftest prompts, no universal filter): the bf16 and fp32 circuits overlap 100% at
top_k = 4, 20 and 40 for llama, qwen2 and gpt2, and the per-neuron deltas correlate at
r = 0.9999. On the benchmark's 8 x 256 x 1024 random Llama: 8/8 neurons shared at 0.1%,
81/82 at 1%, r = 0.99991.
"""

from __future__ import annotations

import pytest
import torch

import cna_lens
from cna_lens.core.activations import NeuronStats

K = 20  # 5% of the 384 neurons: enough for overlap to mean something on a tiny model


@pytest.fixture(scope="module")
def bf16_llama(model_dirs):
    return cna_lens.load_model(model_dirs["llama"], device="cpu", dtype="bfloat16")


def test_bf16_model_really_runs_in_bf16(bf16_llama, prompts):
    pos, _ = prompts
    _, acts = next(cna_lens.iter_activations(bf16_llama, pos, batch_size=8))
    assert acts.dtype == torch.bfloat16
    stats = NeuronStats.of(acts)
    assert stats.total.dtype == stats.total_sq.dtype == torch.float64


def test_bf16_and_fp32_circuits_overlap(llama, bf16_llama, prompts):
    pos, neg = prompts
    a32 = cna_lens.attribute(llama, pos, neg)
    a16 = cna_lens.attribute(bf16_llama, pos, neg)
    for stats in (a16.positive, a16.negative):
        assert stats.total.dtype == torch.float64
    d32, d16 = a32.delta, a16.delta
    assert not torch.equal(d32, d16), "bf16 must actually change the numbers"
    r = torch.corrcoef(torch.stack([d32.flatten(), d16.flatten()]))[0, 1]
    assert r >= 0.999
    c32 = cna_lens.circuit_from_attribution(a32, top_k=K)
    c16 = cna_lens.circuit_from_attribution(a16, top_k=K)
    overlap = len(c32.pairs & c16.pairs) / K
    assert overlap >= 0.9  # measured: 1.0
    # Signs agree on the shared neurons.
    sign16 = {(n.layer, n.neuron): n.sign for n in c16}
    assert all(sign16[(n.layer, n.neuron)] == n.sign for n in c32 if (n.layer, n.neuron) in sign16)
