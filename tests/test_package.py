"""The package as a whole: its public names (old and new), its one-way layering, the old
import paths that still work."""

from __future__ import annotations

import ast
import importlib
import warnings
from pathlib import Path

import pytest

import cna_lens

PACKAGE = Path(cna_lens.__file__).parent

# The public names of cna_lens 0.1 (its __all__): every one still works as cl.<name>.
OLD_ALL = (
    "INTERVENTIONS SCORES DiscoveryConfig Intervention Steering get_intervention get_score "
    "register_intervention register_score sweep Attribution BakedWeights CAAVectors "
    "LayerDistribution NeuronCard Overlap Stability bake bake_ bootstrap_stability "
    "caa_generate caa_steer circuit_map circuit_overlap compute_caa discover_distributed "
    "export_steered layer_distribution random_control_circuit steered_hf_model CNAError "
    "Circuit CircuitMismatchError Discovery Neuron NeuronStats Positions Provenance "
    "SteeringConfig UniversalNeurons __version__ activation_cache activation_stats attribute "
    "circuit_from_attribution default_universal_prompts discover discover_full "
    "find_universal_neurons generate generate_token_ids is_chat_model iter_activations "
    "load_model model_fingerprint model_id neuron_card steer tokenize_prompts"
).split()

# Layers in the order data flows; a module may import only its own layer and the ones
# before it. Plumbing (errors, checks, registry, files, progress) sits below everything.
LAYERS = ("plumbing", "models", "core", "steering", "generation", "evaluation", "viz")
LAYERS += ("pipelines", "cli")
PLUMBING = {"errors", "_validate", "_registry", "_model_state", "io", "_progress", "_version"}


def _layer(module: str) -> int | None:
    """The layer of a ``cna_lens.*`` module (None: the package itself or the compat shim)."""
    parts = module.split(".")
    if parts[0] != "cna_lens" or len(parts) == 1 or parts[1] in ("_compat",):
        return None
    top = parts[1]
    if top in PLUMBING:
        return 0
    if top == "organism":  # beside models: it loads its models through them
        return LAYERS.index("models")
    return LAYERS.index(top)


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every ``cna_lens`` module a file imports (at the top or inside a function)."""
    tree = ast.parse(path.read_text())
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            base = node.module
            names = [f"{base}.{a.name}" for a in node.names] if base == "cna_lens" else [base]
            out += [(n, node.lineno) for n in names]
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
    return [(n, line) for n, line in out if n.startswith("cna_lens")]


def test_public_names_exist():
    for name in cna_lens.__all__:
        assert hasattr(cna_lens, name), name


def test_every_public_name_of_0_1_still_works():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        missing = [name for name in OLD_ALL if not hasattr(cna_lens, name)]
    assert not missing
    assert set(OLD_ALL) <= set(cna_lens.__all__)


def test_imports_only_point_down_and_the_library_never_imports_the_cli():
    wrong, checked = [], 0
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(("cna_lens", *path.relative_to(PACKAGE).with_suffix("").parts))
        module = module.removesuffix(".__init__")
        here = _layer(module)
        if here is None:
            continue
        for target, line in _imports(path):
            there = _layer(target)
            checked += there is not None
            if there is not None and there > here:
                wrong.append(f"{module}:{line} ({LAYERS[here]}) imports {target} ({LAYERS[there]})")
    assert checked > 200  # the scan sees the imports (it can fail)
    assert not wrong, "\n".join(wrong)


def test_subpackages_do_not_shadow_public_functions():
    for sub in ("steering", "generation", "evaluation", "viz", "pipelines", "cli"):
        importlib.import_module(f"cna_lens.{sub}")
    assert callable(cna_lens.steer) and callable(cna_lens.generate)
    assert callable(cna_lens.evaluate) and callable(cna_lens.sweep)


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("cna_lens.dose", "cna_lens.evaluation.grids"),
        ("cna_lens.fastgen", "cna_lens.generation.fast"),
        ("cna_lens.loading", "cna_lens.models.loading"),
        ("cna_lens.reproduce", "cna_lens.pipelines.reproduce"),
    ],
)
def test_old_module_paths_are_the_new_modules_with_a_warning(old, new):
    import sys

    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=f"{old} moved to {new}"):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)
    assert module.__spec__.name == new  # the new module keeps its own spec


def test_moved_names_are_forwarded_with_a_warning():
    import cna_lens.dose as dose  # noqa: F401 - the old path of the dose sweep

    with pytest.warns(DeprecationWarning, match="moved to cna_lens.generation.generate"):
        from cna_lens.steering import generate
    assert generate is cna_lens.generate
    with pytest.warns(DeprecationWarning, match="use cna_lens.Steering"):
        cna_lens.SteeringConfig(multiplier=0.5)
    assert cna_lens.sweep is importlib.import_module("cna_lens.evaluation.grids").dose_sweep
