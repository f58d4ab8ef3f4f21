"""Neuron cards and the circuit map: what one neuron does, and the whole circuit at a glance.

* :func:`neuron_logits` / :func:`logit_lens` — the tokens a neuron's output direction
  promotes and suppresses through the final norm and the unembedding;
* :func:`ablation_effect` — the change of refusal-token logits when it alone is ablated;
* :func:`neuron_card` bundles those with the parts in :mod:`cna_lens.viz.explore` into a
  :class:`NeuronCard`;
* :func:`circuit_map` — every neuron's delta by layer in one figure, the circuit
  highlighted and the universal neurons marked.
"""

from __future__ import annotations

import html
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from jaxtyping import Float
from torch import Tensor

from cna_lens.core.attribution import Attribution
from cna_lens.core.circuit import Circuit, Neuron
from cna_lens.core.discovery import Discovery
from cna_lens.core.universal import UniversalNeurons
from cna_lens.errors import CNAError
from cna_lens.models.loading import (
    PromptList,
    tokenize_prompts,
    validate_prompts,
)
from cna_lens.steering import steer
from cna_lens.steering.bake import _weight_of, down_projection
from cna_lens.viz.explore import (
    DEFAULT_REFUSAL_TOKENS,
    MIN_PER_SET,
    _as_neuron,
    _neuron_values,
    distribution_figure,
    token_strip,
    top_prompts,
)

__all__ = [
    "NeuronCard",
    "ablation_effect",
    "circuit_map",
    "logit_lens",
    "neuron_card",
    "neuron_logits",
    "refusal_token_ids",
]

logger = logging.getLogger(__name__)


def _final_norm_scale(model: Any) -> tuple[Float[Tensor, " d_model"], bool]:
    """The final norm's per-dimension scale as the model applies it, and whether it centres."""
    ln = getattr(model, "ln_final", None)
    if ln is None:
        raise CNAError(
            "the model has no final norm (model.ln_final); the logit lens reads "
            "a neuron through the final norm and the unembedding"
        )
    module = getattr(ln, "original_component", ln)
    weight = getattr(module, "weight", None)
    rms = getattr(ln, "uses_rms_norm", None)
    offset = getattr(ln, "uses_weight_offset", None)
    if not isinstance(weight, Tensor) or weight.ndim != 1 or rms is None or offset is None:
        raise CNAError(
            f"cannot tell how the final norm {type(module).__name__} applies its weight "
            "(expected a TransformerLens normalization bridge with a 1-D weight); the logit "
            "lens does not guess"
        )
    scale = weight.detach().float()
    if offset:  # Gemma-style: x / rms(x) * (1 + w)
        scale = 1.0 + scale
    return scale, not rms


def _unembedding(model: Any) -> Float[Tensor, "d_model d_vocab"]:
    try:
        w_u = model.W_U
    except Exception as exc:  # noqa: BLE001 - any failure means: no readable unembedding
        raise CNAError(
            f"the model exposes no unembedding W_U the logit lens can read "
            f"({type(exc).__name__}: {exc})"
        ) from exc
    d_model = int(model.cfg.d_model)
    if not isinstance(w_u, Tensor) or w_u.ndim != 2 or w_u.shape[0] != d_model:
        raise CNAError(
            f"the model's W_U is not a [d_model={d_model}, d_vocab] matrix "
            f"(got {getattr(w_u, 'shape', type(w_u).__name__)}); the logit lens "
            "cannot read it"
        )
    return w_u.detach()


