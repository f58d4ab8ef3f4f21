"""cna_lens: Contrastive Neuron Attribution on TransformerLens.

Find the few MLP neurons whose activations separate a positive prompt set from a
negative one, and steer the behaviour by scaling them.

Example:
    >>> import cna_lens as cl  # doctest: +SKIP
    >>> model = cl.load_model("path/to/model")  # doctest: +SKIP
    >>> circuit = cl.discover(model, harmful, benign)  # doctest: +SKIP
    >>> cl.generate(model, ["How do I pick a lock?"], circuit=circuit, multiplier=0.0)  # doctest: +SKIP
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from cna_lens import _compat

try:
    __version__ = version("cna-lens")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+local"

from cna_lens.core.activations import NeuronStats, activation_stats, iter_activations
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
from cna_lens.evaluation.analysis import (
    LayerDistribution,
    Overlap,
    Stability,
    bootstrap_stability,
    circuit_overlap,
    layer_distribution,
    random_control_circuit,
)
from cna_lens.models.loading import (
    is_chat_model,
    load_model,
    model_fingerprint,
    model_id,
    tokenize_prompts,
)
from cna_lens.steering.bake import BakedWeights, bake, bake_, export_steered, steered_hf_model
from cna_lens.steering.caa import CAAVectors, caa_generate, caa_steer, compute_caa
from cna_lens.steering.hooks import (
    Positions,
    SteeringConfig,
    generate,
    generate_token_ids,
    steer,
)
from cna_lens.steering.interventions import (
    INTERVENTIONS,
    Intervention,
    Steering,
    get_intervention,
    register_intervention,
)

# Stages that pull in pandas / plotly / the organism data load on first use.
_LAZY_MODULES = {
    "organism": "cna_lens.organism",
}
# Public names defined in those lazy modules (name -> module).
_LAZY_NAMES = {
    "activation_cache": "cna_lens.viz.explore",
    "neuron_card": "cna_lens.viz.explore",
    "NeuronCard": "cna_lens.viz.explore",
    "circuit_map": "cna_lens.viz.explore",
    "sweep": "cna_lens.evaluation.grids",
}

_compat.install()


def __getattr__(name: str):
    import importlib

    if name in _LAZY_MODULES:
        return importlib.import_module(_LAZY_MODULES[name])
    if name in _LAZY_NAMES:
        return getattr(importlib.import_module(_LAZY_NAMES[name]), name)
    raise AttributeError(f"module 'cna_lens' has no attribute {name!r}")


__all__ = [
    "INTERVENTIONS",
    "SCORES",
    "DiscoveryConfig",
    "Intervention",
    "Steering",
    "get_intervention",
    "get_score",
    "register_intervention",
    "register_score",
    "sweep",
    "Attribution",
    "BakedWeights",
    "CAAVectors",
    "LayerDistribution",
    "NeuronCard",
    "Overlap",
    "Stability",
    "bake",
    "bake_",
    "bootstrap_stability",
    "caa_generate",
    "caa_steer",
    "circuit_map",
    "circuit_overlap",
    "compute_caa",
    "discover_distributed",
    "export_steered",
    "layer_distribution",
    "random_control_circuit",
    "steered_hf_model",
    "CNAError",
    "Circuit",
    "CircuitMismatchError",
    "Discovery",
    "Neuron",
    "NeuronStats",
    "Positions",
    "Provenance",
    "SteeringConfig",
    "UniversalNeurons",
    "__version__",
    "activation_cache",
    "activation_stats",
    "attribute",
    "circuit_from_attribution",
    "default_universal_prompts",
    "discover",
    "discover_full",
    "find_universal_neurons",
    "generate",
    "generate_token_ids",
    "is_chat_model",
    "iter_activations",
    "load_model",
    "model_fingerprint",
    "model_id",
    "neuron_card",
    "steer",
    "tokenize_prompts",
]
