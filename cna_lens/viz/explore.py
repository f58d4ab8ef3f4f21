"""Explore: look inside a circuit, one neuron at a time, in a notebook.

* :func:`activation_cache` — a TransformerLens ``ActivationCache`` of
  ``blocks.{L}.mlp.hook_post`` for a prompt list, formatted and batched exactly as
  discovery does it, so its last-token values are the ones discovery's statistics were
  built from.
* Neuron cards — pure functions returning a ``pandas.DataFrame`` or a
  ``plotly.graph_objects.Figure`` for one neuron: its activation distribution on the two
  prompt sets (:func:`distribution_figure`), the prompts that activate it most and least
  (:func:`top_prompts`), where in a prompt it fires (:func:`token_strip`), the tokens its
  output direction promotes and suppresses through the unembedding (:func:`logit_lens`),
  and the change of refusal-token logits when it alone is ablated
  (:func:`ablation_effect`). :func:`neuron_card` bundles them in a :class:`NeuronCard`.
* :func:`circuit_map` — every neuron's delta by layer in one figure, the circuit
  highlighted and the universal neurons marked.

Example:
    >>> found = cl.discover_full(model, harmful, benign)  # doctest: +SKIP
    >>> card = cl.neuron_card(model, found.circuit, harmful, benign)  # doctest: +SKIP
    >>> card.logit_lens.head()  # doctest: +SKIP
    >>> cl.circuit_map(found)  # doctest: +SKIP
"""

from __future__ import annotations

import html
import logging
import random
import re
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
    MLP_HOOK,
    PromptList,
    _pad_id,
    mlp_hook_names,
    tokenize_prompts,
    validate_prompts,
)

__all__ = [
    "DEFAULT_REFUSAL_TOKENS",
    "NeuronCard",
    "ablation_effect",
    "activation_cache",
    "circuit_map",
    "distribution_figure",
    "logit_lens",
    "neuron_card",
    "neuron_logits",
    "refusal_token_ids",
    "token_strip",
    "top_prompts",
]

logger = logging.getLogger(__name__)

POSITIONS = ("last", "all")
MIN_PER_SET = 2
"""Prompts each set needs for a distribution plot (a violin of one value is no distribution)."""

DEFAULT_REFUSAL_TOKENS: tuple[str, ...] = (
    "Sorry",
    " Sorry",
    "sorry",
    " sorry",
    "I",
    " I",
    "i",
    " i",
    "cannot",
    " cannot",
    "Unfortunately",
    " Unfortunately",
)
"""Candidate first words of a refusal; :func:`refusal_token_ids` keeps the single tokens."""


# ----------------------------------------------------------------------------- inputs
def _check_layers(model: Any, layers: Sequence[int] | None) -> list[int]:
    n_layers = int(model.cfg.n_layers)
    if layers is None:
        return list(range(n_layers))
    if isinstance(layers, (int, str)):
        raise CNAError(f"layers must be a list of layer indices, got {layers!r}")
    out = sorted({int(x) for x in layers})
    if not out:
        raise CNAError(
            f"layers is empty; give at least one layer in 0..{n_layers - 1} "
            "(or None for all layers)"
        )
    bad = [x for x in out if not 0 <= x < n_layers]
    if bad:
        raise CNAError(f"layers {bad} out of range; valid layers are 0..{n_layers - 1}")
    return out


def _as_neuron(model: Any, target: Any, rank: int = 0) -> Neuron:
    """A :class:`Neuron` from a Neuron, a circuit (its ``rank``-th neuron), a (layer, neuron)
    pair or an ``"L{l}N{n}"`` label, checked against the model's shape."""
    if isinstance(target, Circuit):
        if not 0 <= rank < len(target):
            raise CNAError(f"rank {rank} out of range for a circuit of {len(target)} neurons")
        target = target.neurons[rank]
    if isinstance(target, str):
        match = re.fullmatch(r"L(\d+)N(\d+)", target.strip())
        if not match:
            raise CNAError(f"neuron label {target!r} is not of the form 'L{{layer}}N{{neuron}}'")
        target = (int(match[1]), int(match[2]))
    if isinstance(target, tuple) and len(target) == 2:
        target = Neuron(int(target[0]), int(target[1]))
    if not isinstance(target, Neuron):
        raise CNAError(
            f"expected a Neuron, a Circuit, a (layer, neuron) pair or an 'L3N7' "
            f"label, got {type(target).__name__}"
        )
    n_layers, d_mlp = int(model.cfg.n_layers), int(model.cfg.d_mlp)
    if not 0 <= target.layer < n_layers:
        raise CNAError(
            f"{target.label}: layer {target.layer} outside the model's layers 0..{n_layers - 1}"
        )
    if not 0 <= target.neuron < d_mlp:
        raise CNAError(
            f"{target.label}: neuron {target.neuron} outside the model's "
            f"{d_mlp} neurons per layer (0..{d_mlp - 1})"
        )
    return target