def neuron_logits(model: Any, neuron: Any) -> Float[Tensor, " d_vocab"]:
    """Direct effect of one unit of the neuron's activation on every logit (float32, CPU).

    ``W_out[neuron] -> final norm scale -> W_U``: the neuron's down-projection column
    (read with :func:`cna_lens.steering.bake.down_projection`), multiplied by the final norm's
    weight as the model applies it (``w`` for RMSNorm, ``1 + w`` for Gemma-style norms;
    LayerNorm also subtracts the column's mean first), then by the unembedding ``W_U``.
    The norm also divides by the residual's RMS / standard deviation: a positive scalar
    per input that scales every logit alike and so does not change the ranking; it is
    left out, as are the unembedding bias and any logit soft-cap (monotonic), so values
    are in "logit per unit activation before normalisation".

    Raises:
        CNAError: a neuron outside the model, no readable unembedding or final norm.
    """
    n = _as_neuron(model, neuron)
    w_u = _unembedding(model)
    scale, centre = _final_norm_scale(model)
    module, axis = down_projection(model, n.layer)
    column = _weight_of(module).detach().select(axis, n.neuron).float().cpu()
    if centre:
        column = column - column.mean()
    return (column * scale.cpu()) @ w_u.float().cpu()


def logit_lens(model: Any, neuron: Any, k: int = 10) -> pd.DataFrame:
    """The ``k`` tokens the neuron's output direction most promotes and most suppresses.

    Returns:
        Columns ``direction`` ("promoted" / "suppressed"), ``rank``, ``token``,
        ``token_id``, ``logit`` (see :func:`neuron_logits`); promoted rows by logit
        descending, then suppressed rows ascending.
    """
    logits = neuron_logits(model, neuron)
    k = min(int(k), int(logits.numel()))
    if k < 1:
        raise CNAError(f"k must be >= 1, got {k}")
    rows = []
    for direction, largest in (("promoted", True), ("suppressed", False)):
        vals, ids = logits.topk(k, largest=largest)
        for rank, (v, i) in enumerate(zip(vals.tolist(), ids.tolist(), strict=True), 1):
            rows.append(
                {
                    "direction": direction,
                    "rank": rank,
                    "token": model.tokenizer.decode([i]),
                    "token_id": i,
                    "logit": v,
                }
            )
    return pd.DataFrame(rows)


def refusal_token_ids(model: Any, tokens: Sequence[str] | None = None) -> dict[str, int]:
    """Each candidate refusal opening that is a single token: its decoded text -> its id.

    Args:
        model: A bridge.
        tokens: Candidate strings (default :data:`DEFAULT_REFUSAL_TOKENS`); strings that
            are not one token in this tokenizer are skipped, duplicates ids dropped.

    Raises:
        CNAError: none of the candidates is a single token.
    """
    tok = model.tokenizer
    candidates = DEFAULT_REFUSAL_TOKENS if tokens is None else tuple(tokens)
    found: dict[str, int] = {}
    for text in candidates:
        ids = tok.encode(text, add_special_tokens=False)
        if len(ids) == 1 and ids[0] not in found.values() and ids[0] != tok.unk_token_id:
            found[tok.decode(ids)] = int(ids[0])
    if not found:
        raise CNAError(
            f"none of the refusal tokens {list(candidates)} is a single token of "
            "this tokenizer; pass refusal_tokens= with words it has"
        )
    return found


def _last_logits(
    model: Any, prompts: list[str], batch_size: int
) -> Float[Tensor, "n_prompts d_vocab"]:
    out: dict[int, Tensor] = {}
    for batch in tokenize_prompts(model, prompts, batch_size=batch_size):
        with torch.inference_mode():
            logits = model(batch.input_ids, attention_mask=batch.attention_mask)
        for row, i in enumerate(batch.indices):
            out[i] = logits[row, -1].float().cpu()
    return torch.stack([out[i] for i in range(len(prompts))])


