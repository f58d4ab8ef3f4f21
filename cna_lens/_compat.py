"""Old import paths, kept working for one release with a :class:`DeprecationWarning`.

cna_lens 0.2 moved its 33 flat modules into layered subpackages (see the README's
"Layout" and ``CHANGELOG.md``). ``import cna_lens.dose`` or ``from cna_lens import zoo``
still works: a meta-path finder maps each old module path onto its new module (the very
same module object, so monkeypatching either name patches both) and warns once, naming the
new path. Names that moved between modules (``cna_lens.steering.generate``) are forwarded
by :func:`forward`, which a package's ``__getattr__`` calls.

Nothing here imports a layer statically: targets are imported by name on first use.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any

__all__ = ["MOVED_MODULES", "forward", "install"]

MOVED_MODULES: dict[str, str] = {
    "cna_lens.loading": "cna_lens.models.loading",
    "cna_lens.gguf": "cna_lens.models.gguf",
    "cna_lens.zoo": "cna_lens.models.zoo",
    "cna_lens.testing": "cna_lens.models.testing",
    "cna_lens.activations": "cna_lens.core.activations",
    "cna_lens.attribution": "cna_lens.core.attribution",
    "cna_lens.scores": "cna_lens.core.scores",
    "cna_lens.universal": "cna_lens.core.universal",
    "cna_lens.circuit": "cna_lens.core.circuit",
    "cna_lens.discovery": "cna_lens.core.discovery",
    "cna_lens.distributed": "cna_lens.core.distributed",
    "cna_lens.interventions": "cna_lens.steering.interventions",
    "cna_lens.caa": "cna_lens.steering.caa",
    "cna_lens.baking": "cna_lens.steering.bake",
    "cna_lens.fastgen": "cna_lens.generation.fast",
    "cna_lens.dose": "cna_lens.evaluation.grids",
    "cna_lens.analysis": "cna_lens.core.analysis",
    "cna_lens.prompt_sets": "cna_lens.evaluation.prompts",
    "cna_lens.plots": "cna_lens.viz.plots",
    "cna_lens.figures": "cna_lens.viz.figures",
    "cna_lens.report": "cna_lens.viz.report",
    "cna_lens.explore": "cna_lens.viz.explore",
    "cna_lens.summary": "cna_lens.pipelines.reproduce.summary",
    "cna_lens.reproduce": "cna_lens.pipelines.reproduce",
    "cna_lens.pairs": "cna_lens.pipelines.pairs",
}
"""Old module path -> the module that replaced it."""


def _warn(old: str, new: str) -> None:
    warnings.warn(
        f"{old} moved to {new} in cna_lens 0.2; import it from there (the old path goes "
        "away in 0.3)",
        DeprecationWarning,
        stacklevel=3,
    )


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, target: str):
        self.target = target
        self._spec: Any = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        _warn(spec.name, self.target)
        module = importlib.import_module(self.target)
        self._spec = module.__spec__  # the import system overwrites it with the alias's
        return module

    def exec_module(self, module: ModuleType) -> None:
        """The target module is already executed: put its own spec back."""
        module.__spec__ = self._spec


class _AliasFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        new = MOVED_MODULES.get(fullname)
        if new is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, _AliasLoader(new))


def install() -> None:
    """Put the alias finder on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())


DEPRECATED: dict[str, str] = {
    "SteeringConfig": "use cna_lens.Steering (circuit, multipliers, sign and positions)",
    "caa_generate": "use cna_lens.generate(model, prompts, steering=cna_lens.CAA(vectors, "
    "alpha, layers))",
}
"""Names of cna_lens 0.1 kept as deprecated shims here, with what to use instead."""


def forward(module: str, moved: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that forwards names that moved elsewhere, with a warning.

    Args:
        module: The module's ``__name__``.
        moved: Old attribute name -> ``"new.module:name"``.
    """

    def __getattr__(name: str) -> Any:
        target = moved.get(name)
        if target is None:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        where, _, attr = target.partition(":")
        if where == __name__:
            warnings.warn(
                f"{module}.{name} is deprecated: {DEPRECATED[attr]} (it goes away in 0.3)",
                DeprecationWarning,
                stacklevel=2,
            )
        else:
            _warn(f"{module}.{name}", f"{where}.{attr}")
        return getattr(importlib.import_module(where), attr)

    return __getattr__


class SteeringConfig:
    """Deprecated (cna_lens 0.1): multipliers and positions without a circuit.

    Use :class:`cna_lens.Steering`, which holds the circuit, intervention and sign too. Kept
    so old code that builds one keeps running; nothing in cna_lens takes it any more.
    """

    def __init__(
        self,
        *,
        multiplier: Any = 0.0,
        negative_multiplier: Any = None,
        positions: str = "all",
    ):
        from cna_lens.steering.interventions import check_strength

        self.multiplier, self.negative_multiplier = check_strength(
            multiplier, negative_multiplier, positions
        )
        self.positions = positions

    @property
    def is_identity(self) -> bool:
        neg = self.multiplier if self.negative_multiplier is None else self.negative_multiplier
        return self.multiplier == 1.0 and neg == 1.0


def caa_generate(
    model: Any,
    prompts: Any,
    caa: Any,
    alpha: float,
    *,
    layers: Any = None,
    **generate_kwargs: Any,
) -> list[str]:
    """Deprecated (cna_lens 0.1): ``generate(model, prompts, steering=CAA(caa, alpha, layers))``.

    Raises:
        CNAError: as :func:`cna_lens.generate`, or ``circuit=`` passed (CAA only).
    """
    from cna_lens.errors import CNAError
    from cna_lens.generation import generate
    from cna_lens.steering.caa import CAA

    if "circuit" in generate_kwargs:
        raise CNAError("caa_generate steers with CAA only; do not pass circuit=")
    condition = CAA(caa, alpha, None if layers is None else tuple(layers))
    return generate(model, prompts, steering=condition, **generate_kwargs)
