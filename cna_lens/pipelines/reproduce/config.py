"""What a reproduction run depends on: one frozen config, its presets, its prompt sets."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

from cna_lens import organism
from cna_lens._validate import check_choice, check_int, check_numbers, dataclass_fields
from cna_lens.core.discovery import DiscoveryConfig
from cna_lens.core.universal import default_universal_prompts
from cna_lens.errors import CNAError
from cna_lens.evaluation import prompts as prompt_sets
from cna_lens.evaluation.grids import CAA_ALPHAS, CNA_MULTIPLIERS
from cna_lens.evaluation.metrics import CapabilityItem, load_capability
from cna_lens.generation import BACKENDS, Decoding
from cna_lens.models.loading import validate_prompts
from cna_lens.pipelines.pairs import get_pair

__all__ = [
    "OPTIONAL_SETS",
    "ORGANISM_SCOPE",
    "PAIR",
    "PAIR_QUICK",
    "QUICK",
    "REQUIRED_SETS",
    "Inputs",
    "ReproduceConfig",
    "default_discovery",
    "discovery_config",
    "load_inputs",
    "load_prompt_sets",
    "preset",
]

REQUIRED_SETS = ("discovery_harmful", "discovery_benign", "eval_harmful", "eval_benign")
OPTIONAL_SETS = ("borderline", "universal", "capability")


@dataclass(frozen=True, kw_only=True)
class ReproduceConfig:
    """Everything a reproduction run depends on (recorded in ``summary.json``).

    Attributes:
        model: Instruct model (hub name, local dir, .gguf, ``zoo:NAME``,
            ``organism:instruct``); None: the organism's instruct model.
        base_model: Base model; None: the organism's base model when ``model`` is the
            organism, else no base stages.
        pair: A pair of :mod:`cna_lens.pipelines.pairs` (``--pair NAME``): its tuned model
            is the instruct model and its untuned model the base (excludes model/base_model).
        pair_variant: Which tuned model of the pair: "lora" (the shipped adapter) or "full"
            (the full-weight fine-tune, for pairs that define one, trained locally).
        prompts: Folder of prompt-set JSON files; None: the organism's sets for the
            organism, the shipped English sets otherwise.
        out: Output folder for figures, tables and ``summary.json``.
        discovery: How circuits are found (size rule, score, universal filter, batch size).
            None: the model's documented default — the organism's 1%
            (``organism.CIRCUIT_FRACTION``; the paper's 0.1% is 3 neurons there), the
            paper's 0.1% otherwise — with this config's ``batch_size``. Its
            ``universal_prompts`` default to the prompt folder's ``universal.json`` or the
            shipped set.
        multipliers: CNA multipliers of the sweep (must include 0 and 1).
        caa_alphas: CAA strengths of the sweep (must include 0).
        caa_layers: Layers CAA steers (None: the middle layer).
        n_discovery, n_eval, n_capability, n_universal: Caps on the prompt sets (None: all).
        n_bootstrap: Bootstrap resamples for stability.
        n_cards: Neuron cards in ``report.html`` (top circuit neurons).
        max_new_tokens: Generation length.
        batch_size: Prompts per batch (forward passes and generation).
        prefix_reuse: Compute the prompts' shared (chat template) prefix once, in discovery
            and generation (:mod:`cna_lens.models.prefix`); False: every prompt whole.
        seed: Seed of the random control and the bootstrap.
        device: Torch device (None: CUDA if available).
        threads: CPU threads for torch (None: 1 thread for models under 100M parameters,
            torch's default otherwise). Restored afterwards.
        png: Try PNG export of the figures.
        overwrite: Write into a non-empty ``out`` that is not a previous reproduce output
            (refused by default, before any model is loaded).
        backend: Generation backend of the sweeps: "fast" (default) or "bridge" (the
            reference path, one steered generation per condition; the same texts).
    """

    model: str | None = None
    base_model: str | None = None
    pair: str | None = None
    pair_variant: str = "lora"
    prompts: str | None = None
    out: str = "figures"
    discovery: DiscoveryConfig | None = None
    multipliers: tuple[float, ...] = CNA_MULTIPLIERS
    caa_alphas: tuple[float, ...] = CAA_ALPHAS
    caa_layers: tuple[int, ...] | None = None
    n_discovery: int | None = None
    n_eval: int | None = None
    n_capability: int | None = None
    n_universal: int | None = None
    n_bootstrap: int = 100
    n_cards: int = 3
    max_new_tokens: int = 32
    batch_size: int = 64
    prefix_reuse: bool = True
    seed: int = 0
    device: str | None = None
    threads: int | None = None
    png: bool = True
    overwrite: bool = False
    backend: Literal["fast", "bridge"] | str = "fast"

    def __post_init__(self) -> None:
        for name in ("multipliers", "caa_alphas"):
            values = check_numbers(name, getattr(self, name), empty=False)
            object.__setattr__(self, name, values)
        if 0.0 not in self.multipliers or 1.0 not in self.multipliers:
            raise CNAError(
                f"multipliers must include 0 (ablation) and 1 (baseline), got {self.multipliers}"
            )
        if 0.0 not in self.caa_alphas:
            raise CNAError(f"caa_alphas must include 0 (baseline), got {self.caa_alphas}")
        for name in ("n_discovery", "n_eval", "n_capability", "n_universal", "threads"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), low=1)
        check_int("n_bootstrap", self.n_bootstrap, low=1)
        check_int("n_cards", self.n_cards, low=0)
        Decoding(max_new_tokens=self.max_new_tokens, batch_size=self.batch_size)  # checks both
        check_choice("backend", self.backend, BACKENDS)
        if self.discovery is not None and not isinstance(self.discovery, DiscoveryConfig):
            raise CNAError(
                f"discovery must be a DiscoveryConfig, got {type(self.discovery).__name__}"
            )
        if self.caa_layers is not None:
            object.__setattr__(self, "caa_layers", tuple(int(x) for x in self.caa_layers))
        if self.pair is not None:
            if self.model is not None or self.base_model is not None:
                raise CNAError("pass either pair or model/base_model, not both")
            # unknown names and variants fail here, before any model is loaded
            get_pair(self.pair).config(self.pair_variant)
        elif self.pair_variant != "lora":
            raise CNAError(f"pair_variant={self.pair_variant!r} needs a pair")

    @property
    def on_organism(self) -> bool:
        """Whether the instruct model is the shipped organism."""
        return self.pair is None and (self.model is None or self.model.startswith("organism:"))

    @property
    def decoding(self) -> Decoding:
        """How the sweeps generate."""
        return Decoding(
            max_new_tokens=self.max_new_tokens,
            batch_size=self.batch_size,
            prefix_reuse=self.prefix_reuse,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON data (the discovery config nested as its own dict)."""
        d = asdict(replace(self, discovery=None))
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
        d["discovery"] = None if self.discovery is None else self.discovery.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ReproduceConfig:
        """Read back :meth:`to_dict`.

        Raises:
            CNAError: unknown keys or invalid values.
        """
        d = dataclass_fields(cls, data, "reproduce config")
        if d.get("discovery") is not None:
            d["discovery"] = DiscoveryConfig.from_dict(d["discovery"])
        for key in ("multipliers", "caa_alphas", "caa_layers"):
            if isinstance(d.get(key), list):
                d[key] = tuple(d[key])
        return cls(**d)


QUICK = ReproduceConfig(
    multipliers=(0.0, 1.0, 2.0),
    caa_alphas=(-4.0, 0.0, 4.0),
    n_discovery=48,
    n_eval=24,
    n_capability=24,
    n_universal=20,
    n_bootstrap=20,
    n_cards=2,
    max_new_tokens=16,
)
"""``--quick``: a smoke run of the whole pipeline (under a minute on the organism, about
10-15 minutes for a 0.5B model on 2 CPU cores)."""

PAIR = ReproduceConfig(
    multipliers=(0.0, 1.0, 2.0, 3.0),
    caa_alphas=(-4.0, 0.0),
    n_capability=64,
    max_new_tokens=24,
    n_bootstrap=50,
)
"""``--pair``: every held-out prompt, m = 0 and the paper's amplification (2, 3), CAA at
its strongest, 64 capability questions and 24 new tokens, so a full run on the 135M pair
fits in 20 minutes on 2 CPU cores."""

PAIR_QUICK = replace(QUICK, multipliers=PAIR.multipliers)
"""``--pair --quick``: the quick run with m = 3 as well."""


def preset(*, quick: bool = False, pair: str | None = None) -> ReproduceConfig:
    """The config a run starts from before its own settings: the defaults, :data:`QUICK`,
    :data:`PAIR` (with the pair's own :attr:`~cna_lens.pipelines.pairs.Pair.reproduce`
    sizing) or :data:`PAIR_QUICK`.

    Raises:
        CNAError: an unknown pair.
    """
    if pair is not None:
        sizing = get_pair(pair).reproduce
        return PAIR_QUICK if quick else replace(PAIR, **dict(sizing))
    return QUICK if quick else ReproduceConfig()


ORGANISM_SCOPE = (
    "The organism speaks to: whether ablating a contrastive circuit removes a trained-in "
    "refusal while random neurons in the same layers do not; output quality and capability "
    "under CNA vs CAA; the pipeline end to end. It cannot speak to: where refusal circuits "
    "sit in depth, how base and instruct circuits overlap (its fine-tune trains only the down "
    "projections, so layer-0 activations are identical in both), or amplification on "
    "borderline prompts. For the base-vs-instruct question on pretrained weights run "
    "`cna-lens reproduce --pair smollm2-refusal`."
)
"""What a run on the organism can and cannot show (in ``summary.meta["scope"]`` and
printed by the CLI)."""


# ----------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Inputs:
    """The prompt sets of a run, capped and validated."""

    positive: list[str]
    negative: list[str]
    universal: list[str] | None
    eval_sets: dict[str, list[str]]
    capability: list[CapabilityItem] | None
    source: str
    """Where they came from: "organism", "english" or the folder's name."""


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise CNAError(f"{path}: not UTF-8 text ({exc.reason}); save it as UTF-8") from exc
    except json.JSONDecodeError as exc:
        raise CNAError(f"{path}: not valid JSON ({exc})") from exc


def _texts(items: Any, name: str) -> Any:
    """Prompt objects ({"prompt": ...}) to strings; other sets unchanged."""
    if name == "capability" or not isinstance(items, list):
        return items
    return [x["prompt"] if isinstance(x, Mapping) and "prompt" in x else x for x in items]


def load_prompt_sets(folder: str | None, *, source: str = "organism") -> dict[str, Any]:
    """The prompt sets by name: from ``folder``, else the organism's or the English sets.

    Raises:
        CNAError: a required set is missing.
    """
    sets: dict[str, Any] = {}
    if folder is None and source == "english":
        for name in REQUIRED_SETS + ("borderline",):
            sets[name] = prompt_sets.prompts(name)
        sets["capability"] = prompt_sets.records("capability")
        return sets
    if folder is None:
        for name in REQUIRED_SETS + OPTIONAL_SETS:
            try:
                sets[name] = organism.prompts(name)
            except (FileNotFoundError, ValueError) as exc:
                if name in REQUIRED_SETS:
                    raise CNAError(
                        f"organism prompt set {name!r} is not available ({exc}); pass --prompts DIR"
                    ) from exc
        return sets
    root = Path(folder)
    if not root.is_dir():
        raise CNAError(f"prompt folder {folder!r} does not exist")
    for name in REQUIRED_SETS + OPTIONAL_SETS:
        path = root / f"{name}.json"
        if path.is_file():
            sets[name] = _texts(_read_json(path), name)
        elif name in REQUIRED_SETS:
            raise CNAError(
                f"prompt folder {folder!r} has no {name}.json; it needs "
                f"{', '.join(s + '.json' for s in REQUIRED_SETS)}"
            )
    return sets


def _cap(items: Sequence[Any], n: int | None) -> list[Any]:
    return list(items) if n is None else list(items)[:n]


def load_inputs(cfg: ReproduceConfig) -> Inputs:
    """The prompt sets of the run (see :func:`load_prompt_sets`), capped, with a warning on
    any overlap between discovery and evaluation prompts.

    Raises:
        CNAError: a missing or malformed set.
    """
    source = "organism" if cfg.on_organism else "english"
    sets = load_prompt_sets(cfg.prompts, source=source)
    pos = validate_prompts(_cap(sets["discovery_harmful"], cfg.n_discovery), "discovery_harmful")
    neg = validate_prompts(_cap(sets["discovery_benign"], cfg.n_discovery), "discovery_benign")
    universal = (
        validate_prompts(_cap(sets["universal"], cfg.n_universal), "universal")
        if "universal" in sets
        else None
    )
    if universal is None and cfg.n_universal is not None:
        universal = default_universal_prompts()[: cfg.n_universal]
    eval_sets = {
        "harmful": validate_prompts(_cap(sets["eval_harmful"], cfg.n_eval), "eval_harmful"),
        "benign": validate_prompts(_cap(sets["eval_benign"], cfg.n_eval), "eval_benign"),
    }
    if "borderline" in sets:
        eval_sets["borderline"] = validate_prompts(
            _cap(sets["borderline"], cfg.n_eval), "borderline"
        )
    for prompts in eval_sets.values():
        prompt_sets.warn_overlap(pos + neg, prompts)
    capability = (
        _cap(load_capability(sets["capability"]), cfg.n_capability)
        if "capability" in sets
        else None
    )
    label = Path(cfg.prompts).name if cfg.prompts is not None else source
    return Inputs(pos, neg, universal, eval_sets, capability, label)


def default_discovery(cfg: ReproduceConfig) -> DiscoveryConfig:
    """The discovery of a run that gives none: the organism's documented 1%
    (``organism.CIRCUIT_FRACTION``) on the organism, the library's default size otherwise,
    with the run's batch size."""
    if cfg.on_organism:
        return DiscoveryConfig(
            fraction=organism.CIRCUIT_FRACTION,
            batch_size=cfg.batch_size,
            prefix_reuse=cfg.prefix_reuse,
        )
    return DiscoveryConfig(batch_size=cfg.batch_size, prefix_reuse=cfg.prefix_reuse)


def discovery_config(cfg: ReproduceConfig, inputs: Inputs) -> DiscoveryConfig:
    """The run's :class:`DiscoveryConfig`: ``cfg.discovery`` or :func:`default_discovery`,
    with the run's universal prompts where it gives none."""
    dcfg = cfg.discovery if cfg.discovery is not None else default_discovery(cfg)
    if dcfg.universal_prompts is None and inputs.universal is not None:
        dcfg = replace(dcfg, universal_prompts=tuple(inputs.universal))
    return dcfg