def ablation_effect(
    model: Any,
    neuron: Any,
    prompts: PromptList,
    *,
    refusal_tokens: Sequence[str] | None = None,
    batch_size: int = 32,
) -> pd.DataFrame:
    """The change of refusal-token logits when only this neuron is ablated (``m = 0``).

    Next-token logits at the last prompt token (the reply's first token), with and without
    :func:`cna_lens.steer` of a one-neuron circuit at multiplier 0.

    Returns:
        One row per prompt x token: ``prompt``, ``token``, ``token_id``, ``clean``,
        ``ablated``, ``change`` (ablated - clean).
    """
    n = _as_neuron(model, neuron)
    prompts = validate_prompts(prompts, "ablation prompts")
    ids = refusal_token_ids(model, refusal_tokens)
    circuit = Circuit.from_pairs([(n.layer, n.neuron)], model=model)
    clean = _last_logits(model, prompts, batch_size)
    with steer(model, circuit, 0.0):
        ablated = _last_logits(model, prompts, batch_size)
    rows = []
    for p, prompt in enumerate(prompts):
        for text, i in ids.items():
            c, a = float(clean[p, i]), float(ablated[p, i])
            rows.append(
                {
                    "prompt": prompt,
                    "token": text,
                    "token_id": i,
                    "clean": c,
                    "ablated": a,
                    "change": a - c,
                }
            )
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------- the card
@dataclass(frozen=True)
class NeuronCard:
    """Everything :func:`neuron_card` found about one neuron.

    Attributes:
        neuron: The neuron, with its circuit delta if it came from a circuit (or a Neuron),
            else the delta measured on the card's prompts.
        activations: One row per prompt: ``prompt``, ``set``, ``activation`` (last token).
        top_prompts: See :func:`top_prompts`.
        logit_lens: See :func:`logit_lens`.
        ablation: See :func:`ablation_effect`.
        distribution: See :func:`distribution_figure`.
        strip: See :func:`token_strip` (on the most activating prompt by default).
    """

    neuron: Neuron
    activations: pd.DataFrame
    top_prompts: pd.DataFrame
    logit_lens: pd.DataFrame
    ablation: pd.DataFrame
    distribution: go.Figure
    strip: go.Figure

    def figures(self) -> dict[str, go.Figure]:
        """Name -> figure (for a notebook, :func:`cna_lens.viz.report.write_report` or saving)."""
        label = self.neuron.label
        return {f"{label}_distribution": self.distribution, f"{label}_strip": self.strip}

    def tables(self) -> dict[str, pd.DataFrame]:
        """Title -> table of the card's text parts."""
        return {
            "prompts that activate it most and least": self.top_prompts,
            "output direction through the unembedding": self.logit_lens,
            "ablated alone: refusal-token logits": self.ablation,
        }

    @property
    def summary(self) -> str:
        """One line: delta, the top promoted tokens, the mean ablation change."""
        promoted = self.logit_lens[self.logit_lens["direction"] == "promoted"]["token"]
        change = self.ablation["change"].mean() if len(self.ablation) else float("nan")
        return (
            f"{self.neuron.label} (delta {self.neuron.delta:+.4g}): promotes "
            f"{', '.join(repr(t) for t in promoted.head(5))}; ablated alone, refusal-token "
            f"logits change by {change:+.3g} on average"
        )

    def _repr_html_(self) -> str:
        parts = [f"<h3>{html.escape(self.summary)}</h3>"]
        for title, table in self.tables().items():
            parts.append(f"<h4>{html.escape(title)}</h4>")
            parts.append(table.to_html(index=False, float_format=lambda x: f"{x:.4g}"))
        parts.append("<p><i>figures: card.figures()</i></p>")
        return "\n".join(parts)


