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
  (:func:`~cna_lens.viz.cards.ablation_effect`). :func:`~cna_lens.viz.cards.neuron_card`
  bundles them in a :class:`~cna_lens.viz.cards.NeuronCard`, and
  :func:`~cna_lens.viz.cards.circuit_map` shows every neuron's delta by layer
  (:mod:`cna_lens.viz.cards`).

Example:
    >>> found = cl.discover_full(model, harmful, benign)  # doctest: +SKIP
    >>> card = cl.neuron_card(model, found.circuit, harmful, benign)  # doctest: +SKIP
    >>> card.logit_lens.head()  # doctest: +SKIP
    >>> cl.circuit_map(found)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import torch
from torch import Tensor

from cna_lens._validate import check_layer_set
from cna_lens.core.circuit import Circuit, Neuron
from cna_lens.errors import CNAError
from cna_lens.models.loading import (
    MLP_HOOK,
    PromptList,
    mlp_hook_names,
    pad_id,
    tokenize_prompts,
    validate_prompts,
)

__all__ = [
    "DEFAULT_REFUSAL_TOKENS",
    "activation_cache",
    "distribution_figure",
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
    return list(check_layer_set(layers, n_layers, hint=" (or None for all layers)"))


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
    from transformer_lens import ActivationCache  # import time: only when a cache is built

    if positions not in POSITIONS:
        raise CNAError(f"positions must be one of {list(POSITIONS)}, got {positions!r}")
    prompts = validate_prompts(prompts)
    layers = _check_layers(model, layers)
    mlp_hook_names(model)  # refuse models without hook_post up front
    names = [MLP_HOOK.format(layer=layer) for layer in layers]
    batches = tokenize_prompts(model, prompts, batch_size=batch_size)
    width = max(int(b.input_ids.shape[1]) for b in batches)
    n = len(prompts)
    input_ids = torch.full((n, width), pad_id(model), dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    rows: dict[str, Tensor] = {}
    for batch in batches:
        cache = _batch_cache(model, batch, names, layers[-1])
        idx = torch.tensor(batch.indices, dtype=torch.long)
        w = int(batch.input_ids.shape[1])
        input_ids[idx, width - w :] = batch.input_ids.cpu()
        mask[idx, width - w :] = batch.attention_mask.cpu()
        for name in names:
            _place(rows, name, cache[name], batch, idx, (n, width), positions)
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


def _batch_cache(model: Any, batch: Any, names: list[str], last: int) -> Any:
    """``run_with_cache`` of one batch, stopping right after layer ``last``'s MLP.

    Raises:
        CNAError: the pass never reached a requested hook.
    """
    from transformer_lens.model_bridge.exceptions import StopAtLayerException

    stop_at = last + 1 if last + 1 < int(model.cfg.n_layers) else None
    stop_name = f"blocks.{last}.mlp.hook_out"
    stop_hooks = []
    if stop_at is None and stop_name in model.hook_dict:  # the last layer: stop after its MLP

        def stop(act: Tensor, hook: Any) -> None:
            raise StopAtLayerException(act)

        stop_hooks = [(stop_name, stop)]
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
    return cache


def _place(
    rows: dict[str, Tensor],
    name: str,
    act: Tensor,
    batch: Any,
    idx: Tensor,
    shape: tuple[int, int],
    positions: str,
) -> None:
    """Write one batch's activations at ``name`` into the rows of its prompts (``shape`` is
    (prompts, padded width); the rows are allocated on first use)."""
    n, width = shape
    if name not in rows:
        size = (n, act.shape[-1]) if positions == "last" else (n, width, act.shape[-1])
        rows[name] = act.new_zeros(size)
    w = int(batch.input_ids.shape[1])
    dev_idx = idx.to(act.device)
    if positions == "last":
        rows[name][dev_idx] = act[:, -1]
    else:
        real = batch.attention_mask.to(act.device).bool()[..., None]
        rows[name][dev_idx, width - w :] = torch.where(real, act, act.new_zeros(()))


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
