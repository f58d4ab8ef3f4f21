"""Reproduce: the CNA paper's claims checked on a model, in stages (``cna-lens reproduce``).

* :mod:`~cna_lens.pipelines.reproduce.config` — :class:`ReproduceConfig` (nesting the
  :class:`~cna_lens.DiscoveryConfig`), the presets :data:`QUICK`, :data:`PAIR`,
  :data:`PAIR_QUICK`, and the run's prompt sets;
* :mod:`~cna_lens.pipelines.reproduce.stages` — one function per stage;
* :mod:`~cna_lens.pipelines.reproduce.summary` — the typed :class:`Summary` and its
  pure builder;
* :mod:`~cna_lens.pipelines.reproduce.format` — the claims table the CLI prints;
* :mod:`~cna_lens.pipelines.reproduce.run` — :func:`reproduce`, which sequences them.
"""

from cna_lens.pipelines.reproduce.config import (
    ORGANISM_SCOPE,
    PAIR,
    PAIR_QUICK,
    QUICK,
    Inputs,
    ReproduceConfig,
    default_discovery,
    discovery_config,
    load_inputs,
    load_prompt_sets,
    preset,
)
from cna_lens.pipelines.reproduce.format import format_summary
from cna_lens.pipelines.reproduce.run import Reproduction, reproduce, resolve_models
from cna_lens.pipelines.reproduce.summary import Summary, build_summary

__all__ = [
    "ORGANISM_SCOPE",
    "PAIR",
    "PAIR_QUICK",
    "QUICK",
    "Inputs",
    "ReproduceConfig",
    "Reproduction",
    "Summary",
    "build_summary",
    "default_discovery",
    "discovery_config",
    "format_summary",
    "load_inputs",
    "load_prompt_sets",
    "preset",
    "reproduce",
    "resolve_models",
]