def _decode_tokens(model: Any, ids: Sequence[int]) -> list[str]:
    tok = model.tokenizer
    return [tok.decode([int(i)]) for i in ids]


# ----------------------------------------------------------------------------- the cache
def activation_cache(
    model: Any,
    prompts: PromptList,
    *,
    layers: Sequence[int] | None = None,
    positions: str = "last",
    batch_size: int = 32,
) -> Any:
    """A TransformerLens ``ActivationCache`` of ``blocks.{L}.mlp.hook_post`` for ``prompts``.

    Prompts are formatted, tokenized, left-padded and batched exactly as discovery does it
    (:func:`cna_lens.tokenize_prompts` with the same ``batch_size``, grouped by length),
    and each batch runs through the bridge's own ``run_with_cache`` with a names filter,
    stopping right after the last requested layer. With the same ``batch_size`` as
    discovery, the last-token values are bit for bit the ones
    :func:`cna_lens.iter_activations` yields (and discovery's statistics sum).

    Layout (rows always in the caller's prompt order):

    * ``positions="last"``: ``cache["blocks.{L}.mlp.hook_post"]`` is ``[n_prompts, d_mlp]``,
      the activation at every prompt's last token.
    * ``positions="all"``: ``[n_prompts, pos, d_mlp]``, every prompt left-padded to the
      longest one; padded positions hold 0.0. ``cache.attention_mask`` (``[n_prompts,
      pos]``, 1 on real tokens) tells them apart.

    Either way the cache also carries ``cache.input_ids`` and ``cache.attention_mask``
    (``[n_prompts, pos]``, left-padded to the longest prompt), ``cache.str_tokens`` (each
    prompt's real tokens, decoded one by one), ``cache.prompts``, ``cache.layers`` and
    ``cache.positions``. Values are in the model's dtype, on its device.

    Args:
        model: A bridge from :func:`cna_lens.load_model`.
        prompts: Prompt texts.
        layers: Layers to cache (default: all).
        positions: "last" (the last prompt token, what CNA reads) or "all".
        batch_size: Prompts per forward pass (discovery's default is 32).

    Raises:
        CNAError: bad prompts or batch size, an empty or out-of-range layer list, or an
            unknown ``positions``.
    """
    from transformer_lens import ActivationCache
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    if positions not in POSITIONS:
        raise CNAError(f"positions must be one of {list(POSITIONS)}, got {positions!r}")
    prompts = validate_prompts(prompts)
    layers = _check_layers(model, layers)
    mlp_hook_names(model)  # refuse models without hook_post up front
    names = [MLP_HOOK.format(layer=layer) for layer in layers]
    batches = tokenize_prompts(model, prompts, batch_size=batch_size)
    last = layers[-1]
    n_layers = int(model.cfg.n_layers)
    stop_at = last + 1 if last + 1 < n_layers else None
    stop_name = f"blocks.{last}.mlp.hook_out"
    stop_hooks = []
    if stop_at is None and stop_name in model.hook_dict:  # the last layer: stop after its MLP

        def stop(act: Tensor, hook: Any) -> None:
            raise StopAtLayerException(act)

        stop_hooks = [(stop_name, stop)]

    width = max(int(b.input_ids.shape[1]) for b in batches)
    n = len(prompts)
    input_ids = torch.full((n, width), _pad_id(model), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    rows: dict[str, Tensor] = {}
    for batch in batches:
        with torch.inference_mode(), model.hooks(fwd_hooks=stop_hooks):
            _, cache = model.run_with_cache(
                batch.input_ids,
                attention_mask=batch.attention_mask,
                names_filter=names,
                stop_at_layer=stop_at,
                output_attentions=False,
            )
        missing = [name for name in names if name not in cache]
        if missing:
            raise CNAError(
                f"the forward pass never reached {missing[:3]}; cannot read MLP "
                "neuron activations there"
            )
        idx = torch.tensor(batch.indices, dtype=torch.long)
        w = int(batch.input_ids.shape[1])
        input_ids[idx, width - w :] = batch.input_ids.cpu()
        mask[idx, width - w :] = batch.attention_mask.cpu()
        for name in names:
            act = cache[name]
            if name not in rows:
                shape = (n, act.shape[-1]) if positions == "last" else (n, width, act.shape[-1])
                rows[name] = act.new_zeros(shape)
            dev_idx = idx.to(act.device)
            if positions == "last":
                rows[name][dev_idx] = act[:, -1]
            else:
                real = batch.attention_mask.to(act.device).bool()[..., None]
                rows[name][dev_idx, width - w :] = torch.where(real, act, act.new_zeros(()))
    out = ActivationCache(rows, model, has_batch_dim=True)
    extras = {
        "input_ids": input_ids,
        "attention_mask": mask,
        "str_tokens": [
            _decode_tokens(model, ids[m.bool()].tolist())
            for ids, m in zip(input_ids, mask, strict=True)
        ],
        "prompts": prompts,
        "layers": layers,
        "positions": positions,
    }
    for key, value in extras.items():  # plain attributes on the TransformerLens object
        setattr(out, key, value)
    return out


def _neuron_values(model: Any, neuron: Neuron, prompts: list[str], batch_size: int) -> list[float]:
    cache = activation_cache(model, prompts, layers=[neuron.layer], batch_size=batch_size)
    return cache[MLP_HOOK.format(layer=neuron.layer)][:, neuron.neuron].float().tolist()


# ----------------------------------------------------------------------------- card parts
def distribution_figure(
    positive: Sequence[float],
    negative: Sequence[float],
    *,
    label: str = "neuron",
    names: tuple[str, str] = ("positive", "negative"),
) -> go.Figure:
    """Violins of one neuron's last-token activation on the positive and negative sets.

    Raises:
        CNAError: a set with fewer than 2 values.
    """
    for name, values in zip(names, (positive, negative), strict=True):
        if len(values) < MIN_PER_SET:
            raise CNAError(
                f"the {name} set has {len(values)} prompt(s); a distribution plot "
                f"needs >= {MIN_PER_SET} per set"
            )
    fig = go.Figure()
    for name, values, color in zip(
        names, (positive, negative), ("#d62728", "#1f77b4"), strict=True
    ):
        mean = sum(values) / len(values)
        fig.add_violin(
            y=list(values),
            name=f"{name} (n={len(values)}, mean {mean:.3g})",
            box_visible=True,
            meanline_visible=True,
            points="all",
            line_color=color,
            hoverinfo="y",
        )
    fig.update_layout(
        title=f"{label}: last-token activation",
        yaxis_title="activation",
        showlegend=False,
        template="plotly_white",
    )
    return fig


def top_prompts(activations: pd.DataFrame, k: int = 5) -> pd.DataFrame:
    """The ``k`` prompts with the highest and the ``k`` with the lowest activation.

    Args:
        activations: One row per prompt with columns ``prompt``, ``set`` and ``activation``
            (:attr:`NeuronCard.activations`).
        k: Prompts at each end.

    Returns:
        Columns ``end`` ("top" / "bottom"), ``rank``, ``prompt``, ``set``, ``activation``;
        top rows sorted by activation descending, then bottom rows ascending.
    """
    if k < 1:
        raise CNAError(f"k must be >= 1, got {k}")
    missing = {"prompt", "set", "activation"} - set(activations.columns)
    if missing:
        raise CNAError(f"activations needs columns {sorted(missing)}")
    order = activations.sort_values("activation", ascending=False, kind="stable")
    top = order.head(k).assign(end="top")
    bottom = order.iloc[::-1].head(k).assign(end="bottom")
    out = pd.concat([top, bottom], ignore_index=True)
    out.insert(1, "rank", [*range(1, len(top) + 1), *range(1, len(bottom) + 1)])
    return out[["end", "rank", "prompt", "set", "activation"]]


def token_strip(model: Any, neuron: Any, prompt: str, *, title: str | None = None) -> go.Figure:
    """Heat strip of one neuron's activation at every token of ``prompt`` (chat-formatted).

    Each cell is one token of the formatted prompt, labelled with its text; the colour
    scale is centred on 0 (red positive, blue negative).
    """
    n = _as_neuron(model, neuron)
    cache = activation_cache(model, [prompt], layers=[n.layer], positions="all", batch_size=1)
    acts = cache[MLP_HOOK.format(layer=n.layer)][0, :, n.neuron].float().cpu()
    values = acts[cache.attention_mask[0].bool()].tolist()
    tokens = cache.str_tokens[0]
    bound = max((abs(v) for v in values), default=1.0) or 1.0
    fig = go.Figure(
        go.Heatmap(
            z=[values],
            x=list(range(len(values))),
            text=[[repr(t)[1:-1] for t in tokens]],
            texttemplate="%{text}",
            colorscale="RdBu_r",
            zmin=-bound,
            zmax=bound,
            zmid=0,
            hovertemplate="position %{x}: %{text}<br>activation %{z:.4g}<extra></extra>",
            colorbar=dict(title="act"),
        )
    )
    fig.update_layout(
        title=title or f"{n.label} per token: {prompt[:60]!r}",
        xaxis_title="token position",
        yaxis=dict(visible=False),
        height=230,
        template="plotly_white",
    )
    return fig


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
    from cna_lens.steering.bake import _weight_of, down_projection

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
    from cna_lens.steering.hooks import steer

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
    chosen = set(in_circuit) | is_universal
    top = min(top_n_per_layer, d_mlp)
    if top:
        idx = delta.abs().topk(top, dim=1).indices
        chosen |= {(layer, int(j)) for layer in range(n_layers) for j in idx[layer].tolist()}
    rest = n_layers * d_mlp - len(chosen)
    n_sample = min(n_random, rest)
    rng = random.Random(seed)
    while n_sample > 0:  # rejection sampling: the chosen set is tiny next to the grid
        pair = (rng.randrange(n_layers), rng.randrange(d_mlp))
        if pair not in chosen:
            chosen.add(pair)
            n_sample -= 1
    jitter = random.Random(seed + 1)
    groups: dict[str, list[tuple[int, int]]] = {"other": [], "universal": [], "circuit": []}
    for pair in sorted(chosen):
        key = "circuit" if pair in in_circuit else "universal" if pair in is_universal else "other"
        groups[key].append(pair)
    styles = {
        "other": dict(color="#b0b0b0", size=5, symbol="circle"),
        "universal": dict(color="#2ca02c", size=9, symbol="x"),
        "circuit": dict(color="#d62728", size=9, symbol="diamond"),
    }
    names = {
        "other": "top per layer + random",
        "universal": "universal (filtered out)",
        "circuit": f"circuit (k={len(in_circuit)})",
    }
    fig = go.Figure()
    for key, pairs in groups.items():
        if not pairs:
            continue
        fig.add_scatter(
            x=[layer + jitter.uniform(-0.3, 0.3) for layer, _ in pairs],
            y=[float(delta[layer, j]) for layer, j in pairs],
            customdata=[[f"L{layer}N{j}", float(effect[layer, j])] for layer, j in pairs],
            mode="markers",
            name=names[key],
            marker=styles[key],
            hovertemplate="%{customdata[0]}<br>delta %{y:.4g}<br>effect size "
            "%{customdata[1]:.3g}<extra></extra>",
        )
    fig.update_layout(
        title=title
        or (
            f"Neuron delta by layer: {len(in_circuit)} circuit neurons, top "
            f"{top}/layer, {min(n_random, rest)} random of {n_layers * d_mlp}"
        ),
        xaxis=dict(title="layer", tickmode="linear", dtick=1),
        yaxis_title="delta = mean(positive) - mean(negative)",
        template="plotly_white",
    )
    return fig
