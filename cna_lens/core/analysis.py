"""Analysis: where circuits live, how two circuits overlap, and how stable a circuit is.

Pure functions on circuits, per-layer counts and activation tensors, testable without a
model (the one exception, :func:`prompt_activations`, only collects the per-prompt
activations the bootstrap needs):

* :func:`layer_distribution` — neurons per layer and the fraction in the last layer, the
  last 3 layers, the last 10% and the last quarter of layers.
* :func:`circuit_overlap` — base vs instruct: ``|A ∩ B| / k``, Jaccard, per layer, the
  overlap expected by chance for random circuits with the same per-layer counts, and the
  similarity of the two layer distributions.
* :func:`bootstrap_stability` — resample the discovery prompts with replacement,
  reselect the circuit, and compare it with the full one (Jaccard).
* :func:`random_control_circuit` — a seeded random circuit with the same per-layer counts.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from cna_lens._validate import Integral, Real, check_int, dataclass_fields
from cna_lens.core.activations import NeuronStats, iter_activations
from cna_lens.core.attribution import Attribution
from cna_lens.core.circuit import Circuit, Neuron, Provenance
from cna_lens.core.scores import compute_score, get_score
from cna_lens.core.selection import select_top_k
from cna_lens.errors import CNAError

__all__ = [
    "LayerDistribution",
    "Overlap",
    "Stability",
    "bootstrap_stability",
    "chance_intersection",
    "circuit_overlap",
    "jaccard",
    "layer_distribution",
    "prompt_activations",
    "random_control_circuit",
]


# ----------------------------------------------------------------------------- layers
def _tail(n_layers: int, fraction: float) -> int:
    """Number of layers in the last ``fraction`` of the network (at least 1)."""
    return max(1, math.ceil(fraction * n_layers - 1e-9))


@dataclass(frozen=True)
class LayerDistribution:
    """How a circuit's neurons spread over layers.

    The "last 10%" and "last quarter" are the last ``ceil(0.1 * n_layers)`` and
    ``ceil(0.25 * n_layers)`` layers (at least one layer each); the "last 3" are the last
    ``min(3, n_layers)`` layers. Fractions are 0 for an empty circuit.
    """

    per_layer: tuple[int, ...]
    total: int
    frac_last_layer: float
    frac_last_3: float
    frac_last_10pct: float
    frac_last_quarter: float

    @property
    def n_layers(self) -> int:
        return len(self.per_layer)

    @property
    def fractions(self) -> list[float]:
        """Share of the circuit in each layer."""
        return [c / self.total if self.total else 0.0 for c in self.per_layer]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["per_layer"] = list(self.per_layer)
        return d

    @classmethod
    def from_dict(cls, data: Any) -> LayerDistribution:
        """Read :meth:`to_dict` output (``total`` may be absent: summaries of cna_lens 0.1).

        Raises:
            CNAError: not an object, missing or unknown keys.
        """
        d = dataclass_fields(cls, data, "layer distribution")
        if "per_layer" in d and "total" not in d:  # absent in summaries of cna_lens 0.1
            d["total"] = sum(d["per_layer"])
        d = dataclass_fields(cls, d, "layer distribution", required=True)
        d["per_layer"] = tuple(int(c) for c in d["per_layer"])
        return cls(**d)


def layer_distribution(circuit: Circuit | Sequence[int]) -> LayerDistribution:
    """Layer statistics of a circuit (or of its per-layer counts).

    Example:
        >>> layer_distribution([0, 1, 0, 3]).frac_last_layer
        0.75

    Raises:
        CNAError: no layers, or a negative count.
    """
    counts = tuple(
        circuit.per_layer_counts() if isinstance(circuit, Circuit) else (int(c) for c in circuit)
    )
    if not counts:
        raise CNAError("per-layer counts are empty; a circuit has at least one layer")
    if any(c < 0 for c in counts):
        raise CNAError(f"per-layer counts must be >= 0, got {list(counts)}")
    total, n = sum(counts), len(counts)

    def frac(last: int) -> float:
        return sum(counts[n - last :]) / total if total else 0.0

    return LayerDistribution(
        counts, total, frac(1), frac(min(3, n)), frac(_tail(n, 0.1)), frac(_tail(n, 0.25))
    )


# ----------------------------------------------------------------------------- overlap
def jaccard(
    a: Circuit | frozenset[tuple[int, int]], b: Circuit | frozenset[tuple[int, int]]
) -> float:
    """``|A ∩ B| / |A ∪ B|`` of the (layer, neuron) pairs (1.0 for two empty sets)."""
    pa = a.pairs if isinstance(a, Circuit) else frozenset(a)
    pb = b.pairs if isinstance(b, Circuit) else frozenset(b)
    union = len(pa | pb)
    return len(pa & pb) / union if union else 1.0


def chance_intersection(
    counts_a: Sequence[int], counts_b: Sequence[int], d_mlp: int
) -> list[float]:
    """Expected ``|A ∩ B|`` per layer for random circuits with these per-layer counts.

    In layer ``l``, ``a_l`` and ``b_l`` neurons are drawn uniformly without replacement from
    ``d_mlp``; the expected number in common is ``a_l * b_l / d_mlp``.

    Raises:
        CNAError: different numbers of layers, or a count outside [0, d_mlp].
    """
    if len(counts_a) != len(counts_b):
        raise CNAError(f"per-layer counts have {len(counts_a)} and {len(counts_b)} layers")
    for c in (*counts_a, *counts_b):
        if not 0 <= c <= d_mlp:
            raise CNAError(f"a per-layer count of {c} is outside [0, d_mlp={d_mlp}]")
    return [a * b / d_mlp for a, b in zip(counts_a, counts_b, strict=True)]


@dataclass(frozen=True)
class Overlap:
    """Overlap of two circuits' (layer, neuron) pairs, e.g. base (A) vs instruct (B).

    ``overlap_fraction = |A ∩ B| / k`` with ``k = min(|A|, |B|)`` (= the shared size when,
    as usual, both circuits have the same k), and ``chance_overlap_fraction`` is the same
    ratio for the expected intersection of random circuits with the same per-layer counts.
    ``layer_cosine`` and ``layer_similarity`` (``1 - total variation distance``) compare the
    two layer distributions: 1 when the circuits spread over layers identically.
    """

    size_a: int
    size_b: int
    intersection: int
    overlap_fraction: float
    jaccard: float
    chance_intersection: float
    chance_overlap_fraction: float
    per_layer_a: tuple[int, ...]
    per_layer_b: tuple[int, ...]
    per_layer_intersection: tuple[int, ...]
    per_layer_chance: tuple[float, ...]
    layer_cosine: float
    layer_similarity: float

    @property
    def per_layer_overlap_fraction(self) -> list[float | None]:
        """``|A_l ∩ B_l| / min(a_l, b_l)`` per layer (None where a layer is empty in either)."""
        return [
            i / min(a, b) if min(a, b) else None
            for i, a, b in zip(
                self.per_layer_intersection, self.per_layer_a, self.per_layer_b, strict=True
            )
        ]

    def to_dict(self) -> dict[str, Any]:
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}
        d["per_layer_overlap_fraction"] = self.per_layer_overlap_fraction
        return d

    @classmethod
    def from_dict(cls, data: Any) -> Overlap:
        """Read :meth:`to_dict` output, or the overlap section of a cna_lens 0.1 summary
        (``per_layer`` with "instruct", "base", "shared" and "chance" lists).

        Raises:
            CNAError: not an overlap.
        """
        if isinstance(data, dict) and "per_layer" in data:  # cna_lens 0.1
            old, per = dict(data), data["per_layer"]
            old.pop("per_layer")
            data = {
                **old,
                "size_a": sum(per["instruct"]),
                "size_b": sum(per["base"]),
                "chance_intersection": sum(per["chance"]),
                "per_layer_a": per["instruct"],
                "per_layer_b": per["base"],
                "per_layer_intersection": per["shared"],
                "per_layer_chance": per["chance"],
            }
        d = dataclass_fields(
            cls, data, "overlap", required=True, extra=("per_layer_overlap_fraction",)
        )
        for key in ("per_layer_a", "per_layer_b", "per_layer_intersection", "per_layer_chance"):
            d[key] = tuple(d[key])
        return cls(**d)


def _cosine(a: Sequence[int | float], b: Sequence[int | float]) -> float:
    na = math.sqrt(sum(x * x for x in a))
    nb = math.sqrt(sum(x * x for x in b))
    if na == 0 or nb == 0:
        return 1.0 if na == nb else 0.0
    return sum(x * y for x, y in zip(a, b, strict=True)) / (na * nb)


def circuit_overlap(a: Circuit, b: Circuit) -> Overlap:
    """Compare two circuits of the same neuron grid (e.g. base and instruct).

    Example:
        >>> c = Circuit.from_pairs([(0, 1), (1, 2)], n_layers=2, d_mlp=8)
        >>> circuit_overlap(c, c).overlap_fraction
        1.0

    Raises:
        CNAError: the circuits have different shapes or one is empty.
    """
    if (a.n_layers, a.d_mlp) != (b.n_layers, b.d_mlp):
        raise CNAError(
            f"circuits are on different grids: [{a.n_layers}, {a.d_mlp}] vs "
            f"[{b.n_layers}, {b.d_mlp}]; overlap needs the same n_layers and d_mlp"
        )
    if not len(a) or not len(b):
        raise CNAError("cannot compare an empty circuit")
    ca, cb = a.per_layer_counts(), b.per_layer_counts()
    common = a.pairs & b.pairs
    per_common = [0] * a.n_layers
    for layer, _ in common:
        per_common[layer] += 1
    chance = chance_intersection(ca, cb, a.d_mlp)
    k = min(len(a), len(b))
    fa = [c / len(a) for c in ca]
    fb = [c / len(b) for c in cb]
    tv = 0.5 * sum(abs(x - y) for x, y in zip(fa, fb, strict=True))
    return Overlap(
        size_a=len(a),
        size_b=len(b),
        intersection=len(common),
        overlap_fraction=len(common) / k,
        jaccard=jaccard(a, b),
        chance_intersection=sum(chance),
        chance_overlap_fraction=sum(chance) / k,
        per_layer_a=tuple(ca),
        per_layer_b=tuple(cb),
        per_layer_intersection=tuple(per_common),
        per_layer_chance=tuple(chance),
        layer_cosine=_cosine(ca, cb),
        layer_similarity=1.0 - tv,
    )


# ----------------------------------------------------------------------------- control
def random_control_circuit(
    circuit: Circuit, *, seed: int = 0, exclude: Bool[Tensor, "n_layers d_mlp"] | None = None
) -> Circuit:
    """A random circuit with the same size and per-layer counts, disjoint from ``circuit``.

    In each layer, as many neurons as the circuit has there are drawn uniformly (seeded)
    from the neurons that are neither in the circuit nor in ``exclude`` (e.g. universal
    neurons). Deltas are 0 (so the control is scaled by the one multiplier).

    Raises:
        CNAError: a layer has too few neurons left to draw from.
    """
    rng = random.Random(seed)
    taken = circuit.pairs
    neurons = []
    for layer, count in enumerate(circuit.per_layer_counts()):
        if not count:
            continue
        pool = [
            j
            for j in range(circuit.d_mlp)
            if (layer, j) not in taken and (exclude is None or not bool(exclude[layer, j]))
        ]
        if len(pool) < count:
            raise CNAError(
                f"layer {layer} has {len(pool)} neurons outside the circuit, "
                f"fewer than the {count} needed for a disjoint control"
            )
        neurons += [Neuron(layer, j) for j in sorted(rng.sample(pool, count))]
    prov = Provenance(
        model_id=circuit.provenance.model_id,
        fingerprint=circuit.provenance.fingerprint,
        rule="manual",
        k=len(neurons) or None,
    )
    return Circuit(tuple(neurons), circuit.n_layers, circuit.d_mlp, prov)


# ----------------------------------------------------------------------------- stability
def prompt_activations(
    model: Any,
    prompts: Sequence[str],
    *,
    batch_size: Integral = 32,
    progress: bool = False,
    desc: str = "activations",
    prefix_reuse: bool = True,
) -> Float[Tensor, "n_prompts n_layers d_mlp"]:
    """Last-token MLP activations of every prompt, in prompt order, float32 on CPU.

    ``n_prompts * n_layers * d_mlp`` floats: small for discovery sets (100 prompts of a 1B
    model is ~50 MB), and what the bootstrap needs. Also gives the exact statistics:
    ``NeuronStats.of(acts)``. ``prefix_reuse``: see :func:`cna_lens.iter_activations`.
    """
    rows: dict[int, Tensor] = {}
    for batch, acts in iter_activations(
        model,
        prompts,
        batch_size=batch_size,
        progress=progress,
        desc=desc,
        prefix_reuse=prefix_reuse,
    ):
        cpu = acts.to(device="cpu", dtype=torch.float32)
        for row, idx in enumerate(batch.indices):
            rows[idx] = cpu[row]
    return torch.stack([rows[i] for i in range(len(rows))])


@dataclass(frozen=True)
class Stability:
    """Jaccard similarity of bootstrap-resampled circuits to the full circuit."""

    jaccards: tuple[float, ...]
    k: int
    seed: int

    @property
    def n_resamples(self) -> int:
        return len(self.jaccards)

    @property
    def mean(self) -> float:
        return sum(self.jaccards) / len(self.jaccards)

    @property
    def min(self) -> float:
        return min(self.jaccards)

    @property
    def std(self) -> float:
        m = self.mean
        return math.sqrt(sum((x - m) ** 2 for x in self.jaccards) / len(self.jaccards))

    def quantile(self, q: float) -> float:
        """The ``q`` quantile (linear interpolation)."""
        return float(torch.tensor(self.jaccards, dtype=torch.float64).quantile(q))

    def to_dict(self) -> dict[str, Any]:
        return {
            "jaccard_mean": self.mean,
            "jaccard_min": self.min,
            "jaccard_std": self.std,
            "jaccard_median": self.quantile(0.5),
            "n_resamples": self.n_resamples,
            "k": self.k,
            "seed": self.seed,
            "jaccards": list(self.jaccards),
        }


def bootstrap_stability(
    positive: Float[Tensor, "n_pos n_layers d_mlp"],
    negative: Float[Tensor, "n_neg _ _"],  # grid checked below, with a clearer message
    *,
    fraction: Real | None = 0.001,
    top_k: Integral | None = None,
    exclude: Bool[Tensor, "n_layers d_mlp"] | None = None,
    exclude_layers: Sequence[int] = (),
    n_resamples: int = 100,
    seed: int = 0,
    score: str | Callable[..., Any] = "abs_delta",
) -> Stability:
    """Bootstrap the discovery prompts and measure how much the circuit moves.

    The full circuit is the top-k by ``score`` (default |delta|) of all prompts (as
    :func:`cna_lens.discover` selects it, with the same exclusions and score). Each resample draws ``n_pos`` positive and
    ``n_neg`` negative prompts with replacement, recomputes delta, reselects the top-k, and
    records its Jaccard similarity with the full circuit.

    Args:
        positive: Per-prompt last-token activations of the positive set
            (:func:`prompt_activations`).
        negative: The same for the negative set.
        fraction: Circuit size as a fraction of all neurons (ignored if ``top_k``).
        top_k: Circuit size as a count.
        exclude: Neurons never selected (e.g. ``universal.mask``).
        exclude_layers: Layers never selected.
        n_resamples: Bootstrap resamples (>= 1).
        seed: Seed of the resampling.
        score: The neuron score selection ranks by (a name in
            :data:`cna_lens.core.scores.SCORES` or a function; see :mod:`cna_lens.core.scores`).

    Raises:
        CNAError: mismatched shapes, bad size or score, or ``n_resamples < 1``.
    """
    if positive.shape[1:] != negative.shape[1:]:
        raise CNAError(
            f"positive activations are {tuple(positive.shape)} but negative are "
            f"{tuple(negative.shape)}; the neuron grids must match"
        )
    n_resamples = check_int("n_resamples", n_resamples, low=1)
    if top_k is not None:
        fraction = None
    get_score(score)  # an unknown name fails before any work
    pos = positive.to(torch.float64)
    neg = negative.to(torch.float64)

    def select(p: Tensor, n: Tensor) -> frozenset[tuple[int, int]]:
        if score == "abs_delta":  # the paper's rule, from the plain means
            delta, values = p.mean(0) - n.mean(0), None
        else:
            attribution = Attribution(NeuronStats.of(p), NeuronStats.of(n))
            delta, values = attribution.delta, compute_score(score, attribution)
        return select_top_k(
            delta,
            fraction=fraction,
            top_k=top_k,
            exclude=exclude,
            exclude_layers=exclude_layers,
            score=values,
        ).pairs

    full = select(pos, neg)
    gen = torch.Generator().manual_seed(seed)
    scores = []
    for _ in range(n_resamples):
        ip = torch.randint(0, pos.shape[0], (pos.shape[0],), generator=gen)
        ineg = torch.randint(0, neg.shape[0], (neg.shape[0],), generator=gen)
        scores.append(jaccard(full, select(pos[ip], neg[ineg])))
    return Stability(tuple(scores), len(full), seed)