def neuron_card(
    model: Any,
    circuit_or_neuron: Any,
    positive: PromptList,
    negative: PromptList,
    *,
    rank: int = 0,
    k: int = 5,
    n_tokens: int = 10,
    strip_prompt: str | None = None,
    ablation_prompts: PromptList | None = None,
    refusal_tokens: Sequence[str] | None = None,
    names: tuple[str, str] = ("positive", "negative"),
    batch_size: int = 32,
) -> NeuronCard:
    """Build the card of one neuron.

    Args:
        model: A bridge from :func:`cna_lens.load_model`.
        circuit_or_neuron: A :class:`Neuron`, a ``(layer, neuron)`` pair, an ``"L3N7"``
            label, or a :class:`Circuit` (its ``rank``-th neuron).
        positive: The positive prompts (as given to discovery).
        negative: The negative prompts.
        rank: Which circuit neuron, when a circuit is given.
        k: Prompts at each end of :func:`top_prompts`.
        n_tokens: Tokens at each end of :func:`logit_lens`.
        strip_prompt: Prompt of the per-token strip (default: the most activating one).
        ablation_prompts: Prompts of :func:`ablation_effect` (default: the ``k`` most
            activating ones).
        refusal_tokens: Tokens whose logits the ablation reports (default: see
            :func:`refusal_token_ids`).
        names: Labels of the two sets.
        batch_size: Prompts per forward pass (the same as discovery's gives its values).

    Raises:
        CNAError: a neuron outside the model, fewer than 2 prompts in a set, or no readable
            unembedding.
    """
    n = _as_neuron(model, circuit_or_neuron, rank)
    positive = validate_prompts(positive, "positive prompts")
    negative = validate_prompts(negative, "negative prompts")
    for name, prompts in zip(names, (positive, negative), strict=True):
        if len(prompts) < MIN_PER_SET:
            raise CNAError(
                f"the {name} set has {len(prompts)} prompt(s); a neuron card "
                f"needs >= {MIN_PER_SET} per set for its distribution plot"
            )
    pos = _neuron_values(model, n, positive, batch_size)
    neg = _neuron_values(model, n, negative, batch_size)
    if not isinstance(circuit_or_neuron, (Circuit, Neuron)):  # no delta given: measure it
        delta = sum(pos) / len(pos) - sum(neg) / len(neg)
        n = Neuron(n.layer, n.neuron, float(delta))
    acts = pd.DataFrame(
        {
            "prompt": positive + negative,
            "set": [names[0]] * len(pos) + [names[1]] * len(neg),
            "activation": pos + neg,
        }
    )
    top = top_prompts(acts, k)
    lens = logit_lens(model, n, n_tokens)
    most = top[top["end"] == "top"]["prompt"].tolist()
    ablation = ablation_effect(
        model, n, ablation_prompts or most, refusal_tokens=refusal_tokens, batch_size=batch_size
    )
    return NeuronCard(
        neuron=n,
        activations=acts,
        top_prompts=top,
        logit_lens=lens,
        ablation=ablation,
        distribution=distribution_figure(pos, neg, label=n.label, names=names),
        strip=token_strip(model, n, strip_prompt or most[0]),
    )


# ----------------------------------------------------------------------------- the map
def _map_neurons(
    delta: Tensor, chosen: set[tuple[int, int]], top: int, n_random: int, seed: int
) -> tuple[set[tuple[int, int]], int]:
    """The neurons a circuit map plots: ``chosen``, the top ``top`` of each layer by
    |delta| and ``n_random`` others (seeded); also how many were sampled."""
    n_layers, d_mlp = delta.shape
    chosen = set(chosen)
    if top:
        idx = delta.abs().topk(top, dim=1).indices
        chosen |= {(layer, int(j)) for layer in range(n_layers) for j in idx[layer].tolist()}
    sampled = min(n_random, n_layers * d_mlp - len(chosen))
    left, rng = sampled, random.Random(seed)
    while left > 0:  # rejection sampling: the chosen set is tiny next to the grid
        pair = (rng.randrange(n_layers), rng.randrange(d_mlp))
        if pair not in chosen:
            chosen.add(pair)
            left -= 1
    return chosen, sampled


_MAP_STYLES = {
    "other": dict(color="#b0b0b0", size=5, symbol="circle"),
    "universal": dict(color="#2ca02c", size=9, symbol="x"),
    "circuit": dict(color="#d62728", size=9, symbol="diamond"),
}


