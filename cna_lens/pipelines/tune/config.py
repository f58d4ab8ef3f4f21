"""What a tuning run searches over and under which limits: one frozen config, its prompts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from cna_lens import organism
from cna_lens._validate import (
    check_choice,
    check_int,
    check_numbers,
    check_real,
    dataclass_fields,
)
from cna_lens.core.discovery import DiscoveryConfig
from cna_lens.core.scores import SCORES
from cna_lens.errors import CNAError
from cna_lens.evaluation import prompts as prompt_sets
from cna_lens.evaluation.prompts import check_overlap, read_prompts
from cna_lens.generation.decoding import Decoding
from cna_lens.models.loading import validate_prompts
from cna_lens.steering import INTERVENTIONS

__all__ = ["SCORE_CHOICES", "TuneConfig", "TunePrompts", "load_tune_prompts"]

SCORE_CHOICES = ("abs_delta", "effect_size", "atp")
"""Neuron scores a tuner can try; ``atp`` (attribution patching) is computed for the run."""


@dataclass(frozen=True, kw_only=True)
class TuneConfig:
    """A search for the sparsest circuit steering that removes refusal without damage.

    Attributes:
        model: The model (any name :func:`cna_lens.resolve_model` takes).
        out: Output folder (the study's storage, tables, figure, circuit and steering).
        budget_minutes: Wall time of the whole command (load, discovery, cached passes,
            search, held-out confirmation, files).
        trials: Stop after this many trials in the study (None: as many as the budget allows).
        n_search: Prompts per search set (harmful and harmless), at most.
        n_heldout: Prompts per held-out set (harmful and harmless), at most.
        kl_tokens: N: the KL is averaged over the first N tokens of the unsteered answer.
        confirm_tokens: Generated tokens per held-out answer in the confirmation.
        confirm_points: Pareto points confirmed on held-out prompts (at most).
        over_refusal_slack: How much the harmless refusal may rise (constraint of the search
            and of the recommended point).
        fractions: The range of circuit sizes searched (fractions of all MLP neurons; log).
        scores: Neuron scores tried.
        interventions: Interventions tried.
        signs: Sign selections tried.
        multipliers: Range of the multiplier of the steered (positive-delta) neurons.
        negative_multipliers: Range of the negative-delta neurons' multiplier (sign "both").
        first_layer: The lowest decoder layer a circuit may use (None: the last quarter, where
            the circuit lives); passes start there, on a kept residual.
        compare: Also confirm the paper's 0.1% rule and the paper code's top_k = 1600 (scale,
            both signs, m = 0) on the held-out prompts (two more conditions to generate).
        discovery: The discovery (universal filter, batch size); its size is ignored.
        prompts: A folder with ``search_harmful``, ``search_harmless``, ``heldout_harmful``,
            ``heldout_harmless`` (and optionally ``discovery_harmful``,
            ``discovery_benign``) prompt files; None: the shipped sets (the organism's on
            the organism), split by category (search on half the categories, report on
            the others).
        storage: Optuna storage URL (None: ``sqlite:///OUT/study.db``).
        study: Study name in the storage.
        seed: Seed of the sampler.
        batch_size: Prompts per pass.
        prefix_reuse: Compute the prompts' shared (chat template) prefix once, in discovery,
            scoring and generation (:mod:`cna_lens.models.prefix`).
        device: Torch device (None: CUDA if available).
        threads: CPU threads (None: torch's default).
    """

    model: str
    out: str = "tune"
    budget_minutes: float = 15.0
    trials: int | None = None
    n_search: int = 40
    n_heldout: int = 60
    kl_tokens: int = 16
    confirm_tokens: int = 32
    confirm_points: int = 2
    over_refusal_slack: float = 0.05
    fractions: tuple[float, float] = (1e-4, 3e-2)
    scores: tuple[str, ...] = SCORE_CHOICES
    interventions: tuple[str, ...] = ("scale", "mean")
    signs: tuple[str, ...] = ("both", "positive")
    multipliers: tuple[float, float] = (0.0, 1.0)
    negative_multipliers: tuple[float, float] = (0.0, 2.0)
    first_layer: int | None = None
    compare: bool = False
    discovery: DiscoveryConfig | None = None
    prompts: str | None = None
    storage: str | None = None
    study: str = "cna-tune"
    seed: int = 0
    batch_size: int = 16
    prefix_reuse: bool = True
    device: str | None = None
    threads: int | None = None

    @property
    def confirm_decoding(self) -> Decoding:
        """How the confirmation (and the proxy check) generates."""
        return Decoding(
            max_new_tokens=self.confirm_tokens,
            batch_size=self.batch_size,
            prefix_reuse=self.prefix_reuse,
        )

    def __post_init__(self) -> None:
        if not isinstance(self.model, str) or not self.model.strip():
            raise CNAError(f"model must be a model name, got {self.model!r}")
        check_real("budget_minutes", self.budget_minutes, low=0.0, low_open=True)
        for name in ("n_search", "n_heldout", "kl_tokens", "confirm_tokens", "batch_size"):
            check_int(name, getattr(self, name), low=1)
        check_int("confirm_points", self.confirm_points, low=1, high=10)
        for name in ("trials", "first_layer", "threads"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), low=1 if name != "first_layer" else 0)
        check_real("over_refusal_slack", self.over_refusal_slack, low=0.0, high=1.0)
        for name, low, high in (
            ("fractions", 0.0, 1.0),
            ("multipliers", None, None),
            ("negative_multipliers", None, None),
        ):
            pair = check_numbers(name, getattr(self, name), empty=False)
            if len(pair) != 2 or pair[0] > pair[1] or (low is not None and pair[0] <= low):
                raise CNAError(f"{name} must be a range (low, high) with low <= high, got {pair}")
            if high is not None and pair[1] > high:
                raise CNAError(f"{name} must lie in (0, 1], got {pair}")
            object.__setattr__(self, name, pair)
        self._choices("scores", SCORE_CHOICES + tuple(s for s in SCORES if s not in SCORE_CHOICES))
        self._choices("interventions", tuple(INTERVENTIONS))
        self._choices("signs", ("both", "positive", "negative"))

    def _choices(self, name: str, valid: tuple[str, ...]) -> None:
        values = tuple(getattr(self, name))
        if not values:
            raise CNAError(f"{name} is empty; the search space needs at least one")
        for v in values:
            check_choice(name, v, valid)
        object.__setattr__(self, name, values)

    @property
    def on_organism(self) -> bool:
        return self.model.startswith("organism:")

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{Path(self.out).resolve() / 'study.db'}"

    def search_space(self) -> dict[str, Any]:
        """What a resumed study must share with the run that made it."""
        d = self.to_dict()
        keep = [
            "fractions",
            "scores",
            "interventions",
            "signs",
            "multipliers",
            "negative_multipliers",
            "first_layer",
            "n_search",
            "kl_tokens",
            "prompts",
        ]
        return {k: d[k] for k in keep}

    def to_dict(self) -> dict[str, Any]:
        d = asdict(replace(self, discovery=None))
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}
        d["discovery"] = None if self.discovery is None else self.discovery.to_dict()
        return d

    @classmethod
    def from_dict(cls, data: Any) -> TuneConfig:
        d = dataclass_fields(cls, data, "tune config")
        if d.get("discovery") is not None:
            d["discovery"] = DiscoveryConfig.from_dict(d["discovery"])
        for key, value in list(d.items()):
            if isinstance(value, list):
                d[key] = tuple(value)
        return cls(**d)


@dataclass(frozen=True)
class TunePrompts:
    """The prompt sets of a tuning run."""

    discovery_harmful: list[str]
    discovery_benign: list[str]
    search_harmful: list[str]
    search_harmless: list[str]
    heldout_harmful: list[str]
    heldout_harmless: list[str]
    source: str


def _halves(items: list[str]) -> tuple[list[str], list[str]]:
    return items[::2], items[1::2]


def load_tune_prompts(cfg: TuneConfig) -> TunePrompts:
    """The run's prompts: a folder's files, the organism's sets (alternate prompts for
    search and held-out), or the shipped English sets split by category.

    Raises:
        CNAError: a missing or malformed file, or empty sets.
    """
    if cfg.prompts is not None:
        root = Path(cfg.prompts)
        names = ("search_harmful", "search_harmless", "heldout_harmful", "heldout_harmless")
        files = {n: next(iter(sorted(root.glob(f"{n}.*"))), None) for n in names}
        missing = [n for n, f in files.items() if f is None]
        if missing:
            raise CNAError(f"prompt folder {str(root)!r} has no {missing} file (.txt/.json/...)")
        sets = {n: read_prompts(f) for n, f in files.items() if f is not None}
        disc = {
            n: next(iter(sorted(root.glob(f"{n}.*"))), None)
            for n in ("discovery_harmful", "discovery_benign")
        }
        for n, f in disc.items():
            sets[n] = read_prompts(f) if f is not None else prompt_sets.prompts(n)
        source = root.name
    elif cfg.on_organism:
        (sh, hh), (sb, hb) = (
            _halves(organism.prompts("eval_harmful")),
            _halves(organism.prompts("eval_benign")),
        )
        sets = {
            "discovery_harmful": organism.prompts("discovery_harmful"),
            "discovery_benign": organism.prompts("discovery_benign"),
            "search_harmful": sh,
            "search_harmless": sb,
            "heldout_harmful": hh,
            "heldout_harmless": hb,
        }
        source = "organism"
    else:
        sh, hh = prompt_sets.split_by_category("eval_harmful")
        sb, hb = prompt_sets.split_by_category("eval_benign")
        sets = {
            "discovery_harmful": prompt_sets.prompts("discovery_harmful"),
            "discovery_benign": prompt_sets.prompts("discovery_benign"),
            "search_harmful": sh,
            "search_harmless": sb,
            "heldout_harmful": hh,
            "heldout_harmless": hb,
        }
        source = "english, split by category"
    caps: dict[str, int] = {"search": cfg.n_search, "heldout": cfg.n_heldout}
    out: dict[str, list[str]] = {}
    for name, prompts in sets.items():
        cap = caps.get(name.split("_")[0])
        out[name] = validate_prompts(prompts if cap is None else prompts[:cap], name)
    return TunePrompts(**out, source=source)


def overlap_counts(p: TunePrompts) -> dict[str, int]:
    """Prompts shared between sets that should not share any (a warning, not an error)."""
    return {
        "harmful/harmless search": check_overlap(p.search_harmful, p.search_harmless),
        "search/held-out harmful": check_overlap(p.search_harmful, p.heldout_harmful),
        "search/held-out harmless": check_overlap(p.search_harmless, p.heldout_harmless),
    }
