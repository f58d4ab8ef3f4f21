"""Steering: what to do to the model (values) and doing it (hooks, baked weights).

* :class:`Steering` — THE steering value: circuit, intervention, multipliers, sign
  selection, positions; JSON round-trip, :meth:`Steering.save` / :meth:`Steering.load`.
* Interventions (``"scale"``, ``"mean"``, yours): :func:`register_intervention`.
* Conditions — ``None``, a :class:`Steering`, a :class:`CAA`, a
  :class:`DirectionalAblation` (the abliteration baseline), or a kind registered with
  :func:`register_condition` — each mean a list of hook operations
  (:mod:`cna_lens.steering.conditions`).
* :func:`steer` / :func:`hooked` apply them to the bridge (hooks always come off);
  :func:`bake` folds a ``"scale"`` steering into the down-projection weights;
  :func:`export_steered` writes a steered Hugging Face directory.

Imports: models and core only.
"""

from cna_lens import _compat
from cna_lens.steering.ablation import DirectionalAblation
from cna_lens.steering.bake import BakedWeights, bake, bake_, export_steered, steered_hf_model
from cna_lens.steering.caa import CAA, CAAVectors, caa_steer, compute_caa, default_caa_layers
from cna_lens.steering.conditions import (
    HookOp,
    condition_key,
    condition_ops,
    describe_condition,
    is_identity,
    register_condition,
)
from cna_lens.steering.gguf_export import GGUFExport, export_gguf
from cna_lens.steering.hooks import SteeringHandle, hooked, steer
from cna_lens.steering.interventions import (
    BAKEABLE,
    INTERVENTIONS,
    Intervention,
    Positions,
    Sign,
    Steering,
    get_intervention,
    register_intervention,
)

__all__ = [
    "BAKEABLE",
    "CAA",
    "INTERVENTIONS",
    "BakedWeights",
    "CAAVectors",
    "DirectionalAblation",
    "HookOp",
    "Intervention",
    "Positions",
    "Sign",
    "Steering",
    "SteeringHandle",
    "bake",
    "bake_",
    "caa_steer",
    "compute_caa",
    "condition_key",
    "condition_ops",
    "default_caa_layers",
    "describe_condition",
    "export_gguf",
    "export_steered",
    "GGUFExport",
    "get_intervention",
    "hooked",
    "is_identity",
    "register_condition",
    "register_intervention",
    "steer",
    "steered_hf_model",
]

# Names cna_lens 0.1 had in its flat ``cna_lens.steering`` module.
__getattr__ = _compat.forward(
    __name__,
    {
        "generate": "cna_lens.generation:generate",
        "generate_token_ids": "cna_lens.generation:generate_token_ids",
        "SteeringConfig": "cna_lens._compat:SteeringConfig",
    },
)