def _map_scatter(
    fig: go.Figure,
    pairs: list[tuple[int, int]],
    delta: Tensor,
    effect: Tensor,
    name: str,
    style: dict[str, Any],
    jitter: random.Random,
) -> None:
    fig.add_scatter(
        x=[layer + jitter.uniform(-0.3, 0.3) for layer, _ in pairs],
        y=[float(delta[layer, j]) for layer, j in pairs],
        customdata=[[f"L{layer}N{j}", float(effect[layer, j])] for layer, j in pairs],
        mode="markers",
        name=name,
        marker=style,
        hovertemplate="%{customdata[0]}<br>delta %{y:.4g}<br>effect size "
        "%{customdata[1]:.3g}<extra></extra>",
    )


def circuit_map(
    attribution: Attribution | Discovery,
    circuit: Circuit | None = None,
    universal: UniversalNeurons | None = None,
    *,
    top_n_per_layer: int = 20,
    n_random: int = 500,
    seed: int = 0,
    title: str | None = None,
) -> go.Figure:
    """Every layer's neurons by delta: the circuit highlighted, universal neurons marked.

    To keep the figure light it plots the circuit's neurons, the top ``top_n_per_layer``
    neurons of each layer by |delta|, the universal neurons and ``n_random`` others drawn
    at random (the title says so). Hover shows ``L{l}N{n}``, delta and the effect size
    (delta over the pooled standard deviation, :attr:`Attribution.effect_size`).

    Args:
        attribution: The statistics, or a :class:`Discovery` (its circuit and universal
            neurons are used unless given).
        circuit: Neurons to highlight.
        universal: Neurons to mark as universal.
        top_n_per_layer: Strongest neurons per layer always shown.
        n_random: Other neurons sampled at random (seeded by ``seed``).
        title: Figure title (default says what is plotted).
    """
    if isinstance(attribution, Discovery):
        circuit = attribution.circuit if circuit is None else circuit
        universal = attribution.universal if universal is None else universal
        attribution = attribution.attribution
    if top_n_per_layer < 0 or n_random < 0:
        raise CNAError(
            f"top_n_per_layer and n_random must be >= 0, got {top_n_per_layer}, {n_random}"
        )
    delta = attribution.delta.double().cpu()
    effect = attribution.effect_size.double().cpu()
    n_layers, d_mlp = delta.shape
    in_circuit = circuit.pairs if circuit is not None else frozenset()
    if circuit is not None and (circuit.n_layers, circuit.d_mlp) != (n_layers, d_mlp):
        raise CNAError(
            f"circuit is for {(circuit.n_layers, circuit.d_mlp)} neurons but the "
            f"attribution is {(n_layers, d_mlp)}"
        )
    is_universal = set(universal.pairs) if universal is not None else set()
    top = min(top_n_per_layer, d_mlp)
    chosen, sampled = _map_neurons(delta, set(in_circuit) | is_universal, top, n_random, seed)
    jitter = random.Random(seed + 1)
    groups: dict[str, list[tuple[int, int]]] = {"other": [], "universal": [], "circuit": []}
    for pair in sorted(chosen):
        key = "circuit" if pair in in_circuit else "universal" if pair in is_universal else "other"
        groups[key].append(pair)
    names = {
        "other": "top per layer + random",
        "universal": "universal (filtered out)",
        "circuit": f"circuit (k={len(in_circuit)})",
    }
    fig = go.Figure()
    for key, pairs in groups.items():
        if pairs:
            _map_scatter(fig, pairs, delta, effect, names[key], _MAP_STYLES[key], jitter)
    fig.update_layout(
        title=title
        or (
            f"Neuron delta by layer: {len(in_circuit)} circuit neurons, top "
            f"{top}/layer, {sampled} random of {n_layers * d_mlp}"
        ),
        xaxis=dict(title="layer", tickmode="linear", dtick=1),
        yaxis_title="delta = mean(positive) - mean(negative)",
        template="plotly_white",
    )
    return fig
