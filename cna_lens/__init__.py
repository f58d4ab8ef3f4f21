"""cna_lens: Contrastive Neuron Attribution on TransformerLens.

Find the few MLP neurons whose activations separate a positive prompt set from a
negative one, and steer the behaviour by scaling them.

The package is layered; each layer imports only the ones before it:
``models`` (loading, GGUF, zoo, bridge -> HF) -> ``core`` (activations, attribution,
scores, universal neurons, circuits, discovery, analysis) -> ``steering`` (the
:class:`Steering` value, conditions, hooks, CAA, baking) -> ``generation`` (one
:func:`generate_many` over conditions, bridge and fast backends) -> ``evaluation``
(metrics, the one engine :func:`evaluate`, grids, prompt sets) -> ``viz`` (figures,
report, explore views) -> ``pipelines`` (reproduce, pairs) -> ``cli``.

Example:
    >>> import cna_lens as cl  # doctest: +SKIP
    >>> model = cl.load_model("path/to/model")  # doctest: +SKIP
    >>> circuit = cl.discover(model, harmful, benign)  # doctest: +SKIP
    >>> cl.generate(model, ["How do I pick a lock?"], circuit=circuit, multiplier=0.0)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
from typing import Any

from cna_lens import _compat
from cna_lens._version import __version__
from cna_lens.core.activations import NeuronStats, activation_stats, iter_activations
from cna_lens.core.analysis import (
    LayerDistribution,
    Overlap,
    Stability,
    bootstrap_stability,
    circuit_overlap,
    layer_distribution,
    random_control_circuit,
)
from cna_lens.core.attribution import Attribution, attribute
from cna_lens.core.circuit import Circuit, Neuron, Provenance
from cna_lens.core.discovery import (
    Discovery,
    DiscoveryConfig,
    circuit_from_attribution,
    discover,
    discover_full,
)
from cna_lens.core.distributed import discover_distributed
from cna_lens.core.scores import SCORES, get_score, register_score
from cna_lens.core.universal import (
    UniversalNeurons,
    default_universal_prompts,
    find_universal_neurons,
)
from cna_lens.errors import CircuitMismatchError, CNAError
from cna_lens.generation import (
    Decoding,
    Generations,
    generate,
    generate_many,
    generate_token_ids,
    open_backend,
)
from cna_lens.models.loading import (
    is_chat_model,
    load_model,
    model_fingerprint,
    model_id,
    tokenize_prompts,
)
from cna_lens.models.names import resolve_model
from cna_lens.steering import (
    CAA,
    INTERVENTIONS,
    BakedWeights,
    CAAVectors,
    DirectionalAblation,
    Intervention,
    Positions,
    Steering,
    bake,
    bake_,
    caa_steer,
    compute_caa,
    export_gguf,
    export_steered,
    get_intervention,
    register_condition,
    register_intervention,
    steer,
    steered_hf_model,
)

_compat.install()

# The layers above generation import pandas and plotly (about 0.4 s on top of torch's
# 1.0 s, measured with `python -X importtime -c "import cna_lens"`), so their public
# names load on first use. Name -> module.
_LAZY: dict[str, str] = {
    "METRICS": "cna_lens.evaluation",
    "Arm": "cna_lens.evaluation",
    "evaluate": "cna_lens.evaluation",
    "register_metric": "cna_lens.evaluation",
    "summarize": "cna_lens.evaluation",
    "sweep": "cna_lens.evaluation.grids",
    "NeuronCard": "cna_lens.viz",
    "activation_cache": "cna_lens.viz",
    "circuit_map": "cna_lens.viz",
    "neuron_card": "cna_lens.viz",
}
_DEPRECATED: dict[str, str] = {
    "SteeringConfig": "cna_lens._compat:SteeringConfig",
    "caa_generate": "cna_lens._compat:caa_generate",
}


def __getattr__(name: str) -> Any:
    if name == "organism":
        return importlib.import_module("cna_lens.organism")
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    return _compat.forward(__name__, _DEPRECATED)(name)


__all__ = [
    "CAA",
    "INTERVENTIONS",
    "METRICS",
    "SCORES",
    "Arm",
    "Attribution",
    "BakedWeights",
    "CAAVectors",
    "DirectionalAblation",
    "CNAError",
    "Circuit",
    "CircuitMismatchError",
    "Decoding",
    "Discovery",
    "DiscoveryConfig",
    "Generations",
    "Intervention",
    "LayerDistribution",
    "Neuron",
    "NeuronCard",
    "NeuronStats",
    "Overlap",
    "Positions",
    "Provenance",
    "Stability",
    "Steering",
    "SteeringConfig",
    "UniversalNeurons",
    "__version__",
    "activation_cache",
    "activation_stats",
    "attribute",
    "bake",
    "bake_",
    "bootstrap_stability",
    "caa_generate",
    "caa_steer",
    "circuit_from_attribution",
    "circuit_map",
    "circuit_overlap",
    "compute_caa",
    "default_universal_prompts",
    "discover",
    "discover_distributed",
    "discover_full",
    "evaluate",
    "export_gguf",
    "export_steered",
    "find_universal_neurons",
    "generate",
    "generate_many",
    "generate_token_ids",
    "get_intervention",
    "get_score",
    "is_chat_model",
    "iter_activations",
    "layer_distribution",
    "load_model",
    "model_fingerprint",
    "model_id",
    "neuron_card",
    "open_backend",
    "random_control_circuit",
    "register_condition",
    "register_intervention",
    "register_metric",
    "register_score",
    "resolve_model",
    "steer",
    "steered_hf_model",
    "summarize",
    "sweep",
    "tokenize_prompts",
]
